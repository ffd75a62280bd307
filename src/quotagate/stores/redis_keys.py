"""The Redis store's gateway keys, dashboard sessions and failed sign-ins."""

from __future__ import annotations

import functools
import math
import time
from typing import Any

from .base import KeyRecord
from .redis_base import PREFIX, RedisBase, key_record_key

KEYS_SET = PREFIX + "keys"
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


class RedisKeys(RedisBase):
    """`Keys`: a hash per key, a set of their ids, a hash of the names active keys hold."""

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
        return await self._call("list_keys", read_keys, self._redis())

    async def key_ids(self) -> list[str]:
        return [i.decode() for i in await self._call("key_ids", self._redis().smembers, KEYS_SET)]

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


async def read_keys(client: Any) -> list[KeyRecord]:
    """Every key, oldest first."""
    ids = sorted(i.decode() for i in await client.smembers(KEYS_SET))
    records = [_key_from_hash(await client.hgetall(key_record_key(i))) for i in ids]
    return sorted((r for r in records if r is not None), key=lambda r: r.created_at)


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
