"""The aiohttp application, and `serve`: N worker processes sharing one port with SO_REUSEPORT.

Each worker is a whole gateway (event loop, store connection, upstream connection pool); the
kernel spreads incoming connections over them. The parent only starts, watches and stops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from . import metrics
from .config import Settings
from .connections import HTTP_LIMITS, GatewayRunner, HttpLimits, route_library_logs
from .proxy import Proxy
from .redact import redact_url
from .stores import Store, StoreError, open_store
from .terminal import json_inert
from .usage import count_tokens

log = logging.getLogger("quotagate")
PROXY = web.AppKey("proxy", Proxy)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; request lines carry their fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            line.update((k, v) for k, v in fields.items() if v is not None)
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json_inert(json.dumps(line, ensure_ascii=False, default=str))


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("quotagate")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    route_library_logs(JsonFormatter(), level)


def build_app(settings: Settings, store: Store) -> web.Application:
    """The whole gateway as one aiohttp application."""
    proxy = Proxy(settings, store)
    limits = HttpLimits.from_settings(settings)
    app = web.Application(client_max_size=settings.max_body_bytes, handler_args=limits.handler_args())
    app[PROXY] = proxy
    app[HTTP_LIMITS] = limits  # served by a GatewayRunner: deadlines and head limits per connection
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.stop)
    app.on_cleanup.append(lambda _app: store.close())
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    from .admin import add_admin_routes

    add_admin_routes(app, settings, store)
    app.router.add_route("*", r"/{tail:[\s\S]*}", proxy.handle)  # every path, an encoded newline too
    return app


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    proxy: Proxy = request.app[PROXY]
    try:
        await asyncio.wait_for(proxy.store.ping(), timeout=2.0)
    except (StoreError, TimeoutError) as exc:
        proxy.guard.failed("ping", exc if isinstance(exc, StoreError) else StoreError("timed out"))
        return web.json_response({"status": "unavailable", "store": "down", "error": str(exc)}, status=503)
    proxy.guard.succeeded()
    return web.json_response({"status": "ready", "store": "up"})


async def _metrics(request: web.Request) -> web.Response:
    proxy: Proxy = request.app[PROXY]
    if proxy.settings.metrics_require_token:
        from .admin import GATEKEEPER

        refusal = await request.app[GATEKEEPER].check(request)
        if refusal is not None:
            return refusal
    body, content_type = metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


# --- running it ----------------------------------------------------------------------------------


GC_YOUNG_THRESHOLD = 5_000
"""Allocations between two collections of the youngest generation (CPython's default: 700)."""


def settle_garbage_collector() -> None:
    """Once a worker has started: everything allocated so far (modules, the price table, the
    tokenizer) moves out of the collector's sight (`gc.freeze`), and collections come less often.

    A request frees almost all it allocates by reference counting, but with CPython's defaults the
    collector ran ~60 young collections a second at 1,300 requests/s, and every few seconds a full
    collection traversed every module and table for 35 ms, a stall that every request in flight
    waited out. Measured in one gateway process under wrk for 9 s (`gc.callbacks`): time in the
    collector 354 -> 13 ms, the longest pause 35.7 -> 1.4 ms. A young collection takes ~0.2 us per
    object, so the threshold bounds the pause (20,000: 3.3 ms).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)


async def run_site(
    settings: Settings, store: Store, reuse_port: bool, stop: asyncio.Event, tune_gc: bool = False
) -> None:
    runner = GatewayRunner(build_app(settings, store), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port, backlog=2048)
    await site.start()
    if tune_gc:  # a worker process of its own (not a gateway inside a test's process)
        settle_garbage_collector()
    log.info("worker %d listening on http://%s:%d", os.getpid(), settings.host, settings.port)
    await stop.wait()
    log.info("worker %d stopping: finishing requests in flight", os.getpid())
    await runner.cleanup()
    log.info("worker %d stopped", os.getpid())


def run_worker(settings: Settings, reuse_port: bool) -> None:
    """One worker process: its own event loop, store connection and upstream pool."""
    setup_logging(settings.log_level)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        count_tokens("quotagate")  # the tokenizer loads now, not on the first request
        await run_site(settings, open_store(settings.store), reuse_port, stop, tune_gc=True)

    asyncio.run(main())


def check_store(url: str) -> None:
    """Open the store once before the workers start: creates its schema, fails early if unreachable."""

    async def ping() -> None:
        store = open_store(url)
        try:
            await store.ping()
        finally:
            await store.close()

    asyncio.run(ping())


def serve(settings: Settings, announce: Callable[[str], None] = print) -> None:
    setup_logging(settings.log_level)
    try:
        check_store(settings.store)
    except StoreError as exc:
        log.warning("store not reachable at start (%s); serving with --on-store-error=%s", exc, settings.on_store_error)
    announce(
        f"quotagate listening on http://{settings.host}:{settings.port} "
        f"({settings.workers} worker{'s' if settings.workers > 1 else ''})"
    )
    announce(f"store: {redact_url(settings.store)}")
    if settings.workers == 1:
        run_worker(settings, reuse_port=False)
        return
    _supervise(settings)


def _supervise(settings: Settings) -> None:
    """Start the workers, replace one that dies, stop them all on SIGTERM or SIGINT."""
    context = multiprocessing.get_context("fork")

    def spawn() -> multiprocessing.process.BaseProcess:
        worker = context.Process(target=run_worker, args=(settings, True), daemon=False)
        worker.start()
        return worker

    workers = [spawn() for _ in range(settings.workers)]
    metrics.mark_dead(os.getpid())  # the supervisor serves nothing: its gauges must not count
    stopping = False

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.is_alive() and worker.pid:
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping:
        time.sleep(0.2)
        for index, worker in enumerate(workers):
            if not worker.is_alive() and not stopping:
                log.error("worker %s exited with %s; starting a new one", worker.pid, worker.exitcode)
                if worker.pid is not None:
                    metrics.mark_dead(worker.pid)
                workers[index] = spawn()
    for worker in workers:
        worker.join(timeout=70)
        if worker.pid is not None and not worker.is_alive():
            metrics.mark_dead(worker.pid)
