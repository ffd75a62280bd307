"""Instructions per request of one gateway worker, counted by valgrind's callgrind: a measure that
does not move with the machine's load (issue 14: the paired rows before and after the restructure).

    .venv/bin/python bench/callgrind_gateway.py --requests 2000 --concurrency 8 --out /tmp/cg-after
    (cd OTHER_TREE && .venv/bin/python /path/to/bench/callgrind_gateway.py --out /tmp/cg-before)

Run from a tree's root with its venv: it starts `quotagate serve --workers 1` of that tree (one
process, no supervisor) under `valgrind --tool=callgrind` on a private redis-server, bench's upstream
beside it, sends `--warmup` requests, zeroes the counters (`callgrind_control -z`), sends
`--requests` more from `--concurrency` keep-alive connections (the chat completion of `load.lua`,
the three policies of `bench/run.py`'s "3 policies" rows, a user of 10,000 each), dumps the counters
(`callgrind_control -d`) and prints instructions per request, with what Redis ran per request
(`INFO commandstats` over the same requests). Every response must be a 200 with the `RateLimit`
header. `callgrind_annotate OUT/callgrind.out.*.2` lists where the instructions went.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

BENCH = Path(__file__).resolve().parent
THREE_POLICIES = "1000000;w=60;s=user, 100000000;w=60;u=cents;s=user, 1000000000;w=60;u=token;s=user"
BODY = (
    b'{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful assistant."},'
    b'{"role":"user","content":"Write a haiku about rate limits and budgets."}],"max_tokens":64,"temperature":0.7}'
)
USERS = 10_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited at start")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listened on {port} within {timeout:g} s")


def request(key: str, user: int) -> bytes:
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Authorization: Bearer sk-bench-not-a-real-key\r\n"
        f"Helicone-Auth: Bearer {key}\r\nHelicone-RateLimit-Policy: {THREE_POLICIES}\r\n"
        f"Helicone-User-Id: user-{user}\r\nContent-Length: {len(BODY)}\r\n\r\n"
    )
    return head.encode() + BODY


async def connection(port: int, key: str, todo: list[int], seen: dict[str, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while todo:
            writer.write(request(key, todo.pop()))
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
            status = head.split(" ", 2)[1]
            length = int(head.split("content-length:", 1)[1].split("\r\n", 1)[0])
            await reader.readexactly(length)
            ok = status == "200" and "\r\nratelimit:" in head
            label = "ok" if ok else f"{status} without RateLimit" if status == "200" else status
            seen[label] = seen.get(label, 0) + 1
    finally:
        writer.close()


def send(port: int, key: str, users: range, concurrency: int) -> dict[str, int]:
    todo = list(reversed(users))
    seen: dict[str, int] = {}

    async def run() -> None:
        await asyncio.gather(*(connection(port, key, todo, seen) for _ in range(concurrency)))

    asyncio.run(run())
    return seen


def cpu_seconds(pid: int, which: slice = slice(11, 13)) -> float:
    """User + system CPU time of a process (`slice(11, 12)`: user alone), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[which]) / os.sysconf("SC_CLK_TCK")


def commandstats(client: redis.Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in client.info("commandstats").items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", default="/tmp/cg-gateway", help="folder for callgrind's output and the logs")
    parser.add_argument("--no-valgrind", action="store_true", help="the same load without callgrind (a smoke run)")
    parser.add_argument("--cprofile", action="store_true", help="cProfile instead of callgrind (OUT/gateway.prof)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in glob.glob(str(out / "callgrind.out.*")):
        os.remove(old)
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], name: str) -> subprocess.Popen[bytes]:
        log = (out / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        procs.append(proc)
        return proc

    try:
        redis_port, upstream_port, port = free_port(), free_port(), free_port()
        binary = shutil.which("redis-server") or "redis-server"
        wait_listening(
            start(
                [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], "redis"
            ),
            redis_port,
            10,
        )
        store = f"redis://127.0.0.1:{redis_port}/0"
        wait_listening(
            start([sys.executable, str(BENCH / "upstream.py"), "--port", str(upstream_port)], "upstream"),
            upstream_port,
            20,
        )
        made = subprocess.run(
            [sys.executable, "-m", "quotagate", "keys", "create", "--name", "bench", "--store", store],
            capture_output=True,
            text=True,
            check=True,
        )
        key = made.stdout.strip().splitlines()[-1].strip()
        serve = [
            sys.executable,
            "-m",
            "quotagate",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--store",
            store,
        ]
        serve += [
            "--workers",
            "1",
            "--openai-base-url",
            f"http://127.0.0.1:{upstream_port}",
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        if args.cprofile:
            args.no_valgrind = True
            serve = [sys.executable, str(BENCH / "profiled.py"), str(out / "gateway.prof"), *serve[1:]]
        if not args.no_valgrind:
            serve = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/callgrind.out.%p", *serve]
        gateway = start(serve, "gateway")
        wait_listening(gateway, port, 600)
        seen = send(port, key, range(USERS, USERS + args.warmup), args.concurrency)
        client = redis.Redis.from_url(store)
        if not args.no_valgrind:
            subprocess.run(["callgrind_control", "-z", str(gateway.pid)], check=True, capture_output=True)
        stats = commandstats(client)
        cpu = {"gateway": cpu_seconds(gateway.pid), "gateway user": cpu_seconds(gateway.pid, slice(11, 12))}
        cpu["redis"] = cpu_seconds(procs[0].pid)
        if args.cprofile:
            os.kill(gateway.pid, signal.SIGUSR1)
        started = time.monotonic()
        seen = send(port, key, range(args.requests), args.concurrency)
        took = time.monotonic() - started
        after = commandstats(client)
        cpu = {
            "gateway": cpu_seconds(gateway.pid) - cpu["gateway"],
            "gateway user": cpu_seconds(gateway.pid, slice(11, 12)) - cpu["gateway user"],
            "redis": cpu_seconds(procs[0].pid) - cpu["redis"],
        }
        if args.cprofile:
            os.kill(gateway.pid, signal.SIGUSR2)
            time.sleep(3)
        if not args.no_valgrind:
            subprocess.run(["callgrind_control", "-d", str(gateway.pid)], check=True, capture_output=True)
        if seen != {"ok": args.requests}:
            print(f"FAILED: responses {seen}")
            return 1
        calls = {name: (after[name] - stats.get(name, 0)) / args.requests for name in after}
        print(f"{args.requests} requests, {args.concurrency} connections, {took:.1f} s")
        print(", ".join(f"{name} CPU {seconds * 1000 / args.requests:.3f} ms/request" for name, seconds in cpu.items()))
        print("Redis per request: " + ", ".join(f"{n} {c:.3f}" for n, c in sorted(calls.items()) if c and n != "info"))
        if not args.no_valgrind:
            dumps = sorted(glob.glob(str(out / "callgrind.out.*")), key=os.path.getmtime)
            total = 0
            for line in Path(dumps[-1]).read_text(errors="replace").splitlines():
                if line.startswith("summary:") or line.startswith("totals:"):
                    total = int(line.split()[1])
            print(f"instructions per request: {total / args.requests:,.0f}  ({dumps[-1]})")
        return 0
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
