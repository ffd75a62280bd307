"""SQLite store: one file, shared by every worker process, one transaction per step.

Every step runs on one dedicated thread per process (so the event loop never waits on a lock),
inside `BEGIN IMMEDIATE`, which takes SQLite's write lock up front: the check and the take of an
admission are one atomic step across all processes sharing the file. The window algorithm is the
one in `quotagate.limiter`; each counter's state is a small JSON document in its row.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import orjson

from .. import limiter
from ..limiter import Admission, Budget, CounterState
from .base import GLOBAL, BudgetUsage, Denial, KeyRecord, StoreError
from .batch import Admit, Batcher

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    salt BLOB NOT NULL,
    digest BLOB NOT NULL,
    policies TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS counters (
    id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    unit TEXT NOT NULL,
    window INTEGER NOT NULL,
    segment TEXT,
    value TEXT,
    quota INTEGER NOT NULL,
    used INTEGER NOT NULL,
    held INTEGER NOT NULL,
    ratio REAL NOT NULL,
    policies TEXT NOT NULL,
    updated_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    last_denied_at REAL,
    state BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS counters_by_ratio ON counters (ratio DESC);
CREATE INDEX IF NOT EXISTS counters_by_expiry ON counters (expires_at);
CREATE TABLE IF NOT EXISTS denials (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    key_id TEXT NOT NULL,
    policy TEXT NOT NULL,
    segment TEXT,
    value TEXT
);
"""

DENIALS_KEPT = 1000


def path_from_url(url: str) -> Path:
    """`sqlite:///relative.db` is relative to the working directory, `sqlite:////abs.db` absolute."""
    if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
        raise ValueError(f"not a SQLite store URL: {url!r} (expected sqlite:///path/to/file.db)")
    return Path(url[len("sqlite:///") :])


def _load(blob: bytes) -> dict:
    raw = orjson.loads(blob)
    return {"b": {int(i): [a, t] for i, a, t in raw["b"]}, "t": raw["t"], "h": raw["h"]}


def _dump(state: dict) -> bytes:
    return orjson.dumps({"b": [(i, a, t) for i, (a, t) in state["b"].items()], "t": state["t"], "h": state["h"]})


class SQLiteStore:
    def __init__(self, url: str, clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self.path = path_from_url(url)
        self.clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quotagate-sqlite")
        self._db: sqlite3.Connection | None = None
        self._admits: Batcher[Admit, Admission] = Batcher(lambda items: self._run(self._admit_many, items))
        self._charges: Batcher[tuple[Sequence[Budget], str, Sequence[int]], list[CounterState]] = Batcher(
            lambda items: self._run(self._charge_many, items)
        )

    # -- plumbing ----------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            db.executescript(SCHEMA)
            self._db = db
        return self._db

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, partial(self._call, fn, *args))
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path}: {exc}") from exc

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        db = self._connect()
        try:
            return fn(db, *args)
        except BaseException:
            if db.in_transaction:
                db.rollback()
            raise

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        def _close(_: sqlite3.Connection) -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        if self._db is not None:
            await self._run(_close)
        self._executor.shutdown(wait=True)

    # -- counters ----------------------------------------------------------------------------

    async def admit(self, key_id: str, budgets: Sequence[Budget], reservation: str, hold_ttl: float) -> Admission:
        return await self._admits.submit(Admit(key_id, budgets, reservation, hold_ttl))

    def _admit_many(self, db: sqlite3.Connection, items: Sequence[Admit]) -> list[Admission]:
        """A batch of admissions in one transaction, each decided on its own, in order."""
        if not any(item.budgets for item in items):  # key checks only: a read, no lock
            return [Admission(_key_active(db, item.key_id), True, []) for item in items]
        db.execute("BEGIN IMMEDIATE")
        now = self.clock()
        results = [self._admit_one(db, item, now) for item in items]
        db.commit()
        return results

    def _admit_one(self, db: sqlite3.Connection, item: Admit, now: float) -> Admission:
        budgets = item.budgets
        if not _key_active(db, item.key_id):
            return Admission(False, False, [])
        if not budgets:
            return Admission(True, True, [])
        states = self._states(db, budgets, now)
        allowed = all(limiter.fits(state, b) for state, b in zip(states, budgets, strict=True))
        if allowed:
            for state, budget in zip(states, budgets, strict=True):
                limiter.take(state, budget, now, item.reservation, item.hold_ttl)
        views = [limiter.view(s, b, now, denied=not allowed) for s, b in zip(states, budgets, strict=True)]
        self._save(db, budgets, states, views, now, item.hold_ttl, denied=not allowed)
        if not allowed:
            self._record_denial(db, budgets, states, now)
        return Admission(True, allowed, views)

    async def charge(self, budgets: Sequence[Budget], reservation: str, amounts: Sequence[int]) -> list[CounterState]:
        return await self._charges.submit((budgets, reservation, amounts))

    def _charge_many(
        self, db: sqlite3.Connection, items: Sequence[tuple[Sequence[Budget], str, Sequence[int]]]
    ) -> list[list[CounterState]]:
        db.execute("BEGIN IMMEDIATE")
        now = self.clock()
        results = [self._charge_one(db, *item, now) for item in items]
        db.commit()
        return results

    def _charge_one(
        self, db: sqlite3.Connection, budgets: Sequence[Budget], reservation: str, amounts: Sequence[int], now: float
    ) -> list[CounterState]:
        states = self._states(db, budgets, now)
        for state, budget, amount in zip(states, budgets, amounts, strict=True):
            limiter.settle(state, budget.window, now, reservation, amount)
        views = [limiter.view(s, b, now) for s, b in zip(states, budgets, strict=True)]
        self._save(db, budgets, states, views, now, 0.0, denied=False)
        return views

    def _states(self, db: sqlite3.Connection, budgets: Sequence[Budget], now: float) -> list[dict]:
        ids = [b.id for b in budgets]
        marks = ",".join("?" * len(ids))
        rows = dict(db.execute(f"SELECT id, state FROM counters WHERE id IN ({marks})", ids).fetchall())
        states = []
        for budget in budgets:
            blob = rows.get(budget.id)
            state = _load(blob) if blob is not None else limiter.new_state()
            limiter.expire(state, budget.window, now)
            states.append(state)
        return states

    def _save(
        self,
        db: sqlite3.Connection,
        budgets: Sequence[Budget],
        states: Sequence[dict],
        views: Sequence[CounterState],
        now: float,
        hold_ttl: float,
        denied: bool,
    ) -> None:
        """Write the states back; a denial marks only the budgets that refused."""
        rows = []
        for budget, state, view in zip(budgets, states, views, strict=True):
            refused = denied and not limiter.fits(state, budget)
            expires = now + budget.window + (hold_ttl if budget.holds else 0)
            policies = orjson.dumps([p.normal_form() for p in budget.policies]).decode()
            ratio = (view.used + view.held) / budget.quota if budget.quota else 1.0
            rows.append(
                (
                    budget.id,
                    budget.key_id,
                    budget.unit.value,
                    budget.window,
                    budget.segment,
                    budget.value,
                    budget.quota,
                    view.used,
                    view.held,
                    ratio,
                    policies,
                    now,
                    expires,
                    now if refused else None,
                    _dump(state),
                )
            )
        db.executemany(
            "INSERT INTO counters (id, key_id, unit, window, segment, value, quota, used, held, ratio,"
            " policies, updated_at, expires_at, last_denied_at, state)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (id) DO UPDATE SET quota=excluded.quota, used=excluded.used,"
            " held=excluded.held, ratio=excluded.ratio, policies=excluded.policies,"
            " updated_at=excluded.updated_at, expires_at=max(expires_at, excluded.expires_at),"
            " last_denied_at=coalesce(excluded.last_denied_at, last_denied_at), state=excluded.state",
            rows,
        )

    def _record_denial(
        self, db: sqlite3.Connection, budgets: Sequence[Budget], states: Sequence[dict], now: float
    ) -> None:
        for budget, state in zip(budgets, states, strict=True):
            if not limiter.fits(state, budget):
                policy = min(budget.policies, key=lambda p: p.scaled_quota).normal_form()
                db.execute(
                    "INSERT INTO denials (at, key_id, policy, segment, value) VALUES (?,?,?,?,?)",
                    (now, budget.key_id, policy, budget.segment, budget.value),
                )
        db.execute("DELETE FROM denials WHERE seq <= (SELECT max(seq) FROM denials) - ?", (DENIALS_KEPT,))

    # -- usage -------------------------------------------------------------------------------

    async def usage(
        self,
        key_id: str | None = None,
        segment: str | None = None,
        value: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[BudgetUsage]:
        return await self._run(self._usage, key_id, segment, value, limit, offset)

    def _usage(
        self,
        db: sqlite3.Connection,
        key_id: str | None,
        segment: str | None,
        value: str | None,
        limit: int,
        offset: int,
    ) -> list[BudgetUsage]:
        now = self.clock()
        where: list[str] = ["c.expires_at > ?"]
        args: list[object] = [now]
        if segment == GLOBAL:
            where.append("c.segment IS NULL")
            segment = None
        for column, wanted in (("c.key_id", key_id), ("c.segment", segment), ("c.value", value)):
            if wanted is not None:
                where.append(f"{column} = ?")
                args.append(wanted)
        rows = db.execute(
            "SELECT c.key_id, coalesce(k.name, ''), c.unit, c.window, c.segment, c.value, c.quota,"
            " c.policies, c.updated_at, c.last_denied_at, c.state"
            " FROM counters c LEFT JOIN keys k ON k.id = c.key_id"
            f" WHERE {' AND '.join(where)} ORDER BY c.ratio DESC LIMIT ? OFFSET ?",
            [*args, limit, offset],
        ).fetchall()
        return sorted((_usage_row(row, now) for row in rows), key=lambda u: -u.ratio)

    async def denials(self, limit: int = 50) -> list[Denial]:
        return await self._run(self._denials, limit)

    def _denials(self, db: sqlite3.Connection, limit: int) -> list[Denial]:
        rows = db.execute(
            "SELECT d.at, d.key_id, coalesce(k.name, ''), d.policy, d.segment, d.value FROM denials d"
            " LEFT JOIN keys k ON k.id = d.key_id ORDER BY d.seq DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [Denial(*row) for row in rows]

    # -- keys --------------------------------------------------------------------------------

    async def create_key(self, record: KeyRecord) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT INTO keys (id, name, salt, digest, policies, created_at, revoked_at) VALUES (?,?,?,?,?,?,?)",
                (
                    record.id,
                    record.name,
                    record.salt,
                    record.digest,
                    record.policies,
                    record.created_at,
                    record.revoked_at,
                ),
            )
        )

    async def get_key(self, key_id: str) -> KeyRecord | None:
        def _get(db: sqlite3.Connection) -> KeyRecord | None:
            row = db.execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE id = ?", (key_id,)).fetchone()
            return KeyRecord(*row) if row else None

        return await self._run(_get)

    async def list_keys(self) -> list[KeyRecord]:
        def _list(db: sqlite3.Connection) -> list[KeyRecord]:
            rows = db.execute(f"SELECT {_KEY_COLUMNS} FROM keys ORDER BY created_at").fetchall()
            return [KeyRecord(*row) for row in rows]

        return await self._run(_list)

    async def revoke_key(self, key_id: str, at: float) -> bool:
        def _revoke(db: sqlite3.Connection) -> bool:
            cursor = db.execute("UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (at, key_id))
            return cursor.rowcount > 0

        return await self._run(_revoke)


_KEY_COLUMNS = "id, name, salt, digest, policies, created_at, revoked_at"


def _key_active(db: sqlite3.Connection, key_id: str) -> bool:
    row = db.execute("SELECT revoked_at FROM keys WHERE id = ?", (key_id,)).fetchone()
    return row is not None and row[0] is None


def _usage_row(row: tuple, now: float) -> BudgetUsage:
    key_id, key_name, unit, window, segment, value, quota, policies, updated, denied, blob = row
    state = _load(blob)
    limiter.expire(state, window, now)
    used, hold = state["t"], limiter.held(state)
    return BudgetUsage(
        key_id=key_id,
        key_name=key_name,
        unit=unit,
        window=window,
        segment=segment,
        value=value,
        quota=quota,
        used=used,
        held=hold,
        ratio=(used + hold) / quota if quota else 1.0,
        policies=orjson.loads(policies),
        updated_at=updated,
        last_denied_at=denied,
    )
