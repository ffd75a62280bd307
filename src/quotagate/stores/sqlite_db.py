"""The SQLite store's file: its connections, the store thread, and the maintenance run there.

See `quotagate.stores.sqlite` for how a step uses them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import orjson

from ..policy import MIN_WINDOW
from ..redact import redact_url
from .base import StoreError

T = TypeVar("T")
log = logging.getLogger("quotagate.stores.sqlite")
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


class SQLiteDB:
    """One store file: the event loop's connection, the store thread and its connection, the
    maintenance, and what is known of the file while no other connection has committed."""

    def __init__(self, url: str, clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self.path = path_from_url(url)
        self.clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quotagate-sqlite")
        self._db: sqlite3.Connection | None = None  # used on the store thread only
        self._inline: sqlite3.Connection | None = None  # used on the event loop only, never waits
        self._waiting = 0  # batches handed to the store thread and not back yet
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

    async def _run_inline(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(db, *args)` (a batch of steps) on the event loop itself when the write lock is free (a
        batch takes a fraction of a millisecond, less than a hand-off to a thread). When another process holds the lock,
        try again a few times after sub-millisecond pauses (SQLite's own busy handler sleeps a
        millisecond or more); past that, on the store thread, which waits without holding up the
        event loop."""
        pause = 0.0002
        while not self._waiting and pause < 0.05:
            try:
                if self._inline is None:
                    self._inline = self._open(busy_ms=0)
                    self._inline.execute("PRAGMA wal_autocheckpoint=0")
                results = self._guarded(self._inline, fn, *args)
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
            return await self._run(fn, *args)
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

    def _refresh(self, db: sqlite3.Connection) -> None:
        """Forget what another connection may have changed since this one last looked."""
        version = (id(db), db.execute("PRAGMA data_version").fetchone()[0])
        if version != self._seen_version or len(self._states_known) > 100_000:
            self._forget()
            self._seen_version = version

    def _forget(self) -> None:
        self._states_known.clear()
        self._keys_known.clear()


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


_DUPLICATE_NAMES = "SELECT name FROM keys WHERE revoked_at IS NULL GROUP BY name HAVING count(*) > 1"


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
