"""The SQLite store's effect on the event loop: how long store batches take, and how late the loop
runs everything else meanwhile.

    .venv/bin/python bench/sqlite_stall.py            # 20,000 requests on a fresh file in /tmp

Batches of 4 simulated requests (the 3-policy admission, then the charge of the two holds) go
through quotagate's SQLiteStore one after another, for distinct users; beside them a task sleeps
1 ms at a time and records how late it wakes up: the loop lag that every other request on the
worker (a stream's next chunk, a request without a policy) would see. A commit that checkpoints
the WAL inline (it writes and syncs the database file) shows up there as a stall.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

from quotagate.keys import KeyRecord
from quotagate.limiter import budgets_for
from quotagate.policy import parse_policies
from quotagate.stores.sqlite import SQLiteStore

POLICIES = "1000000;w=60;s=user, 100000000;w=60;u=cents;s=user, 1000000000;w=60;u=token;s=user"


def percentiles(values: list[float]) -> str:
    values = sorted(values)
    n = len(values)
    return (
        f"p50 {values[n // 2] * 1e3:6.2f} ms  p99 {values[int(n * 0.99)] * 1e3:6.2f} ms  "
        f"p99.9 {values[int(n * 0.999)] * 1e3:6.2f} ms  max {values[-1] * 1e3:6.2f} ms"
    )


async def measure(requests: int, batch: int) -> None:
    folder = tempfile.mkdtemp(prefix="qg-sqlite-stall-")
    store = SQLiteStore(f"sqlite:///{folder}/stall.db")
    await store.create_key(KeyRecord("k1", "bench", b"salt", b"digest", "", time.time(), None))
    policies = parse_policies(POLICIES)
    lags: list[float] = []
    running = True

    async def ticker() -> None:
        while running:
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - started - 0.001)

    tick = asyncio.ensure_future(ticker())
    times: list[float] = []
    for first in range(0, requests, batch):
        calls = []
        for n in range(first, min(first + batch, requests)):
            budgets = budgets_for("k1", policies, {None: None, "user": f"user{n}"})
            for budget in budgets:
                budget.amount = 500 if budget.holds else budget.amount
            calls.append((budgets, os.urandom(8).hex()))
        started = time.perf_counter()
        await asyncio.gather(*(store.admit("k1", b, r, 660.0) for b, r in calls))
        await asyncio.gather(*(store.charge([x for x in b if x.holds], r, [300, 300]) for b, r in calls))
        times.append(time.perf_counter() - started)
    running = False
    await tick
    await store.close()
    print(f"{requests:,} requests in batches of {batch}, {sum(times):.2f} s in the store")
    print(f"  store batch (admit + charge)  {percentiles(times)}")
    print(f"  event-loop lag                {percentiles(lags)}  ({sum(1 for x in lags if x > 0.005)} over 5 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(measure(args.requests, args.batch))


if __name__ == "__main__":
    main()
