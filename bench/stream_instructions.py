"""Instructions per stream, counted by callgrind: the streams of `streams.py`, one worker, repeatable.

On a machine shared with other work, CPU time per stream moves by ±25 % from one run to the next;
the number of instructions a worker executes for the same streams does not. This runs one server
process (the gateway with `--workers 1`, or the reference with one worker) under
`valgrind --tool=callgrind` with collection off, sends it `--warmup` streams (the first calls
load prices, fill caches), switches collection on (`callgrind_control -i on`), sends `--streams`
more, switches it off and reads the total: instructions per stream. The calls, prompts, policies
and upstream are those of `streams.py` (40 content events; the upstream paces them `--delay` s
apart, so that each event arrives alone even under valgrind's slowdown), `--concurrency` at once.
Every stream must be whole (status, header, every event, `[DONE]`, the chunked end).

    .venv/bin/python bench/stream_instructions.py                    # the reference, then this tree
    .venv/bin/python bench/stream_instructions.py --variant base=/tmp/base/src   # and another src/
    .venv/bin/python bench/stream_instructions.py --no-ref --policy ''    # no policy header at all

`--policy` sets the gateway's policy header (`''`: none; the key has no policy of its own either,
so the call holds no budget). `--keep DIR` keeps the callgrind files (`callgrind.NAME.*`, the counted
part in the one whose header says `counted`) for `callgrind_annotate`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from run import BENCH, PYTHON, REF_AUTH, Service, create_key, flush_redis, free_port, wait_listening
from stream_client import Connection, Load
from streams import _VOCAB, POLICY, PROMPT_TOKENS, USERS, WORDS, prompts

_TOTALS = re.compile(rb"^totals:\s*(\d+)", re.MULTILINE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=40, help="streams counted")
    parser.add_argument("--warmup", type=int, default=10, help="streams before counting")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.03, help="seconds between two events of a stream")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=SRC", help="a gateway from this src/")
    parser.add_argument("--no-tree", action="store_true", help="only the --variant gateways")
    parser.add_argument("--no-ref", action="store_true", help="leave the reference out")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each side (alternating)")
    parser.add_argument(
        "--policy", default=POLICY, help="the gateway's policy header ('' for none; default: those of streams.py)"
    )
    parser.add_argument("--keep", metavar="DIR", help="keep the callgrind files here (for callgrind_annotate)")
    return parser.parse_args(argv)


async def drive(port: int, auth: str, header: str, policy: str, count: int, concurrency: int, seed: int) -> list[str]:
    """Send `count` streams, `concurrency` at a time, each on its connection; the problems seen."""
    bodies = prompts()
    spec = {
        "port": port,
        "streams": concurrency,
        "start": 0,
        "seconds": 0,
        "users": USERS,
        "auth": auth,
        "policy": policy if header else "",
        "header": header,
        "bodies": [b for b, _ in bodies],
        "events": [WORDS + 3 + int(asks) for _, asks in bodies],
        "vocab": _VOCAB,
        "seed": seed,
    }
    load = Load(spec)
    loop = asyncio.get_running_loop()
    left = [count]
    problems: list[str] = []

    async def slot() -> None:
        _, conn = await loop.create_connection(lambda: Connection(load.header), "127.0.0.1", port)
        while left[0] > 0:
            left[0] -= 1
            body, user = load.rng.randrange(len(load.bodies)), load.rng.randrange(load.users)
            whole = await conn.send(load.request(body, user))
            if not (whole and conn.ok and conn.events == load.expected[body]):
                problems.append(f"stream not whole: {conn.events} events, {conn.head[:40]!r}")
                return
        assert conn.transport is not None
        conn.transport.close()

    await asyncio.gather(*(slot() for _ in range(concurrency)))
    return problems


def totals(path: Path) -> int:
    found = _TOTALS.search(path.read_bytes())
    if found is None:
        raise RuntimeError(f"no totals in {path}")
    return int(found.group(1))


def measure(side: str, src: str | None, args: argparse.Namespace, upstream: str, redis_url: str, work: Path) -> float:
    port = free_port()
    out = work / f"callgrind.{side}.{time.monotonic_ns()}"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    env = {"PYTHONHASHSEED": "0"}
    if side == "ref":
        argv = [PYTHON, str(BENCH / "refproxy.py"), "--port", str(port), "--upstream", upstream, "--workers", "1"]
        auth, header = REF_AUTH, ""
    else:
        flush_redis(redis_url)
        auth, header = create_key(redis_url), "RateLimit"
        argv = [PYTHON, "-m", "quotagate", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        argv += ["--store", redis_url, "--openai-base-url", upstream, "--no-access-log", "--log-level", "warning"]
        if src is not None:
            env["PYTHONPATH"] = str(Path(src).resolve())
    service = Service(side, ["env", *(f"{k}={v}" for k, v in env.items()), *valgrind, *argv], work)
    try:
        wait_listening(service, port, timeout=600)
        pid = service.pid  # `env` execs valgrind, which runs the program in the same process
        problems = asyncio.run(drive(port, auth, header, args.policy, args.warmup, args.concurrency, 1))
        _control("-i", "on", pid)
        problems += asyncio.run(drive(port, auth, header, args.policy, args.streams, args.concurrency, 2))
        _control("-i", "off", pid)
        _control("-d", "counted", pid)
        if problems:
            raise RuntimeError(f"{side}: {problems[:3]}")
    finally:
        service.stop()
    dumps = sorted(work.glob(f"{out.name}*"))
    counted = [d for d in dumps if b"counted" in d.read_bytes()[:4000]]
    return totals(counted[-1]) / args.streams


def _control(*argv: Any) -> None:
    subprocess.run(["callgrind_control", *map(str, argv)], check=True, capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    sides: list[tuple[str, str | None]] = [] if args.no_ref else [("ref", None)]
    sides += [] if args.no_tree else [("gateway", None)]
    sides += [(name, src) for name, src in (v.split("=", 1) for v in args.variant)]
    with tempfile.TemporaryDirectory(prefix="qg-instr-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        services = []
        upstream_port, redis_port = free_port(), free_port()
        up = [PYTHON, str(BENCH / "upstream.py"), "--port", str(upstream_port), "--chunk-delay", str(args.delay)]
        up += ["--stream-words", str(WORDS), "--prompt-tokens", str(PROMPT_TOKENS), "--usage-null"]
        redis = [shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1"]
        redis += ["--save", "", "--appendonly", "no"]
        try:
            for name, command, port in (("upstream", up, upstream_port), ("redis", redis, redis_port)):
                services.append(Service(name, command, work))
                wait_listening(services[-1], port, timeout=60)
            results: dict[str, list[float]] = {name: [] for name, _ in sides}
            for _ in range(args.repeat):
                for name, src in sides:
                    side = "ref" if name == "ref" else name
                    upstream, redis_url = f"http://127.0.0.1:{upstream_port}", f"redis://127.0.0.1:{redis_port}/0"
                    figure = measure(side, src, args, upstream, redis_url, work)
                    results[name].append(figure)
                    print(f"{name}: {figure:,.0f} instructions per stream", flush=True)
        finally:
            for service in reversed(services):
                service.stop()
    ref = results.get("ref", [])
    print(json.dumps({k: [round(v) for v in vs] for k, vs in results.items()}))
    for name, figures in results.items():
        ratio = f" (x{min(figures) / min(ref):.2f} of the reference)" if ref and name != "ref" else ""
        print(f"| {name} | {min(figures):,.0f}{ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
