"""A listening site that accepts every waiting connection at once.

uvloop (libuv) accepts new connections lazily while its event loop is busy: under a burst of
2,000 new connections on two saturated workers, the kernel's accept queues held ~450 connections
each for tens of seconds (`ss -ltn`), and a client's first request waited up to 18-30 s for its
first byte, while the connections already accepted were served in a closed loop (bench/README.md,
"The first seconds of 2,000 streams"). asyncio's own loop accepts up to the backlog at each wake.
`EagerSite` does the same on any loop: its sockets are bound as `loop.create_server` binds them,
and when one is readable, every connection waiting on it (up to the backlog) is accepted and handed
to the application's server, so that a new client waits its turn with the others, not behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web

log = logging.getLogger("quotagate.server")

# accept() failing for want of resources: wait a moment, as asyncio does, rather than spin
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
RESOURCE_PAUSE = 1.0  # seconds
BACKLOG = 2048  # connections the kernel holds for a listening socket before they are accepted
BEYOND_ROOM = 16
"""Connections accepted at once beyond the server's room (each closes an idle one to make room):
well within the descriptors `connections.FILE_RESERVE` keeps apart."""


def bound_sockets(host: str | None, port: int, *, reuse_port: bool, backlog: int) -> list[socket.socket]:
    """Listening, non-blocking sockets for host:port, bound as asyncio's create_server binds them
    (every address the host resolves to; SO_REUSEADDR; IPv6 sockets IPv6-only; SO_REUSEPORT when
    asked). A bind that fails closes them all and raises its OSError."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Acceptor:
    """Accepts on listening sockets for a protocol factory: each time a socket is readable, every
    connection waiting on it, up to `per_wake`, and no further than `room()` (the connections the
    server may still open; those being handed over count) allows, beyond it `BEYOND_ROOM` at a time:
    a burst would otherwise take every descriptor before the server could close any to make room.
    Quacks as the asyncio.Server aiohttp's sites hold."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        sockets: list[socket.socket],
        per_wake: int,
        room: Callable[[], int] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._factory = factory
        self.sockets = sockets
        self.per_wake = per_wake
        self.room = room
        self._tasks: set[asyncio.Task[Any]] = set()
        self.accepted = 0  # connections taken from the kernel's queues
        self.pause = RESOURCE_PAUSE
        for sock in sockets:
            self._loop.add_reader(sock.fileno(), self.accept_waiting, sock)

    def accept_waiting(self, sock: socket.socket) -> None:
        """Every connection waiting on `sock`, up to `per_wake`, accepted (called when it is readable)."""
        count = self.per_wake
        if self.room is not None:
            count = min(count, max(1, self.room() - len(self._tasks) + BEYOND_ROOM))
        for _ in range(count):
            try:
                conn, _peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # that client left: the next one
                continue
            except OSError as exc:
                if exc.errno not in RESOURCE_ERRORS:
                    log.warning("accept failed: %s", exc.strerror or exc)
                    return
                log.error("accept failed (%s): not accepting for %g s", exc.strerror, self.pause)
                self._loop.remove_reader(sock.fileno())
                self._loop.call_later(self.pause, self._resume, sock)
                return
            self._hand_over(conn)

    def _resume(self, sock: socket.socket) -> None:
        if sock.fileno() >= 0:
            self._loop.add_reader(sock.fileno(), self.accept_waiting, sock)

    def _hand_over(self, conn: socket.socket) -> None:
        self.accepted += 1
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = self._loop.create_task(self._connect(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError:  # the client left before its connection was set up
            conn.close()
        except BaseException:  # the loop is closing, say: the socket is not left open
            conn.close()
            raise

    def close(self) -> None:
        """Stop accepting; connections already accepted go on."""
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                sock.close()

    async def wait_closed(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class EagerSite(web.BaseSite):
    """aiohttp's TCPSite, accepting every waiting connection at once (see the module's text)."""

    __slots__ = ("_host", "_port", "_reuse_port")

    def __init__(self, runner: web.BaseRunner, host: str | None, port: int, *, reuse_port: bool, backlog: int) -> None:
        super().__init__(runner, backlog=backlog)
        self._host, self._port, self._reuse_port = host, port, reuse_port

    @property
    def name(self) -> str:
        return f"http://{self._host or '0.0.0.0'}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        sockets = bound_sockets(self._host, self._port, reuse_port=self._reuse_port, backlog=self._backlog)
        room = getattr(server, "room", None)  # a GuardedServer's connection bound
        self._server = Acceptor(server, sockets, self._backlog, room)  # type: ignore[assignment]
        self._port = sockets[0].getsockname()[1]
