"""Numbers of any length, wherever a client or an operator types one: a clear 400/401 or a CLI
usage error, never a 500 or a traceback (Python refuses int() of more than 4,300 digits, SQLite
integers above 2**63)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from quotagate.admin import COOKIE
from quotagate.policy import MAX_WINDOW, MIN_WINDOW, PolicyError, parse_policy

from .conftest import CHAT, POLICY, Gateway, cli

TOKEN = "numbers-admin-token"
LONG = "1" * 5000
ANY_DIGITS = st.one_of(
    st.integers(0, 10**20).map(str),
    st.text(alphabet="0123456789", min_size=1, max_size=60),
    st.tuples(st.integers(1, 6000), st.sampled_from("0123456789")).map(lambda t: t[1] * t[0]),  # long runs
    st.tuples(st.integers(0, 6000), st.integers(0, 10**9)).map(lambda t: "0" * t[0] + str(t[1])),  # zeros first
)


def value_of(digits: str) -> int | None:
    """The digits' value when it has at most 20 digits (leading zeros aside), else None."""
    significant = digits.lstrip("0") or "0"
    return int(significant) if len(significant) <= 20 else None


SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@given(digits=ANY_DIGITS)
@settings(max_examples=300, deadline=None)
def test_any_digit_string_as_a_window_parses_or_is_a_policy_error(digits: str) -> None:
    value = value_of(digits)
    in_range = value is not None and MIN_WINDOW <= value <= MAX_WINDOW
    try:
        policy = parse_policy(f"10;w={digits}")
    except PolicyError as exc:
        assert "window" in str(exc) and not in_range
        return
    assert in_range and policy.window == value


@given(digits=ANY_DIGITS)
@settings(max_examples=200, deadline=None)
def test_any_digit_string_as_a_quota_parses_or_is_a_policy_error(digits: str) -> None:
    try:
        policy = parse_policy(f"{digits}.{digits};w=60")
    except PolicyError as exc:
        assert "quota" in str(exc) and len(str(exc)) < 600
        return
    assert policy.quota > 0


def test_a_5000_digit_window_is_a_400_and_reaches_nothing(gateway: Gateway) -> None:
    key = gateway.key()
    with gateway.http() as http:
        for policy in (f"10;w={LONG}", f"{LONG};w=60", f"10;w={'0' * 5000}6", f"10;w=60, 5;w={LONG};s=user"):
            response = http.post(
                "/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": CHAT},
                headers={"Helicone-Auth": f"Bearer {key}", POLICY: policy},
            )
            assert response.status_code == 400, (policy[:40], response.text[:300])
            assert response.json()["error"]["code"] == "invalid_rate_limit_policy"


def test_keys_create_with_a_5000_digit_window_is_a_usage_error(sqlite_url: str) -> None:
    result = cli("keys", "create", "--name", "x", "--policy", f"1;w={LONG}", "--store", sqlite_url, check=False)
    assert result.returncode == 2, result.stderr[-500:]
    assert "Traceback" not in result.stderr and "window" in result.stderr
    assert "x" not in cli("keys", "list", "--store", sqlite_url).stdout.split()


# --- the admin API: paging parameters and the session cookie --------------------------------------


@pytest.fixture
def admin_gw(make_gateway: Callable[..., Gateway], store_url: str) -> Gateway:
    return make_gateway(store_url=store_url, admin_token=TOKEN)


def admin_get(gw: Gateway, path: str, **params: str) -> tuple[int, dict]:
    with gw.http() as http:
        response = http.get(path, params=params, headers={"Authorization": f"Bearer {TOKEN}"})
    return response.status_code, response.json()


@pytest.mark.parametrize(
    "params",
    [{"limit": LONG}, {"offset": LONG}, {"offset": str(2**63)}, {"offset": str(2**64 + 5)}, {"limit": "0" * 5000}],
)
def test_paging_numbers_of_any_length_are_a_400(admin_gw: Gateway, params: dict[str, str]) -> None:
    status, body = admin_get(admin_gw, "/admin/budgets", **params)
    assert status == 400 and body["error"]["code"] == "invalid_parameter", body
    assert len(body["error"]["message"]) < 300  # the message does not echo 5,000 digits


def test_denials_limit_of_any_length_is_a_400(admin_gw: Gateway) -> None:
    status, body = admin_get(admin_gw, "/admin/denials", limit=LONG)
    assert status == 400 and body["error"]["code"] == "invalid_parameter"


@SLOW
@given(limit=ANY_DIGITS, offset=ANY_DIGITS)
def test_any_digit_strings_as_limit_and_offset(admin_gw: Gateway, limit: str, offset: str) -> None:
    assume(len(limit) + len(offset) < 8000)  # a longer request line is the HTTP parser's own 400
    status, body = admin_get(admin_gw, "/admin/budgets", limit=limit, offset=offset)
    wanted, skipped = value_of(limit), value_of(offset)
    fits = wanted is not None and skipped is not None and 1 <= wanted <= 500 and skipped <= 10**9
    assert status == (200 if fits else 400), (limit[:20], offset[:20], body)


@SLOW
@given(expiry=ANY_DIGITS, mac=st.from_regex(r"[0-9a-f]{0,64}", fullmatch=True))
def test_any_session_cookie_is_a_401(admin_gw: Gateway, expiry: str, mac: str) -> None:
    with admin_gw.http() as http:
        http.cookies.set(COOKIE, f"{expiry}.{mac}")
        assert http.get("/admin/budgets").status_code == 401
        assert http.get("/admin/session").status_code == 401


def test_a_5000_digit_cookie_beside_the_bearer_token(admin_gw: Gateway) -> None:
    with admin_gw.http() as http:
        http.cookies.set(COOKIE, f"{LONG}.abc")
        response = http.get("/admin/session", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200 and response.json()["authenticated"] is True


# --- the operator's numbers: flags, environment, config file --------------------------------------


@pytest.mark.parametrize(
    ("line", "named"),
    [
        (f"port = {LONG}", "quotagate.toml"),
        ("port = 1e999", "port"),
        ("port = 99999", "port"),
        ("workers = 100000000000000000000", "workers"),
        ("upstream_timeout = nan", "upstream_timeout"),
        ("connect_timeout = inf", "connect_timeout"),
        ("max_body_bytes = 0", "max_body_bytes"),
        (f"default_max_tokens = {'9' * 40}", "default_max_tokens"),
        ('[prices.my-model]\ninput_mtok = "1e999999999"\noutput_mtok = 1', "my-model"),
        ("[prices.my-model]\ninput_mtok = nan\noutput_mtok = 1", "my-model"),
    ],
)
def test_config_file_numbers_are_checked_at_load(tmp_path: Path, sqlite_url: str, line: str, named: str) -> None:
    config = tmp_path / "quotagate.toml"
    config.write_text(line + "\n")
    result = cli("serve", "--config", str(config), "--store", sqlite_url, check=False)
    assert result.returncode == 2, (line[:60], result.stdout[-300:], result.stderr[-800:])
    assert "Traceback" not in result.stderr and named in result.stderr


@pytest.mark.parametrize(
    "args",
    [("--port", LONG), ("--port", "70000"), ("--workers", "0"), ("--upstream-timeout", "nan"), ("--workers", LONG)],
)
def test_serve_flags_are_checked_at_load(sqlite_url: str, args: tuple[str, str]) -> None:
    result = cli("serve", *args, "--store", sqlite_url, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-500:]


def test_a_store_url_with_a_5000_digit_port(sqlite_url: str) -> None:
    url = f"redis://127.0.0.1:{LONG}/0"
    for args in (("serve", "--store", url), ("keys", "list", "--store", url)):
        result = cli(*args, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-500:]
    usage = cli("usage", "--store", url, check=False)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr + usage.stdout


def test_usage_interval_must_be_finite(sqlite_url: str) -> None:
    for value in ("nan", "inf", LONG):
        result = cli("usage", "--store", sqlite_url, "--watch", "--interval", value, check=False)
        assert result.returncode == 2 and "--interval" in result.stderr, (value[:10], result.stderr[-300:])
