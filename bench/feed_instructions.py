"""Instructions per event of `StreamUsage.feed` alone, counted by callgrind: the stream of `streams.py`.

    .venv/bin/python bench/feed_instructions.py                                # this tree
    .venv/bin/python bench/feed_instructions.py --variant base=/tmp/base/src   # and another src/

Each figure is two processes under `valgrind --tool=callgrind` (`PYTHONHASHSEED=0`): one feeds
`--streams` streams through fresh `StreamUsage` trackers, the other none (both feed one stream
first, so that what is done once is in both); the difference of their totals, over the events fed,
is the figure. The stream is `bench/upstream.py`'s, as `streams.py` runs it: the role chunk, 40
words, the finish chunk (`"usage":null` in each), the usage chunk and `[DONE]`, 44 events, one
event per chunk (three per chunk: `three`). The cases:

- `stripped`: tracked (a budget holds cents or tokens), the usage the gateway asked for stripped;
- `asked`: tracked, the client asked for the usage (passed on);
- `untracked`: no cents or token budget, stripped;
- `three`: as `stripped`, three events per chunk (what a saturated worker reads);
- `escaped`: as `stripped`, every fourth word with a newline in it (`\\n` in its JSON string).

`--no-quick` adds this tree with `StreamUsage(..., quick=False)` (every event of a tracked stream
decoded) as the side `decode`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CASES = ("stripped", "asked", "untracked", "three", "escaped")
_TOTALS = re.compile(rb"^totals:\s*(\d+)", re.MULTILINE)


def stream(case: str) -> list[bytes]:
    """The chunks of one stream of `streams.py`, as the gateway's tracker gets them."""
    sys.path.insert(0, str(BENCH))
    import upstream

    events = [*upstream.stream_events(40, usage_null=True), upstream._event({}, usage=(1100, 40))]
    events = [e.split(b"\r\n", 1)[1][:-2] for e in events]  # without the chunked framing
    if case == "escaped":
        events[1::4] = [e.replace(b'{"content":"', b'{"content":"\\n') for e in events[1::4]]
    events.append(b"data: [DONE]\n\n")
    if case == "three":
        events = [b"".join(events[i : i + 3]) for i in range(0, len(events), 3)]
    return events


def child(case: str, count: int, quick: bool) -> None:
    from quotagate.usage import StreamUsage

    chunks = stream(case)
    kwargs = {} if quick else {"quick": False}
    track, strip = case != "untracked", case != "asked"
    for _ in range(1 + count):
        tracker = StreamUsage(track, strip, **kwargs)
        for chunk in chunks:
            tracker.feed(chunk)
        tracker.finish()


def count(case: str, streams: int, src: str | None, quick: bool, work: Path) -> int:
    out = work / f"callgrind.{case}.{streams}.{os.getpid()}"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    if src is not None:
        env["PYTHONPATH"] = str(Path(src).resolve())
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__]
    argv += ["--child", case, str(streams)] + ([] if quick else ["--no-quick"])
    subprocess.run(argv, check=True, capture_output=True, env=env, timeout=900)
    found = _TOTALS.search(out.read_bytes())
    if found is None:
        raise RuntimeError(f"no totals in {out}")
    out.unlink()
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=100, help="streams counted")
    parser.add_argument("--case", action="append", choices=CASES, help="the cases (default: all)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=SRC", help="another src/")
    parser.add_argument("--no-quick", action="store_true", help="this tree with quick=False too (side `decode`)")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "STREAMS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), not args.no_quick)
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    sides: list[tuple[str, str | None, bool]] = [("tree", None, True)]
    sides += [("decode", None, False)] if args.no_quick else []
    sides += [(name, src, True) for name, src in (v.split("=", 1) for v in args.variant)]
    events = {case: len(stream(case)) if case != "three" else len(stream("stripped")) for case in CASES}
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="qg-feed-") as tmp:
        for case in args.case or CASES:
            for name, src, quick in sides:
                total = count(case, args.streams, src, quick, Path(tmp)) - count(case, 0, src, quick, Path(tmp))
                figure = total / (args.streams * events[case])
                results.setdefault(case, {})[name] = figure
                print(f"{case}, {name}: {figure:,.0f} instructions per event", flush=True)
    print(json.dumps({case: {k: round(v) for k, v in by.items()} for case, by in results.items()}))
    names = [name for name, _, _ in sides]
    print("| case | " + " | ".join(names) + " |")
    for case, by in results.items():
        print(f"| {case} | " + " | ".join(f"{by[name]:,.0f}" for name in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
