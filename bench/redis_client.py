"""The gateway's own CPU per Redis step: the pipelined connection (`stores/resp.py`) against
redis-py's pooled asyncio connection, both through quotagate's RedisStore, on a private redis-server.

    .venv/bin/python bench/redis_client.py                 # 4,000 requests, alone and 8 at a time
    .venv/bin/python bench/redis_client.py --requests 10000 --batches 1 16

Each simulated request is one of bench/run.py's "3 policies" requests (an admission of three
budgets, then the charge of two holds: two EVALSHA calls), sent `--batches` at a time. It prints
this process's CPU time and the wall time per request for each client, alternating the two over
`--rounds` rounds so that the machine's state hits both alike. Batches of 1 are the lone request of
a quiet gateway (every step is one round trip); larger batches are a busy one.
"""

from __future__ import annotations

import argparse
import sys
import time

import uvloop

from quotagate.stores.redis import RedisStore, ServerSteps
from quotagate.stores.transport import PooledTransport
from store_steps import add_key, admit_and_charge, private_redis


async def one_run(url: str, pipelined: bool, requests: int, batch: int, users: int) -> tuple[float, float]:
    store = RedisStore(url)
    if not pipelined:  # the redis-py pooled connection, as before resp.py
        store._transport = PooledTransport(url, store._transport.script)
        store._steps = ServerSteps(store._transport, store._now_arg, store._note_time)
    await add_key(store)
    await admit_and_charge(store, [f"warm{n}" for n in range(batch)])
    cpu, wall = time.process_time(), time.perf_counter()
    for first in range(0, requests, batch):
        await admit_and_charge(store, [f"user{n % users}" for n in range(first, min(first + batch, requests))])
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await store.close()
    return cpu / requests * 1e6, wall / requests * 1e6


async def measure(url: str, requests: int, batches: list[int], rounds: int, users: int) -> None:
    print(f"{requests:,} requests per run, {rounds} rounds; microseconds per request (two store steps each)")
    print(f"{'batch':>5}  {'client':<22} {'CPU us':>8} {'wall us':>8}")
    for batch in batches:
        totals = {True: [0.0, 0.0], False: [0.0, 0.0]}
        for _ in range(rounds):
            for pipelined in (False, True):
                cpu, wall = await one_run(url, pipelined, requests, batch, users)
                totals[pipelined][0] += cpu / rounds
                totals[pipelined][1] += wall / rounds
        for pipelined, name in ((False, "redis-py pooled"), (True, "pipelined (resp.py)")):
            cpu, wall = totals[pipelined]
            print(f"{batch:>5}  {name:<22} {cpu:8.1f} {wall:8.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--users", type=int, default=10000)
    args = parser.parse_args()
    with private_redis() as url:
        uvloop.run(measure(url, args.requests, args.batches, args.rounds, args.users))
    return 0


if __name__ == "__main__":
    sys.exit(main())
