"""How quotagate counts: a bucketed sliding window, with holds for calls in flight.

A budget (one counter) is scoped to a gateway key, a unit, a window `w` and a segment value. Its
window is cut into buckets of `g = ceil(w / 60)` seconds aligned on the epoch; each bucket keeps
its amount and the time of its latest unit. At time `now` the budget's usage is the sum of the
buckets whose latest unit is younger than `w` seconds: every unit taken in the last `w` seconds is
counted, and a partly expired bucket is counted whole until its latest unit expires. So the limiter
never admits more than the quota in any `w`-second interval, and under-admits by at most the
units of one bucket: a unit is released between `w` and `w + g` seconds after it was taken (and
`Helicone-RateLimit-Reset` never exceeds `w`).

`cents` and `token` budgets also hold an estimate for each call in flight; a hold is released
(replaced by the real amount) when the call is charged, or expires after `hold_ttl` seconds if
the gateway that placed it died.

This module holds the algorithm for Python-side stores (SQLite) and the header arithmetic; the
Redis store mirrors the same steps in Lua.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from .policy import Policy, Unit

BUCKETS_PER_WINDOW = 60


def granularity(window: int) -> int:
    """Seconds per bucket for a window."""
    return -(-window // BUCKETS_PER_WINDOW)


class Budget(NamedTuple):
    """One counter that a request draws on, with the strictest quota naming it. What a request
    takes from it (its amount) travels beside it: see `base_amounts`. Immutable: a named tuple,
    made in a third of the time a frozen dataclass takes (three per request; bench/README.md,
    issue 14)."""

    id: str
    key_id: str
    unit: Unit
    window: int
    segment: str | None
    value: str | None
    quota: int  # scaled, the smallest quota of the policies naming this counter
    policies: tuple[Policy, ...] = ()
    holds: bool = False  # cents and tokens hold an estimate while in flight; requests take at once
    positions: tuple[int, ...] = ()  # beside `policies`: where the request listed each of them

    @property
    def strictest(self) -> Policy:
        """The policy with the smallest quota: the one that names this counter in refusals and denials."""
        return min(self.policies, key=lambda p: p.scaled_quota)


def ratio(used: int, held: int, quota: int) -> float:
    """How much of a quota is used or held (1.0 for a quota below one stored unit): the dashboard's order."""
    return (used + held) / quota if quota else 1.0


@dataclass(slots=True)
class CounterState:
    """What a store reports about one counter after an admission or a charge."""

    used: int  # charged in the current window (scaled units)
    held: int  # held by calls in flight (scaled units)
    reset: int  # seconds until the usage next shrinks; 0 when nothing is counted
    retry_after: int = 0  # seconds until a denied request would fit
    # on a denial, for a counter that refused: the policies of the last call it admitted, when they
    # are not this request's (policies differing only in quota share a counter)
    last_policies: tuple[str, ...] = ()


@dataclass(slots=True)
class Admission:
    key_active: bool
    allowed: bool
    states: list[CounterState]


@functools.lru_cache(maxsize=16384)
def encode_value(value: str) -> str:
    """A segment value as a key part that cannot collide or contain store metacharacters."""
    raw = value.encode("utf-8", "surrogateescape")
    if len(raw) > 96:
        return "~" + hashlib.sha256(raw).hexdigest()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def budget_id(key_id: str, unit: Unit, window: int, segment: str | None, value: str | None) -> str:
    return _budget_prefix(key_id, unit, window, segment) + ("" if value is None else encode_value(value))


@functools.lru_cache(maxsize=4096)
def _budget_prefix(key_id: str, unit: Unit, window: int, segment: str | None) -> str:
    """The part of a budget id without its segment value: few of them, so they are cached (whole
    ids, one per segment value, would not fit the cache)."""
    seg = "-" if segment is None else ("u" if segment == "user" else "p." + segment)
    return f"{key_id}:{unit.value}:{window}:{seg}:"


def parse_budget_id(text: str) -> dict[str, Any]:
    """The parts of a budget id; the value is None when the id holds only its hash (long values)."""
    key_id, unit, window, seg, val = text.split(":", 4)
    segment = None if seg == "-" else ("user" if seg == "u" else seg[2:])
    value: str | None = None
    if val and not val.startswith("~"):
        value = base64.urlsafe_b64decode(val + "=" * (-len(val) % 4)).decode("utf-8", "surrogateescape")
    elif not val and segment is not None:
        value = ""
    return {"key_id": key_id, "unit": unit, "window": int(window), "segment": segment, "value": value}


@functools.lru_cache(maxsize=4096)
def policies_json(policies: tuple[Policy, ...]) -> bytes:
    """The normal forms of the policies naming a budget, as stored beside it for the dashboard."""
    return orjson.dumps([p.normal_form() for p in policies])


def budgets_for(key_id: str, policies: Iterable[Policy], values: Mapping[str | None, str | None]) -> list[Budget]:
    """Group policies into counters: a request takes from each counter once."""
    return [  # positional: a named tuple made from keywords costs a third more
        Budget(
            budget_id(key_id, unit, window, segment, value),
            key_id,
            unit,
            window,
            segment,
            value,
            quota,
            grouped,
            holds,
            positions,
        )
        for unit, window, segment, quota, grouped, holds, positions in _groups(tuple(policies))
        for value in (values.get(segment),)
    ]


def base_amounts(budgets: Iterable[Budget]) -> list[int]:
    """What a request takes from each budget before anything is estimated: one from a request
    budget (taken at once), nothing from a cents or token budget (which holds an estimate)."""
    return [0 if b.holds else 1 for b in budgets]


_Group = tuple[Unit, int, str | None, int, tuple[Policy, ...], bool, tuple[int, ...]]


@functools.lru_cache(maxsize=4096)
def _groups(policies: tuple[Policy, ...]) -> tuple[_Group, ...]:
    """The counters a list of policies names, worked out once per list: policies differing only
    in quota share one, held to the smallest quota; each with where its policies stand in the list."""
    kinds: dict[tuple[Unit, int, str | None], list[int]] = {}
    for index, policy in enumerate(policies):
        kinds.setdefault(policy.budget_kind, []).append(index)
    return tuple(
        (
            unit,
            window,
            segment,
            min(policies[i].scaled_quota for i in indices),
            tuple(policies[i] for i in indices),
            unit is not Unit.REQUEST,
            tuple(indices),
        )
        for (unit, window, segment), indices in kinds.items()
    )


# --- the window algorithm, on a plain dict so that stores can serialize it as they like ----------
#
# state = {"b": {bucket index: [amount, time of its latest unit]}, "t": total of the buckets,
#          "h": {reservation: [amount, expiry]}}


def new_state() -> dict:
    return {"b": {}, "t": 0, "h": {}}


def expire(state: dict, window: int, now: float) -> None:
    """Drop buckets that left the window and holds whose call can no longer end."""
    horizon = now - window
    buckets: dict[int, list[float]] = state["b"]
    for index in [i for i, (_, latest) in buckets.items() if latest <= horizon]:
        state["t"] -= int(buckets.pop(index)[0])
    holds: dict[str, list[float]] = state["h"]
    for reservation in [r for r, (_, expiry) in holds.items() if expiry <= now]:
        del holds[reservation]


def held(state: dict) -> int:
    return int(sum(amount for amount, _ in state["h"].values()))


def usage_of(state: dict, window: int, now: float) -> tuple[int, int]:
    """A counter's used and held units at `now`, as the dashboard shows them (every store)."""
    expire(state, window, now)
    return int(state["t"]), held(state)


def never_fits(budget: Budget, amount: int) -> bool:
    """No wait can admit it: the quota is below one unit of the stored scale, or the request takes
    (or holds) more than the whole quota."""
    return budget.quota == 0 or amount > budget.quota


def fits(state: dict, budget: Budget, amount: int) -> bool:
    """Requests: one more fits under the quota. Cents/tokens: something is left, holds included."""
    if budget.holds:
        return state["t"] + held(state) < budget.quota
    return state["t"] + amount <= budget.quota


def take(state: dict, budget: Budget, amount: int, now: float, reservation: str, hold_ttl: float) -> None:
    if budget.holds:
        state["h"][reservation] = [amount, now + hold_ttl]
    else:
        add(state, budget.window, now, amount)


def add(state: dict, window: int, now: float, amount: int) -> None:
    if amount <= 0:
        return
    index = math.floor(now / granularity(window))
    bucket = state["b"].get(index)
    if bucket is None:
        state["b"][index] = [amount, now]
    else:
        bucket[0] += amount
        bucket[1] = now  # the latest write, as in step.lua: a clock gone back never makes Reset exceed w
    state["t"] += amount


def settle(state: dict, window: int, now: float, reservation: str, amount: int) -> None:
    """Replace a call's hold by what it really cost."""
    state["h"].pop(reservation, None)
    add(state, window, now, amount)


def view(state: dict, budget: Budget, now: float, amount: int = 0, denied: bool = False) -> CounterState:
    """The counter as a store reports it; `amount` (what the request asked for) matters only to a
    denial's retry-after."""
    buckets = [(a, latest) for _, (a, latest) in sorted(state["b"].items()) if a > 0]
    hold = held(state)
    reset = 0
    if buckets:
        reset = max(1, math.ceil(buckets[0][1] + budget.window - now))
    elif hold:
        reset = 1
    retry = _retry_after(buckets, state["t"], hold, budget, amount, now) if denied else 0
    return CounterState(used=state["t"], held=hold, reset=reset, retry_after=retry)


def _retry_after(
    buckets: Sequence[tuple[int, float]], used: int, hold: int, budget: Budget, amount: int, now: float
) -> int:
    """Seconds until enough buckets expire for this request to fit (1 if only holds block it)."""
    excess = used + hold - budget.quota + 1 if budget.holds else used + amount - budget.quota
    if excess <= 0:
        return 0
    for amount, latest in buckets:
        excess -= int(amount)
        if excess <= 0:
            return max(1, math.ceil(latest + budget.window - now))
    return 1


# --- response headers ----------------------------------------------------------------------------


@dataclass(slots=True)
class PolicyReport:
    name: str
    policy: Policy
    remaining: int  # scaled units left after this request, never negative
    reset: int

    @property
    def fraction(self) -> float:
        return self.remaining / self.policy.scaled_quota if self.policy.scaled_quota else 0.0


def reports(budgets: Sequence[Budget], states: Sequence[CounterState]) -> list[PolicyReport]:
    """One report per policy, named p1, p2, ... in the order the request listed its policies (header,
    then key-bound), also where policies that share a counter stand apart in that list."""
    found: list[tuple[int, Policy, int, int]] = []
    for budget, state in zip(budgets, states, strict=True):
        spent = state.used + state.held
        positions = budget.positions or range(len(found), len(found) + len(budget.policies))
        for position, policy in zip(positions, budget.policies, strict=True):
            remaining = policy.scaled_quota - spent
            found.append((position, policy, remaining if remaining > 0 else 0, state.reset))
    if len(found) > 1:
        found.sort(key=_position)
    return [PolicyReport(_NAMES[i], policy, left, reset) for i, (_, policy, left, reset) in enumerate(found)]


def _position(item: tuple[int, Policy, int, int]) -> int:
    return item[0]


_NAMES = [f"p{i}" for i in range(1, 101)]


def _tightness(report: PolicyReport) -> tuple[float, int]:
    return report.fraction, report.policy.window


def rate_limit_headers(items: Sequence[PolicyReport]) -> dict[str, str]:
    if not items:
        return {}
    worst = min(items, key=_tightness)
    policy = worst.policy
    return {
        "Helicone-RateLimit-Limit": policy.quota_text,
        "Helicone-RateLimit-Remaining": str(worst.remaining // policy.scale),
        "Helicone-RateLimit-Policy": policy.normal_form(),
        "Helicone-RateLimit-Reset": str(worst.reset),
        "RateLimit-Policy": ", ".join([f'"{r.name}";{_ietf_policy(r.policy)}' for r in items]),
        "RateLimit": ", ".join([f'"{r.name}";r={r.remaining // r.policy.scale};t={r.reset}' for r in items]),
    }


@functools.lru_cache(maxsize=4096)
def _ietf_policy(policy: Policy) -> str:
    text = f"q={policy.quota_text};w={policy.window}"
    unit = policy.unit.ietf_unit
    return f'{text};qu="{unit}"' if unit else text
