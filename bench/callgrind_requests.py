"""Instructions per request of one gateway worker, counted by callgrind: repeatable on a loaded machine.

    .venv/bin/python bench/callgrind_requests.py                       # this tree, 3 policies, Redis
    .venv/bin/python bench/callgrind_requests.py --variant mypyc=build/mypyc/src --rounds 2  # bench/build-mypyc
    .venv/bin/python bench/callgrind_requests.py --ref --ref-local --policy '' --no-tree --variant none=src

It starts the canned-bytes upstream (bench/upstream.py), a private redis-server (or a new SQLite file
with `--store sqlite`) and `quotagate serve --workers 1` under `valgrind --tool=callgrind` with
instrumentation off; it sends `--warmup` requests (new users, the 3 policies of bench/run.py), turns
instrumentation on (`callgrind_control -i on`), sends `--requests` more over `--concurrency`
keep-alive connections, turns it off and divides the worker's instruction count by the requests.
Every response must be the upstream's completion with the three policies' headers, and the upstream
must have served every request. `--variant NAME=SRC` runs the gateway from another source tree (its
PYTHONPATH, e.g. a build with compiled extensions), alternating with this tree's, round by round.
The count is the worker's own instructions (event loop, aiohttp, the gateway, the store client),
not redis-server's nor the client's. `--keep DIR` keeps the callgrind files, for
`callgrind_annotate --inclusive=yes DIR/callgrind.NAME.PORT`.

`--policy TEXT` sends other policies (`--policy ''`: no policy header at all; the key has none
either). `--ref` counts the reference proxy (`refproxy.py`, one worker: aiohttp's server and client)
the same way, first in each round, and states every figure as a ratio to it; `--ref-local` counts
the reference answering each request itself with the upstream's completion (`refproxy.py --local`:
aiohttp's server side alone, no client, no upstream), so that the reference splits into its server
side and the rest (the client and the forwarding).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

from quotagate.policy import parse_policies
from report import X
from run import BODY, REF_AUTH, create_key, free_port, upstream_served
from store_steps import THREE_POLICIES

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable


def wait_http(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {seconds:g} s") from None
            time.sleep(0.2)


async def send(port: int, key: str, users: range, concurrency: int, policy: str, answered: int) -> int:
    """One chat completion per user, `policy` in its header (none if empty), `answered` policies
    expected in the answer's RateLimit-Policy; the number of correct responses (raises on a wrong one)."""
    queue = list(users)
    ok = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal ok
        while queue:
            user = queue.pop()
            headers = {
                "Content-Type": "application/json",
                "Authorization": "Bearer sk-bench-not-a-real-key",
                "Helicone-Auth": f"Bearer {key}",
                "Helicone-User-Id": f"user-{user}",
            }
            if policy:
                headers["Helicone-RateLimit-Policy"] = policy
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=BODY, headers=headers) as r:
                body = await r.read()
                policies = r.headers.get("RateLimit-Policy", "")
                if r.status != 200 or b"chatcmpl-" not in body or policies.count('"p') != answered:
                    raise RuntimeError(f"bad response {r.status} {dict(r.headers)} {body[:200]!r}")
                ok += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return ok


def one_run(args: argparse.Namespace, name: str, src: str | None, upstream_port: int, workdir: Path) -> float:
    """Instructions per request of one server process: the gateway from `src` (this tree's if None),
    or the reference (`name` "ref": proxying; "ref-local": answering itself)."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = str(Path(src).resolve())
    port = free_port()
    out = workdir / f"callgrind.{name}.{port}"
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    upstream = f"http://127.0.0.1:{upstream_port}"
    if name in ("ref", "ref-local"):
        key, answered, ready = REF_AUTH, 0, f"http://127.0.0.1:{port}/__bench/stats"
        argv += [PYTHON, str(BENCH / "refproxy.py"), "--port", str(port), "--upstream", upstream, "--workers", "1"]
        argv += ["--local"] if name == "ref-local" else []
    else:
        if args.store == "redis":
            store = args.redis_url
            subprocess.run(["redis-cli", "-u", store, "flushdb"], check=True, capture_output=True)
        else:
            store = f"sqlite:///{workdir / f'{name}-{time.monotonic_ns()}.db'}"
        key, answered, ready = create_key(store, env=env), args.answered, f"http://127.0.0.1:{port}/healthz"
        argv += [PYTHON, "-m", "quotagate", "serve", "--host", "127.0.0.1", "--port", str(port), "--store", store]
        argv += ["--workers", "1", "--openai-base-url", upstream, "--no-access-log", "--log-level", "warning"]
    log = open(workdir / f"serve.{name}.{port}.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(ready, 300)
        asyncio.run(send(port, key, range(args.warmup), args.concurrency, args.policy, answered))
        served = upstream_served(upstream_port)
        subprocess.run(["callgrind_control", "-i", "on", str(server.pid)], check=True, capture_output=True)
        users = range(args.warmup, args.warmup + args.requests)
        done = asyncio.run(send(port, key, users, args.concurrency, args.policy, answered))
        subprocess.run(["callgrind_control", "-i", "off", str(server.pid)], check=True, capture_output=True)
        reached = upstream_served(upstream_port) - served
        expected = 0 if name == "ref-local" else args.requests  # answering itself, it forwards nothing
        if done != args.requests or reached != expected:
            raise RuntimeError(f"{name}: {done} correct responses, {reached} reached the upstream, of {args.requests}")
    finally:
        server.terminate()
        server.wait(120)
        log.close()
    said = (workdir / f"serve.{name}.{port}.log").read_text(errors="replace")
    found = re.search(r"Collected : (\d+)", said)  # valgrind's own total at exit: instrumented events only
    if not found:
        raise RuntimeError(f"no instruction count in the server's log: {said[-2000:]}")
    return int(found.group(1)) / args.requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", choices=["redis", "sqlite"], default="redis")
    parser.add_argument("--requests", type=int, default=1000, help="requests counted")
    parser.add_argument("--warmup", type=int, default=300, help="requests before counting")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1, help="each variant this many times, in turn")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=SRC")
    parser.add_argument("--no-tree", action="store_true", help="only the --variant gateways, not this tree's")
    parser.add_argument("--keep", metavar="DIR", help="keep the callgrind files here (for callgrind_annotate)")
    parser.add_argument(
        "--policy", default=THREE_POLICIES, help="the gateway's policy header ('' for none; default: the 3 of run.py)"
    )
    parser.add_argument("--ref", action="store_true", help="count the reference proxy too (first in each round)")
    parser.add_argument(
        "--ref-local", action="store_true", help="count the reference answering itself (aiohttp's server side alone)"
    )
    args = parser.parse_args()
    args.answered = len(parse_policies(args.policy)) if args.policy else 0
    for tool in ("valgrind", "callgrind_control") + (("redis-server", "redis-cli") if args.store == "redis" else ()):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed")
    sides: list[tuple[str, str | None]] = [("ref", None)] if args.ref else []
    sides += [("ref-local", None)] if args.ref_local else []
    sides += [] if args.no_tree else [("tree", None)]
    sides += [(n, s) for n, s in (v.split("=", 1) for v in args.variant)]
    with tempfile.TemporaryDirectory(prefix="qg-callgrind-") as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        up_port = free_port()
        procs = [subprocess.Popen([PYTHON, str(BENCH / "upstream.py"), "--port", str(up_port)])]
        try:
            if args.store == "redis":
                redis_port = free_port()
                argv = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]
                procs.append(subprocess.Popen([*argv, "--appendonly", "no"], stdout=subprocess.DEVNULL))
                args.redis_url = f"redis://127.0.0.1:{redis_port}/0"
                time.sleep(0.5)
            wait_http(f"http://127.0.0.1:{up_port}/__bench/stats", 30)
            results: dict[str, list[float]] = {name: [] for name, _ in sides}
            for _ in range(args.rounds):
                for name, src in sides:
                    per_request = one_run(args, name, src, up_port, workdir)
                    results[name].append(per_request)
                    print(f"{name}: {per_request:,.0f} instructions per request", flush=True)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)
    base = min(results[sides[0][0]])
    policies = f"{args.answered} polic{'y' if args.answered == 1 else 'ies'}"
    print(f"\n{args.store}, {policies}, 1 worker, {args.requests} requests over {args.concurrency} connections")
    for name, values in results.items():
        shown = ", ".join(f"{v:,.0f}" for v in values)
        print(f"{name:>10}: {shown} instructions per request (min {X}{min(values) / base:.3f})")


if __name__ == "__main__":
    main()
