"""Instructions of the Redis store alone (no HTTP), per 3-policy request: `store_steps.py`'s
admissions and charges through `RedisStore` on a private redis-server, in batches of `--batch`.
Run it under callgrind twice, with `--rounds` N and 2N: the difference of the two totals is the
cost of N rounds, start-up and imports cancelled out (see bench/README.md, issue 14).

    valgrind --tool=callgrind --callgrind-out-file=/tmp/s1 .venv/bin/python bench/callgrind_store.py --rounds 100
    valgrind --tool=callgrind --callgrind-out-file=/tmp/s2 .venv/bin/python bench/callgrind_store.py --rounds 200
"""

from __future__ import annotations

import argparse
import sys

import uvloop

from quotagate.stores.redis import RedisStore
from store_steps import add_key, admit_and_charge, private_redis


async def run(url: str, rounds: int, batch: int) -> None:
    store = RedisStore(url)
    await add_key(store)
    for r in range(rounds):
        await admit_and_charge(store, [f"user-{r}-{i}" for i in range(batch)])
    await store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    with private_redis() as url:
        uvloop.run(run(url, args.rounds, args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
