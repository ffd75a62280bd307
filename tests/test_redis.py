"""Several gateway instances on one Redis (or Redis Cluster), TLS, and a Redis that goes away."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import orjson
import pytest
import redis

from quotagate.fake_upstream import FakeUpstream
from quotagate.keys import PREFIX, KeyRing, create_key
from quotagate.server import PROXY
from quotagate.stores import Store

from .cluster import RedisServer, make_tls_files
from .conftest import POLICY, FakeClock, Gateway, cli, concurrent_calls, flush_redis, httpx, with_store


def test_three_instances_share_one_budget_exactly(
    serve: Callable[..., Gateway], upstream: FakeUpstream, shared_url: str
) -> None:
    gateways = [serve("--workers", "1", store_url=shared_url) for _ in range(3)]
    key = gateways[0].key("fleet")
    statuses = concurrent_calls(gateways, key, "20;w=60", 200)
    assert statuses.count(200) == 20 and statuses.count(429) == 180
    assert upstream.count("/chat/completions") == 20


def test_any_instance_authenticates_any_key_and_sees_its_revocation(
    serve: Callable[..., Gateway], upstream: FakeUpstream, shared_url: str
) -> None:
    first, second = serve("--workers", "1", store_url=shared_url), serve("--workers", "1", store_url=shared_url)
    created = cli("keys", "create", "--name", "roaming", "--policy", "2;w=60", "--store", shared_url)
    key = created.stdout.strip().splitlines()[-1]
    assert first.openai(key).models.list().data
    assert second.openai(key).models.list().data
    with pytest.raises(openai.RateLimitError):  # the key-bound 2;w=60 is shared by both instances
        first.openai(key).models.list()
    cli("keys", "revoke", "roaming", "--store", shared_url)
    for gateway in (first, second):
        with pytest.raises(openai.AuthenticationError):
            gateway.openai(key).models.list()
    assert upstream.count() == 2


def test_tls_redis(make_gateway: Callable[..., Gateway], upstream: FakeUpstream, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with RedisServer(tmp_path / "data", appendonly=False, tls=make_tls_files(tmp_path / "tls")) as server:
        gateway = make_gateway(store_url=server.url)
        client = gateway.openai(gateway.key(), **{POLICY: "1;w=60"})
        client.models.list()
        with pytest.raises(openai.RateLimitError):  # counted in the store, so it went over TLS
            client.models.list()
        plain = redis.Redis(port=server.port, socket_timeout=5)
        with pytest.raises(redis.ConnectionError):  # the server speaks nothing but TLS
            plain.ping()
        plain.close()
    assert upstream.count() == 1


# --- the store goes away and comes back ----------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    folder = tmp_path / "redis"
    folder.mkdir()
    with RedisServer(folder) as server:
        yield server


class Load:
    """Requests sent continuously from a thread while a test breaks the store: what came back."""

    def __init__(self, gateway: Gateway, key: str) -> None:
        self.gateway, self.key = gateway, key
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        headers = {"Helicone-Auth": f"Bearer {self.key}", POLICY: "1000000;w=60;s=user", "Helicone-User-Id": "u"}
        with httpx.Client(base_url=self.gateway.url, timeout=30) as http:
            while not self._stop.is_set():
                self.statuses.append(http.get("/v1/models", headers=headers).status_code)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def wait_for(condition: Callable[[], bool], timeout: float = 15) -> None:
    """Poll a real-time condition (the store going or coming back) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def metric(gateway: Gateway, name: str) -> float:
    with gateway.http() as http:
        text = http.get("/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def test_fail_open_keeps_serving_then_recovers(
    make_gateway: Callable[..., Gateway],
    upstream: FakeUpstream,
    private_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = make_gateway(store_url=private_redis.url, access_log=True)
    key = gateway.key()
    limited = gateway.openai(key, **{POLICY: "1;w=3600"})
    limited.models.list()
    with pytest.raises(openai.RateLimitError):
        limited.models.list()
    errors_before = metric(gateway, "quotagate_store_errors_total")
    unlimited_before = metric(gateway, "quotagate_unlimited_requests_total")
    with Load(gateway, key) as load:
        private_redis.kill()
        wait_for(lambda: metric(gateway, "quotagate_unlimited_requests_total") > unlimited_before + 5)
        with gateway.http() as http:
            ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["store"] == "down"
        raw = limited.models.with_raw_response.list()  # the exhausted budget no longer applies
        assert raw.http_response.status_code == 200 and "Helicone-RateLimit-Limit" not in raw.headers
        private_redis.start()
        wait_for(lambda: _ready(gateway))
        count = len(load.statuses)
        wait_for(lambda: len(load.statuses) > count + 20)
    assert set(load.statuses) == {200}  # never a 500 or a 503 in fail-open mode
    assert metric(gateway, "quotagate_store_errors_total") > errors_before
    unlimited = metric(gateway, "quotagate_unlimited_requests_total") - unlimited_before
    logged = [r for r in caplog.records if "let through without limits" in r.getMessage()]
    assert len(logged) == unlimited > 5  # every request let through is logged and counted
    with pytest.raises(openai.RateLimitError):  # limits apply again: the AOF kept the counter
        limited.models.list()


def test_fail_closed_answers_503_then_recovers(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream, private_redis: RedisServer
) -> None:
    gateway = make_gateway(store_url=private_redis.url, on_store_error="closed")
    key = gateway.key()
    client = gateway.openai(key, **{POLICY: "5;w=60"})
    client.models.list()
    private_redis.kill()
    upstream.reset()
    with gateway.http() as http:
        response = http.get("/v1/models", headers={"Helicone-Auth": f"Bearer {key}", POLICY: "5;w=60"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "store_unavailable"
    assert upstream.count() == 0
    private_redis.start()
    wait_for(lambda: _ready(gateway))
    wait_for(lambda: _status(gateway, key) == 200)
    assert upstream.count() >= 1


def _ready(gateway: Gateway) -> bool:
    with gateway.http() as http:
        return http.get("/readyz").status_code == 200


def _status(gateway: Gateway, key: str) -> int:
    with gateway.http() as http:
        return http.get("/v1/models", headers={"Helicone-Auth": f"Bearer {key}", POLICY: "5;w=60"}).status_code


def test_the_first_request_after_the_store_answers_again_is_counted(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream, private_redis: RedisServer
) -> None:
    """Once Redis answers again, requests are admitted through it at once, not let through for a
    while longer: the first request after a restart is counted (rate-limit headers, the counter
    kept by the AOF), both with a key the gateway knows (the request tries the store itself) and
    with one it has to read from the store (that read is the store answering)."""
    gateway = make_gateway(store_url=private_redis.url)
    known = gateway.key("known")

    def remaining(http: httpx.Client, key: str) -> str | None:
        response = http.get("/v1/models", headers={"Helicone-Auth": f"Bearer {key}", POLICY: "5;w=3600"})
        assert response.status_code == 200
        return response.headers.get("Helicone-RateLimit-Remaining")

    with gateway.http() as http:
        assert remaining(http, known) == "4"
        private_redis.kill()
        assert remaining(http, known) is None  # fail-open: let through, not counted
        private_redis.start()
        assert remaining(http, known) == "3"
        private_redis.kill()
        assert remaining(http, known) is None
        private_redis.start()
        fresh = gateway.key("fresh")
        assert remaining(http, fresh) == "4"
        assert remaining(http, known) == "2"
    assert upstream.count() == 6


def test_fail_open_serves_a_key_on_every_worker_though_only_one_ever_saw_it(
    serve: Callable[..., Gateway], upstream: FakeUpstream, private_redis: RedisServer
) -> None:
    """Each worker verifies keys on its own; each also reads the keys it has not seen (at start,
    then every 2 s), so that when the store goes away a key works on every worker, whichever one
    a connection lands on, not only on those it happened to reach before."""
    key = cli("keys", "create", "--name", "early", "--store", private_redis.url).stdout.strip().splitlines()[-1]
    gateway = serve("--workers", "2", store_url=private_redis.url)
    private_redis.kill()
    statuses = [  # a new connection each: the kernel spreads them over both workers
        httpx.get(f"{gateway.url}/v1/models", headers={"Helicone-Auth": f"Bearer {key}", POLICY: "5;w=60"}).status_code
        for _ in range(20)
    ]
    assert statuses == [200] * 20
    assert upstream.count() == 20
    wrong = key[:-4] + "AAAA"  # still never let through unverified
    assert httpx.get(f"{gateway.url}/v1/models", headers={"Helicone-Auth": f"Bearer {wrong}"}).status_code == 401


def test_a_key_made_after_start_is_learnt_without_a_request(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream, private_redis: RedisServer
) -> None:
    """A key created after the worker started is read by its next round of learning (every 2 s;
    run here at once): it then works through an outage it was never presented before."""
    gateway = make_gateway(store_url=private_redis.url)
    key = cli("keys", "create", "--name", "late", "--store", private_redis.url).stdout.strip().splitlines()[-1]
    assert gateway.server is not None
    ring = gateway.server.app[PROXY].admission.keys
    learnt = asyncio.run_coroutine_threadsafe(ring.learn(), gateway.server.loop).result(timeout=30)
    assert learnt == 1
    private_redis.kill()
    with gateway.http() as http:
        response = http.get("/v1/models", headers={"Helicone-Auth": f"Bearer {key}"})
    assert response.status_code == 200
    assert upstream.count() == 1


def test_learning_keys_fills_free_room_only_and_never_pushes_out_a_key_in_use(redis_url: str, clock: FakeClock) -> None:
    """With more keys than the worker's ring holds, each round of learning read 200 records and put
    them in place of the least recently used ones, every 2 s on every worker, for ever: a key in
    use was pushed out (and then unverifiable during an outage). Learning takes free room only."""

    async def body(store: Store, _key_id: str) -> None:
        raws = [(await create_key(store, f"k{i}", []))[0] for i in range(4)]
        ring = KeyRing(store, size=3)
        assert await ring.verify(raws[0]) is not None  # the key in use: 1 of 3 places
        assert await ring.learn() == 2  # 5 keys in the store: the 2 free places
        assert await ring.learn() == 0  # full: nothing read, nothing replaced
        await store.close()  # the store away: the key in use is still verified from the ring
        assert await ring.verify(raws[0]) is not None

    flush_redis(redis_url)
    with_store(redis_url, clock, body)


def test_made_up_key_ids_never_push_a_key_in_use_out_of_the_ring(redis_url: str, clock: FakeClock) -> None:
    """A client presenting well-formed made-up keys: each unknown id was remembered in the ring of
    verified keys, pushing out the keys in use (a store lookup for each again, and unverifiable
    during an outage). Unknown ids are remembered apart; one presented again costs no lookup."""

    async def body(store: Store, _key_id: str) -> None:
        raw, _ = await create_key(store, "real", [])
        lookups: list[int] = []
        ring = KeyRing(store, size=3, answered=lambda: lookups.append(1))
        assert await ring.verify(raw) is not None
        made_up = [f"{PREFIX}{i:012x}_secret" for i in range(10)]
        for fake in made_up + made_up[:1]:
            assert await ring.verify(fake) is None
        assert len(lookups) == 1 + 10  # the repeated one was not looked up again
        await store.close()  # the store away: the key in use is still verified from the ring
        assert await ring.verify(raw) is not None
        assert len(lookups) == 11

    flush_redis(redis_url)
    with_store(redis_url, clock, body)


def test_learning_keys_skips_revoked_ones(redis_url: str, clock: FakeClock) -> None:
    """Revoked keys stay listed in the store for ever: learnt, they took the ring's room from keys
    in use (and a revoked key presented was forgotten, then read again, every round)."""

    async def body(store: Store, _key_id: str) -> None:
        _, gone = await create_key(store, "gone", [])
        await store.revoke_key(gone.id, clock())
        ring = KeyRing(store, size=10)
        assert await ring.learn() == 1  # the active key only
        assert await ring.learn() == 0

    flush_redis(redis_url)
    with_store(redis_url, clock, body)


def test_unknown_key_while_the_store_is_down_is_503(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream, private_redis: RedisServer
) -> None:
    """A key the gateway has not seen yet cannot be verified without the store: 503, even fail-open."""
    gateway = make_gateway(store_url=private_redis.url)
    key = gateway.key()
    private_redis.kill()
    with gateway.http() as http:
        response = http.get("/v1/models", headers={"Helicone-Auth": f"Bearer {key}"})
    assert response.status_code == 503
    assert orjson.loads(response.content)["error"]["code"] == "store_unavailable"
    assert upstream.count() == 0


def test_a_server_that_forgot_the_script_gets_it_again_on_an_open_connection(tmp_path: Path) -> None:
    """SCRIPT FLUSH (or a failover to a replica without it) while the gateway's connection stays
    open: the batch that meets NOSCRIPT loads the script and runs once, nothing is counted twice."""
    import asyncio

    import redis

    from quotagate.keys import create_key
    from quotagate.limiter import budgets_for
    from quotagate.policy import parse_policies
    from quotagate.stores import open_store

    with RedisServer(tmp_path, appendonly=False) as server:

        async def main() -> list[bool]:
            store = open_store(server.url)
            try:
                _, key = await create_key(store, "flush", [])
                allowed = []
                for round_ in range(3):
                    if round_ == 1:
                        redis.Redis.from_url(server.url).script_flush()
                    batch = [budgets_for(key.id, parse_policies("4;w=60"), {None: None}) for _ in range(2)]
                    admissions = await asyncio.gather(
                        *(store.admit(key.id, b, [1], f"r{round_}{i}", 60.0) for i, b in enumerate(batch))
                    )
                    allowed += [a.allowed for a in admissions]
                return allowed
            finally:
                await store.close()

        assert asyncio.run(main()) == [True, True, True, True, False, False]


def test_the_index_of_many_budgets_is_written_in_chunks_and_lists_them_all(shared_url: str) -> None:
    """More budgets in one flush than one ZADD carries (INDEX_CHUNK): every one is listed, whether
    written on the pipelined connection (a server) or through redis-py (a Cluster)."""
    import asyncio

    from quotagate.keys import create_key
    from quotagate.limiter import budgets_for
    from quotagate.policy import parse_policies
    from quotagate.stores import open_store
    from quotagate.stores.redis import INDEX_CHUNK

    users = 2 * INDEX_CHUNK + 37

    async def main() -> dict[str | None, float]:
        store = open_store(shared_url)
        try:
            _, key = await create_key(store, "many", [])
            policies = parse_policies("10;w=60;s=user")
            for n in range(users):
                for _ in range(1 + n % 3):
                    budgets = budgets_for(key.id, policies, {None: None, "user": f"user {n}"})
                    assert (await store.admit(key.id, budgets, [1], f"r{n}", 60.0)).allowed
            listed = await store.usage(key_id=key.id, limit=users + 10)
            return {u.value: u.ratio for u in listed}
        finally:
            await store.close()

    ratios = asyncio.run(main())
    assert len(ratios) == users
    assert all(ratios[f"user {n}"] == pytest.approx((1 + n % 3) / 10) for n in range(users))


@pytest.mark.parametrize("query", ["", "?client_name=quotagate-test"], ids=["pipelined", "redis-py pool"])
def test_a_server_that_forgot_the_step_script_is_given_it_again(private_redis: RedisServer, query: str) -> None:
    """SCRIPT FLUSH (as after a restart): the next step loads the script and is counted once, on the
    pipelined connection and on redis-py's pool (a URL option the pipelined connection leaves to it)."""
    import asyncio

    import redis as redis_py

    from quotagate.keys import create_key
    from quotagate.limiter import budgets_for
    from quotagate.policy import parse_policies
    from quotagate.stores import open_store

    async def main() -> None:
        store = open_store(private_redis.url + query)
        try:
            _, key = await create_key(store, "forgot", [])
            [budget] = budgets_for(key.id, parse_policies("5;w=60"), {None: None})
            assert (await store.admit(key.id, [budget], [1], "first", 30)).allowed
            redis_py.Redis.from_url(private_redis.url).script_flush()
            second, third = await asyncio.gather(
                store.admit(key.id, [budget], [1], "second", 30), store.admit(key.id, [budget], [1], "third", 30)
            )
            assert second.allowed and third.allowed and third.states[0].used == 3
            redis_py.Redis.from_url(private_redis.url).script_flush()
            assert (await store.admit(key.id, [budget], [1], "fourth", 30)).states[0].used == 4
        finally:
            await store.close()

    asyncio.run(main())
