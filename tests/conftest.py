"""Fixtures: the fake provider, gateways on real sockets, real stores, and the official SDKs.

Gateways run either in-process (a thread with its own event loop, so that the store's clock can
be injected) or as `quotagate serve` subprocesses (workers, restarts, the CLI).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx
import openai
import pytest
from anthropic import Anthropic
from anthropic.types import MessageParam
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletionMessageParam

from quotagate.config import Settings
from quotagate.fake_upstream import BackgroundServer, FakeUpstream
from quotagate.keys import create_key
from quotagate.server import PROXY, build_app
from quotagate.stores import Store, open_store

POLICY = "Helicone-RateLimit-Policy"
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello to the test suite"}]
CLAUDE: list[MessageParam] = [{"role": "user", "content": "Say hello to the test suite"}]


class FakeClock:
    """A store clock that tests move by hand: windows pass in microseconds, without sleeping."""

    def __init__(self, start: float | None = None) -> None:
        self.now = start if start is not None else float(int(time.time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def chat(client: OpenAI, model: str = "gpt-4o-mini", **headers: str) -> int:
    """One chat completion of CHAT (8 tokens at most) through the SDK: 200, or its error's status."""
    try:
        client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, extra_headers=headers or None)
        return 200
    except openai.APIStatusError as exc:
        return exc.status_code


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@dataclass
class Gateway:
    url: str
    settings: Settings
    store_url: str
    server: Any = None
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    keys: list[str] = field(default_factory=list)

    def key(self, name: str = "test", policies: list[str] | None = None) -> str:
        """Create a gateway key in this gateway's store; returns the raw key. An in-process gateway's
        own store object makes it, on the gateway's loop, as the admin API would: no new connections
        (a Cluster client's discovery, on a loaded machine, ran past its 1 s connect timeout)."""
        if self.server is not None:
            store = self.server.app[PROXY].store
            made = asyncio.run_coroutine_threadsafe(create_key(store, name, policies or []), self.server.loop)
            return str(made.result(timeout=30)[0])
        return new_key(self.store_url, name, policies or [])

    def openai(self, key: str, **headers: str) -> OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1",
            api_key="sk-client-provider-key",
            max_retries=0,
            default_headers={"Helicone-Auth": f"Bearer {key}", **headers},
        )

    def async_openai(self, key: str, **headers: str) -> AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1",
            api_key="sk-client-provider-key",
            max_retries=0,
            default_headers={"Helicone-Auth": f"Bearer {key}", **headers},
            http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=500)),
        )

    def anthropic(self, key: str, **headers: str) -> Anthropic:
        return anthropic.Anthropic(
            base_url=f"{self.url}/anthropic",
            api_key="sk-ant-client-key",
            max_retries=0,
            default_headers={"Helicone-Auth": f"Bearer {key}", **headers},
        )

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def log_lines(self) -> list[str]:
        return self.log_path.read_text().splitlines() if self.log_path and self.log_path.exists() else []


def new_key(store_url: str, name: str, policies: list[str]) -> str:
    async def make() -> str:
        store = open_store(store_url)
        try:
            return (await create_key(store, name, policies))[0]
        finally:
            await store.close()

    return str(run(make()))


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[tuple[FakeUpstream, BackgroundServer]]:
    fake = FakeUpstream()
    server = BackgroundServer(fake.app).start()
    yield fake, server
    server.stop()


@pytest.fixture
def upstream(upstream_server: tuple[FakeUpstream, BackgroundServer]) -> FakeUpstream:
    fake, server = upstream_server
    fake.reset()
    fake.url = server.url
    return fake


REDIS_BASE = os.environ.get("QUOTAGATE_TEST_REDIS", "redis://127.0.0.1:6379")
OWNER = "quotagate-test:owner"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis database of its own for this test session (claimed with SET NX, so that concurrent
    test sessions on one server never share one), emptied before each test that uses it."""
    import redis

    for db in range(1, 16):
        client = redis.Redis.from_url(f"{REDIS_BASE}/{db}", socket_connect_timeout=1)
        try:
            claimed = client.set(OWNER, os.getpid(), nx=True, ex=6 * 3600)
        except redis.RedisError as exc:
            pytest.fail(f"the behaviour suite needs Redis at {REDIS_BASE}: {exc}")
        if claimed:
            yield f"{REDIS_BASE}/{db}"
            client.flushdb()
            return
    pytest.fail(f"no free Redis database at {REDIS_BASE} (all of 1..15 are claimed by {OWNER})")


def flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    owner = client.get(OWNER)
    client.flushdb()
    if owner is not None:
        client.set(OWNER, owner, ex=6 * 3600)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'quotagate.db'}"


STORES = ["sqlite", "redis", "cluster"]


def empty_store(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> str:
    """The URL of an empty store of this kind: a new SQLite file, the session's Redis db, its Cluster."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'quotagate.db'}"
    if kind == "redis":
        url = str(request.getfixturevalue("redis_url"))
        flush_redis(url)
        return url
    cluster = request.getfixturevalue("redis_cluster")
    cluster.flush()
    return str(cluster.url)


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every store, for the behaviour suite: a SQLite file, a Redis server, a Redis Cluster."""
    return empty_store(request, request.param, tmp_path)


@pytest.fixture(params=["redis", "cluster"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The stores several gateway instances can share: a Redis server, a Redis Cluster."""
    return empty_store(request, request.param, tmp_path)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def gw(make_gateway: Callable[..., Gateway], store_url: str, clock: FakeClock) -> Gateway:
    """An in-process gateway on every store, with the store's clock in the test's hands."""
    return make_gateway(store_url=store_url, clock=clock)


def concurrent_calls(gateways: list[Gateway], key: str, policy: str, count: int) -> list[int]:
    """`count` concurrent chat completions spread round-robin over the gateways; their statuses."""
    clients = [g.async_openai(key, **{"Helicone-RateLimit-Policy": policy}) for g in gateways]

    async def one(client: AsyncOpenAI) -> int:
        try:
            await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT)
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    async def run() -> list[int]:
        try:
            return await asyncio.gather(*(one(clients[i % len(clients)]) for i in range(count)))
        finally:
            for client in clients:
                await client.close()

    return asyncio.run(run())


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real three-node Redis Cluster on free loopback ports, torn down after the session."""
    from .cluster import RedisCluster

    with RedisCluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
def make_gateway(upstream: FakeUpstream, tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """In-process gateways: `make_gateway(store_url=..., clock=..., **settings)`."""
    started: list[tuple[BackgroundServer, Store]] = []

    def make(store_url: str | None = None, clock: Callable[[], float] | None = None, **overrides: Any) -> Gateway:
        url = store_url or f"sqlite:///{tmp_path / 'gateway.db'}"
        values: dict[str, Any] = {
            "port": free_port(),
            "store": url,
            "workers": 1,
            "access_log": False,
            "openai_base_url": upstream.url,
            "anthropic_base_url": upstream.url,
        }
        values.update(overrides)
        settings = Settings(**values)
        store = open_store(url, clock)
        # as `quotagate serve` runs it: a handler whose client left is not cancelled
        server = BackgroundServer(build_app(settings, store), port=settings.port, handler_cancellation=False).start()
        started.append((server, store))
        return Gateway(server.url, settings, url, server=server)

    yield make
    for server, _ in started:
        server.stop()


@pytest.fixture
def gateway(make_gateway: Callable[..., Gateway]) -> Gateway:
    return make_gateway()


# --- `quotagate serve` as a subprocess ------------------------------------------------------------


def quotagate_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "quotagate", *args]


def cli(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        quotagate_command(*args), capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )
    if check and result.returncode != 0:
        raise AssertionError(f"quotagate {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def wait_ready(url: str, process: subprocess.Popen[bytes] | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"quotagate serve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"gateway at {url} did not become healthy")


def wait_listening(log_path: Path, workers: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = log_path.read_text(errors="replace").splitlines()
        if sum(1 for line in lines if line.startswith("{") and "listening on http" in line) >= workers:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {workers} workers listening after 30 s: {log_path.read_text()[-2000:]}")


@pytest.fixture
def serve(upstream: FakeUpstream, tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """`quotagate serve` subprocesses: `serve("--workers", "2", store_url=...)`."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(
        *args: str, store_url: str | None = None, port: int | None = None, env: dict[str, str] | None = None
    ) -> Gateway:
        port = port or free_port()
        url = store_url or f"sqlite:///{tmp_path / 'served.db'}"
        log_path = tmp_path / f"serve-{port}-{len(processes)}.log"
        command = quotagate_command(
            "serve",
            "--port",
            str(port),
            "--store",
            url,
            "--openai-base-url",
            upstream.url,
            "--anthropic-base-url",
            upstream.url,
            *args,
        )
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
            )
        processes.append(process)
        gateway_url = f"http://127.0.0.1:{port}"
        wait_ready(gateway_url, process)
        workers = int(args[args.index("--workers") + 1]) if "--workers" in args else 1
        wait_listening(log_path, workers)  # the port answers as soon as the first worker listens
        return Gateway(gateway_url, Settings(port=port, store=url), url, process=process, log_path=log_path)

    yield start
    for process in processes:
        stop_process(process)


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def have(command: str) -> bool:
    return shutil.which(command) is not None


def with_store(
    store_url: str, clock: Callable[[], float], body: Callable[[Store, str], Awaitable[None]], name: str = "test"
) -> None:
    """`body(store, key_id)` on a store opened with `clock`, with a new gateway key named `name`."""

    async def main() -> None:
        store = open_store(store_url, clock)
        try:
            _, key = await create_key(store, name, [])
            await body(store, key.id)
        finally:
            await store.close()

    asyncio.run(main())


def post_head(key: str, body: bytes, *extra: bytes) -> bytes:
    """A chat completion's request head, as raw bytes (for clients the SDKs cannot play)."""
    lines = [
        b"POST /v1/chat/completions HTTP/1.1",
        b"Host: gateway",
        b"Connection: close",
        b"Content-Type: application/json",
        f"Helicone-Auth: Bearer {key}".encode(),
        f"Content-Length: {len(body)}".encode(),
        *extra,
    ]
    return b"\r\n".join(lines) + b"\r\n"
