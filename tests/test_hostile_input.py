"""Bad input at the HTTP boundary: every case gets a clear JSON error (or is served), never a 500,
and no two budgets collide whatever the characters in a user id or property value."""

from __future__ import annotations

import socket
from collections.abc import Callable

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotagate.fake_upstream import FakeUpstream

from .conftest import CHAT, POLICY, Gateway, post_head

BODY = {"model": "gpt-4o-mini", "messages": CHAT, "max_tokens": 2}


def raw_request(gateway: Gateway, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes as they are (headers httpx would refuse to send) and read the status and body."""
    port = int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        status = int(data.split(b" ", 2)[1])
        head_end = data.index(b"\r\n\r\n") + 4
        length = next(
            (
                int(line.split(b":")[1])
                for line in data[:head_end].split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        while len(data) < head_end + length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return status, data[head_end:]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policy=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60))
def test_any_printable_policy_header_is_served_or_refused_never_a_500(gateway: Gateway, policy: str) -> None:
    if not gateway.keys:  # one key for every example
        gateway.keys.append(gateway.key())
    key = gateway.keys[0]
    with gateway.http() as http:
        response = http.post(
            "/v1/chat/completions", json=BODY, headers={"Helicone-Auth": f"Bearer {key}", POLICY: policy.strip()}
        )
    assert response.status_code in (200, 400, 429)
    if response.status_code == 400:
        assert response.json()["error"]["code"] in ("invalid_rate_limit_policy", "missing_segment_value")


@pytest.mark.parametrize("value", [b"1;w=60\x01", b"\x7f", b"a\x00b"])
def test_control_characters_in_headers_are_a_400(gateway: Gateway, upstream: FakeUpstream, value: bytes) -> None:
    key, body = gateway.key(), orjson.dumps(BODY)
    status, _ = raw_request(gateway, post_head(key, body, POLICY.encode() + b": " + value), body)
    assert status == 400
    assert upstream.count() == 0


# what the provider (the fake one, as the real ones) answers a body it cannot parse as JSON
PROVIDER_PARSE_ERROR = {
    "error": {
        "message": "We could not parse the JSON body of your request.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
}


@pytest.mark.parametrize(
    ("body", "provider_status"),
    [
        (b"not json at all", 400),
        (b'{"model": "gpt-4o", "user": "trunc', 400),
        (b"[1, 2, 3]", 200),  # JSON, if not an object: the fake provider answers it
        (b'"just a string"', 200),
        (b"", 200),
        (b"\xff\xfe\x00garbage", 400),
    ],
)
def test_bodies_that_are_not_json_objects_have_no_user(
    gateway: Gateway, upstream: FakeUpstream, body: bytes, provider_status: int
) -> None:
    key = gateway.key()
    status, payload = raw_request(gateway, post_head(key, body, f"{POLICY}: 5;w=60;s=user".encode()), body)
    assert status == 400 and orjson.loads(payload)["error"]["code"] == "missing_segment_value"
    # without a segment it is forwarded as it is, and the provider's answer comes back as it is
    status, payload = raw_request(gateway, post_head(key, body, f"{POLICY}: 5;w=60".encode()), body)
    assert status == provider_status
    if provider_status == 400:
        assert orjson.loads(payload) == PROVIDER_PARSE_ERROR
    assert [r.body for r in upstream.received] == [body]


@pytest.mark.parametrize(
    ("depth", "status", "code"),
    [
        (50, 200, None),  # parsed and metered: forwarded
        (900, 400, "invalid_body"),  # JSON the provider reads, but too deep to meter: refused
        (1500, 400, "missing_segment_value"),  # beyond the JSON parser's depth limit: not JSON, no user
        (100_000, 400, "missing_segment_value"),
    ],
)
def test_deeply_nested_bodies(
    gateway: Gateway, upstream: FakeUpstream, depth: int, status: int, code: str | None
) -> None:
    nested = b"[" * depth + b'"x"' + b"]" * depth
    body = b'{"model": "gpt-4o-mini", "user": "deep", "messages": ' + nested + b"}"
    key = gateway.key()
    head = post_head(key, body, f"{POLICY}: 100000;w=60;u=token;s=user, 10;w=60;u=cents".encode())
    answer, payload = raw_request(gateway, head, body)
    assert answer == status
    if code is None:
        assert orjson.loads(payload)["object"] == "chat.completion" and upstream.count() == 1
    else:
        assert orjson.loads(payload)["error"]["code"] == code and upstream.count() == 0


def test_huge_body_without_content_length_is_413(make_gateway: Callable[..., Gateway], upstream: FakeUpstream) -> None:
    gateway = make_gateway(max_body_bytes=10_000)
    key = gateway.key()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n"
        + f"Helicone-Auth: Bearer {key}\r\n".encode()
    )
    chunk = b"x" * 4096
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5)) + b"0\r\n\r\n"
    status, payload = raw_request(gateway, head, body)
    assert status == 413 and orjson.loads(payload)["error"]["code"] == "request_too_large"
    assert upstream.count() == 0


def test_very_long_and_unicode_user_ids(gateway: Gateway, upstream: FakeUpstream) -> None:
    key, body = gateway.key(), orjson.dumps(BODY)
    users = ["x" * 20_000, "x" * 20_001, "Zoë 🚀", "Zoe"]
    statuses = []
    for user in users * 2:
        head = post_head(key, body, f"{POLICY}: 1;w=60;s=user".encode(), b"Helicone-User-Id: " + user.encode())
        statuses.append(raw_request(gateway, head, body)[0])
    assert statuses == [200] * 4 + [429] * 4  # four distinct budgets, one request each
    head = post_head(key, body, b"Helicone-User-Id: " + b"y" * 100_000)
    assert raw_request(gateway, head, body)[0] in (400, 431)  # over the header size limit
    assert upstream.count() == 4


METACHARACTERS = [
    "x" * 200,
    "x" * 201,
    "a:b",
    "a",
    "a:b:c",
    "{x}",
    "x}",
    "{",
    "*",
    "?",
    "a*?",
    "a\nb",
    "a\r\nb",
    "",
    " ",
    "%",
    "a b",
]


def test_store_metacharacters_never_collide_two_budgets(
    make_gateway: Callable[..., Gateway], store_url: str, upstream: FakeUpstream
) -> None:
    gateway = make_gateway(store_url=store_url)
    key = gateway.key()
    client = gateway.openai(key, **{POLICY: "1;w=60;s=user"})
    distinct = [u for u in METACHARACTERS if u.strip()]
    for user in distinct:  # through the body's `user`, which may hold any character
        client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, user=user)
    assert upstream.count() == len(distinct)
    if store_url.startswith("redis"):
        assert_keys_stay_in_their_hash_slot(store_url)


def assert_keys_stay_in_their_hash_slot(url: str) -> None:
    nodes = [url.split("+cluster")[0] + url.split("+cluster")[1]] if "+cluster" in url else [url]
    client = redis.RedisCluster.from_url(nodes[0]) if "+cluster" in url else redis.Redis.from_url(url)
    keys = [k.decode() for k in client.scan_iter("qg:{*", count=1000)]
    assert keys
    for name in keys:
        tag = name[name.index("{") + 1 : name.index("}")]
        assert "{" not in tag and "\n" not in tag and name.count("}") == 1, name
