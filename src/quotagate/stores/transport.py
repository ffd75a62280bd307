"""How the Redis store reaches Redis: one transport, chosen when the store opens.

`eval_step(keys, args)` sends one call of the step script at once and returns the future of its
reply. A server that forgot the script (a restart) is given it again here, and the call repeated:
the one place that knows of NOSCRIPT. Three kinds:

- `PipelinedTransport`: a single server, over one pipelined connection (`resp.py`), the replies
  parsed in the connection's callback: no task, no coroutine, per step;
- `PooledTransport`: a single server whose URL that connection cannot open (a unix socket,
  RESP3...), over redis-py's pool, the command packed once here;
- `ClusterTransport`: a Redis Cluster through redis-py, which routes each call by its keys' slot
  (the store splits a step per slot: `redis.ClusterSteps`).

Every transport also holds a redis-py client (`.redis`) for the commands off the hot path.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import resp

CONNECTIONS = 64  # redis-py commands in flight per worker; more wait for a free connection
_OPTIONS: dict[str, Any] = {"socket_connect_timeout": 1.0, "socket_timeout": 5.0}
_AGAIN_ONCE = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


class Transport:
    """The step script on one kind of connection to Redis."""

    ready = True  # False until `prepare` has run, where it must (a Cluster's slots)

    def __init__(self, make_client: Callable[[], Any], script: str) -> None:
        self._make_client = make_client
        self._client: Any = None
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()
        self._reloads: set[asyncio.Future[Any]] = set()

    @property
    def redis(self) -> Any:
        """redis-py's client, made on first use (in the event loop that uses it)."""
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def eval_step(self, keys: list[bytes], args: list[bytes]) -> asyncio.Future[Any]:
        """The script's reply to one call; loaded again and called again if the server forgot it."""
        result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.send_step(keys, args, functools.partial(_copy_outcome, result))
        return result

    def send_step(self, keys: list[bytes], args: list[bytes], done: Callable[[asyncio.Future[Any]], None]) -> None:
        """`eval_step` for a caller in a callback: `done(reply)` is called with the finished future
        of the script's reply (of the call repeated, if the server forgot the script), with no
        future of its own in between (each one is another turn of the event loop)."""
        self._evalsha_then(keys, args, functools.partial(self._answered, keys, args, done))

    def _evalsha_then(self, keys: list[bytes], args: list[bytes], then: resp.Then) -> None:
        """`_evalsha`, `then(reply)` once the reply's future is done."""
        self._evalsha(keys, args).add_done_callback(then)

    def _answered(
        self, keys: list[bytes], args: list[bytes], done: Callable[[asyncio.Future[Any]], None], reply: Any
    ) -> None:
        if not reply.cancelled() and isinstance(reply.exception(), NoScriptError):
            again = asyncio.ensure_future(self._reload_and_call(keys, args))
            self._reloads.add(again)
            again.add_done_callback(self._reloads.discard)
            again.add_done_callback(done)
            return
        done(reply)

    async def _reload_and_call(self, keys: list[bytes], args: list[bytes]) -> Any:
        self.sha = await self.redis.script_load(self.script)
        return await self._evalsha(keys, args)

    def _evalsha(self, keys: list[bytes], args: list[bytes]) -> asyncio.Future[Any]:
        raise NotImplementedError

    def _packed(self, keys: list[bytes], args: list[bytes]) -> bytes:
        """EVALSHA packed in one `bytes.join`: redis-py's general packing of each argument cost more
        than the rest of the call."""
        return resp.pack([b"EVALSHA", self.sha.encode(), b"%d" % len(keys), *keys, *args])

    async def prepare(self) -> None:
        """What must happen once before the first command (nothing, but on a Cluster)."""

    async def write_all(self, commands: Iterable[list[bytes]]) -> None:
        """Commands off the hot path (the dashboard's index), in order, one after another."""
        for command in commands:
            await self.redis.execute_command(command[0].decode(), *command[1:])

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


class PipelinedTransport(Transport):
    def __init__(self, url: str, script: str) -> None:
        super().__init__(functools.partial(_pooled_client, url), script)
        self.connection = resp.PipelinedRedis(url)

    def _evalsha(self, keys: list[bytes], args: list[bytes]) -> asyncio.Future[Any]:
        protocol = self.connection.ready()
        if protocol is not None:  # written at once, the reply handed over in the connection's callback
            return protocol.send(self._packed(keys, args))
        return asyncio.ensure_future(self.connection.execute(self._packed(keys, args)))

    def _evalsha_then(self, keys: list[bytes], args: list[bytes], then: resp.Then) -> None:
        """On the open connection `then` is called from the reply's own callback, not a turn later."""
        protocol = self.connection.ready()
        if protocol is not None:
            protocol.send(self._packed(keys, args), then)
        else:
            super()._evalsha_then(keys, args, then)

    async def write_all(self, commands: Iterable[list[bytes]]) -> None:
        """Written back to back on the one connection (so in order), each packed with the event loop
        free in between: one ZADD of the 3,000 entries a busy worker gathers in a second took
        ~11 ms to pack, a stall every request in flight waited out."""
        replies = []
        for command in commands:
            replies.append(self.connection.execute(resp.pack(command)))
            await asyncio.sleep(0)
        await asyncio.gather(*replies)

    async def close(self) -> None:
        await super().close()
        await self.connection.close()


class PooledTransport(Transport):
    def __init__(self, url: str, script: str) -> None:
        super().__init__(functools.partial(_pooled_client, url), script)

    def _evalsha(self, keys: list[bytes], args: list[bytes]) -> asyncio.Future[Any]:
        return asyncio.ensure_future(self._call(self._packed(keys, args)))

    async def _call(self, packed: bytes) -> Any:
        pool = self.redis.connection_pool
        connection = await pool.get_connection()
        try:
            await connection.send_packed_command(packed)
            return await connection.read_response()
        except (RedisConnectionError, RedisTimeoutError, OSError, asyncio.CancelledError):
            await connection.disconnect()  # a reply may still be on its way: not reusable
            raise
        finally:
            await pool.release(connection)


class _WaitingCluster(RedisCluster):
    """redis-py's Cluster client raises MaxConnectionsError when a node's connections are all in use;
    here a command waits instead (pipelines, used off the hot path, keep a reserve of connections)."""

    _waiting: asyncio.Semaphore | None = None

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._waiting is None:
            self._waiting = asyncio.Semaphore(CONNECTIONS)
        async with self._waiting:
            return await super().execute_command(*args, **kwargs)


class ClusterTransport(Transport):
    ready = False

    def __init__(self, url: str, script: str) -> None:
        make = functools.partial(_WaitingCluster.from_url, url, max_connections=CONNECTIONS + 32, **_OPTIONS)
        super().__init__(make, script)
        self._preparing = asyncio.Lock()

    def _evalsha(self, keys: list[bytes], args: list[bytes]) -> asyncio.Future[Any]:
        return asyncio.ensure_future(self.redis.evalsha(self.sha, len(keys), *keys, *args))

    async def prepare(self) -> None:
        """Learn the Cluster's slots once, before concurrent commands race to do it each."""
        async with self._preparing:
            if not self.ready:
                await self.redis.initialize()
                self.ready = True

    async def close(self) -> None:
        await super().close()
        self.ready = False


def open_transport(url: str, script: str) -> Transport:
    """The transport for a store URL (`redis://`, `rediss://`, either with `+cluster`)."""
    scheme, rest = url.split("://", 1)
    client_url = ("rediss" if scheme.lower().startswith("rediss") else "redis") + "://" + rest
    if scheme.lower().endswith("+cluster"):
        return ClusterTransport(client_url, script)
    if resp.PipelinedRedis.supports(client_url):
        return PipelinedTransport(client_url, script)
    return PooledTransport(client_url, script)


def _pooled_client(url: str) -> Any:
    """redis-py's client; a command waits for a free connection rather than failing when all are
    busy (a burst of requests must not look like an unreachable store); a pooled connection left
    from before a server restart is tried again once, anew."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=CONNECTIONS, timeout=5.0, retry=_AGAIN_ONCE, **_OPTIONS
    )
    return aioredis.Redis(connection_pool=pool)


def _copy_outcome(target: asyncio.Future[Any], source: asyncio.Future[Any]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        target.set_result(source.result())
