"""The hot path: route, authenticate, admit, forward, stream back, charge, log.

    client ─► route ─► gateway key ─► policies (header + key-bound) ─► segment values
           ─► admit: one store step for every budget (429 when one says no)
           ─► forward to the upstream, stream the response back as it arrives
           ─► charge the real cost (before the last byte leaves) ─► log line + metrics

Errors become responses in one place (`errors.error_response`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from . import metrics, refusal
from .config import CallPrice, Settings, Upstream
from .connections import BodyTimeout, Capacity, ClientWatch, Slot, WriteDeadline
from .errors import (
    BadBody,
    BadPath,
    BadPolicy,
    BodyTooLarge,
    ClientGone,
    EndpointNotAllowed,
    GatewayError,
    InvalidSegmentValue,
    MissingSegment,
    NotFound,
    RateLimited,
    RequestTimeout,
    StoreUnavailable,
    Unauthorized,
    UnmeteredEndpoint,
    UnsupportedEncoding,
    UpstreamTimeout,
    UpstreamUnreachable,
    error_response,
)
from .estimate import estimate
from .keys import GatewayKey, KeyRing
from .limiter import Admission, Budget, CounterState, budgets_for, never_fits, rate_limit_headers, reports
from .policy import (
    GRAMMAR,
    MAX_SCALED_QUOTA,
    USER,
    Policy,
    PolicyError,
    Unit,
    format_quota,
    join_header_lines,
    parse_each,
    parse_policies,
)
from .pricing import Pricer
from .routing import Endpoint, Pattern, Route, RouteError, misread_field, resolve
from .stores import StepError, Store, StoreError
from .usage import StreamUsage, Usage, from_body

log = logging.getLogger("quotagate")
access_log = logging.getLogger("quotagate.access")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# content-encoding: a body is forwarded as the gateway read and metered it, inflated (`_read_body`)
_DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", "accept-encoding", "content-encoding"}
_INFLATED = frozenset({"", "identity", "gzip", "deflate"})  # request encodings aiohttp inflates itself
_DROP_RESPONSE = HOP_BY_HOP | {"content-length"}
POLICY_HEADER = "Helicone-RateLimit-Policy"
_CREDENTIALS = ("authorization", "x-api-key", "api-key")  # a client's own provider credentials
PROPERTY_PREFIX = "Helicone-Property-"
_LOGGED_TEXT = 200  # characters of client-supplied text (a malformed policy) a log line shows


@dataclass(frozen=True, slots=True)
class Skip:
    """A header policy left out under `on_policy_error = ignore`, and why."""

    code: str  # the error code the 400 would carry
    policy: str  # its normal form, or the offending text of a malformed one
    problem: str

    def fields(self) -> dict[str, str]:
        return {"code": self.code, "policy": _clipped(self.policy), "problem": _clipped(self.problem)}


@dataclass(slots=True)
class Call:
    """What the gateway knows about one proxied request, for its charge and its log line."""

    route: str = "-"
    provider: str = "openai"
    key: GatewayKey | None = None
    user: str | None = None
    properties: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    parsed: Any = None
    parsed_done: bool = False
    budgets: list[Budget] = field(default_factory=list)
    states: list[CounterState] = field(default_factory=list)
    reservation: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0  # the output a metered call may return, as estimated
    model: str | None = None
    usage: Usage | None = None
    tracker: StreamUsage | None = None
    charged: bool = False
    cost: int | None = None
    decision: str = "rejected"
    upstream_status: int | None = None
    upstream_seconds: float = 0.0
    outcome: str = "complete"
    streaming: bool = False  # the response's headers have left
    endpoint: Endpoint = Endpoint.OTHER
    path: str | None = None  # the normalised path the call was routed on
    price: CallPrice | None = None  # a per-call price from the config (an endpoint without usage)
    rewritten: bytes | None = None  # the body as metered, to forward instead of the client's bytes
    strip: bool = False  # the gateway asked the upstream for a stream's usage: drop it on the way back
    slot: Slot | None = None  # its place among the worker's calls in flight
    policies: tuple[Policy, ...] = ()  # header (as enforced) then key-bound, for the log line
    skipped: list[Skip] = field(default_factory=list)  # header policies left out (on_policy_error = ignore)
    error: GatewayError | None = None  # what the gateway answered instead of the upstream

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

    @property
    def holding(self) -> list[Budget]:
        return [b for b in self.budgets if b.holds]

    def headers(self) -> dict[str, str]:
        out = rate_limit_headers(reports(self.budgets, self.states)) if self.states else {}
        if self.skipped:  # the codes of what was left out, once each (a 429 says rate_limited instead)
            out["X-Helicone-Error"] = ", ".join(dict.fromkeys(s.code for s in self.skipped))
        return out


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


class Proxy:
    def __init__(self, settings: Settings, store: Store, pricer: Pricer | None = None) -> None:
        self.settings = settings
        self.store = store
        self.guard = StoreGuard()
        self.keys = KeyRing(store, answered=self.guard.succeeded)
        self.pricer = pricer or Pricer(settings.prices)
        self.routes = settings.routes()
        self.upstreams = {u.name: u for u in self.routes.values()}
        self.scopes = {  # route prefix -> the patterns its provider key may reach; None: inference endpoints
            prefix: None if u.api_key_endpoints is None else [Pattern.parse(p) for p in u.api_key_endpoints]
            for prefix, u in self.routes.items()
        }
        self.call_prices = [(Pattern.parse(text), price) for text, price in settings.call_prices.items()]
        self.resolve = functools.lru_cache(maxsize=4096)(functools.partial(resolve, self.routes))
        self.hold_ttl = settings.upstream_timeout + 60
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout, sock_read=settings.upstream_timeout
        )
        self.session: aiohttp.ClientSession | None = None
        self.capacity = Capacity(settings.max_in_flight, settings.max_in_flight_bytes)

    async def start(self, _app: web.Application | None = None) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=self.timeout,
            skip_auto_headers=("User-Agent", "Content-Type", "Accept-Encoding"),
        )

    async def stop(self, _app: web.Application | None = None) -> None:
        if self.session is not None:
            await self.session.close()

    # -- the handler -------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        call = Call()
        try:
            response = await self._proxy(request, call)
        except GatewayError as exc:
            call.error = exc
            response = error_response(exc, call.headers())
        except Exception:
            if call.streaming:
                raise  # the response has begun: aiohttp closes the connection
            log.exception("internal error on %s %s", request.method, request.path)
            response = error_response(GatewayError("internal error in the gateway (logged)"), call.headers())
        finally:
            if call.slot is not None:
                call.slot.release()
        self._record(request, call, response, time.perf_counter() - started)
        return response

    async def _proxy(self, request: web.Request, call: Call) -> web.StreamResponse:
        route = self._route(request, call)
        call.key = await self._authenticate(request)
        self._check_key_scope(request, route)
        call.body = await self._read_body(request, call)
        policies = self._policies(request, call)
        policies, values = self._segment_values(request, policies, call)
        call.budgets = budgets_for(call.key.id, policies, values)
        if call.holding:
            await self._hold(call, route)
        await self._admit(call)
        return await self._forward(request, call, route.upstream, route.path)

    def _route(self, request: web.Request, call: Call) -> Route:
        """Decide on the decoded, normalised path; the same path is what is forwarded."""
        try:
            route = self.resolve(request.method, request.rel_url.raw_path)
        except RouteError as exc:
            raise (NotFound if exc.unknown else BadPath)(str(exc)) from None
        call.route, call.provider = route.upstream.name, route.upstream.provider
        call.endpoint, call.path = route.endpoint, route.gateway_path
        return route

    def _check_key_scope(self, request: web.Request, route: Route) -> None:
        """The gateway's own provider key reaches only the endpoints its upstream allows it."""
        upstream = route.upstream
        if self._gateway_key(request, upstream) is None:
            return
        scope = self.scopes[route.prefix]
        if scope is None and route.endpoint.inference:
            return
        if scope is not None and any(p.matches(route.method, route.segments) for p in scope):
            return
        where = (
            f"{upstream.provider}_api_key_endpoints"
            if route.prefix in ("v1", "anthropic")
            else f"api_key_endpoints of [upstreams.{route.prefix}]"
        )
        header = "x-api-key" if upstream.provider == "anthropic" else "Authorization"
        raise EndpointNotAllowed(
            f"{route.name}: the gateway's own provider key for this route reaches only "
            f"{'inference endpoints' if scope is None else 'the endpoints listed in ' + where}. "
            f"Send your own provider credentials ({header}), or ask the operator to allow it "
            f"({where} in the config file)",
            endpoint=route.name,
        )

    async def _authenticate(self, request: web.Request) -> GatewayKey:
        header = request.headers.get("Helicone-Auth", "")
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

    async def _read_body(self, request: web.Request, call: Call) -> bytes:
        """The body as aiohttp inflated it, within the size limit and the worker's capacity."""
        limit = self.settings.max_body_bytes
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in _INFLATED:
            raise UnsupportedEncoding(
                f"Content-Encoding {encoding[:40]!r} is not accepted: send the body plain, gzip or deflate"
            )
        declared = request.content_length or 0
        if declared > limit:
            raise BodyTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
        call.slot = self.capacity.enter()
        call.slot.hold(declared)  # refused before it is read when the worker holds too much
        return await self._read_chunks(request, call.slot, limit)

    async def _read_chunks(self, request: web.Request, slot: Slot, limit: int) -> bytes:
        chunks, size = [], 0
        try:
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:  # a deflated body is only known by reading it (zip bombs)
                    raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
                if size > slot.held:
                    slot.hold(size - slot.held)
                chunks.append(chunk)
        except BodyTimeout as exc:
            raise RequestTimeout(str(exc)) from None
        except web.RequestPayloadError:
            raise BadBody("the request body could not be read: its framing or compression is invalid") from None
        except ConnectionError:
            raise ClientGone("the client closed its connection while sending the body") from None
        return b"".join(chunks)

    def _policies(self, request: web.Request, call: Call) -> tuple[Policy, ...]:
        """The header's policies, then the key's."""
        assert call.key is not None
        lines = request.headers.getall(POLICY_HEADER, ())
        header = self._header_policies(join_header_lines(lines), call) if lines else ()
        call.policies = header + call.key.policies
        return call.policies

    def _header_policies(self, text: str, call: Call) -> tuple[Policy, ...]:
        """400 on a malformed policy; with `on_policy_error = ignore`, the valid ones (item by item)."""
        if self.settings.on_policy_error == "ignore":
            policies, errors = parse_each(text)
            call.skipped += [Skip(BadPolicy.code, text if e.policy is None else e.policy, e.problem) for e in errors]
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
        self, request: web.Request, policies: tuple[Policy, ...], call: Call
    ) -> tuple[tuple[Policy, ...], dict[str | None, str | None]]:
        """The segment values the policies need; a policy whose value the request lacks is a 400,
        or, a header policy with `on_policy_error = ignore`, left out."""
        assert call.key is not None
        call.user = self._user_id(request, call)
        values: dict[str | None, str | None] = {None: None, USER: call.user}
        for name, value in request.headers.items():
            if name[:18].lower() == "helicone-property-" and value:
                call.properties.setdefault(name[18:].lower(), _valid_id(value, name))
        header = len(policies) - len(call.key.policies)  # the key's come last, and are never left out
        lacking: list[int] = []
        for index, policy in enumerate(policies):
            segment = policy.segment
            if segment is None or (segment in values and values[segment] is not None):
                continue
            if segment != USER and call.properties.get(segment):
                values[segment] = call.properties[segment]
                continue
            if index >= header or self.settings.on_policy_error != "ignore":
                raise MissingSegment(self._missing(policy), policy=policy.normal_form(), segment=segment)
            call.skipped.append(Skip(MissingSegment.code, policy.normal_form(), self._missing(policy)))
            lacking.append(index)
        if lacking:
            policies = call.policies = tuple(p for i, p in enumerate(policies) if i not in lacking)
        return policies, values

    @staticmethod
    def _missing(policy: Policy) -> str:
        if policy.segment == USER:
            where = "a Helicone-User-Id header, the body's 'user' field (OpenAI) or metadata.user_id (Anthropic)"
        else:
            where = f"a non-empty {PROPERTY_PREFIX}{policy.segment} header"
        return (
            f"policy {policy.normal_form()!r} limits per {policy.segment}, but the request has no value: send {where}"
        )

    def _user_id(self, request: web.Request, call: Call) -> str | None:
        user = request.headers.get("Helicone-User-Id")
        if user:
            return _valid_id(user, "Helicone-User-Id")
        body = call.json()
        if body is None:
            return None
        if call.provider == "anthropic":
            meta = body.get("metadata")
            user, where = (meta.get("user_id") if isinstance(meta, dict) else None), "metadata.user_id"
        else:
            user, where = body.get("user"), "user"
        return _valid_id(user, where) if isinstance(user, str) and user else None

    async def _hold(self, call: Call, route: Route) -> None:
        """What a call holds against cents and token budgets in flight, if the gateway can meter it:
        from its usage (a body it reads as the upstream does), a per-call price, or free."""
        if route.endpoint.metered:
            self._check_body(call)
            await self._estimate(call, route.endpoint)
        elif not route.endpoint.free:
            call.price = next((price for p, price in self.call_prices if p.matches(route.method, route.segments)), None)
            for budget in call.holding:
                amount = _price_amount(call.price, budget.unit)
                if amount is None:
                    raise UnmeteredEndpoint(self._unmetered(route, budget), endpoint=route.name)
                budget.amount = min(amount, MAX_SCALED_QUOTA)

    @staticmethod
    def _unmetered(route: Route, budget: Budget) -> str:
        unit, what = budget.unit.value, ("cents" if budget.unit is Unit.CENTS else "tokens")
        return (
            f"{route.name}: the gateway cannot read what this endpoint costs from its answers, so a "
            f"u={unit} budget ({budget.policies[0].normal_form()}) cannot bound it. Call it without a "
            f"u={unit} policy, or ask the operator to give it a per-call price: "
            f'[call_prices] "{route.name}" = {{ {what} = ... }}'
        )

    @staticmethod
    def _check_body(call: Call) -> None:
        """A body metered under a budget must be one the gateway reads as the upstream would."""
        body = call.json()
        if body is None:
            raise BadBody(
                "the request body is not a JSON object: under a cents or token budget the gateway reads "
                "the body to meter the call, and it cannot read this one"
            )
        misread = misread_field(call.endpoint, body)
        if misread is not None:
            name, expected = misread
            raise BadBody(f"'{name}' must be {expected} (it decides how the call is metered)", param=name)
        call.rewritten, call.strip = _upstream_body(call, body)

    async def _estimate(self, call: Call, endpoint: Endpoint) -> None:
        """What a call will cost at most, held against cents and token budgets while in flight."""
        body = call.json()
        model = body.get("model") if body is not None else None
        call.model = model if isinstance(model, str) else None
        found = await estimate(body, call.body, endpoint, call.provider, self.settings.default_max_tokens)
        call.prompt_tokens, call.output_tokens = found.input_tokens, found.output_tokens
        usage = Usage(found.input_tokens, found.output_tokens)
        for budget in call.holding:
            if budget.unit is Unit.TOKEN:
                budget.amount = min(usage.total_tokens, MAX_SCALED_QUOTA)
            else:
                budget.amount = min(self._cost(call, usage) or 0, MAX_SCALED_QUOTA)

    async def _admit(self, call: Call) -> None:
        assert call.key is not None
        call.reservation = os.urandom(8).hex()
        never = [b for b in call.budgets if never_fits(b)]
        if never:
            await self._refuse_never_fitting(call, never)
        if not self.guard.attempt():
            self._without_store(call, StoreError("the store did not answer (another request is trying it)"))
            return
        try:
            admission = await self.store.admit(call.key.id, call.budgets, call.reservation, self.hold_ttl)
        except StoreError as exc:
            self.guard.failed("admit", exc)
            self._without_store(call, exc)
            return
        self.guard.succeeded()
        self._decide(call, admission)

    def _without_store(self, call: Call, exc: StoreError) -> None:
        """The store cannot be asked: 503 (fail-closed) or let through without limits (fail-open)."""
        if self.settings.on_store_error == "closed":
            raise StoreUnavailable("rate limits cannot be checked: the store is unreachable") from exc
        metrics.UNLIMITED.inc()
        call.decision, call.budgets = "fail_open", []

    async def _refuse_never_fitting(self, call: Call, never: list[Budget]) -> None:
        """A request that no wait can admit: 429 without Retry-After, decided before the store step."""
        call.decision = "never_fits"
        await self._peek(call)
        request = refusal.Request(call.prompt_tokens, call.output_tokens, call.json(), call.price is not None)
        raise RateLimited(refusal.never_fits(never, request), should_retry=False)

    async def _peek(self, call: Call) -> None:
        """The key's revocation and the budgets' state for the headers, read without taking anything:
        a key check, then a charge of nothing under a reservation that holds nothing."""
        assert call.key is not None
        if not self.guard.attempt():
            return
        try:
            active = (await self.store.admit(call.key.id, [], call.reservation, self.hold_ttl)).key_active
            if active:
                call.states = await self.store.charge(call.budgets, call.reservation, [0] * len(call.budgets))
        except StoreError as exc:
            self.guard.failed("admit", exc)
            return  # the refusal stands; the key is taken as fail-open takes a key it cannot check
        self.guard.succeeded()
        if not active:
            self.keys.forget(call.key.id)
            raise Unauthorized("unknown or revoked gateway key")

    def _decide(self, call: Call, admission: Admission) -> None:
        assert call.key is not None
        if not admission.key_active:
            self.keys.forget(call.key.id)
            raise Unauthorized("unknown or revoked gateway key")
        call.states = admission.states
        if admission.allowed:
            call.decision = "allowed" if call.budgets else "no_policy"
            return
        call.decision = "denied"
        denying = [(b, s) for b, s in zip(call.budgets, admission.states, strict=True) if s.retry_after]
        retry = max([s.retry_after for _, s in denying] + [1])
        for budget, _ in denying:
            metrics.DENIALS.labels(budget.unit.value, _segment_kind(budget.segment)).inc()
        raise RateLimited(
            refusal.denied(denying, retry), retry_after=retry, should_retry=retry <= self.settings.max_retry_wait
        ) from None

    # -- forwarding --------------------------------------------------------------------------

    def _upstream_headers(self, request: web.Request, upstream: Upstream) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        connection = request.headers.get("Connection")
        listed = {t.strip().lower() for t in connection.split(",")} if connection else set()
        for name, value in request.headers.items():
            lower = name.lower()
            if lower in _DROP_REQUEST or lower.startswith("helicone-") or lower in listed:
                continue
            headers.add(name, value)
        headers["Accept-Encoding"] = "identity"
        key = self._gateway_key(request, upstream)
        if key is not None:
            if upstream.provider == "anthropic":
                headers["x-api-key"] = key
            else:
                headers["Authorization"] = f"Bearer {key}"
        return headers

    @staticmethod
    def _gateway_key(request: web.Request, upstream: Upstream) -> str | None:
        """The gateway's own provider key, if it sends it: configured, and the client forwards none
        of its own (a credential header named in `Connection` is not forwarded)."""
        if not upstream.api_key:
            return None
        connection = request.headers.get("Connection", "")
        listed = {t.strip().lower() for t in connection.split(",")}
        sent = any(name in request.headers and name not in listed for name in _CREDENTIALS)
        return None if sent else upstream.api_key

    @staticmethod
    def _url(upstream: Upstream, path: str, query: str) -> URL:
        """The upstream URL: the base, the normalised path the gateway decided on, and the query
        as the client sent it (a query that is not plain ASCII is escaped, as it must be on the wire)."""
        base = _encoded_base(upstream.base_url)
        if base.endswith("/v1") and (path == "/v1" or path.startswith("/v1/")):
            path = path[3:]
        url = f"{base}{path}?{query}" if query else f"{base}{path}"
        return URL(url, encoded=True) if url.isascii() else URL(url)

    async def _forward(self, request: web.Request, call: Call, upstream: Upstream, path: str) -> web.StreamResponse:
        assert self.session is not None
        if request.transport is None:  # gone during admission: nothing is forwarded, nothing charged
            call.outcome = "client_gone"
            await self._charge(call, None)
            raise ClientGone("the client closed its connection before the call was forwarded")
        body, strip = (call.rewritten, call.strip) if call.rewritten is not None else (call.body, False)
        url = self._url(upstream, path, request.rel_url.raw_query_string)
        sent = time.perf_counter()
        try:
            with ClientWatch(request):  # a client that leaves drops the upstream call at once
                async with self.session.request(
                    request.method,
                    url,
                    headers=self._upstream_headers(request, upstream),
                    data=body,
                    allow_redirects=False,
                ) as response:
                    call.upstream_status = response.status
                    if _is_json(response):
                        return await self._whole(call, response)
                    return await self._stream(request, call, response, strip)
        except ClientGone:
            call.outcome = "client_gone"
            await self._charge(call, self._partial_usage(call) if call.holding else None)
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            await self._charge(call, None)
            raise UpstreamTimeout(f"the upstream did not answer within {self.settings.upstream_timeout:g} s") from exc
        except aiohttp.ClientError as exc:
            await self._charge(call, None)
            raise UpstreamUnreachable(f"cannot reach the upstream {upstream.name}: {exc.__class__.__name__}") from exc
        except asyncio.CancelledError:  # the client went away (aiohttp's handler_cancellation)
            call.outcome = "client_gone"
            await self._charge(call, self._partial_usage(call) if call.holding else None)
            raise
        finally:
            call.upstream_seconds = time.perf_counter() - sent

    async def _whole(self, call: Call, response: aiohttp.ClientResponse) -> web.Response:
        """A complete (non-stream) response: charged before its headers leave."""
        body = await response.read()
        if _is_json(response):
            call.usage, model = from_body(_decoded(body, response.headers.get("Content-Encoding")))
            call.model = model or call.model
        await self._charge(call, call.usage)
        return web.Response(status=response.status, body=body, headers=self._response_headers(call, response))

    async def _stream(
        self, request: web.Request, call: Call, response: aiohttp.ClientResponse, strip: bool
    ) -> web.StreamResponse:
        """Chunk by chunk as the upstream sends; charged before the stream's terminal event. A client
        that leaves one write unread for `write_timeout` seconds is dropped (`WriteDeadline`)."""
        out = web.StreamResponse(status=response.status, headers=self._response_headers(call, response))
        await out.prepare(request)
        call.streaming = True
        if _is_sse(response):
            call.tracker = StreamUsage(track_text=bool(call.holding), strip_usage_chunk=strip)
        tracker = call.tracker
        with WriteDeadline(request, self.settings.write_timeout) as writes:
            call.outcome = await _pump(request, response, out, tracker, writes)
            tail = b""
            if tracker is not None:
                if call.outcome == "upstream_broken" and tracker.ended:
                    call.outcome = "complete"  # cut after its terminal event: nothing is missing
                if call.outcome == "complete":
                    tail = tracker.finish()
                call.model = tracker.model or call.model
                whole = call.outcome == "complete" and tracker.usage is not None
                call.usage = tracker.usage if whole else self._partial_usage(call)
            await self._charge(call, call.usage)
            ended = call.outcome == "complete" and (not tail or await writes.send(out.write(tail)))
            if not (ended and await writes.send(out.write_eof())) and request.transport is not None:
                request.transport.abort()  # the client must not take a cut stream for a whole one
        return out

    def _partial_usage(self, call: Call) -> Usage:
        """A call cut short: the prompt's estimate (or the reported input) plus what was streamed."""
        tracker = call.tracker
        usage = (tracker.usage if tracker else None) or Usage(call.prompt_tokens, 0)
        streamed = tracker.streamed_tokens() if tracker and call.holding else 0
        return Usage(
            usage.input_tokens or call.prompt_tokens,
            max(usage.output_tokens, streamed),
            usage.cache_read_tokens,
            usage.cache_write_tokens,
        )

    def _response_headers(self, call: Call, response: aiohttp.ClientResponse) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in response.headers.items():
            if name.lower() not in _DROP_RESPONSE:
                headers.add(name, value)
        for name, value in call.headers().items():
            headers[name] = value
        return headers

    # -- charging ----------------------------------------------------------------------------

    async def _charge(self, call: Call, usage: Usage | None) -> None:
        """Replace the holds of this call by its real cost (0 without usage), once.

        The store step is shielded: a client that goes away while it runs cannot undo it or make
        it happen twice.
        """
        if call.charged:
            return
        call.charged = True
        holding = call.holding
        if call.price is not None:
            self._count_price(call)
        elif usage is not None:
            self._count_usage(call, usage)
        if not holding or not call.states:
            return
        amounts = [self._amount(call, b, usage) for b in holding]
        try:
            states = await asyncio.shield(self.store.charge(holding, call.reservation, amounts))
        except StoreError as exc:
            self.guard.failed("charge", exc)
            return
        except StepError as exc:  # this call's own charge failed: its answer still goes out, its hold expires
            log.error("charge of a call failed (its hold expires by itself): %s", exc)
            metrics.STORE_ERRORS.labels("charge").inc()
            return
        self.guard.succeeded()
        by_id = {b.id: s for b, s in zip(holding, states, strict=True)}
        call.states = [by_id.get(b.id, s) for b, s in zip(call.budgets, call.states, strict=True)]

    def _amount(self, call: Call, budget: Budget, usage: Usage | None) -> int:
        """What a call is charged, at most the largest amount the stores count exactly (an
        upstream may report any usage); a per-call price when the upstream answered with success."""
        if call.price is not None:
            amount = _price_amount(call.price, budget.unit) if _succeeded(call) else 0
            return min(amount or 0, MAX_SCALED_QUOTA)
        if usage is None:
            return 0
        if budget.unit is Unit.TOKEN:
            return min(usage.total_tokens, MAX_SCALED_QUOTA)
        return min(call.cost or 0, MAX_SCALED_QUOTA)

    def _cost(self, call: Call, usage: Usage) -> int | None:
        upstream = self.upstreams.get(call.route)
        return self.pricer.cost(call.provider, call.model, usage, upstream.base_url if upstream else None)

    @staticmethod
    def _count_price(call: Call) -> None:
        """A call charged its per-call price: its cost for the log line and the metric."""
        cents = call.price.microcents if call.price is not None and _succeeded(call) else 0
        call.cost = cents
        if cents:
            metrics.CHARGED_CENTS.inc(cents / 1_000_000)

    def _count_usage(self, call: Call, usage: Usage) -> None:
        metrics.CHARGED_TOKENS.inc(usage.total_tokens)
        call.cost = self._cost(call, usage)
        if call.cost is None:
            metrics.UNPRICED.inc()
        else:
            metrics.CHARGED_CENTS.inc(call.cost / 1_000_000)

    # -- the log line and metrics ------------------------------------------------------------

    def _record(self, request: web.Request, call: Call, response: web.StreamResponse, seconds: float) -> None:
        metrics.child(metrics.REQUESTS, call.route, str(response.status), call.decision).inc()
        if call.upstream_status is not None:
            metrics.child(metrics.UPSTREAM_LATENCY, call.route).observe(call.upstream_seconds)
            metrics.OVERHEAD.observe(max(0.0, seconds - call.upstream_seconds))
        if call.decision == "fail_open":
            log.warning("store unreachable: %s %s let through without limits", request.method, request.path)
        skipped = self._skips(call)
        if not self.settings.access_log:
            return
        usage = call.usage
        access_log.info(
            "request",
            extra={
                "fields": {
                    "method": request.method,
                    "path": call.path or request.path,
                    "route": call.route,
                    "key": call.key.name if call.key else None,
                    "user": call.user,
                    "properties": call.properties or None,
                    "model": call.model,
                    "input_tokens": usage.input_tokens if usage else None,
                    "output_tokens": usage.output_tokens if usage else None,
                    "cost_cents": call.cost / 1_000_000 if call.cost is not None else None,
                    "decision": call.decision,
                    "status": response.status,
                    "upstream_status": call.upstream_status,
                    "outcome": call.outcome if call.upstream_status else None,
                    "latency_ms": round(seconds * 1000, 3),
                    "skipped": skipped,
                    **_refusal(request, call),
                }
            },
        )

    def _skips(self, call: Call) -> list[dict[str, str]] | None:
        """Header policies left out: counted, and logged (on their own without an access log)."""
        if not call.skipped:
            return None
        skipped = [s.fields() for s in call.skipped]
        for code in dict.fromkeys(s.code for s in call.skipped):
            metrics.child(metrics.POLICY_SKIPS, code).inc()
        if not self.settings.access_log:
            log.warning("header policies left out (on_policy_error = ignore)", extra={"fields": {"skipped": skipped}})
        return skipped


async def _pump(
    request: web.Request,
    response: aiohttp.ClientResponse,
    out: web.StreamResponse,
    tracker: StreamUsage | None,
    writes: WriteDeadline,
) -> str:
    """Copy the upstream stream to the client; how it ended: complete, client_gone, upstream_broken.

    The tracker's terminal event, if any, is left for the caller to send (`tracker.finish()`).
    Text that could not be written is taken back out of the tracker: it was not streamed. A client
    that leaves while the upstream is silent is noticed at once (`ClientWatch`).
    """
    unsent: int | None = None  # where the text of a write in progress begins
    try:
        with ClientWatch(request):
            async for chunk in response.content.iter_any():
                unsent = len(tracker.text) if tracker is not None else 0
                data = tracker.feed(chunk) if tracker is not None else chunk
                if data and not await writes.send(out.write(data)):
                    break
                unsent = None
            else:
                return "complete"
    except (aiohttp.ClientError, TimeoutError):
        return "upstream_broken"
    except ClientGone:
        pass
    if tracker is not None and unsent is not None:
        del tracker.text[unsent:]
    return "client_gone"


@functools.lru_cache(maxsize=64)
def _encoded_base(base_url: str) -> str:
    return str(URL(base_url.rstrip("/")))


def _media_type(response: aiohttp.ClientResponse) -> str:
    return response.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


def _is_json(response: aiohttp.ClientResponse) -> bool:
    kind = _media_type(response)
    return kind == "application/json" or kind.endswith("+json")


def _is_sse(response: aiohttp.ClientResponse) -> bool:
    return _media_type(response) == "text/event-stream"


def _decoded(body: bytes, encoding: str | None) -> bytes:
    """The body to read usage from, undoing gzip/deflate if an upstream compressed anyway."""
    if not encoding or encoding.lower() == "identity":
        return body
    try:
        return zlib.decompress(body, 47)  # 32 + 15: gzip or zlib header, detected
    except zlib.error:
        return b""


_USAGE_OPTION = frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS})  # OpenAI streams report usage if asked


def _upstream_body(call: Call, body: dict[str, Any]) -> tuple[bytes, bool]:
    """A metered body as the gateway read it (a duplicate key cannot mean something else
    upstream), an OpenAI stream asked for its usage; True if the gateway asked (the client did not)."""
    options = body.get("stream_options")
    asks = body.get("stream") is True and call.provider == "openai" and call.endpoint in _USAGE_OPTION
    if asks and not (isinstance(options, dict) and options.get("include_usage") is True):
        return _dumps({**body, "stream_options": {**(options or {}), "include_usage": True}}), True
    return _dumps(body), False


def _dumps(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:  # nested deeper than the serializer goes (254 levels)
        raise BadBody("the request body is nested too deeply to be metered (254 levels at most)") from None


def _price_amount(price: CallPrice | None, unit: Unit) -> int | None:
    """A per-call price in a budget's stored unit (micro-cents, tokens); None if it has none."""
    if price is None:
        return None
    return price.microcents if unit is Unit.CENTS else price.tokens


def _succeeded(call: Call) -> bool:
    return call.upstream_status is not None and 200 <= call.upstream_status < 300


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


def _segment_kind(segment: str | None) -> str:
    return "global" if segment is None else ("user" if segment == USER else "property")


def _clipped(text: str, limit: int = _LOGGED_TEXT) -> str:
    """Client-supplied text as a log line shows it: bounded (the formatter makes it inert)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _refusal(request: web.Request, call: Call) -> dict[str, Any]:
    """What a log line says of an answer the gateway gave itself: its code, the policy it concerns
    (normal form, or the text of a malformed one) and a short reason."""
    exc = call.error
    if exc is None:
        return {}
    policy: str | None = ", ".join(p.normal_form() for p in call.policies) or None
    reason = exc.message
    if isinstance(exc, BadPolicy):
        policy = exc.extra.get("policy")
        policy = join_header_lines(request.headers.getall(POLICY_HEADER, [])) if policy is None else policy
        reason = exc.extra.get("problem", reason)
    elif isinstance(exc, MissingSegment):
        policy = exc.extra.get("policy", policy)
    elif isinstance(exc, RateLimited):
        policy, reason = _denial(call, exc)
    return {
        "error_code": exc.code,
        "policy": None if policy is None else _clipped(policy),
        "reason": _clipped(reason, 400),
        "retry_after": exc.extra.get("retry_after"),
    }


def _denial(call: Call, exc: RateLimited) -> tuple[str | None, str]:
    """The policies that refused a call, and how much of each was used (held by calls in flight)."""
    names, parts = [], []
    for budget, state in zip(call.budgets, call.states, strict=False):
        spent = state.used + state.held
        for policy in budget.policies:
            full = spent >= policy.scaled_quota if budget.holds else spent + budget.amount > policy.scaled_quota
            if not full:
                continue
            names.append(policy.normal_form())
            parts.append(f"{policy.normal_form()}: {_usage_text(policy, state)}{_sharing(budget.policies, policy)}")
    if not names:  # refused for another reason (a call that can never fit): its message says why
        return ", ".join(p.normal_form() for p in call.policies) or None, exc.message
    retry = exc.extra.get("retry_after")
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
