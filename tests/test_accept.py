"""Every waiting connection is accepted at once (`quotagate.accept`): a burst of new clients waits
its turn with the clients already served, not behind them in the kernel's queue.

Real sockets on both event loops a worker may run (asyncio's and uvloop's). The clients connect
while the loop is not running (the kernel completes their handshakes into the listening socket's
queue), then one wake of the acceptor is run by hand: what it took is counted in the kernel's
queue, which must be empty, and every client is then answered over HTTP.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop
from aiohttp import web

from quotagate.accept import BACKLOG, Acceptor, EagerSite, bound_sockets

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def on(loop_name: str, coro: Coroutine[Any, Any, Any]) -> Any:
    loop = LOOPS[loop_name]()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


async def hello_runner() -> web.AppRunner:
    async def hello(_request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    return runner


def connect(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


def answers(clients: list[socket.socket]) -> list[bytes]:
    """Each client's GET /, and the status line it got (run in a thread: the loop serves them)."""
    for sock in clients:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
    lines = []
    for sock in clients:
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        lines.append(data.split(b"\r\n", 1)[0])
        sock.close()
    return lines


def nothing_waiting(listener: socket.socket) -> bool:
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_one_wake_accepts_every_waiting_connection(loop_name: str) -> None:
    async def scenario() -> None:
        runner = await hello_runner()
        site = EagerSite(runner, "127.0.0.1", 0, reuse_port=False, backlog=BACKLOG)
        await site.start()
        acceptor = site._server
        assert isinstance(acceptor, Acceptor)
        port = runner.addresses[0][1]
        clients = connect(port, 300)  # the loop does not run: all 300 wait in the kernel's queue
        acceptor.accept_waiting(acceptor.sockets[0])
        assert acceptor.accepted == 300
        assert nothing_waiting(acceptor.sockets[0])
        lines = await asyncio.get_running_loop().run_in_executor(None, answers, clients)
        assert lines == [b"HTTP/1.1 200 OK"] * 300
        await runner.cleanup()

    on(loop_name, scenario())


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_wake_takes_at_most_its_share_and_the_next_wake_the_rest(loop_name: str) -> None:
    async def scenario() -> None:
        runner = await hello_runner()
        assert runner.server is not None
        sockets = bound_sockets("127.0.0.1", 0, reuse_port=False, backlog=64)
        acceptor = Acceptor(runner.server, sockets, per_wake=10)
        clients = connect(sockets[0].getsockname()[1], 25)
        taken = []
        for _ in range(3):
            acceptor.accept_waiting(sockets[0])
            taken.append(acceptor.accepted)
        assert taken == [10, 20, 25]
        lines = await asyncio.get_running_loop().run_in_executor(None, answers, clients)
        assert lines == [b"HTTP/1.1 200 OK"] * 25
        acceptor.close()
        await acceptor.wait_closed()
        await runner.cleanup()

    on(loop_name, scenario())


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_stopped_site_refuses_connections_and_frees_its_port(loop_name: str) -> None:
    async def scenario() -> int:
        runner = await hello_runner()
        site = EagerSite(runner, "127.0.0.1", 0, reuse_port=False, backlog=BACKLOG)
        await site.start()
        port = int(runner.addresses[0][1])
        lines = await asyncio.get_running_loop().run_in_executor(None, answers, connect(port, 3))
        assert lines == [b"HTTP/1.1 200 OK"] * 3
        await runner.cleanup()
        return port

    port = on(loop_name, scenario())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    with socket.socket() as again:  # bound as a sole owner would bind it
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))


def test_a_busy_port_is_refused_with_the_binds_error_and_no_socket_left_open() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as caught:
            bound_sockets("127.0.0.1", port, reuse_port=False, backlog=16)
        assert caught.value.errno == errno.EADDRINUSE


def test_sockets_are_bound_as_asyncio_binds_them() -> None:
    (sock,) = bound_sockets("127.0.0.1", 0, reuse_port=True, backlog=16)
    with sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        assert not sock.getblocking()
        (second,) = bound_sockets("127.0.0.1", sock.getsockname()[1], reuse_port=True, backlog=16)  # a worker
        second.close()
    if socket.has_ipv6:
        try:
            (six,) = bound_sockets("::1", 0, reuse_port=False, backlog=16)
        except OSError:
            return  # no IPv6 loopback on this machine
        with six:
            assert six.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)


# Out of file descriptors: accept() fails with EMFILE; the acceptor pauses (no busy loop on a socket
# that stays readable), logs, and takes the waiting client once descriptors are free again.
OUT_OF_DESCRIPTORS = textwrap.dedent(
    """
    import asyncio, logging, resource, socket, sys
    from aiohttp import web
    from quotagate.accept import Acceptor, bound_sockets

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")

    async def main():
        async def hello(_request):
            return web.Response(text="hello")
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sockets = bound_sockets("127.0.0.1", 0, reuse_port=False, backlog=16)
        acceptor = Acceptor(runner.server, sockets, per_wake=16)
        acceptor.pause = 0.05
        port = sockets[0].getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        spare = []
        try:
            while True:
                spare.append(socket.socket())  # every descriptor taken
        except OSError:
            pass
        acceptor.accept_waiting(sockets[0])
        print("accepted while out of descriptors:", acceptor.accepted, flush=True)
        for sock in spare:
            sock.close()
        loop = asyncio.get_running_loop()
        client.sendall(b"GET / HTTP/1.1\\r\\nHost: g\\r\\nConnection: close\\r\\n\\r\\n")
        data = await loop.run_in_executor(None, client.recv, 1000)
        print("answered:", data.split(b"\\r\\n", 1)[0].decode(), "accepted:", acceptor.accepted, flush=True)
        await runner.cleanup()

    asyncio.run(main())
    """
)


def test_out_of_descriptors_the_acceptor_pauses_then_takes_the_waiting_client() -> None:
    done = subprocess.run(
        [sys.executable, "-c", OUT_OF_DESCRIPTORS], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "accepted while out of descriptors: 0" in lines
    assert "ERROR accept failed (Too many open files): not accepting for 0.05 s" in lines
    assert "answered: HTTP/1.1 200 OK accepted: 1" in lines
