"""The store contracts: `Counters` (the hot path), `Keys` (auth, CLI, admin) and `UsageIndex` (the
dashboard's read model). Every backend provides all three as one `Store`; each method is one
atomic step in the store."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final, Literal, Protocol

from ..limiter import Admission, Budget, CounterState


class _Every(Enum):
    SEGMENT = "every segment"


# A budget's segment is None for a global budget, "user", or a property name: everywhere in the
# stores. `usage(segment=...)` filters on it; EVERY_SEGMENT (its default) filters nothing.
EVERY_SEGMENT: Final = _Every.SEGMENT
SegmentFilter = str | None | Literal[_Every.SEGMENT]

DENIALS_KEPT = 1000  # the most recent denials a store keeps for the dashboard


class StoreError(Exception):
    """The store could not be reached or failed; the caller decides fail-open or fail-closed."""


class StepError(Exception):
    """One request's own data made its store step fail, the store itself being fine: that request
    fails alone (never fail-open, which would let it through unlimited), its batch goes on."""


@dataclass(slots=True)
class KeyRecord:
    id: str
    name: str
    salt: bytes
    digest: bytes
    policies: str  # key-bound policies in header form ("" for none)
    created_at: float
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(slots=True)
class BudgetUsage:
    """One budget in use, as the dashboard and `quotagate usage` show it."""

    key_id: str
    key_name: str
    unit: str
    window: int
    segment: str | None
    value: str | None
    quota: int  # scaled, strictest quota seen
    used: int
    held: int
    ratio: float
    policies: list[str]
    updated_at: float
    last_denied_at: float | None


@dataclass(slots=True)
class Denial:
    at: float
    key_id: str
    key_name: str
    policy: str
    segment: str | None
    value: str | None


class Counters(Protocol):
    """The hot path: admission and metering see only this."""

    async def admit(
        self, key_id: str, budgets: Sequence[Budget], amounts: Sequence[int], reservation: str, hold_ttl: float
    ) -> Admission:
        """Check the key is active, then check and take (or hold) every budget's amount at once.

        A denied admission takes nothing and is recorded for the dashboard's denial list.
        """
        ...

    async def charge(self, budgets: Sequence[Budget], reservation: str, amounts: Sequence[int]) -> list[CounterState]:
        """Replace the reservation's holds by the amounts really spent."""
        ...


class Keys(Protocol):
    """Gateway keys (names unique among active keys), dashboard sessions, the sign-in throttle."""

    async def create_key(self, record: KeyRecord) -> bool:
        """Store a new key, unless an active key already has its name (False); atomic."""
        ...

    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    async def list_keys(self) -> list[KeyRecord]: ...

    async def key_ids(self) -> list[str]:
        """Every key's id, revoked ones included (one cheap read: no records)."""
        ...

    async def revoke_key(self, key_id: str, at: float) -> bool:
        """Mark the key revoked (False if it already was); its name is free again."""
        ...

    async def create_session(self, session: str, expires_at: float) -> None:
        """Remember a dashboard session (a hash of its id) until `expires_at` (Unix time)."""
        ...

    async def session_expiry(self, session: str) -> float | None:
        """When the session expires; None if it was never made, has ended or has expired."""
        ...

    async def delete_session(self, session: str) -> None: ...

    async def count_attempt(self, scope: str, window: int) -> tuple[int, float]:
        """Add one to the scope's counter for the current fixed window of `window` seconds (the
        store's clock); the count so far in that window and the seconds until it ends."""
        ...

    async def refund_attempt(self, scope: str, window: int) -> None:
        """Take back one counted in the current window (an attempt that succeeded)."""
        ...


class UsageIndex(Protocol):
    """The budgets in use by usage ratio and the recent denials, fed by the counters' steps; entries
    expire by the counters' clock."""

    async def usage(
        self,
        key_id: str | None = None,
        segment: SegmentFilter = EVERY_SEGMENT,
        value: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[BudgetUsage]:
        """Budgets in use, highest usage ratio first; None filters (for `segment`: EVERY_SEGMENT) nothing."""
        ...

    async def denials(self, limit: int = 50) -> list[Denial]:
        """The latest denials, newest first."""
        ...


class Store(Counters, Keys, UsageIndex, Protocol):
    """What a backend (SQLite, Redis, Redis Cluster) provides."""

    url: str

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
