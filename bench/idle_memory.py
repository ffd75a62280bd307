"""An idle gateway worker's memory (issue 15: under 80 MB), and where it goes.

    .venv/bin/python bench/idle_memory.py                       # 3 starts of this tree's gateway
    .venv/bin/python bench/idle_memory.py --src /tmp/base/src   # another commit's tree:
                                                                # git archive REV src | tar -x -C /tmp/base
    .venv/bin/python bench/idle_memory.py --steps               # RSS after each import, in one fresh process

Default: `quotagate serve --workers 2` on a Redis store (the URL of --store; a private database of
the local server by default), started `--starts` times; once it prints its banner (every worker
listens), each worker's VmRSS and PSS (from /proc) and the supervisor's VmRSS; and the seconds from
the command's start to its banner (wall clock: it varies with the machine's load). The workers are
forked from the supervisor, so what it imported before forking is in their RSS too; PSS counts
the pages they share with it and each other once.

`--steps`: a fresh interpreter imports what a worker does, in order, and the RSS it reaches after
each step is printed with its growth: the parts of a worker's memory, not the sum of them (what a
step frees, or leaves to be reused, shows in the next).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STEPS = [
    ("stdlib asyncio", "import asyncio"),
    ("uvloop", "import uvloop"),
    ("aiohttp (client and web)", "import aiohttp, aiohttp.web"),
    ("click, config (the command line)", "import quotagate.cli"),
    ("prometheus-client, metrics", "import quotagate.metrics"),
    ("redis-py (imported whole)", "import redis, redis.asyncio.cluster"),
    ("the Redis store", "import quotagate.stores.redis"),
    ("proxy, server and the rest of quotagate", "import quotagate.server"),
    ("the price table (`serve` loads it before forking)", "from quotagate.pricing import load_prices; load_prices()"),
    ("tiktoken", "import tiktoken"),
    ("the cl100k tokenizer built", "from quotagate.usage import count_tokens; count_tokens('x')"),
]


def rss_kb(pid: int | str, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def pss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def one_start(src: Path, store: str) -> tuple[float, float, list[tuple[float, float]]]:
    """(seconds to the banner, supervisor RSS, [(worker RSS, worker PSS)]) in MB, right after the
    banner."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    port, options = free_port(), ["--store", store, "--no-access-log"]
    with tempfile.TemporaryFile("w+") as log:
        started = time.monotonic()
        server = subprocess.Popen(
            [sys.executable, "-m", "quotagate", "serve", "--workers", "2", "--port", str(port), *options],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                log.seek(0)
                text = log.read()
                if "quotagate listening" in text:
                    listened = time.monotonic() - started
                    break
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the gateway did not start:\n{text}")
                time.sleep(0.05)
            time.sleep(0.5)
            children = subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True, text=True).stdout.split()
            workers = [(rss_kb(p) / 1024, pss_kb(int(p)) / 1024) for p in children]
            return listened, rss_kb(server.pid) / 1024, workers
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def steps(src: Path) -> None:
    code = [
        "import sys",
        "def rss():",
        "    for l in open('/proc/self/status'):",
        "        if l.startswith('VmRSS:'): return int(l.split()[1]) / 1024",
        "last = rss(); print(f'{\"python started\":<50} {last:6.1f} MB')",
    ]
    for name, statement in STEPS:
        code += [statement, f"now = rss(); print(f'{name:<50} {{now:6.1f}} MB  {{now - last:+5.1f}}'); last = now"]
    code.append("library = any(m.split('.')[0] in ('genai_prices', 'pydantic') for m in sys.modules)")
    code.append("print('genai-prices or pydantic imported:', library)")
    subprocess.run([sys.executable, "-c", "\n".join(code)], env={**os.environ, "PYTHONPATH": str(src)}, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the quotagate tree to run")
    parser.add_argument("--store", default="redis://127.0.0.1:6379/9", help="the store URL (Redis)")
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--steps", action="store_true", help="RSS after each import instead")
    args = parser.parse_args()
    if args.steps:
        steps(args.src)
        return
    workers: list[float] = []
    for _ in range(args.starts):
        listened, supervisor, measured = one_start(args.src, args.store)
        workers += [r for r, _ in measured]
        shown = ", ".join(f"RSS {r:.1f} (PSS {p:.1f})" for r, p in measured)
        print(f"banner after {listened:.2f} s; supervisor RSS {supervisor:.1f} MB; workers {shown} MB")
    print(f"idle worker RSS: mean {statistics.mean(workers):.1f} MB, {min(workers):.1f}-{max(workers):.1f}")


if __name__ == "__main__":
    main()
