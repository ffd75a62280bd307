"""The first hour at the terminal, as a newcomer meets it: `quotagate serve` on a port already
served, its banner, `--fake-provider` and the README's quick start run as written."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anthropic
import httpx2 as httpx
import openai
import pytest

from quotagate.fake_upstream import FakeUpstream

from .conftest import CHAT, CLAUDE, Gateway, cli, free_port, quotagate_command, stop_process, wait_ready

README = Path(__file__).resolve().parent.parent / "README.md"
BUSY = "is already in use: another quotagate or another program is listening there; stop it, or choose another --port"


def serve_until_exit(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`quotagate serve` expected to stop by itself; killed (with its workers) if it does not."""
    process = subprocess.Popen(
        quotagate_command("serve", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"quotagate serve {' '.join(args)} did not exit: {out[-500:]} {err[-500:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def fresh_connection_calls(url: str, key: str, count: int) -> list[int]:
    """Each call on a new connection, so that the kernel picks a listener for every one."""
    statuses = []
    for _ in range(count):
        with httpx.Client(base_url=url, timeout=30) as client:
            statuses.append(client.get("/v1/models", headers={"Helicone-Auth": f"Bearer {key}"}).status_code)
    return statuses


def arrived(upstream: FakeUpstream, prefix: str) -> int:
    return sum(1 for r in upstream.received if r.path.startswith(prefix + "/"))


# --- item 6: a port already served -------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("127.0.0.1", "2"), ("127.0.0.1", "1")),
        (("127.0.0.1", "2"), ("127.0.0.1", "2")),
        (("127.0.0.1", "1"), ("127.0.0.1", "3")),
        (("0.0.0.0", "2"), ("127.0.0.1", "2")),
        (("127.0.0.1", "2"), ("0.0.0.0", "2")),
    ],
    ids=["2-then-1", "2-then-2", "1-then-3", "any-then-loopback", "loopback-then-any"],
)
def test_a_second_serve_on_a_served_port_is_refused_and_the_first_keeps_all_traffic(
    serve: Callable[..., Gateway], upstream: FakeUpstream, first: tuple[str, str], second: tuple[str, str]
) -> None:
    port = free_port()
    running = serve("--host", first[0], "--workers", first[1], "--openai-base-url", f"{upstream.url}/first", port=port)
    key = running.key()
    refused = serve_until_exit(
        *("--host", second[0], "--port", str(port), "--workers", second[1], "--store", running.store_url),
        *("--openai-base-url", f"{upstream.url}/second"),
    )
    assert refused.returncode == 1
    assert refused.stdout == ""  # no banner, no "listening"
    assert refused.stderr.splitlines() == [f"Error: {second[0]}:{port} {BUSY}"]
    assert fresh_connection_calls(running.url, key, 20) == [200] * 20
    assert (arrived(upstream, "/first"), arrived(upstream, "/second")) == (20, 0)


def test_of_two_serves_started_at_once_on_one_port_one_is_refused(tmp_path: Path) -> None:
    """Between a port check and the workers' binds lie a fork and a tokenizer load: two started at
    once must not both pass the check."""
    port = free_port()
    args = ("--port", str(port), "--workers", "2", "--store", f"sqlite:///{tmp_path}/x.db")
    both = [
        subprocess.Popen(
            quotagate_command("serve", *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    try:
        deadline = time.monotonic() + 60
        while all(p.poll() is None for p in both):
            assert time.monotonic() < deadline, "both are serving on one port"
            time.sleep(0.05)
        refused = next(p for p in both if p.poll() is not None)
        assert refused.returncode == 1
        assert refused.communicate()[1].decode().splitlines() == [f"Error: 127.0.0.1:{port} {BUSY}"]
        serving = next(p for p in both if p is not refused)
        wait_ready(f"http://127.0.0.1:{port}", serving)
    finally:
        for process in both:
            stop_process(process)


def test_a_port_another_program_listens_on_is_refused(tmp_path: Path) -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):  # another program, without SO_REUSEPORT
        for workers in ("1", "2"):
            refused = serve_until_exit(
                "--port", str(port), "--workers", workers, "--store", f"sqlite:///{tmp_path}/x.db"
            )
            assert refused.returncode == 1 and refused.stdout == ""
            assert refused.stderr.splitlines() == [f"Error: 127.0.0.1:{port} {BUSY}"]


def test_a_served_ipv6_port_is_refused(tmp_path: Path) -> None:
    if not socket.has_ipv6 or not Path("/proc/net/if_inet6").exists():
        pytest.skip("no IPv6 on this machine")
    port, store = free_port(), f"sqlite:///{tmp_path}/x.db"
    first = subprocess.Popen(
        quotagate_command("serve", "--host", "::1", "--port", str(port), "--workers", "2", "--store", store),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_ready(f"http://[::1]:{port}", first)
        refused = serve_until_exit("--host", "::1", "--port", str(port), "--workers", "2", "--store", store)
        assert refused.returncode == 1 and refused.stderr.splitlines() == [f"Error: [::1]:{port} {BUSY}"]
        assert first.poll() is None
    finally:
        stop_process(first)


def test_a_restart_on_the_same_port_starts(serve: Callable[..., Gateway], upstream: FakeUpstream) -> None:
    """Connections the stopped instance closed linger in TIME_WAIT: they do not make the port busy."""
    port = free_port()
    before = serve("--workers", "2", port=port)
    key = before.key()
    assert before.process is not None
    with before.http() as client:  # a keep-alive connection, closed by the gateway as it stops
        for _ in range(5):
            assert client.get("/v1/models", headers={"Helicone-Auth": f"Bearer {key}"}).status_code == 200
        stop_process(before.process)
    assert time_wait_on(port)
    after = serve("--workers", "2", port=port)
    assert fresh_connection_calls(after.url, key, 3) == [200] * 3


def time_wait_on(port: int) -> bool:
    """Whether a connection from this local port is in TIME_WAIT (Linux's /proc/net/tcp, state 06)."""
    rows = [line.split() for name in ("tcp", "tcp6") for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]]
    return any(int(row[1].rsplit(":", 1)[1], 16) == port and row[3] == "06" for row in rows)


def banner_and_workers_bound(log: Path, timeout: float = 30) -> tuple[list[str], int]:
    """Waits for the banner's first line; the output until then, and how many workers had logged
    that they listen before it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = log.read_text(errors="replace").splitlines()
        for index, line in enumerate(lines):
            if line.startswith("quotagate listening on"):
                return lines, sum(
                    1 for earlier in lines[:index] if '"msg": "worker' in earlier and "listening" in earlier
                )
        time.sleep(0.01)
    raise AssertionError(f"no banner: {log.read_text()[-2000:]}")


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_listening_is_announced_once_every_worker_has_bound(tmp_path: Path, workers: int) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            quotagate_command(
                "serve", "--port", str(port), "--workers", str(workers), "--store", f"sqlite:///{tmp_path}/x.db"
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _, bound = banner_and_workers_bound(log)
        assert bound == workers
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the port accepts at once
    finally:
        stop_process(process)


def test_a_worker_that_cannot_start_stops_serve_with_its_reason(serve: Callable[..., Gateway]) -> None:
    """Both workers die while the supervisor is stopped, and another program takes the port: the
    replacements cannot bind, and serve exits with their reason instead of retrying forever."""
    port = free_port()
    gateway = serve("--workers", "2", port=port)
    assert gateway.process is not None
    pids = {int(m) for m in re.findall(r'"msg": "worker (\d+) listening', "\n".join(gateway.log_lines()))}
    assert len(pids) == 2
    os.kill(gateway.process.pid, signal.SIGSTOP)
    try:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        other = socket.socket()
        deadline = time.monotonic() + 10
        while True:
            try:
                other.bind(("127.0.0.1", port))  # free once the kernel has closed the workers' sockets
                break
            except OSError:
                assert time.monotonic() < deadline, "the killed workers' sockets never closed"
                time.sleep(0.005)
        other.listen()
    finally:
        os.kill(gateway.process.pid, signal.SIGCONT)
    with other:
        assert gateway.process.wait(timeout=30) == 1
    assert gateway.log_lines()[-1] == f"Error: 127.0.0.1:{port} {BUSY}"


# --- item 9: the banner ------------------------------------------------------------------------


def banner(gateway: Gateway) -> list[str]:
    return [line for line in gateway.log_lines() if not line.startswith("{")]


def test_the_banner_names_routes_store_and_dashboard_and_no_secret(
    serve: Callable[..., Gateway], upstream: FakeUpstream, tmp_path: Path, redis_url: str
) -> None:
    config = tmp_path / "quotagate.toml"
    config.write_text(
        f'[upstreams.local]\nbase_url = "{upstream.url}/local"\n'
        '[upstreams.partner]\nbase_url = "https://svc:hunter2@partner.example/api?api_token=tok-secret"\n'
    )
    port, secret_store = free_port(), redis_url.replace("redis://", "redis://default:s3cret-pass@")
    gateway = serve(
        "--workers", "2", "--config", str(config), "--admin-token", "adm-tok", store_url=secret_store, port=port
    )
    assert banner(gateway) == [
        f"quotagate listening on http://127.0.0.1:{port} (2 workers)",
        f"route /v1/...        -> {upstream.url}",
        f"route /anthropic/... -> {upstream.url}",
        f"route /local/...     -> {upstream.url}/local",
        "route /partner/...   -> https://svc:***@partner.example/api?api_token=***",
        f"store: {secret_store.replace('s3cret-pass', '***')}",
        f"dashboard: http://127.0.0.1:{port}/dashboard",
    ]
    output = "\n".join(gateway.log_lines())
    assert not {"s3cret-pass", "hunter2", "tok-secret", "adm-tok"} & set(re.findall(r"[\w-]+", output))


def test_the_banner_says_the_admin_surface_is_off_and_the_fake_provider_is_on(
    serve: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    port = free_port()
    gateway = serve("--workers", "1", "--fake-provider", port=port)
    assert banner(gateway) == [
        f"quotagate listening on http://127.0.0.1:{port} (1 worker)",
        "FAKE PROVIDER: every route is answered by the built-in fake provider; no call reaches a provider",
        f"route /v1/...        -> the fake provider (instead of {upstream.url})",
        f"route /anthropic/... -> the fake provider (instead of {upstream.url})",
        f"store: {gateway.store_url}",
        "admin surface off: start with --admin-token for the dashboard and /admin/",
    ]


# --- item 7: --fake-provider -------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
def test_fake_provider_answers_every_route(
    serve: Callable[..., Gateway], upstream: FakeUpstream, tmp_path: Path, workers: str
) -> None:
    config = tmp_path / "quotagate.toml"
    config.write_text('[upstreams.groq]\nbase_url = "https://api.groq.com/openai"\n')
    gateway = serve("--workers", workers, "--fake-provider", "--config", str(config))
    key = gateway.key()
    policy = {"Helicone-RateLimit-Policy": "4;w=60"}
    for _ in range(2):
        reply = gateway.openai(key, **policy).chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=CHAT
        )
        assert reply.headers["X-Fake-Upstream"] == "1" and reply.parse().usage is not None
    message = gateway.anthropic(key, **policy).messages.create(model="claude-haiku-4-5", max_tokens=5, messages=CLAUDE)
    assert message.usage.output_tokens == 5
    groq = openai.OpenAI(
        base_url=f"{gateway.url}/groq/v1",
        api_key="gsk-any",
        max_retries=0,
        default_headers={"Helicone-Auth": f"Bearer {key}", **policy},
    )
    assert groq.chat.completions.create(model="llama-3.3-70b-versatile", messages=CHAT).usage is not None
    with pytest.raises(anthropic.RateLimitError):  # counted and limited like real calls: 4 a minute
        gateway.anthropic(key, **policy).messages.create(model="claude-haiku-4-5", max_tokens=5, messages=CLAUDE)
    assert upstream.count() == 0  # the configured upstreams (the test's fake) never see a call


def test_fake_upstream_module_has_a_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "quotagate.fake_upstream", "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and result.stderr == ""
    assert "quotagate serve --fake-provider" in " ".join(result.stdout.split())
    bad = subprocess.run(
        [sys.executable, "-m", "quotagate.fake_upstream", "nope"], capture_output=True, text=True, timeout=30
    )
    assert bad.returncode == 2 and "invalid int value: 'nope'" in bad.stderr and "Traceback" not in bad.stderr


# --- the README's quick start, as written --------------------------------------------------------


def quick_start() -> list[tuple[str, str]]:
    """The fenced blocks of the README's "Quick start" section, in order: (language, text)."""
    section = README.read_text().split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```(\w+)\n(.*?)^```$", section, re.S | re.M)


def normal(output: str) -> list[str]:
    """Output lines with the seconds that depend on the clock's position in its second blanked."""
    return [re.sub(r"(Reset|Retry-After): \d+", r"\1: N", line) for line in output.strip().splitlines()]


@pytest.fixture
def newcomer(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], int]]:
    """A folder with `.venv` (this test run's), a home of its own (so a default store of its
    own), a free port as the default one, no QUOTAGATE_* variable."""
    folder = tmp_path / "quotagate"
    folder.mkdir()
    (folder / ".venv").symlink_to(Path(sys.executable).parent.parent)
    assert (folder / ".venv" / "bin" / "quotagate").exists()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
    env.update(HOME=str(tmp_path / "home"), XDG_DATA_HOME=str(tmp_path / "home" / "data"))
    yield folder, env, port


def test_the_readme_quick_start_runs_as_written(newcomer: tuple[Path, dict[str, str], int]) -> None:
    folder, env, port = newcomer
    blocks = quick_start()
    (kind, start), *rest = blocks
    assert kind == "sh" and start.strip() == ".venv/bin/quotagate serve --fake-provider"
    server = subprocess.Popen(
        ["bash", "-c", start], cwd=folder, env={**env, "QUOTAGATE_PORT": str(port)}, start_new_session=True
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", server)
        script, expected = ["set -euo pipefail"], []
        for kind, text in rest:
            if kind == "python":
                name = text.splitlines()[0].removeprefix("# ")
                assert "127.0.0.1:8787" in text
                (folder / name).write_text(text.replace("127.0.0.1:8787", f"127.0.0.1:{port}"))
            elif kind == "sh":
                script.append(text)
            else:
                assert kind == "text"
                expected.append(text)
        assert len(expected) == 2 and len(script) == 4
        result = subprocess.run(
            ["bash", "-c", "\n".join(script)], cwd=folder, env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert normal(result.stdout) == normal("".join(expected))
        assert "created key 'quickstart'" in result.stderr
    finally:
        stop_process(server)


# --- item 8: the CLI -----------------------------------------------------------------------------


def test_settings_with_fixed_values_are_usage_errors(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/x.db"
    result = cli("serve", "--log-level", "loud", "--store", store, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        "Error: Invalid value for '--log-level': 'loud' is not one of 'debug', 'info', 'warning', 'error' "
        "(the log_level setting)"
    )
    assert "Traceback" not in result.stderr
    for name, choices in FIXED.items():
        flag = "--" + name.replace("_", "-")
        listed = ", ".join(repr(c) for c in choices)
        by_flag = cli("serve", flag, "nonsense", "--store", store, check=False)
        assert by_flag.returncode == 2
        refusal = f"Error: Invalid value for '{flag}': 'nonsense' is not one of {listed} (the {name} setting"
        assert by_flag.stderr.splitlines()[-1] == refusal + ")"
        by_env = cli("serve", "--store", store, env={f"QUOTAGATE_{name.upper()}": "nonsense"}, check=False)
        assert by_env.returncode == 2
        assert by_env.stderr.splitlines()[-1] == f"{refusal}, from QUOTAGATE_{name.upper()})"
        config = tmp_path / f"{name}.toml"
        config.write_text(f'{name} = "nonsense"\n')
        by_file = cli("serve", "--config", str(config), "--store", store, check=False)
        assert by_file.returncode == 2 and by_file.stderr.splitlines()[-1] == (
            f"Error: Invalid value for '--config': config file {config}: {name} must be one of {listed}, not 'nonsense'"
        )


FIXED = {"log_level": ("debug", "info", "warning", "error"), "on_store_error": ("open", "closed")}


def test_every_setting_with_fixed_values_is_declared_with_them() -> None:
    from dataclasses import fields

    from quotagate.config import Settings

    declared = {f.name: f.metadata["choices"] for f in fields(Settings) if f.metadata.get("choices")}
    assert FIXED.items() <= declared.items()
    assert Settings(log_level="WARNING", on_store_error="Closed").log_level == "warning"


def test_serve_takes_a_level_in_any_case(serve: Callable[..., Gateway]) -> None:
    gateway = serve("--workers", "1", "--log-level", "INFO")  # the fixture waits for its info lines
    assert banner(gateway)[0].startswith("quotagate listening on")


def test_every_command_lists_its_subcommands_help_whole() -> None:
    import click

    from quotagate.cli import main

    groups: list[tuple[tuple[str, ...], click.Group]] = [((), main)]
    groups += [((name,), command) for name, command in main.commands.items() if isinstance(command, click.Group)]
    for path, group in groups:
        output = cli(*path, "--help", env={"COLUMNS": "80"}).stdout
        listing = output.split("Commands:\n", 1)[1]
        assert "..." not in listing
        for name, command in group.commands.items():
            text = command.short_help or (command.help or "").split("\n\n")[0]
            assert " ".join(text.split()) in " ".join(listing.split()), name
            assert len(text) <= 80 - 6 - max(map(len, group.commands)), f"{name}: wraps at 80 columns"


def test_keys_revoke_of_a_revoked_key_says_it_is_already_revoked(sqlite_url: str) -> None:
    cli("keys", "create", "--name", "team-a", "--store", sqlite_url)
    key_id = cli("keys", "revoke", "team-a", "--store", sqlite_url).stdout.split("(id ")[1].rstrip(")\n")
    for name_or_id in ("team-a", key_id):
        again = cli("keys", "revoke", name_or_id, "--store", sqlite_url, check=False)
        assert again.returncode == 1 and again.stdout == ""
        assert again.stderr.splitlines() == [f"Error: key 'team-a' ({key_id}) is already revoked"]
    unknown = cli("keys", "revoke", "team-b", "--store", sqlite_url, check=False)
    assert unknown.returncode == 1 and unknown.stderr.splitlines() == ["Error: no key with id or name 'team-b'"]


def test_demo_removes_its_folder(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    result = cli("demo", "--calls", "2", env={"TMPDIR": str(temp)})
    assert f"store sqlite:///{temp}/quotagate-demo-" in result.stdout
    assert not list(temp.glob("quotagate-demo-*"))


def test_demo_removes_its_folder_on_ctrl_c(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    process = subprocess.Popen(
        quotagate_command("demo", "--calls", "1000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TMPDIR": str(temp)},
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("call 2:"):
            break
    assert list(temp.glob("quotagate-demo-*"))  # there while it runs
    process.send_signal(signal.SIGINT)
    output = process.stdout.read()
    assert process.wait(timeout=30) == 1 and output.splitlines()[-1] == "Aborted!"
    assert not list(temp.glob("quotagate-demo-*"))


LONG_KEY = "usage-b426b37c-5d1e-4c1a-9f0e-2b8e6c1d7a90"
LONG_USER = "alice-" + "0123456789abcdef" * 4
POLICIES = {
    "1;w=120": "1 request / 2 minutes",
    "12;w=3600;s=user": "12 requests / hour",
    "2;w=90": "2 requests / 90 seconds",
    "3;w=172800": "3 requests / 2 days",
    "2000;w=7200;u=token;s=user": "2,000 tokens / 2 hours",
    "1;w=86400;u=cents": "1¢ / day",
    "500;w=2592000;u=cents": "$5.00 / 30 days",
}


def seed_usage(gateway: Gateway) -> None:
    client = gateway.openai(
        gateway.key(LONG_KEY), **{"Helicone-RateLimit-Policy": ", ".join(POLICIES), "Helicone-User-Id": LONG_USER}
    )
    client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=8)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=8)


def usage_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR", "TERM")}
    return {**env, "TERM": "xterm-256color"}


def test_usage_writes_units_and_windows_in_singular_and_plural(gateway: Gateway) -> None:
    seed_usage(gateway)
    output = subprocess.run(
        quotagate_command("usage", "--store", gateway.store_url), capture_output=True, text=True, env=usage_env()
    ).stdout
    assert sorted(text for text in POLICIES.values() if text in output) == sorted(POLICIES.values())
    assert "1 requests" not in output and "1 tokens" not in output


def test_usage_piped_into_grep_finds_whole_ids(gateway: Gateway) -> None:
    seed_usage(gateway)
    command = " ".join(quotagate_command("usage", "--store", gateway.store_url)) + f" | grep {LONG_USER}"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=usage_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:3] == [LONG_KEY, "user", LONG_USER]  # awk's $1, $2, $3
    whole = subprocess.run(
        quotagate_command("usage", "--store", gateway.store_url), capture_output=True, text=True, env=usage_env()
    ).stdout
    assert "…" not in whole and all(text in whole for text in POLICIES.values())


def on_terminal(args: list[str], columns: int) -> list[str]:
    """The lines a command writes to a real terminal (a pty) `columns` wide, colours removed."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    process = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=usage_env())
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other end is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert process.wait(timeout=30) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode())
    return text.replace("\r\n", "\n").splitlines()


def test_usage_on_an_80_column_terminal_keeps_policies_whole(gateway: Gateway) -> None:
    from rich.cells import cell_len

    seed_usage(gateway)
    lines = on_terminal(quotagate_command("usage", "--store", gateway.store_url), 80)
    table = "\n".join(lines)
    assert all(text in table for text in POLICIES.values()), table
    assert max(cell_len(line) for line in lines) <= 80
    assert "…" in table  # the long key and user id were shortened instead
    wide = "\n".join(on_terminal(quotagate_command("usage", "--store", gateway.store_url), 240))
    assert LONG_KEY in wide and LONG_USER in wide and "████" in wide
