"""The policy header at the HTTP boundary: every kind of malformed policy is a 400 that names the
problem and shows the grammar, and nothing reaches the upstream."""

from __future__ import annotations

from collections.abc import Callable

import openai
import pytest

from quotagate.fake_upstream import FakeUpstream

from .conftest import Gateway

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

MALFORMED = {
    "empty item": ("1;w=60,", "empty policy"),
    "only separators": (";;", "missing quota"),
    "no quota": ("w=60", "not a plain number"),
    "no window": ("10", "missing required parameter w"),
    "window too short": ("10;w=59", "outside 60..31536000"),
    "window too long": ("10;w=31536001", "outside 60..31536000"),
    "fractional window": ("10;w=90.5", "not a whole number"),
    "zero quota": ("0;w=60", "greater than 0"),
    "negative quota": ("-5;w=60", "not a plain number"),
    "exponent quota": ("1e2;w=60", "not a plain number"),
    "unknown unit": ("10;w=60;u=dollars", "unknown unit"),
    "unknown parameter": ("10;w=60;x=1", "unknown parameter"),
    "duplicate parameter": ("10;w=60;u=cents;u=token", "duplicate parameter"),
    "bad segment": ("10;w=60;s=org/name", "segment"),
    "empty parameter": ("10;w=60;", "empty parameter"),
    "valueless parameter": ("10;w", "not name=value"),
    "quota too large to count exactly": ("10000000000000;w=120;u=cents", "too large"),
    "one bad among good": ("10;w=60, 5;w=5", "outside 60..31536000"),
}


@pytest.mark.parametrize("policy,problem", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_policy_is_400_and_nothing_reaches_upstream(
    gateway: Gateway, upstream: FakeUpstream, policy: str, problem: str
) -> None:
    key = gateway.key()
    with gateway.http() as http:
        response = http.post(
            "/v1/chat/completions",
            json=BODY,
            headers={"Helicone-Auth": f"Bearer {key}", "Helicone-RateLimit-Policy": policy},
        )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_rate_limit_policy" and error["type"] == "invalid_request_error"
    assert problem in error["message"] and problem in error["problem"]
    assert "w=[time_window]" in error["grammar"]
    assert upstream.count() == 0


def test_sdk_sees_a_bad_request_error(gateway: Gateway, upstream: FakeUpstream) -> None:
    client = gateway.openai(gateway.key(), **{"Helicone-RateLimit-Policy": "10;w=10"})
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**BODY)  # type: ignore[call-overload]
    assert "outside 60..31536000" in info.value.message
    assert upstream.count() == 0


@pytest.mark.parametrize(
    ("policy", "headers", "missing"),
    [
        ("10;w=60;s=user", {}, "Helicone-User-Id"),
        ("10;w=60;s=user", {"Helicone-User-Id": ""}, "Helicone-User-Id"),
        ("10;w=60;s=org", {}, "Helicone-Property-org"),
        ("10;w=60;s=org", {"Helicone-Property-Org": ""}, "Helicone-Property-org"),
        ("10;w=60;s=org", {"Helicone-Property-Team": "x"}, "Helicone-Property-org"),
    ],
)
def test_missing_segment_value_is_400(
    gateway: Gateway, upstream: FakeUpstream, policy: str, headers: dict[str, str], missing: str
) -> None:
    key = gateway.key()
    with gateway.http() as http:
        response = http.post(
            "/v1/chat/completions",
            json=BODY,
            headers={"Helicone-Auth": f"Bearer {key}", "Helicone-RateLimit-Policy": policy, **headers},
        )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "missing_segment_value" and error["type"] == "invalid_request_error"
    assert missing in error["message"] and missing in error["problem"]
    assert "w=[time_window]" in error["message"] and "w=[time_window]" in error["grammar"]  # SPEC §2
    assert upstream.count() == 0


def test_non_json_body_has_no_user(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.key()
    with gateway.http() as http:
        response = http.post(
            "/v1/chat/completions",
            content=b'{"user": "trunc',
            headers={"Helicone-Auth": f"Bearer {key}", "Helicone-RateLimit-Policy": "5;w=60;s=user"},
        )
    assert response.status_code == 400 and response.json()["error"]["code"] == "missing_segment_value"
    assert upstream.count() == 0


def test_authentication_comes_before_policy_errors(gateway: Gateway, upstream: FakeUpstream) -> None:
    with gateway.http() as http:
        response = http.post(
            "/v1/chat/completions",
            json=BODY,
            headers={"Helicone-Auth": "Bearer qg_unknown", "Helicone-RateLimit-Policy": "bad"},
        )
    assert response.status_code == 401
    assert upstream.count() == 0


def test_empty_header_means_no_policy(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.key()
    with gateway.http() as http:
        response = http.post(
            "/v1/chat/completions",
            json=BODY,
            headers={"Helicone-Auth": f"Bearer {key}", "Helicone-RateLimit-Policy": ""},
        )
    assert response.status_code == 200 and "helicone-ratelimit-limit" not in response.headers
    assert upstream.count() == 1


def test_several_header_lines_are_one_list(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.key()
    headers = [
        ("Helicone-Auth", f"Bearer {key}"),
        ("Helicone-RateLimit-Policy", "5;w=60"),
        ("Helicone-RateLimit-Policy", "1;w=3600"),
    ]
    with gateway.http() as http:
        first = http.post("/v1/chat/completions", json=BODY, headers=headers)
        second = http.post("/v1/chat/completions", json=BODY, headers=headers)
    assert (first.status_code, second.status_code) == (200, 429)
    assert first.headers["ratelimit-policy"] == '"p1";q=5;w=60, "p2";q=1;w=3600'
    assert second.headers["helicone-ratelimit-policy"] == "1;w=3600"
    assert upstream.count() == 1


def test_header_policy_is_normalised_in_the_response(gateway: Gateway) -> None:
    key = gateway.key()
    with gateway.http() as http:
        response = http.post(
            "/v1/chat/completions",
            json=BODY,
            headers={
                "Helicone-Auth": f"Bearer {key}",
                "Helicone-RateLimit-Policy": "10.50 ; S=Team ; W = 120",
                "Helicone-Property-Team": "red",
            },
        )
    assert response.status_code == 200
    assert response.headers["helicone-ratelimit-policy"] == "10.5;w=120;s=team"
    assert response.headers["helicone-ratelimit-limit"] == "10.5"
    assert response.headers["helicone-ratelimit-remaining"] == "9"


def test_ietf_headers_name_policies_in_the_order_given(make_gateway: Callable[..., Gateway]) -> None:
    """p1, p2, ... follow the header's order, then the key's, also where policies share a counter
    (10;w=60 and 20;w=60 and the key's 100;w=60 are one counter, listed apart)."""
    gateway = make_gateway()
    key = gateway.key(policies=["100;w=60"])
    with gateway.http() as http:
        response = http.post(
            "/v1/chat/completions",
            json=BODY,
            headers={"Helicone-Auth": f"Bearer {key}", "Helicone-RateLimit-Policy": "10;w=60, 5;w=3600, 20;w=60"},
        )
    assert response.status_code == 200
    assert response.headers["ratelimit-policy"] == ('"p1";q=10;w=60, "p2";q=5;w=3600, "p3";q=20;w=60, "p4";q=100;w=60')
    assert response.headers["ratelimit"] == '"p1";r=9;t=60, "p2";r=4;t=3600, "p3";r=19;t=60, "p4";r=99;t=60'
    assert response.headers["helicone-ratelimit-policy"] == "5;w=3600"
