"""What the benchmark measured, and the markdown tables it prints (bench/run.py does the measuring).

Every ratio compares a row with the reference proxy of the same worker count: for the highest
throughput and its CPU, with the reference's run made right before the row's own ("paired"), so that
both saw the same machine; for the fixed-rate latencies, with the reference's own row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

RATES = (200, 1000)
X = "\u00d7"  # the multiplication sign of ratios
NOISY = 0.3  # cores of other load during a run above which its comparison is flagged


@dataclass(frozen=True)
class Scenario:
    """One row of the table."""

    key: str
    label: str
    kind: str  # direct | refproxy | quotagate
    workers: int = 1
    store: str | None = None  # sqlite | redis
    policy: str | None = None
    expect: int = 200

    @property
    def gateway(self) -> bool:
        return self.kind == "quotagate"


@dataclass
class Stream:
    """Time to the first SSE event and to the end of one streamed response, in seconds."""

    first: float
    total: float


@dataclass
class Phase:
    """One wrk run and what the processes spent during it."""

    name: str
    target_rate: int
    requests: int = 0
    seconds: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    status_errors: int = 0
    socket_errors: int = 0
    missing_header: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    server_cpu: float = 0.0
    upstream_cpu: float = 0.0
    store_cpu: float = 0.0
    loadgen_cpu: float = 0.0
    machine_busy: float = 0.0
    reached_upstream: int = 0
    worker_cpu: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def sustained(self) -> bool:
        """Whether a fixed-rate run kept its rate (a server that cannot is slower, not wrong)."""
        return not self.target_rate or self.rate >= 0.97 * self.target_rate

    @property
    def cpu_ms_per_request(self) -> float:
        """The servers' CPU time (user + system, all their processes) per response."""
        return 1000 * self.server_cpu / self.requests if self.requests else 0.0

    @property
    def store_ms_per_request(self) -> float:
        """The Redis server's CPU time per response (SQLite works inside the gateway's processes)."""
        return 1000 * self.store_cpu / self.requests if self.requests else 0.0

    @property
    def busiest_worker(self) -> float | None:
        """The busiest server process's share of the servers' CPU (0.5 is an even split of two workers)."""
        busy = [c for c in self.worker_cpu if c > 0.05 * self.server_cpu]
        return max(busy) / sum(busy) if len(busy) > 1 else None

    @property
    def other_load(self) -> float:
        """Cores kept busy by processes that are not part of this benchmark."""
        ours = self.server_cpu + self.upstream_cpu + self.store_cpu + self.loadgen_cpu
        return max(0.0, self.machine_busy - ours) / self.seconds if self.seconds else 0.0


@dataclass
class Row:
    """A scenario's phases: "max", "ref-max" (the paired reference), "200", "1000"."""

    scenario: Scenario
    phases: dict[str, Phase] = field(default_factory=dict)
    stream: list[Stream] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None
    problems: list[str] = field(default_factory=list)

    def phase(self, name: str) -> Phase | None:
        return self.phases.get(name)

    @property
    def ok(self) -> bool:
        return not self.skipped and not self.problems and not any(p.problems for p in self.phases.values())


def merge(name: str, phases: Sequence[Phase]) -> Phase:
    """Several runs of the same kind as one: counts and CPU times add up, latencies are averaged."""
    out = Phase(name, phases[0].target_rate)
    for phase in phases:
        out.requests += phase.requests
        out.seconds += phase.seconds
        for code, n in phase.statuses.items():
            out.statuses[code] = out.statuses.get(code, 0) + n
        out.status_errors += phase.status_errors
        out.socket_errors += phase.socket_errors
        out.missing_header += phase.missing_header
        out.server_cpu += phase.server_cpu
        out.upstream_cpu += phase.upstream_cpu
        out.store_cpu += phase.store_cpu
        out.loadgen_cpu += phase.loadgen_cpu
        out.machine_busy += phase.machine_busy
        out.reached_upstream += phase.reached_upstream
        if len(out.worker_cpu) == len(phase.worker_cpu):
            out.worker_cpu = [a + b for a, b in zip(out.worker_cpu, phase.worker_cpu, strict=True)]
        else:  # the first run, or a worker came or went: keep the latest split
            out.worker_cpu = list(phase.worker_cpu)
        out.problems += phase.problems
    out.p50_ms = sum(p.p50_ms for p in phases) / len(phases)
    out.p99_ms = sum(p.p99_ms for p in phases) / len(phases)
    return out


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def stream_summary(streams: Sequence[Stream]) -> tuple[float, float, float]:
    """Median and p99 time to the first event, median time to the end, in ms."""
    first = sorted(s.first * 1000 for s in streams)
    total = sorted(s.total * 1000 for s in streams)
    return percentile(first, 50), percentile(first, 99), percentile(total, 50)


# --- comparisons ---------------------------------------------------------------------------------


def reference_row(rows: dict[str, Row], row: Row) -> Row | None:
    """The reference proxy's own row with the same worker count (None for itself and the direct row)."""
    if row.scenario.kind != "quotagate":
        return None
    ref = rows.get(f"ref{row.scenario.workers}")
    return ref if ref is not None and ref.ok else None


def reference_max(rows: dict[str, Row], row: Row) -> Phase | None:
    """The reference's flat-out run to compare this row's with: the paired one, else the reference's row."""
    if row.scenario.kind != "quotagate":
        return None
    paired = row.phase("ref-max")
    if paired is not None and not paired.problems:
        return paired
    ref = reference_row(rows, row)
    return ref.phase("max") if ref else None


def reference_phase(rows: dict[str, Row], row: Row, name: str) -> Phase | None:
    ref = reference_row(rows, row)
    return ref.phase(name) if ref else None


def _f(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"


def _ratio(value: float, ref: float | None) -> str:
    return f"{X}{value / ref:.2f}" if ref else "—"


def _added(value: float, ref: float | None) -> str:
    return f"{value - ref:+.2f}" if ref is not None else "—"


def mark(row: Row) -> str:
    """ok, or what went wrong in the row's checks."""
    if row.skipped:
        return row.skipped
    problems = row.problems + [f"{name}: {p}" for name, phase in row.phases.items() for p in phase.problems]
    return "ok" if not problems else "✗ " + "; ".join(problems)


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


# --- tables --------------------------------------------------------------------------------------


def throughput_table(rows: dict[str, Row]) -> list[str]:
    lines = [
        f"| scenario | max req/s | reference req/s (paired) | {X} ref | CPU ms/req | {X} ref "
        "| Redis CPU ms/req | busiest worker | other load (cores) | checks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows.values():
        top = row.phase("max")
        if top is None:
            lines.append(_line([row.scenario.label, *[""] * 8, mark(row)]))
            continue
        ref = reference_max(rows, row)
        lines.append(
            _line(
                [
                    row.scenario.label,
                    _f(top.rate, 0) + (" (profiled)" if "profiled" in row.notes else ""),
                    _f(ref.rate, 0) if ref else "—",
                    _ratio(top.rate, ref.rate if ref else None),
                    _f(top.cpu_ms_per_request, 3),
                    _ratio(top.cpu_ms_per_request, ref.cpu_ms_per_request if ref else None),
                    _f(top.store_ms_per_request, 3) if row.scenario.store == "redis" else "—",
                    "—" if top.busiest_worker is None else f"{100 * top.busiest_worker:.0f}%",
                    _f(max(top.other_load, ref.other_load if ref else 0.0)),
                    mark(row),
                ]
            )
        )
    return lines


def latency_table(rows: dict[str, Row], rate: int) -> list[str]:
    lines = [
        f"| scenario | achieved req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | p50 {X} ref | p99 {X} ref "
        f"| CPU ms/req | {X} ref | other load (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows.values():
        phase = row.phase(str(rate))
        if phase is None:
            if str(rate) in row.notes:
                lines.append(_line([row.scenario.label, row.notes[str(rate)], *[""] * 9]))
            continue
        ref = reference_phase(rows, row, str(rate))
        ref50, ref99 = (ref.p50_ms, ref.p99_ms) if ref and ref.sustained else (None, None)
        lines.append(
            _line(
                [
                    row.scenario.label,
                    _f(phase.rate, 0) + ("" if phase.sustained else " (not sustained)"),
                    _f(phase.p50_ms),
                    _f(phase.p99_ms),
                    _added(phase.p50_ms, ref50),
                    _added(phase.p99_ms, ref99),
                    _ratio(phase.p50_ms, ref50),
                    _ratio(phase.p99_ms, ref99),
                    _f(phase.cpu_ms_per_request, 3),
                    _ratio(phase.cpu_ms_per_request, ref.cpu_ms_per_request if ref else None),
                    _f(phase.other_load),
                ]
            )
        )
    return lines


def stream_table(rows: dict[str, Row]) -> list[str]:
    lines = [
        "| scenario | first event p50 ms | first event p99 ms | added p50 vs direct ms | added p50 vs ref ms "
        "| whole stream p50 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    direct = rows.get("direct")
    base = stream_summary(direct.stream)[0] if direct and direct.stream else None
    for row in rows.values():
        if not row.stream:
            continue
        p50, p99, total = stream_summary(row.stream)
        ref = reference_row(rows, row)
        ref50 = stream_summary(ref.stream)[0] if ref is not None and ref.stream else None
        added = "—" if row.scenario.kind == "direct" else _added(p50, base)
        lines.append(_line([row.scenario.label, _f(p50), _f(p99), added, _added(p50, ref50), _f(total, 1)]))
    return lines


# --- the targets -------------------------------------------------------------------------


@dataclass
class Target:
    what: str
    value: str
    met: bool | None  # None: not measured, or not comparable


def _noise(*phases: Phase | None) -> str:
    worst = max((p.other_load for p in phases if p is not None), default=0.0)
    return f" (other load {worst:.1f} cores)" if worst > NOISY else ""


def _throughput_target(rows: dict[str, Row], key: str, what: str, at_least: float) -> Target:
    row = rows.get(key)
    if row is None or not row.ok or row.phase("max") is None:
        return Target(what, "not measured" + (f": {mark(row)}" if row else ""), None)
    top, ref = row.phases["max"], reference_max(rows, row)
    if ref is None:
        return Target(what, "no reference measured", None)
    ratio = top.rate / ref.rate
    return Target(what, f"{X}{ratio:.2f}{_noise(top, ref)}", ratio >= at_least)


def _latency_targets(rows: dict[str, Row], key: str) -> list[Target]:
    what50, what99 = "… added median latency at 1,000 req/s ≤ 0.3 ms", "… added p99 latency at 1,000 req/s ≤ 1.5 ms"
    row = rows.get(key)
    phase, ref = (row.phase("1000"), reference_phase(rows, row, "1000")) if row else (None, None)
    if row is not None and phase is None and "1000" in row.notes:
        return [Target(what50, row.notes["1000"], False), Target(what99, row.notes["1000"], False)]
    if phase is None or ref is None or not ref.sustained:
        why = "not measured" if phase is None else "the reference did not sustain 1,000 req/s"
        return [Target(what50, why, None), Target(what99, why, None)]
    if not phase.sustained:
        return [Target(what50, "not sustained", False), Target(what99, "not sustained", False)]
    add50, add99 = phase.p50_ms - ref.p50_ms, phase.p99_ms - ref.p99_ms
    noise = _noise(phase, ref)
    return [
        Target(what50, f"{add50:+.2f} ms{noise}", add50 <= 0.3),
        Target(what99, f"{add99:+.2f} ms{noise}", add99 <= 1.5),
    ]


def _cpu_target(rows: dict[str, Row], key: str) -> Target:
    """The absolute target, with the reference's own figure on this machine beside it."""
    row = rows.get(key)
    name = next((n for n in ("1000", "200") if row is not None and row.phase(n)), "max")
    phase = row.phase(name) if row else None
    what = "… CPU per admitted request ≤ 0.3 ms"
    if row is None or phase is None:
        return Target(what, "not measured", None)
    where = f"at {phase.target_rate:,} req/s" if phase.target_rate else "flat out"
    ref = reference_phase(rows, row, name)
    beside = f"; the reference: {ref.cpu_ms_per_request:.3f} ms" if ref else ""
    return Target(what, f"{phase.cpu_ms_per_request:.3f} ms {where}{beside}", phase.cpu_ms_per_request <= 0.3)


def _stream_target(rows: dict[str, Row], key: str) -> Target:
    what = "streaming: first event within 1 ms of direct (3 policies, Redis, 2 workers)"
    row, direct = rows.get(key), rows.get("direct")
    if row is None or not row.stream or direct is None or not direct.stream:
        return Target(what, "not measured", None)
    base = stream_summary(direct.stream)[0]
    added = stream_summary(row.stream)[0] - base
    ref = reference_row(rows, row)
    beside = f"; the reference: {stream_summary(ref.stream)[0] - base:+.2f} ms" if ref and ref.stream else ""
    return Target(what, f"{added:+.2f} ms{beside}", added <= 1)


def targets(rows: dict[str, Row]) -> list[Target]:
    """The issue's targets, evaluated on this run's figures."""
    return [
        _throughput_target(rows, "three-redis-2", f"3 policies, Redis, 2 workers: throughput ≥ 0.7 {X} reference", 0.7),
        *_latency_targets(rows, "three-redis-2"),
        _cpu_target(rows, "three-redis-2"),
        _throughput_target(rows, "deny-redis-2", "429 path (Redis, 2 workers) ≥ the reference's forwarding path", 1.0),
        _throughput_target(
            rows, "three-sqlite-1", f"3 policies, SQLite, 1 worker: throughput ≥ 0.6 {X} reference", 0.6
        ),
        _stream_target(rows, "three-redis-2"),
    ]


def target_table(found: list[Target]) -> list[str]:
    lines = ["| target (issue 6) | this run | met |", "|---|---:|---|"]
    for t in found:
        met = "—" if t.met is None else ("yes" if t.met else "**no**")
        lines.append(f"| {t.what} | {t.value} | {met} |")
    return lines


def markdown(rows: dict[str, Row], title: str, environment: Sequence[str]) -> str:
    """The whole report."""
    parts = [f"# {title}", "", *environment, "", "## Throughput and CPU", "", *throughput_table(rows), ""]
    for rate in RATES:
        parts += [f"## Latency at {rate:,} requests/s", "", *latency_table(rows, rate), ""]
    parts += ["## Streaming: time to the first event", "", *stream_table(rows), ""]
    parts += ["## Targets", "", *target_table(targets(rows)), ""]
    return "\n".join(parts)


def raw(rows: dict[str, Row]) -> dict[str, Any]:
    """Every figure as JSON (without the latency samples)."""
    out: dict[str, Any] = {}
    for key, row in rows.items():
        phases = {
            name: {
                **asdict(phase),
                "rate": phase.rate,
                "cpu_ms_per_request": phase.cpu_ms_per_request,
                "other_load": phase.other_load,
            }
            for name, phase in row.phases.items()
        }
        out[key] = {
            "label": row.scenario.label,
            "skipped": row.skipped,
            "problems": row.problems,
            "notes": row.notes,
            "phases": phases,
            "stream_ms": stream_summary(row.stream) if row.stream else None,
        }
    return out
