"""The CLI and `quotagate serve` as a user runs them: keys, workers, restarts, configuration."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import openai
import orjson
import pytest

from quotagate.config import Settings
from quotagate.fake_upstream import FakeUpstream

from .conftest import Gateway, cli, concurrent_calls, free_port, quotagate_command, stop_process, wait_ready


def test_keys_create_list_revoke(sqlite_url: str, tmp_path: Path) -> None:
    created = cli("keys", "create", "--name", "team-a", "--policy", "100;W=3600 ;s=User", "--store", sqlite_url)
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("qg_")
    assert "100;w=3600;s=user" in created.stderr  # stored in normal form
    listed = cli("keys", "list", "--store", sqlite_url).stdout
    assert "team-a" in listed and "100;w=3600;s=user" in listed and key not in listed
    secret = key.split("_", 2)[2]
    assert secret.encode() not in Path(sqlite_url[len("sqlite:///") :]).read_bytes()  # only a hash is kept
    assert "revoked" in cli("keys", "revoke", "team-a", "--store", sqlite_url).stdout
    assert "revoked" in cli("keys", "list", "--store", sqlite_url).stdout
    again = cli("keys", "revoke", "team-a", "--store", sqlite_url, check=False)
    assert again.returncode != 0 and "already revoked" in again.stderr


def test_keys_list_piped_shows_every_name_and_policy_whole(sqlite_url: str) -> None:
    """Piped or redirected (no terminal, rich's default 80 columns), `keys list` cuts nothing: a
    long name and its policies are whole, one line per key, so `keys list | grep NAME` finds it."""
    name = "production-backend-service-eu-west-1"
    policies = ["1000;w=86400;s=user", "500;w=2592000;u=cents;s=org"]
    created = cli("keys", "create", "--name", name, *(f"--policy={p}" for p in policies), "--store", sqlite_url)
    key_id = created.stdout.strip().splitlines()[-1].split("_")[1]
    env = {"COLUMNS": ""}  # as a test runner or a pipe has it: no width given
    listed = cli("keys", "list", "--store", sqlite_url, env=env).stdout
    assert "…" not in listed
    row = [line for line in listed.splitlines() if name in line]
    assert len(row) == 1 and key_id in row[0] and ", ".join(policies) in row[0] and "active" in row[0]
    cli("keys", "revoke", name, "--store", sqlite_url)
    listed = cli("keys", "list", "--store", sqlite_url, env=env).stdout
    row = [line for line in listed.splitlines() if name in line]
    assert len(row) == 1 and "revoked" in row[0]


def test_keys_create_rejects_a_bad_policy(sqlite_url: str) -> None:
    result = cli("keys", "create", "--name", "x", "--policy", "5;w=5", "--store", sqlite_url, check=False)
    assert result.returncode != 0 and "outside 60..31536000" in result.stderr
    assert "x" not in cli("keys", "list", "--store", sqlite_url).stdout.split()


def test_revoked_key_gets_401_at_once(serve: Callable[..., Gateway], upstream: FakeUpstream) -> None:
    gateway = serve("--workers", "1")
    key = cli("keys", "create", "--name", "soon-gone", "--store", gateway.store_url).stdout.strip().splitlines()[-1]
    client = gateway.openai(key)
    assert client.models.list().data
    cli("keys", "revoke", "soon-gone", "--store", gateway.store_url)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert upstream.count() == 1


def test_two_workers_share_one_sqlite_file_exactly(serve: Callable[..., Gateway], upstream: FakeUpstream) -> None:
    gateway = serve("--workers", "2")
    key = gateway.key()
    statuses = concurrent_calls([gateway], key, "10;w=60", 60)
    assert statuses.count(200) == 10 and statuses.count(429) == 50
    assert upstream.count("/chat/completions") == 10
    logs = [orjson.loads(line) for line in gateway.log_lines() if line.startswith("{")]
    workers = {line["pid"] for line in logs if line["msg"].startswith("worker") and "listening" in line["msg"]}
    assert len(workers) == 2
    served = {line["pid"] for line in logs if line["logger"] == "quotagate.access"}
    assert served == workers  # the kernel spread the connections over both workers


def test_counts_survive_a_restart(serve: Callable[..., Gateway], upstream: FakeUpstream, sqlite_url: str) -> None:
    port = free_port()
    first = serve("--workers", "1", store_url=sqlite_url, port=port)
    key = first.key()
    assert concurrent_calls([first], key, "3;w=3600", 2) == [200, 200]
    assert first.process is not None
    stop_process(first.process)
    second = serve("--workers", "1", store_url=sqlite_url, port=port)
    assert sorted(concurrent_calls([second], key, "3;w=3600", 2)) == [200, 429]
    assert upstream.count() == 3


def test_default_store_is_in_the_user_data_directory(tmp_path: Path, upstream: FakeUpstream) -> None:
    port = free_port()
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "HOME": str(tmp_path)}
    env.pop("QUOTAGATE_STORE", None)
    process = subprocess.Popen(
        quotagate_command("serve", "--port", str(port), "--workers", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", process)
    finally:
        stop_process(process)
    output = process.stdout.read().decode() if process.stdout else ""
    database = tmp_path / "data" / "quotagate" / "quotagate.db"
    assert f"listening on http://127.0.0.1:{port}" in output
    assert f"sqlite:///{database}" in output
    assert database.exists()
    tables = {r[0] for r in sqlite3.connect(database).execute("SELECT name FROM sqlite_master")}
    assert {"keys", "counters"} <= tables


def test_flags_win_over_environment_over_config_file(
    serve: Callable[..., Gateway], upstream: FakeUpstream, tmp_path: Path
) -> None:
    file_port, env_port, flag_port = free_port(), free_port(), free_port()
    config = tmp_path / "quotagate.toml"
    config.write_text(
        f'port = {file_port}\nadmin_token = "from-file"\n[upstreams.local]\nbase_url = "{upstream.url}/local"\n'
    )
    env = {"QUOTAGATE_CONFIG": str(config), "QUOTAGATE_PORT": str(env_port)}
    process = subprocess.Popen(
        quotagate_command("serve", "--workers", "1", "--store", f"sqlite:///{tmp_path}/c.db"),
        env={**os.environ, **env},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(f"http://127.0.0.1:{env_port}", process)  # the environment beat the file
        gateway = Gateway(f"http://127.0.0.1:{env_port}", Settings(), f"sqlite:///{tmp_path}/c.db")
        with gateway.http() as http:
            response = http.get("/local/v1/models", headers={"Helicone-Auth": f"Bearer {gateway.key()}"})
            assert response.status_code == 200  # the file's upstream is there
            assert http.get("/admin/keys", headers={"Authorization": "Bearer from-file"}).status_code == 200
    finally:
        stop_process(process)
    gateway = serve("--workers", "1", port=flag_port, env=env)  # the fixture passes --port
    assert gateway.url.endswith(str(flag_port))
    assert upstream.received[0].path == "/local/v1/models"


def test_config_errors_name_the_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[upstreams.v1]\nbase_url = "http://x"\n')
    result = cli("serve", "--config", str(config), check=False)
    assert result.returncode != 0 and str(config) in result.stderr and "upstream name 'v1'" in result.stderr
    config.write_text("prot = 1\n")
    result = cli("serve", "--config", str(config), check=False)
    assert "unknown setting 'prot'" in result.stderr


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    result = cli("serve", "--on-store-error", "maybe", "--store", f"sqlite:///{tmp_path}/x.db", check=False)
    assert result.returncode != 0 and "on_store_error" in result.stderr
    result = cli("serve", "--store", "mysql://x", check=False)
    assert result.returncode != 0 and "unknown store URL" in result.stderr


def test_demo_shows_limits_at_work() -> None:
    result = cli("demo", "--calls", "5")
    lines = result.stdout.splitlines()
    statuses = [line.split()[3] for line in lines if line.startswith("call ")]
    assert statuses == ["200", "200", "200", "429", "429"]
    assert "Helicone-RateLimit-Remaining: 0" in result.stdout and "Retry-After:" in result.stdout


def test_a_worker_freezes_its_startup_objects_and_collects_young_garbage_less_often(tmp_path: Path) -> None:
    """A real worker (`run_worker`, as `serve` starts it), asked once it listens."""
    settings = f"Settings(port={free_port()}, store={f'sqlite:///{tmp_path}/gc.db'!r})"
    code = (
        "import gc, os, signal\n"
        "from quotagate.config import Settings\n"
        "from quotagate.server import run_worker\n"
        "default = gc.get_threshold()[0]\n"
        "def ready():\n"
        "    print(gc.get_freeze_count(), gc.get_threshold()[0], default, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        f"run_worker({settings}, reuse_port=False, ready=ready)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    frozen, young_threshold, default = map(int, result.stdout.split())
    assert frozen > 10_000  # modules, the price table, the tokenizer: out of the collector's sight
    assert young_threshold > default  # the youngest generation is collected less often than by default
