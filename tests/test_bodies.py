"""Request bodies: what is forwarded is what was metered (compressed bodies are inflated, then
forwarded plain), a zip bomb is a 413, and a worker bounds the calls and body bytes it holds."""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable

import httpx2 as httpx
import orjson
import pytest

from quotagate.fake_upstream import FakeUpstream

from .conftest import CHAT, POLICY, Gateway

BODY = {"model": "gpt-4o-mini", "messages": CHAT, "max_tokens": 2, "user": "alice"}


def post(gateway: Gateway, key: str, content: bytes, **headers: str) -> httpx.Response:
    with gateway.http() as http:
        return http.post(
            "/v1/chat/completions",
            content=content,
            headers={"Helicone-Auth": f"Bearer {key}", "Content-Type": "application/json", **headers},
        )


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("GZip", gzip.compress), ("deflate", zlib.compress), ("identity", bytes)],
)
def test_a_compressed_body_is_metered_and_forwarded_inflated(
    gateway: Gateway, upstream: FakeUpstream, encoding: str, compress: Callable[[bytes], bytes]
) -> None:
    """The user id read from the inflated body segments the budget; the upstream gets that body,
    without the Content-Encoding that no longer describes it."""
    key = gateway.key()
    raw = orjson.dumps(BODY)
    for expected in (200, 429):
        response = post(gateway, key, compress(raw), **{"Content-Encoding": encoding, POLICY: "1;w=60;s=user"})
        assert response.status_code == expected
    assert upstream.count() == 1
    received = upstream.received[0]
    assert received.body == raw
    assert "Content-Encoding" not in received.headers


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, gzip", "x-gzip", "compress", "unknown"])
def test_a_body_in_an_encoding_the_gateway_does_not_inflate_is_refused(
    gateway: Gateway, upstream: FakeUpstream, encoding: str
) -> None:
    response = post(gateway, gateway.key(), gzip.compress(orjson.dumps(BODY)), **{"Content-Encoding": encoding})
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_content_encoding"
    assert upstream.count() == 0


def test_a_gzip_that_is_not_gzip_is_400(gateway: Gateway, upstream: FakeUpstream) -> None:
    response = post(gateway, gateway.key(), b"\x1f\x8b not really gzip", **{"Content-Encoding": "gzip"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_body"
    assert upstream.count() == 0


def test_a_small_gzip_that_inflates_past_the_limit_is_413(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    gateway = make_gateway(max_body_bytes=1024 * 1024)
    bomb = gzip.compress(b" " * (256 * 1024 * 1024), compresslevel=9)  # 256 MiB in about 250 KB
    assert len(bomb) < 1024 * 1024
    response = post(gateway, gateway.key(), bomb, **{"Content-Encoding": "gzip"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert upstream.count() == 0


# --- calls in flight ------------------------------------------------------------------------------


def held_calls(gateway: Gateway, key: str, count: int, hold: str, body: bytes) -> list[threading.Thread]:
    """`count` calls the fake upstream holds until `release(hold)`; returns their threads."""
    statuses: list[int] = []

    def call() -> None:
        statuses.append(post(gateway, key, body, **{"X-Fake-Hold": hold, POLICY: "10;w=60"}).status_code)

    threads = [threading.Thread(target=call) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def wait_received(upstream: FakeUpstream, count: int) -> None:
    deadline = time.monotonic() + 10
    while upstream.count() < count:
        assert time.monotonic() < deadline, f"the upstream received {upstream.count()} of {count} calls"
        time.sleep(0.01)


def test_a_call_beyond_the_calls_in_flight_is_503_and_not_counted(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    gateway = make_gateway(max_in_flight=2)
    key = gateway.key()
    threads = held_calls(gateway, key, 2, "full", orjson.dumps(BODY))
    wait_received(upstream, 2)
    busy = post(gateway, key, orjson.dumps(BODY), **{POLICY: "10;w=60"})
    assert busy.status_code == 503
    assert busy.headers["Retry-After"] == "1"
    assert busy.json()["error"]["code"] == "gateway_busy"
    assert "Helicone-RateLimit-Remaining" not in busy.headers  # before admission: nothing counted
    upstream.release("full")
    for thread in threads:
        thread.join()
    after = post(gateway, key, orjson.dumps(BODY), **{POLICY: "10;w=60"})
    assert after.status_code == 200
    assert after.headers["Helicone-RateLimit-Remaining"] == "7"  # the two held calls and this one
    assert upstream.count() == 3


def test_body_bytes_beyond_the_worker_bound_are_503_and_not_forwarded(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    gateway = make_gateway(max_body_bytes=100_000, max_in_flight_bytes=150_000)
    key = gateway.key()
    big = orjson.dumps({**BODY, "messages": [{"role": "user", "content": "x" * 80_000}]})
    threads = held_calls(gateway, key, 1, "bytes", big)
    wait_received(upstream, 1)
    busy = post(gateway, key, big, **{POLICY: "10;w=60"})  # 80 KB more than the worker may hold
    assert (busy.status_code, busy.json()["error"]["code"]) == (503, "gateway_busy")
    chunked = post(gateway, key, gzip.compress(big), **{POLICY: "10;w=60", "Content-Encoding": "gzip"})
    assert chunked.status_code == 503  # 80 KB once inflated, though it declares a few hundred bytes
    small = post(gateway, key, orjson.dumps(BODY), **{POLICY: "10;w=60"})
    assert small.status_code == 200  # a small body still fits beside the held one
    upstream.release("bytes")
    for thread in threads:
        thread.join()
    assert post(gateway, key, big, **{POLICY: "10;w=60"}).status_code == 200
    assert upstream.count() == 3
