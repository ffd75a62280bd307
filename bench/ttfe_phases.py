"""Where a stream's time to first event goes inside a gateway worker, under bench/streams.py's load.

    .venv/bin/python bench/ttfe_phases.py                       # 500 streams, 10 s + 20 s
    .venv/bin/python bench/ttfe_phases.py --rows 200 --warm 30
    .venv/bin/python bench/ttfe_phases.py --rows 2000 --cold 20 --warm 5 --first   # the start apart

It copies this tree's src/ to a temporary directory and adds clock reads (`time.perf_counter`)
at the phases of a call: the key's lookup, the body read, admission's estimate, admission's store
step, the upstream's response headers, the start of the response; and, inside every store step
(admissions and charges), the wait before it is sent, Redis's round trip (sent to reply parsed)
and the wait for the request to resume after the reply. It then runs `bench/streams.py` with that
copy as a variant beside the reference (`--no-tree`), and prints, for both workers' calls after (with --first: in)
the first `--cold` seconds: p50, p90, p99 and max of each phase, and how the slowest 1 % of calls
(by the sum of the phases) split their time. The reference's time to first event is in the
streams.py report printed above it. Beside them, each worker's event-loop lag: a task that sleeps
1 ms at a time and records how late it wakes (every callback of that worker waits as long), and
for each wake over 15 ms late, the main thread's CPU time meanwhile (about the lag: one callback
ran that long; much less: the process waited for a core).

Diagnostic only: the patches are applied by exact text, each must match once, so that a change to
one of those places fails here, loudly, rather than timing something else; the copy is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from report import percentile
from run import BENCH, PYTHON, ROOT

PHASES = ("key", "body", "estimate", "step", "upstream", "prepare")
STEP_PARTS = ("to_send", "redis", "resume")

_RECORDER = '''

import json as _json
import os as _os
import time as _time


class _Trace:
    """Per call: the clock read at each phase; per store step: its three parts."""

    def __init__(self) -> None:
        self.calls: list[list[float]] = []
        self.steps: list[tuple[str, float, float, float]] = []
        self.lags: list[float] = []
        self.stalls: list[tuple[float, float]] = []  # (lag, the main thread's CPU seconds meanwhile)
        self.dumped = 0.0

    async def lag(self) -> None:
        import asyncio

        while True:
            began, cpu = _time.perf_counter(), _time.thread_time()
            await asyncio.sleep(0.001)
            late = _time.perf_counter() - began - 0.001
            self.lags.append(late)
            if late > 0.015:
                self.stalls.append((late, _time.thread_time() - cpu))

    def call(self, marks: list[float], estimate: float, step: float) -> None:
        start, key, body, sent, headers, prepared = marks
        self.calls.append([_time.time(), key - start, body - key, estimate, step, headers - sent, prepared - headers])
        now = _time.perf_counter()
        if now - self.dumped > 2:
            self.dumped = now
            with open(_os.path.join(_os.environ["QG_TRACE_DIR"], f"{_os.getpid()}.json"), "w") as out:
                _json.dump({"calls": self.calls, "steps": self.steps, "lags": self.lags, "stalls": self.stalls}, out)


TRACE = _Trace()
'''

PATCHES: dict[str, list[tuple[str, str]]] = {
    "proxy.py": [
        (
            "    upstream_seconds: float = 0.0\n",
            "    upstream_seconds: float = 0.0\n"
            "    marks: list = field(default_factory=list)\n"
            "    admitted: list = field(default_factory=list)\n",
        ),
        (
            '        ticket.key = await self.admission.authenticate(request.headers.get("Helicone-Auth", ""))\n',
            "        call.marks.append(time.perf_counter())\n"
            '        ticket.key = await self.admission.authenticate(request.headers.get("Helicone-Auth", ""))\n'
            "        call.marks.append(time.perf_counter())\n",
        ),
        (
            "        ticket.body = await self._read_body(request, call)\n",
            "        ticket.body = await self._read_body(request, call)\n"
            "        call.marks.append(time.perf_counter())\n",
        ),
        (
            "        return await self._forward(request, call, route.upstream, route.path)\n",
            "        from . import admission as _admission\n"
            "        call.admitted = _admission.LAST[:]\n"
            "        return await self._forward(request, call, route.upstream, route.path)\n",
        ),
        (
            "        sent = time.perf_counter()\n",
            "        sent = time.perf_counter()\n        call.marks.append(sent)\n",
        ),
        (
            '                    body = b""  # sent',
            '                    call.marks.append(time.perf_counter())\n                    body = b""  # sent',
        ),
        (
            "        await out.prepare(request)\n",
            "        await out.prepare(request)\n"
            "        call.marks.append(time.perf_counter())\n"
            "        from .stores.batch import TRACE\n"
            "        TRACE.call(call.marks, *call.admitted)\n",
        ),
    ],
    "admission.py": [
        (
            "        if ticket.holding:\n            await self._hold(ticket, ticket.route)\n"
            "        await self._step(ticket)\n        return ticket.decision\n",
            "        import time as _time\n"
            "        began = _time.perf_counter()\n"
            "        if ticket.holding:\n            await self._hold(ticket, ticket.route)\n"
            "        held = _time.perf_counter()\n"
            "        await self._step(ticket)\n"
            "        LAST[:] = [held - began, _time.perf_counter() - held]\n"
            "        return ticket.decision\n",
        ),
    ],
    "server.py": [
        (
            "        ready()\n        await stop.wait()\n",
            "        ready()\n"
            "        if tune_gc:  # a worker process\n"
            "            from .stores.batch import TRACE\n"
            "            lag = asyncio.ensure_future(TRACE.lag())\n"
            "        await stop.wait()\n",
        ),
    ],
    "stores/batch.py": [
        (
            "        return await future\n\n    def _send(self) -> None:",
            "        began = _time.perf_counter()\n"
            "        result = await future\n"
            "        sent, answered = _SENT.pop(id(future), (began, began))\n"
            "        resumed = _time.perf_counter()\n"
            "        TRACE.steps.append((type(item).__name__, sent - began, answered - sent, resumed - answered))\n"
            "        return result\n\n    def _send(self) -> None:",
        ),
        (
            "                self._in_flight.add(id(batch))\n",
            "                self._in_flight.add(id(batch))\n"
            "                _BATCH_SENT[id(batch)] = _time.perf_counter()\n",
        ),
        (
            "        self._in_flight.discard(id(batch))\n        _hand_out(batch, started)\n",
            "        self._in_flight.discard(id(batch))\n"
            "        sent, now = _BATCH_SENT.pop(id(batch), 0.0), _time.perf_counter()\n"
            "        for _, future in batch:\n"
            "            _SENT[id(future)] = (sent, now)\n"
            "        _hand_out(batch, started)\n",
        ),
    ],
}


def patched_copy(into: Path) -> Path:
    src = into / "src"
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__"))
    package = src / "quotagate"
    for name, patches in PATCHES.items():
        path = package / name
        text = path.read_text()
        for old, new in patches:
            if text.count(old) != 1:
                raise SystemExit(f"ttfe_phases: {name} no longer has exactly one {old.strip()[:60]!r}: update PATCHES")
            text = text.replace(old, new)
        if name == "admission.py":
            text += "\nLAST: list = [0.0, 0.0]\n"
        if name == "stores/batch.py":
            text += _RECORDER + "_SENT: dict = {}\n_BATCH_SENT: dict = {}\n"
        path.write_text(text)
    return src


def quantiles(values: list[float]) -> str:
    ordered = sorted(values)
    cells = [percentile(ordered, q) * 1000 for q in (50, 90, 99)] + [ordered[-1] * 1000]
    return " | ".join(f"{c:.2f}" for c in cells)


def report(trace_dir: Path, cold: float, first_only: bool = False) -> str:
    calls: list[list[float]] = []
    steps: list[list] = []
    lags: list[str] = []
    for path in sorted(trace_dir.glob("*.json")):
        data = json.loads(path.read_text())
        ticks = sorted(data["lags"][len(data["lags"]) // 3 :])
        stalls = data["stalls"]
        ms = [percentile(ticks, q) * 1000 for q in (50, 99, 99.9)]
        listed = ", ".join(f"{lag * 1000:.0f} ms (CPU {cpu * 1000:.0f})" for lag, cpu in stalls[:12])
        lags.append(
            f"worker {path.stem}: loop lag over {len(ticks):,} 1-ms sleeps, ms: p50 {ms[0]:.2f}, p99 {ms[1]:.2f}, "
            f"p99.9 {ms[2]:.2f}, max {ticks[-1] * 1000:.1f}; {len(stalls)} over 15 ms in the whole run"
            + (f": {listed}" if stalls else "")
        )
        first = min(c[0] for c in data["calls"])
        calls += [c for c in data["calls"] if (c[0] < first + cold) == first_only]
        steps += data["steps"][len(data["steps"]) // 3 :]  # steps carry no time: the last two thirds
    if not calls:
        raise SystemExit("ttfe_phases: no call was traced")
    which = "in" if first_only else "after"
    lines = [f"{len(calls):,} streams {which} the first {cold:g} s, both workers", ""]
    lines += ["| phase (ms) | p50 | p90 | p99 | max |", "|---|---:|---:|---:|---:|"]
    for index, name in enumerate(PHASES, start=1):
        lines.append(f"| {name} | {quantiles([c[index] for c in calls])} |")
    lines.append(f"| all of them | {quantiles([sum(c[1:]) for c in calls])} |")
    for kind in ("Admit", "Charge"):
        rows = [s for s in steps if s[0] == kind]
        for index, part in enumerate(STEP_PARTS, start=1):
            lines.append(f"| {kind.lower()} step: {part} | {quantiles([r[index] for r in rows])} |")
    slowest = sorted(calls, key=lambda c: sum(c[1:]))[-max(1, len(calls) // 100) :]
    split = ", ".join(
        f"{name} {sum(c[i] for c in slowest) / len(slowest) * 1000:.2f}" for i, name in enumerate(PHASES, 1)
    )
    lines += ["", f"the slowest 1 % of calls, mean ms: {split}", "", *lags]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=500, help="concurrent streams")
    parser.add_argument("--cold", type=float, default=10)
    parser.add_argument("--warm", type=float, default=20)
    parser.add_argument("--first", action="store_true", help="report the streams of the first --cold seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qg-phases-") as tmp:
        work = Path(tmp)
        src = patched_copy(work)
        traces = work / "traces"
        traces.mkdir()
        command = [PYTHON, str(BENCH / "streams.py"), "--rows", str(args.rows), "--cold", str(args.cold)]
        command += ["--warm", str(args.warm), "--rounds", "1", "--no-tree", "--variant", f"phases={src}"]
        command += ["--out", str(work / "out")]
        subprocess.run(command, check=True, env={**os.environ, "QG_TRACE_DIR": str(traces)})
        print()
        print(report(traces, args.cold, args.first))
    return 0


if __name__ == "__main__":
    sys.exit(main())
