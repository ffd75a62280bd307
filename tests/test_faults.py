"""Faults: upstreams that reset, cut or garble a stream; a SQLite file locked by another process;
the gateway killed with SIGKILL under load. Nothing is lost, nobody is let in."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable

import openai
import orjson
import pytest

from quotagate.fake_upstream import FakeUpstream

from .conftest import CHAT, POLICY, Gateway, httpx, stop_process


def test_upstream_connection_reset_is_502_and_still_counts(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.key()
    with gateway.http() as http:
        response = http.get(
            "/v1/models", headers={"Helicone-Auth": f"Bearer {key}", POLICY: "2;w=60", "X-Fake-Reset": "1"}
        )
        assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_unreachable"
        assert response.headers["Helicone-RateLimit-Remaining"] == "1"  # the request unit was taken
        second = http.get("/v1/models", headers={"Helicone-Auth": f"Bearer {key}", POLICY: "2;w=60"})
    assert second.status_code == 200 and second.headers["Helicone-RateLimit-Remaining"] == "0"


def test_token_hold_is_released_when_the_upstream_resets(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.key()
    body = {"model": "gpt-4o-mini", "messages": CHAT, "max_tokens": 400}
    headers = {"Helicone-Auth": f"Bearer {key}", POLICY: "500;w=60;u=token"}
    with gateway.http() as http:
        assert http.post("/v1/chat/completions", json=body, headers={**headers, "X-Fake-Reset": "1"}).status_code == 502
        after = http.post("/v1/chat/completions", json={**body, "max_tokens": 2}, headers=headers)
    assert after.status_code == 200
    # nothing was charged for the failed call and its hold is gone: only this call's real cost counts
    used = after.json()["usage"]["total_tokens"]
    assert after.headers["Helicone-RateLimit-Remaining"] == str(500 - used)


def test_half_stream_is_not_passed_off_as_complete(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.key()
    client = gateway.openai(key, **{POLICY: "1000;w=60;u=token", "X-Fake-Cut-After": "3"})
    with pytest.raises(openai.APIConnectionError) as raised:
        list(client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=50, stream=True))
    assert incomplete(raised.value)
    # the cut call was charged its prompt's estimate (11 tokens) and the two words streamed before
    # the cut (" word0", " word1": 2 tokens each), and holds nothing
    with gateway.http() as http:
        response = http.get("/v1/models", headers={"Helicone-Auth": f"Bearer {key}", POLICY: "1000;w=60;u=token"})
    assert response.headers["Helicone-RateLimit-Remaining"] == str(1000 - 11 - 4)


def incomplete(exc: openai.APIConnectionError) -> bool:
    """The SDK's error says the gateway ended the chunked body short (no clean end passed off)."""
    cause = exc.__cause__
    return isinstance(cause, httpx.RemoteProtocolError) and "incomplete chunked read" in str(cause)


def test_malformed_sse_event_passes_through_and_usage_is_still_read(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.key()
    headers = {
        "Helicone-Auth": f"Bearer {key}",
        POLICY: "1000;w=60;u=token",
        "X-Fake-Garbage": "1",
        "X-Fake-Prompt-Tokens": "100",
        "X-Fake-Completion-Tokens": "3",
    }
    body = {  # max_tokens: without it the call holds default_max_tokens (4096), more than the quota
        "model": "gpt-4o-mini",
        "messages": CHAT,
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.Client(base_url=gateway.url) as http:
        with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            text = response.read()
        assert response.status_code == 200 and b"data: {not json at all" in text
        after = http.get("/v1/models", headers={"Helicone-Auth": f"Bearer {key}", POLICY: "1000;w=60;u=token"})
    assert after.headers["Helicone-RateLimit-Remaining"] == "897"  # 100 + 3 charged from the usage chunk


def test_stream_that_stalls_past_the_timeout_is_cut(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    """The provider stops after two events and never goes on (held until the test ends): the
    upstream timeout cuts the stream."""
    gateway = make_gateway(upstream_timeout=0.3)
    stall = {"X-Fake-Hold": "stalled", "X-Fake-Hold-After": "2"}
    client = gateway.openai(gateway.key(), **{POLICY: "1000;w=60;u=token"}, **stall)
    with pytest.raises(openai.APIConnectionError) as raised:
        list(client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=5, stream=True))
    upstream.release("stalled")
    assert incomplete(raised.value)


def test_stream_that_stalls_midway_past_the_timeout_is_cut_and_charged_what_streamed(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    """The upstream's idle timeout after the headers (`UpstreamIdle`, which replaces aiohttp's
    per-chunk `sock_read` timer): three events (role, " word0", " word1"), then silence."""
    gateway = make_gateway(upstream_timeout=0.3)
    key = gateway.key()
    steer = {"X-Fake-Hold": "stall", "X-Fake-Hold-After": "3"}
    client = gateway.openai(key, **{POLICY: "1000;w=60;u=token", **steer})
    texts = []
    with pytest.raises(openai.APIConnectionError) as raised:
        for chunk in client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=50, stream=True):
            texts.append(chunk.choices[0].delta.content or "")
    assert incomplete(raised.value) and "".join(texts) == " word0 word1"
    deadline = time.monotonic() + 10  # the gateway dropped its upstream connection (not kept for reuse)
    while not upstream.abandoned and time.monotonic() < deadline:
        time.sleep(0.01)
    assert upstream.abandoned == ["stall"]
    upstream.release("stall")
    # charged the prompt's estimate (11 tokens) and the two words streamed (2 tokens each)
    with gateway.http() as http:
        response = http.get("/v1/models", headers={"Helicone-Auth": f"Bearer {key}", POLICY: "1000;w=60;u=token"})
    assert response.headers["Helicone-RateLimit-Remaining"] == str(1000 - 11 - 4)


def test_stream_longer_than_the_timeout_with_shorter_gaps_completes(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    """The idle timeout is per gap, not per stream: 12 events 0.1 s apart under a 0.5 s timeout."""
    gateway = make_gateway(upstream_timeout=0.5)
    key = gateway.key()
    steer = {"X-Fake-Chunk-Delay": "0.1", "X-Fake-Completion-Tokens": "8"}
    client = gateway.openai(key, **{POLICY: "1000;w=60;u=token", **steer})
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=50, stream=True)
    texts = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(texts) == "".join(f" word{i}" for i in range(8))
    # the next call (on the upstream connection the stream used, back in the pool) still times out
    # before its headers: aiohttp's timer is set again for every request
    with gateway.http() as http:
        response = http.get("/v1/models", headers={"Helicone-Auth": f"Bearer {key}", "X-Fake-Delay": "2"})
    assert response.status_code == 504 and response.json()["error"]["code"] == "upstream_timeout"


def test_sqlite_file_locked_by_another_process(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream, sqlite_url: str
) -> None:
    """Another process holds an exclusive lock: requests wait for it (no error), then go through."""
    gateway = make_gateway(store_url=sqlite_url)
    key = gateway.key()
    path = sqlite_url[len("sqlite:///") :]
    locker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            f"db = sqlite3.connect({path!r}, isolation_level=None)\n"
            "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(1.5); db.execute('COMMIT')",
        ],
        stdout=subprocess.PIPE,
    )
    assert locker.stdout is not None and locker.stdout.readline() == b"locked\n"
    with gateway.http() as http:
        response = http.get("/v1/models", headers={"Helicone-Auth": f"Bearer {key}", POLICY: "5;w=60"})
    locker.wait(timeout=10)
    assert response.status_code == 200 and response.headers["Helicone-RateLimit-Remaining"] == "4"
    assert upstream.count() == 1


def test_sigkill_under_load_loses_nothing_but_calls_in_flight(
    serve: Callable[..., Gateway], upstream: FakeUpstream, sqlite_url: str
) -> None:
    """Request units are committed at admission: after a SIGKILL and a restart the counter holds
    every call a client saw admitted, plus at most the calls that were in flight."""
    gateway = serve("--workers", "2", store_url=sqlite_url)
    key = gateway.key()
    concurrency, admitted = 8, []
    client = gateway.async_openai(key, **{POLICY: "100000;w=3600", "X-Fake-Delay": "0.01"})

    async def worker(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await client.models.list()
                admitted.append(1)
            except (openai.APIConnectionError, openai.APIStatusError):
                return

    async def load() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(worker(stop)) for _ in range(concurrency)]
        while len(admitted) < 150:
            await asyncio.sleep(0.01)
        assert gateway.process is not None
        stop_process(gateway.process, signal.SIGKILL)
        stop.set()
        await asyncio.gather(*tasks)
        await client.close()

    asyncio.run(load())
    restarted = serve("--workers", "1", store_url=sqlite_url)
    with restarted.http() as http:
        response = http.get("/v1/models", headers={"Helicone-Auth": f"Bearer {key}", POLICY: "100000;w=3600"})
    counted = 100000 - int(response.headers["Helicone-RateLimit-Remaining"]) - 1
    assert len(admitted) <= counted <= len(admitted) + concurrency
    rows = sqlite3.connect(sqlite_url[len("sqlite:///") :]).execute("SELECT count(*) FROM counters").fetchone()
    assert rows[0] == 1  # one budget, found again as it was: the restart needed no repair step


def test_a_worker_that_dies_is_replaced(serve: Callable[..., Gateway], upstream: FakeUpstream) -> None:
    gateway = serve("--workers", "2")
    key = gateway.key()

    def workers() -> list[int]:
        lines = [orjson.loads(line) for line in gateway.log_lines() if line.startswith("{")]
        return [line["pid"] for line in lines if "listening on http" in line["msg"]]

    deadline = time.monotonic() + 20
    while len(workers()) < 2 and time.monotonic() < deadline:  # the port answers once one listens
        time.sleep(0.05)
    first = workers()
    assert len(first) == 2
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while len(workers()) < 3 and time.monotonic() < deadline:  # a real process has to start
        time.sleep(0.05)
    assert len(workers()) == 3 and workers()[2] not in first
    with gateway.http() as http:
        statuses = [http.get("/v1/models", headers={"Helicone-Auth": f"Bearer {key}"}).status_code for _ in range(20)]
    assert statuses == [200] * 20
