"""Admission: from a call's key, headers and body to a decision in one store step; no HTTP here.

    key ─► policies (header + key-bound) ─► segment values ─► budgets ─► estimate ─► one store step

What admission learns it keeps on the call's `Ticket` as it goes, so that a call refused half-way
still has its key, user and policies for its headers and log line. A refusal is raised as the
gateway error the http layer answers with (`errors`), with the ticket's headers beside it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

import orjson

from . import metrics, refusal
from .config import CallPrice, Settings
from .errors import (
    BadBody,
    BadPolicy,
    InvalidSegmentValue,
    MissingSegment,
    RateLimited,
    StoreUnavailable,
    Unauthorized,
    UnmeteredEndpoint,
)
from .estimate import estimate
from .keys import GatewayKey, KeyRing
from .limiter import (
    Admission,
    Budget,
    CounterState,
    base_amounts,
    budgets_for,
    never_fits,
    rate_limit_headers,
    reports,
)
from .policy import (
    GRAMMAR,
    MAX_SCALED_QUOTA,
    USER,
    Policy,
    PolicyError,
    Unit,
    join_header_lines,
    parse_each,
    parse_policies,
    segment_kind,
)
from .pricing import Pricer
from .routing import Endpoint, Pattern, Route, misread_field
from .stores import Store, StoreError
from .usage import Usage

log = logging.getLogger("quotagate")

POLICY_HEADER = "Helicone-RateLimit-Policy"
PROPERTY_HEADER_PREFIX = "Helicone-Property-"  # a request header naming a property: its value follows
_LOGGED_TEXT = 200  # characters of client-supplied text (a malformed policy) a log line shows


class Decision(Enum):
    """What admission made of a call: the `decision` of its log line and of its metric."""

    REJECTED = "rejected"  # answered by the gateway itself before (or instead of) being counted
    ALLOWED = "allowed"
    NO_POLICY = "no_policy"  # admitted, no policy naming it
    DENIED = "denied"  # 429: a budget is spent for now
    NEVER_FITS = "never_fits"  # 429: no wait can admit it
    FAIL_OPEN = "fail_open"  # let through without limits: the store could not be asked


class Asked(NamedTuple):
    """What a request's headers ask of admission, as plain values (immutable: a named tuple, one
    per request, made in a third of a frozen dataclass's time)."""

    policy_lines: tuple[str, ...] = ()  # Helicone-RateLimit-Policy, each line as sent
    user_id: str | None = None  # Helicone-User-Id
    properties: tuple[tuple[str, str], ...] = ()  # Helicone-Property-* headers: (header name, value)


def asked(policy_lines: list[str], user_id: str | None, headers: Iterable[tuple[str, str]]) -> Asked:
    """What a request's headers ask: its policy lines, its user id, its non-empty properties."""
    size, prefix = len(PROPERTY_HEADER_PREFIX), PROPERTY_HEADER_PREFIX.lower()
    # a list, not a generator; the length first: most headers are shorter than the prefix
    properties = tuple([(n, v) for n, v in headers if len(n) >= size and n[:size].lower() == prefix and v])
    return Asked(tuple(policy_lines), user_id, properties)


@dataclass(frozen=True, slots=True)
class Skip:
    """A header policy left out under `on_policy_error = ignore`, and why."""

    code: str  # the error code the 400 would carry
    policy: str  # its normal form, or the offending text of a malformed one
    problem: str

    def fields(self) -> dict[str, str]:
        return {"code": self.code, "policy": clipped(self.policy), "problem": clipped(self.problem)}


@dataclass(slots=True)
class Ticket:
    """What admission knows of one call, filled in as it goes; its charge updates the states."""

    route: Route | None = None
    key: GatewayKey | None = None
    body: bytes = b""
    user: str | None = None
    properties: dict[str, str] = field(default_factory=dict)
    policies: tuple[Policy, ...] = ()  # header (as enforced) then key-bound, for the log line
    skipped: list[Skip] = field(default_factory=list)  # header policies left out (on_policy_error = ignore)
    budgets: list[Budget] = field(default_factory=list)
    amounts: list[int] = field(default_factory=list)  # beside the budgets: what the call takes or holds
    states: list[CounterState] = field(default_factory=list)
    reservation: str = ""
    decision: Decision = Decision.REJECTED
    prompt_tokens: int = 0
    output_tokens: int = 0  # the output a metered call may return, as estimated
    model: str | None = None  # as the request names it
    price: CallPrice | None = None  # a per-call price from the config (an endpoint without usage)
    priority: bool = False  # it asks for OpenAI's priority tier: held at its price
    rewritten: bytes | None = None  # the body as metered, to forward instead of the client's bytes
    strip: bool = False  # the gateway asked the upstream for a stream's usage: drop it on the way back
    parsed: Any = None
    parsed_done: bool = False

    @property
    def provider(self) -> str:
        return self.route.upstream.provider if self.route is not None else "openai"

    @property
    def endpoint(self) -> Endpoint:
        return self.route.endpoint if self.route is not None else Endpoint.OTHER

    @property
    def holding(self) -> list[Budget]:
        return [b for b in self.budgets if b.holds]

    def json(self) -> dict[str, Any] | None:
        """The request body as a JSON object, parsed once; None if it is not one."""
        if not self.parsed_done:
            self.parsed_done = True
            try:
                data = orjson.loads(self.body) if self.body else None
            except orjson.JSONDecodeError:
                data = None
            self.parsed = data if isinstance(data, dict) else None
        return self.parsed

    def headers(self) -> dict[str, str]:
        """The rate-limit headers of its answer, whatever the answer is."""
        out = rate_limit_headers(reports(self.budgets, self.states)) if self.states else {}
        if self.skipped:  # the codes of what was left out, once each (a 429 says rate_limited instead)
            out["X-Helicone-Error"] = ", ".join(dict.fromkeys(s.code for s in self.skipped))
        return out

    def cost(self, pricer: Pricer, usage: Usage, model: str | None) -> int | None:
        """What a usage costs on this call's upstream, in micro-cents; None if it has no price."""
        upstream = self.route.upstream if self.route is not None else None
        return pricer.cost(self.provider, model, usage, upstream.base_url if upstream else None)


class StoreGuard:
    """Whether a request calls the store. While it answers, every request does. After a failure,
    requests skip it (fail-open or closed at once, without waiting on it) while one request at a
    time tries it; any call that succeeds (that try, a key lookup, a charge, /readyz) brings it back
    for all."""

    def __init__(self, probe_timeout: float = 10.0) -> None:
        self.probe_timeout = probe_timeout  # a try that never reports back frees the turn after this
        self.down = False
        self.probing_until = 0.0
        metrics.STORE_UP.set(1)

    @property
    def up(self) -> bool:
        return not self.down

    def attempt(self) -> bool:
        """True if this request should call the store now (while it is down: one at a time)."""
        if not self.down:
            return True
        now = time.monotonic()
        if now < self.probing_until:
            return False
        self.probing_until = now + self.probe_timeout
        return True

    def failed(self, operation: str, exc: Exception) -> None:
        metrics.STORE_ERRORS.labels(operation).inc()
        if not self.down:
            log.error("store %s failed: %s", operation, exc)
            self.down = True
            metrics.STORE_UP.set(0)
        self.probing_until = 0.0  # the next request tries again

    def succeeded(self) -> None:
        if self.down:
            self.down = False
            metrics.STORE_UP.set(1)
            log.warning("store answers again")


class Admitter:
    """Admission for the calls of one worker: key, policies, budgets, estimate, one store step."""

    def __init__(self, settings: Settings, store: Store, pricer: Pricer) -> None:
        self.settings = settings
        self.store = store
        self.pricer = pricer
        self.guard = StoreGuard()
        self.keys = KeyRing(store, answered=self.guard.succeeded)
        self.call_prices = [(Pattern.parse(text), price) for text, price in settings.call_prices.items()]
        self.hold_ttl = settings.upstream_timeout + 60

    async def authenticate(self, header: str) -> GatewayKey:
        """The gateway key of a `Helicone-Auth` header's value."""
        scheme, _, raw = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not raw.strip():
            raise Unauthorized("missing gateway key: send 'Helicone-Auth: Bearer <gateway key>'")
        try:
            key = await self.keys.verify(raw.strip())
        except StoreError as exc:
            self.guard.failed("get_key", exc)
            raise StoreUnavailable("cannot verify the gateway key: the store is unreachable") from exc
        if key is None:
            raise Unauthorized("unknown or revoked gateway key")
        return key

    async def admit(self, ticket: Ticket, asked: Asked) -> Decision:
        """Decide on a call whose route, key and body are on its ticket; a refusal is raised."""
        assert ticket.key is not None and ticket.route is not None
        policies = self._policies(ticket, asked)
        policies, values = self._segment_values(ticket, asked, policies)
        ticket.budgets = budgets_for(ticket.key.id, policies, values)
        ticket.amounts = base_amounts(ticket.budgets)
        if ticket.holding:
            await self._hold(ticket, ticket.route)
        await self._step(ticket)
        return ticket.decision

    def _policies(self, ticket: Ticket, asked: Asked) -> tuple[Policy, ...]:
        """The header's policies, then the key's."""
        assert ticket.key is not None
        lines = asked.policy_lines
        header = self._header_policies(join_header_lines(list(lines)), ticket) if lines else ()
        ticket.policies = header + ticket.key.policies
        return ticket.policies

    def _header_policies(self, text: str, ticket: Ticket) -> tuple[Policy, ...]:
        """400 on a malformed policy; with `on_policy_error = ignore`, the valid ones (item by item)."""
        if self.settings.on_policy_error == "ignore":
            policies, errors = parse_each(text)
            ticket.skipped += [Skip(BadPolicy.code, text if e.policy is None else e.policy, e.problem) for e in errors]
            return policies
        try:
            return parse_policies(text)
        except PolicyError as exc:
            raise BadPolicy(
                f"invalid {POLICY_HEADER}: {exc}. Expected {GRAMMAR}",
                param=POLICY_HEADER,
                policy=exc.policy,
                problem=exc.problem,
                grammar=GRAMMAR,
            ) from None

    def _segment_values(
        self, ticket: Ticket, asked: Asked, policies: tuple[Policy, ...]
    ) -> tuple[tuple[Policy, ...], dict[str | None, str | None]]:
        """The segment values the policies need; a policy whose value the request lacks is a 400,
        or, a header policy with `on_policy_error = ignore`, left out."""
        assert ticket.key is not None
        ticket.user = _user_id(ticket, asked)
        values: dict[str | None, str | None] = {None: None, USER: ticket.user}
        for name, value in asked.properties:
            ticket.properties.setdefault(name[len(PROPERTY_HEADER_PREFIX) :].lower(), _valid_id(value, name))
        header = len(policies) - len(ticket.key.policies)  # the key's come last, and are never left out
        lacking: list[int] = []
        for index, policy in enumerate(policies):
            segment = policy.segment
            if segment is None or (segment in values and values[segment] is not None):
                continue
            if segment != USER and ticket.properties.get(segment):
                values[segment] = ticket.properties[segment]
                continue
            if index >= header or self.settings.on_policy_error != "ignore":
                raise _missing_segment(policy)
            ticket.skipped.append(Skip(MissingSegment.code, policy.normal_form(), _missing(policy)))
            lacking.append(index)
        if lacking:
            policies = ticket.policies = tuple(p for i, p in enumerate(policies) if i not in lacking)
        return policies, values

    async def _hold(self, ticket: Ticket, route: Route) -> None:
        """What a call holds against cents and token budgets in flight, if the gateway can meter it:
        from its usage (a body it reads as the upstream does), a per-call price, or free."""
        if route.endpoint.metered:
            _check_body(ticket)
            await self._estimate(ticket, route.endpoint)
        elif not route.endpoint.free:
            ticket.price = next(
                (price for p, price in self.call_prices if p.matches(route.method, route.segments)), None
            )
            for index, budget in enumerate(ticket.budgets):
                if not budget.holds:
                    continue
                amount = price_amount(ticket.price, budget.unit)
                if amount is None:
                    raise UnmeteredEndpoint(_unmetered(route, budget), endpoint=route.name)
                ticket.amounts[index] = min(amount, MAX_SCALED_QUOTA)

    async def _estimate(self, ticket: Ticket, endpoint: Endpoint) -> None:
        """What a call will cost at most, held against cents and token budgets while in flight."""
        body = ticket.json()
        model = body.get("model") if body is not None else None
        ticket.model = model if isinstance(model, str) else None
        found = await estimate(body, ticket.body, endpoint, ticket.provider, self.settings.default_max_tokens)
        ticket.prompt_tokens, ticket.output_tokens = found.input_tokens, found.output_tokens
        # Anthropic bills input written to its prompt cache above the input price: all of it may be
        # (the body as re-serialized: a key spelled with escapes reads plain there)
        sent = ticket.rewritten if ticket.rewritten is not None else ticket.body
        written = found.input_tokens if ticket.provider == "anthropic" and b'"cache_control"' in sent else 0
        kept = written if written and b'"ttl":"1h"' in sent else 0  # kept an hour: 2 x input (orjson: no spaces)
        ticket.priority = ticket.provider == "openai" and body is not None and body.get("service_tier") == "priority"
        usage = Usage(found.input_tokens, found.output_tokens, 0, written, kept, ticket.priority)
        for index, budget in enumerate(ticket.budgets):
            if not budget.holds:
                continue
            if budget.unit is Unit.TOKEN:
                ticket.amounts[index] = min(usage.total_tokens, MAX_SCALED_QUOTA)
            else:
                ticket.amounts[index] = min(ticket.cost(self.pricer, usage, ticket.model) or 0, MAX_SCALED_QUOTA)

    async def _step(self, ticket: Ticket) -> None:
        """The one store step: check and take (or hold) every budget, or let through without it."""
        assert ticket.key is not None
        ticket.reservation = os.urandom(8).hex()
        never = [(b, a) for b, a in zip(ticket.budgets, ticket.amounts, strict=True) if never_fits(b, a)]
        if never:
            await self._refuse_never_fitting(ticket, never)
        if not self.guard.attempt():
            self._without_store(ticket, StoreError("the store did not answer (another request is trying it)"))
            return
        try:
            admission = await self.store.admit(
                ticket.key.id, ticket.budgets, ticket.amounts, ticket.reservation, self.hold_ttl
            )
        except StoreError as exc:
            self.guard.failed("admit", exc)
            self._without_store(ticket, exc)
            return
        self.guard.succeeded()
        self._decide(ticket, admission)

    def _without_store(self, ticket: Ticket, exc: StoreError) -> None:
        """The store cannot be asked: 503 (fail-closed) or let through without limits (fail-open)."""
        if self.settings.on_store_error == "closed":
            raise StoreUnavailable("rate limits cannot be checked: the store is unreachable") from exc
        metrics.UNLIMITED.inc()
        ticket.decision, ticket.budgets, ticket.amounts = Decision.FAIL_OPEN, [], []

    async def _refuse_never_fitting(self, ticket: Ticket, never: list[tuple[Budget, int]]) -> None:
        """A request that no wait can admit: 429 without Retry-After, decided before the store step."""
        ticket.decision = Decision.NEVER_FITS
        await self._peek(ticket)
        request = refusal.Request(ticket.prompt_tokens, ticket.output_tokens, ticket.json(), ticket.price is not None)
        raise RateLimited(refusal.never_fits(never, request), should_retry=False)

    async def _peek(self, ticket: Ticket) -> None:
        """The key's revocation and the budgets' state for the headers, read without taking anything:
        a key check, then a charge of nothing under a reservation that holds nothing."""
        assert ticket.key is not None
        if not self.guard.attempt():
            return
        try:
            active = (await self.store.admit(ticket.key.id, [], [], ticket.reservation, self.hold_ttl)).key_active
            if active:
                ticket.states = await self.store.charge(ticket.budgets, ticket.reservation, [0] * len(ticket.budgets))
        except StoreError as exc:
            self.guard.failed("admit", exc)
            return  # the refusal stands; the key is taken as fail-open takes a key it cannot check
        self.guard.succeeded()
        if not active:
            self.keys.forget(ticket.key.id)
            raise Unauthorized("unknown or revoked gateway key")

    def _decide(self, ticket: Ticket, admission: Admission) -> None:
        assert ticket.key is not None
        if not admission.key_active:
            self.keys.forget(ticket.key.id)
            raise Unauthorized("unknown or revoked gateway key")
        ticket.states = admission.states
        if admission.allowed:
            ticket.decision = Decision.ALLOWED if ticket.budgets else Decision.NO_POLICY
            return
        ticket.decision = Decision.DENIED
        denying = [(b, s) for b, s in zip(ticket.budgets, admission.states, strict=True) if s.retry_after]
        retry = max([s.retry_after for _, s in denying] + [1])
        for budget, _ in denying:
            metrics.DENIALS.labels(budget.unit.value, segment_kind(budget.segment)).inc()
        raise RateLimited(
            refusal.denied(denying, retry), retry_after=retry, should_retry=retry <= self.settings.max_retry_wait
        ) from None


def price_amount(price: CallPrice | None, unit: Unit) -> int | None:
    """A per-call price in a budget's stored unit (micro-cents, tokens); None if it has none."""
    if price is None:
        return None
    return price.microcents if unit is Unit.CENTS else price.tokens


def clipped(text: str, limit: int = _LOGGED_TEXT) -> str:
    """Client-supplied text as a log line shows it: bounded (the formatter makes it inert)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _user_id(ticket: Ticket, asked: Asked) -> str | None:
    if asked.user_id:
        return _valid_id(asked.user_id, "Helicone-User-Id")
    body = ticket.json()
    if body is None:
        return None
    if ticket.provider == "anthropic":
        meta = body.get("metadata")
        user, where = (meta.get("user_id") if isinstance(meta, dict) else None), "metadata.user_id"
    else:
        user, where = body.get("user"), "user"
    return _valid_id(user, where) if isinstance(user, str) and user else None


def _valid_id(value: str, where: str) -> str:
    """A user id or property value as every store can keep it: UTF-8 text without NUL. aiohttp
    hands over header bytes that are not UTF-8 as lone surrogates, which no store can encode."""
    if value.isascii() and "\x00" not in value:
        return value
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidSegmentValue(
            f"{where} is not valid UTF-8: user ids and property values must be UTF-8 text", param=where
        ) from None
    if "\x00" in value:
        raise InvalidSegmentValue(f"{where} contains a NUL character, which ids may not hold", param=where)
    return value


def _missing(policy: Policy) -> str:
    if policy.segment == USER:
        where = "a Helicone-User-Id header, the body's 'user' field (OpenAI) or metadata.user_id (Anthropic)"
    else:
        where = f"a non-empty {PROPERTY_HEADER_PREFIX}{policy.segment} header"
    return f"policy {policy.normal_form()!r} limits per {policy.segment}, but the request has no value: send {where}"


def _missing_segment(policy: Policy) -> MissingSegment:
    """The 400 of a policy whose segment value the request lacks: what is missing, and the grammar."""
    problem = _missing(policy)
    return MissingSegment(
        f"{problem}. Expected {GRAMMAR}",
        policy=policy.normal_form(),
        segment=policy.segment,
        problem=problem,
        grammar=GRAMMAR,
    )


def _unmetered(route: Route, budget: Budget) -> str:
    unit, what = budget.unit.value, ("cents" if budget.unit is Unit.CENTS else "tokens")
    return (
        f"{route.name}: the gateway cannot read what this endpoint costs from its answers, so a "
        f"u={unit} budget ({budget.policies[0].normal_form()}) cannot bound it. Call it without a "
        f"u={unit} policy, or ask the operator to give it a per-call price: "
        f'[call_prices] "{route.name}" = {{ {what} = ... }}'
    )


def _check_body(ticket: Ticket) -> None:
    """A body metered under a budget must be one the gateway reads as the upstream would."""
    body = ticket.json()
    if body is None:
        raise BadBody(
            "the request body is not a JSON object: under a cents or token budget the gateway reads "
            "the body to meter the call, and it cannot read this one"
        )
    misread = misread_field(ticket.endpoint, body)
    if misread is not None:
        name, expected = misread
        raise BadBody(f"'{name}' must be {expected} (it decides how the call is metered)", param=name)
    background = body.get("background")
    if ticket.endpoint is Endpoint.RESPONSES and background is not None and background is not False:
        raise UnmeteredEndpoint(
            "a background response (`background` set) is answered before it is generated, without its "
            "usage, so a cents or token budget cannot bound it: call it without `background`, or without "
            "a u=cents or u=token policy",
            param="background",
        )
    ticket.rewritten, ticket.strip = _upstream_body(ticket, body)


_USAGE_OPTION = frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS})  # OpenAI streams report usage if asked


def _upstream_body(ticket: Ticket, body: dict[str, Any]) -> tuple[bytes, bool]:
    """A metered body as the gateway read it (a duplicate key cannot mean something else
    upstream), an OpenAI stream asked for its usage; True if the gateway asked (the client did not)."""
    options = body.get("stream_options")
    asks = body.get("stream") is True and ticket.provider == "openai" and ticket.endpoint in _USAGE_OPTION
    if asks and not (isinstance(options, dict) and options.get("include_usage") is True):
        return _dumps({**body, "stream_options": {**(options or {}), "include_usage": True}}), True
    return _dumps(body), False


def _dumps(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:  # nested deeper than the serializer goes (254 levels)
        raise BadBody("the request body is nested too deeply to be metered (254 levels at most)") from None
