"""The admin surface holds against hostile clients: state-changing requests must be JSON (no
cross-site form posts), signing out ends a session for good (in every worker and instance sharing
the store), key names stay unique under concurrent creates, failed sign-ins are throttled per
client address. Real HTTP on real sockets, on every store."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import httpx2 as httpx
import pytest
import redis

from quotagate.admin import COOKIE
from quotagate.keys import GatewayKeyError, create_key
from quotagate.stores import open_store

from .conftest import FakeClock, Gateway, cli, empty_store, run

TOKEN = "surface-admin-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
ALLOWANCE = 20  # failed sign-ins per client address per minute (the default)


@pytest.fixture
def gw(make_gateway: Callable[..., Gateway], store_url: str, clock: FakeClock) -> Gateway:
    return make_gateway(store_url=store_url, clock=clock, admin_token=TOKEN)


def client(gw: Gateway, source: str = "127.0.0.1") -> httpx.Client:
    """A client whose requests come from `source` (any 127.0.0.0/8 address reaches the loopback)."""
    return httpx.Client(base_url=gw.url, timeout=30, transport=httpx.HTTPTransport(local_address=source))


def key_names(gw: Gateway) -> list[tuple[str, bool]]:
    with gw.http() as http:
        return [(k["name"], k["active"]) for k in http.get("/admin/keys", headers=BEARER).json()["keys"]]


# --- state-changing requests must be JSON ---------------------------------------------------------

NOT_JSON: list[dict[str, Any]] = [
    {"content": b'{"name": "forged"}', "headers": {"Content-Type": "text/plain"}},
    {"content": b'{"name": "forged"}'},  # no Content-Type at all
    {"data": {"name": "forged"}},  # application/x-www-form-urlencoded
    {"files": {"name": (None, "forged")}},  # multipart/form-data
    {"content": b'{"name": "forged"}', "headers": {"Content-Type": "application/x-json"}},
]


def test_a_cross_site_form_cannot_create_a_key_with_the_session_cookie(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(admin_token=TOKEN)
    with gw.http() as http:
        assert http.post("/admin/session", json={"token": TOKEN}).status_code == 200
        for shape in NOT_JSON:
            response = http.post("/admin/keys", **shape)
            assert response.status_code == 415, (shape, response.text)
            assert response.json()["error"]["code"] == "json_required"
            assert response.headers["Accept-Post"] == "application/json"
        created = http.post("/admin/keys", json={"name": "real"})
        assert created.status_code == 201
        revoke = http.request("DELETE", "/admin/keys/real", content=b"x", headers={"Content-Type": "text/plain"})
        assert revoke.status_code == 415
    assert key_names(gw) == [("real", True)]
    with gw.http() as http:  # the same with the bearer token; a JSON media type with parameters is JSON
        for shape in NOT_JSON:
            headers = {**BEARER, **shape.get("headers", {})}
            assert http.post("/admin/keys", **{**shape, "headers": headers}).status_code == 415
        typed = {**BEARER, "Content-Type": "application/json; charset=utf-8"}
        assert http.post("/admin/keys", content=b'{"name": "typed"}', headers=typed).status_code == 201
        assert http.delete("/admin/keys/typed", headers=BEARER).status_code == 200  # no body: no JSON needed
    assert key_names(gw) == [("real", True), ("typed", False)]


def test_sign_in_must_be_json(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(admin_token=TOKEN)
    with gw.http() as http:
        for shape in (
            {"data": {"token": TOKEN}},
            {"content": f'{{"token": "{TOKEN}"}}'.encode(), "headers": {"Content-Type": "text/plain"}},
            {},
        ):
            response = http.post("/admin/session", **shape)
            assert response.status_code == 415 and "set-cookie" not in response.headers, shape
        assert http.get("/admin/session").status_code == 401
        assert http.post("/admin/session", json={"token": TOKEN}).status_code == 200


# --- sessions live in the store: signing out ends them everywhere ---------------------------------


def test_signing_out_ends_the_session_in_every_instance(gw: Gateway, make_gateway: Callable[..., Gateway]) -> None:
    other = make_gateway(store_url=gw.store_url, admin_token=TOKEN)  # a second instance on the same store
    with gw.http() as http:
        before = int(time.time())
        login = http.post("/admin/session", json={"token": TOKEN})
        after = time.time()
        assert login.status_code == 200
        value = http.cookies[COOKIE]
        expires = login.json()["expires_at"]
        assert before + 12 * 3600 <= expires <= after + 12 * 3600  # 12 hours from the sign-in
        session = http.get("/admin/session").json()
        assert session == {"authenticated": True, "expires_at": expires}
    assert cookie_status(other, value) == 200  # signed in at one instance, good at the other
    with other.http() as http:
        http.cookies.set(COOKIE, value)
        out = http.delete("/admin/session")
        assert out.status_code == 200 and 'quotagate_admin=""' in out.headers["set-cookie"]
    assert cookie_status(gw, value) == 401  # the old cookie is dead everywhere, for good
    assert cookie_status(other, value) == 401
    with gw.http() as http:
        http.cookies.set(COOKIE, value)
        assert http.get("/admin/session").status_code == 401


def test_a_session_cookie_is_bound_to_the_token_and_cannot_be_forged(
    gw: Gateway, make_gateway: Callable[..., Gateway]
) -> None:
    with gw.http() as http:
        assert http.post("/admin/session", json={"token": TOKEN}).status_code == 200
        value = http.cookies[COOKIE]
    assert TOKEN not in value and cookie_status(gw, value) == 200
    session, _, mac = value.partition(".")
    flipped = mac[:-1] + ("0" if mac[-1] != "0" else "1")
    assert cookie_status(gw, f"{session}.{flipped}") == 401
    assert cookie_status(gw, f"{session[:-1]}{'A' if session[-1] != 'A' else 'B'}.{mac}") == 401
    assert cookie_status(gw, session) == 401
    renewed = make_gateway(store_url=gw.store_url, admin_token="a-new-admin-token")
    assert cookie_status(renewed, value) == 401  # a changed admin token ends every session


def cookie_status(gw: Gateway, value: str) -> int:
    with gw.http() as http:
        http.cookies.set(COOKIE, value)
        return http.get("/admin/budgets").status_code


# --- key names stay unique under concurrent creates -----------------------------------------------


def test_ten_concurrent_creates_of_one_name_make_one_key(gw: Gateway) -> None:
    async def create_all() -> list[int]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
            calls = [http.post("/admin/keys", json={"name": "dup"}, headers=BEARER) for _ in range(10)]
            return [r.status_code for r in await asyncio.gather(*calls)]

    statuses = run(create_all())
    assert sorted(statuses) == [201] + [409] * 9
    assert key_names(gw) == [("dup", True)]
    with gw.http() as http:  # revoking frees the name; the new key is the only active one
        assert http.delete("/admin/keys/dup", headers=BEARER).status_code == 200
    statuses = run(create_all())
    assert sorted(statuses) == [201] + [409] * 9
    assert sorted(key_names(gw)) == [("dup", False), ("dup", True)]


def test_concurrent_creates_from_separate_processes_stores(store_url: str) -> None:
    """Each create through a store of its own, as separate CLI runs or workers would."""

    async def one() -> bool:
        store = open_store(store_url)
        try:
            await create_key(store, "shared-name", [])
            return True
        except GatewayKeyError:
            return False
        finally:
            await store.close()

    async def all_of_them() -> list[bool]:
        first = open_store(store_url)  # the schema exists, as `quotagate serve` makes it before its workers
        await first.ping()
        await first.close()
        return list(await asyncio.gather(*(one() for _ in range(10))))

    assert sorted(run(all_of_them())) == [False] * 9 + [True]


def test_existing_duplicates_are_kept_and_no_new_one_is_made(store_url: str, gw: Gateway) -> None:
    """A store written before names were unique may hold two active keys of one name: both keep
    working, and no third is made."""
    assert key_names(gw) == []  # the store exists (its schema written)
    for key_id in ("aaaaaaaaaaaa", "bbbbbbbbbbbb"):
        write_old_key(store_url, key_id, "twin")
    assert cli("keys", "list", "--store", store_url).stdout.count("twin") == 2  # a fresh process opens it
    with gw.http() as http:
        assert http.post("/admin/keys", json={"name": "twin"}, headers=BEARER).status_code == 409
        assert http.post("/admin/keys", json={"name": "solo"}, headers=BEARER).status_code == 201
        assert http.post("/admin/keys", json={"name": "solo"}, headers=BEARER).status_code == 409
        assert http.delete("/admin/keys/aaaaaaaaaaaa", headers=BEARER).status_code == 200
        assert http.post("/admin/keys", json={"name": "twin"}, headers=BEARER).status_code == 409  # bbbb still active
        assert http.delete("/admin/keys/bbbbbbbbbbbb", headers=BEARER).status_code == 200
        assert http.post("/admin/keys", json={"name": "twin"}, headers=BEARER).status_code == 201
    assert sorted(key_names(gw)).count(("twin", True)) == 1


def write_old_key(store_url: str, key_id: str, name: str) -> None:
    """A key record as earlier versions wrote it, straight into the store."""
    if store_url.startswith("sqlite"):
        path = store_url[len("sqlite:///") :]
        with sqlite3.connect(path) as db:
            db.execute("DROP INDEX IF EXISTS keys_active_name")
            db.execute(
                "INSERT INTO keys (id, name, salt, digest, policies, created_at) VALUES (?,?,?,?,?,?)",
                (key_id, name, b"s" * 16, b"d" * 32, "", time.time()),
            )
        return
    if "+cluster" in store_url:
        client: Any = redis.RedisCluster.from_url(store_url.replace("redis+cluster", "redis"))
    else:
        client = redis.Redis.from_url(store_url)
    mapping = {"id": key_id, "name": name, "salt": "00" * 16, "digest": "11" * 32, "policies": ""}
    client.hset(f"qg:key:{{{key_id}}}", mapping={**mapping, "created_at": repr(time.time()), "revoked_at": ""})
    client.sadd("qg:keys", key_id)
    client.close()


# --- failed sign-ins are throttled per client address ---------------------------------------------


def concurrent_signins(gw: Gateway, token: str, count: int, source: str = "127.0.0.1") -> list[int]:
    async def all_of_them() -> list[int]:
        transport = httpx.AsyncHTTPTransport(local_address=source)
        async with httpx.AsyncClient(base_url=gw.url, timeout=30, transport=transport) as http:
            calls = [http.post("/admin/session", json={"token": token}) for _ in range(count)]
            return [r.status_code for r in await asyncio.gather(*calls)]

    return list(run(all_of_them()))


def test_failed_signins_are_throttled_per_address(gw: Gateway, clock: FakeClock) -> None:
    statuses = concurrent_signins(gw, "a-wrong-guess", ALLOWANCE + 15)
    assert statuses.count(401) == ALLOWANCE and statuses.count(429) == 15
    with client(gw) as http:
        refused = http.post("/admin/session", json={"token": TOKEN})  # even the right token: no oracle
        assert refused.status_code == 429 and "set-cookie" not in refused.headers
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert refused.json()["error"]["code"] == "too_many_signins"
        assert http.get("/admin/budgets", headers={"Authorization": "Bearer wrong"}).status_code == 429
        assert http.get("/admin/budgets", headers=BEARER).status_code == 429
    with client(gw, "127.0.0.2") as http:  # another address is not locked out by these failures
        assert http.post("/admin/session", json={"token": TOKEN}).status_code == 200
        assert http.get("/admin/budgets").status_code == 200
        assert http.get("/admin/budgets", headers=BEARER).status_code == 200
    clock.advance(61)  # the next minute: the address may try again
    with client(gw) as http:
        assert http.post("/admin/session", json={"token": TOKEN}).status_code == 200


def test_wrong_bearer_tokens_count_and_right_ones_do_not(gw: Gateway) -> None:
    with client(gw) as http:
        for _ in range(3 * ALLOWANCE):  # an admin script's own requests never use up its allowance
            assert http.get("/admin/keys", headers=BEARER).status_code == 200
        wrong = [http.get("/admin/keys", headers={"Authorization": f"Bearer guess-{i}"}) for i in range(ALLOWANCE + 1)]
        assert [r.status_code for r in wrong] == [401] * ALLOWANCE + [429]
        assert http.post("/admin/session", json={"token": "guess"}).status_code == 429


def test_a_signed_in_browser_keeps_working_while_its_address_is_throttled(gw: Gateway) -> None:
    with client(gw) as browser:
        assert browser.post("/admin/session", json={"token": TOKEN}).status_code == 200
        statuses = concurrent_signins(gw, "a-wrong-guess", ALLOWANCE + 1)
        assert statuses.count(401) == ALLOWANCE and statuses.count(429) == 1
        assert browser.post("/admin/session", json={"token": TOKEN}).status_code == 429
        assert browser.get("/admin/budgets").status_code == 200  # its session cookie is no guess


def test_wrong_tokens_on_metrics_count_too(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(admin_token=TOKEN, metrics_require_token=True)
    with client(gw) as http:
        assert http.get("/metrics", headers=BEARER).status_code == 200
        wrong = [http.get("/metrics", headers={"Authorization": f"Bearer guess-{i}"}) for i in range(ALLOWANCE + 1)]
        assert [r.status_code for r in wrong] == [401] * ALLOWANCE + [429]
        assert http.get("/metrics", headers=BEARER).status_code == 429


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_the_throttle_holds_across_worker_processes(
    serve: Callable[..., Gateway], request: pytest.FixtureRequest, tmp_path: Any, kind: str
) -> None:
    gateway = serve("--workers", "2", "--admin-token", TOKEN, store_url=empty_store(request, kind, tmp_path))

    async def attempts(source: str) -> list[int]:
        limits = httpx.Limits(max_keepalive_connections=0)  # a connection each: both workers answer
        transport = httpx.AsyncHTTPTransport(local_address=source, limits=limits)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30, transport=transport) as http:
            calls = [http.post("/admin/session", json={"token": f"guess-{i}"}) for i in range(3 * ALLOWANCE)]
            return [r.status_code for r in await asyncio.gather(*calls)]

    # The allowance is per minute of the store's clock, a real one here (the workers are processes of
    # their own): a burst that ran over a minute's end counted in two minutes, so it is sent again at
    # once, from another address (counted apart), instead of waiting for a minute to start.
    for source in ("127.0.0.2", "127.0.0.3"):
        minute = time.time() // 60
        statuses = run(attempts(source))
        if time.time() // 60 == minute:
            break
    assert statuses.count(401) == ALLOWANCE and statuses.count(429) == 2 * ALLOWANCE


def test_tokens_that_are_not_text_are_wrong_tokens(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(admin_token=TOKEN)
    with gw.http() as http:
        lone = http.post(
            "/admin/session", content=b'{"token": "\\ud800"}', headers={"Content-Type": "application/json"}
        )
        assert lone.status_code == 401
        for raw in (b"Bearer \xff\xfe", b"Bearer \xc3\x28", "Bearer Zoë".encode()):
            response = http.get("/admin/keys", headers={b"Authorization": raw})
            assert response.status_code == 401 and response.json()["error"]["code"] == "admin_token_invalid"
        upper = {**BEARER, "Content-Type": "Application/JSON"}
        assert http.post("/admin/keys", content=b'{"name": "upper"}', headers=upper).status_code == 201
