"""Parity: the window algorithm in Python (`limiter.py`, the SQLite store's) and in Lua (`step.lua`
with `common.lua`, the Redis store's, on the real Redis) give the same answers to the same random
sequences of admissions, charges, expiring holds and clock steps.

Both run through their stores with one injected clock (the Redis step then uses the clock's time,
not Redis `TIME`), so what is compared is what the gateway sees: admitted or not, used, held,
reset and retry-after per counter, the policies a refusing counter last admitted, the response
headers made from them, and at the end of each sequence the dashboard's usage and denial list.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import example, given, settings
from hypothesis import strategies as st

from quotagate.limiter import Admission, Budget, CounterState, budgets_for, rate_limit_headers, reports
from quotagate.policy import Unit, parse_policy
from quotagate.stores import KeyRecord, Store, open_store
from quotagate.stores.redis import budget_key

from .conftest import OWNER, flush_redis

START = 1_800_000_000.0
USERS = ["alice", "bob"]


@dataclass(frozen=True)
class Kind:
    """One kind of counter: policies of one kind with different quotas share it."""

    unit: Unit
    window: int
    segment: str | None


@dataclass(frozen=True)
class Admit:
    policies: tuple[str, ...]
    user: str
    amounts: tuple[int, ...]  # per policy drawn; a counter holds the amount of its first policy
    ttl: float


@dataclass(frozen=True)
class Charge:
    """The charge of an earlier call whose key was active (the gateway charges no other): whether it
    was admitted or refused, charged before or not, its holds expired or not."""

    admission: int  # which of them (modulo their count)
    amounts: tuple[int, ...]  # per counter of that admission (modulo their count)


@dataclass(frozen=True)
class Burst:
    """Admissions sent at once: one batch, one step in each store."""

    admits: tuple[Admit, ...]


@dataclass(frozen=True)
class Step:
    millis: int  # may be negative: a clock that went back a little


@dataclass(frozen=True)
class Revoke:
    pass


@dataclass(frozen=True)
class Forget:
    """The store forgets the key's counters that hold nothing (no unit in their window, no live
    hold), as Redis's key expiry and SQLite's sweep do, each at moments of its own."""


Op = Admit | Charge | Burst | Step | Revoke | Forget

kinds = st.builds(
    Kind,
    st.sampled_from(list(Unit)),
    st.sampled_from([60, 90, 61, 3600]),
    st.sampled_from([None, None, "user"]),
)


def quotas(unit: Unit) -> st.SearchStrategy[str]:
    if unit is Unit.CENTS:
        return st.sampled_from(["0.000001", "0.5", "1", "2.25", "10"])
    if unit is Unit.TOKEN:
        return st.integers(1, 300).map(str)
    return st.integers(1, 6).map(str)


def policy_text(kind: Kind, quota: str) -> str:
    segment = f";s={kind.segment}" if kind.segment else ""
    return f"{quota};w={kind.window};u={kind.unit.value}{segment}"


@st.composite
def admits(draw: st.DrawFn, pool: Sequence[Kind]) -> Admit:
    chosen = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3))
    policies = tuple(policy_text(k, draw(quotas(k.unit))) for k in chosen)
    largest = max(parse_policy(p).scaled_quota for p in policies)
    amounts = tuple(draw(st.integers(0, largest + largest // 2)) for _ in policies)
    return Admit(policies, draw(st.sampled_from(USERS)), amounts, draw(st.sampled_from([5.0, 30.0, 60.5])))


@st.composite
def sequences(draw: st.DrawFn, cluster: bool = False) -> list[Op]:
    pool = draw(st.lists(kinds, min_size=1, max_size=3))
    steps = st.one_of(
        st.integers(0, 3_000),
        st.integers(3_000, 130_000),
        st.sampled_from([1_000, 5_000, 30_000, 59_999, 60_000, 60_500, 61_000, 90_000]),
        st.integers(-2_000, -1),
    ).map(Step)
    charges = st.builds(
        Charge, st.integers(0, 50), st.lists(st.integers(0, 400_000), min_size=1, max_size=3).map(tuple)
    )
    ops = st.one_of(
        admits(pool),
        admits(pool),
        charges,
        steps,
        steps,
        st.just(Forget()),
        *([] if cluster else [st.lists(admits(pool), min_size=2, max_size=4).map(tuple).map(Burst)]),
    )
    body = draw(st.lists(ops, min_size=1, max_size=25))
    if not cluster and draw(st.integers(0, 9)) == 0:  # now and then the key is revoked part-way
        body.insert(draw(st.integers(0, len(body))), Revoke())
    return body


def budgets_of(key_id: str, op: Admit) -> tuple[list[Budget], list[int]]:
    """The request's counters and what each holds (or, for requests, takes)."""
    policies = [parse_policy(p) for p in op.policies]
    budgets = budgets_for(key_id, policies, {None: None, "user": op.user})
    amounts = []
    for budget in budgets:
        first = next(i for i, p in enumerate(policies) if p.budget_kind == (budget.unit, budget.window, budget.segment))
        amounts.append(op.amounts[first] if budget.holds else 1)
    return budgets, amounts


async def admit(
    store: Store, key_id: str, taking: tuple[list[Budget], list[int]], reservation: str, ttl: float
) -> Admission:
    budgets, amounts = taking
    return await store.admit(key_id, budgets, amounts, reservation, ttl)


async def charge(store: Store, budgets: list[Budget], reservation: str, amounts: list[int]) -> list[CounterState]:
    return await store.charge(budgets, reservation, amounts)


class Clock:
    def __init__(self) -> None:
        self.millis = 0

    def __call__(self) -> float:
        return START + self.millis / 1000


def answer(admission: Admission, budgets: list[Budget]) -> tuple[Any, ...]:
    headers = rate_limit_headers(reports(budgets, admission.states)) if admission.key_active else {}
    return admission.key_active, admission.allowed, admission.states, headers


async def drive(store: Store, forget: Forgetter, clock: Clock, key_id: str, ops: list[Op]) -> list[Any]:
    """The answers a store gives to `ops`, in order, for a key of their own."""
    clock.millis = 0
    answers: list[Any] = []
    admitted: list[tuple[list[Budget], str]] = []
    touched: dict[str, Budget] = {}
    assert await store.create_key(KeyRecord(key_id, key_id, b"s", b"d", "", START))
    for n, op in enumerate(ops):
        if isinstance(op, Step):
            clock.millis += op.millis
        elif isinstance(op, Revoke):
            await store.revoke_key(key_id, clock())
        elif isinstance(op, Forget):
            await forget_empty(store, forget, list(touched.values()))
        elif isinstance(op, Admit):
            taking = budgets_of(key_id, op)
            budgets = taking[0]
            touched.update((b.id, b) for b in budgets)
            admission = await admit(store, key_id, taking, f"r{n}", op.ttl)
            admitted += [(budgets, f"r{n}")] if admission.key_active else []
            answers.append(answer(admission, budgets))
        elif isinstance(op, Burst):
            calls = [(budgets_of(key_id, a), f"r{n}.{i}", a.ttl) for i, a in enumerate(op.admits)]
            touched.update((b.id, b) for (budgets, _), _, _ in calls for b in budgets)
            results = await asyncio.gather(*(admit(store, key_id, b, r, ttl) for b, r, ttl in calls))
            admitted += [(b[0], r) for (b, r, _), result in zip(calls, results, strict=True) if result.key_active]
            answers += [answer(result, b[0]) for result, (b, _, _) in zip(results, calls, strict=True)]
        elif admitted:
            budgets, reservation = admitted[op.admission % len(admitted)]
            amounts = [op.amounts[i % len(op.amounts)] for i in range(len(budgets))]
            answers.append(await charge(store, budgets, reservation, amounts))
    answers.append(sorted((_usage_row(u) for u in await store.usage(key_id, limit=1000) if u.used or u.held), key=repr))
    denials = await store.denials(limit=1000)
    answers.append([(d.at, d.policy, d.segment, d.value) for d in denials if d.key_id == key_id])
    return answers


Forgetter = Callable[[list[str]], None]


async def forget_empty(store: Store, forget: Forgetter, budgets: list[Budget]) -> None:
    """Forget the counters among `budgets` that hold nothing now (read with a charge of nothing,
    which writes nothing that is compared)."""
    if budgets:
        states = await store.charge(budgets, "forget", [0] * len(budgets))
        forget([b.id for b, s in zip(budgets, states, strict=True) if not s.used and not s.held])


def _usage_row(u: Any) -> tuple[Any, ...]:
    return (u.unit, u.window, u.segment, u.value, u.quota, u.used, u.held, round(u.ratio, 9), u.policies)


class Stores:
    """A SQLite store (open for the whole test) and a Redis one (opened for each sequence, on a
    database emptied first, unless it is a Cluster), both on one clock; each sequence counts for a
    key of its own."""

    def __init__(self, redis_url: str, folder: Path) -> None:
        self.runner = asyncio.Runner()
        self.clock = Clock()
        self.redis_url = redis_url
        self.cluster = "+cluster" in redis_url
        self.redis: Any = (
            redis.RedisCluster.from_url(redis_url.replace("+cluster", ""))
            if self.cluster
            else redis.Redis.from_url(redis_url)
        )
        self.sqlite_path = folder / "parity.db"
        self.sqlite = open_store(f"sqlite:///{self.sqlite_path}", self.clock)
        self.keys = itertools.count()

    def _forget_rows(self, ids: list[str]) -> None:
        with contextlib.closing(sqlite3.connect(self.sqlite_path)) as db, db:
            db.executemany("DELETE FROM counters WHERE id = ?", [(i,) for i in ids])

    def _forget_hashes(self, ids: list[str]) -> None:
        for budget_id in ids:
            self.redis.delete(budget_key(budget_id))

    def run(self, ops: list[Op]) -> tuple[list[Any], list[Any]]:
        key_id = f"k{next(self.keys)}"
        python = self.runner.run(drive(self.sqlite, self._forget_rows, self.clock, key_id, ops))
        if not self.cluster:
            owner = self.redis.get(OWNER)
            self.redis.flushdb()
            if owner is not None:
                self.redis.set(OWNER, owner, ex=6 * 3600)
        return python, self.runner.run(self._lua(key_id, ops))

    async def _lua(self, key_id: str, ops: list[Op]) -> list[Any]:
        store = open_store(self.redis_url, self.clock)
        try:
            return await drive(store, self._forget_hashes, self.clock, key_id, ops)
        finally:
            await store.close()

    def close(self) -> None:
        self.runner.run(self.sqlite.close())
        self.runner.close()
        self.redis.close()


@pytest.fixture(scope="module")
def stores(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    pair = Stores(redis_url, tmp_path_factory.mktemp("parity"))
    yield pair
    pair.close()
    flush_redis(redis_url)


@settings(max_examples=150, deadline=None)
@given(ops=sequences())
# a clock gone back within a bucket: its time is the latest write's (Python kept the later time,
# and a Reset of 61 s for a 60 s window)
@example(ops=[Step(900), Admit(("5;w=60",), "alice", (0,), 5.0), Step(-500), Admit(("5;w=60",), "alice", (0,), 5.0)])
# a charge of an earlier call leaves the counter under the policies of the last call it admitted
# (SQLite took the charging call's quota and policies)
@example(
    ops=[
        Admit(("1;w=60;u=request",), "alice", (0,), 5.0),
        Admit(("2;w=60;u=request",) * 3, "alice", (0, 0, 0), 5.0),
        Charge(0, (1,)),
    ]
)
# the dashboard leaves out holds that expired (Redis showed them until the next write)
@example(
    ops=[
        Admit(("1;w=60;u=request",), "alice", (0,), 5.0),
        Admit(("1;w=60;u=request",), "alice", (0,), 5.0),
        Admit(("2;w=60;u=request", "2;w=60;u=request", "0.000001;w=60;u=cents"), "alice", (0, 0, 1), 5.0),
        Step(5000),
    ]
)
# a charge that lands after its counter was forgotten (a call that outlived its hold and the
# window): the counter shows the charge under the charging call's quota and policies (Redis wrote
# neither, and the dashboard left the counter out)
@example(
    ops=[
        Admit(("100;w=60;u=token",), "alice", (40,), 5.0),
        Step(70_000),
        Forget(),
        Charge(0, (30,)),
    ]
)
def test_python_and_lua_count_alike(stores: Stores, ops: list[Op]) -> None:
    python, lua = stores.run(ops)
    for i, (p, r) in enumerate(zip(python, lua, strict=True)):
        assert p == r, f"answer {i} differs: Python {p!r}, Lua {r!r}"


@pytest.fixture(scope="module")
def cluster_stores(redis_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    redis_cluster.flush()  # what other tests left (a hash broken on purpose, say) is not read here
    pair = Stores(str(redis_cluster.url), tmp_path_factory.mktemp("parity-cluster"))
    yield pair
    pair.close()


@settings(max_examples=40, deadline=None)
@given(ops=sequences(cluster=True))
# a revoked key's admission: no counter states (the Cluster returned the refunded ones)
@example(ops=[Revoke(), Admit(("1;w=60;u=request",), "alice", (0,), 5.0)])
# budgets in slots that admitted a refused request did not refuse it: no retry-after of their own,
# no denial on the dashboard (the Cluster gave them 1 s and listed them)
@example(ops=[Admit(("1;w=60", "5;w=90", "100;w=60;u=token"), "alice", (0, 0, 10), 5.0)] * 2)
def test_python_and_the_cluster_count_alike(cluster_stores: Stores, ops: list[Op]) -> None:
    """On a Cluster a request's budgets in different slots are taken in separate calls, and refunded
    when another slot refuses: one request at a time, the answers are the same. By design, not
    drawn here: two requests at once may both be refused where one would have fitted; a revoked
    key's refused request runs no differently (its key is checked beside the takes, not before).
    Not compared: a refused request leaves its quota and policies on the counters of the slots that
    took from them and gave back (the dashboard shows them until the next admission)."""
    python, lua = cluster_stores.run(ops)
    for i, (p, r) in enumerate(zip(python, lua, strict=True)):
        assert _refunds_unset(p) == _refunds_unset(r), f"answer {i} differs: Python {p!r}, Cluster {r!r}"


def _refunds_unset(answer: Any) -> Any:
    """A refused request's answer without the reset of the budgets that did not refuse (on a Cluster,
    those in a slot that admitted it: refunded, their reset is the take's, up to a bucket later);
    the usage without the quota and policies (see above)."""
    if isinstance(answer, list) and answer and isinstance(answer[0], tuple) and len(answer[0]) == 9:
        return sorted(((row[:4], row[5:7]) for row in answer), key=repr)  # unit, window, segment, value; used, held
    if not (isinstance(answer, tuple) and answer[0] and not answer[1]):
        return answer
    states = [s if s.retry_after else dataclasses.replace(s, reset=-1) for s in answer[2]]
    return (*answer[:2], states, {k: v for k, v in answer[3].items() if k != "RateLimit"})


def test_the_answers_compared_are_the_gateways(stores: Stores) -> None:
    """What is compared holds the decisions and numbers themselves (a third request over a quota
    of two is refused, with its retry-after), so a difference in any of them fails the test above."""
    ops: list[Op] = [Admit(("2;w=60",), "alice", (0,), 30.0)] * 3
    python, lua = stores.run(ops)
    assert python == lua
    assert [a[1] for a in python[:3]] == [True, True, False]
    assert python[2][2] == [CounterState(used=2, held=0, reset=60, retry_after=60)]
    assert python[2][3]["Helicone-RateLimit-Remaining"] == "0"
