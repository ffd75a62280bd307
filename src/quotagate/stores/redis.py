"""Redis store (also Valkey and Redis Cluster): several gateway instances share every budget.

An admission is one call of the step script (`lua/step.lua`), a charge another; the admissions
and charges of one event-loop turn share a call (`batch.py`). The script mirrors
`quotagate.limiter` and reads the time from the Redis server, so instances need no synchronized
clocks. How a call reaches Redis is the transport's, chosen when the store opens (`transport.py`).
Each budget's keys carry its own hash tag (key id, unit, window, segment and segment value), so
that one busy customer does not make one hot Cluster slot.

On a single server every budget of a request, and the key's revocation check, go into one script
call: one atomic step (`ServerSteps`). On a Cluster, budgets in different slots cannot share a
script: each slot's group is checked and taken atomically, all groups in parallel, and if any group
(or the key check) says no, the groups that said yes are refunded (`ClusterSteps`).

Gateway keys are `RedisKeys` (`redis_keys.py`); the dashboard's index of budgets and the recent
denials, `RedisUsageIndex` (`redis_index.py`). An item of a batch that fails on its own data fails
alone (see `_pack` and `lua/step.lua`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
from redis.cluster import key_slot
from redis.exceptions import RedisError

from .. import limiter
from ..limiter import Admission, Budget, CounterState
from ..policy import Policy
from .base import StepError
from .batch import Admit, Batcher, Charge, Failed, Step, StepResult
from .redis_base import budget_key, key_record_key
from .redis_index import INDEX, INDEX_CHUNK, INDEX_EXPIRY, RedisUsageIndex
from .redis_keys import RedisKeys
from .transport import ClusterTransport, Transport

Then = Callable[[asyncio.Future[Sequence[StepResult | Failed]]], None]  # a started batch's results, done

__all__ = ["INDEX", "INDEX_CHUNK", "INDEX_EXPIRY", "ClusterSteps", "RedisStore", "ServerSteps", "budget_key"]


@functools.lru_cache(maxsize=4096)
def _spec(window: int, quota: int, holds: bool, policies: tuple[Policy, ...], meta: bool) -> tuple[str, str]:
    """The fixed parts of a budget's argument to the admission script, around its amount."""
    tail = f":{int(holds)}:{int(meta)}:{limiter.policies_json(policies).decode()}"
    return f"{window}:{limiter.granularity(window)}:{quota}:", tail


def _admit_arguments(item: Admit, check_key: bool, keys: list[str], args: list[Any]) -> None:
    if check_key:
        keys.append(key_record_key(item.key_id))
    first, metas = len(args), 0
    args.append("")
    for b, amount in zip(item.budgets, item.amounts, strict=True):
        keys.append(budget_key(b.id))
        meta = _meta(b)
        head, tail = _spec(b.window, b.quota, b.holds, b.policies, bool(meta))
        args.append(f"{head}{amount}{tail}")
        if meta:
            args.append(meta)
            metas += 1
    args[first] = f"A {item.reservation} {item.hold_ttl!r} {int(check_key)} {len(item.budgets)} {metas}"


def _settle_arguments(item: Charge, keys: list[str], args: list[Any]) -> None:
    mode, taken_at = ("charge", "0") if item.refund_at is None else ("refund", item.refund_at)
    args.append(f"S {item.reservation} {len(item.budgets)}")
    for budget, amount in zip(item.budgets, item.amounts, strict=True):
        keys.append(budget_key(budget.id))
        args.append(
            f"{budget.window}:{limiter.granularity(budget.window)}:{budget.quota}:{amount}:"
            f"{int(budget.holds)}:{mode}:{taken_at}:{limiter.policies_json(budget.policies).decode()}"
        )


@dataclass(slots=True)
class _Packed:
    """A batch's script call with its arguments encoded item by item: an item that cannot be
    encoded (a value no store can hold) is left out of the call and fails alone."""

    sent: Sequence[Step]
    keys: list[bytes]
    args: list[bytes]
    failed: list[Failed | None] | None = None  # per item of the batch: its failure, or None if sent

    def results(self, raws: Sequence[Any]) -> list[Any]:
        """Each item's result (or its failure), in the batch's order."""
        if self.failed is None:
            return _decode_step(self.sent, raws)
        decoded = iter(_decode_step(self.sent, raws))
        return [next(decoded) if failure is None else failure for failure in self.failed]

    def failure(self) -> Failed | None:
        return next((f for f in self.failed if f is not None), None) if self.failed else None


def _pack(items: Sequence[Step], check_key: bool, now: str) -> _Packed:
    """The whole batch in one go; if that fails, item by item, leaving out those that fail."""
    try:
        keys, args = _arguments(items, check_key, [now, str(len(items))])
    except Exception:
        return _pack_each(items, check_key, now)
    return _Packed(items, keys, args)


def _pack_each(items: Sequence[Step], check_key: bool, now: str) -> _Packed:
    sent: list[Step] = []
    failed: list[Failed | None] = []
    packed = _Packed(sent, [], [now.encode(), b""], failed)
    for item in items:
        try:
            keys, args = _arguments([item], check_key, [])
        except Exception as exc:  # the item's own data: it alone fails
            failed.append(Failed(_step_error(exc)))
            continue
        sent.append(item)
        packed.keys += keys
        packed.args += args
        failed.append(None)
    packed.args[1] = b"%d" % len(sent)
    return packed


def _arguments(items: Sequence[Step], check_key: bool, head: list[Any]) -> tuple[list[bytes], list[bytes]]:
    """The script call's keys, and its arguments after `head`, encoded."""
    keys: list[str] = []
    args: list[Any] = head
    for item in items:
        if isinstance(item, Admit):
            _admit_arguments(item, check_key, keys, args)
        else:
            _settle_arguments(item, keys, args)
    return [k.encode() for k in keys], [a if isinstance(a, bytes) else a.encode() for a in args]


def _step_error(cause: Exception) -> StepError:
    error = StepError(f"Redis store step failed on this request's data: {cause}")
    error.__cause__ = cause
    return error


def _meta(budget: Budget) -> bytes:
    """The raw segment value, kept only when the budget id holds a hash of it instead."""
    return orjson.dumps({"value": budget.value}) if budget.value and len(budget.value.encode()) > 96 else b""


def _decode(packed: _Packed, raws: Sequence[Any], note_time: Callable[[float], None]) -> list[StepResult | Failed]:
    """Each item's result; the step's time (the script read it from its clock) goes to `note_time`."""
    results = packed.results(raws)
    at = _reply_time(packed.sent, raws)
    if at is not None:
        note_time(at)
    return results


class ServerSteps:
    """A single server: the admissions and charges of one event-loop turn go out as one script call
    (one atomic step), the batch's results handed out from the reply's callback."""

    def __init__(self, transport: Transport, now_arg: Callable[[], str], note_time: Callable[[float], None]) -> None:
        self._transport = transport
        self._now_arg = now_arg
        self._note_time = note_time
        self._batcher: Batcher[Step, StepResult] = Batcher(self._run, start=self._start)

    async def admit(self, item: Admit) -> Admission:
        return cast(Admission, await self._batcher.submit(item))

    async def charge(self, item: Charge) -> list[CounterState]:
        return cast(list[CounterState], await self._batcher.submit(item))

    def _start(self, items: list[Step], then: Then | None = None) -> asyncio.Future[Sequence[StepResult | Failed]]:
        """The batch's script call; its results' future, finished from the reply's callback, where
        `then(results)` is called too (the batch's waiters learn their results in that callback)."""
        results: asyncio.Future[Sequence[StepResult | Failed]] = asyncio.get_running_loop().create_future()
        packed = _pack(items, True, self._now_arg())
        if not packed.sent:
            results.set_result(packed.results([]))
            if then is not None:
                then(results)
            return results
        self._transport.send_step(packed.keys, packed.args, functools.partial(self._decoded, packed, results, then))
        return results

    async def _run(self, items: list[Step]) -> Sequence[StepResult | Failed]:
        return await self._start(items)

    def _decoded(
        self,
        packed: _Packed,
        results: asyncio.Future[Sequence[StepResult | Failed]],
        then: Then | None,
        reply: Any,
    ) -> None:
        if not results.done():
            if reply.cancelled():
                results.cancel()
            elif reply.exception() is not None:
                results.set_exception(reply.exception())
            else:
                try:
                    results.set_result(_decode(packed, reply.result(), self._note_time))
                except Exception as error:  # a reply the script cannot have sent
                    results.set_exception(RedisError(f"unexpected reply from the step script: {error!r}"))
        if then is not None:
            then(results)


class ClusterSteps:
    """A Cluster: budgets in different slots cannot share a script call. Each slot's group is
    checked and taken atomically in its own call, all groups in parallel (all packed before any is
    sent); if any group (or the key check) refuses, or fails on its own data, the groups that
    admitted are refunded. A budget is never over-admitted; two requests racing for the last units
    of different budgets may both be refused."""

    def __init__(self, transport: Transport, now_arg: Callable[[], str], note_time: Callable[[float], None]) -> None:
        self._transport = transport
        self._now_arg = now_arg
        self._note_time = note_time

    async def _send(self, packed: _Packed) -> list[StepResult | Failed]:
        if not packed.sent:
            return packed.results([])
        return _decode(packed, await self._transport.eval_step(packed.keys, packed.args), self._note_time)

    async def _key_active(self, key_id: str) -> bool:
        return bool(await self._transport.redis.hget(key_record_key(key_id), "revoked_at") == b"")

    async def admit(self, item: Admit) -> Admission:
        budgets, amounts = item.budgets, item.amounts
        if not budgets:
            return Admission(await self._key_active(item.key_id), True, [])
        groups: dict[int, list[int]] = {}
        for index, budget in enumerate(budgets):
            groups.setdefault(key_slot(budget_key(budget.id).encode()), []).append(index)
        members = list(groups.values())
        now = self._now_arg()
        packs = [
            _pack(
                [Admit(item.key_id, [budgets[i] for i in m], [amounts[i] for i in m], item.reservation, item.hold_ttl)],
                False,
                now,
            )
            for m in members
        ]
        _raise_failure(p.failure() for p in packs)
        active, grouped = await asyncio.gather(
            self._key_active(item.key_id), asyncio.gather(*(self._send(p) for p in packs))
        )
        results: list[Admission | None] = [g[0] if isinstance(g[0], Admission) else None for g in grouped]
        allowed = active and all(r is not None and r.allowed for r in results)
        states: list[CounterState] = [CounterState(0, 0, 0)] * len(budgets)
        for m, result in zip(members, results, strict=True):
            for i, state in zip(m, result.states, strict=True) if result is not None else ():
                states[i] = state
        if not allowed:
            await self._refund(item, [m for m, r in zip(members, results, strict=True) if r and r.allowed])
            states = [
                _without(states[i], b, amounts[i]) if _took(results, members, i) else states[i]
                for i, b in enumerate(budgets)
            ]
        _raise_failure(g[0] for g in grouped if isinstance(g[0], Failed))
        return Admission(True, allowed, states) if active else Admission(False, False, [])

    async def _refund(self, item: Admit, groups: list[list[int]]) -> None:
        """Undo the takes (or holds) of the groups (budget indices) that admitted a request another
        group refused."""
        taken_at = self._now_arg() or repr(time.time())
        budgets, amounts = item.budgets, item.amounts
        refunds = [
            Charge([budgets[i] for i in m], item.reservation, [amounts[i] for i in m], refund_at=taken_at)
            for m in groups
        ]
        await asyncio.gather(*(self._send(_pack([r], True, self._now_arg())) for r in refunds))

    async def charge(self, item: Charge) -> list[CounterState]:
        """Each budget in its own slot's script call, in parallel; all packed before any is sent."""
        now = self._now_arg()
        packs = [
            _pack([Charge([b], item.reservation, [a])], True, now)
            for b, a in zip(item.budgets, item.amounts, strict=True)
        ]
        _raise_failure(p.failure() for p in packs)
        settled = [s[0] for s in await asyncio.gather(*(self._send(p) for p in packs))]
        _raise_failure(s for s in settled if isinstance(s, Failed))
        return [cast(list[CounterState], s)[0] for s in settled]


class RedisStore(RedisKeys, RedisUsageIndex):
    """`Store` over Redis: the counters here, `RedisKeys` and `RedisUsageIndex` beside them, on one
    transport (`RedisBase`)."""

    def __init__(self, url: str, clock: Callable[[], float] | None = None) -> None:
        super().__init__(url, clock)
        steps = ClusterSteps if isinstance(self._transport, ClusterTransport) else ServerSteps
        self._steps = steps(self._transport, self._now_arg, self._note_time)

    async def ping(self) -> None:
        await self._call("ping", self._redis().ping)

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        with contextlib.suppress(RedisError, OSError, RuntimeError):
            await self._flush()
        await self._transport.close()

    # -- admission and charge ----------------------------------------------------------------

    async def admit(
        self, key_id: str, budgets: Sequence[Budget], amounts: Sequence[int], reservation: str, hold_ttl: float
    ) -> Admission:
        item = Admit(key_id, budgets, amounts, reservation, hold_ttl)
        admission = await self._call("admit", self._steps.admit, item)
        if admission.key_active and budgets:
            self._remember(budgets, admission, hold_ttl)
        return admission

    async def charge(self, budgets: Sequence[Budget], reservation: str, amounts: Sequence[int]) -> list[CounterState]:
        states = await self._call("charge", self._steps.charge, Charge(budgets, reservation, amounts))
        self._remember(budgets, Admission(True, True, states))
        return states


# --- decoding what the scripts and hashes return -----------------------------------------------


def _decode_step(items: Sequence[Step], raws: Sequence[Any]) -> list[Any]:
    """Each item's result; an error reply in its place (the script failed on that item) is its failure."""
    return [
        Failed(_step_error(raw))
        if isinstance(raw, Exception)
        else _admission(raw, len(item.budgets))
        if isinstance(item, Admit)
        else _states(raw[1:], len(item.budgets))
        for raw, item in zip(raws, items, strict=True)
    ]


def _reply_time(items: Sequence[Step], raws: Sequence[Any]) -> float | None:
    """The step's time (the script read it from its clock): in every result, after the admission's
    two flags or first in a settlement's."""
    for item, raw in zip(items, raws, strict=True):
        if not isinstance(raw, Exception):
            return float(raw[2] if isinstance(item, Admit) else raw[0])
    return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _states(flat: Sequence[Any], count: int) -> list[CounterState]:
    """Four integers per budget (the script's numbers arrive as integer replies)."""
    numbers = iter(flat[: count * 4])
    return list(map(CounterState, numbers, numbers, numbers, numbers))


def _admission(raw: Sequence[Any], count: int) -> Admission:
    if not int(raw[0]):
        return Admission(False, False, [])
    allowed = bool(int(raw[1]))
    states = _states(raw[3:], count)
    if not allowed:  # then the policies last admitted on each counter that refused (see step.lua)
        for state, other in zip(states, raw[3 + 4 * count :], strict=True):
            if other:
                state.last_policies = tuple(orjson.loads(other))
    return Admission(True, allowed, states)


def _took(results: list[Admission | None], members: list[list[int]], index: int) -> bool:
    return any(result is not None and result.allowed and index in m for result, m in zip(results, members, strict=True))


def _raise_failure(failures: Iterable[Failed | None]) -> None:
    """Raise the first item failure, if any."""
    for failure in failures:
        if failure is not None:
            raise failure.error


def _without(state: CounterState, budget: Budget, amount: int) -> CounterState:
    """A state as it is after its take was refunded: it did not refuse (no retry-after of its own,
    so that the refusal names only the budgets that did); its reset is the take's (at most one
    bucket later than a single server's)."""
    if budget.holds:
        return CounterState(state.used, max(0, state.held - amount), state.reset, 0)
    return CounterState(max(0, state.used - amount), state.held, state.reset, 0)
