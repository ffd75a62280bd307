"""quotagate's benchmark: the gateway beside a minimal reverse proxy, measured in one run.

    .venv/bin/python bench/run.py            # the full run (about 8 minutes)
    .venv/bin/python bench/run.py --quick    # a smoke run (about 2 minutes)

It starts everything on free loopback ports: the canned-bytes upstream (bench/upstream.py), the
reference proxy (bench/refproxy.py) with 1 and 2 workers, a private redis-server, and quotagate
in each scenario, and drives them with wrk (bench/load.lua). For every row it measures the highest
throughput, the latency at fixed rates of 200 and 1,000 requests/s (wrk2-style schedule, measured
from the intended send time), the servers' CPU time per request (from /proc), and the time to the
first byte of a streamed response. Every figure is checked while it is measured: the status of every
response, and the number of requests that really reached the upstream. The table goes to stdout and
to bench/results/latest.md (raw figures: latest.json). bench/README.md explains the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import spy
from report import RATES, Phase, Row, Scenario, Stream, X, mark, markdown, merge, percentile, raw
from store_steps import THREE_POLICIES

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
TICK = os.sysconf("SC_CLK_TCK")
USERS = 10_000
EXHAUSTED = "1;w=3600, 100000000;w=60;u=cents;s=user, 1000000000;w=60;u=token;s=user"
BODY = (
    b'{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful assistant."},'
    b'{"role":"user","content":"Write a haiku about rate limits and budgets."}],"max_tokens":64,"temperature":0.7}'
)
STREAM_BODY = BODY[:-1] + b',"stream":true}'
REF_AUTH = "qg_not_checked_by_the_reference"


# --- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """How long each measurement runs, in seconds."""

    warmup: float
    max_run: float  # flat out, in all (split over the rounds of a paired row)
    rate_run: float
    stream_samples: int
    rounds: int  # gateway and reference flat out in turn, this many times each


FULL = Timing(warmup=2, max_run=12, rate_run=8, stream_samples=25, rounds=3)
QUICK = Timing(warmup=1, max_run=3, rate_run=3, stream_samples=8, rounds=1)


SCENARIOS = (
    Scenario("direct", "upstream, called directly", "direct"),
    Scenario("ref1", "reference proxy, 1 worker", "refproxy", 1),
    Scenario("ref2", "reference proxy, 2 workers", "refproxy", 2),
    Scenario("none-sqlite-1", "quotagate, no policy, SQLite, 1 worker", "quotagate", 1, "sqlite"),
    Scenario("none-redis-2", "quotagate, no policy, Redis, 2 workers", "quotagate", 2, "redis"),
    Scenario("three-sqlite-1", "quotagate, 3 policies, SQLite, 1 worker", "quotagate", 1, "sqlite", THREE_POLICIES),
    Scenario("three-sqlite-2", "quotagate, 3 policies, SQLite, 2 workers", "quotagate", 2, "sqlite", THREE_POLICIES),
    Scenario("three-redis-1", "quotagate, 3 policies, Redis, 1 worker", "quotagate", 1, "redis", THREE_POLICIES),
    Scenario("three-redis-2", "quotagate, 3 policies, Redis, 2 workers", "quotagate", 2, "redis", THREE_POLICIES),
    Scenario("deny-sqlite-1", "quotagate, 429 path, SQLite, 1 worker", "quotagate", 1, "sqlite", EXHAUSTED, 429),
    Scenario("deny-redis-2", "quotagate, 429 path, Redis, 2 workers", "quotagate", 2, "redis", EXHAUSTED, 429),
)


@dataclass(frozen=True)
class Traffic:
    """What every request of a run carries, and the header every response must carry."""

    auth: str
    policy: str | None
    header: str = ""


@dataclass(frozen=True)
class LoadShape:
    """wrk's threads and connections for each kind of run."""

    max_threads: int = 2
    max_connections: int = 64
    rate_connections: int = 16


# --- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """A server process this run started (in its own session), its log, and how to stop it."""

    def __init__(self, name: str, argv: Sequence[str], logdir: Path, cpus: str | None = None) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        command = ["taskset", "-c", cpus, *argv] if cpus else list(argv)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                command,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        """SIGTERM to this service's own process group, SIGKILL if it does not go within 10 s."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)


def wait_listening(service: Service, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            raise RuntimeError(f"{service.name} exited at start:\n{service.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{service.name} did not listen on port {port} within {timeout:g} s:\n{service.log_tail()}")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_by_pid(pids: Sequence[int]) -> dict[int, float]:
    """User + system CPU time of each of these processes so far, in seconds."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    return sum(cpu_by_pid(pids).values())


def settle(pids: Sequence[int], upstream_port: int, timeout: float = 15.0) -> None:
    """Wait until the servers have finished what the last run left in flight (no CPU, no upstream calls)."""
    deadline = time.monotonic() + timeout
    last = (cpu_seconds(pids), upstream_served(upstream_port))
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = (cpu_seconds(pids), upstream_served(upstream_port))
        if now == last:
            return
        last = now


def machine_busy_seconds() -> float:
    """CPU time all processes of the machine have spent (user, nice, system; all cores), from /proc/stat.

    Interrupt and softirq time (where the kernel does much of the loopback traffic's work, ours too)
    and time stolen by the hypervisor are left out: no process's own CPU time includes them either.
    """
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (values[0] + values[1] + values[2]) / TICK


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- HTTP probes ---------------------------------------------------------------------------------


def request_headers(traffic: Traffic, user: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench-not-a-real-key"}
    headers["Helicone-Auth"] = f"Bearer {traffic.auth}"
    if traffic.policy:
        headers["Helicone-RateLimit-Policy"] = traffic.policy
    headers["Helicone-User-Id"] = user
    return headers


def post(port: int, headers: dict[str, str], body: bytes = BODY) -> tuple[int, dict[str, str], bytes]:
    """One POST /v1/chat/completions; (status, headers, body) whatever the status."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def upstream_served(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/__bench/stats", timeout=5) as resp:
        return int(json.loads(resp.read())["served"])


def check_response(scenario: Scenario, status: int, headers: dict[str, str], body: bytes) -> str | None:
    """What is wrong with a probe's response, or None."""
    if status != scenario.expect:
        return f"expected status {scenario.expect}, got {status}: {body[:200]!r}"
    lower = {k.lower(): v for k, v in headers.items()}
    if scenario.expect == 200 and b"chatcmpl-" not in body:
        return f"the body is not the upstream's completion: {body[:200]!r}"
    if scenario.policy:
        policies = lower.get("ratelimit-policy", "")
        if policies.count('"p') != 3 or "helicone-ratelimit-remaining" not in lower:
            return f"rate-limit headers missing or incomplete: RateLimit-Policy={policies!r}"
    if scenario.expect == 429 and (lower.get("x-helicone-error") != "rate_limited" or b'"rate_limited"' not in body):
        return f"a 429 without the rate_limited error: {body[:200]!r}"
    return None


def stream_once(sock: socket.socket, request: bytes, header: str) -> Stream:
    """Send one streaming request on a keep-alive connection and read the chunked SSE response."""
    sent = time.perf_counter()
    sock.sendall(request)
    data, first = b"", 0.0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError(f"connection closed mid-stream after {data[:300]!r}")
        data += chunk
        head_end = data.find(b"\r\n\r\n")
        if not first and head_end >= 0 and b"data:" in data[head_end:]:
            first = time.perf_counter() - sent
        if head_end >= 0 and data.endswith(b"0\r\n\r\n") and b"[DONE]" in data:
            break
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"stream answered {data[:200]!r}")
    head = data[: data.find(b"\r\n\r\n")].lower()
    if header and f"\r\n{header.lower()}:".encode() not in head:
        raise RuntimeError(f"a stream without the {header} header: {head[:300]!r}")
    return Stream(first, time.perf_counter() - sent)


def measure_stream(port: int, traffic: Traffic, samples: int) -> list[Stream]:
    """`samples` streamed responses one after another on one keep-alive connection (first one discarded)."""
    results = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(samples + 1):
            headers = request_headers(traffic, f"stream-user-{i}")
            lines = [
                "POST /v1/chat/completions HTTP/1.1",
                f"Host: 127.0.0.1:{port}",
                f"Content-Length: {len(STREAM_BODY)}",
            ]
            lines += [f"{k}: {v}" for k, v in headers.items()]
            request = ("\r\n".join(lines) + "\r\n\r\n").encode() + STREAM_BODY
            result = stream_once(sock, request, traffic.header)
            if i:
                results.append(result)
    return results


# --- load ----------------------------------------------------------------------------------------


class Load:
    """Runs wrk against one target and accounts for every process's CPU during the run."""

    def __init__(self, workdir: Path, upstream: Service, upstream_port: int, shape: LoadShape, cpus: str | None):
        self.workdir = workdir
        self.upstream = upstream
        self.upstream_port = upstream_port
        self.shape = shape
        self.cpus = cpus
        self.store_pids: list[int] = []

    def run(self, name: str, port: int, server_pid: int, seconds: float, rate: int, traffic: Traffic) -> Phase:
        threads = self.shape.rate_connections if rate else self.shape.max_threads
        connections = self.shape.rate_connections if rate else self.shape.max_connections
        out = self.workdir / f"wrk-{name}.json"
        env = {
            **os.environ,
            "BENCH_RATE": str(rate),
            "BENCH_THREADS": str(threads),
            "BENCH_USERS": str(USERS),
            "BENCH_OUT": str(out),
            "BENCH_AUTH": traffic.auth,
            "BENCH_POLICY": traffic.policy or "",
            "BENCH_HEADER": traffic.header,
        }
        argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s"]
        argv += ["-s", str(BENCH / "load.lua"), f"http://127.0.0.1:{port}"]
        if self.cpus:
            argv = ["taskset", "-c", self.cpus, *argv]
        server = process_tree(server_pid)
        settle(server + self.store_pids, self.upstream_port)
        before, workers_before = self._cpu(server), cpu_by_pid(server)
        served = upstream_served(self.upstream_port)
        started = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, timeout=seconds + 60)
        elapsed = time.perf_counter() - started
        after, workers_after = self._cpu(server), cpu_by_pid(server)
        phase = Phase(name, rate)
        phase.reached_upstream = upstream_served(self.upstream_port) - served
        phase.server_cpu, phase.upstream_cpu, phase.store_cpu, phase.loadgen_cpu, phase.machine_busy = (
            a - b for a, b in zip(after, before, strict=True)
        )
        phase.worker_cpu = [workers_after[p] - workers_before[p] for p in server if p in workers_after]
        self._read(phase, out, elapsed)
        return phase

    def _cpu(self, server: list[int]) -> tuple[float, float, float, float, float]:
        return (
            cpu_seconds(server),
            cpu_seconds([self.upstream.pid]),
            cpu_seconds(self.store_pids),
            children_cpu_seconds(),
            machine_busy_seconds(),
        )

    @staticmethod
    def _read(phase: Phase, out: Path, elapsed: float) -> None:
        data = json.loads(out.read_text())
        errors = data["errors"]
        phase.requests = int(data["requests"])
        phase.seconds = data["duration_us"] / 1e6 or elapsed
        phase.status_errors = int(errors["status"])
        phase.socket_errors = sum(int(errors[k]) for k in ("connect", "read", "write", "timeout"))
        phase.statuses = {str(k): int(v) for k, v in data["statuses"].items()}
        phase.missing_header = int(data["missing_header"])
        latencies = sorted(float(v) for v in data["latency_us"])
        if latencies:
            phase.p50_ms, phase.p99_ms = percentile(latencies, 50) / 1000, percentile(latencies, 99) / 1000
        else:
            phase.p50_ms, phase.p99_ms = data["wrk_p50_us"] / 1000, data["wrk_p99_us"] / 1000


def verify(phase: Phase, scenario: Scenario, connections: int) -> None:
    """Record in `phase.problems` every way this run's responses differ from what the scenario expects."""
    if phase.requests == 0:
        phase.problems.append("no response at all")
        return
    if phase.socket_errors:
        phase.problems.append(f"{phase.socket_errors} socket errors or timeouts")
    if phase.missing_header:
        phase.problems.append(f"{phase.missing_header} responses without rate-limit headers (let through unlimited?)")
    if phase.statuses:
        wrong = {code: n for code, n in phase.statuses.items() if code != str(scenario.expect)}
        if wrong:
            phase.problems.append(f"statuses other than {scenario.expect}: {wrong}")
    elif scenario.expect == 200 and phase.status_errors:
        phase.problems.append(f"{phase.status_errors} error responses")
    elif scenario.expect != 200 and phase.status_errors != phase.requests:
        phase.problems.append(f"only {phase.status_errors} of {phase.requests} responses were errors")
    expected_upstream = phase.requests if scenario.expect == 200 else 0
    if not expected_upstream <= phase.reached_upstream <= expected_upstream + connections:
        phase.problems.append(f"{phase.reached_upstream} requests reached the upstream for {phase.requests} responses")


class Bench:
    """Everything one run starts, and the rows it measures."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.timing = QUICK if args.quick else FULL
        if args.rounds:
            self.timing = dataclasses.replace(self.timing, rounds=args.rounds)
        self.workdir = workdir
        self.shape = LoadShape()
        self.services: list[Service] = []
        self.refs: dict[int, tuple[Service, int]] = {}
        self.upstream_port = free_port()
        try:
            self.upstream = self.start(
                "upstream",
                [PYTHON, str(BENCH / "upstream.py"), "--port", str(self.upstream_port)],
                self.upstream_port,
                args.upstream_cpus,
            )
            self.load = Load(workdir, self.upstream, self.upstream_port, self.shape, args.load_cpus)
            self.redis_url, self.redis_problem = self.start_redis()
        except BaseException:
            self.close()
            raise

    def start(self, name: str, argv: Sequence[str], port: int, cpus: str | None = None) -> Service:
        service = Service(name, argv, self.workdir, cpus)
        self.services.append(service)
        wait_listening(service, port)
        return service

    def stop(self, service: Service) -> None:
        service.stop()
        if service in self.services:
            self.services.remove(service)

    def close(self) -> None:
        for service in reversed(self.services):
            service.stop()

    def start_redis(self) -> tuple[str | None, str | None]:
        """A private redis-server on a free port, or the --redis-url given; (url, why not)."""
        if self.args.redis_url:
            return self.args.redis_url, None
        binary = shutil.which("redis-server")
        if binary is None:
            return None, "redis-server is not installed (apt-get install redis-server), or pass --redis-url"
        port = free_port()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        service = self.start("redis", argv, port, self.args.server_cpus)
        self.load.store_pids = [service.pid]
        return f"redis://127.0.0.1:{port}/0", None

    # -- stores and keys --

    def store_url(self, scenario: Scenario) -> str:
        if scenario.store == "sqlite":
            return f"sqlite:///{self.workdir / (scenario.key + '.db')}"
        assert self.redis_url is not None
        flush_redis(self.redis_url)
        return self.redis_url

    # -- servers --

    def reference(self, workers: int) -> tuple[Service, int]:
        """The reference proxy with this many workers, started once and kept (idle) for the whole run."""
        if workers not in self.refs:
            port = free_port()
            argv = [PYTHON, str(BENCH / "refproxy.py"), "--port", str(port)]
            argv += ["--upstream", f"http://127.0.0.1:{self.upstream_port}", "--workers", str(workers)]
            self.refs[workers] = (self.start(f"ref{workers}", argv, port, self.args.server_cpus), port)
            time.sleep(0.5 if workers > 1 else 0.1)  # let every worker bind
        return self.refs[workers]

    def start_target(self, scenario: Scenario) -> tuple[Service | None, int, str | None]:
        """Start the server a row measures; (service, port, gateway key)."""
        if scenario.kind == "direct":
            return None, self.upstream_port, None
        if scenario.kind == "refproxy":
            return (*self.reference(scenario.workers), None)
        port = free_port()
        upstream = f"http://127.0.0.1:{self.upstream_port}"
        store = self.store_url(scenario)
        key = create_key(store)
        argv = [PYTHON, "-m", "quotagate", "serve", "--host", "127.0.0.1", "--port", str(port), "--store", store]
        argv += ["--workers", str(scenario.workers), "--openai-base-url", upstream, "--no-access-log"]
        argv += ["--log-level", "warning"]
        service = self.start(scenario.key, argv, port, self.args.server_cpus)
        time.sleep(0.5 if scenario.workers > 1 else 0.1)  # let every worker bind
        return service, port, key

    # -- measuring --

    def measure(self, scenario: Scenario) -> Row:
        row = Row(scenario)
        if scenario.store == "redis" and self.redis_url is None:
            row.skipped = f"not run: {self.redis_problem}"
            return row
        try:
            service, port, key = self.start_target(scenario)
        except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
            row.skipped = f"not run: {_first_line(exc)}"
            return row
        try:
            self.measure_running(row, service, port, key)
        except (RuntimeError, subprocess.SubprocessError, OSError, ValueError, KeyError) as exc:
            row.problems.append(f"measurement failed: {_first_line(exc)}")
            if service is not None:
                row.problems.append(f"server log: {service.log_tail(5)}")
        finally:
            if service is not None and scenario.kind == "quotagate":
                self.stop(service)
        return row

    def measure_running(self, row: Row, service: Service | None, port: int, key: str | None) -> None:
        scenario = row.scenario
        traffic = Traffic(key or REF_AUTH, scenario.policy if scenario.gateway else THREE_POLICIES)
        if scenario.policy:
            traffic = Traffic(traffic.auth, traffic.policy, "RateLimit")
        if not self.probe(row, port, traffic):
            return
        pid = service.pid if service is not None else self.upstream.pid
        t, name = self.timing, scenario.key
        self.load.run(f"{name}-warm", port, pid, t.warmup, 0, traffic)
        if scenario.gateway and not self.args.no_pairing:
            self.measure_paired(row, port, pid, traffic)
        else:
            row.phases["max"] = self.load.run(f"{name}-max", port, pid, t.max_run, 0, traffic)
            verify(row.phases["max"], scenario, self.shape.max_connections)
        top = row.phases["max"]
        for rate in RATES:
            if scenario.gateway and top.rate < 0.9 * rate:
                row.notes[str(rate)] = f"not run: its maximum is {top.rate:,.0f} req/s"
                continue
            self.load.run(f"{name}-{rate}-warm", port, pid, t.warmup, rate, traffic)
            row.phases[str(rate)] = phase = self.load.run(f"{name}-{rate}", port, pid, t.rate_run, rate, traffic)
            verify(phase, scenario, self.shape.rate_connections)
        if scenario.expect == 200:
            row.stream = measure_stream(port, traffic, t.stream_samples)
        if service is not None and not service.alive():
            row.problems.append(f"the server died during the run:\n{service.log_tail()}")

    def start_profile(self, row: Row, pid: int, seconds: float) -> subprocess.Popen[bytes] | None:
        """With --profile, py-spy records the gateway's processes during (the first round of) its flat-out run."""
        if not self.args.profile or not row.scenario.gateway:
            return None
        self.args.profile.mkdir(parents=True, exist_ok=True)
        recorder = spy.start(pid, seconds, self.args.profile / f"{row.scenario.key}.raw.txt")
        time.sleep(0.5)  # let py-spy attach before the load starts
        return recorder

    def finish_profile(self, row: Row, recorder: subprocess.Popen[bytes]) -> None:
        try:
            recorder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait()
        raw_path = self.args.profile / f"{row.scenario.key}.raw.txt"
        if raw_path.exists():
            (self.args.profile / f"{row.scenario.key}.top.txt").write_text(spy.summarize(raw_path))
        row.notes["profiled"] = "max req/s measured under py-spy (slower than without)"

    def measure_paired(self, row: Row, port: int, pid: int, traffic: Traffic) -> None:
        """The gateway and the reference with as many workers flat out in turn, so both see the same machine.

        `rounds` times each, alternating (reference first); each side's figures are the sum of its rounds.
        """
        scenario, t = row.scenario, self.timing
        ref_service, ref_port = self.reference(scenario.workers)
        ref_traffic = Traffic(REF_AUTH, THREE_POLICIES)
        ref_scenario = Scenario(f"ref{scenario.workers}", "reference", "refproxy", scenario.workers)
        seconds = t.max_run / t.rounds
        self.load.run(f"{scenario.key}-ref-warm", ref_port, ref_service.pid, t.warmup, 0, ref_traffic)
        refs, tops = [], []
        for i in range(t.rounds):
            ref = self.load.run(f"{scenario.key}-ref-max{i}", ref_port, ref_service.pid, seconds, 0, ref_traffic)
            verify(ref, ref_scenario, self.shape.max_connections)
            refs.append(ref)
            recorder = self.start_profile(row, pid, seconds) if i == 0 else None
            top = self.load.run(f"{scenario.key}-max{i}", port, pid, seconds, 0, traffic)
            if recorder is not None:
                self.finish_profile(row, recorder)
            verify(top, scenario, self.shape.max_connections)
            tops.append(top)
        row.phases["ref-max"], row.phases["max"] = merge("ref-max", refs), merge("max", tops)

    def probe(self, row: Row, port: int, traffic: Traffic) -> bool:
        """Check the row answers as it should before measuring it; exhaust the budget of a 429 row."""
        scenario = row.scenario
        headers = request_headers(traffic, "probe-user")
        if scenario.expect == 429:
            status, _, body = post(port, headers)
            if status != 200:
                row.problems.append(f"the request that exhausts the budget got {status}: {body[:200]!r}")
                return False
        for _ in range(3):
            problem = check_response(scenario, *post(port, headers))
            if problem:
                row.problems.append(f"probe: {problem}")
                return False
        return True


def create_key(store: str, name: str = "bench", env: dict[str, str] | None = None) -> str:
    """A new gateway key in `store`, made by the CLI (`env`: another tree's PYTHONPATH, say)."""
    result = subprocess.run(
        [PYTHON, "-m", "quotagate", "keys", "create", "--name", name, "--store", store],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        said = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise RuntimeError(f"quotagate keys create --store {store} failed: {said[-1][:300]}")
    return lines[-1].strip()


def flush_redis(url: str) -> None:
    """Empty the benchmark's own Redis database (FLUSHDB of that db only)."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.flushdb()
    except redis.RedisError as exc:
        raise RuntimeError(f"Redis at {url} is not usable: {exc}") from exc
    finally:
        client.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    return text.splitlines()[0][:300]


# --- the report ----------------------------------------------------------------------------------


def environment(args: argparse.Namespace, timing: Timing, shape: LoadShape) -> list[str]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    pins = (
        f"wrk on CPUs {args.load_cpus or 'any'}, upstream on {args.upstream_cpus or 'any'}, "
        f"servers and redis on {args.server_cpus or 'any'}"
    )
    return [
        f"- when: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; commit {commit.stdout.strip()}"
        + (" with uncommitted changes in src/" if dirty.stdout.strip() else ""),
        f"- machine: {os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python {platform.python_version()}",
        f"- load: wrk 4.1 with bench/load.lua; flat out {shape.max_threads} threads {X} {shape.max_connections} "
        f"connections for {timing.max_run:g} s; fixed rates {shape.rate_connections} connections for "
        f"{timing.rate_run:g} s each, after {timing.warmup:g} s of warm-up; {USERS:,} distinct users",
        f"- placement: {pins}; load average at the end {os.getloadavg()[0]:.2f}",
    ]


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test of the harness")
    parser.add_argument("--only", nargs="+", metavar="ROW", help="measure only these rows (see --list)")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument(
        "--rounds", type=int, help="flat-out rounds of gateway and reference in turn (full run: 3, quick: 1)"
    )
    parser.add_argument(
        "--no-pairing", action="store_true", help="do not measure the reference again right before each gateway row"
    )
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="record each gateway row's flat-out run with py-spy into DIR"
    )
    parser.add_argument("--redis-url", help="use this Redis db (FLUSHDB'd) instead of a private redis-server")
    parser.add_argument("--load-cpus", help="taskset CPU list for wrk, e.g. 0")
    parser.add_argument("--upstream-cpus", help="taskset CPU list for the upstream")
    parser.add_argument("--server-cpus", help="taskset CPU list for the proxies, quotagate and redis")
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="directory for latest.md and latest.json")
    return parser.parse_args(argv)


def selected(args: argparse.Namespace) -> list[Scenario]:
    if not args.only:
        return list(SCENARIOS)
    wanted = set(args.only)
    unknown = wanted - {s.key for s in SCENARIOS}
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; --list shows them")
    return [s for s in SCENARIOS if s.key in wanted]


class Harness(Protocol):
    def close(self) -> None: ...


H = TypeVar("H", bound=Harness)


@contextlib.contextmanager
def bench_session(
    args: argparse.Namespace, make: Callable[[argparse.Namespace, Path], H], prefix: str = "quotagate-bench-"
) -> Iterator[H]:
    """A harness (`Bench`, `streams.Streams`) in a temporary directory, closed whatever happens."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        bench = make(args, Path(tmp))
        try:
            yield bench
        finally:
            bench.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for s in SCENARIOS:
            print(f"{s.key:16} {s.label}")
        return 0
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    scenarios = selected(args)
    rows: dict[str, Row] = {}
    started = time.monotonic()
    with bench_session(args, Bench) as bench:
        for scenario in scenarios:
            print(f"[{time.monotonic() - started:5.0f} s] {scenario.label} ...", file=sys.stderr, flush=True)
            rows[scenario.key] = row = bench.measure(scenario)
            print(f"          {mark(row)}", file=sys.stderr, flush=True)
        title = "quotagate benchmark" + (" (quick run)" if args.quick else "")
        text = markdown(rows, title, environment(args, bench.timing, bench.shape))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.md").write_text(text + "\n")
    (args.out / "latest.json").write_text(json.dumps(raw(rows), indent=1) + "\n")
    print(text)
    print(f"written to {args.out / 'latest.md'} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0 if all(row.ok for row in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
