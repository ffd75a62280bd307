"""The aiohttp application, and `serve`: N worker processes sharing one port with SO_REUSEPORT.

Each worker is a whole gateway (event loop, store connection, upstream connection pool); the
kernel spreads incoming connections over them. The parent only starts, watches and stops them.
Since SO_REUSEPORT would let a second `serve` join a port silently, the parent first checks that
nothing listens there, and prints its banner only once every worker reports that it listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from typing import Any

from aiohttp import web
from yarl import URL

from . import metrics
from .accept import BACKLOG, EagerSite
from .config import Settings
from .connections import HTTP_LIMITS, GatewayRunner, HttpLimits, route_library_logs
from .pricing import load_prices
from .proxy import Proxy
from .redact import redact_url
from .stores import Store, StoreError, open_store
from .terminal import inert, json_inert
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

    A request frees almost all it allocates by reference counting, yet with CPython's defaults the
    collector runs often and full collections stall every request in flight (figures: bench/README.md).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)


class StartError(Exception):
    """The gateway cannot start; the message is one line that says why and what to do."""


def where(host: str, port: int) -> str:
    """host:port as a URL writes it ([::1]:8787 for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_error(host: str, port: int, exc: OSError) -> StartError:
    place = where(host, port)
    if exc.errno == errno.EADDRINUSE:
        return StartError(
            f"{place} is already in use: another quotagate or another program is listening there; "
            "stop it, or choose another --port"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return StartError(f"cannot listen on {place}: {host} is not an address of this machine (--host)")
    if exc.errno == errno.EACCES:
        return StartError(f"cannot listen on {place}: permission denied; choose another --port (1024 or above)")
    return StartError(f"cannot listen on {place}: {exc.strerror or exc}")


def check_port_free(host: str, port: int) -> None:
    """Refuse a port that something already listens on, before workers join it with SO_REUSEPORT
    (which lets a second process bind silently). The probe binds as a sole owner would: without
    SO_REUSEPORT, so any listener on an overlapping address refuses it (0.0.0.0 and 127.0.0.1, and
    :: in dual stack, overlap); with SO_REUSEADDR, so an earlier run's connections in TIME_WAIT do
    not count; IPv6 sockets IPv6-only, as asyncio binds them."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartError(f"cannot listen on {where(host, port)}: {exc.strerror} (--host)") from None
    for family, kind, proto, _name, address in dict.fromkeys(addresses):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise bind_error(host, port, exc) from None


START_LOCK_WAIT = 30.0
_start_lock: socket.socket | None = None  # closed by forked workers, which inherit it


@contextlib.contextmanager
def start_lock(port: int) -> Iterator[None]:
    """Held from the port check until every worker has bound, so that of two `quotagate serve`
    started at once on one port the second finds the first listening. Linux: an abstract Unix
    socket (per network namespace, as ports are; released when its process ends)."""
    global _start_lock
    if not sys.platform.startswith("linux"):
        yield  # elsewhere, two started in the same few milliseconds may still both pass the check
        return
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + START_LOCK_WAIT
    while True:
        try:
            lock.bind(f"\0quotagate-serve-port-{port}")
            break
        except OSError:  # another quotagate is starting on this port: wait until it listens
            if time.monotonic() > deadline:
                lock.close()
                raise StartError(
                    f"another quotagate has been starting on port {port} for {START_LOCK_WAIT:g} s; try again"
                ) from None
            time.sleep(0.05)
    _start_lock = lock
    try:
        yield
    finally:
        _start_lock = None
        lock.close()


async def start_fake_provider() -> tuple[web.AppRunner, str]:
    """The built-in fake provider on a loopback port of its own, for `--fake-provider`."""
    from .fake_upstream import FakeUpstream

    runner = web.AppRunner(FakeUpstream(record=False).app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def routed_to(settings: Settings, url: str) -> Settings:
    """The settings with every route's upstream at `url` (each base URL's path kept)."""
    moved = {
        name: replace(up, base_url=url + URL(up.base_url).raw_path.rstrip("/"))
        for name, up in settings.upstreams.items()
    }
    return replace(
        settings,
        openai_base_url=url + URL(settings.openai_base_url).raw_path.rstrip("/"),
        anthropic_base_url=url + URL(settings.anthropic_base_url).raw_path.rstrip("/"),
        upstreams=moved,
    )


async def run_site(
    settings: Settings,
    store: Store,
    reuse_port: bool,
    stop: asyncio.Event,
    tune_gc: bool = False,
    ready: Callable[[], None] = lambda: None,
) -> None:
    """Serve until `stop` is set; `ready` is called once the port is bound."""
    async with contextlib.AsyncExitStack() as stack:
        if settings.fake_provider:
            fake, url = await start_fake_provider()
            stack.push_async_callback(fake.cleanup)
            settings = routed_to(settings, url)
        runner = GatewayRunner(build_app(settings, store), access_log=None, handle_signals=False)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = EagerSite(runner, settings.host, settings.port, reuse_port=reuse_port, backlog=BACKLOG)
        try:
            await site.start()
        except OSError as exc:
            raise bind_error(settings.host, settings.port, exc) from None
        if tune_gc:  # a worker process of its own (not a gateway inside a test's process)
            settle_garbage_collector()
        log.info("worker %d listening on http://%s", os.getpid(), where(settings.host, settings.port))
        ready()
        await stop.wait()
        log.info("worker %d stopping: finishing requests in flight", os.getpid())
    log.info("worker %d stopped", os.getpid())


OPEN_FILES_WANTED = 16_384


def raise_open_file_limit() -> None:
    """The soft open-file limit raised toward the hard one, up to `OPEN_FILES_WANTED` (never
    lowered): a client connection and each call's upstream connection hold a descriptor each, and
    the soft limit of 1,024 many systems start with would bound a worker to ~450 client connections
    (`connections.connection_limit`), fewer than its default calls in flight. Not to the hard limit
    itself, often 1,048,576: the default connection bound follows this limit, and idle connections
    that many would be memory a client could take."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_WANTED)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, OSError, ValueError) as exc:  # not on this system: the limit stays
        log.debug("open-file limit left as it is: %s", exc)


def run_worker(settings: Settings, reuse_port: bool, ready: Callable[[], None] = lambda: None) -> None:
    """One worker process: its own event loop, store connection and upstream pool. Anything that
    stops it before it listens is a StartError."""
    setup_logging(settings.log_level)
    raise_open_file_limit()
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    listening = False

    def bound() -> None:
        nonlocal listening
        listening = True
        ready()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        count_tokens("quotagate")  # the tokenizer loads now, not on the first request
        load_prices()  # and so do the prices (done already in a worker `serve` forked)
        await run_site(settings, open_store(settings.store), reuse_port, stop, tune_gc=True, ready=bound)

    try:
        asyncio.run(main())
    except (StartError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if listening:
            raise
        log.debug("worker %d could not start", os.getpid(), exc_info=True)
        raise StartError(f"the gateway could not start: {type(exc).__name__}: {exc}") from exc


def check_store(url: str) -> None:
    """Open the store once before the workers start: creates its schema, fails early if unreachable."""

    async def ping() -> None:
        store = open_store(url)
        try:
            await store.ping()
        finally:
            await store.close()

    asyncio.run(ping())


def banner(settings: Settings) -> list[str]:
    """What `serve` prints once it listens: where, the routes and their upstreams, the store, the
    admin surface. Never a secret: URLs go through redact_url."""
    count = settings.workers
    lines = [f"quotagate listening on http://{where(settings.host, settings.port)} ({count} worker{'s' * (count > 1)})"]
    if settings.fake_provider:
        lines.append("FAKE PROVIDER: every route is answered by the built-in fake provider; no call reaches a provider")
    routes = {f"/{prefix}/...": upstream for prefix, upstream in settings.routes().items()}
    width = max(map(len, routes))
    for route, upstream in routes.items():
        url = inert(redact_url(upstream.base_url))
        target = f"the fake provider (instead of {url})" if settings.fake_provider else url
        lines.append(f"route {route.ljust(width)} -> {target}")
    lines.append(f"store: {inert(redact_url(settings.store))}")
    if settings.admin_token:
        lines.append(f"dashboard: http://{where(_reachable(settings.host), settings.port)}/dashboard")
    else:
        lines.append("admin surface off: start with --admin-token for the dashboard and /admin/")
    return lines


def _reachable(host: str) -> str:
    """An address a browser on this machine reaches a wildcard listener at."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _print(line: str) -> None:
    print(line, flush=True)


def serve(settings: Settings, announce: Callable[[str], None] = _print) -> None:
    """Run the gateway until SIGTERM or SIGINT; the banner once every worker listens. A port
    already served, or a worker that cannot start, is a StartError."""
    setup_logging(settings.log_level)
    try:
        check_store(settings.store)
    except StoreError as exc:
        log.warning("store not reachable at start (%s); serving with --on-store-error=%s", exc, settings.on_store_error)

    load_prices()  # once, before the workers fork: they share the table

    def ready() -> None:
        for line in banner(settings):
            announce(line)

    if settings.workers == 1:  # binds without SO_REUSEPORT: the bind itself refuses a busy port
        run_worker(settings, reuse_port=False, ready=ready)
        return
    Supervisor(settings).run(ready)


_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _forked_worker(settings: Settings, report: Connection) -> None:
    """A worker process: tells the supervisor it listens, or in one line why it cannot."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # blocked by the supervisor around the fork
    if _start_lock is not None:
        _start_lock.close()
    try:
        run_worker(settings, True, ready=lambda: report.send(LISTENING))
    except StartError as exc:
        report.send(str(exc))
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(1)


LISTENING = "listening"


@dataclass(slots=True)
class Worker:
    process: multiprocessing.process.BaseProcess
    report: Connection


class Supervisor:
    """Starts the workers and waits until each has bound the port, replaces one that dies, stops
    them all on SIGTERM or SIGINT. A worker that cannot start stops them all: a StartError."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.context = multiprocessing.get_context("fork")
        self.workers: list[Worker] = []
        self.stopping = False

    def run(self, ready: Callable[[], None]) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        metrics.mark_dead(os.getpid())  # the supervisor serves nothing: its gauges must not count
        try:
            with start_lock(self.settings.port):
                check_port_free(self.settings.host, self.settings.port)
                for _ in range(self.settings.workers):
                    self.workers.append(self.spawn())
                for worker in self.workers:
                    self.await_listening(worker)
            if not self.stopping:
                ready()
                self.watch()
        except BaseException:  # a worker that cannot start, or anything else: none is left behind
            self.stop()
            raise
        finally:
            self.join()

    def spawn(self) -> Worker:
        """A worker, forked with SIGTERM and SIGINT held back until it has its own handlers."""
        reader, writer = self.context.Pipe(duplex=False)
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            process = self.context.Process(target=_forked_worker, args=(self.settings, writer), daemon=False)
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        writer.close()
        return Worker(process, reader)

    def await_listening(self, worker: Worker) -> None:
        """Until the worker reports that it listens; its reason as a StartError if it cannot."""
        while not self.stopping:
            if not wait([worker.report, worker.process.sentinel], timeout=0.2):
                continue
            try:
                message = worker.report.recv() if worker.report.poll() else None
            except EOFError:
                message = None
            if message == LISTENING:
                return
            worker.process.join(timeout=5)
            raise StartError(message or f"a worker exited with status {worker.process.exitcode} before listening")

    def watch(self) -> None:
        """Replace a worker that exits, until stopped."""
        while not self.stopping:
            time.sleep(0.2)
            for index, worker in enumerate(self.workers):
                if not worker.process.is_alive() and not self.stopping:
                    log.error(
                        "worker %s exited with %s; starting a new one", worker.process.pid, worker.process.exitcode
                    )
                    if worker.process.pid is not None:
                        metrics.mark_dead(worker.process.pid)
                    worker.report.close()
                    self.workers[index] = self.spawn()
                    self.await_listening(self.workers[index])

    def stop(self, _signum: int | None = None, _frame: Any = None) -> None:
        self.stopping = True
        for worker in self.workers:
            if worker.process.is_alive() and worker.process.pid:
                os.kill(worker.process.pid, signal.SIGTERM)

    def join(self) -> None:
        for worker in self.workers:
            worker.process.join(timeout=70)
            if worker.process.pid is not None and not worker.process.is_alive():
                metrics.mark_dead(worker.process.pid)
