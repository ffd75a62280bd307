"""What the Redis store's parts share: the transport, the counters' clock, key names, scripts."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, TypeVar

from redis.exceptions import RedisClusterException, RedisError

from ..redact import redact_url
from .base import StoreError
from .transport import open_transport

T = TypeVar("T")

PREFIX = "qg:"


def _script(name: str) -> str:
    folder = resources.files("quotagate.stores").joinpath("lua")
    return folder.joinpath("common.lua").read_text() + "\n" + folder.joinpath(name).read_text()


def budget_key(budget_id: str) -> str:
    return f"{PREFIX}{{{budget_id}}}"


def key_record_key(key_id: str) -> str:
    return f"{PREFIX}key:{{{key_id}}}"


class RedisBase:
    """One Redis store URL: its transport, opened once, and the counters' clock."""

    def __init__(self, url: str, clock: Callable[[], float] | None = None) -> None:
        self.url = url
        self.clock = clock
        self._transport = open_transport(url, _script("step.lua"))
        self._store_now: float | None = None  # the counters' clock, as the last step reply told it

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
