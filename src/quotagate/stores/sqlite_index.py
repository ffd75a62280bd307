"""The SQLite store's usage index: the counters' rows by usage ratio, and the recent denials."""

from __future__ import annotations

import sqlite3

import orjson

from .. import limiter
from .base import EVERY_SEGMENT, BudgetUsage, Denial, SegmentFilter
from .sqlite_db import SQLiteDB, _load


class SQLiteUsageIndex(SQLiteDB):
    """`UsageIndex`: read from the rows the counters' steps write."""

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
