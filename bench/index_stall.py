"""The dashboard's Redis index with millions of stale entries: how long admissions stall while the
index is cleaned and an admin read (the dashboard, `quotagate usage`) runs beside them.

    .venv/bin/python bench/index_stall.py                   # 4,000,000 stale entries
    .venv/bin/python bench/index_stall.py --stale 1000000 --seconds 20

On a private redis-server, the index (`qg:idx` by ratio, `qg:idx:exp` by expiry) is filled with
`--stale` entries whose budgets expired an hour ago (what a flood of one-off user ids left behind
before the index was expired continuously), ratio 1.0 so that they sort first. Then one process
admits and charges 3-policy requests one after another (two round trips each) for `--seconds`,
recording each request's latency; its store also cleans the index in the background, as a
gateway's does. After a second a second process reads the dashboard's first page
(`RedisStore.usage(limit=100)`), as `quotagate usage` would. Printed: the requests' latency
percentiles and maximum, how long the read took, the longest command Redis ran (SLOWLOG) and the
index's size before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

import redis

from quotagate.stores.redis import RedisStore
from store_steps import add_key, admit_and_charge, private_redis

READ = """
import asyncio, sys, time
from quotagate.stores.redis import RedisStore
async def main():
    store = RedisStore(sys.argv[1])
    started = time.perf_counter()
    rows = await store.usage(limit=100)
    print(f"{time.perf_counter() - started:.3f} {len(rows)}")
    await store.close()
asyncio.run(main())
"""


def fill(client: redis.Redis, stale: int) -> None:
    past = time.time() - 3600
    for first in range(0, stale, 20_000):
        members = [f"k1:request:60:u:stale{n}" for n in range(first, min(first + 20_000, stale))]
        pipe = client.pipeline(transaction=False)
        pipe.zadd("qg:idx:exp", dict.fromkeys(members, past))
        pipe.zadd("qg:idx", dict.fromkeys(members, 1.0))
        pipe.execute()


def percentiles(values: list[float]) -> str:
    values = sorted(values)
    n = len(values)
    return (
        f"p50 {values[n // 2] * 1e3:7.2f} ms  p99 {values[int(n * 0.99)] * 1e3:7.2f} ms  "
        f"p99.9 {values[int(n * 0.999)] * 1e3:7.2f} ms  max {values[-1] * 1e3:7.2f} ms"
    )


async def admit(url: str, seconds: float, reader: list[subprocess.Popen[str]]) -> list[float]:
    store = RedisStore(url)
    await add_key(store)
    latencies: list[float] = []
    started, n = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        if n and not reader and time.perf_counter() - started > 1:
            reader.append(subprocess.Popen([sys.executable, "-c", READ, url], stdout=subprocess.PIPE, text=True))
        begun = time.perf_counter()
        await admit_and_charge(store, [f"user{n % 1000}"])
        latencies.append(time.perf_counter() - begun)
        n += 1
    await store.close()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stale", type=int, default=4_000_000)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    with private_redis() as url:
        client = redis.Redis.from_url(url)
        started = time.perf_counter()
        fill(client, args.stale)
        print(f"index filled with {args.stale:,} stale entries in {time.perf_counter() - started:.1f} s")
        client.config_set("slowlog-log-slower-than", 1000)  # microseconds
        client.slowlog_reset()
        before = client.zcard("qg:idx")
        reader: list[subprocess.Popen[str]] = []
        latencies = asyncio.run(admit(url, args.seconds, reader))
        out, _ = reader[0].communicate(timeout=600)
        read_seconds, rows = out.split()
        slowest = max((e["duration"] for e in client.slowlog_get(128)), default=0)
        commands = [
            (e["duration"], e["command"][:40]) for e in sorted(client.slowlog_get(128), key=lambda e: -e["duration"])
        ][:3]
        print(f"{len(latencies):,} requests (admission + charge, one at a time) in {args.seconds:g} s")
        print(f"  request latency      {percentiles(latencies)}")
        print(f"  admin read           {float(read_seconds):.2f} s ({rows} budgets listed)")
        print(f"  longest command      {slowest / 1000:.2f} ms  {commands}")
        print(f"  index entries        {before:,} -> {client.zcard('qg:idx'):,} (by ratio)")


if __name__ == "__main__":
    main()
