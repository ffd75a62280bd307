"""Redis CPU per admission: the step script alone, without HTTP, on a private redis-server.

    .venv/bin/python bench/redis_step.py                # 6,000 requests, 10,000 users
    .venv/bin/python bench/redis_step.py --requests 20000 --users 100 --batch 16

Each simulated request is what the benchmark's "3 policies" rows send: an admission of a request,
a cents and a token budget per user (the last two holding an estimate), then the charge of the two
holds, through quotagate's RedisStore, `--batch` requests at a time (as the micro-batcher groups
the requests of one event-loop turn). It prints redis-server's CPU time per request and what
EVALSHA and the commands inside it took (`INFO commandstats`): the part of an admission the
gateway's process does not see.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import redis

from quotagate.stores.redis import RedisStore
from store_steps import add_key, admit_and_charge, private_redis


def cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def measure(url: str, requests: int, users: int, batch: int) -> None:
    client = redis.Redis.from_url(url)
    client.flushdb()
    store = RedisStore(url)
    await add_key(store)
    client.config_resetstat()
    before, started = cpu(client), time.perf_counter()
    for first in range(0, requests, batch):
        await admit_and_charge(store, [f"user{n % users}" for n in range(first, min(first + batch, requests))])
    used, wall = cpu(client) - before, time.perf_counter() - started
    stats = client.info("commandstats")
    evalsha = stats.get("cmdstat_evalsha", {})
    inner = sorted(
        ((name[len("cmdstat_") :], float(s["usec"])) for name, s in stats.items() if name != "cmdstat_evalsha"),
        key=lambda item: -item[1],
    )
    print(f"{requests:,} requests ({users:,} users, batches of {batch}) in {wall:.2f} s")
    print(f"  redis-server CPU      {used / requests * 1e6:7.1f} us per request")
    print(f"  EVALSHA               {float(evalsha.get('usec', 0)) / requests:7.1f} us per request")
    print(f"    of which commands   {sum(u for _, u in inner) / requests:7.1f} us per request")
    for name, usec in inner[:6]:
        print(f"      {name:18s}  {usec / requests:7.1f} us per request")
    await store.close()
    client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--users", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    with private_redis() as url:
        asyncio.run(measure(url, args.requests, args.users, args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
