"""The SQLite store's effect on the event loop: how long store batches take, and how late the loop
runs everything else meanwhile.

    .venv/bin/python bench/sqlite_stall.py            # 20,000 requests on a fresh file in /tmp
    .venv/bin/python bench/sqlite_stall.py --stale 1000000   # beside a million expired rows

Batches of 4 simulated requests (the 3-policy admission, then the charge of the two holds) go
through quotagate's SQLiteStore one after another, for distinct users; beside them a task sleeps
1 ms at a time and records how late it wakes up: the loop lag that every other request on the
worker (a stream's next chunk, a request without a policy) would see. A commit that checkpoints
the WAL inline (it writes and syncs the database file) shows up there as a stall. With `--stale`,
the file first holds that many counter rows that expired an hour ago (what a flood of one-off user
ids leaves): the store deletes them in chunks on its own thread while the batches run.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time

from quotagate.stores.sqlite import SQLiteStore, path_from_url
from store_steps import add_key, admit_and_charge


def percentiles(values: list[float]) -> str:
    values = sorted(values)
    n = len(values)
    return (
        f"p50 {values[n // 2] * 1e3:6.2f} ms  p99 {values[int(n * 0.99)] * 1e3:6.2f} ms  "
        f"p99.9 {values[int(n * 0.999)] * 1e3:6.2f} ms  max {values[-1] * 1e3:6.2f} ms"
    )


def add_stale(url: str, rows: int) -> None:
    """Counter rows of one-off users whose window passed an hour ago (the purge column, if the
    store has one, set as the store sets it: past the expiry)."""
    db = sqlite3.connect(path_from_url(url))
    columns = [r[1] for r in db.execute("PRAGMA table_info(counters)")]
    past = time.time() - 3600
    state = b'{"b":[[29930000,1,%f]],"t":1,"h":[]}' % (past - 60)
    policies = '["1000000;w=60;s=user"]'
    values = (
        (f"k1:request:60:u:stale{n}", "k1", "request", 60, "user", f"stale{n}", 10**12, 1, 0, 0.0, policies, past - 60)
        + (past, None, state)
        + ((past,) if "purge_at" in columns else ())
        for n in range(rows)
    )
    marks = ",".join("?" * len(columns))
    with db:
        db.executemany(f"INSERT INTO counters ({','.join(columns)}) VALUES ({marks})", values)
    print(f"{rows:,} expired counter rows added")
    db.close()


def count_rows(url: str) -> int:
    db = sqlite3.connect(path_from_url(url))
    try:
        return int(db.execute("SELECT count(*) FROM counters").fetchone()[0])
    finally:
        db.close()


async def measure(requests: int, batch: int, stale: int) -> None:
    folder = tempfile.mkdtemp(prefix="qg-sqlite-stall-")
    url = f"sqlite:///{folder}/stall.db"
    store = SQLiteStore(url)
    await add_key(store)
    if stale:
        add_stale(url, stale)
    lags: list[float] = []
    running = True

    async def ticker() -> None:
        while running:
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - started - 0.001)

    tick = asyncio.ensure_future(ticker())
    times: list[float] = []
    cpu = time.process_time()
    for first in range(0, requests, batch):
        started = time.perf_counter()
        await admit_and_charge(store, [f"user{n}" for n in range(first, min(first + batch, requests))])
        times.append(time.perf_counter() - started)
    cpu = time.process_time() - cpu
    running = False
    await tick
    await store.close()
    print(f"{requests:,} requests in batches of {batch}, {sum(times):.2f} s in the store")
    print(f"  process CPU per request       {cpu / requests * 1e6:6.1f} us (store thread and ticker included)")
    print(f"  store batch (admit + charge)  {percentiles(times)}")
    print(f"  event-loop lag                {percentiles(lags)}  ({sum(1 for x in lags if x > 0.005)} over 5 ms)")
    print(f"  counter rows at the end       {count_rows(url):,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--stale", type=int, default=0, help="expired counter rows in the file first")
    args = parser.parse_args()
    asyncio.run(measure(args.requests, args.batch, args.stale))


if __name__ == "__main__":
    main()
