"""Security: keys kept only as salted keyed hashes; no secret in logs, metrics, error bodies or the
admin surface; no request can make the gateway call anything but its configured upstreams."""

from __future__ import annotations

import hashlib
import hmac
import logging
import socket
import sqlite3
from collections.abc import Callable, Iterator

import pytest

from quotagate.fake_upstream import BackgroundServer, FakeUpstream
from quotagate.server import JsonFormatter

from .conftest import CHAT, POLICY, Gateway, free_port

PROVIDER_KEY = "sk-provider-VERY-SECRET-0123456789"
ADMIN_TOKEN = "admin-token-VERY-SECRET-987"


def test_keys_are_stored_as_salted_keyed_hashes(gateway: Gateway, sqlite_url: str) -> None:
    first, second = gateway.key("one"), gateway.key("two")
    rows = (
        sqlite3.connect(gateway.store_url[len("sqlite:///") :])
        .execute("SELECT id, salt, digest FROM keys ORDER BY name")
        .fetchall()
    )
    salts = {bytes(r[1]) for r in rows}
    assert len(salts) == 2 and all(len(s) == 16 for s in salts)
    for raw, (key_id, salt, digest) in zip((first, second), rows, strict=True):
        secret = raw.split("_", 2)[2]
        assert raw.split("_")[1] == key_id
        assert bytes(digest) == hmac.new(bytes(salt), secret.encode(), hashlib.sha256).digest()
        assert bytes(digest) != hashlib.sha256(secret.encode()).digest()


@pytest.fixture
def evil(upstream: FakeUpstream) -> Iterator[FakeUpstream]:
    """A second server that must never be called."""
    fake = FakeUpstream()
    server = BackgroundServer(fake.app).start()
    fake.url = server.url
    yield fake
    server.stop()


def test_no_secret_in_logs_metrics_errors_or_admin_surface(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="quotagate")
    gateway = make_gateway(access_log=True, admin_token=ADMIN_TOKEN)
    dead = make_gateway(access_log=True, openai_base_url=f"http://127.0.0.1:{free_port()}", openai_api_key=PROVIDER_KEY)
    key = gateway.key("secretive", ["2;w=60"])
    key_id, secret = key.split("_")[1], key.split("_", 2)[2]
    forged = f"qg_{key_id}_{'x' * len(secret)}"
    seen: list[str] = []
    with gateway.http() as http:
        auth = {"Helicone-Auth": f"Bearer {key}", "Authorization": f"Bearer {PROVIDER_KEY}"}
        body = {"model": "gpt-4o-mini", "messages": CHAT}
        for headers in (
            auth,
            auth,
            auth,
            {**auth, POLICY: "bad"},
            {**auth, "Helicone-Auth": f"Bearer {forged}"},
            {**auth, "X-Fake-Status": "401"},
        ):
            seen.append(http.post("/v1/chat/completions", json=body, headers=headers).text)
        seen.append(http.get("/metrics").text)
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        for path in ("/admin/keys", "/admin/budgets", "/admin/denials", "/dashboard"):
            seen.append(http.get(path, headers=admin).text)
    with dead.http() as http:
        seen.append(http.get("/v1/models", headers={"Helicone-Auth": f"Bearer {dead.key()}"}).text)
        seen.append(http.get("/metrics").text)
    logged = "\n".join(JsonFormatter().format(record) for record in caplog.records)  # as written to stderr
    seen.append(logged)
    assert '"key": "secretive"' in logged  # the key's name is logged, and it is the only trace of it
    everything = "\n".join(seen)
    for secret_text in (key, secret, forged.split("_", 2)[2], PROVIDER_KEY, ADMIN_TOKEN):
        assert secret_text not in everything


def _raw(gateway: Gateway, request: bytes) -> int:
    port = int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = sock.recv(65536)
    return int(data.split(b" ", 2)[1])


def test_no_request_can_choose_the_upstream(gateway: Gateway, upstream: FakeUpstream, evil: FakeUpstream) -> None:
    key = gateway.key()
    evil_host = evil.url.split("//")[1]
    auth = f"Helicone-Auth: Bearer {key}\r\n".encode()
    requests = [
        b"GET " + evil.url.encode() + b"/v1/models HTTP/1.1\r\nHost: " + evil_host.encode() + b"\r\n" + auth,
        b"GET /v1/models HTTP/1.1\r\nHost: "
        + evil_host.encode()
        + b"\r\nX-Forwarded-Host: "
        + evil_host.encode()
        + b"\r\nForwarded: host="
        + evil_host.encode()
        + b"\r\n"
        + auth,
        b"GET /v1//" + evil_host.encode() + b"/v1/models HTTP/1.1\r\nHost: g\r\n" + auth,
        b"GET /v1/models@" + evil_host.encode() + b" HTTP/1.1\r\nHost: g\r\n" + auth,
        b"GET /v1/%2e%2e/../" + evil_host.encode() + b"/v1/models HTTP/1.1\r\nHost: g\r\n" + auth,
        b"GET /" + evil_host.encode() + b"/v1/models HTTP/1.1\r\nHost: g\r\n" + auth,
        b"GET /v1/models HTTP/1.1\r\nHost: g\r\nHelicone-Target-Url: " + evil.url.encode() + b"\r\n" + auth,
    ]
    statuses = [_raw(gateway, r + b"Connection: close\r\n\r\n") for r in requests]
    assert all(s in (200, 400, 404) for s in statuses), statuses
    assert statuses[4] == 404  # '..' segments would climb out of an upstream's path prefix: refused
    assert evil.count() == 0
    upstream_host = upstream.url.split("//")[1]
    assert all(r.headers["Host"] == upstream_host for r in upstream.received)
