"""Where quotagate counts: a store picked by the scheme of its URL."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..redact import redact_url
from .base import (
    EVERY_SEGMENT,
    BudgetUsage,
    Counters,
    Denial,
    KeyRecord,
    Keys,
    SegmentFilter,
    StepError,
    Store,
    StoreError,
    UsageIndex,
)

__all__ = [
    "EVERY_SEGMENT",
    "SCHEMES",
    "BudgetUsage",
    "Counters",
    "Denial",
    "KeyRecord",
    "Keys",
    "SegmentFilter",
    "StepError",
    "Store",
    "StoreError",
    "UsageIndex",
    "check_url",
    "open_store",
]

SCHEMES = ("sqlite", "redis", "rediss", "redis+cluster", "rediss+cluster")


def open_store(url: str, clock: Callable[[], float] | None = None) -> Store:
    """Open the store a URL names. `clock` overrides the store's time source (tests)."""
    check_url(url)
    if url.split(":", 1)[0].lower() == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore(url, clock or time.time)
    from .redis import RedisStore

    return RedisStore(url, clock)


def check_url(url: str) -> None:
    """ValueError for a URL no store can open; the message shows the URL with its password masked."""
    scheme = url.split(":", 1)[0].lower()
    if scheme not in SCHEMES:
        raise ValueError(
            f"unknown store URL {redact_url(url)!r}: use sqlite:///file.db, redis://host:port/db, "
            "rediss://... or redis+cluster://host:port"
        )
    if scheme == "sqlite":
        from .sqlite import path_from_url

        path_from_url(url)
        return
    from redis.connection import parse_url

    try:
        parse_url("redis" + url[url.index(":") :] if scheme.endswith("+cluster") else url)
    except ValueError as exc:
        reason = "its port is not a number from 0 to 65535" if "digits" in str(exc) else str(exc)
        raise ValueError(f"store URL {redact_url(url)!r}: {reason}") from None
