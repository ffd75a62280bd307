"""The reference: a minimal reverse proxy on quotagate's own HTTP stack (aiohttp server and client, uvloop).

No limits, no auth, no parsing: it forwards the method, path, headers and body to the upstream and
returns the response. A JSON response is read whole and returned; an SSE stream is copied chunk by
chunk as it arrives, as the gateway does. Like `quotagate serve`, N worker processes share the port
with SO_REUSEPORT and each has its own event loop and upstream connection pool. What it sustains is
what Python on this stack can do; the benchmark states the gateway's figures as ratios to it.

    python bench/refproxy.py --port 9100 --upstream http://127.0.0.1:9000 --workers 2

`--local` answers every request itself, with the bench upstream's chat completion (its body and
headers), without a client or an upstream: what aiohttp's server side costs alone, for
`bench/callgrind_requests.py --ref-local`. Not a proxy then: for measuring only.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import os
import signal
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
DROP_REQUEST = HOP_BY_HOP | {"host", "content-length"}
DROP_RESPONSE = HOP_BY_HOP | {"content-length"}
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


def _filtered(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            out.add(name, value)
    return out


async def forward(request: web.Request) -> web.StreamResponse:
    """Forward one request and return the upstream's response."""
    session = request.app[SESSION]
    body = await request.read()
    async with session.request(
        request.method,
        request.app[UPSTREAM] + request.raw_path,
        headers=_filtered(request.headers, DROP_REQUEST),
        data=body,
        allow_redirects=False,
    ) as response:
        headers = _filtered(response.headers, DROP_RESPONSE)
        if response.content_type != "text/event-stream":
            return web.Response(status=response.status, body=await response.read(), headers=headers)
        out = web.StreamResponse(status=response.status, headers=headers)
        await out.prepare(request)
        async for chunk in response.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out


def local_handler() -> Callable[[web.Request], Awaitable[web.Response]]:
    """`--local`: a handler that reads the request and answers the upstream's completion, as the
    proxy returns it (imported here: the proxy itself does not load the upstream's module)."""
    from upstream import _COMMON_HEADERS, COMPLETION

    fields = [line.decode().split(": ", 1) for line in _COMMON_HEADERS.splitlines()]
    headers = [("Content-Type", "application/json"), *((name, value) for name, value in fields)]

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=200, body=COMPLETION, headers=CIMultiDict(headers))

    return answer


async def _start_session(app: web.Application) -> None:
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
    app[SESSION] = aiohttp.ClientSession(
        connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent", "Content-Type", "Accept-Encoding")
    )


async def _close_session(app: web.Application) -> None:
    await app[SESSION].close()


def build_app(upstream: str, local: bool = False) -> web.Application:
    app = web.Application(client_max_size=32 * 1024 * 1024)
    app[UPSTREAM] = upstream.rstrip("/")
    if not local:
        app.on_startup.append(_start_session)
        app.on_cleanup.append(_close_session)
    app.router.add_route("*", "/{tail:.*}", local_handler() if local else forward)
    return app


async def _serve(host: str, port: int, upstream: str, reuse_port: bool, local: bool = False) -> None:
    runner = web.AppRunner(build_app(upstream, local), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port, backlog=2048)
    await site.start()
    # the garbage collector settings of quotagate's workers (quotagate.server.settle_garbage_collector),
    # so that the ratios measure the gateway's own work, not a runtime setting (the reference gains
    # ~5 % from them too)
    gc.collect()
    gc.freeze()
    gc.set_threshold(5_000, 50, 100)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def run_worker(host: str, port: int, upstream: str, reuse_port: bool, local: bool = False) -> None:
    """One worker process with its own uvloop event loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(host, port, upstream, reuse_port, local))
    else:
        uvloop.run(_serve(host, port, upstream, reuse_port, local))


def serve(host: str, port: int, upstream: str, workers: int, local: bool = False) -> None:
    """Run `workers` processes on one port (SO_REUSEPORT when more than one)."""
    print(f"refproxy listening on http://{host}:{port} ({workers} workers, pid {os.getpid()})", flush=True)
    if workers == 1:
        run_worker(host, port, upstream, False, local)
        return
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=run_worker, args=(host, port, upstream, True, local)) for _ in range(workers)]
    for proc in procs:
        proc.start()

    def stop(_signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.pid and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for proc in procs:
        proc.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--upstream", default="http://127.0.0.1:9000")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--local", action="store_true", help="answer every request itself (no client, no upstream)")
    args = parser.parse_args()
    serve(args.host, args.port, args.upstream, args.workers, args.local)


if __name__ == "__main__":
    main()
