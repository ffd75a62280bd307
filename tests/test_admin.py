"""The admin JSON API through real HTTP on every store: auth, session cookie, budgets, denials,
stats, keys. Traffic goes through the gateway with the official SDK; the store's clock is injected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from quotagate.admin import COOKIE
from quotagate.fake_upstream import FakeUpstream
from quotagate.metrics import RequestHistory

from .conftest import POLICY, FakeClock, Gateway, chat

TOKEN = "admin-secret-token"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def gw(make_gateway: Callable[..., Gateway], store_url: str, clock: FakeClock) -> Gateway:
    return make_gateway(store_url=store_url, clock=clock, admin_token=TOKEN)


def admin(gw: Gateway, method: str, path: str, **kwargs: Any) -> Any:
    """An admin API call with the bearer token; returns the parsed JSON, asserting a 2xx."""
    with gw.http() as http:
        response = http.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"}, **kwargs)
    assert response.is_success, (response.status_code, response.text)
    return response.json()


def status_of(gw: Gateway, method: str, path: str, token: str | None = TOKEN, **kwargs: Any) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with gw.http() as http:
        return http.request(method, path, headers=headers, **kwargs).status_code


def with_cookie(gw: Gateway, value: str) -> int:
    """GET /admin/budgets with this session cookie and nothing else."""
    with gw.http() as http:
        http.cookies.set(COOKIE, value)
        return http.get("/admin/budgets").status_code


def rows(data: dict[str, Any]) -> list[tuple[str, str | None, str | None, float, float]]:
    """(key name, segment, value, used, quota) of each budget, in the order given."""
    return [(b["key_name"], b["segment"], b["value"], b["used"], b["quota"]) for b in data["budgets"]]


# --- the surface is off without a token, and locked without the right one -------------------------

ADMIN_ROUTES = [
    ("GET", "/admin/budgets"),
    ("GET", "/admin/denials"),
    ("GET", "/admin/stats"),
    ("GET", "/admin/keys"),
    ("POST", "/admin/keys"),
    ("DELETE", "/admin/keys/anything"),
    ("GET", "/admin/session"),
    ("GET", "/admin/no-such-route"),
]


def test_admin_surface_is_off_without_a_token(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway()
    for method, path in [
        *ADMIN_ROUTES,
        ("POST", "/admin/session"),
        ("GET", "/dashboard"),
        ("GET", "/dashboard/app.js"),
    ]:
        assert status_of(gw, method, path, token="anything") == 404, (method, path)
    with gw.http() as http:
        assert http.get("/admin/budgets").json()["error"]["code"] == "admin_off"


def test_every_admin_route_wants_the_token(gw: Gateway) -> None:
    for method, path in ADMIN_ROUTES:
        assert status_of(gw, method, path, token=None) == 401, (method, path)
        assert status_of(gw, method, path, token="wrong-token") == 401, (method, path)
        assert status_of(gw, method, path, token=TOKEN + "x") == 401, (method, path)
    with gw.http() as http:
        body = http.get("/admin/budgets", headers={"Authorization": "Basic " + TOKEN}).json()
        assert body["error"]["code"] == "admin_token_required"
    assert with_cookie(gw, TOKEN) == 401  # the raw token is no session
    assert with_cookie(gw, "") == 401 and with_cookie(gw, "99999999999999999999.abc") == 401
    with gw.http() as http:  # digits that are not ASCII digits
        assert http.get("/admin/budgets", headers={b"Cookie": f"{COOKIE}=²³.x".encode()}).status_code == 401
    assert status_of(gw, "GET", "/admin/budgets") == 200
    assert status_of(gw, "GET", "/admin/no-such-route") == 404


def test_login_sets_an_httponly_strict_session_cookie(gw: Gateway, make_gateway: Callable[..., Gateway]) -> None:
    with gw.http() as http:
        wrong = http.post("/admin/session", json={"token": "nope"})
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        assert http.get("/admin/session").status_code == 401
        login = http.post("/admin/session", json={"token": TOKEN})
        assert login.status_code == 200
        cookie = login.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert "Path=/" in cookie and TOKEN not in cookie and "Secure" not in cookie
        assert http.get("/admin/session").json()["authenticated"] is True
        assert http.get("/admin/budgets").status_code == 200  # the client now sends the cookie
        value = http.cookies[COOKIE]
        assert http.delete("/admin/session").status_code == 200
        assert http.get("/admin/budgets").status_code == 401
    with gw.http() as http:  # behind a TLS proxy the cookie is Secure
        proxied = http.post("/admin/session", json={"token": TOKEN}, headers={"X-Forwarded-Proto": "https"})
        assert "Secure" in proxied.headers["set-cookie"]
        live = http.cookies[COOKIE]
    assert with_cookie(gw, value) == 401  # signed out: the cookie is dead, even where it was kept
    session, _, mac = live.partition(".")
    assert with_cookie(gw, f"{session}.{mac[::-1]}") == 401  # a forged signature
    assert with_cookie(gw, live) == 200
    other = make_gateway(store_url=gw.store_url, admin_token="a-new-token")
    assert with_cookie(other, live) == 401  # a changed admin token ends every session


# --- budgets: every key, user and property value, closest to its limit first ----------------------


def traffic(gw: Gateway) -> tuple[str, str]:
    """Two keys; acme's users and orgs at distinct usage ratios. Returns the keys' ids."""
    acme = gw.openai(gw.key("acme"), **{POLICY: "10;w=60, 5;w=3600;s=user, 8;w=600;s=org"})
    for user, org, calls in (("alice", "red", 4), ("bob", "blue", 1), ("carol", "red", 2)):
        for _ in range(calls):
            assert chat(acme, **{"Helicone-User-Id": user, "Helicone-Property-Org": org}) == 200
    beta = gw.openai(gw.key("beta"), **{POLICY: "3;w=60"})
    assert chat(beta) == 200
    ids = {k["name"]: k["id"] for k in admin(gw, "GET", "/admin/keys")["keys"]}
    return ids["acme"], ids["beta"]


EXPECTED = [
    ("acme", "user", "alice", 4, 5),  # 0.8
    ("acme", "org", "red", 6, 8),  # 0.75
    ("acme", None, None, 7, 10),  # 0.7
    ("acme", "user", "carol", 2, 5),  # 0.4
    ("beta", None, None, 1, 3),  # 0.33
    ("acme", "user", "bob", 1, 5),  # 0.2
    ("acme", "org", "blue", 1, 8),  # 0.125
]


def test_budgets_sorted_by_closeness_to_the_limit(gw: Gateway) -> None:
    traffic(gw)
    data = admin(gw, "GET", "/admin/budgets")
    assert rows(data) == EXPECTED
    assert data["has_more"] is False
    first = data["budgets"][0]
    assert first["ratio"] == 0.8 and first["unit"] == "request" and first["window"] == 3600
    assert first["policy"] == "5;w=3600;s=user" and first["segment_kind"] == "user"
    assert first["last_denied_at"] is None
    assert data["budgets"][1]["segment_kind"] == "property" and data["budgets"][2]["segment_kind"] == "global"


def test_budgets_filters(gw: Gateway) -> None:
    acme_id, beta_id = traffic(gw)

    def query(**params: str) -> list[tuple[str, str | None, str | None, float, float]]:
        return rows(admin(gw, "GET", "/admin/budgets", params=params))

    assert query(key="acme") == [r for r in EXPECTED if r[0] == "acme"]
    assert query(key=acme_id) == query(key="acme")
    assert query(key=beta_id) == [("beta", None, None, 1, 3)]
    assert query(segment="user") == [r for r in EXPECTED if r[1] == "user"]
    assert query(segment="ORG") == [("acme", "org", "red", 6, 8), ("acme", "org", "blue", 1, 8)]
    assert query(segment="property:org") == query(segment="org")
    assert query(segment="global") == [("acme", None, None, 7, 10), ("beta", None, None, 1, 3)]
    assert query(segment="global", key="beta") == [("beta", None, None, 1, 3)]
    assert query(value="red") == [("acme", "org", "red", 6, 8)]
    assert query(key="acme", segment="user", value="bob") == [("acme", "user", "bob", 1, 5)]
    assert query(segment="user", value="nobody") == []


def test_budgets_paging(gw: Gateway) -> None:
    traffic(gw)
    pages = [admin(gw, "GET", "/admin/budgets", params={"limit": 2, "offset": o}) for o in (0, 2, 4, 6)]
    assert [rows(p) for p in pages] == [EXPECTED[0:2], EXPECTED[2:4], EXPECTED[4:6], EXPECTED[6:]]
    assert [p["has_more"] for p in pages] == [True, True, True, False]
    globals_page = admin(gw, "GET", "/admin/budgets", params={"segment": "global", "limit": 1, "offset": 1})
    assert rows(globals_page) == [("beta", None, None, 1, 3)] and globals_page["has_more"] is False


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"limit": "0"}, 400, "invalid_parameter"),
        ({"limit": "501"}, 400, "invalid_parameter"),
        ({"offset": "-1"}, 400, "invalid_parameter"),
        ({"limit": "ten"}, 400, "invalid_parameter"),
        ({"limit": "²"}, 400, "invalid_parameter"),
        ({"sort": "name"}, 400, "invalid_sort"),
        ({"segment": "a b"}, 400, "invalid_segment"),
        ({"key": "no-such-key"}, 404, "unknown_key"),
    ],
)
def test_budgets_bad_parameters(gw: Gateway, params: dict[str, str], status: int, code: str) -> None:
    with gw.http() as http:
        response = http.get("/admin/budgets", params=params, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == status and response.json()["error"]["code"] == code


def test_a_denied_user_rises_to_the_top_and_is_listed(gw: Gateway, clock: FakeClock) -> None:
    traffic(gw)
    acme = gw.openai(gw.key("gamma"), **{POLICY: "2;w=60;s=user"})
    assert [chat(acme, **{"Helicone-User-Id": "dave"}) for _ in range(3)] == [200, 200, 429]
    top = admin(gw, "GET", "/admin/budgets")["budgets"][0]
    assert (top["key_name"], top["value"], top["used"], top["ratio"]) == ("gamma", "dave", 2, 1.0)
    assert top["last_denied_at"] == clock.now
    denials = admin(gw, "GET", "/admin/denials")["denials"]
    assert len(denials) == 1
    assert denials[0] | {"at": 0} == {
        "at": 0,
        "key_id": top["key_id"],
        "key_name": "gamma",
        "policy": "2;w=60;s=user",
        "segment": "user",
        "segment_kind": "user",
        "value": "dave",
    }


def test_denials_newest_first_with_a_limit(gw: Gateway, clock: FakeClock) -> None:
    client = gw.openai(gw.key("acme"), **{POLICY: "1;w=60;s=user"})
    for user in ("u1", "u2", "u3"):
        assert [chat(client, **{"Helicone-User-Id": user}) for _ in range(2)] == [200, 429]
        clock.advance(1)
    assert [d["value"] for d in admin(gw, "GET", "/admin/denials")["denials"]] == ["u3", "u2", "u1"]
    assert [d["value"] for d in admin(gw, "GET", "/admin/denials", params={"limit": 2})["denials"]] == ["u3", "u2"]
    assert status_of(gw, "GET", "/admin/denials?limit=x") == 400


def test_cents_budgets_in_cents(gw: Gateway) -> None:
    client = gw.openai(gw.key("spend"), **{POLICY: "0.5;w=3600;u=cents;s=user", "Helicone-User-Id": "ann"})
    assert chat(client) == 200
    budget = admin(gw, "GET", "/admin/budgets")["budgets"][0]
    assert (budget["unit"], budget["quota"], budget["quota_text"]) == ("cents", 0.5, "0.5")
    assert 0 < budget["used"] < 0.5 and budget["held"] == 0
    assert budget["ratio"] == pytest.approx(budget["used"] / 0.5, abs=1e-4)


def test_idle_budgets_leave_the_list_with_their_window(gw: Gateway, clock: FakeClock) -> None:
    client = gw.openai(gw.key("acme"), **{POLICY: "5;w=60;s=user", "Helicone-User-Id": "ann"})
    assert chat(client) == 200
    assert [(b["value"], b["used"]) for b in admin(gw, "GET", "/admin/budgets")["budgets"]] == [("ann", 1)]
    clock.advance(59)  # still inside the window: the call still counts
    assert [(b["value"], b["used"]) for b in admin(gw, "GET", "/admin/budgets")["budgets"]] == [("ann", 1)]
    clock.advance(2)  # the window has passed: nothing is used any more, and the budget is not listed
    assert admin(gw, "GET", "/admin/budgets")["budgets"] == []


# --- stats ----------------------------------------------------------------------------------------


def test_stats_count_allowed_denied_and_rejected(gw: Gateway) -> None:
    before = admin(gw, "GET", "/admin/stats")
    assert before["step"] == 10 and len(before["series"]) == 90
    starts = [p["t"] for p in before["series"]]
    assert starts == sorted(starts) and starts[1] - starts[0] == 10
    client = gw.openai(gw.key("acme"), **{POLICY: "2;w=60"})
    assert [chat(client) for _ in range(3)] == [200, 200, 429]
    assert chat(gw.openai("qg_000000000000_wrong")) == 401
    after = admin(gw, "GET", "/admin/stats")
    grown = {k: after["window_totals"][k] - before["window_totals"][k] for k in ("allowed", "denied", "rejected")}
    assert grown == {"allowed": 2, "denied": 1, "rejected": 1}


def test_request_history_buckets() -> None:
    now = [1000.0]
    totals = {"allowed": 5.0, "denied": 1.0, "rejected": 0.0}  # counted before the history began
    history = RequestHistory(step=10, span=4, totals=lambda: dict(totals), clock=lambda: now[0])
    totals["allowed"] += 3
    now[0] = 1012
    totals["denied"] += 2
    history.sample()
    totals["allowed"] += 1
    now[0] = 1025
    series = history.series()
    assert [p["t"] for p in series] == [990, 1000, 1010, 1020]
    assert [(p["allowed"], p["denied"]) for p in series] == [(None, None), (0, 0), (3, 2), (1, 0)]
    now[0] = 1085  # long after: older marks are dropped but the last one stays the baseline
    totals["allowed"] += 4
    series = history.series()
    assert [p["allowed"] for p in series] == [0, 0, 0, 4]
    assert len(history.marks) <= 6


# --- keys -----------------------------------------------------------------------------------------


def test_keys_create_list_revoke(gw: Gateway, upstream: FakeUpstream) -> None:
    created = admin(gw, "POST", "/admin/keys", json={"name": "web", "policies": ["2;W=60 ;s=User"]})
    assert created["key"].startswith("qg_") and created["policies"] == "2;w=60;s=user" and created["active"]
    client = gw.openai(created["key"])
    assert [chat(client, **{"Helicone-User-Id": "ann"}) for _ in range(3)] == [200, 200, 429]
    listed = admin(gw, "GET", "/admin/keys")["keys"]
    assert [(k["name"], k["id"], k["active"]) for k in listed] == [("web", created["id"], True)]
    assert set(listed[0]) == {"id", "name", "policies", "created_at", "revoked_at", "active"}  # never a secret
    assert status_of(gw, "POST", "/admin/keys", json={"name": "web"}) == 409
    assert status_of(gw, "POST", "/admin/keys", json={"name": "x", "policies": ["5;w=5"]}) == 400
    assert status_of(gw, "POST", "/admin/keys", json={"name": "  "}) == 400
    assert status_of(gw, "POST", "/admin/keys", content=b"name=web") == 415  # JSON only
    assert status_of(gw, "POST", "/admin/keys", json=["web"]) == 400
    assert status_of(gw, "POST", "/admin/keys", json={"name": "x", "policies": [1]}) == 400
    revoked = admin(gw, "DELETE", "/admin/keys/web")
    assert revoked["active"] is False and revoked["revoked_at"] is not None
    assert chat(client, **{"Helicone-User-Id": "bob"}) == 401
    assert status_of(gw, "DELETE", f"/admin/keys/{created['id']}") == 409
    assert status_of(gw, "DELETE", "/admin/keys/nobody") == 404
    assert admin(gw, "GET", "/admin/keys")["keys"][0]["active"] is False
    assert upstream.count() == 2


# --- the page and its assets ----------------------------------------------------------------------


def test_the_admin_api_s_root_lists_its_routes(gw: Gateway) -> None:
    for path in ("/admin", "/admin/"):
        index = admin(gw, "GET", path)
        assert index["routes"]["budgets"] == "GET /admin/budgets"
        assert index["routes"]["denials"] == "GET /admin/denials"
        assert index["dashboard"] == "/dashboard"
        assert status_of(gw, "GET", path, token=None) == 401
        assert status_of(gw, "GET", path, token="wrong-token") == 401


def test_the_dashboard_page_is_behind_the_admin_token(gw: Gateway) -> None:
    """Without the token or a session the page is a 401 (its body the sign-in form, which a browser
    shows); with the bearer token or a session cookie, a 200."""
    with gw.http() as http:
        for headers in ({}, {"Authorization": "Bearer wrong-token"}):
            page = http.get("/dashboard", headers=headers)
            assert page.status_code == 401 and page.headers["content-type"].startswith("text/html")
            assert 'id="login' in page.text and "script-src 'self'" in page.headers["content-security-policy"]
        assert http.get("/dashboard/", headers={"Authorization": "Bearer wrong-token"}).status_code == 401
        assert http.get("/dashboard", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        signed_in = http.post("/admin/session", json={"token": TOKEN})
        assert signed_in.status_code == 200 and COOKIE in http.cookies
        assert http.get("/dashboard").status_code == 200
        assert http.get("/dashboard/").status_code == 200
        http.cookies.clear()
        http.cookies.set(COOKIE, "99999999999999999999.abc")
        assert http.get("/dashboard").status_code == 401


def test_dashboard_page_and_assets(gw: Gateway) -> None:
    with gw.http() as http:
        page = http.get("/dashboard", headers={"Authorization": f"Bearer {TOKEN}"})
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert 'src="/dashboard/app.js"' in page.text and "/dashboard/app.css" in page.text
        for asset, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
            response = http.get(f"/dashboard/{asset}")
            assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
            assert len(response.content) > 1000
        assert http.get("/dashboard/missing.js").status_code == 404
        assert http.get("/dashboard/..%2Fadmin.py").status_code == 404
        assert http.get("/dashboard/dashboard.py").status_code == 404
