"""The SQLite store's gateway keys, dashboard sessions and failed sign-ins."""

from __future__ import annotations

import sqlite3
import time

from .base import KeyRecord
from .sqlite_db import SQLiteDB


class SQLiteKeys(SQLiteDB):
    """`Keys`: each method one step on the store thread."""

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

    async def key_ids(self) -> list[str]:
        def _ids(db: sqlite3.Connection) -> list[str]:
            return [row[0] for row in db.execute("SELECT id FROM keys").fetchall()]

        return await self._run(_ids)

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


_INSERT_KEY = (
    "INSERT INTO keys (id, name, salt, digest, policies, created_at) SELECT ?,?,?,?,?,?"
    " WHERE NOT EXISTS (SELECT 1 FROM keys WHERE name = ? AND revoked_at IS NULL)"
)
_COUNT_ATTEMPT = (
    "INSERT INTO attempts (scope, window_start, count) VALUES (?, ?, 1) ON CONFLICT (scope) DO UPDATE SET"
    " count = CASE WHEN window_start = excluded.window_start THEN count + 1 ELSE 1 END,"
    " window_start = excluded.window_start RETURNING count"
)
_KEY_COLUMNS = "id, name, salt, digest, policies, created_at, revoked_at"
