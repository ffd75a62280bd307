"""Run a module under cProfile switched by signals: SIGUSR1 starts counting, SIGUSR2 stops and
writes the stats to the file named first (`bench/callgrind_gateway.py --cprofile`).

    python bench/profiled.py OUT.prof -m quotagate serve ...
"""

from __future__ import annotations

import cProfile
import runpy
import signal
import sys
from typing import Any

out = sys.argv[1]
profile = cProfile.Profile()


def start(*_: Any) -> None:
    profile.enable()


def stop(*_: Any) -> None:
    profile.disable()
    profile.dump_stats(out)


signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
assert sys.argv[2] == "-m"
sys.argv = [sys.argv[3], *sys.argv[4:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
