"""The event-loop lag of a gateway worker while it serves a huge prompt beside small requests.

    .venv/bin/python bench/loop_lag.py                      # this tree: 25 MB prompts of each kind
    .venv/bin/python bench/loop_lag.py --compare 235a0d7    # and the same run on another commit

A gateway worker runs in a process of its own, as `quotagate serve` runs one (uvloop, the garbage
collector settled, a SQLite store), with a task beside it that sleeps 1 ms at a time and records how
late it wakes up: the lag every other request on that worker sees. This process runs the load (the
fake provider runs in a process of its own): a /healthz every 20 ms and a small chat call with a
token budget every 50 ms, and after a second one huge chat call under `u=token` (so that its prompt
is counted): a 25 MB run of spaces, 25 MB of ordinary words, or 50,000 messages of 500 bytes.
Reported for the time the huge call is in the gateway: the loop's lag (p50, p99, max), and the
latency of /healthz and of the small calls (p99, max; the small calls also wait for the fake
provider, which is busy reading the huge call). `--compare REV` runs the same on a git worktree of
REV. The load runs on uvloop; on a busy machine it may fall behind its rates (the worker's loop lag
is the figure that does not depend on it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("whitespace", "text", "messages")
POLICY = "1000000000;w=3600;u=token"


# -- the worker process ------------------------------------------------------------------------------


def worker(port: int, store: str, upstream: str, out: str) -> None:
    """A gateway worker as `quotagate serve` runs it, and a 1 ms ticker recording its lag."""
    from quotagate.config import Settings
    from quotagate.server import run_site
    from quotagate.stores import open_store
    from quotagate.usage import count_tokens

    settings = Settings(
        port=port, store=store, workers=1, access_log=False, openai_base_url=upstream, anthropic_base_url=upstream
    )
    lags: list[tuple[float, float]] = []

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        count_tokens("quotagate")
        site = asyncio.ensure_future(run_site(settings, open_store(store), False, stop, tune_gc=True))
        while not stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append((time.time(), time.perf_counter() - started - 0.001))
        await site

    uvloop.run(main())
    Path(out).write_text(json.dumps(lags))


# -- the load ----------------------------------------------------------------------------------------


def huge_body(kind: str, size: int) -> bytes:
    if kind == "whitespace":
        return orjson.dumps({"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": " " * size}]})
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "runs", "away"]
    rng = random.Random(7)
    if kind == "text":
        text = " ".join(rng.choice(words) for _ in range(size // 5))
        return orjson.dumps({"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": text}]})
    message = " ".join(rng.choice(words) for _ in range(100))[:480]
    count = size // (len(message) + 40)
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": message} for i in range(count)]
    return orjson.dumps({"model": "gpt-4o", "max_tokens": 5, "messages": messages})


async def paced(
    session: aiohttp.ClientSession, method: str, url: str, every: float, until: asyncio.Event, **kwargs: Any
) -> list[tuple[float, float]]:
    """A request every `every` seconds (or as soon as the previous one is answered); each one's
    latency from sending it to its answer."""
    latencies: list[tuple[float, float]] = []
    due = time.perf_counter()
    while not until.is_set():
        due += every
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        sent = time.perf_counter()
        async with session.request(method, url, **kwargs) as response:
            await response.read()
        latencies.append((time.time(), time.perf_counter() - sent))
    return latencies


async def one_kind(url: str, key: str, kind: str, size: int) -> dict[str, Any]:
    body = huge_body(kind, size)
    headers = {
        "Helicone-Auth": f"Bearer {key}",
        "Helicone-RateLimit-Policy": POLICY,
        "X-Fake-Prompt-Tokens": "1000",
        "Content-Type": "application/json",
    }
    chat = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "Say hello"}]}
    small = {"Helicone-Auth": f"Bearer {key}", "Helicone-RateLimit-Policy": POLICY}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for _ in range(3):  # warm up: the first call under a token budget loads the price table
            async with session.post(f"{url}/v1/chat/completions", json=chat, headers=small) as response:
                await response.read()
        stop = asyncio.Event()
        health = asyncio.ensure_future(paced(session, "GET", f"{url}/healthz", 0.020, stop))
        calls = asyncio.ensure_future(
            paced(session, "POST", f"{url}/v1/chat/completions", 0.050, stop, json=chat, headers=small)
        )
        await asyncio.sleep(1.0)
        started = time.time()
        async with session.post(f"{url}/v1/chat/completions", data=body, headers=headers) as response:
            await response.read()
            status = response.status
        ended = time.time()
        await asyncio.sleep(0.5)
        stop.set()
        measured = {"health": await health, "calls": await calls}
    return {"kind": kind, "bytes": len(body), "status": status, "start": started, "end": ended, **measured}


def measure(src: Path | None, size: int, kinds: list[str]) -> list[dict[str, Any]]:
    """One gateway worker (from `src`, or this tree), the fake provider here, each kind in turn."""
    from quotagate.keys import create_key
    from quotagate.stores import open_store

    folder = Path(tempfile.mkdtemp(prefix="qg-loop-lag-"))
    store = f"sqlite:///{folder / 'lag.db'}"
    fake_port = _free_port()
    fake = subprocess.Popen([sys.executable, "-m", "quotagate.fake_upstream", str(fake_port)], cwd=folder)
    fake_url = f"http://127.0.0.1:{fake_port}"

    async def make_key() -> str:
        opened = open_store(store)
        try:
            return (await create_key(opened, "lag", []))[0]
        finally:
            await opened.close()

    key = asyncio.run(make_key())
    port, out = _free_port(), folder / "lags.json"
    env = {**os.environ, "PYTHONPATH": str(src)} if src else dict(os.environ)
    child = subprocess.Popen(
        [sys.executable, __file__, "--worker", str(port), store, fake_url, str(out)], env=env, cwd=folder
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(fake_url + "/v1/models")
        _wait_ready(url + "/healthz")
        runs = [uvloop.run(one_kind(url, key, kind, size)) for kind in kinds]
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(60)
        fake.terminate()
        fake.wait(60)
    lags = json.loads(out.read_text())
    for run in runs:
        run["lags"] = [lag for at, lag in lags if run["start"] <= at <= run["end"]]
        for name in ("health", "calls"):
            run[name] = [lat for at, lat in run[name] if run["start"] <= at <= run["end"] + 0.5]
    return runs


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str) -> None:
    import urllib.request

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"the gateway at {url} did not start")


# -- the report --------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> str:
    if not values:
        return "—"
    values = sorted(values)
    return f"{values[min(len(values) - 1, int(len(values) * q))] * 1e3:,.1f}"


def report(label: str, runs: list[dict[str, Any]]) -> list[str]:
    rows = []
    for run in runs:
        lags, health, calls = run["lags"], run["health"], run["calls"]
        rows.append(
            f"| {label} | {run['kind']} ({run['bytes'] / 1e6:.1f} MB) | {run['status']} "
            f"| {run['end'] - run['start']:.2f} | {pct(lags, 0.5)} | {pct(lags, 0.99)} | {pct(lags, 1.0)} "
            f"| {len(health)}: {pct(health, 0.99)} / {pct(health, 1.0)} | {len(calls)}: {pct(calls, 0.99)} "
            f"/ {pct(calls, 1.0)} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=25.0, help="size of each huge prompt")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--compare", metavar="REV", help="also measure this git revision")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        port, store, upstream, out = args.worker
        worker(int(port), store, upstream, out)
        return
    size = int(args.size_mb * 1e6)
    rows = report("this tree", measure(None, size, args.kinds))
    if args.compare:
        tree = Path(tempfile.mkdtemp(prefix="qg-loop-lag-rev-")) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.compare], check=True)
        try:
            rows = report(args.compare, measure(tree / "src", size, args.kinds)) + rows
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)
    print(
        "| code | huge prompt | status | its time in the gateway s | loop lag p50 ms | p99 ms | max ms "
        "| /healthz meanwhile: n, p99 / max ms | small calls meanwhile: n, p99 / max ms |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
