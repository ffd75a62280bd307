"""The SQLite store's counters: admissions and charges, batched, one transaction per batch."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from .. import limiter
from ..limiter import Admission, Budget, CounterState
from .base import DENIALS_KEPT, StepError
from .batch import Admit, Batcher, Charge, Failed, Step, StepResult
from .sqlite_db import SQLiteDB, _dump, _load


class SQLiteCounters(SQLiteDB):
    """`Counters`: the admissions and charges of one loop turn share one transaction."""

    def __init__(self, url: str, clock: Callable[[], float] = time.time) -> None:
        super().__init__(url, clock)
        self._steps: Batcher[Step, Any] = Batcher(self._execute_steps)

    # -- counters ----------------------------------------------------------------------------

    async def admit(
        self, key_id: str, budgets: Sequence[Budget], amounts: Sequence[int], reservation: str, hold_ttl: float
    ) -> Admission:
        result: Admission = await self._steps.submit(Admit(key_id, budgets, amounts, reservation, hold_ttl))
        return result

    async def charge(self, budgets: Sequence[Budget], reservation: str, amounts: Sequence[int]) -> list[CounterState]:
        result: list[CounterState] = await self._steps.submit(Charge(budgets, reservation, amounts))
        return result

    async def _execute_steps(self, items: list[Step]) -> list[StepResult | Failed]:
        return await self._run_inline(self._run_steps, items)

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


_INSERT = (
    "INSERT INTO counters (id, key_id, unit, window, segment, value, quota, used, held, ratio, policies,"
    " updated_at, expires_at, last_denied_at, state) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_UPDATE_ALWAYS = (
    "used=?, held=?, updated_at=?, expires_at=max(expires_at, ?), last_denied_at=coalesce(?, last_denied_at), state=?"
)


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
