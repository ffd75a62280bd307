"""Why a request was refused with 429, in words a user can act on: which policy refused it and
how long to wait, and, when waiting is not the whole story, what to change (a request that can
never fit its quota; a counter that other policies share). Pure functions, no I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .limiter import Budget, CounterState
from .policy import MAX_WINDOW, USER, Policy, Unit, format_quota
from .usage import output_limit

_SMALLEST = {Unit.REQUEST: "request", Unit.TOKEN: "token", Unit.CENTS: "millionth of a cent"}


@dataclass(frozen=True, slots=True)
class Request:
    """What a refused request asked for, as the gateway estimated it."""

    prompt_tokens: int = 0
    output_tokens: int = 0
    body: dict[str, Any] | None = None
    priced: bool = False  # a per-call price from the config, not an estimate


def never_fits(never: Sequence[tuple[Budget, int]], request: Request) -> str:
    """The 429 message of a request that no wait can admit (budgets and the amounts they refused):
    why, and what to change."""
    return " ".join(_never_fits(budget, amount, request) for budget, amount in never)


def _never_fits(budget: Budget, amount: int, request: Request) -> str:
    name = budget.strictest.normal_form()
    if budget.quota == 0:
        return (
            f"Policy {name} can never admit a request: its quota is below one {_SMALLEST[budget.unit]}, "
            f"the smallest amount the gateway counts: raise the quota{_same_rate(budget.strictest)}."
        )
    if request.priced:
        return (
            f"A call of this endpoint costs {_quantity(budget.unit, amount)} (its configured call "
            f"price), more than the whole quota of policy {name}: it can never fit, however long it waits. "
            "Raise the quota."
        )
    need = f"{amount} tokens" if budget.unit is Unit.TOKEN else f"{_number(budget.unit, amount)} cents"
    return (
        f"This request may {'use' if budget.unit is Unit.TOKEN else 'cost'} up to {need} ({request.prompt_tokens} "
        f"tokens of input, up to {request.output_tokens} of output), more than the whole quota of policy {name}: "
        f"it can never fit, however long it waits. {_advice(budget, request)}"
    )


def _same_rate(policy: Policy) -> str:
    """The same rate with a quota of one smallest unit and a longer window, if one is allowed."""
    smallest = Decimal(1) / policy.scale
    window = math.ceil(policy.window * smallest / policy.quota)
    if window > MAX_WINDOW:
        return ""
    same = Policy(smallest, window, policy.unit, policy.segment).normal_form()
    return f" (about the same rate: {same})"


def _advice(budget: Budget, request: Request) -> str:
    room = budget.quota - request.prompt_tokens if budget.unit is Unit.TOKEN else 0
    leaves = f" (its input leaves room for {room} tokens of output)" if room > 0 else ""
    body = request.body or {}
    limit = output_limit(body)
    named = limit[1] if limit is not None else None  # the limit the estimate counted (a 0 counts as none)
    if request.output_tokens == 0 or (budget.unit is Unit.TOKEN and room <= 0):
        return "To fit, shorten the input, or raise the quota."
    if named is not None:
        return f"To fit, lower {named}{leaves}, or raise the quota."
    return (
        "It sets no max_tokens, so the gateway counts default_max_tokens for each completion it may "
        f"return: set max_tokens{leaves}, raise the quota, or ask the operator to lower default_max_tokens."
    )


def denied(denying: Sequence[tuple[Budget, CounterState]], retry: int) -> str:
    """The 429 message of a request its budgets refused now: the policies, the wait, and a note
    for each refusing counter that other policies share."""
    names = ", ".join(p.normal_form() for b, _ in denying for p in b.policies)
    notes = [note for b, s in denying if (note := shared(b, s))]
    return " ".join([f"Rate limit exceeded ({names}). Retry after {retry} seconds.", *notes])


def shared(budget: Budget, state: CounterState) -> str:
    """What to say of a refusing counter that other policies' calls filled; "" if none did, as far as
    the store can tell: the last call it admitted named other policies, or (requests) it holds more
    than this request's quota, which only a call under a larger quota can have taken."""
    own = {p.normal_form() for p in budget.policies}
    others = [p for p in state.last_policies if p not in own]
    if not others and not (budget.unit is Unit.REQUEST and state.used > budget.quota):
        return ""
    policy = budget.strictest
    who = f"calls made under {', '.join(others)}" if others else "calls made under other policies"
    return (
        f"Its counter ({_counter(budget)}) is shared: policies that differ only in quota share one "
        f"counter, and {who} count against it too ({_number(budget.unit, state.used)} used, quota "
        f"{policy.quota_text}). For a budget of its own, give {policy.normal_form()} a different window "
        f"(w={budget.window + 1}, say) or segment."
    )


def _counter(budget: Budget) -> str:
    if budget.segment is None:
        segment = "no segment: one for the whole key"
    elif budget.segment == USER:
        segment = "per user"
    else:
        segment = f"per {budget.segment}"
    return f"u={budget.unit.value}, w={budget.window}, {segment}"


def _number(unit: Unit, scaled: int) -> str:
    """A stored amount in the policy's own unit (cents, not micro-cents)."""
    return format_quota(Decimal(scaled) / unit.scale)


def _quantity(unit: Unit, scaled: int) -> str:
    return f"{_number(unit, scaled)} {'cents' if unit is Unit.CENTS else unit.value + 's'}"


def logged(
    budgets: Sequence[Budget],
    amounts: Sequence[int],
    states: Sequence[CounterState],
    policies: Sequence[Policy],
    message: str,
    retry: int | None,
) -> tuple[str | None, str]:
    """For the log line of a 429: the policies that refused the call, and how much of each was
    used (held by calls in flight); the call's own policies and the message when none is full."""
    names, parts = [], []
    for budget, amount, state in zip(budgets, amounts, states, strict=False):
        spent = state.used + state.held
        for policy in budget.policies:
            full = spent >= policy.scaled_quota if budget.holds else spent + amount > policy.scaled_quota
            if not full:
                continue
            names.append(policy.normal_form())
            parts.append(f"{policy.normal_form()}: {_usage_text(policy, state)}{_sharing(budget.policies, policy)}")
    if not names:  # refused for another reason (a call that can never fit): its message says why
        return ", ".join(p.normal_form() for p in policies) or None, message
    return ", ".join(names), "; ".join(parts) + (f"; retry after {retry} s" if retry is not None else "")


_UNIT_NAMES = {Unit.REQUEST: "requests", Unit.CENTS: "cents", Unit.TOKEN: "tokens"}


def _usage_text(policy: Policy, state: CounterState) -> str:
    used = format_quota(Decimal(state.used) / policy.scale)
    text = f"{used} of {policy.quota_text} {_UNIT_NAMES[policy.unit]} used"
    if state.held:
        text += f", {format_quota(Decimal(state.held) / policy.scale)} held by calls in flight"
    return text


def _sharing(policies: tuple[Policy, ...], policy: Policy) -> str:
    others = [p.normal_form() for p in policies if p is not policy]
    return f" (one counter with {', '.join(others)})" if others else ""
