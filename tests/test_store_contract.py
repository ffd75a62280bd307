"""The store contract, exercised directly on every store with an injected clock: holds that
expire, charges after expiry, windows sliding, batches of admissions in one step."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from quotagate.keys import create_key
from quotagate.limiter import Budget, base_amounts, budgets_for
from quotagate.policy import parse_policies
from quotagate.stores import Store

from .conftest import FakeClock, with_store


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


def run(store_url: str, clock: FakeClock, body: Callable[[Store, str], Awaitable[None]]) -> None:
    with_store(store_url, clock, body, "contract")


def tokens(key_id: str, amount: int, quota: int = 100) -> tuple[list[Budget], list[int]]:
    """A token budget and the amount a call holds on it."""
    return budgets_for(key_id, parse_policies(f"{quota};w=60;u=token"), {None: None}), [amount]


def test_holds_of_calls_never_charged_expire(store_url: str, clock: FakeClock) -> None:
    async def body(store: Store, key_id: str) -> None:
        assert (await store.admit(key_id, *tokens(key_id, 100), "lost", hold_ttl=30)).allowed
        second = await store.admit(key_id, *tokens(key_id, 10), "next", hold_ttl=30)
        assert not second.allowed and second.states[0].held == 100 and second.states[0].retry_after == 1
        clock.advance(31)  # the gateway that placed the hold died: it expires
        third = await store.admit(key_id, *tokens(key_id, 10), "next", hold_ttl=30)
        assert third.allowed and third.states[0].held == 10

    run(store_url, clock, body)


def test_a_charge_after_its_hold_expired_counts_once(store_url: str, clock: FakeClock) -> None:
    async def body(store: Store, key_id: str) -> None:
        budgets, amounts = tokens(key_id, 40)
        await store.admit(key_id, budgets, amounts, "slow", hold_ttl=30)
        clock.advance(45)
        [state] = await store.charge(budgets, "slow", [25])
        assert (state.used, state.held) == (25, 0)
        [state] = await store.charge(budgets, "slow", [0])  # a repeated settle releases nothing more
        assert (state.used, state.held) == (25, 0)

    run(store_url, clock, body)


def test_charges_land_in_the_window_of_their_time(store_url: str, clock: FakeClock) -> None:
    async def body(store: Store, key_id: str) -> None:
        budgets, amounts = tokens(key_id, 5)
        await store.admit(key_id, budgets, amounts, "a", hold_ttl=600)
        clock.advance(50)
        [state] = await store.charge(budgets, "a", [70])
        assert (state.used, state.held, state.reset) == (70, 0, 60)
        clock.advance(59.5)
        assert (await store.admit(key_id, *tokens(key_id, 5), "b", hold_ttl=600)).states[0].used == 70
        clock.advance(1)
        assert (await store.admit(key_id, *tokens(key_id, 5), "c", hold_ttl=600)).states[0].used == 0

    run(store_url, clock, body)


def test_concurrent_admissions_are_decided_one_by_one(store_url: str, clock: FakeClock) -> None:
    """Many admissions at once (batched into one store step where the store can): exact."""

    async def body(store: Store, key_id: str) -> None:
        def requests() -> list[Budget]:
            return budgets_for(key_id, parse_policies("7;w=60, 100;w=60;s=user"), {None: None, "user": "u"})

        results = await asyncio.gather(*(store.admit(key_id, requests(), [1, 1], f"r{i}", 60) for i in range(30)))
        assert sum(r.allowed for r in results) == 7
        assert sorted(r.states[0].used for r in results if r.allowed) == list(range(1, 8))
        # denied requests took nothing from the user budget they also named (on a Cluster the
        # refund of their take from the other slot lands after the race, but it lands)
        user_only = budgets_for(key_id, parse_policies("100;w=60;s=user"), {None: None, "user": "u"})
        assert (await store.admit(key_id, user_only, [1], "last", 60)).states[0].used == 8

    run(store_url, clock, body)


def test_revoked_key_is_refused_in_the_same_step(store_url: str, clock: FakeClock) -> None:
    async def body(store: Store, key_id: str) -> None:
        assert (await store.admit(key_id, *tokens(key_id, 1), "a", 60)).key_active
        await store.revoke_key(key_id, clock())
        result = await store.admit(key_id, *tokens(key_id, 1), "b", 60)
        assert not result.key_active and not result.allowed
        assert not (await store.admit(key_id, [], [], "c", 60)).key_active

    run(store_url, clock, body)


def test_key_ids_lists_every_key_revoked_ones_too(store_url: str, clock: FakeClock) -> None:
    """What each worker reads to learn the keys it has not seen (for a store outage)."""

    async def body(store: Store, key_id: str) -> None:
        _, other = await create_key(store, "other", ["5;w=60"])
        await store.revoke_key(other.id, clock())
        assert sorted(await store.key_ids()) == sorted([key_id, other.id])

    run(store_url, clock, body)


def test_sqlite_wal_is_checkpointed_off_the_event_loop(tmp_path: Path, clock: FakeClock) -> None:
    """Commits on the event loop never checkpoint (a checkpoint syncs the database file: a stall
    of milliseconds), so the store thread must: the WAL stays bounded under a stream of
    admissions for distinct users instead of growing with every commit."""
    path = tmp_path / "wal.db"
    policies = parse_policies("1000;w=60;s=user, 1000;w=60;u=token;s=user")

    async def body(store: Store, key_id: str) -> None:
        wal = Path(f"{path}-wal")
        largest = 0
        deadline = time.monotonic() + 60
        for n in range(6000):
            budgets = budgets_for(key_id, policies, {None: None, "user": f"user-{n}"})
            assert (await store.admit(key_id, budgets, base_amounts(budgets), f"r{n}", hold_ttl=30)).allowed
            largest = max(largest, wal.stat().st_size)
            if n >= 2000 and time.monotonic() > deadline:
                break
        # without checkpoints 6,000 commits of new rows (about 28 KB each) make a WAL of ~170 MB;
        # checkpointed every 64 commits on the store thread it is reused, and grows only while a
        # checkpoint's sync is slow (a few MB to ~20 MB here)
        assert 0 < largest < 48 * 1024 * 1024, largest

    run(f"sqlite:///{path}", clock, body)
