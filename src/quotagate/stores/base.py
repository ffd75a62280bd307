"""The store contract: a handful of async methods every store implements atomically."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..limiter import Admission, Budget, CounterState

GLOBAL = ""  # usage(segment=GLOBAL): only budgets without a segment (no property can be named "")
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


class Store(Protocol):
    """Keys, counters and usage. Every method is one atomic step in the store."""

    url: str

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

    async def usage(
        self,
        key_id: str | None = None,
        segment: str | None = None,
        value: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[BudgetUsage]: ...

    async def denials(self, limit: int = 50) -> list[Denial]: ...

    async def create_key(self, record: KeyRecord) -> bool:
        """Store a new key, unless an active key already has its name (False); atomic."""
        ...

    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    async def list_keys(self) -> list[KeyRecord]: ...

    async def revoke_key(self, key_id: str, at: float) -> bool:
        """Mark the key revoked (False if it already was); its name is free again."""
        ...

    # -- the admin surface: dashboard sessions and the throttle on failed sign-ins --

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

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
