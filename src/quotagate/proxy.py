"""The http layer: route, read, forward, stream back, answer, log; counting is elsewhere.

    client ─► route ─► head and body within limits ─► admission (`admission.py`: 429 when a budget
           says no) ─► forward to the upstream, stream the response back as it arrives
           ─► metering (`metering.py`: the real cost, charged before the last byte leaves)
           ─► headers, log line + metrics

Errors become responses in one place (`errors.error_response`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import metrics, refusal
from .admission import POLICY_HEADER, Admitter, Decision, Ticket, asked, clipped
from .config import Settings, Upstream
from .connections import BodyTimeout, Capacity, ClientWatch, Slot, UpstreamIdle, WriteDeadline
from .errors import (
    BadBody,
    BadPath,
    BadPolicy,
    BodyTooLarge,
    ClientGone,
    EndpointNotAllowed,
    GatewayError,
    MissingSegment,
    NotFound,
    RateLimited,
    RequestTimeout,
    UnsupportedEncoding,
    UpstreamTimeout,
    UpstreamUnreachable,
    error_response,
)
from .metering import Meter, Metering, Outcome
from .policy import join_header_lines
from .pricing import Pricer
from .routing import Pattern, Route, RouteError, resolve
from .stores import Store, StoreError
from .usage import StreamUsage

log = logging.getLogger("quotagate")
access_log = logging.getLogger("quotagate.access")
KEY_LEARNING_SECONDS = 2.0  # how often a worker reads the keys it has not seen (a few ids, usually)

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
_CREDENTIALS = ("authorization", "x-api-key", "api-key")  # a client's own provider credentials


@dataclass(slots=True)
class Call:
    """One proxied request: what admission and metering know of it, and what only HTTP knows."""

    ticket: Ticket = field(default_factory=Ticket)
    meter: Meter = field(default_factory=Meter)
    upstream_seconds: float = 0.0
    streaming: bool = False  # the response's headers have left
    slot: Slot | None = None  # its place among the worker's calls in flight
    error: GatewayError | None = None  # what the gateway answered instead of the upstream

    @property
    def route(self) -> str:
        return self.ticket.route.upstream.name if self.ticket.route is not None else "-"


class Proxy:
    def __init__(self, settings: Settings, store: Store, pricer: Pricer | None = None) -> None:
        self.settings = settings
        self.store = store
        self.admission = Admitter(settings, store, pricer or Pricer(settings.prices))
        self.guard = self.admission.guard
        self.metering = Metering(store, self.guard, self.admission.pricer)
        self.routes = settings.routes()
        self.scopes = {  # route prefix -> the patterns its provider key may reach; None: inference endpoints
            prefix: None if u.api_key_endpoints is None else [Pattern.parse(p) for p in u.api_key_endpoints]
            for prefix, u in self.routes.items()
        }
        self.resolve = functools.lru_cache(maxsize=4096)(functools.partial(resolve, self.routes))
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout, sock_read=settings.upstream_timeout
        )
        self.session: aiohttp.ClientSession | None = None
        self._learning: asyncio.Task[None] | None = None
        self.capacity = Capacity(settings.max_in_flight, settings.max_in_flight_bytes)

    async def start(self, _app: web.Application | None = None) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=self.timeout,
            skip_auto_headers=("User-Agent", "Content-Type", "Accept", "Accept-Encoding"),  # none added
        )
        await self._learn_keys()  # before this worker listens: it knows every key made before it
        self._learning = asyncio.create_task(self._keep_learning_keys())

    async def stop(self, _app: web.Application | None = None) -> None:
        if self._learning is not None:
            self._learning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._learning
        if self.session is not None:
            await self.session.close()

    async def _learn_keys(self) -> None:
        """Every worker reads the keys it has not seen, so that a store outage does not turn a key
        another worker verified into a 503 here (each worker verifies keys on its own)."""
        try:
            await self.admission.keys.learn()
        except StoreError as exc:  # unreachable: requests find out and count it themselves
            log.debug("could not read the gateway keys: %s", exc)

    async def _keep_learning_keys(self) -> None:
        while True:
            await asyncio.sleep(KEY_LEARNING_SECONDS)
            if not self.guard.down:
                try:
                    await self._learn_keys()
                except Exception:  # a record it cannot read: learnt on first use instead, as before
                    log.exception("reading the gateway keys failed")

    # -- the handler -------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        call = Call()
        try:
            response = await self._proxy(request, call)
        except GatewayError as exc:
            call.error = exc
            response = error_response(exc, call.ticket.headers())
        except Exception:
            if call.streaming:
                raise  # the response has begun: aiohttp closes the connection
            log.exception("internal error on %s %s", request.method, request.path)
            response = error_response(GatewayError("internal error in the gateway (logged)"), call.ticket.headers())
        finally:
            if call.slot is not None:
                call.slot.release()
        _record(self.settings, request, call, response, time.perf_counter() - started)
        return response

    async def _proxy(self, request: web.Request, call: Call) -> web.StreamResponse:
        ticket = call.ticket
        auth = request.headers.get("Helicone-Auth", "")
        try:
            ticket.route = route = self._route(request)
        except GatewayError:  # authentication comes first: a path refused without a valid key is a 401
            await self.admission.authenticate(auth)
            raise
        ticket.key = await self.admission.authenticate(auth)
        self._check_key_scope(request, route)
        ticket.body = await self._read_body(request, call)
        headers = request.headers
        await self.admission.admit(
            ticket, asked(headers.getall(POLICY_HEADER, []), headers.get("Helicone-User-Id"), headers.items())
        )
        return await self._forward(request, call, route.upstream, route.path)

    def _route(self, request: web.Request) -> Route:
        """Decide on the decoded, normalised path; the same path is what is forwarded."""
        try:
            return self.resolve(request.method, request.rel_url.raw_path)
        except RouteError as exc:
            raise (NotFound if exc.unknown else BadPath)(str(exc)) from None

    def _check_key_scope(self, request: web.Request, route: Route) -> None:
        """The gateway's own provider key reaches only the endpoints its upstream allows it."""
        upstream = route.upstream
        if _gateway_key(request, upstream) is None:
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
        return await _read_chunks(request, call.slot, limit)

    # -- forwarding --------------------------------------------------------------------------

    async def _forward(self, request: web.Request, call: Call, upstream: Upstream, path: str) -> web.StreamResponse:
        assert self.session is not None
        ticket, meter = call.ticket, call.meter
        if request.transport is None:  # gone during admission: nothing is forwarded, nothing charged
            meter.outcome = Outcome.CLIENT_GONE
            await self.metering.charge(ticket, meter, None)
            raise ClientGone("the client closed its connection before the call was forwarded")
        body, strip = (ticket.rewritten, ticket.strip) if ticket.rewritten is not None else (ticket.body, False)
        # nothing reads the request again: a long stream need not keep its body, twice, and its parse
        ticket.body, ticket.rewritten, ticket.parsed = b"", None, None
        url = _url(upstream, path, request.rel_url.raw_query_string)
        sent = time.perf_counter()
        try:
            with ClientWatch(request):  # a client that leaves drops the upstream call at once
                async with self.session.request(
                    request.method,
                    url,
                    headers=_upstream_headers(request, upstream),
                    data=body,
                    allow_redirects=False,
                ) as response:
                    body = b""  # sent (aiohttp's writer holds what it still has to send)
                    meter.upstream_status = response.status
                    if _is_json(response):
                        return await self._whole(call, response)
                    return await self._stream(request, call, response, strip)
        except ClientGone:
            meter.outcome = Outcome.CLIENT_GONE
            await self.metering.charge(ticket, meter, self.metering.cut_usage(ticket, meter))
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            await self.metering.charge(ticket, meter, None)
            raise UpstreamTimeout(f"the upstream did not answer within {self.settings.upstream_timeout:g} s") from exc
        except aiohttp.ClientError as exc:
            await self.metering.charge(ticket, meter, None)
            raise UpstreamUnreachable(f"cannot reach the upstream {upstream.name}: {exc.__class__.__name__}") from exc
        except asyncio.CancelledError:  # the client went away (aiohttp's handler_cancellation)
            meter.outcome = Outcome.CLIENT_GONE
            await self.metering.charge(ticket, meter, self.metering.cut_usage(ticket, meter))
            raise
        finally:
            call.upstream_seconds = time.perf_counter() - sent

    async def _whole(self, call: Call, response: aiohttp.ClientResponse) -> web.Response:
        """A complete (non-stream) response: charged before its headers leave."""
        body = await response.read()
        if _is_json(response):
            self.metering.read_body(call.meter, _decoded(body, response.headers.get("Content-Encoding")))
        await self.metering.charge(call.ticket, call.meter, call.meter.usage)
        return web.Response(status=response.status, body=body, headers=_response_headers(call, response))

    async def _stream(
        self, request: web.Request, call: Call, response: aiohttp.ClientResponse, strip: bool
    ) -> web.StreamResponse:
        """Chunk by chunk as the upstream sends; charged before the stream's terminal event. A client
        that leaves one write unread for `write_timeout` seconds is dropped (`WriteDeadline`)."""
        ticket, meter = call.ticket, call.meter
        out = web.StreamResponse(status=response.status, headers=_response_headers(call, response))
        await out.prepare(request)
        call.streaming = True
        tracker = self.metering.track(ticket, meter, strip) if _is_sse(response) else None
        with WriteDeadline(request, self.settings.write_timeout) as writes:
            with UpstreamIdle(response, self.settings.upstream_timeout) as idle:
                outcome = await _pump(request, response, out, tracker, writes, idle)
            tail = self.metering.stream_ended(ticket, meter, outcome)
            await self.metering.charge(ticket, meter, meter.usage)
            # the terminal event and the end of the body in one write
            ended = meter.outcome is Outcome.COMPLETE and await writes.send(out.write_eof(tail))
            if not ended and request.transport is not None:
                request.transport.abort()  # the client must not take a cut stream for a whole one
        return out


async def _read_chunks(request: web.Request, slot: Slot, limit: int) -> bytes:
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


def _connection_listed(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """The header names a message's `Connection` lines (all of them) list: hop-by-hop, not forwarded."""
    lines = headers.getall("Connection", ())
    return frozenset(t.strip().lower() for line in lines for t in line.split(",")) if lines else _NONE


_NONE: frozenset[str] = frozenset()


def _upstream_headers(request: web.Request, upstream: Upstream) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    listed = _connection_listed(request.headers)
    for name, value in request.headers.items():
        lower = name.lower()
        if lower in _DROP_REQUEST or lower.startswith("helicone-") or lower in listed:
            continue
        headers.add(name, value)
    headers["Accept-Encoding"] = "identity"
    key = _gateway_key(request, upstream)
    if key is not None:
        if upstream.provider == "anthropic":
            headers["x-api-key"] = key
        else:
            headers["Authorization"] = f"Bearer {key}"
    return headers


def _gateway_key(request: web.Request, upstream: Upstream) -> str | None:
    """The gateway's own provider key, if it sends it: configured, and the client forwards none
    of its own (a credential header named in `Connection` is not forwarded)."""
    if not upstream.api_key:
        return None
    listed = _connection_listed(request.headers)
    sent = any(name in request.headers and name not in listed for name in _CREDENTIALS)
    return None if sent else upstream.api_key


def _url(upstream: Upstream, path: str, query: str) -> URL:
    """The upstream URL: the base, the normalised path the gateway decided on, and the query
    as the client sent it (a query that is not plain ASCII is escaped, as it must be on the wire)."""
    base = _encoded_base(upstream.base_url)
    if base.endswith("/v1") and (path == "/v1" or path.startswith("/v1/")):
        path = path[3:]
    url = f"{base}{path}?{query}" if query else f"{base}{path}"
    return URL(url, encoded=True) if url.isascii() else URL(url)


def _response_headers(call: Call, response: aiohttp.ClientResponse) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    listed = _connection_listed(response.headers)
    for name, value in response.headers.items():
        lower = name.lower()
        if lower not in _DROP_RESPONSE and lower not in listed:
            headers.add(name, value)
    for name, value in call.ticket.headers().items():
        headers[name] = value
    return headers


async def _pump(
    request: web.Request,
    response: aiohttp.ClientResponse,
    out: web.StreamResponse,
    tracker: StreamUsage | None,
    writes: WriteDeadline,
    idle: UpstreamIdle,
) -> Outcome:
    """Copy the upstream stream to the client; how it ended: complete, client gone, upstream broken.

    The tracker's terminal event, if any, is left for the caller to send (`tracker.finish()`).
    Text that could not be written is taken back out of the tracker: it was not streamed. A client
    that leaves while the upstream is silent is noticed at once (`ClientWatch`).
    """
    unsent: int | None = None  # where the text of a write in progress begins
    content, clock = response.content, writes.loop.time
    try:
        with ClientWatch(request):
            # one coroutine per read and one per write (not `iter_any()`'s and `writes.send`'s around them)
            while True:
                idle.since = clock()  # what aiohttp's sock_read timer did per chunk (`UpstreamIdle`)
                chunk = await content.readany()
                idle.since = None
                if not chunk:
                    return Outcome.COMPLETE
                unsent = len(tracker.text) if tracker is not None else 0
                data = tracker.feed(chunk) if tracker is not None else chunk
                if data:
                    writes.since = clock()  # what `WriteDeadline.send` does, inline
                    try:
                        await out.write(data)
                    except (ConnectionError, RuntimeError):
                        break
                    finally:
                        writes.since = None
                unsent = None
    except (aiohttp.ClientError, TimeoutError):
        return Outcome.UPSTREAM_BROKEN
    except ClientGone:
        pass
    if tracker is not None and unsent is not None:
        del tracker.text[unsent:]
    return Outcome.CLIENT_GONE


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


# -- the log line and metrics ------------------------------------------------------------------


def _record(settings: Settings, request: web.Request, call: Call, response: web.StreamResponse, seconds: float) -> None:
    ticket, meter = call.ticket, call.meter
    metrics.child(metrics.REQUESTS, call.route, str(response.status), ticket.decision.value).inc()
    if meter.upstream_status is not None:
        metrics.child(metrics.UPSTREAM_LATENCY, call.route).observe(call.upstream_seconds)
        metrics.OVERHEAD.observe(max(0.0, seconds - call.upstream_seconds))
    if ticket.decision is Decision.FAIL_OPEN:
        log.warning("store unreachable: %s %s let through without limits", request.method, request.path)
    skipped = _skips(settings, ticket)
    if not settings.access_log:
        return
    usage = meter.usage
    unpriced = usage is not None and meter.cost is None  # no price known for the model: charged 0
    access_log.info(
        "request",
        extra={
            "fields": {
                "method": request.method,
                "path": ticket.route.gateway_path if ticket.route is not None else request.path,
                "route": call.route,
                "key": ticket.key.name if ticket.key else None,
                "user": ticket.user,
                "properties": ticket.properties or None,
                "model": meter.model or ticket.model,
                "input_tokens": usage.input_tokens if usage else None,
                "output_tokens": usage.output_tokens if usage else None,
                "cost_cents": meter.cost / 1_000_000 if meter.cost is not None else (0.0 if unpriced else None),
                "unpriced": True if unpriced else None,
                "decision": ticket.decision.value,
                "status": response.status,
                "upstream_status": meter.upstream_status,
                "outcome": meter.outcome.value if meter.upstream_status else None,
                "latency_ms": round(seconds * 1000, 3),
                "skipped": skipped,
                **_refusal(request, call),
            }
        },
    )


def _skips(settings: Settings, ticket: Ticket) -> list[dict[str, str]] | None:
    """Header policies left out: counted, and logged (on their own without an access log)."""
    if not ticket.skipped:
        return None
    skipped = [s.fields() for s in ticket.skipped]
    for code in dict.fromkeys(s.code for s in ticket.skipped):
        metrics.child(metrics.POLICY_SKIPS, code).inc()
    if not settings.access_log:
        log.warning("header policies left out (on_policy_error = ignore)", extra={"fields": {"skipped": skipped}})
    return skipped


def _refusal(request: web.Request, call: Call) -> dict[str, Any]:
    """What a log line says of an answer the gateway gave itself: its code, the policy it concerns
    (normal form, or the text of a malformed one) and a short reason."""
    exc, ticket = call.error, call.ticket
    if exc is None:
        return {}
    policy: str | None = ", ".join(p.normal_form() for p in ticket.policies) or None
    reason = exc.message
    if isinstance(exc, BadPolicy):
        policy = exc.extra.get("policy")
        policy = join_header_lines(request.headers.getall(POLICY_HEADER, [])) if policy is None else policy
        reason = exc.extra.get("problem", reason)
    elif isinstance(exc, MissingSegment):
        policy = exc.extra.get("policy", policy)
        reason = exc.extra.get("problem", reason)
    elif isinstance(exc, RateLimited):
        retry = exc.extra.get("retry_after")
        policy, reason = refusal.logged(
            ticket.budgets, ticket.amounts, ticket.states, ticket.policies, exc.message, retry
        )
    return {
        "error_code": exc.code,
        "policy": None if policy is None else clipped(policy),
        "reason": clipped(reason, 400),
        "retry_after": exc.extra.get("retry_after"),
    }
