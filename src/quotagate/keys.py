"""Gateway keys: generate, hash, verify, revoke; key-bound policies.

A key reads `qg_<id>_<secret>`. The store keeps the id, a random salt and HMAC-SHA256(salt,
secret), never the secret. The id finds the record; the secret is checked in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .policy import Policy, parse_policies
from .stores import KeyRecord, Store

PREFIX = "qg_"
ID_LENGTH = 12


class GatewayKeyError(Exception):
    """A key operation that cannot be done (unknown key, duplicate name)."""


@dataclass(slots=True, frozen=True)
class GatewayKey:
    """A verified key as the proxy uses it: id, name and its bound policies."""

    id: str
    name: str
    policies: tuple[Policy, ...]


def _digest(salt: bytes, secret: str) -> bytes:
    # surrogatepass: a header's bytes that are not UTF-8 arrive as lone surrogates; such a key is wrong
    return hmac.digest(salt, secret.encode("utf-8", "surrogatepass"), hashlib.sha256)


def split_key(raw: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    if not raw.startswith(PREFIX) or len(raw) < len(PREFIX) + ID_LENGTH + 2:
        return None
    key_id, sep, secret = raw[len(PREFIX) :].partition("_")
    if len(key_id) != ID_LENGTH or not sep or not secret:
        return None
    return key_id, secret


def normal_policies(text: str) -> str:
    """Validate key-bound policies at creation and keep them in normal form."""
    return ", ".join(p.normal_form() for p in parse_policies(text))


async def create_key(store: Store, name: str, policies: list[str]) -> tuple[str, KeyRecord]:
    """Create a key; returns the raw key (shown once) and its stored record."""
    name = name.strip()
    if not name:
        raise GatewayKeyError("a key needs a non-empty --name")
    bound = normal_policies(",".join(policies)) if policies else ""
    key_id, secret, salt = secrets.token_hex(ID_LENGTH // 2), secrets.token_urlsafe(32), secrets.token_bytes(16)
    record = KeyRecord(key_id, name, salt, _digest(salt, secret), bound, time.time())
    if not await store.create_key(record):  # the store checks the name and inserts in one step
        raise GatewayKeyError(f"an active key named {name!r} already exists")
    return f"{PREFIX}{key_id}_{secret}", record


async def find_key(store: Store, name_or_id: str) -> KeyRecord:
    """The key with this id, else the one active key with this name."""
    keys = await store.list_keys()
    by_id = [k for k in keys if k.id == name_or_id]
    matches = by_id or [k for k in keys if k.name == name_or_id and k.active]
    if not matches:
        raise GatewayKeyError(f"no key with id or name {name_or_id!r}")
    return matches[0]


async def revoke_key(store: Store, name_or_id: str) -> KeyRecord:
    """Revoke the key with this id, else the active one with this name; a name whose keys are all
    revoked is 'already revoked', not unknown."""
    keys = await store.list_keys()
    if not any(k.id == name_or_id or (k.name == name_or_id and k.active) for k in keys):
        gone = [k for k in keys if k.name == name_or_id]
        if gone:
            raise GatewayKeyError(f"key {name_or_id!r} ({', '.join(k.id for k in gone)}) is already revoked")
    record = await find_key(store, name_or_id)
    if not await store.revoke_key(record.id, time.time()):
        raise GatewayKeyError(f"key {record.name!r} ({record.id}) is already revoked")
    return record


ABSENT_IDS = 1024
"""Ids the store did not have, remembered (a client retrying a wrong key costs no store lookup)."""


class KeyRing:
    """Verifies presented keys against the store, caching the immutable part of each record.

    Revocation is not cached: every admission asks the store whether the key is still active, in
    the same step that checks its budgets.
    """

    def __init__(self, store: Store, size: int = 10_000, answered: Callable[[], None] | None = None) -> None:
        self.store = store
        self.size = size
        self.answered = answered  # told each time the store answers a lookup
        self._records: OrderedDict[str, tuple[KeyRecord, GatewayKey]] = OrderedDict()
        # ids the store did not have, apart: a client presenting made-up ids pushes out only these
        self._absent: OrderedDict[str, None] = OrderedDict()
        self._verified: dict[str, str] = {}  # presented keys already checked against their digest -> id
        self._passed: set[str] = set()  # ids learning read and left out (revoked, unreadable): not read again

    async def verify(self, raw: str) -> GatewayKey | None:
        known = self._verified.get(raw)
        if known is not None:
            entry = self._records.get(known)
            if entry is not None:  # still cached: not forgotten since (a revocation forgets it)
                return entry[1] if entry[0].active else None
        parts = split_key(raw)
        if parts is None:
            return None
        key_id, secret = parts
        entry = await self._lookup(key_id)
        if entry is None:
            return None
        record, key = entry
        if not hmac.compare_digest(_digest(record.salt, secret), record.digest):
            return None
        if len(self._verified) >= self.size:
            self._verified.clear()
        self._verified[raw] = key_id
        return key if record.active else None

    async def _lookup(self, key_id: str) -> tuple[KeyRecord, GatewayKey] | None:
        entry = self._records.get(key_id)
        if entry is not None:
            self._records.move_to_end(key_id)
            return entry
        if key_id in self._absent:
            return None
        record = await self.store.get_key(key_id)
        if self.answered is not None:
            self.answered()
        if record is None:
            self._absent[key_id] = None
            if len(self._absent) > ABSENT_IDS:
                self._absent.popitem(last=False)
            return None
        entry = (record, GatewayKey(record.id, record.name, parse_policies(record.policies)))
        self._remember(key_id, entry)
        return entry

    def _remember(self, key_id: str, entry: tuple[KeyRecord, GatewayKey]) -> None:
        self._absent.pop(key_id, None)
        self._records[key_id] = entry
        if len(self._records) > self.size:
            self._records.popitem(last=False)

    async def learn(self, at_most: int = 200) -> int:
        """Read the records of (at most `at_most`) keys this worker does not know yet, so that it
        can verify them while the store is unreachable, as it can those it has seen. Their
        revocation is still checked by every admission. Raises StoreError.

        Only free room is filled: a learnt record never pushes out one in use, and a full ring
        reads nothing (more keys than it holds are learnt on first use, as before). Revoked keys
        (and records it cannot read) are left out, and not read again."""
        room = min(at_most, self.size - len(self._records))
        if room <= 0:
            return 0
        passed = self._passed
        ids = [i for i in await self.store.key_ids() if self._records.get(i) is None and i not in passed]
        learnt = 0
        for key_id in ids[:room]:
            record = await self.store.get_key(key_id)
            try:
                key = None if record is None else GatewayKey(record.id, record.name, parse_policies(record.policies))
            except ValueError:  # a record it cannot read: left to a request to find out, as before
                key = None
            if record is None or key is None or not record.active:  # revoked ones are never learnt
                if len(passed) >= self.size:
                    passed.clear()
                passed.add(key_id)
                continue
            self._remember(key_id, (record, key))
            learnt += 1
        return learnt

    def forget(self, key_id: str) -> None:
        """Drop a cached record (after the store reported the key revoked)."""
        self._records.pop(key_id, None)
