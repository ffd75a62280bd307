"""Resource bounds: a million distinct users on a per-user policy, and the store's bytes per budget.

    .venv/bin/python bench/memory.py                  # 1,000,000 users (about 15 minutes)
    .venv/bin/python bench/memory.py --users 100000   # quicker

1. Gateway memory: `quotagate serve --workers 1` on a private redis-server, driven by wrk
   (bench/load.lua, one distinct Helicone-User-Id per request, cycling over --users) through a
   per-user policy until every user has been seen once; the worker's resident memory is sampled as
   users accumulate. State lives in the store, so the curve must flatten, not grow with users.
2. Store bytes per budget: Redis `used_memory` growth and `MEMORY USAGE` of one budget's hash after
   those users; the SQLite file's growth for the same number of budgets written through the store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def redis_info(port: int) -> dict[str, str]:
    text = subprocess.run(["redis-cli", "-p", str(port), "info", "memory"], capture_output=True, text=True).stdout
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def redis_cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True).stdout.strip()


def gateway_memory(users: int, folder: Path) -> dict[str, object]:
    up_port, redis_port, gw_port = free_port(), free_port(), free_port()
    procs = [
        subprocess.Popen([PYTHON, str(BENCH / "upstream.py"), "--port", str(up_port)]),
        subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(folder),
            ],
            stdout=subprocess.DEVNULL,
        ),
    ]
    try:
        time.sleep(0.5)
        store = f"redis://127.0.0.1:{redis_port}/0"
        key = (
            subprocess.run(
                [PYTHON, "-m", "quotagate", "keys", "create", "--name", "memory", "--store", store],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        gateway = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "quotagate",
                "serve",
                "--port",
                str(gw_port),
                "--store",
                store,
                "--workers",
                "1",
                "--no-access-log",
                "--openai-base-url",
                f"http://127.0.0.1:{up_port}",
            ],
            stdout=subprocess.DEVNULL,
        )
        procs.append(gateway)
        wait_http(f"http://127.0.0.1:{gw_port}/healthz")
        before = int(redis_info(redis_port)["used_memory"])
        env = {
            **os.environ,
            "BENCH_USERS": str(users),
            "BENCH_AUTH": key,
            "BENCH_POLICY": "1000000;w=3600;s=user",
            "BENCH_OUT": str(folder / "wrk.json"),
        }
        load = subprocess.Popen(
            ["wrk", "-t2", "-c32", "-d3600s", "-s", str(BENCH / "load.lua"), f"http://127.0.0.1:{gw_port}"],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        samples, started = [], time.monotonic()
        while True:
            time.sleep(2)
            budgets = int(redis_cli(redis_port, "zcard", "qg:idx") or 0)  # the dashboard's index of budgets
            samples.append((round(time.monotonic() - started), budgets, round(rss_mb(gateway.pid), 1)))
            print(f"  {samples[-1][0]:>5} s  {budgets:>9,} users seen  worker RSS {samples[-1][2]:7.1f} MB", flush=True)
            if budgets >= users:
                break
        load.terminate()
        load.wait()
        after = int(redis_info(redis_port)["used_memory"])
        sample_key = "qg:{" + redis_cli(redis_port, "zrange", "qg:idx", "0", "0") + "}"
        hash_bytes = int(redis_cli(redis_port, "memory", "usage", sample_key, "samples", "0"))
        return {
            "samples": samples,
            "redis_bytes_per_budget": (after - before) / max(1, samples[-1][1]),
            "budget_hash_bytes": hash_bytes,
        }
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)


def sqlite_bytes_per_budget(count: int, folder: Path) -> float:
    sys.path.insert(0, str(ROOT / "src"))
    from quotagate.keys import create_key
    from quotagate.limiter import budgets_for
    from quotagate.policy import parse_policies
    from quotagate.stores.sqlite import SQLiteStore

    path = folder / "budgets.db"
    store = SQLiteStore(f"sqlite:///{path}")
    policies = parse_policies("1000000;w=3600;s=user")

    async def fill() -> None:
        _, key = await create_key(store, "memory", [])
        for i in range(count):
            budgets = budgets_for(key.id, policies, {None: None, "user": f"u{i}"})
            admission = await store.admit(key.id, budgets, [1], "r", 60)
            assert admission.allowed
        await store.close()

    asyncio.run(store.ping())
    empty = path.stat().st_size
    asyncio.run(fill())
    sqlite3.connect(path).execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return (path.stat().st_size - empty) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--sqlite-budgets", type=int, default=20_000)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("bench/memory.py needs wrk (apt-get install wrk)")
    folder = Path(tempfile.mkdtemp(prefix="quotagate-memory-"))
    print(f"gateway memory with {args.users:,} distinct users on a per-user policy (Redis store):")
    result = gateway_memory(args.users, folder)
    result["sqlite_bytes_per_budget"] = sqlite_bytes_per_budget(args.sqlite_budgets, folder)
    first, last = result["samples"][0], result["samples"][-1]  # type: ignore[index]
    print(f"\nworker RSS: {first[2]} MB at {first[1]:,} users -> {last[2]} MB at {last[1]:,} users")
    print(
        f"Redis: {result['redis_bytes_per_budget']:.0f} bytes per budget (used_memory growth), "
        f"one budget hash: {result['budget_hash_bytes']} bytes (MEMORY USAGE)"
    )
    print(f"SQLite: {result['sqlite_bytes_per_budget']:.0f} bytes per budget (file growth)")
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / "memory.json").write_text(json.dumps(result, indent=1))
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
