"""Bounds per connection and per worker, below the handlers.

aiohttp reads a request head with no deadline and no total size limit, and keeps a connection open
for an hour without a request. Here, for an application built by `server.build_app`:

- a head may take `head_timeout` seconds from its first byte, and `max_head_bytes` in all
  (each header line at most `MAX_FIELD_BYTES`): 408 or 431, and the connection is closed;
- a body may take `body_timeout` seconds after its head: 408 while a response can still be sent,
  else the connection is closed;
- a connection waits `idle_timeout` seconds for a request (aiohttp's keep-alive timer);
- `ClientWatch` lets a handler notice a client that left while it waits for something else;
- `WriteDeadline` drops a client that stops reading a response (`write_timeout`);
- `UpstreamIdle` fails a stream whose upstream stops sending (`upstream_timeout`);
- `Capacity` bounds the calls a worker has in flight and the request-body bytes they hold.

The hook: `GatewayRunner` (used by `quotagate serve` and by `BackgroundServer`) makes a
`GuardedServer`, whose connections are `GuardedHandler`s, for an application that carries
`HTTP_LIMITS`. aiohttp's own log records pass through `LibraryLogFilter`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Self

from aiohttp import ClientResponse, ServerTimeoutError, web
from aiohttp.http_exceptions import ContentEncodingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from .config import Settings
from .errors import (
    BadRequestHead,
    ClientGone,
    GatewayBusy,
    GatewayError,
    HeadTooLarge,
    RequestTimeout,
    TargetTooLong,
    UnsupportedEncoding,
    error_body,
    error_response,
)

# aiohttp's RequestHandler internals this module builds on (tested with aiohttp 3.14)
_INTERNALS = ("_messages", "_request_in_progress", "_current_request", "_keepalive_handle", "_manager")
if not set(_INTERNALS) <= set(RequestHandler.__slots__) or not hasattr(RequestHandler, "_process_keepalive"):
    raise ImportError(f"quotagate needs an aiohttp whose RequestHandler has {_INTERNALS} and _process_keepalive")

MAX_FIELD_BYTES = 65536
"""One header line (name and value) at most: long user ids fit (documented in docs/operations.md)."""
LINGER = 1.0
"""Seconds a refused connection is still read (and what arrives dropped) after its answer, so that
closing it with unread bytes does not reset it before the client has read the answer."""


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_head_bytes: int
    head_timeout: float
    body_timeout: float
    idle_timeout: float
    max_connections: int = 1 << 30

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(
            settings.max_head_bytes,
            settings.head_timeout,
            settings.body_timeout,
            settings.idle_timeout,
            settings.max_connections or connection_limit(settings.max_in_flight),
        )

    def handler_args(self) -> dict[str, Any]:
        """What aiohttp's own RequestHandler enforces: one header line, the idle timer."""
        return {"max_field_size": MAX_FIELD_BYTES, "keepalive_timeout": self.idle_timeout}


HTTP_LIMITS = web.AppKey("http_limits", HttpLimits)
FILE_RESERVE = 64
"""Descriptors kept apart from client and upstream connections: listening sockets, the store, logs."""


def connection_limit(max_in_flight: int) -> int:
    """Client connections a worker may keep open: its open-file limit, less a descriptor for the
    upstream connection of each call in flight (at most half the limit) and `FILE_RESERVE`. Beyond
    its limit a worker cannot accept anyone: a client holding that many idle connections would
    shut every other client out until they time out."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        soft = 1024
    if soft < 0 or soft > 1 << 24:  # RLIM_INFINITY
        soft = 1 << 24
    return max(16, soft - FILE_RESERVE - min(max_in_flight, soft // 2))


class BodyTimeout(TimeoutError):
    """Set on a request's payload when its body did not arrive in time (a TimeoutError, so that
    aiohttp's lingering read of an unread body ends quietly)."""


def head_size(request: BaseRequest) -> int:
    """The bytes of a parsed head: request line, header lines, the blank line."""
    line = len(request.method) + len(request.raw_path) + 12  # " ", " HTTP/1.1\r\n"
    return line + sum(len(name) + len(value) + 4 for name, value in request.raw_headers) + 2


# --- the connection ------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Watch:
    task: asyncio.Task[Any]
    fired: bool = False


class GuardedHandler(RequestHandler):
    """aiohttp's connection protocol, with a deadline and a size limit for each head.

    Bytes received while no head is complete and no body is being read belong to a head. A chunk
    that also ends a body or a head is not counted (the parser has already taken it), so a head can
    only be undercounted by one read, never overcounted. A head that may be over the limit once
    complete (counted bytes plus the chunks around them) makes `GuardedServer` measure the heads
    of this connection exactly (`check_heads`).
    """

    __slots__ = ("_body", "_head_bytes", "_head_timer", "_limits", "_refused", "_uncounted", "_watch", "check_heads")

    def __init__(self, manager: Server, *, limits: HttpLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body: Any = None  # the payload of the newest complete head
        self._watch: _Watch | None = None
        self._refused = False
        self._uncounted = 0  # the last chunk not counted as head bytes: the next head may begin in it
        self.check_heads = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if not data or self.transport is None:
            super().data_received(data)
            return
        in_body = self._body is not None and not self._body.is_eof()
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued:  # one head or more ended in this chunk
            if self._uncounted + self._head_bytes + len(data) > self._limits.max_head_bytes:
                self.check_heads = True
            self._head_ended()
            self._body = self._messages[-1][1]
            self._uncounted = len(data)
        elif in_body:
            self._uncounted = len(data)
        else:
            self._head_grew(len(data))

    def _head_grew(self, size: int) -> None:
        if not self._head_bytes:
            self._head_timer = self._loop.call_later(self._limits.head_timeout, self._head_expired)
        self._head_bytes += size
        if self._head_bytes > self._limits.max_head_bytes:
            self.refuse(HeadTooLarge(f"request head over {self._limits.max_head_bytes} bytes"))

    def _head_ended(self) -> None:
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._head_bytes:
            self.refuse(RequestTimeout(f"request head not received within {self._limits.head_timeout:g} s"))

    def waiting(self) -> bool:
        """Open, with no request under way: idle between requests, or still sending a head."""
        body = self._body
        return (
            self.transport is not None
            and not self._request_in_progress
            and not self._messages
            and (body is None or body.is_eof())
        )

    def _process_keepalive(self) -> None:
        """aiohttp's idle timer: a connection whose next head has begun is left to the head deadline."""
        if self._head_bytes:
            self._keepalive_handle = None
            return
        super()._process_keepalive()

    def refuse(self, exc: GatewayError) -> None:
        """Answer `exc` and close the connection; if a response is under way, just close it."""
        transport = self.transport
        if transport is None:
            return
        if self._messages or self._request_in_progress or not transport.can_write_eof():
            self.force_close()
            return
        self._refused = True  # what still arrives is dropped
        transport.write(raw_response(exc))
        transport.write_eof()
        self._loop.call_later(LINGER, self.force_close)

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """aiohttp's answer to a head it cannot parse, as a JSON error that quotes none of the input."""
        super().handle_error(request, status, exc, message)  # logs (through LibraryLogFilter)
        if isinstance(exc, LineTooLong):  # args: the line, the limit it passed, its size
            limit = exc.args[1] if len(exc.args) > 1 else MAX_FIELD_BYTES
            if limit == MAX_FIELD_BYTES:
                error: GatewayError = HeadTooLarge(f"a header line over {MAX_FIELD_BYTES} bytes")
            else:
                error = TargetTooLong(f"a request line over {limit} bytes")
        elif isinstance(exc, ContentEncodingError):  # an encoding this server cannot inflate
            error = UnsupportedEncoding("Content-Encoding not accepted: send the body plain, gzip or deflate")
        elif status < 500:
            error = BadRequestHead(f"malformed HTTP request ({type(exc).__name__ if exc else status})")
        else:
            error = GatewayError("internal error in the gateway (logged)")
        response = error_response(error)
        response.force_close()
        return response

    def connection_lost(self, exc: BaseException | None) -> None:
        manager = self._manager
        if isinstance(manager, GuardedServer):
            manager.live.pop(self, None)
        cancels = manager is not None and manager.handler_cancellation  # aiohttp cancels itself
        super().connection_lost(exc)
        self._head_ended()
        body, self._body = self._body, None
        if body is not None and not body.is_eof() and self._current_request is None:
            body.set_exception(BodyTimeout("the client closed its connection"))  # ends aiohttp's lingering read
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.fired = True
            if not cancels:
                watch.task.cancel()


def raw_response(exc: GatewayError) -> bytes:
    """A whole HTTP/1.1 response for a connection that no handler owns."""
    body = error_body(exc)
    reason = {408: "Request Timeout", 431: "Request Header Fields Too Large"}.get(exc.status, "Error")
    head = (
        f"HTTP/1.1 {exc.status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


# --- the server --------------------------------------------------------------------------------


_Handler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]


class GuardedServer(Server):
    """aiohttp's Server, making `GuardedHandler`s and checking each head and body before the app.

    It keeps at most `max_connections` client connections open: a new one beyond closes, of those
    with no request under way (idle, or still sending a head), the one whose last request began
    longest ago (or that never sent one), else the new one itself, so that connections a client
    holds open without using them never keep others out, nor push out a client's kept-alive ones.
    """

    def __init__(self, base: Server, limits: HttpLimits) -> None:
        super().__init__(
            self._guarded,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            **base._kwargs,
        )
        self.limits = limits
        self._app_handler: _Handler = base.request_handler
        self.live: dict[GuardedHandler, None] = {}  # open connections, least recently used first

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, limits=self.limits, loop=self._loop, **self._kwargs)

    def room(self) -> int:
        """Connections that may still open before a new one must close another (the acceptor's bound)."""
        return self.limits.max_connections - len(self.live)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if not isinstance(handler, GuardedHandler):
            return
        live = self.live
        live[handler] = None
        if len(live) > self.limits.max_connections:
            self._make_room(handler)

    def _make_room(self, newcomer: GuardedHandler) -> None:
        """Close the least recently used connection without a request under way, else the newcomer."""
        live, closing = self.live, []
        victim: GuardedHandler | None = newcomer
        for handler in live:  # least recently used first: calls in flight started longest ago are passed over
            if handler.transport is None:  # closing already: not counted any more
                closing.append(handler)
                if len(live) - len(closing) <= self.limits.max_connections:
                    victim = None
                    break
            elif handler is not newcomer and handler.waiting():
                victim = handler
                break
        for handler in closing:
            del live[handler]
        if victim is not None:
            del live[victim]
            victim.force_close()

    async def _guarded(self, request: BaseRequest) -> web.StreamResponse:
        handling = [True]
        if not request.content.is_eof():
            timer = self._loop.call_later(self.limits.body_timeout, _body_expired, request, handling, self.limits)
            request.content.on_eof(timer.cancel)
        try:
            protocol = request.protocol
            live = self.live
            if live.pop(protocol, 0) is None:  # type: ignore[call-overload]
                live[protocol] = None  # type: ignore[index]  # used last, closed last: in use outlives idle
            if getattr(protocol, "check_heads", True) and head_size(request) > self.limits.max_head_bytes:
                response = error_response(HeadTooLarge(f"request head over {self.limits.max_head_bytes} bytes"))
                response.force_close()
                return response
            return await self._app_handler(request)
        except BodyTimeout as exc:
            response = error_response(RequestTimeout(str(exc)))
            response.force_close()
            return response
        finally:
            handling[0] = False


def _body_expired(request: BaseRequest, handling: list[bool], limits: HttpLimits) -> None:
    """A body still incomplete: its reader gets BodyTimeout (the handler answers 408); once a
    response is under way or done, the connection is closed."""
    payload = request.content
    if payload.is_eof() or request.transport is None:
        return
    payload.set_exception(BodyTimeout(f"request body not received within {limits.body_timeout:g} s"))
    request.protocol.close()  # no further request on this connection
    if not handling[0] or request.writer.output_size > 0:
        request.protocol.force_close()


class GatewayRunner(web.AppRunner):
    """An AppRunner; an application that carries HTTP_LIMITS gets a GuardedServer."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        limits = self.app.get(HTTP_LIMITS)
        return server if limits is None else GuardedServer(server, limits)


# --- a client that leaves ----------------------------------------------------------------------


class ClientWatch:
    """Inside the block, a client whose connection closes cancels the current task, which leaves
    the block as ClientGone: a handler waiting on something else (the upstream) notices at once.

    Without a GuardedHandler (a plain aiohttp server) it does nothing.
    """

    __slots__ = ("outer", "protocol", "watch")

    def __init__(self, request: web.BaseRequest) -> None:
        protocol = request.protocol
        self.protocol = protocol if isinstance(protocol, GuardedHandler) else None
        self.watch: _Watch | None = None
        self.outer: _Watch | None = None

    def __enter__(self) -> None:
        protocol, task = self.protocol, asyncio.current_task()
        if protocol is None or task is None:
            return
        if protocol.transport is None:
            raise ClientGone("the client closed its connection")
        self.outer, self.watch = protocol._watch, _Watch(task)
        protocol._watch = self.watch

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        watch = self.watch
        if watch is None:
            return
        assert self.protocol is not None
        if self.protocol._watch is watch:
            self.protocol._watch = self.outer
        if not watch.fired:
            return
        watch.task.uncancel()  # delivered inside the block (as CancelledError, or turned into another error)
        raise ClientGone("the client closed its connection") from None


class _Watchdog:
    """One timer per block, looked at every `seconds`: a wait in progress (`since`, the loop's time
    when it began; None when nothing waits) that has lasted `seconds` calls `expire`. A wait costs a
    clock read, where re-arming a timer per wait costs a cancel and a `call_later`."""

    __slots__ = ("handle", "loop", "seconds", "since")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.since: float | None = None
        self.handle: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    def __enter__(self) -> Self:
        self.handle = self.loop.call_later(self.seconds, self._check)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def expire(self) -> None:
        raise NotImplementedError

    def _check(self) -> None:
        now = self.loop.time()
        since = self.since
        if since is not None and now - since >= self.seconds:
            self.handle = None
            self.expire()
            return
        self.handle = self.loop.call_at((since if since is not None else now) + self.seconds, self._check)


class WriteDeadline(_Watchdog):
    """Inside the block, a write to the client that waits `seconds` without finishing (a client that
    stopped reading what it asked for) drops the connection, which ends that write with an error.
    Only waiting writes are timed: an upstream that is slow to send is not the client's fault.

    One timer per block, looked at every `seconds`; a write costs a clock read. A hot loop may do
    what `send` does inline (`since = loop.time()`, the write, `since = None`) to save a coroutine
    per write, as the stream pump does.
    """

    __slots__ = ("transport",)

    def __init__(self, request: web.BaseRequest, seconds: float) -> None:
        super().__init__(seconds)
        self.transport = request.transport

    async def send(self, write: Awaitable[None]) -> bool:
        """Wait for one write (or the end of the response); False if the client is gone."""
        self.since = self.loop.time()
        try:
            await write
        except (ConnectionError, RuntimeError):
            return False
        finally:
            self.since = None
        return True

    def expire(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class UpstreamIdle(_Watchdog):
    """Inside the block, an upstream that sends nothing for `seconds` while the stream pump waits
    for it fails the pump's read with `ServerTimeoutError`, and its connection is closed, not
    reused: what aiohttp's `sock_read` timeout does, which this replaces once a response's headers
    are in. aiohttp re-arms a timer for every chunk that arrives (a cancel and a `call_later`);
    here one timer per block is looked at every `seconds`, and a wait costs a clock read: the pump
    sets `since` (the loop's time) before it waits for the upstream and clears it after.

    Time the pump spends writing to the client is not counted, as aiohttp stops `sock_read` while
    a slow client keeps it from reading.
    """

    __slots__ = ("content",)

    def __init__(self, response: ClientResponse, seconds: float) -> None:
        super().__init__(seconds)
        self.content = response.content
        connection = response.connection
        protocol = connection.protocol if connection is not None else None
        if protocol is not None:  # aiohttp's own timer, stopped (`start_timeout` re-arms it: with None, not)
            protocol.read_timeout = None
            protocol.start_timeout()

    def expire(self) -> None:
        self.content.set_exception(ServerTimeoutError("Timeout on reading data from socket"))


# --- calls in flight -----------------------------------------------------------------------------


class Capacity:
    """The calls one worker has in flight and the request-body bytes they hold, each bounded.

    A call beyond either bound gets GatewayBusy (503, Retry-After) before it is admitted: nothing
    is counted and nothing forwarded.
    """

    def __init__(self, max_calls: int, max_bytes: int) -> None:
        self.max_calls, self.max_bytes = max_calls, max_bytes
        self.calls = 0
        self.bytes = 0

    def enter(self) -> Slot:
        if self.calls >= self.max_calls:
            raise GatewayBusy(f"the gateway has {self.max_calls} calls in flight; retry shortly", retry_after=1)
        self.calls += 1
        return Slot(self)


class Slot:
    """One call's share of a Capacity: its place, and the body bytes it holds."""

    __slots__ = ("capacity", "held", "open")

    def __init__(self, capacity: Capacity) -> None:
        self.capacity = capacity
        self.held = 0
        self.open = True

    def hold(self, size: int) -> None:
        """Hold `size` more body bytes, or raise GatewayBusy."""
        capacity = self.capacity
        if capacity.bytes + size > capacity.max_bytes:
            raise GatewayBusy(
                f"the gateway holds {capacity.max_bytes} bytes of request bodies in flight; retry shortly",
                retry_after=1,
            )
        capacity.bytes += size
        self.held += size

    def release(self) -> None:
        if self.open:
            self.open = False
            self.capacity.calls -= 1
            self.capacity.bytes -= self.held


# --- aiohttp's own log -----------------------------------------------------------------------------


class LibraryLogFilter(logging.Filter):
    """aiohttp's log records keep their event (message, status, peer) and lose what the client
    sent: arguments that are not peer addresses, exception text and tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        fields: dict[str, Any] = dict(getattr(record, "fields", None) or {})
        if exc is not None:
            fields["error"] = type(exc).__name__
            status = getattr(exc, "code", None) or getattr(exc, "status", None)
            if isinstance(status, int):
                fields["status"] = status
        if record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            try:
                record.msg = str(record.msg).replace("%r", "%s") % tuple(_inert(a) for a in args)
            except (TypeError, ValueError, KeyError):
                record.msg = str(record.msg)
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        record.fields = fields
        return True


def _inert(value: Any) -> str:
    """A peer address as it is; anything else (it may be what the client sent) withheld."""
    try:
        ipaddress.ip_address(str(value))
    except ValueError:
        return "[withheld]"
    return str(value)


def route_library_logs(formatter: logging.Formatter, level: str) -> None:
    """aiohttp's loggers write through `formatter`, filtered, instead of Python's last resort."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    handler.addFilter(LibraryLogFilter())
    library = logging.getLogger("aiohttp")
    library.handlers[:] = [handler]
    library.setLevel(level.upper())
    library.propagate = False
