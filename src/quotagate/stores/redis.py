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

The dashboard's index of budgets (sorted sets by usage ratio, with expiry) and the list of recent
denials are written in the background, batched once a second, in chunks, off the request path;
the same background task removes expired index entries, in bounded steps, by the counters' clock.
An item of a batch that fails on its own data fails alone (see `_pack` and `lua/step.lua`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar, cast

import orjson
from redis.cluster import key_slot
from redis.exceptions import RedisClusterException, RedisError

from .. import limiter
from ..limiter import Admission, Budget, CounterState
from ..policy import Policy
from ..redact import redact_url
from .base import DENIALS_KEPT, EVERY_SEGMENT, BudgetUsage, Denial, KeyRecord, SegmentFilter, StepError, StoreError
from .batch import Admit, Batcher, Charge, Failed, Step, StepResult
from .transport import ClusterTransport, Transport, open_transport

T = TypeVar("T")
log = logging.getLogger("quotagate.store")

PREFIX = "qg:"
INDEX = PREFIX + "idx"  # budget id -> usage ratio
INDEX_EXPIRY = PREFIX + "idx:exp"  # budget id -> when it expires
KEYS_SET = PREFIX + "keys"
DENIALS = PREFIX + "denials"
FLUSH_SECONDS = 1.0
INDEXED_REMEMBERED = 100_000
INDEX_CHUNK = 200  # index entries per ZADD, the event loop free between them
NAMES = PREFIX + "names"  # name -> id of the active key that holds it
SESSION = PREFIX + "session:"  # + session hash -> its expiry, with a TTL
ATTEMPTS = PREFIX + "attempts:"  # + scope -> {s: window start, n: count}
# one key each, so that they run on a Cluster too
_COUNT_ATTEMPT = """
local now = tonumber(ARGV[1])
if not now then local t = redis.call('TIME') now = tonumber(t[1]) + tonumber(t[2]) / 1000000 end
local window = tonumber(ARGV[2])
local start = math.floor(now / window) * window
local seen = redis.call('HMGET', KEYS[1], 's', 'n')
local current = tonumber(seen[1]) == start
if ARGV[3] == '-' then
  if current and tonumber(seen[2]) > 0 then redis.call('HINCRBY', KEYS[1], 'n', -1) end
  return {0, 0}
end
local count = current and tonumber(seen[2]) + 1 or 1
redis.call('HSET', KEYS[1], 's', string.format('%d', start), 'n', count)
redis.call('EXPIRE', KEYS[1], window * 2)
return {count, math.ceil((start + window - now) * 1000)}
"""
_SWAP_NAME = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
  return 1
end
return 0
"""
EXPIRY_CHUNK = 500  # expired index entries removed per step (a ZREM of 500 takes well under a millisecond)
EXPIRY_CHUNKS = 20  # steps per flush or admin read, at most: 10,000 entries a second per worker
SCAN_CHUNK = 500  # index entries an admin read fetches per command


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
            f"{int(budget.holds)}:{mode}:{taken_at}"
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


def _script(name: str) -> str:
    folder = resources.files("quotagate.stores").joinpath("lua")
    return folder.joinpath("common.lua").read_text() + "\n" + folder.joinpath(name).read_text()


def budget_key(budget_id: str) -> str:
    return f"{PREFIX}{{{budget_id}}}"


def key_record_key(key_id: str) -> str:
    return f"{PREFIX}key:{{{key_id}}}"


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

    def _start(self, items: list[Step]) -> asyncio.Future[Sequence[StepResult | Failed]]:
        results: asyncio.Future[Sequence[StepResult | Failed]] = asyncio.get_running_loop().create_future()
        packed = _pack(items, True, self._now_arg())
        if not packed.sent:
            results.set_result(packed.results([]))
            return results
        reply = self._transport.eval_step(packed.keys, packed.args)
        reply.add_done_callback(functools.partial(self._decoded, packed, results))
        return results

    async def _run(self, items: list[Step]) -> Sequence[StepResult | Failed]:
        return await self._start(items)

    def _decoded(self, packed: _Packed, results: asyncio.Future[Sequence[StepResult | Failed]], reply: Any) -> None:
        if results.done():
            return
        if reply.cancelled():
            results.cancel()
        elif reply.exception() is not None:
            results.set_exception(reply.exception())
        else:
            try:
                results.set_result(_decode(packed, reply.result(), self._note_time))
            except Exception as error:  # a reply the script cannot have sent
                results.set_exception(RedisError(f"unexpected reply from the step script: {error!r}"))


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


class RedisStore:
    def __init__(self, url: str, clock: Callable[[], float] | None = None) -> None:
        self.url = url
        self.clock = clock
        self._transport = open_transport(url, _script("step.lua"))
        steps = ClusterSteps if isinstance(self._transport, ClusterTransport) else ServerSteps
        self._steps = steps(self._transport, self._now_arg, self._note_time)
        self._expire: Any = None
        self._touched: dict[str, tuple[float, float]] = {}  # index entries to write
        self._indexed: dict[str, tuple[float, float]] = {}  # what this worker last wrote, per budget
        self._denials: list[bytes] = []
        self._store_now: float | None = None  # the counters' clock, as the last step reply told it
        self._flusher: asyncio.Task[None] | None = None

    # -- plumbing ----------------------------------------------------------------------------

    def _redis(self) -> Any:
        return self._transport.redis

    def _now_arg(self) -> str:
        return "" if self.clock is None else repr(self.clock())

    def _note_time(self, at: float) -> None:
        self._store_now = at

    async def _call(self, operation: str, step: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`step(*args)`, its failures as StoreError."""
        try:
            if not self._transport.ready:
                await self._transport.prepare()
            return await step(*args)
        except (RedisError, RedisClusterException, OSError, RuntimeError) as exc:  # RuntimeError: a transport closed
            raise StoreError(f"Redis store {redact_url(self.url)} ({operation}): {exc!r}") from exc

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

    # -- the dashboard's index, written off the request path -------------------------------------

    def _remember(self, budgets: Sequence[Budget], admission: Admission, hold_ttl: float = 0.0) -> None:
        """Queue index updates: a budget new to this worker, one whose usage ratio moved by a
        point or more, or one whose index entry is half-way to its expiry. Entries expire by the
        counters' own clock (the time of the store's last reply), holds included."""
        now = self._store_now if self._store_now is not None else self._local_now()
        indexed = self._indexed
        for budget, state in zip(budgets, admission.states, strict=True):
            ratio = limiter.ratio(state.used, state.held, budget.quota)
            last = indexed.get(budget.id)
            if last is None or abs(ratio - last[0]) >= 0.01 or last[1] - now < budget.window / 2:
                entry = (ratio, now + budget.window + (hold_ttl if budget.holds else 0.0))
                self._touched[budget.id] = indexed[budget.id] = entry
        if len(indexed) > INDEXED_REMEMBERED:
            indexed.clear()
        if not admission.allowed:
            self._note_denials(budgets, admission, now)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    def _note_denials(self, budgets: Sequence[Budget], admission: Admission, now: float) -> None:
        for budget, state in zip(budgets, admission.states, strict=True):
            if state.retry_after:
                policy = budget.strictest.normal_form()
                self._denials.append(
                    orjson.dumps(
                        {
                            "at": now,
                            "key_id": budget.key_id,
                            "policy": policy,
                            "segment": budget.segment,
                            "value": budget.value,
                        }
                    )
                )

    def _local_now(self) -> float:
        return self.clock() if self.clock else time.time()

    async def _flush_soon(self) -> None:
        """Once a second while there is work: the index writes gathered, then expired entries removed
        (a bounded number; while more remain, again a second later)."""
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                await self._flush()
                more = await self._expire_index(EXPIRY_CHUNKS)
            except (RedisError, OSError) as exc:
                log.warning("could not update the budget index: %s", exc)
                return
            if not more and not self._touched and not self._denials:
                return

    async def _flush(self) -> None:
        """The index entries and denials gathered since the last flush, in commands of at most
        INDEX_CHUNK entries, packed one at a time with the event loop free between them: one ZADD
        of a busy second's entries stalls every request in flight while it is packed. Sent in
        order (each chunk's expiry before its ratio: see `_expire_index`)."""
        touched, self._touched = self._touched, {}
        denials, self._denials = self._denials, []
        if touched or denials:
            await self._transport.write_all(_index_commands(touched, denials))

    async def _expire_index(self, chunks: int) -> bool:
        """Remove the index entries whose budgets expired, at most `chunks` times EXPIRY_CHUNK of them
        (each step bounded: one ZREM of 4 million entries held Redis for 2 s); True if more remain.
        Safe with any number of workers doing it at once: the expiry set loses its entries in one
        atomic step (`lua/expire.lua`, by the counters' clock), then the ratio set; an entry that a
        writer re-added meanwhile (expiry first, then ratio) is put back by `_restore`."""
        client = self._redis()
        for _ in range(chunks):
            if self._expire is None:
                self._expire = client.register_script(_script("expire.lua"))
            gone = await self._expire(keys=[INDEX_EXPIRY], args=[self._now_arg(), EXPIRY_CHUNK], client=client)
            if gone:
                await client.zrem(INDEX, *gone)
                await self._restore(gone)
            if len(gone) < EXPIRY_CHUNK:
                return False
        return True

    async def _restore(self, gone: list[bytes]) -> None:
        """Entries written again while they were being removed (their budget came back to life):
        their ratio, which the removal may have taken away, read from their budgets."""
        client = self._redis()
        back = [m for m, score in zip(gone, await client.zmscore(INDEX_EXPIRY, gone), strict=True) if score is not None]
        if not back:
            return
        ids = [m.decode() for m in back]
        for budget_id, usage in zip(ids, await self._read_budgets(ids, await self._store_time(), {}), strict=True):
            if usage is not None:
                await client.zadd(INDEX, {budget_id: usage.ratio})

    async def _store_time(self) -> float:
        """Now, by the counters' clock: the injected one, else the Redis server's."""
        if self.clock is not None:
            return self.clock()
        seconds, micros = await self._redis().time()
        return float(seconds) + micros / 1_000_000

    async def usage(
        self,
        key_id: str | None = None,
        segment: SegmentFilter = EVERY_SEGMENT,
        value: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[BudgetUsage]:
        return await self._call("usage", self._usage, key_id, segment, value, limit, offset)

    async def _usage(
        self, key_id: str | None, segment: SegmentFilter, value: str | None, limit: int, offset: int
    ) -> list[BudgetUsage]:
        await self._flush()
        while await self._expire_index(EXPIRY_CHUNKS):  # a backlog (after an upgrade, say): bounded steps
            pass
        client = self._redis()
        now = await self._store_time()
        names = {k.id: k.name for k in await self.list_keys()}
        out: list[BudgetUsage] = []
        skipped, start, chunk = 0, 0, min(max(100, limit), SCAN_CHUNK)
        while len(out) < limit:
            ids = await client.zrevrange(INDEX, start, start + chunk - 1)
            if not ids:
                break
            start += chunk
            for item in await self._read_budgets([i.decode() for i in ids], now, names):
                if item is None or not _matches(item, key_id, segment, value):
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                out.append(item)
                if len(out) == limit:
                    break
        return sorted(out, key=lambda u: -u.ratio)

    async def _read_budgets(self, ids: list[str], now: float, names: dict[str, str]) -> list[BudgetUsage | None]:
        pipe = self._redis().pipeline(transaction=False)
        for budget_id in ids:
            pipe.hgetall(budget_key(budget_id))
        return [_usage_from_hash(i, h, now, names) for i, h in zip(ids, await pipe.execute(), strict=True)]

    async def denials(self, limit: int = 50) -> list[Denial]:
        async def read() -> list[Denial]:
            await self._flush()
            names = {k.id: k.name for k in await self.list_keys()}
            rows = [orjson.loads(r) for r in await self._redis().lrange(DENIALS, 0, limit - 1)]
            return [
                Denial(r["at"], r["key_id"], names.get(r["key_id"], ""), r["policy"], r["segment"], r["value"])
                for r in rows
            ]

        return await self._call("denials", read)

    # -- keys --------------------------------------------------------------------------------

    async def create_key(self, record: KeyRecord) -> bool:
        mapping = {
            "id": record.id,
            "name": record.name,
            "salt": record.salt.hex(),
            "digest": record.digest.hex(),
            "policies": record.policies,
            "created_at": repr(record.created_at),
            "revoked_at": "",
        }
        client = self._redis()

        async def create() -> bool:
            await client.hset(key_record_key(record.id), mapping=mapping)
            await client.sadd(KEYS_SET, record.id)
            if await self._claim_name(record.name, record.id):
                return True
            await client.srem(KEYS_SET, record.id)
            await client.delete(key_record_key(record.id))
            return False

        created: bool = await self._call("create_key", create)
        return created

    async def get_key(self, key_id: str) -> KeyRecord | None:
        raw = await self._call("get_key", self._redis().hgetall, key_record_key(key_id))
        return _key_from_hash(raw)

    async def list_keys(self) -> list[KeyRecord]:
        async def read() -> list[KeyRecord]:
            client = self._redis()
            ids = sorted(i.decode() for i in await client.smembers(KEYS_SET))
            records = [_key_from_hash(await client.hgetall(key_record_key(i))) for i in ids]
            return sorted((r for r in records if r is not None), key=lambda r: r.created_at)

        return await self._call("list_keys", read)

    async def revoke_key(self, key_id: str, at: float) -> bool:
        script = (
            "if redis.call('HGET', KEYS[1], 'revoked_at') == '' then "
            "redis.call('HSET', KEYS[1], 'revoked_at', ARGV[1]) return 1 end return 0"
        )
        done = await self._call("revoke_key", self._redis().eval, script, 1, key_record_key(key_id), repr(at))
        if done:
            await self._call("revoke_key", self._release_name, key_id)
        return bool(done)

    # -- unique names, dashboard sessions, failed sign-ins: one Redis key per command ------------

    async def _claim_name(self, name: str, key_id: str) -> bool:
        """Claim the name for a key whose record is written: HSETNX on the names hash; a claim
        left by a key since revoked (or never finished) is taken over, compare-and-set."""
        client = self._redis()
        await self._claim_existing_names()
        for _ in range(8):
            if await client.hsetnx(NAMES, name, key_id):
                return True
            holder = await client.hget(NAMES, name)
            if holder is None:
                continue  # released meanwhile
            if holder.decode() == key_id:
                return True  # claimed on its behalf by _claim_existing_names elsewhere
            if await client.hget(key_record_key(holder.decode()), "revoked_at") == b"":
                return False  # an active key has the name
            if await client.eval(_SWAP_NAME, 1, NAMES, name, holder, key_id):
                return True
        return False

    async def _claim_existing_names(self) -> None:
        """Keys made before names were claimed hold their names from now on (first made first)."""
        client = self._redis()
        for record in await self.list_keys():
            if record.active:
                await client.hsetnx(NAMES, record.name, record.id)

    async def _release_name(self, key_id: str) -> None:
        name = await self._redis().hget(key_record_key(key_id), "name")
        if name is not None:
            await self._redis().eval(_SWAP_NAME, 1, NAMES, name, key_id, "")

    async def create_session(self, session: str, expires_at: float) -> None:
        ttl = max(1, math.ceil(expires_at - time.time()))
        await self._call(
            "create_session", functools.partial(self._redis().set, ex=ttl), SESSION + session, repr(expires_at)
        )

    async def session_expiry(self, session: str) -> float | None:
        raw = await self._call("session_expiry", self._redis().get, SESSION + session)
        return float(raw) if raw is not None else None

    async def delete_session(self, session: str) -> None:
        await self._call("delete_session", self._redis().delete, SESSION + session)

    async def count_attempt(self, scope: str, window: int) -> tuple[int, float]:
        count, remaining_ms = await self._call(
            "count_attempt", self._redis().eval, _COUNT_ATTEMPT, 1, ATTEMPTS + scope, self._now_arg(), window, "+"
        )
        return int(count), int(remaining_ms) / 1000

    async def refund_attempt(self, scope: str, window: int) -> None:
        await self._call(
            "refund_attempt", self._redis().eval, _COUNT_ATTEMPT, 1, ATTEMPTS + scope, self._now_arg(), window, "-"
        )


# --- decoding what the scripts and hashes return -----------------------------------------------


def _index_commands(touched: dict[str, tuple[float, float]], denials: list[bytes]) -> Iterator[list[bytes]]:
    """The index's ZADDs, INDEX_CHUNK entries each (expiry, then ratio), then the denials' LPUSH and LTRIM."""
    items = list(touched.items())
    for first in range(0, len(items), INDEX_CHUNK):
        chunk = items[first : first + INDEX_CHUNK]
        for key, score, flags in ((INDEX_EXPIRY, 1, [b"GT"]), (INDEX, 0, [])):  # an expiry never moves back
            command = [b"ZADD", key.encode(), *flags]
            for member, entry in chunk:
                command += (repr(entry[score]).encode(), member.encode())
            yield command
    if denials:
        yield [b"LPUSH", DENIALS.encode(), *denials]
        yield [b"LTRIM", DENIALS.encode(), b"0", b"%d" % (DENIALS_KEPT - 1)]


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


def _key_from_hash(raw: dict[bytes, bytes]) -> KeyRecord | None:
    if not raw or b"name" not in raw:
        return None
    h = {k.decode(): v.decode() for k, v in raw.items()}
    return KeyRecord(
        id=h["id"],
        name=h["name"],
        salt=bytes.fromhex(h["salt"]),
        digest=bytes.fromhex(h["digest"]),
        policies=h["policies"],
        created_at=float(h["created_at"]),
        revoked_at=float(h["revoked_at"]) if h["revoked_at"] else None,
    )


def _usage_from_hash(budget_id: str, raw: dict[bytes, bytes], now: float, names: dict[str, str]) -> BudgetUsage | None:
    if not raw or b"q" not in raw:
        return None
    h = {k.decode(): v.decode() for k, v in raw.items()}
    meta = limiter.parse_budget_id(budget_id)
    if "m" in h:  # a long value: the id holds its hash, the hash its text
        meta["value"] = orjson.loads(h["m"])["value"]
    window = int(meta["window"])
    used, held = limiter.usage_of(_window_state(h), window, now)
    quota = int(h["q"])
    return BudgetUsage(
        key_id=meta["key_id"],
        key_name=names.get(meta["key_id"], ""),
        unit=meta["unit"],
        window=window,
        segment=meta["segment"],
        value=meta["value"],
        quota=quota,
        used=used,
        held=held,
        ratio=limiter.ratio(used, held, quota),
        policies=orjson.loads(h["p"]),
        updated_at=now,
        last_denied_at=float(h["ld"]) if "ld" in h else None,
    )


def _window_state(h: dict[str, str]) -> dict:
    """A budget's hash (see lua/common.lua) as `limiter`'s window state: buckets a<i>/l<i>, holds
    r<reservation> = "<amount>:<expiry>"."""
    buckets = {
        int(k[1:]): [int(h.get(f"a{k[1:]}", 0)), float(v)] for k, v in h.items() if k[0] == "l" and k[1:].isdigit()
    }
    holds = {k[1:]: [int(a), float(e)] for k, v in h.items() if k[0] == "r" for a, e in (v.split(":", 1),)}
    return {"b": buckets, "t": sum(a for a, _ in buckets.values()), "h": holds}


def _matches(item: BudgetUsage, key_id: str | None, segment: SegmentFilter, value: str | None) -> bool:
    return (
        (key_id is None or item.key_id == key_id)
        and (segment is EVERY_SEGMENT or item.segment == segment)
        and (value is None or item.value == value)
    )
