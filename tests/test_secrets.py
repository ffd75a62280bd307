"""Nothing leaks: a password in a store URL shows nowhere (responses, log lines, the start banner,
CLI errors); the admin token and provider keys are in no banner or log line of `quotagate serve`;
the SQLite file, its WAL and its folder are its owner's only."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from quotagate.fake_upstream import FakeUpstream
from quotagate.redact import redact_url
from quotagate.server import JsonFormatter

from .conftest import CHAT, Gateway, cli, free_port

SECRET = "s3cr3t-Store-Passw0rd"
ADMIN_TOKEN = "admin-token-NEVER-SHOWN-42"
PROVIDER_KEY = "sk-provider-NEVER-SHOWN-42"


def unreachable_urls() -> list[str]:
    port = free_port()  # nothing listens there
    return [
        f"redis://:{SECRET}@127.0.0.1:{port}/0",
        f"redis://default:{SECRET}@127.0.0.1:{port}/0",
        f"redis://127.0.0.1:{port}/0?password={SECRET}",
        f"rediss://:{SECRET}@127.0.0.1:{port}/0",
        f"redis+cluster://default:{SECRET}@127.0.0.1:{port}",
    ]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:pw@h/1", "redis://user:***@h/1"),
        ("redis://a-lone-token@h", "redis://***@h"),
        ("redis://u:p@ss/w?rd@h:1/0", "redis://u:***@h:1/0"),  # unescaped '@', '/' and '?' in a password
        ("rediss://h/0?ssl_password=pw&ssl_cert_reqs=none", "rediss://h/0?ssl_password=***&ssl_cert_reqs=none"),
        ("redis://h/0?socket_timeout=1&Password=pw", "redis://h/0?socket_timeout=1&Password=***"),
        ("sqlite:////var/lib/quotagate@2/q.db", "sqlite:////var/lib/quotagate@2/q.db"),
        ("sqlite:///q.db", "sqlite:///q.db"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_readyz_admin_and_logs_never_show_a_store_password(
    make_gateway: Callable[..., Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    for url in unreachable_urls():
        gateway = make_gateway(store_url=url, admin_token=ADMIN_TOKEN, access_log=True)
        with gateway.http() as http:
            ready = http.get("/readyz")
            assert ready.status_code == 503 and "***" in ready.json()["error"], ready.text
            admin = http.get("/admin/budgets", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert admin.status_code == 503 and "***" in admin.json()["error"]["message"]
            proxied = http.post(
                "/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": CHAT},
                headers={"Helicone-Auth": "Bearer qg_000000000000_x", "Helicone-RateLimit-Policy": "5;w=60"},
            )
            seen += [ready.text, admin.text, proxied.text]
    logged = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    assert "***" in logged
    assert SECRET not in "\n".join(seen) + logged


def test_serve_banner_and_log_lines_never_show_a_secret(serve: Callable[..., Gateway]) -> None:
    url = f"redis://default:{SECRET}@127.0.0.1:{free_port()}/0"
    gateway = serve("--workers", "1", "--admin-token", ADMIN_TOKEN, "--openai-api-key", PROVIDER_KEY, store_url=url)
    with gateway.http() as http:
        assert http.get("/readyz").status_code == 503
        assert http.get("/admin/keys", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 503
        http.get("/v1/models", headers={"Helicone-Auth": "Bearer qg_000000000000_x"})
    lines = gateway.log_lines()
    assert any(line.startswith("store: redis://default:***@127.0.0.1:") for line in lines), lines[:5]
    text = "\n".join(lines)
    assert "store not reachable at start" in text
    for secret in (SECRET, ADMIN_TOKEN, PROVIDER_KEY):
        assert secret not in text


@pytest.mark.parametrize(
    "args",
    [
        ("keys", "list"),
        ("keys", "create", "--name", "x"),
        ("keys", "revoke", "x"),
        ("usage",),
    ],
)
def test_cli_errors_never_show_a_store_password(args: tuple[str, ...]) -> None:
    for url in [*unreachable_urls()[:3], f"ftp://user:{SECRET}@host/db", f"sqlite://user:{SECRET}@host/x.db"]:
        result = cli(*args, "--store", url, check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0 and "***" in output, output
        assert SECRET not in output and "Traceback" not in output


def test_serve_with_a_bad_store_url_never_shows_its_password() -> None:
    for url in (f"ftp://user:{SECRET}@host/db", f"redis://:{SECRET}@host:99999999/0"):
        result = cli("serve", "--store", url, check=False)
        assert result.returncode == 2 and "***" in result.stderr, result.stderr
        assert SECRET not in result.stdout + result.stderr


# --- the SQLite file is its owner's only ----------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sqlite_file_wal_and_folder_are_the_owners_only(
    make_gateway: Callable[..., Gateway], tmp_path: Path, upstream: FakeUpstream
) -> None:
    folder = tmp_path / "fresh" / "quotagate"
    path = folder / "quotagate.db"
    url = f"sqlite:///{path}"
    cli("keys", "create", "--name", "first", "--store", url)  # a fresh process with the usual umask
    assert mode(path) == 0o600 and mode(folder) == 0o700
    gateway = make_gateway(store_url=url)
    key = gateway.key("second", ["100;w=60"])
    with gateway.http() as http:
        for _ in range(3):
            response = http.get("/v1/models", headers={"Helicone-Auth": f"Bearer {key}"})
            assert response.status_code == 200
    wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
    assert wal.exists() and shm.exists()
    assert (mode(path), mode(wal), mode(shm)) == (0o600, 0o600, 0o600)


def test_an_existing_readable_sqlite_file_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    sqlite3.connect(path).close()  # as earlier versions made it
    os.chmod(path, 0o644)
    cli("keys", "list", "--store", f"sqlite:///{path}")
    assert mode(path) == 0o600


def test_a_gateway_key_that_is_not_text_is_a_401(gateway: Gateway, upstream: FakeUpstream) -> None:
    key_id = gateway.key().split("_")[1]
    with gateway.http() as http:
        for raw in (b"Bearer qg_" + key_id.encode() + b"_\xff\xfe", b"Bearer qg_" + key_id.encode() + b"_\xc3\x28x"):
            response = http.get("/v1/models", headers={b"Helicone-Auth": raw})
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_gateway_key"
    assert upstream.count() == 0
