"""Sampling profiles of the servers while the benchmark drives them (`run.py --profile DIR`).

py-spy (`.venv/bin/pip install py-spy`, not a dependency of the project) records every process of
the server during its flat-out run, as collapsed stacks; `summarize` turns them into the functions
that take the most samples, inclusive and on their own. The profiled run is slower than an
unprofiled one (py-spy pauses the process to sample it), so its figures are marked in the report.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

RATE = 100  # samples a second


def py_spy() -> str | None:
    """The py-spy executable: next to this Python, else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """Record `pid` and its children for `seconds` into `out` (collapsed stacks)."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    argv = [binary, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate", str(RATE)]
    argv += ["--duration", str(max(1, round(seconds))), "--format", "raw", "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _frame(frame: str) -> str:
    """'handle (quotagate/proxy.py:123)' -> 'handle (proxy.py)'."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.split(':', 1)[0].rsplit('/', 1)[-1]})" if where else name


def summarize(raw: Path, top: int = 50) -> str:
    """The functions with the most samples, inclusive and self, as text."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_frame(f) for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        total += int(count)
        for name in set(frames):
            inclusive[name] += int(count)
        own[frames[-1]] += int(count)
    if not total:
        return "no samples\n"
    lines = [f"{total} samples at {RATE} Hz", "", "inclusive (frames in over 80% of the samples left out):"]
    shown = [(name, n) for name, n in inclusive.most_common() if n <= 0.8 * total][:top]
    lines += [f"{100 * n / total:6.1f}%  {name}" for name, n in shown]
    lines += ["", "self:"]
    lines += [f"{100 * n / total:6.1f}%  {name}" for name, n in own.most_common(top)]
    return "\n".join(lines) + "\n"
