"""One bad request fails alone: an id that is not valid UTF-8 (or holds a NUL) is a 400 naming
where it came from, and a failure inside a micro-batched store step fails only the request whose
own data caused it; its neighbours in the batch are decided and committed exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import orjson
import pytest
import redis

from quotagate.fake_upstream import FakeUpstream
from quotagate.limiter import Budget, base_amounts, budgets_for
from quotagate.policy import parse_policies
from quotagate.stores import StepError, Store

from .conftest import CHAT, POLICY, FakeClock, Gateway, post_head, with_store

# what aiohttp makes of the bytes 0xff 0xfe in a header (surrogateescape), and a lone surrogate
BAD_VALUES = ["bad\udcff\udcfe", "\udc80"]


async def raw_status(gateway: Gateway, head: bytes, body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request sent byte for byte (header bytes no client library would send)."""
    host, port = gateway.url.rsplit("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head + b"\r\n" + body)
    await writer.drain()
    data = await reader.read()
    writer.close()
    head_end = data.index(b"\r\n\r\n") + 4
    return int(data.split(b" ", 2)[1]), data[head_end:]


BODY = orjson.dumps({"model": "gpt-4o-mini", "messages": CHAT, "max_tokens": 2})


# --- the HTTP layer refuses such ids ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (b"Helicone-User-Id", b"\xff\xfe"),
        (b"Helicone-User-Id", b"caf\xc3"),  # a truncated UTF-8 sequence
        (b"Helicone-User-Id", b"\xed\xa0\x80"),  # a surrogate encoded as UTF-8 (CESU)
        (b"Helicone-Property-Org", b"acme\x80"),
    ],
)
def test_an_id_that_is_not_utf8_is_a_400_naming_its_header(
    gateway: Gateway, upstream: FakeUpstream, header: bytes, value: bytes
) -> None:
    key = gateway.key()
    policy = b"5;w=60;s=user" if header == b"Helicone-User-Id" else b"5;w=60;s=org"
    status, payload = asyncio.run(
        raw_status(gateway, post_head(key, BODY, POLICY.encode() + b": " + policy, header + b": " + value), BODY)
    )
    assert status == 400
    error = orjson.loads(payload)["error"]
    assert error["code"] == "invalid_segment_value" and error["param"] == header.decode()
    assert header.decode() in error["message"] and "UTF-8" in error["message"]
    assert upstream.count() == 0


@pytest.mark.parametrize("policy", [b"\xff;w=60", b"1;w=60;s=\xff\xfe", b"1;w=60;u=caf\xc3", b"1;w=60,\xed\xa0\x80"])
def test_a_policy_that_is_not_utf8_is_a_400(gateway: Gateway, upstream: FakeUpstream, policy: bytes) -> None:
    key = gateway.key()
    status, payload = asyncio.run(raw_status(gateway, post_head(key, BODY, POLICY.encode() + b": " + policy), BODY))
    assert status == 400
    error = orjson.loads(payload)["error"]
    assert error["code"] == "invalid_rate_limit_policy" and "w=[time_window]" in error["grammar"]
    assert upstream.count() == 0


def test_an_invalid_id_is_refused_even_without_a_policy_naming_it(gateway: Gateway, upstream: FakeUpstream) -> None:
    """The user id and every property value are read (and logged) on every request."""
    key = gateway.key()
    for extra in (b"Helicone-User-Id: \xff", b"Helicone-Property-Team: \xc3("):
        status, payload = asyncio.run(raw_status(gateway, post_head(key, BODY, extra), BODY))
        assert status == 400 and orjson.loads(payload)["error"]["code"] == "invalid_segment_value"
    assert upstream.count() == 0


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": CHAT, "user": "a\u0000b"}, "user"),
        (
            "/anthropic/v1/messages",
            {"model": "m", "messages": CHAT, "metadata": {"user_id": "\u0000"}},
            "metadata.user_id",
        ),
    ],
)
def test_a_nul_in_the_body_user_id_is_a_400(
    gateway: Gateway, upstream: FakeUpstream, route: str, body: dict[str, object], param: str
) -> None:
    key = gateway.key()
    with gateway.http() as http:
        response = http.post(route, json=body, headers={"Helicone-Auth": f"Bearer {key}", POLICY: "5;w=60;s=user"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_segment_value" and error["param"] == param and "NUL" in error["message"]
    assert upstream.count() == 0


def test_a_lone_surrogate_escape_in_the_body_makes_it_not_json(gateway: Gateway, upstream: FakeUpstream) -> None:
    r"""orjson refuses `"\ud800"` (no valid UTF-8 holds it): the body is not JSON, so it has no user."""
    key = gateway.key()
    body = b'{"model": "gpt-4o-mini", "messages": [], "user": "\\ud800"}'
    status, payload = asyncio.run(raw_status(gateway, post_head(key, body, f"{POLICY}: 5;w=60;s=user".encode()), body))
    assert status == 400 and orjson.loads(payload)["error"]["code"] == "missing_segment_value"
    status, payload = asyncio.run(raw_status(gateway, post_head(key, body, f"{POLICY}: 5;w=60".encode()), body))
    # forwarded as it is: the provider cannot parse it either, and its answer comes back as it is
    assert (
        status == 400
        and orjson.loads(payload)["error"]["message"] == "We could not parse the JSON body of your request."
    )
    assert [r.body for r in upstream.received] == [body]


def test_valid_unicode_ids_still_count_apart(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.key()
    users = ["Zoë", "Zoe", "🚀", "a\tb"]
    statuses = []
    for user in users * 2:
        head = post_head(key, BODY, f"{POLICY}: 1;w=60;s=user".encode(), b"Helicone-User-Id: " + user.encode())
        statuses.append(asyncio.run(raw_status(gateway, head, BODY))[0])
    assert statuses == [200] * 4 + [429] * 4


def test_hostile_ids_beside_300_concurrent_requests_never_fail_them(gw: Gateway, upstream: FakeUpstream) -> None:
    """Valid requests and hostile ones arrive together (they share the store's micro-batches):
    every valid one is decided exactly as counted, every hostile one is a 400, none a 500."""
    key = gw.key()
    policy = f"{POLICY}: 100;w=60, 3;w=60;s=user".encode()
    valid = [post_head(key, BODY, policy, f"Helicone-User-Id: user-{n % 150}".encode()) for n in range(300)]
    hostile = [
        post_head(key, BODY, policy, b"Helicone-User-Id: " + bytes([0x80 + n % 64]) + b"x") for n in range(40)
    ] + [post_head(key, BODY, policy, b"Helicone-User-Id: u", b"Helicone-Property-Org: \xff") for _ in range(10)]

    heads = [h for pair in zip(valid[:50], hostile, strict=True) for h in pair] + valid[50:]

    async def main() -> list[tuple[int, bytes]]:
        return await asyncio.gather(*(raw_status(gw, head, BODY) for head in heads))

    results = asyncio.run(main())
    good = [status for (status, _), head in zip(results, heads, strict=True) if head not in hostile]
    bad = [(status, payload) for (status, payload), head in zip(results, heads, strict=True) if head in hostile]
    assert sorted(good) == [200] * 100 + [429] * 200
    assert [status for status, _ in bad] == [400] * 50
    assert all(orjson.loads(payload)["error"]["code"] == "invalid_segment_value" for _, payload in bad)
    assert upstream.count("/chat/completions") == 100


# --- the mechanism: a failing item in a batch, through the store API -------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


def run(store_url: str, clock: FakeClock, body: Callable[[Store, str], Awaitable[None]]) -> None:
    with_store(store_url, clock, body, "batch")


def requests_of(key_id: str, user: str, policies: str = "5;w=60, 100;w=60;s=user") -> tuple[list[Budget], list[int]]:
    """A user's budgets, and what a request takes from each (one request; nothing held)."""
    budgets = budgets_for(key_id, parse_policies(policies), {None: None, "user": user})
    return budgets, base_amounts(budgets)


def global_used(store: Store, key_id: str) -> Awaitable[int]:
    async def read() -> int:
        check = await store.admit(key_id, *requests_of(key_id, "", "1000;w=60"), "x", 60)
        return check.states[0].used - 1  # this admission took one

    return read()


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_an_admission_that_fails_on_its_own_data_fails_alone(store_url: str, clock: FakeClock, bad: str) -> None:
    """Bad items in the middle of a batch sharing a global budget: they raise StepError and take
    nothing; the others are decided in order, each once."""

    async def body(store: Store, key_id: str) -> None:
        users = ["a", bad, "b", "c", bad + "2", "d", "e", "f", "g"]
        results = await asyncio.gather(
            *(store.admit(key_id, *requests_of(key_id, u), f"r{i}", 60) for i, u in enumerate(users)),
            return_exceptions=True,
        )
        failed = [r for u, r in zip(users, results, strict=True) if u.startswith(bad)]
        assert all(isinstance(r, StepError) for r in failed), failed
        decided = [r for u, r in zip(users, results, strict=True) if not u.startswith(bad)]
        assert all(not isinstance(r, BaseException) for r in decided), decided
        assert sum(r.allowed for r in decided) == 5  # type: ignore[union-attr]
        assert sorted(r.states[0].used for r in decided) == [1, 2, 3, 4, 5, 5, 5]  # type: ignore[union-attr]
        assert await global_used(store, key_id) == 5
        with pytest.raises(StepError):  # alone in its step, too
            await store.admit(key_id, *requests_of(key_id, bad), "alone", 60)
        assert await global_used(store, key_id) == 6  # the first check's own admission, nothing else
        again = await store.admit(key_id, *requests_of(key_id, "a", "100;w=60;s=user"), "again", 60)
        assert again.states[0].used == 1 + results[0].allowed  # type: ignore[union-attr]

    run(store_url, clock, body)


def test_a_charge_that_fails_on_its_own_data_fails_alone(store_url: str, clock: FakeClock) -> None:
    """A batch of charges with one whose budget is broken in the store: that one fails and
    changes nothing; the others replace their holds by their amounts, in order, once."""

    async def body(store: Store, key_id: str) -> None:
        def tokens(user: str) -> list[Budget]:
            return requests_of(key_id, user, "1000;w=60;u=token, 1000;w=60;u=token;s=user")[0]

        calls = [(tokens(u), f"r{u}") for u in ("a", "broken", "b", "c")]
        assert all([(await store.admit(key_id, b, [10, 10], r, 60)).allowed for b, r in calls])
        await _break(store_url, calls[1][0][1].id)
        results = await asyncio.gather(
            *(store.charge(b, r, [n, n]) for (b, r), n in zip(calls, [7, 50, 8, 9], strict=True)),
            return_exceptions=True,
        )
        assert isinstance(results[1], StepError)
        assert all(not isinstance(r, BaseException) for i, r in enumerate(results) if i != 1), results
        [state] = await store.charge(calls[0][0][:1], "none", [0])
        if "+cluster" in store_url:
            # a charge is split by slot on a Cluster and each slot's part commits on its own (the
            # call was made; its cost is real): the broken budget's slot failed, the global one
            # replaced the hold by 50. Charges are not batched there, so only the end state counts.
            assert (state.used, state.held) == (74, 0)
            return
        assert [r[0].used for r in results if not isinstance(r, BaseException)] == [7, 15, 24]
        assert [r[0].held for r in results if not isinstance(r, BaseException)] == [30, 20, 10]
        assert (state.used, state.held) == (24, 10)  # the broken call still holds its estimate

    run(store_url, clock, body)


def test_a_budget_whose_stored_state_is_broken_fails_only_the_requests_that_use_it(
    store_url: str, clock: FakeClock
) -> None:
    """The item's own data in the store (a key of the wrong type in Redis, a corrupt row in
    SQLite) makes its step fail; the batch's other items are decided as if it were not there."""

    async def body(store: Store, key_id: str) -> None:
        broken = requests_of(key_id, "broken", "100;w=60;s=user")[0][0]
        assert (await store.admit(key_id, [broken], [1], "first", 60)).allowed
        await _break(store_url, broken.id)
        users = ["a", "broken", "b", "c", "broken", "d"]
        results = await asyncio.gather(
            *(
                store.admit(key_id, *requests_of(key_id, u, "50;w=60, 100;w=60;s=user"), f"r{i}", 60)
                for i, u in enumerate(users)
            ),
            return_exceptions=True,
        )
        assert [type(r).__name__ for r in results] == [
            "Admission",
            "StepError",
            "Admission",
            "Admission",
            "StepError",
            "Admission",
        ]
        assert all(r.allowed for r in results if not isinstance(r, BaseException))
        if "+cluster" not in store_url:  # one batch, in order (a Cluster refunds the failed ones' takes later)
            assert [r.states[0].used for r in results if not isinstance(r, BaseException)] == [1, 2, 3, 4]
        assert await global_used(store, key_id) == 4

    run(store_url, clock, body)


async def _break(store_url: str, budget_id: str) -> None:
    if store_url.startswith("sqlite"):
        import sqlite3

        from quotagate.stores.sqlite import path_from_url

        db = sqlite3.connect(path_from_url(store_url))
        with db:
            db.execute("UPDATE counters SET state = ? WHERE id = ?", (b"not json", budget_id))
        db.close()
        return
    from quotagate.stores.redis import budget_key

    if "+cluster" in store_url:
        client: redis.Redis = redis.RedisCluster.from_url(store_url.replace("+cluster", ""))  # type: ignore[assignment]
    else:
        client = redis.Redis.from_url(store_url)
    client.delete(budget_key(budget_id))
    client.set(budget_key(budget_id), "a string where a hash should be")
    client.close()
