"""The pipelined Redis connection of the hot path, against real redis-servers: replies reach their
own callers, a caller that gives up keeps the order, a server that stops answering or goes away
fails the calls in flight, and the next call connects again."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from quotagate.stores.resp import PipelinedRedis, pack

from .cluster import RedisServer
from .conftest import run


@contextlib.asynccontextmanager
async def connected(url: str, reply_timeout: float = 5.0) -> AsyncIterator[PipelinedRedis]:
    client = PipelinedRedis(url, reply_timeout=reply_timeout)
    try:
        yield client
    finally:
        await client.close()


def echo(text: str) -> bytes:
    return pack([b"ECHO", text.encode()])


def pause(url: str, milliseconds: int) -> None:
    """Make the server hold every client's commands for a while (CLIENT PAUSE, from another connection)."""
    redis.Redis.from_url(url).execute_command("CLIENT", "PAUSE", milliseconds, "ALL")


def test_concurrent_calls_each_get_their_own_reply(redis_url: str) -> None:
    async def main() -> list[bytes]:
        async with connected(redis_url) as client:
            return await asyncio.gather(*(client.execute(echo(f"call {i}")) for i in range(500)))

    assert run(main()) == [f"call {i}".encode() for i in range(500)]


def test_select_and_errors_as_redis_py_raises_them(redis_url: str) -> None:
    db = int(redis_url.rsplit("/", 1)[1])
    redis.Redis.from_url(redis_url).set("resp-test", "in my db")

    async def main() -> None:
        async with connected(redis_url) as client:
            assert await client.execute(pack([b"GET", b"resp-test"])) == b"in my db"  # SELECTed the URL's db
            assert (await client.execute(pack([b"CLIENT", b"INFO"]))).decode().count(f" db={db} ") == 1
            with pytest.raises(NoScriptError):
                await client.execute(pack([b"EVALSHA", b"0" * 40, b"0"]))
            with pytest.raises(ResponseError, match="unknown command"):
                await client.execute(pack([b"NO-SUCH-COMMAND"]))
            assert await client.execute(echo("still in step")) == b"still in step"

    run(main())


def test_a_caller_that_gives_up_does_not_shift_the_replies(tmp_path: Path) -> None:
    with RedisServer(tmp_path, appendonly=False) as server:

        async def main() -> None:
            async with connected(server.url) as client:
                assert await client.execute(echo("connected")) == b"connected"
                pause(server.url, 300)
                first = asyncio.ensure_future(client.execute(echo("first")))
                second = asyncio.ensure_future(client.execute(echo("second")))
                await asyncio.sleep(0.05)
                first.cancel()
                assert await second == b"second"
                assert await client.execute(echo("third")) == b"third"
                assert first.cancelled()

        run(main())


def test_a_server_that_stops_answering_times_out_and_the_next_call_reconnects(tmp_path: Path) -> None:
    with RedisServer(tmp_path, appendonly=False) as server:

        async def main() -> None:
            async with connected(server.url, reply_timeout=0.2) as client:
                assert await client.execute(echo("before")) == b"before"
                assert server.process is not None
                server.process.send_signal(signal.SIGSTOP)  # the server stops answering, until SIGCONT
                calls = [asyncio.ensure_future(client.execute(echo(str(i)))) for i in range(3)]
                for call in calls:
                    with pytest.raises(RedisTimeoutError, match=r"did not answer within 0\.2 s"):
                        await call
                server.process.send_signal(signal.SIGCONT)
                assert await client.execute(echo("after")) == b"after"

        run(main())


def test_a_server_that_goes_away_fails_the_calls_and_is_found_again(tmp_path: Path) -> None:
    with RedisServer(tmp_path, appendonly=False) as server:

        async def main() -> None:
            async with connected(server.url) as client:
                assert await client.execute(pack([b"SET", b"k", b"v"])) == b"OK"
                pause(server.url, 5000)
                held = asyncio.ensure_future(client.execute(echo("held")))
                await asyncio.sleep(0.05)
                server.kill()
                with pytest.raises(RedisConnectionError, match="connection to Redis lost"):
                    await held
                with pytest.raises(RedisConnectionError, match="cannot connect to Redis"):
                    await client.execute(echo("while down"))
                server.start()
                assert await client.execute(echo("back")) == b"back"
                assert await client.execute(pack([b"GET", b"k"])) is None  # a new server, no persistence

        run(main())


def test_then_runs_in_the_reply_s_own_callback_before_the_future_s_done_callbacks(redis_url: str) -> None:
    """`send(data, then)`: `then` sees its future finished, in the callback that finished it, ahead
    of any done-callback of that future (those run a turn of the event loop later)."""

    async def main() -> list[tuple[str, object]]:
        async with connected(redis_url) as client:
            await client.execute(echo("connected"))
            protocol = client.ready()
            assert protocol is not None
            seen: list[tuple[str, object]] = []
            futures = []
            for text in ("one", "two"):
                future = protocol.send(echo(text), lambda f: seen.append(("then", f.result())))
                future.add_done_callback(lambda f: seen.append(("done-callback", f.result())))
                futures.append(future)
            await asyncio.gather(*futures)
            return seen

    assert run(main()) == [("then", b"one"), ("then", b"two"), ("done-callback", b"one"), ("done-callback", b"two")]


def test_then_is_called_for_a_caller_that_gave_up_and_for_a_lost_connection(tmp_path: Path) -> None:
    with RedisServer(tmp_path, appendonly=False) as server:

        async def main() -> None:
            async with connected(server.url) as client:
                await client.execute(echo("connected"))
                protocol = client.ready()
                assert protocol is not None
                outcomes: list[str] = []

                def then(future: asyncio.Future[object]) -> None:
                    if future.cancelled():
                        outcomes.append("cancelled")
                    elif future.exception() is not None:
                        outcomes.append(type(future.exception()).__name__)
                    else:
                        outcomes.append(repr(future.result()))

                pause(server.url, 300)
                first = protocol.send(echo("first"), then)
                second = protocol.send(echo("second"), then)
                first.cancel()
                assert await second == b"second"
                assert outcomes == ["cancelled", "b'second'"]  # each once, in order, at its reply
                pause(server.url, 5000)
                held = protocol.send(echo("held"), then)
                await asyncio.sleep(0.05)
                server.kill()
                with pytest.raises(RedisConnectionError):
                    await held
                assert outcomes == ["cancelled", "b'second'", "ConnectionError"]

        run(main())


def test_a_then_that_raises_is_reported_and_the_connection_goes_on(redis_url: str) -> None:
    async def main() -> tuple[list[str], bytes, bool]:
        reported: list[str] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: reported.append(context["message"]))
        async with connected(redis_url) as client:
            await client.execute(echo("connected"))
            protocol = client.ready()
            assert protocol is not None

            def broken(_future: asyncio.Future[object]) -> None:
                raise RuntimeError("a bug in a caller")

            assert await protocol.send(echo("first"), broken) == b"first"
            after = await client.execute(echo("after"))
            return reported, after, client.ready() is protocol

    reported, after, same = run(main())
    assert reported == ["exception in a Redis reply's callback"]
    assert after == b"after" and same  # the same connection, not a new one


def test_password_from_the_url(tmp_path: Path) -> None:
    with RedisServer(tmp_path, appendonly=False) as server:
        port = str(server.port)
        subprocess.run(["redis-cli", "-p", port, "CONFIG", "SET", "requirepass", "s3cret"], check=True)

        async def main() -> None:
            good = PipelinedRedis(f"redis://:s3cret@127.0.0.1:{port}/2")
            bad = PipelinedRedis(f"redis://:wrong@127.0.0.1:{port}/0")
            anonymous = PipelinedRedis(f"redis://127.0.0.1:{port}/0")
            try:
                assert await good.execute(echo("in")) == b"in"
                with pytest.raises(ResponseError, match=r"WRONGPASS|invalid password"):
                    await bad.execute(echo("no"))
                with pytest.raises(ResponseError, match="NOAUTH"):
                    await anonymous.execute(echo("no"))
            finally:
                for client in (good, bad, anonymous):
                    await client.close()

        run(main())


@pytest.mark.parametrize(
    ("url", "supported"),
    [
        ("redis://127.0.0.1:6379/0", True),
        ("redis://user:pw@127.0.0.1:6379/3", True),
        ("rediss://127.0.0.1:6380/0?ssl_ca_certs=/tmp/ca.crt&ssl_cert_reqs=required", True),
        ("unix:///run/redis.sock", False),
        ("redis://127.0.0.1:6379/0?protocol=3", False),
        ("redis://127.0.0.1:6379/0?client_name=gw", False),
    ],
)
def test_which_urls_the_connection_opens_itself(url: str, supported: bool) -> None:
    assert PipelinedRedis.supports(url) is supported
