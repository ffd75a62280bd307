"""A pipelined Redis connection for the hot path: one socket, commands written back to back,
replies matched to their callers in order.

The admission and charge of every request are one EVALSHA each; here a call costs a fraction of
the client CPU it costs through redis-py's asyncio client (figures: bench/README.md), the replies
parsed by hiredis (the same C parser redis-py uses) straight from `data_received`. Redis answers the
commands of one connection in the order they arrive, so any number of calls can be in flight at
once without a pool, and a caller that gives up (a cancelled task) leaves the order intact: its
reply is read and dropped.

The script calls and the dashboard's index writes use it; everything else (the Cluster, the admin
views, key management) stays on redis-py. `PipelinedRedis.supports(url)` says whether a URL is one
this connection can open itself: `redis://` or `rediss://` with a user, password, database and the
`ssl_*` options; anything else (a unix socket, RESP3, a client name...) is left to redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import Callable
from typing import Any, cast

import hiredis
from redis.asyncio.connection import RedisSSLContext, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

_SSL_OPTIONS = {
    "ssl_keyfile": "keyfile",
    "ssl_certfile": "certfile",
    "ssl_cert_reqs": "cert_reqs",
    "ssl_ca_certs": "ca_certs",
    "ssl_ca_data": "ca_data",
    "ssl_ca_path": "ca_path",
    "ssl_check_hostname": "check_hostname",
    "ssl_min_version": "min_version",
    "ssl_ciphers": "ciphers",
    "ssl_password": "password",
}
_PLAIN_OPTIONS = {"host", "port", "db", "username", "password", "connection_class"}


def pack(parts: list[bytes]) -> bytes:
    """One command in the Redis protocol (RESP2 array of bulk strings)."""
    return b"*%d\r\n" % len(parts) + b"".join([b"$%d\r\n%s\r\n" % (len(p), p) for p in parts])


Then = Callable[["asyncio.Future[Any]"], None]  # called with a call's future as soon as it is done


class _Protocol(asyncio.Protocol):
    """Parses replies as they arrive and hands each to the oldest waiting caller.

    A caller may pass `then` with its call: it is called with the call's future in the same
    callback that finishes the future (the reply's `data_received`, or the failure), not a turn of
    the event loop later as a future's done-callback is (under load each turn of a busy worker's
    loop is another wait, up to a millisecond or two)."""

    def __init__(self, reply_timeout: float) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float, Then | None]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        self.reply_timeout = reply_timeout
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(RedisConnectionError(f"bad reply from Redis: {exc}"))
                return
            if reply is False:
                return
            if not waiting:  # a reply nobody asked for: the stream is out of step
                self.fail(RedisConnectionError("unexpected reply from Redis"))
                return
            future, _, then = waiting.popleft()
            if not future.done():  # else its caller gave up; the order is kept
                if isinstance(reply, hiredis.ReplyError):
                    future.set_exception(_error(str(reply)))
                else:
                    future.set_result(reply)
            if then is not None:
                _call(then, future)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}"))

    def fail(self, exc: Exception) -> None:
        """Every call in flight fails with `exc`; the connection is not used again."""
        if self.lost is None:
            self.lost = exc
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.waiting:
            future, _, then = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)
            if then is not None:
                _call(then, future)
        if self.transport is not None:
            self.transport.abort()

    def send(self, data: bytes, then: Then | None = None) -> asyncio.Future[Any]:
        """Write one packed command; its reply (or error) will finish the future returned, and
        `then(future)` is called right after, in the same callback."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting.append((future, loop.time() + self.reply_timeout, then))
        self.transport.write(data)
        if self._timer is None:
            self._timer = loop.call_at(loop.time() + self.reply_timeout, self._check_timeout)
        return future

    def _check_timeout(self) -> None:
        """Fail the connection when its oldest call has waited `reply_timeout`; else look again
        when it will have."""
        self._timer = None
        if not self.waiting:
            return
        deadline = self.waiting[0][1]
        loop = asyncio.get_running_loop()
        if loop.time() >= deadline:
            self.fail(RedisTimeoutError(f"Redis did not answer within {self.reply_timeout:g} s"))
        else:
            self._timer = loop.call_at(deadline, self._check_timeout)


def _call(then: Then, future: asyncio.Future[Any]) -> None:
    """A caller's `then`: what it raises is reported as a done-callback's would be, and the
    connection goes on (an exception out of `data_received` would close it)."""
    try:
        then(future)
    except Exception as exc:
        future.get_loop().call_exception_handler(
            {"message": "exception in a Redis reply's callback", "exception": exc, "future": future}
        )


def _error(message: str) -> ResponseError:
    return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)


class PipelinedRedis:
    """One pipelined connection, opened on first use and again after it is lost."""

    def __init__(self, url: str, connect_timeout: float = 1.0, reply_timeout: float = 5.0) -> None:
        options = parse_url(url)
        self.host = str(options.get("host", "localhost"))
        self.port = int(options.get("port", 6379))
        self.db = int(options.get("db", 0) or 0)
        self.username = options.get("username")
        self.password = options.get("password")
        ssl_options: dict[str, Any] = {_SSL_OPTIONS[k]: v for k, v in options.items() if k in _SSL_OPTIONS}
        self.tls = url.lower().startswith("rediss:")
        self._ssl_options = ssl_options
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None

    @staticmethod
    def supports(url: str) -> bool:
        scheme = url.split("://", 1)[0].lower()
        if scheme not in ("redis", "rediss"):
            return False
        return all(k in _PLAIN_OPTIONS or k in _SSL_OPTIONS for k in parse_url(url))

    def ready(self) -> _Protocol | None:
        """The open connection, if there is one (calls can be sent on it without waiting)."""
        protocol = self._protocol
        return protocol if protocol is not None and protocol.lost is None else None

    async def execute(self, packed: bytes) -> Any:
        """Send one packed command (`pack`) and wait for its reply; Redis errors are raised as
        redis-py's exceptions (`NoScriptError`, `ResponseError`, `ConnectionError`, `TimeoutError`)."""
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            protocol = await self._connect()
        return await protocol.send(packed)

    async def _connect(self) -> _Protocol:
        """One connection attempt at a time; the callers that arrive meanwhile share it."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        context: ssl.SSLContext | None = RedisSSLContext(**self._ssl_options).get() if self.tls else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Protocol(self.reply_timeout),
                    self.host,
                    self.port,
                    ssl=context,
                    server_hostname=self.host if context is not None else None,
                )
                try:
                    await self._handshake(protocol)
                except BaseException as exc:
                    protocol.fail(RedisConnectionError(f"Redis handshake failed: {exc!r}"))
                    raise
        except TimeoutError as exc:
            raise RedisTimeoutError(f"cannot connect to Redis at {self.host}:{self.port}: timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis at {self.host}:{self.port}: {exc}") from exc
        self._protocol = protocol
        return protocol

    async def _handshake(self, protocol: _Protocol) -> None:
        if self.password is not None:
            auth = [b"AUTH", *([self.username.encode()] if self.username else []), self.password.encode()]
            await protocol.send(pack(auth))
        if self.db:
            await protocol.send(pack([b"SELECT", b"%d" % self.db]))

    async def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            with contextlib.suppress(Exception):
                protocol.transport.close()
            protocol.fail(RedisConnectionError("connection closed"))
