"""Where quotagate counts: a store picked by the scheme of its URL."""

from __future__ import annotations

import time
from collections.abc import Callable

from .base import GLOBAL, BudgetUsage, Denial, KeyRecord, StepError, Store, StoreError

__all__ = ["GLOBAL", "SCHEMES", "BudgetUsage", "Denial", "KeyRecord", "StepError", "Store", "StoreError", "open_store"]

SCHEMES = ("sqlite", "redis", "rediss", "redis+cluster", "rediss+cluster")


def open_store(url: str, clock: Callable[[], float] | None = None) -> Store:
    """Open the store a URL names. `clock` overrides the store's time source (tests)."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore(url, clock or time.time)
    if scheme in SCHEMES:
        from .redis import RedisStore

        return RedisStore(url, clock)
    raise ValueError(
        f"unknown store URL {url!r}: use sqlite:///file.db, redis://host:port/db, "
        "rediss://... or redis+cluster://host:port"
    )
