"""State stays bounded by what is live: expired counters, rows and index entries go away by
themselves in every store, in bounded chunks, without anyone reading the dashboard; live budgets
(holds of calls in flight included) stay exact; an admin read sends only bounded commands."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis

from quotagate.limiter import Budget, budgets_for
from quotagate.policy import parse_policies
from quotagate.stores import Store, open_store
from quotagate.stores.redis import INDEX, INDEX_EXPIRY, budget_key
from quotagate.stores.sqlite import path_from_url

from .conftest import FakeClock, flush_redis, with_store

SHORT = parse_policies("10;w=60;s=user")
LONG = parse_policies("1000;w=3600;s=user")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


def run(store_url: str, clock: FakeClock, body: Callable[[Store, str], Awaitable[None]]) -> None:
    with_store(store_url, clock, body, "bounded")


def budget(key_id: str, policies: Any, user: str, amount: int = 1) -> tuple[list[Budget], list[int]]:
    """A user's budgets, and the amount a call takes or holds on each."""
    budgets = budgets_for(key_id, policies, {None: None, "user": user})
    return budgets, [amount] * len(budgets)


def stored(store_url: str) -> int:
    """What the store keeps of budgets: SQLite counter rows, or entries in the Redis index (-1
    while an expiry step is between its two sets)."""
    if store_url.startswith("sqlite"):
        db = sqlite3.connect(path_from_url(store_url))
        try:
            return int(db.execute("SELECT count(*) FROM counters").fetchone()[0])
        finally:
            db.close()
    client = _client(store_url)
    try:
        ratio, expiry = client.zcard(INDEX), client.zcard(INDEX_EXPIRY)
    finally:
        client.close()
    return int(ratio) if ratio == expiry else -1


def _client(store_url: str) -> Any:
    if "+cluster" in store_url:
        return redis.RedisCluster.from_url(store_url.replace("+cluster", ""))
    return redis.Redis.from_url(store_url)


async def until(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Wait for background work (the Redis index flush runs once a second, SQLite's purge on the
    store thread): a real-time behaviour, polled."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def admit_users(store: Store, key_id: str, policies: Any, users: list[str], hold_ttl: float = 60) -> None:
    for first in range(0, len(users), 50):
        chunk = users[first : first + 50]
        results = await asyncio.gather(
            *(store.admit(key_id, *budget(key_id, policies, u), f"r{u}", hold_ttl) for u in chunk)
        )
        assert all(r.allowed for r in results)


def test_expired_budgets_go_away_without_an_admin_read(store_url: str, clock: FakeClock) -> None:
    """600 users whose minute has passed disappear from the store (rows, index entries) while the
    gateway keeps serving a live one; the live budgets keep their exact counts."""

    async def body(store: Store, key_id: str) -> None:
        await admit_users(store, key_id, SHORT, [f"gone-{n}" for n in range(600)])
        await admit_users(store, key_id, LONG, ["alive-1", "alive-2"])
        await until(lambda: stored(store_url) == 602, "every budget stored")
        clock.advance(3 * 60)  # every 60 s window (and the index slack) has passed; the hour has not
        for n in range(130):  # traffic goes on for a live user only: one store step (commit) each
            result = await store.admit(key_id, *budget(key_id, LONG, "alive-1"), f"live{n}", 60)
            assert result.allowed and result.states[0].used == n + 2
        await until(lambda: stored(store_url) == 2, "only the live budgets left")
        [state] = (await store.admit(key_id, *budget(key_id, LONG, "alive-2"), "last", 60)).states
        assert state.used == 2

    run(store_url, clock, body)


def test_a_budget_whose_call_is_still_in_flight_is_kept(store_url: str, clock: FakeClock) -> None:
    """A hold outlives the window (a slow call): its budget is not removed before the hold expires."""
    tokens = parse_policies("1000;w=60;u=token;s=user")

    async def body(store: Store, key_id: str) -> None:
        slow, amounts = budget(key_id, tokens, "slow", amount=400)
        assert (await store.admit(key_id, slow, amounts, "slow-call", 600)).allowed
        await admit_users(store, key_id, SHORT, [f"gone-{n}" for n in range(100)])
        await until(lambda: stored(store_url) == 101, "every budget stored")
        clock.advance(3 * 60)  # the window has passed, the hold (600 s) has not
        for n in range(130):
            assert (await store.admit(key_id, *budget(key_id, LONG, "alive"), f"live{n}", 60)).allowed
        await until(lambda: stored(store_url) == 2, "the short budgets gone, the held one kept")
        [state] = await store.charge(slow, "slow-call", [250])
        assert (state.used, state.held) == (250, 0)

    run(store_url, clock, body)


# --- the admin read ----------------------------------------------------------------------------


class Monitor:
    """Every command Redis runs while it is open (MONITOR: scripts' own commands included)."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.db = self.client.connection_pool.connection_kwargs.get("db", 0)
        self.commands: list[list[str]] = []
        self._watching = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.client.monitor() as monitor:
            for event in monitor.listen():
                words = event["command"].split(" ")
                if words == ["ECHO", "monitor-stop"]:
                    return
                if words == ["ECHO", "monitor-start"]:
                    self._watching.set()
                elif event["db"] == self.db:
                    self.commands.append(words)

    def __enter__(self) -> Monitor:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._watching.is_set():  # MONITOR is on once it sees a command sent after it
            assert time.monotonic() < deadline, "MONITOR never started"
            self.client.echo("monitor-start")
            self._watching.wait(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.echo("monitor-stop")
        self._thread.join(10)
        self.client.close()


def test_an_admin_read_of_a_large_stale_index_sends_only_bounded_commands(redis_url: str, clock: FakeClock) -> None:
    """20,000 index entries whose budgets expired long ago, none removed yet (a gateway that was
    idle, or older versions): reading the dashboard lists the live budgets and removes stale entries
    in bounded chunks; no command carries thousands of members (one ZREM of 4 million entries held
    Redis for 2 s: every admission waited)."""
    flush_redis(redis_url)
    client = redis.Redis.from_url(redis_url)
    stale = 20_000

    async def body(store: Store, key_id: str) -> None:
        await admit_users(store, key_id, LONG, ["alive-1", "alive-2"])
        await until(lambda: client.zcard(INDEX) == 2, "the live budgets indexed")
        past = clock() - 7200
        for first in range(0, stale, 5000):
            members = [f"{key_id}:request:60:u:stale{n}" for n in range(first, first + 5000)]
            client.zadd(INDEX_EXPIRY, {m: past for m in members})
            client.zadd(INDEX, {m: 0.9 for m in members})  # sorted above the live ones
        with Monitor(redis_url) as monitor:
            listed = await store.usage(limit=10)
        assert sorted(u.value or "" for u in listed) == ["alive-1", "alive-2"]
        assert client.zcard(INDEX) == client.zcard(INDEX_EXPIRY) == 2  # the stale entries are gone
        largest = max(len(words) for words in monitor.commands)
        assert largest <= 1100, [words[:3] for words in monitor.commands if len(words) == largest]
        ranges = [w for w in monitor.commands if w[0].strip('"').upper() == "ZRANGEBYSCORE"]
        assert ranges and all('"LIMIT"' in w or "LIMIT" in w for w in ranges), ranges

    run(redis_url, clock, body)
    client.close()


def test_an_index_entry_written_again_while_it_expired_is_put_back(redis_cluster: Any, clock: FakeClock) -> None:
    """The expiry step removes an entry from the expiry set (`expire.lua`), then from the ratio set;
    a writer that re-adds it in between (expiry first, then ratio) would see its ratio removed: the
    expiry step finds the entry back in the expiry set and restores its ratio from the budget, and
    the dashboard lists the budget. On the Cluster the two sets live on different nodes, so the
    race is played exactly: the ratio set's node stopped (SIGSTOP) while the remover's ZREM waits
    for it, the writer's new expiry written meanwhile, then the node let go (SIGCONT)."""
    redis_cluster.flush()
    url = str(redis_cluster.url)
    nodes = redis.RedisCluster.from_url(url.replace("+cluster", ""))
    ratio_node, expiry_node = (nodes.get_node_from_key(k) for k in (INDEX, INDEX_EXPIRY))
    assert ratio_node.port != expiry_node.port  # the race needs them apart
    ratio_server = redis_cluster.processes[redis_cluster.ports.index(ratio_node.port)]

    async def body(writer: Store, key_id: str) -> None:
        [entry], amounts = budget(key_id, LONG, "back")
        assert (await writer.admit(key_id, [entry], amounts, "first", 60)).allowed
        assert [u.value for u in await writer.usage(key_id=key_id)] == ["back"]  # indexed
        await writer.close()
        clock.advance(3600 + 1)  # the index entry has expired
        remover = open_store(url, clock)
        try:
            await remover.ping()  # connected to every node before one stops
            with Monitor(f"redis://127.0.0.1:{expiry_node.port}") as monitor:
                ratio_server.send_signal(signal.SIGSTOP)
                try:
                    read = asyncio.ensure_future(remover.usage(key_id=key_id))
                    deadline = time.monotonic() + 5  # a node is marked failed after 15 s (tests/cluster.py)
                    while not any(w[:2] == ["ZREM", INDEX_EXPIRY] for w in monitor.commands):
                        assert time.monotonic() < deadline, monitor.commands
                        await asyncio.sleep(0.005)  # until expire.lua has taken the entry out
                    nodes.zadd(INDEX_EXPIRY, {entry.id: clock() + 3600})  # the writer's first ZADD
                finally:
                    ratio_server.send_signal(signal.SIGCONT)
                listed = await read
            assert [(u.value, u.used) for u in listed] == [("back", 0)]
            assert nodes.zscore(INDEX, entry.id) == 0.0  # restored, from the budget as it is now
        finally:
            await remover.close()

    run(url, clock, body)
    nodes.close()


def test_a_charge_after_its_hold_expired_counts_for_a_whole_window(shared_url: str, clock: FakeClock) -> None:
    """A call that outlived its hold is charged after it expired: its units count for the budget's
    whole window from the charge. Redis keeps the budget's hash that long (its expiry, set at the
    admission, moved out), and a hash that expired meanwhile is written again with an expiry (it had
    none: kept forever) and the charging call's quota and policies (the dashboard left it out)."""
    tokens = parse_policies("1000;w=3600;u=token;s=user")

    async def body(store: Store, key_id: str) -> None:
        client = _client(shared_url)
        slow, amounts = budget(key_id, tokens, "slow", amount=400)
        key = budget_key(slow[0].id)
        assert (await store.admit(key_id, slow, amounts, "slow-call", 5)).allowed
        client.pexpire(key, 20_000)  # as if most of the hash's time had passed
        clock.advance(10)  # the hold has expired
        [state] = await store.charge(slow, "slow-call", [250])
        assert (state.used, state.held) == (250, 0)
        assert client.pttl(key) > 3500_000  # the window again (3,600,000 ms when set)

        assert (await store.admit(key_id, slow, amounts, "slower-call", 5)).allowed
        client.delete(key)  # the hash expired before the call ended
        [state] = await store.charge(slow, "slower-call", [100])
        assert (state.used, state.held) == (100, 0)
        assert client.pttl(key) > 3500_000
        [row] = await store.usage(key_id=key_id)
        assert (row.value, row.quota, row.used, row.held, row.policies) == (
            "slow",
            1000,
            100,
            0,
            [tokens[0].normal_form()],
        )
        client.close()

    run(shared_url, clock, body)
