"""Thousands of long streams at once: quotagate beside the reference proxy, in one run (issue 15).

    .venv/bin/python bench/streams.py            # rows of 500 and 2,000 streams, 2 rounds (~9 minutes)
    .venv/bin/python bench/streams.py --quick    # one round, shorter phases (~3 minutes)
    .venv/bin/python bench/streams.py --rows 500 --rounds 3 --cold 20 --warm 20

Every row holds C streamed chat completions open at once (closed loop: each of C clients sends
its next request when its stream ends), from client processes of their own (`stream_client.py`,
a bare uvloop protocol). Every request has a prompt of a few KB (some with tools, and a question of
its own), a user out of 1,000, and, to the gateway, three policies per user: requests, cents and
tokens. The upstream (`upstream.py`) streams 40 content events 50 ms apart (plus the role, finish
and usage events). The gateway (2 workers, a private Redis) and the reference proxy (2 workers)
are started afresh for every run and measured in turn, reference first, `--rounds` times each:
the first `--cold` seconds after the start apart from the rest.

What it reports, per row, the reference beside every figure: servers' CPU per stream (all their
processes' CPU time / streams), streams/s, time to the first event and added stream duration (the
stream's duration minus the upstream's nominal one), the longest gap between two events, memory
per open stream (the workers' RSS under load minus at start, / C), peak RSS, idle worker RSS. It
checks that every stream was whole (status, header, every event, `[DONE]`, the chunked end), that
the upstream served exactly as many, and that the store holds what streamed: per user, its
requests, its tokens (prompt + completion as the upstream reported them) and its cents (their
price), with nothing left held.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import spy
from report import X, percentile
from run import (
    BENCH,
    PYTHON,
    REF_AUTH,
    ROOT,
    Service,
    bench_session,
    children_cpu_seconds,
    cpu_seconds,
    create_key,
    flush_redis,
    free_port,
    machine_busy_seconds,
    process_tree,
    upstream_served,
    wait_listening,
)

WORDS = 40  # content events per stream
DELAY = 0.05  # seconds between two events
PROMPT_TOKENS = 1_100  # the prompt tokens the upstream reports
MODEL = "gpt-4o-mini-2024-07-18"  # the model the upstream's stream names (what is priced)
USERS = 1_000
POLICY = "1000000;w=3600;s=user, 100000000;w=3600;u=cents;s=user, 1000000000;w=3600;u=token;s=user"
CLIENTS = 2  # client processes


@dataclass(frozen=True)
class Timing:
    cold: float  # seconds after the start counted apart
    warm: float  # seconds of load after that
    rounds: int


FULL = Timing(cold=20, warm=25, rounds=2)
QUICK = Timing(cold=10, warm=10, rounds=1)


# --- the prompts ---------------------------------------------------------------------------------

_VOCAB_TEXT = (
    "the rate limit budget token window request user gateway provider stream event model prompt "
    "answer cost cents quota policy segment header store redis worker process latency memory "
    "throughput service account invoice customer order shipment refund product catalogue search "
    "index database query schema migration deploy cluster node replica backup restore monitor alert "
    "incident report summary explain compare list describe why how when which should could would"
)
_VOCAB = _VOCAB_TEXT.split(" ")


def _text(rng: random.Random, words: int) -> str:
    sentences, out = [], []
    for _ in range(words):
        out.append(rng.choice(_VOCAB))
        if len(out) >= rng.randint(8, 20):
            sentences.append(" ".join(out).capitalize() + ".")
            out = []
    if out:
        sentences.append(" ".join(out).capitalize() + ".")
    return " ".join(sentences)


_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": desc,
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "What to look for, in the user's words."},
                    "limit": {"type": "integer", "description": "How many results at most.", "minimum": 1},
                    "filters": {
                        "type": "object",
                        "properties": {
                            "since": {"type": "string", "format": "date"},
                            "status": {"type": "string", "enum": ["open", "closed", "pending"]},
                        },
                    },
                },
                "required": ["query"],
            },
        },
    }
    for name, desc in (
        ("search_orders", "Search the customer's orders by text, date and status."),
        ("get_invoice", "Fetch one invoice with its lines and payments."),
        ("open_ticket", "Open a support ticket on behalf of the customer."),
    )
]


def prompts() -> list[tuple[str, bool]]:
    """Request bodies (JSON, the last question left as "@@QUESTION@@") and whether each asks for
    its stream's usage: 2-6 KB, a system prompt, earlier turns, half of them with three tools."""
    rng = random.Random(15)
    out = []
    for i in range(8):
        system = "You are the support assistant of an online shop. " + _text(rng, 250 + 60 * i)
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
        for _ in range(i % 4):
            messages.append({"role": "user", "content": _text(rng, 40)})
            messages.append({"role": "assistant", "content": _text(rng, 80)})
        messages.append({"role": "user", "content": "@@QUESTION@@"})
        body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": messages, "stream": True, "max_tokens": 400}
        if i % 2:
            body["tools"] = _TOOLS
            body["tool_choice"] = "auto"
        asks = i % 3 == 0
        if asks:
            body["stream_options"] = {"include_usage": True}
        out.append((json.dumps(body), asks))
    return out


# --- one run -------------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the load started
    server_cpu: float
    rss: list[int]  # bytes, each server process
    upstream_cpu: float
    redis_cpu: float
    machine_busy: float


@dataclass
class Run:
    side: str  # ref | gateway
    streams: int
    round: int
    started: float = 0.0  # CLOCK_MONOTONIC when the load started
    listened_after: float = 0.0  # seconds from spawning the server to its listening
    idle_rss: list[int] = field(default_factory=list)  # bytes, each worker, at start
    records: list[list[float]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    client_cpu: float = 0.0
    served: int = 0
    problems: list[str] = field(default_factory=list)


def rss_of(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Streams:
    """The upstream and Redis for the whole run; a fresh server for every measured run."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.services: list[Service] = []
        self.bodies = prompts()
        self.upstream_port = free_port()
        argv = [PYTHON, str(BENCH / "upstream.py"), "--port", str(self.upstream_port)]
        argv += ["--chunk-delay", str(DELAY), "--stream-words", str(WORDS), "--prompt-tokens", str(PROMPT_TOKENS)]
        argv += ["--usage-null"]
        self.upstream = self.start("upstream", argv, self.upstream_port)
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        port = free_port()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.redis = self.start("redis", argv, port)
        self.redis_url = f"redis://127.0.0.1:{port}/0"

    def start(self, name: str, argv: Sequence[str], port: int) -> Service:
        service = Service(name, argv, self.workdir)
        self.services.append(service)
        wait_listening(service, port, timeout=60)
        return service

    def close(self) -> None:
        for service in reversed(self.services):
            service.stop()

    def expected_events(self, body: int) -> int:
        """`data:` lines a whole stream brings the client: role, words, finish, usage if asked, [DONE]."""
        return WORDS + 3 + int(self.bodies[body][1])

    def nominal(self, side: str, body: int) -> float:
        """How long the upstream takes to send a stream (the gateway always asks for the usage)."""
        events = WORDS + 2 + int(side != "ref" or self.bodies[body][1])
        return (events - 1) * DELAY

    # -- the servers --

    def start_server(self, side: str, streams: int) -> tuple[Service, int, str]:
        port = free_port()
        upstream = f"http://127.0.0.1:{self.upstream_port}"
        if side == "ref":
            argv = [PYTHON, str(BENCH / "refproxy.py"), "--port", str(port), "--upstream", upstream, "--workers", "2"]
            service = Service("ref", argv, self.workdir)
            wait_listening(service, port, timeout=60)
            time.sleep(0.3)  # both workers bind (the reference reports nothing)
            return service, port, REF_AUTH
        flush_redis(self.redis_url)
        key = create_key(self.redis_url)
        argv = [PYTHON, "-m", "quotagate", "serve", "--host", "127.0.0.1", "--port", str(port)]
        if side in self.args.variants:  # the gateway from another source tree
            argv = ["env", f"PYTHONPATH={Path(self.args.variants[side]).resolve()}", *argv]
        argv += ["--store", self.redis_url, "--workers", "2", "--openai-base-url", upstream]
        argv += ["--no-access-log", "--log-level", "warning"]
        # every stream may land on one worker (SO_REUSEPORT spreads connections unevenly): the
        # default of 512 calls in flight per worker would refuse some of a 2,000-stream row
        argv += ["--max-in-flight", str(max(512, streams))]
        service = Service(side, argv, self.workdir)
        deadline = time.monotonic() + 60
        while "quotagate listening" not in service.log_path.read_text(errors="replace"):  # every worker listens
            if not service.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start:\n{service.log_tail()}")
            time.sleep(0.02)
        return service, port, key

    # -- measuring --

    def measure(self, side: str, streams: int, index: int, timing: Timing) -> Run:
        run = Run(side, streams, index)
        spawned = time.monotonic()
        service, port, auth = self.start_server(side, streams)
        try:
            run.listened_after = time.monotonic() - spawned
            self._load(run, service, port, auth, timing)
            if side != "ref":
                self._check_store(run)
            if not service.alive():
                run.problems.append(f"the server died:\n{service.log_tail()}")
            elif run.problems:
                run.problems.append(f"the server's log ends: {service.log_tail(3)[-600:]}")
        finally:
            service.stop()
        return run

    def _load(self, run: Run, service: Service, port: int, auth: str, timing: Timing) -> None:
        pids = process_tree(service.pid)
        workers = [p for p in pids if p != service.pid] or [service.pid]
        run.idle_rss = [rss_of(p) for p in workers]
        served = upstream_served(self.upstream_port)
        start = time.monotonic() + 0.4  # the clients' start (their interpreters load meanwhile)
        run.started = start
        clients, outs = [], []
        for i in range(CLIENTS):
            share = run.streams // CLIENTS + (i < run.streams % CLIENTS)
            spec = {
                "port": port,
                "streams": share,
                "start": start,
                "seconds": timing.cold + timing.warm,
                "users": USERS,
                "auth": auth,
                "policy": POLICY,
                "header": "RateLimit" if run.side != "ref" else "",
                "bodies": [b for b, _ in self.bodies],
                "events": [self.expected_events(i) for i in range(len(self.bodies))],
                "vocab": _VOCAB,
                "seed": 1000 * run.round + i,
                "ramp": 1.0,
            }
            spec_path = self.workdir / f"client-{run.side}-{run.streams}-{run.round}-{i}.json"
            spec_path.write_text(json.dumps(spec))
            outs.append(spec_path.with_suffix(".out.json"))
            clients.append(spec_path)
        cpu_before = children_cpu_seconds()
        procs = [
            subprocess.Popen([PYTHON, str(BENCH / "stream_client.py"), str(s), str(o)], cwd=ROOT)
            for s, o in zip(clients, outs, strict=True)
        ]
        while time.monotonic() < start:
            time.sleep(0.01)
        recorders = [self._profile(run, service, "cold", timing.cold)]
        run.samples.append(self._sample(pids, 0.0))
        marks = [timing.cold, timing.cold + timing.warm]
        while any(p.poll() is None for p in procs):
            now = time.monotonic() - start
            due = next((m for m in marks if m > now), now + 0.5)
            time.sleep(max(0.0, min(0.5, due - now)))
            run.samples.append(self._sample(pids, time.monotonic() - start))
            if len(recorders) == 1 and run.samples[-1].t >= timing.cold:
                recorders.append(self._profile(run, service, "warm", timing.warm))
        for name, recorder in zip(("cold", "warm"), recorders, strict=False):
            if recorder is not None:
                self._finish_profile(run, name, recorder)
        run.client_cpu = children_cpu_seconds() - cpu_before
        for proc, out in zip(procs, outs, strict=True):
            if proc.returncode != 0 or not out.exists():
                run.problems.append(f"a client process failed with status {proc.returncode}")
                continue
            data = json.loads(out.read_bytes())
            run.records += data["records"]
            run.problems += [f"client: {e}" for e in data["errors"][:5]]
        time.sleep(0.3)
        run.served = upstream_served(self.upstream_port) - served
        bad = sum(1 for r in run.records if not r[5])
        if bad:
            run.problems.append(f"{bad} of {len(run.records)} streams were not whole")
        if run.served != len(run.records) - bad:
            run.problems.append(f"the upstream served {run.served} streams for {len(run.records) - bad} whole ones")

    def _profile(self, run: Run, service: Service, phase: str, seconds: float) -> subprocess.Popen[bytes] | None:
        """With --profile DIR, py-spy records the gateway's processes during this phase."""
        if not self.args.profile:
            return None
        self.args.profile.mkdir(parents=True, exist_ok=True)
        return spy.start(service.pid, seconds, self._profile_path(run, phase))

    def _profile_path(self, run: Run, phase: str) -> Path:
        return self.args.profile / f"{run.side}-{run.streams}-{run.round}-{phase}.raw.txt"

    def _finish_profile(self, run: Run, phase: str, recorder: subprocess.Popen[bytes]) -> None:
        try:
            recorder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait()
        raw_path = self._profile_path(run, phase)
        if raw_path.exists():
            raw_path.with_suffix("").with_suffix(".top.txt").write_text(spy.summarize(raw_path, top=80))

    def _sample(self, pids: list[int], t: float) -> Sample:
        return Sample(
            t,
            cpu_seconds(pids),
            [rss_of(p) for p in pids],
            cpu_seconds([self.upstream.pid]),
            cpu_seconds([self.redis.pid]),
            machine_busy_seconds(),
        )

    def _check_store(self, run: Run) -> None:
        """Per user: requests, tokens and cents as the whole streams add up; nothing still held."""
        from quotagate.pricing import Pricer
        from quotagate.stores import open_store
        from quotagate.usage import Usage

        cost = Pricer().cost("openai", MODEL, Usage(PROMPT_TOKENS, WORDS))
        if cost is None:
            run.problems.append(f"no price for {MODEL}")
            return
        per_user = Counter(f"user-{int(r[6])}" for r in run.records if r[5])
        expected = {"request": 1, "token": PROMPT_TOKENS + WORDS, "cents": cost}

        async def read() -> list[Any]:
            store = open_store(self.redis_url)
            try:
                return await store.usage(limit=4 * USERS)
            finally:
                await store.close()

        found: dict[tuple[str, str | None], tuple[int, int]] = {
            (item.unit, item.value): (item.used, item.held) for item in asyncio.run(read())
        }
        wrong = []
        for unit, each in expected.items():
            for user, n in per_user.items():
                used, held = found.get((unit, user), (0, 0))
                if used != n * each or held:
                    wrong.append(f"{user} {unit}: used {used}, held {held}, expected {n * each}")
        if len(found) != 3 * len(per_user):
            wrong.append(f"{len(found)} budgets in the store for {len(per_user)} users")
        if wrong:
            run.problems.append(f"the store's counters differ from the streams ({len(wrong)}): " + "; ".join(wrong[:3]))


# --- figures -------------------------------------------------------------------------------------


@dataclass
class Figures:
    """One side of a row, its rounds together, one phase (cold or warm)."""

    streams: int = 0
    cpu: float = 0.0  # servers' CPU seconds
    seconds: float = 0.0
    first: list[float] = field(default_factory=list)
    added: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu / self.streams if self.streams else 0.0

    @property
    def rate(self) -> float:
        return self.streams / self.seconds if self.seconds else 0.0


def _cpu_at(run: Run, t: float) -> float:
    return min(run.samples, key=lambda s: abs(s.t - t)).server_cpu


def phase_figures(bench: Streams, runs: Sequence[Run], timing: Timing, warm: bool) -> Figures:
    out = Figures()
    for run in runs:
        lo, hi = (timing.cold, timing.cold + timing.warm) if warm else (0.0, timing.cold)
        ended = [r for r in run.records if r[2] >= 0 and lo <= r[0] + r[2] - run.started < hi]
        out.streams += len(ended)
        out.seconds += hi - lo
        out.cpu += _cpu_at(run, hi) - _cpu_at(run, lo)
        for r in (r for r in run.records if lo <= r[0] - run.started < hi):
            if r[1] >= 0:
                out.first.append(1000 * r[1])
            if r[2] >= 0:
                out.added.append(1000 * (r[2] - bench.nominal(run.side, int(r[7]))))
            out.gaps.append(1000 * r[3])
    for values in (out.first, out.added, out.gaps):
        values.sort()
    return out


def memory(runs: Sequence[Run], timing: Timing) -> tuple[float, float, float]:
    """Bytes per open stream (warm RSS minus idle, all workers), peak RSS (all server processes),
    idle RSS of a worker (mean)."""
    per_stream, peaks, idle = [], [], []
    for run in runs:
        base = sum(run.idle_rss)
        warm = [s for s in run.samples if timing.cold <= s.t <= timing.cold + timing.warm]
        workers = len(run.idle_rss)
        if warm:
            loaded = statistics.mean(sum(sorted(s.rss)[-workers:]) for s in warm)
            per_stream.append((loaded - base) / run.streams)
        peaks.append(max(sum(s.rss) for s in run.samples))
        idle += run.idle_rss
    return statistics.mean(per_stream or [0]), max(peaks), statistics.mean(idle or [0])


def other_load(runs: Sequence[Run]) -> float:
    """Cores busy with processes outside the benchmark during these runs."""
    busy = seconds = 0.0
    for run in runs:
        a, b = run.samples[0], run.samples[-1]
        ours = (b.server_cpu - a.server_cpu) + (b.upstream_cpu - a.upstream_cpu) + (b.redis_cpu - a.redis_cpu)
        busy += max(0.0, (b.machine_busy - a.machine_busy) - ours - run.client_cpu)
        seconds += b.t - a.t
    return busy / seconds if seconds else 0.0


def _ratio(a: float, b: float) -> str:
    return f"{X}{a / b:.2f}" if b else "—"


def _label(side: str) -> str:
    return {"ref": "reference", "gateway": "quotagate"}.get(side, f"quotagate {side}")


def row_table(bench: Streams, streams: int, runs: list[Run], timing: Timing) -> list[str]:
    """The row's figures: the reference, then each gateway side with its ratio to the reference."""
    sides = list(dict.fromkeys(r.side for r in runs))
    by_side = {side: [r for r in runs if r.side == side] for side in sides}
    warm = {side: phase_figures(bench, rs, timing, True) for side, rs in by_side.items()}
    cold = {side: phase_figures(bench, rs, timing, False) for side, rs in by_side.items()}
    mem = {side: memory(rs, timing) for side, rs in by_side.items()}
    others = [side for side in sides if side != "ref"]
    head = "| figure | reference |" + "".join(f" {_label(s)} | {X} ref |" for s in others)
    lines = [f"#### {streams:,} concurrent streams", "", head, "|---|---:|" + "---:|---:|" * len(others)]

    def add(name: str, values: dict[str, float], fmt: str = "{:,.2f}", diff: bool = False) -> None:
        ref = values.get("ref", 0.0)
        cells = [fmt.format(ref)]
        for side in others:
            value = values[side]
            compared = f"{value - ref:+,.1f} ms" if diff else _ratio(value, ref)
            cells += [fmt.format(value), compared]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    p = percentile
    add("CPU per stream, warm (ms)", {k: f.cpu_ms for k, f in warm.items()})
    add(f"CPU per stream, first {timing.cold:g} s (ms)", {k: f.cpu_ms for k, f in cold.items()})
    add("streams/s, warm", {k: f.rate for k, f in warm.items()}, "{:,.0f}")
    add(f"streams/s, first {timing.cold:g} s", {k: f.rate for k, f in cold.items()}, "{:,.0f}")
    for label, phase in (("warm", warm), (f"first {timing.cold:g} s", cold)):
        for name, attr, q in (
            ("time to first event p50", "first", 50),
            ("time to first event p99", "first", 99),
            ("added duration p50", "added", 50),
            ("added duration p99", "added", 99),
            ("longest gap between events p99", "gaps", 99),
            ("longest gap between events max", "gaps", 100),
        ):
            add(f"{name}, {label} (ms)", {k: p(getattr(f, attr), q) for k, f in phase.items()}, "{:,.1f}", True)
    add("memory per open stream (KB)", {k: m[0] / 1024 for k, m in mem.items()}, "{:,.1f}")
    add("peak RSS, all server processes (MB)", {k: m[1] / 2**20 for k, m in mem.items()}, "{:,.0f}")
    add("idle worker RSS (MB)", {k: m[2] / 2**20 for k, m in mem.items()}, "{:,.1f}")
    for side in others:
        pairs = zip(by_side["ref"], by_side[side], strict=False) if "ref" in by_side else []
        rounds = ", ".join(
            _ratio(phase_figures(bench, [g], timing, True).cpu_ms, phase_figures(bench, [r], timing, True).cpu_ms)
            for r, g in pairs
        )
        lines.append(f"| {_label(side)}: CPU per stream, warm, {X} ref round by round | {rounds} |")
    for side, rs in by_side.items():
        n = sum(len(r.records) for r in rs)
        up = sum(r.samples[-1].upstream_cpu - r.samples[0].upstream_cpu for r in rs)
        redis = sum(r.samples[-1].redis_cpu - r.samples[0].redis_cpu for r in rs)
        secs = sum(r.samples[-1].t - r.samples[0].t for r in rs) or 1.0
        clients = sum(r.client_cpu for r in rs)
        lines.append(
            f"| {_label(side)}: streams; Redis CPU ms/stream; upstream, clients, other load (cores) | "
            f"{n:,}; {1000 * redis / max(1, n):.3f}; {up / secs:.2f}, {clients / secs:.2f}, {other_load(rs):.2f} |"
        )
    problems = [f"{_label(r.side)} round {r.round + 1}: {p}" for r in runs for p in r.problems]
    lines.append(
        f"| checks: every stream whole, the store charged what streamed | {'ok' if not problems else '**failed**'} |"
    )
    lines.append("")
    lines += [f"- ✗ {p}" for p in problems[:10]]
    return lines


def environment(timing: Timing) -> list[str]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True)
    return [
        f"- when: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; commit {commit.stdout.strip()}"
        + (" with uncommitted changes in src/" if dirty.stdout.strip() else ""),
        f"- machine: {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}; "
        f"load average at the end {os.getloadavg()[0]:.2f}",
        f"- each run: a fresh server, {timing.cold:g} s counted as its start, then {timing.warm:g} s warm; "
        f"{timing.rounds} round(s), reference first; {WORDS} words {DELAY * 1000:g} ms apart, {USERS:,} users",
    ]


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round, 10 s + 10 s")
    parser.add_argument("--rows", type=int, nargs="+", default=[500, 2000], metavar="C", help="concurrent streams")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--cold", type=float, help="seconds after the start counted apart")
    parser.add_argument("--warm", type=float, help="seconds of load after those")
    parser.add_argument("--only", choices=("ref", "gateway"), help="measure one side only (profiling)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=SRC",
        help="also run the gateway from this src/ directory (another commit's: git archive REV src | tar -x -C DIR)",
    )
    parser.add_argument("--no-tree", action="store_true", help="only the --variant gateways, not this tree's")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy recordings of the gateway, cold and warm")
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="directory for streams.md and streams.json")
    return parser.parse_args(argv)


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    timing = QUICK if args.quick else FULL
    timing = Timing(args.cold or timing.cold, args.warm or timing.warm, args.rounds or timing.rounds)
    args.variants = dict(v.split("=", 1) for v in args.variant)
    sides = [args.only] if args.only else ["ref"] + ["gateway"] * (not args.no_tree) + list(args.variants)
    started = time.monotonic()
    text = ["### Streams (bench/streams.py" + (" --quick" if args.quick else "") + ")", "", *environment(timing), ""]
    runs_all: dict[int, list[Run]] = {}
    ok = True
    with bench_session(args, Streams, "quotagate-streams-") as bench:
        for streams in args.rows:
            runs: list[Run] = []
            for index in range(timing.rounds):
                for side in sides:
                    print(
                        f"[{time.monotonic() - started:5.0f} s] {streams} streams, {side}, round {index + 1}",
                        file=sys.stderr,
                        flush=True,
                    )
                    run = bench.measure(side, streams, index, timing)
                    print(
                        f"          {len(run.records)} streams; {'; '.join(run.problems) or 'ok'}",
                        file=sys.stderr,
                        flush=True,
                    )
                    runs.append(run)
            runs_all[streams] = runs
            ok = ok and not any(r.problems for r in runs)
            if not args.only:
                text += row_table(bench, streams, runs, timing)
    text[2] = environment(timing)[0]  # the time at the end
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "streams.md").write_text("\n".join(text) + "\n")
    raw = {str(k): [{**asdict(r), "records": len(r.records)} for r in v] for k, v in runs_all.items()}
    (args.out / "streams.json").write_text(json.dumps(raw, indent=1) + "\n")
    print("\n".join(text))
    print(f"written to {args.out / 'streams.md'} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
