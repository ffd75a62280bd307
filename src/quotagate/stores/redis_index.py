"""The Redis store's usage index: budgets by usage ratio (sorted sets, with expiry) and the recent
denials, written in the background, batched once a second, in chunks, off the request path; the
same background task removes expired index entries, in bounded steps, by the counters' clock."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import orjson
from redis.exceptions import RedisError

from .. import limiter
from ..limiter import Admission, Budget
from .base import DENIALS_KEPT, EVERY_SEGMENT, BudgetUsage, Denial, SegmentFilter
from .redis_base import PREFIX, RedisBase, _script, budget_key
from .redis_keys import read_keys

log = logging.getLogger("quotagate.store")

INDEX = PREFIX + "idx"  # budget id -> usage ratio
INDEX_EXPIRY = PREFIX + "idx:exp"  # budget id -> when it expires
DENIALS = PREFIX + "denials"
FLUSH_SECONDS = 1.0
INDEXED_REMEMBERED = 100_000
INDEX_CHUNK = 200  # index entries per ZADD, the event loop free between them
EXPIRY_CHUNK = 500  # expired index entries removed per step (a ZREM of 500 takes well under a millisecond)
EXPIRY_CHUNKS = 20  # steps per flush or admin read, at most: 10,000 entries a second per worker
SCAN_CHUNK = 500  # index entries an admin read fetches per command


class RedisUsageIndex(RedisBase):
    """`UsageIndex`: fed from the counters' step results (`_remember`)."""

    def __init__(self, url: str, clock: Callable[[], float] | None = None) -> None:
        super().__init__(url, clock)
        self._expire: Any = None
        self._touched: dict[str, tuple[float, float]] = {}  # index entries to write
        self._indexed: dict[str, tuple[float, float]] = {}  # what this worker last wrote, per budget
        self._denials: list[bytes] = []
        self._flusher: asyncio.Task[None] | None = None

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
        names = await self._key_names()
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
            names = await self._key_names()
            rows = [orjson.loads(r) for r in await self._redis().lrange(DENIALS, 0, limit - 1)]
            return [
                Denial(r["at"], r["key_id"], names.get(r["key_id"], ""), r["policy"], r["segment"], r["value"])
                for r in rows
            ]

        return await self._call("denials", read)

    async def _key_names(self) -> dict[str, str]:
        """Key id -> name (as `list_keys` reads them)."""
        return {k.id: k.name for k in await self._call("list_keys", read_keys, self._redis())}


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
