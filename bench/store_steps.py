"""What the store-only benchmarks (redis_step.py, redis_client.py, sqlite_stall.py) send: the
requests of bench/run.py's "3 policies" rows, straight to a store, without HTTP; and the private
redis-server the Redis ones run against."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator

import redis

from quotagate.keys import KeyRecord
from quotagate.limiter import budgets_for
from quotagate.policy import parse_policies
from quotagate.stores import Store

THREE_POLICIES = "1000000;w=60;s=user, 100000000;w=60;u=cents;s=user, 1000000000;w=60;u=token;s=user"
KEY_ID = "k1"
_POLICIES = parse_policies(THREE_POLICIES)


async def add_key(store: Store) -> None:
    await store.create_key(KeyRecord(KEY_ID, "bench", b"salt", b"digest", "", time.time(), None))


async def admit_and_charge(store: Store, users: Iterable[str]) -> None:
    """One request per user, together (as the micro-batcher groups one event-loop turn): the
    admission of a request, a cents and a token budget (the last two holding 500), then the charge
    of the two holds (300 each)."""
    calls = []
    for user in users:
        budgets = budgets_for(KEY_ID, _POLICIES, {None: None, "user": user})
        amounts = [500 if budget.holds else 1 for budget in budgets]
        calls.append((budgets, amounts, os.urandom(8).hex()))
    await asyncio.gather(*(store.admit(KEY_ID, b, a, r, 660.0) for b, a, r in calls))
    await asyncio.gather(*(store.charge([x for x in b if x.holds], r, [300, 300]) for b, _, r in calls))


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server of its own on a free port (no persistence); yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", tmp]
        server = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        try:
            probe = redis.Redis(port=port)
            for _ in range(100):
                try:
                    probe.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.terminate()
            server.wait(10)
