"""`quotagate usage` as an operator runs it, against the store a real gateway has been counting in."""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time

from .conftest import POLICY, Gateway, chat, cli, quotagate_command

WIDE = {"COLUMNS": "200"}  # rich sizes its table to the terminal; a pipe has none


def table_rows(output: str) -> list[list[str]]:
    """The table's data lines, split on runs of spaces (header and title left out)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("key "))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))  # recent denials below
    return [line.split() for line in lines[start + 1 : end] if not line.startswith(("no ", "("))]


def denial_rows(output: str) -> list[list[str]]:
    """The lines of the recent denials block, under its title and header."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("recent denials")), None)
    return [] if start is None else [line.split() for line in lines[start + 2 :] if line.strip()]


def seed(gateway: Gateway) -> None:
    support = gateway.openai(gateway.key("support-bot"), **{POLICY: "5;w=3600;s=user, 100;w=60"})
    for user, calls in (("alice", 6), ("bob", 2)):
        for _ in range(calls):
            chat(support, **{"Helicone-User-Id": user})
    partner = gateway.openai(gateway.key("partner"), **{POLICY: "10;w=60;s=org"})
    for _ in range(9):
        assert chat(partner, **{"Helicone-Property-Org": "acme"}) == 200


def test_usage_table(gateway: Gateway) -> None:
    seed(gateway)
    output = cli("usage", "--store", gateway.store_url, env=WIDE).stdout
    assert "4 budgets in use" in output and "2 at 80 % or more" in output
    rows = [" ".join(r) for r in table_rows(output)]
    assert [r.split(" 5 requests")[0].split(" 10 requests")[0].split(" 100 requests")[0] for r in rows] == [
        "support-bot user alice",
        "partner org acme",
        "support-bot user bob",
        "support-bot all traffic",
    ]
    alice, acme, bob, everyone = rows
    assert "5 requests / hour 5 / 5" in alice and "100%" in alice and "denied" in alice
    assert "10 requests / minute 9 / 10" in acme and "90%" in acme and acme.endswith("near the limit")
    assert "5 requests / hour 2 / 5" in bob and "40%" in bob and bob.endswith("ok")
    assert "100 requests / minute 7 / 100" in everyone and "7%" in everyone


def test_usage_lists_the_recent_denials_newest_first(gateway: Gateway) -> None:
    """As the dashboard does: under the budgets, the latest 429s (when, key, who, policy)."""
    empty = cli("usage", "--store", gateway.store_url, env=WIDE).stdout
    assert "recent denials" not in empty
    seed(gateway)  # alice's sixth call was refused
    partner = gateway.openai(gateway.key("late"), **{POLICY: "1;w=60"})
    assert [chat(partner), chat(partner)] == [200, 429]
    output = cli("usage", "--store", gateway.store_url, env=WIDE).stdout
    assert [row[-4:] for row in denial_rows(output)] == [
        ["late", "all", "traffic", "1;w=60"],
        ["support-bot", "user", "alice", "5;w=3600;s=user"],
    ]
    assert all(row[1] == "ago" for row in denial_rows(output))  # "3s ago"
    only = cli("usage", "--store", gateway.store_url, "--key", "late", env=WIDE).stdout
    assert [row[-4:] for row in denial_rows(only)] == [["late", "all", "traffic", "1;w=60"]]


def test_usage_for_one_key_and_a_limit(gateway: Gateway) -> None:
    seed(gateway)
    rows = table_rows(cli("usage", "--store", gateway.store_url, "--key", "partner", env=WIDE).stdout)
    assert [" ".join(r[:3]) for r in rows] == ["partner org acme"]
    limited = cli("usage", "--store", gateway.store_url, "--limit", "2", env=WIDE).stdout
    assert [r[:3] for r in table_rows(limited)] == [["support-bot", "user", "alice"], ["partner", "org", "acme"]]
    assert "raise --limit" in limited and "the 2 budgets closest to their limits" in limited


def test_usage_errors_and_empty_store(sqlite_url: str) -> None:
    empty = cli("usage", "--store", sqlite_url, env=WIDE).stdout
    assert "0 budgets in use" in empty and "no budget in use" in empty
    unknown = cli("usage", "--store", sqlite_url, "--key", "nobody", check=False)
    assert unknown.returncode == 1 and "no key with id or name 'nobody'" in unknown.stdout
    bad = cli("usage", "--store", "ftp://nowhere", check=False)
    assert bad.returncode == 2 and "unknown store URL" in bad.stdout


def test_usage_watch_follows_the_traffic(gateway: Gateway) -> None:
    client = gateway.openai(gateway.key("live"), **{POLICY: "5;w=3600;s=user", "Helicone-User-Id": "carol"})
    assert chat(client) == 200
    process = subprocess.Popen(
        quotagate_command("usage", "--store", gateway.store_url, "--watch", "--interval", "0.3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **WIDE},
    )
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None

    def read() -> None:
        for line in process.stdout or []:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()

    def wait_for(text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if text in " ".join(lines.get(timeout=0.5).split()):
                    return
            except queue.Empty:
                assert process.poll() is None, "quotagate usage --watch exited"
        raise AssertionError(f"{text!r} never appeared")

    try:
        wait_for("user carol 5 requests / hour 1 / 5")
        assert chat(client) == 200
        wait_for("user carol 5 requests / hour 2 / 5")
        for _ in range(3):
            assert chat(client) == 200
        assert chat(client) == 429
        wait_for("5 / 5 ████████████████████ 100% denied")
    finally:
        process.terminate()
        process.wait(timeout=10)
