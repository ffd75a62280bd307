"""SQLite store: one file, shared by every worker process, one transaction per step.

A step runs inside `BEGIN IMMEDIATE`, which takes SQLite's write lock up front: the check and the
take of an admission are one atomic step across all processes sharing the file. While the lock is
free a step runs on the event loop itself (a fraction of a millisecond); when another process
holds it, on one dedicated thread per process, so the event loop never waits on a lock, and the
maintenance (expired rows deleted in small chunks, then a WAL checkpoint, which writes and syncs
the database file) runs on that thread too. The window algorithm is the one in
`quotagate.limiter`; each counter's state is a small JSON document in its row.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
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
from ..policy import MIN_WINDOW
from ..redact import redact_url
from .base import DENIALS_KEPT, EVERY_SEGMENT, BudgetUsage, Denial, KeyRecord, SegmentFilter, StepError, StoreError
from .batch import Admit, Batcher, Charge, Failed, Step, StepResult

T = TypeVar("T")
log = logging.getLogger(__name__)
CHECKPOINT_COMMITS = 64  # ~1 MB of WAL for new budgets (a commit writes about 16 KB of pages)
PURGE_SPAN = 1000  # rowids a maintenance job reads looking for expired rows (a read: no lock)
PURGE_CHUNK = 50  # expired rows deleted per transaction: the write lock held about a millisecond
PURGE_ROWS = 1000  # rows a maintenance pass reads, at least (four times the rows inserted since the last)

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
DROP INDEX IF EXISTS counters_by_expiry;
CREATE TABLE IF NOT EXISTS denials (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    key_id TEXT NOT NULL,
    policy TEXT NOT NULL,
    segment TEXT,
    value TEXT
);
"""


# the admin surface's state: dashboard sessions, failed sign-ins per client address
ADMIN_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
    scope TEXT PRIMARY KEY,
    window_start REAL NOT NULL,
    count INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_by_window ON attempts (window_start);
"""
# one active key per name; a database from before it may hold duplicates, which stay (the insert
# itself checks the name, so no new duplicate is made either way)
UNIQUE_NAMES = "CREATE UNIQUE INDEX IF NOT EXISTS keys_active_name ON keys (name) WHERE revoked_at IS NULL"


def path_from_url(url: str) -> Path:
    """`sqlite:///relative.db` is relative to the working directory, `sqlite:////abs.db` absolute."""
    if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
        raise ValueError(f"not a SQLite store URL: {redact_url(url)!r} (expected sqlite:///path/to/file.db)")
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
        self._db: sqlite3.Connection | None = None  # used on the store thread only
        self._inline: sqlite3.Connection | None = None  # used on the event loop only, never waits
        self._waiting = 0  # batches handed to the store thread and not back yet
        # admissions and charges of one loop turn share one transaction
        self._steps: Batcher[Step, Any] = Batcher(self._execute_steps)
        # what is known while no other connection has committed (PRAGMA data_version)
        self._seen_version: tuple[int, int] | None = None
        self._states_known: dict[str, dict] = {}
        self._keys_known: dict[str, bool] = {}
        # expired rows are deleted and the WAL checkpointed on the store thread, never on the event loop
        self._commits = 0  # on the event loop since the last maintenance
        self._maintaining = False
        self._maintenance: sqlite3.Connection | None = None  # on the store thread only
        self._inserted = 0  # counter rows inserted since the last maintenance pass
        self._sweep = 0  # the rowid the maintenance reads on from
        self._marks: collections.deque[tuple[float, int]] = collections.deque()  # (when, the largest rowid then)
        self._expired: list[int] = []  # rows it found expired and has not deleted yet
        self._duplicates_logged = False

    # -- plumbing ----------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = self._open(busy_ms=30000)
        return self._db

    def _maintain_soon(self) -> None:
        """After commits on the event loop (whose connection never checkpoints: a checkpoint
        writes the database file and syncs it, milliseconds the loop would stall), delete expired
        rows and copy the WAL back on the store thread every CHECKPOINT_COMMITS commits. A pass reads
        four times the rows inserted since the last one, so that deletion keeps up with new budgets."""
        self._commits += 1
        if self._maintaining or self._commits < CHECKPOINT_COMMITS:
            return
        allowance, self._inserted = max(PURGE_ROWS, 4 * self._inserted), 0
        self._maintaining, self._commits = True, 0
        try:
            self._executor.submit(self._maintain, allowance, True)
        except RuntimeError:  # the store is closing
            self._maintaining = False

    def _maintain(self, allowance: int, first: bool = False) -> None:
        """One job of a pass: delete PURGE_CHUNK of the expired rows found, or read the next
        PURGE_SPAN rows for expired ones (a read: no lock), among the rows that were in the table
        MIN_WINDOW seconds ago (a younger one cannot have expired). The next job waits behind
        whatever store step waits for this thread; the pass ends when its allowance is read or the
        sweep comes round, with a RESTART checkpoint, so that the next commit starts the WAL over.
        Its own connection (the others see its deletions through `PRAGMA data_version`) waits at
        most 50 ms for the lock or for readers, then leaves the rest to the next pass."""
        again = False
        try:
            if self._maintenance is None:
                self._maintenance = self._open(busy_ms=0)  # the deletes wait their own way (`_begin`)
            now = self.clock()
            oldest = self._oldest_rowid(self._maintenance, now, first)
            if self._expired:
                chunk, self._expired = self._expired[:PURGE_CHUNK], self._expired[PURGE_CHUNK:]
                _delete_expired(self._maintenance, chunk, now)
            elif allowance > 0 and oldest:
                self._expired, read, self._sweep = _find_expired(self._maintenance, self._sweep, oldest, now)
                allowance = allowance - max(read, 1) if self._sweep else 0  # round the table: this pass is done
            if self._expired or (allowance > 0 and oldest):
                self._executor.submit(self._maintain, allowance)
                again = True
                return
            _checkpoint(self._maintenance)
        except sqlite3.Error as exc:  # busy with another process's maintenance: the next pass will do
            log.debug("SQLite maintenance skipped: %s", exc)
        except RuntimeError:  # the store is closing
            pass
        finally:
            self._maintaining = again

    def _oldest_rowid(self, db: sqlite3.Connection, now: float, first: bool) -> int:
        """The largest rowid the table held MIN_WINDOW seconds ago (0: none known), from the largest
        rowid noted at the start of each pass; rows there before this process began count as old."""
        marks = self._marks
        if first:
            [(top,)] = db.execute("SELECT max(rowid) FROM counters").fetchall()
            marks.append((now if marks else float("-inf"), top or 0))
            while len(marks) > 1 and marks[1][0] <= now - MIN_WINDOW:
                marks.popleft()
        return marks[0][1] if marks and marks[0][0] <= now - MIN_WINDOW else 0

    def _open(self, busy_ms: int) -> sqlite3.Connection:
        _private_files(self.path)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=busy_ms / 1000)
        db.execute(f"PRAGMA busy_timeout={busy_ms}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA cache_size=-65536")  # 64 MiB of pages: budgets stay in memory
        db.execute("PRAGMA mmap_size=268435456")  # reads without a system call each
        db.executescript(SCHEMA)
        db.executescript(ADMIN_SCHEMA)
        self._unique_names(db)
        return db

    def _unique_names(self, db: sqlite3.Connection) -> None:
        try:
            db.execute(UNIQUE_NAMES)
        except sqlite3.IntegrityError:
            if not self._duplicates_logged:
                self._duplicates_logged = True
                names = [r[0] for r in db.execute(_DUPLICATE_NAMES)]
                log.warning("active keys share a name (made before names were unique): %s", names)

    async def _execute_steps(self, items: list[Step]) -> list[StepResult | Failed]:
        """Run a batch on the event loop itself when the write lock is free (a batch takes a fraction
        of a millisecond, less than a hand-off to a thread). When another process holds the lock,
        try again a few times after sub-millisecond pauses (SQLite's own busy handler sleeps a
        millisecond or more); past that, on the store thread, which waits without holding up the
        event loop."""
        pause = 0.0002
        while not self._waiting and pause < 0.05:
            try:
                if self._inline is None:
                    self._inline = self._open(busy_ms=0)
                    self._inline.execute("PRAGMA wal_autocheckpoint=0")
                results = self._guarded(self._inline, self._run_steps, items)
                self._maintain_soon()
                return results
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise StoreError(f"SQLite store {self.path}: {exc}") from exc
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite store {self.path}: {exc}") from exc
            await asyncio.sleep(pause)
            pause *= 2
        self._waiting += 1
        try:
            return await self._run(self._run_steps, items)
        finally:
            self._waiting -= 1

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, partial(self._call, fn, *args))
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path}: {exc}") from exc

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return self._guarded(self._connect(), fn, *args)

    @staticmethod
    def _guarded(db: sqlite3.Connection, fn: Callable[..., T], *args: Any) -> T:
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

        if self._inline is not None:
            self._inline.close()
            self._inline = None

        if self._db is not None:
            await self._run(_close)
        self._executor.shutdown(wait=True)
        if self._maintenance is not None:  # its thread is done
            self._maintenance.close()
            self._maintenance = None

    # -- counters ----------------------------------------------------------------------------

    async def admit(
        self, key_id: str, budgets: Sequence[Budget], amounts: Sequence[int], reservation: str, hold_ttl: float
    ) -> Admission:
        result: Admission = await self._steps.submit(Admit(key_id, budgets, amounts, reservation, hold_ttl))
        return result

    async def charge(self, budgets: Sequence[Budget], reservation: str, amounts: Sequence[int]) -> list[CounterState]:
        result: list[CounterState] = await self._steps.submit(Charge(budgets, reservation, amounts))
        return result

    def _run_steps(self, db: sqlite3.Connection, items: Sequence[Step]) -> list[StepResult | Failed]:
        """A batch of admissions and charges in one transaction, each on its own, in order. An item
        that fails on its own data is left out and the batch runs again from the start (nothing of
        the failed attempt was committed or handed out): it fails alone, every other item is
        decided and committed once, and a batch where nothing fails pays nothing for it."""
        if all(isinstance(i, Admit) and not i.budgets for i in items):  # key checks only: no write lock
            self._refresh(db)
            return [self._key_check(db, i) for i in items]  # type: ignore[arg-type]
        now = self.clock()
        failed: dict[int, Failed] = {}
        while (results := self._attempt(db, items, now, failed)) is None:
            pass
        return results

    def _attempt(
        self, db: sqlite3.Connection, items: Sequence[Step], now: float, failed: dict[int, Failed]
    ) -> list[StepResult | Failed] | None:
        """One transaction over the items not known to fail; None (rolled back) if another one fails."""
        db.execute("BEGIN IMMEDIATE")
        self._refresh(db)
        results: list[StepResult | Failed] = []
        try:
            for index, item in enumerate(items):
                if index in failed:
                    results.append(failed[index])
                    continue
                try:
                    step = self._admit_one if isinstance(item, Admit) else self._charge_one
                    results.append(step(db, item, now))  # type: ignore[arg-type]
                except Exception as exc:
                    if _unavailable(exc):
                        raise
                    failed[index] = _failure(exc)
                    db.rollback()
                    self._forget()
                    return None
            db.commit()
        except BaseException:
            self._forget()
            raise
        return results

    def _key_check(self, db: sqlite3.Connection, item: Admit) -> Admission | Failed:
        try:
            return Admission(self._key_active(db, item.key_id), True, [])
        except Exception as exc:
            if _unavailable(exc):
                raise
            return _failure(exc)

    def _refresh(self, db: sqlite3.Connection) -> None:
        """Forget what another connection may have changed since this one last looked."""
        version = (id(db), db.execute("PRAGMA data_version").fetchone()[0])
        if version != self._seen_version or len(self._states_known) > 100_000:
            self._forget()
            self._seen_version = version

    def _forget(self) -> None:
        self._states_known.clear()
        self._keys_known.clear()

    def _key_active(self, db: sqlite3.Connection, key_id: str) -> bool:
        known = self._keys_known.get(key_id)
        if known is None:
            known = self._keys_known[key_id] = _key_active(db, key_id)
        return known

    def _admit_one(self, db: sqlite3.Connection, item: Admit, now: float) -> Admission:
        budgets = item.budgets
        if not self._key_active(db, item.key_id):
            return Admission(False, False, [])
        if not budgets:
            return Admission(True, True, [])
        states, amounts = self._states(db, budgets, now), item.amounts
        allowed = all(limiter.fits(s, b, a) for s, b, a in zip(states, budgets, amounts, strict=True))
        if allowed:
            for state, budget, amount in zip(states, budgets, amounts, strict=True):
                limiter.take(state, budget, amount, now, item.reservation, item.hold_ttl)
        views = [
            limiter.view(s, b, now, a, denied=not allowed) for s, b, a in zip(states, budgets, amounts, strict=True)
        ]
        if not allowed:  # the budgets that refused are those with a retry-after
            _note_last_policies(budgets, states, views)
        self._save(db, budgets, states, views, now, item.hold_ttl, denied=not allowed)
        if not allowed:
            self._record_denial(db, budgets, views, now)
        return Admission(True, allowed, views)

    def _charge_one(self, db: sqlite3.Connection, item: Charge, now: float) -> list[CounterState]:
        """Settle each budget; only those the charge changes are written (a charge of nothing
        where nothing is held is a read)."""
        states = self._states(db, item.budgets, now)
        changed = [item.reservation in s["h"] or a > 0 for s, a in zip(states, item.amounts, strict=True)]
        for state, budget, amount in zip(states, item.budgets, item.amounts, strict=True):
            limiter.settle(state, budget.window, now, item.reservation, amount)
        views = [limiter.view(s, b, now) for s, b in zip(states, item.budgets, strict=True)]
        kept = [i for i, c in enumerate(changed) if c]
        if kept:
            budgets, written = [item.budgets[i] for i in kept], [views[i] for i in kept]
            self._save(db, budgets, [states[i] for i in kept], written, now, 0.0, denied=False, charged=True)
        return views

    def _states(self, db: sqlite3.Connection, budgets: Sequence[Budget], now: float) -> list[dict]:
        """Each budget's window state, brought up to `now`; what its row holds is kept under "_row".
        States this connection wrote itself, unchanged since by anyone else, are not read again."""
        known = self._states_known
        missing = [b.id for b in budgets if b.id not in known]
        if missing:
            marks = ",".join("?" * len(missing))
            query = f"SELECT id, state, ratio, quota, policies FROM counters WHERE id IN ({marks})"
            for row in db.execute(query, missing):
                state = _load(row[1])
                state["_row"] = row[2:]
                known[row[0]] = state
        states = []
        for budget in budgets:
            current = known.get(budget.id)
            if current is None:
                current = known[budget.id] = {**limiter.new_state(), "_row": None}
            limiter.expire(current, budget.window, now)
            states.append(current)
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
        charged: bool = False,
    ) -> None:
        """Write the states back; a denial marks only the budgets that refused. A counter keeps the
        quota and policies of the last call it admitted (a denial or a charge leaves them). Columns
        that did not change (the indexed ratio, to two decimals, above all) are not rewritten."""
        for budget, state, view in zip(budgets, states, views, strict=True):
            refused = now if denied and view.retry_after else None
            expires = now + budget.window + (hold_ttl if budget.holds else 0)
            row, blob = state["_row"], _dump(state)
            quota, policies = budget.quota, limiter.policies_json(budget.policies).decode()
            if (denied or charged) and row is not None:
                quota, policies = row[1], row[2]
            ratio = round(limiter.ratio(view.used, view.held, quota), 2)
            state["_row"] = (ratio, quota, policies)
            if row is None:
                self._inserted += 1
                db.execute(
                    _INSERT,
                    (
                        budget.id,
                        budget.key_id,
                        budget.unit.value,
                        budget.window,
                        budget.segment,
                        budget.value,
                        quota,
                        view.used,
                        view.held,
                        ratio,
                        policies,
                        now,
                        expires,
                        refused,
                        blob,
                    ),
                )
                continue
            sets = _UPDATE_ALWAYS
            args: list[Any] = [view.used, view.held, now, expires, refused, blob]
            if (ratio, quota, policies) != tuple(row):
                sets += ", ratio=?, quota=?, policies=?"
                args += [ratio, quota, policies]
            db.execute(f"UPDATE counters SET {sets} WHERE id=?", [*args, budget.id])

    def _record_denial(
        self, db: sqlite3.Connection, budgets: Sequence[Budget], views: Sequence[CounterState], now: float
    ) -> None:
        for budget, view in zip(budgets, views, strict=True):
            if view.retry_after:
                policy = budget.strictest.normal_form()
                db.execute(
                    "INSERT INTO denials (at, key_id, policy, segment, value) VALUES (?,?,?,?,?)",
                    (now, budget.key_id, policy, budget.segment, budget.value),
                )
        db.execute("DELETE FROM denials WHERE seq <= (SELECT max(seq) FROM denials) - ?", (DENIALS_KEPT,))

    # -- usage -------------------------------------------------------------------------------

    async def usage(
        self,
        key_id: str | None = None,
        segment: SegmentFilter = EVERY_SEGMENT,
        value: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[BudgetUsage]:
        return await self._run(self._usage, key_id, segment, value, limit, offset)

    def _usage(
        self,
        db: sqlite3.Connection,
        key_id: str | None,
        segment: SegmentFilter,
        value: str | None,
        limit: int,
        offset: int,
    ) -> list[BudgetUsage]:
        now = self.clock()
        where: list[str] = ["c.expires_at > ?"]
        args: list[object] = [now]
        if segment is None:
            where.append("c.segment IS NULL")
        wanted_segment = None if segment is EVERY_SEGMENT else segment
        for column, wanted in (("c.key_id", key_id), ("c.segment", wanted_segment), ("c.value", value)):
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

    async def create_key(self, record: KeyRecord) -> bool:
        def _create(db: sqlite3.Connection) -> bool:
            values = (record.id, record.name, record.salt, record.digest, record.policies, record.created_at)
            try:  # one statement: the name check and the insert are one atomic step
                return db.execute(_INSERT_KEY, (*values, record.name)).rowcount == 1
            except sqlite3.IntegrityError:  # the unique index, if another writer raced (older versions)
                return False

        return await self._run(_create)

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
            self._keys_known.pop(key_id, None)
            return cursor.rowcount > 0

        return await self._run(_revoke)

    # -- dashboard sessions and failed sign-ins -----------------------------------------------

    async def create_session(self, session: str, expires_at: float) -> None:
        def _create(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM sessions WHERE expires_at <= ?", (time.time(),))
            db.execute("INSERT OR REPLACE INTO sessions (id, expires_at) VALUES (?, ?)", (session, expires_at))

        await self._run(_create)

    async def session_expiry(self, session: str) -> float | None:
        def _get(db: sqlite3.Connection) -> float | None:
            row = db.execute("SELECT expires_at FROM sessions WHERE id = ?", (session,)).fetchone()
            return float(row[0]) if row else None

        return await self._run(_get)

    async def delete_session(self, session: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM sessions WHERE id = ?", (session,)))

    async def count_attempt(self, scope: str, window: int) -> tuple[int, float]:
        def _count(db: sqlite3.Connection) -> tuple[int, float]:
            now = self.clock()
            start = now // window * window
            db.execute("DELETE FROM attempts WHERE window_start < ?", (start,))
            [(count,)] = db.execute(_COUNT_ATTEMPT, (scope, start)).fetchall()  # all: the statement ends
            return int(count), start + window - now

        return await self._run(_count)

    async def refund_attempt(self, scope: str, window: int) -> None:
        def _refund(db: sqlite3.Connection) -> None:
            start = self.clock() // window * window
            db.execute(
                "UPDATE attempts SET count = count - 1 WHERE scope = ? AND window_start = ? AND count > 0",
                (scope, start),
            )

        await self._run(_refund)


def _private_files(path: Path) -> None:
    """The database is readable by its owner only: its folder, if made here, 0700; the file 0600
    (SQLite gives its -wal and -shm files the database file's mode). Files of ours that an earlier
    version made group- or world-readable are tightened."""
    with contextlib.suppress(OSError):  # what cannot be made here, SQLite then reports as a store error
        if not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to change
            mode = name.stat().st_mode & 0o777
            if mode & 0o077 and name.stat().st_uid == os.getuid():
                name.chmod(mode & 0o700)
                log.warning("%s was readable by others (%o): now %o", name, mode, mode & 0o700)


_INSERT_KEY = (
    "INSERT INTO keys (id, name, salt, digest, policies, created_at) SELECT ?,?,?,?,?,?"
    " WHERE NOT EXISTS (SELECT 1 FROM keys WHERE name = ? AND revoked_at IS NULL)"
)
_DUPLICATE_NAMES = "SELECT name FROM keys WHERE revoked_at IS NULL GROUP BY name HAVING count(*) > 1"
_COUNT_ATTEMPT = (
    "INSERT INTO attempts (scope, window_start, count) VALUES (?, ?, 1) ON CONFLICT (scope) DO UPDATE SET"
    " count = CASE WHEN window_start = excluded.window_start THEN count + 1 ELSE 1 END,"
    " window_start = excluded.window_start RETURNING count"
)
_KEY_COLUMNS = "id, name, salt, digest, policies, created_at, revoked_at"
_INSERT = (
    "INSERT INTO counters (id, key_id, unit, window, segment, value, quota, used, held, ratio, policies,"
    " updated_at, expires_at, last_denied_at, state) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_UPDATE_ALWAYS = (
    "used=?, held=?, updated_at=?, expires_at=max(expires_at, ?), last_denied_at=coalesce(?, last_denied_at), state=?"
)


def _find_expired(db: sqlite3.Connection, start: int, last: int, now: float) -> tuple[list[int], int, int]:
    """The expired rows (an expiry includes the lifetime of any hold) among rowids `start` to
    `start + PURGE_SPAN` (`last` at most), how many rows that range holds, and the next rowid to
    read from (0 past `last`). Only the expired rows reach Python."""
    end = min(start + PURGE_SPAN, last + 1)
    [(rows, expired)] = db.execute(_SPAN, (now, start, end)).fetchall()
    [(following,)] = db.execute("SELECT min(rowid) FROM counters WHERE rowid >= ?", (end,)).fetchall()
    found = [int(r) for r in expired.split(",")] if expired else []
    return found, rows, (following if following is not None and following <= last else 0)


_SPAN = (
    "SELECT count(*), group_concat(CASE WHEN expires_at <= ? THEN rowid END) FROM counters"
    " WHERE rowid >= ? AND rowid < ?"
)


def _delete_expired(db: sqlite3.Connection, rowids: list[int], now: float) -> None:
    """One short write transaction; a row written since it was found expired is kept."""
    _begin(db)
    try:
        marks = ",".join("?" * len(rowids))
        db.execute(f"DELETE FROM counters WHERE expires_at <= ? AND rowid IN ({marks})", [now, *rowids])
        db.commit()
    except BaseException:
        db.rollback()
        raise


def _checkpoint(db: sqlite3.Connection) -> None:
    """RESTART: it waits up to 50 ms for readers (SQLite's busy handler), then leaves it to the next."""
    db.execute("PRAGMA busy_timeout=50")
    try:
        db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
    finally:
        db.execute("PRAGMA busy_timeout=0")


def _begin(db: sqlite3.Connection, patience: float = 0.05) -> None:
    """BEGIN IMMEDIATE, tried again after pauses of 0.1 ms for up to `patience` seconds: SQLite's own
    busy handler sleeps a millisecond or more, and a busy event loop, committing back to back, would
    take the lock in between every time."""
    deadline = time.monotonic() + patience
    while True:
        try:
            db.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                raise
        time.sleep(0.0001)


def _failure(exc: Exception) -> Failed:
    error = StepError(f"SQLite store step failed on this request's data: {exc!r}")
    error.__cause__ = exc
    return Failed(error)


def _unavailable(exc: Exception) -> bool:
    """An error of the store itself (locked, busy, I/O, disk full, a corrupt file), not of one item's data."""
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(
        exc, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.ProgrammingError
    )


def _note_last_policies(budgets: Sequence[Budget], states: Sequence[dict], views: Sequence[CounterState]) -> None:
    """On a denial: the policies of the last call each refusing counter admitted, if not this request's."""
    for budget, state, view in zip(budgets, states, views, strict=True):
        stored = state["_row"][2] if state["_row"] is not None else None
        if stored and view.retry_after and stored != limiter.policies_json(budget.policies).decode():
            view.last_policies = tuple(orjson.loads(stored))


def _key_active(db: sqlite3.Connection, key_id: str) -> bool:
    row = db.execute("SELECT revoked_at FROM keys WHERE id = ?", (key_id,)).fetchone()
    return row is not None and row[0] is None


def _usage_row(row: tuple, now: float) -> BudgetUsage:
    key_id, key_name, unit, window, segment, value, quota, policies, updated, denied, blob = row
    used, hold = limiter.usage_of(_load(blob), window, now)
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
        ratio=limiter.ratio(used, hold, quota),
        policies=orjson.loads(policies),
        updated_at=updated,
        last_denied_at=denied,
    )
