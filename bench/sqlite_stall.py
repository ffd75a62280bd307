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
import tempfile
import time

from quotagate.stores.sqlite import SQLiteStore
from store_steps import add_key, admit_and_charge


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
    await add_key(store)
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
        started = time.perf_counter()
        await admit_and_charge(store, [f"user{n}" for n in range(first, min(first + batch, requests))])
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
