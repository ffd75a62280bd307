"""The migration switch (`--on-policy-error ignore`, SPEC §2): a header policy that is malformed, or
whose segment value the request lacks, is left out as Helicone leaves it out; the valid header
policies and every key-bound policy still hold, and the response says what was left out.

Through the official SDKs, on every store; Helicone's own documentation examples as it prints them.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable

import anthropic
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotagate.fake_upstream import FakeUpstream

from .conftest import CHAT, CLAUDE, POLICY, FakeClock, Gateway
from .test_metrics import grew, scrape
from .test_policy_properties import invalid_items, policy_texts

INVALID = "invalid_rate_limit_policy"
MISSING = "missing_segment_value"


@pytest.fixture
def migrating(make_gateway: Callable[..., Gateway], store_url: str, clock: FakeClock) -> Gateway:
    """A gateway with `on_policy_error = ignore`, on every store."""
    return make_gateway(store_url=store_url, clock=clock, on_policy_error="ignore")


def call(client: openai.OpenAI, **headers: str) -> tuple[int, dict[str, str]]:
    """One chat completion; (status, headers), errors included."""
    try:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=CHAT, max_tokens=2, extra_headers=headers or None
        )
        return raw.http_response.status_code, dict(raw.headers)
    except openai.APIStatusError as exc:
        return exc.status_code, dict(exc.response.headers)


# --- Helicone's documentation examples --------------------------------------------------------------
# docs/features/advanced-usage/custom-rate-limits.mdx in Helicone/helicone: the curl example (a
# per-user cents policy, and no user id: only an IP property), and the earlier page's SDK example
# (a policy segmented by `ip_address`, and only a `Helicone-Property-IP` header).

DOCS_CURL_BODY = b"""{
    "model": "text-davinci-003",
    "prompt": "How do I enable custom rate limit policies?",
}"""


def test_helicone_docs_curl_example(migrating: Gateway, upstream: FakeUpstream) -> None:
    """s=user with no user id: left out, the call goes on (the provider judges its body)."""
    key = migrating.key()
    headers = {
        "Helicone-Auth": f"Bearer {key}",
        "Content-Type": "application/json",
        "Authorization": "Bearer <YOUR_API_KEY>",
        "Helicone-Property-IP": "111.1.1.1",
        "Helicone-RateLimit-Policy": "10;w=1000;u=cents;s=user",
    }
    with migrating.http() as http:
        response = http.post("/v1/completions", content=DOCS_CURL_BODY, headers=headers)
    assert upstream.count("/v1/completions") == 1  # forwarded: the fake provider, like OpenAI, refuses the body
    assert response.status_code == 400 and "could not parse the JSON" in response.text
    assert response.headers["x-helicone-error"] == MISSING
    assert "helicone-ratelimit-policy" not in response.headers


def test_helicone_docs_sdk_examples(migrating: Gateway, gw: Gateway, upstream: FakeUpstream) -> None:
    """400 by default; with the switch, the policy is left out and the call goes through."""
    examples = [
        ("1000;w=60;s=ip_address", "How do I enable retries?"),
        ("10;w=1000;u=cents;s=user", "How do I set custom rate limits?"),
    ]
    strict = gw.openai(gw.key("strict"))
    for policy, prompt in examples:
        headers = {"Helicone-Property-IP": "111.1.1.1", "Helicone-RateLimit-Policy": policy}
        with pytest.raises(openai.BadRequestError) as info:
            strict.completions.create(model="text-davinci-003", prompt=prompt, extra_headers=headers)
        assert info.value.code == MISSING and "x-helicone-error" not in info.value.response.headers
    assert upstream.count() == 0
    client = migrating.openai(migrating.key())
    for policy, prompt in examples:
        headers = {"Helicone-Property-IP": "111.1.1.1", "Helicone-RateLimit-Policy": policy}
        create = client.completions.with_raw_response.create
        raw = create(model="text-davinci-003", prompt=prompt, extra_headers=headers)
        assert raw.http_response.status_code == 200 and raw.parse().choices[0].text
        assert raw.headers["x-helicone-error"] == MISSING
        assert "ratelimit-policy" not in raw.headers
    assert upstream.count("/v1/completions") == 2


# --- what is left out, what still holds -------------------------------------------------------------


def test_valid_neighbours_still_hold(migrating: Gateway, upstream: FakeUpstream) -> None:
    """A typo, a too-short window and a missing property are left out; `2;w=60` still holds."""
    client = migrating.openai(migrating.key(), **{POLICY: "2;w=60, 10;w=5, 5;w=60;s=org, 3;w=60;u=tokens"})
    results = [call(client) for _ in range(3)]
    assert [s for s, _ in results] == [200, 200, 429]
    for _, headers in results[:2]:
        assert headers["x-helicone-error"] == f"{INVALID}, {MISSING}"
        assert headers["ratelimit-policy"] == '"p1";q=2;w=60'
        assert headers["helicone-ratelimit-policy"] == "2;w=60"
    assert [h["helicone-ratelimit-remaining"] for _, h in results] == ["1", "0", "0"]
    denied = results[2][1]
    assert denied["x-helicone-error"] == "rate_limited"  # a 429 says what SDKs and Helicone clients look for
    assert int(denied["retry-after"]) > 0
    assert upstream.count() == 2


def test_key_bound_policies_are_never_left_out(
    migrating: Gateway, upstream: FakeUpstream, make_gateway: Callable[..., Gateway]
) -> None:
    key = migrating.key("bound", ["100;w=86400;s=user", "2;w=60"])
    client = migrating.openai(key, **{POLICY: "1;w=60;s=team"})
    with pytest.raises(openai.BadRequestError) as info:  # no user id: the key's s=user policy needs one
        client.chat.completions.create(model="gpt-4o-mini", messages=CHAT)
    assert info.value.code == MISSING and "100;w=86400;s=user" in info.value.message
    assert upstream.count() == 0

    statuses = [call(client, **{"Helicone-User-Id": "alice"}) for _ in range(3)]
    assert [s for s, _ in statuses] == [200, 200, 429]  # the key's 2;w=60 holds; the header's s=team is left out
    assert statuses[0][1]["x-helicone-error"] == MISSING
    assert statuses[0][1]["ratelimit-policy"] == '"p1";q=100;w=86400, "p2";q=2;w=60'
    assert upstream.count() == 2


def test_a_malformed_header_cannot_remove_key_policies(migrating: Gateway, upstream: FakeUpstream) -> None:
    client = migrating.openai(migrating.key("bound", ["1;w=60"]), **{POLICY: "not a policy at all"})
    assert [call(client)[0] for _ in range(2)] == [200, 429]
    assert upstream.count() == 1


def test_both_kinds_and_every_header_line(migrating: Gateway, upstream: FakeUpstream) -> None:
    """Several header lines are one list; empty items, duplicate parameters, unknown units, a
    property absent: each left out alone, every valid item enforced."""
    key = migrating.key()
    headers = [
        ("Helicone-Auth", f"Bearer {key}"),
        (POLICY, "5;w=60, ,10;w=60;u=cents;u=token"),
        (POLICY, ""),
        (POLICY, "1;w=3600;s=user,"),
        (POLICY, "7;w=120;s=Team, 4;w=60;u=dollars, 3000;w=90;U=Token"),
    ]
    body = {"model": "gpt-4o-mini", "messages": CHAT, "max_tokens": 1}
    with migrating.http() as http:
        first = http.post("/v1/chat/completions", json=body, headers=headers)
        second = http.post("/v1/chat/completions", json=body, headers=[*headers, ("Helicone-Property-Team", "red")])
    assert first.status_code == 200
    assert first.headers["x-helicone-error"] == f"{INVALID}, {MISSING}"
    assert first.headers["ratelimit-policy"] == '"p1";q=5;w=60, "p2";q=3000;w=90;qu="tokens"'
    assert second.status_code == 200
    assert second.headers["x-helicone-error"] == f"{INVALID}, {MISSING}"  # the s=user one still lacks a user
    assert second.headers["ratelimit-policy"] == '"p1";q=5;w=60, "p2";q=7;w=120, "p3";q=3000;w=90;qu="tokens"'
    assert upstream.count() == 2


def test_more_than_twenty_items(migrating: Gateway, upstream: FakeUpstream) -> None:
    """At most 20 policies per request: the 20 first items are read, the rest left out."""
    items = [f"{100 + i};w=60" for i in range(19)] + ["1;w=60"] + ["2;w=60", "bad"]
    client = migrating.openai(migrating.key(), **{POLICY: ",".join(items)})
    first, second = call(client), call(client)
    assert (first[0], second[0]) == (200, 429)  # the 20th item, 1;w=60, holds; the 21st, 2;w=60, is left out
    assert first[1]["x-helicone-error"] == INVALID
    assert first[1]["helicone-ratelimit-policy"] == "1;w=60"
    assert first[1]["ratelimit-policy"].count('"p') == 20
    assert upstream.count() == 1


def test_all_left_out_is_no_policy(migrating: Gateway, upstream: FakeUpstream) -> None:
    client = migrating.openai(migrating.key(), **{POLICY: "1;w=10, 1;w=60;s=user"})
    for _ in range(3):
        status, headers = call(client)
        assert status == 200 and headers["x-helicone-error"] == f"{INVALID}, {MISSING}"
        assert "helicone-ratelimit-limit" not in headers
    assert upstream.count() == 3


def test_streams_and_anthropic_say_what_was_left_out(migrating: Gateway, upstream: FakeUpstream) -> None:
    key = migrating.key()
    client = migrating.openai(key, **{POLICY: "3;w=60, 3;w=60;s=user"})
    with client.chat.completions.with_streaming_response.create(model="gpt-4o-mini", messages=CHAT, stream=True) as r:
        assert r.headers["x-helicone-error"] == MISSING and r.headers["helicone-ratelimit-remaining"] == "2"
        assert sum(1 for _ in r.iter_lines()) > 2
    claude = migrating.anthropic(key, **{POLICY: "1;w=60;u=cents, 2;w=60;x=1"})
    raw = claude.messages.with_raw_response.create(model="claude-haiku-4-5", max_tokens=16, messages=CLAUDE)
    assert raw.http_response.status_code == 200 and raw.headers["x-helicone-error"] == INVALID
    assert raw.headers["helicone-ratelimit-policy"] == "1;w=60;u=cents"
    with pytest.raises(anthropic.RateLimitError) as info:  # the cents budget spent: the valid policy holds
        for _ in range(200):
            claude.messages.create(model="claude-haiku-4-5", max_tokens=4000, messages=CLAUDE)
    assert info.value.response.headers["x-helicone-error"] == "rate_limited"


def test_left_out_policies_are_counted(make_gateway: Callable[..., Gateway], upstream: FakeUpstream) -> None:
    gateway = make_gateway(on_policy_error="ignore")
    client = gateway.openai(gateway.key())
    before = scrape(gateway.url)
    call(client, **{POLICY: "5;w=60, 1;w=5"})
    call(client, **{POLICY: "5;w=60, x, 1;w=60;s=user"})
    call(client, **{POLICY: "5;w=60"})
    after = scrape(gateway.url)
    assert grew(before, after, "quotagate_policy_skips_total", reason=INVALID) == 2
    assert grew(before, after, "quotagate_policy_skips_total", reason=MISSING) == 1
    assert upstream.count() == 3


# --- ignore mode enforces exactly the valid items; reject mode is unchanged -------------------------


@pytest.fixture
def both(make_gateway: Callable[..., Gateway]) -> tuple[Gateway, Gateway]:
    """Two gateways on one store and one clock: `on_policy_error` ignore, and the default reject."""
    clock = FakeClock()
    ignore = make_gateway(on_policy_error="ignore", clock=clock)
    return ignore, make_gateway(store_url=ignore.store_url, clock=clock)


def _segments(header: str) -> dict[str, str]:
    """A value for every segment a header could name (so that only malformed items are left out)."""
    names = {part.split("=", 1)[1].strip(" \t") for part in header.replace(",", ";").split(";") if "=" in part}
    return {"Helicone-User-Id": "alice", **{f"Helicone-Property-{n}": "v" for n in names if _NAME.fullmatch(n)}}


_NAME = re.compile(r"[A-Za-z0-9_-]+")
_serial = itertools.count()
RATE_HEADERS = ("helicone-ratelimit-policy", "helicone-ratelimit-remaining", "ratelimit-policy", "ratelimit")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.one_of(policy_texts().map(lambda t: (t[0], True)), invalid_items().map(lambda t: (t, False))),
        min_size=1,
        max_size=6,
    )
)
def test_ignore_enforces_exactly_the_valid_items(both: tuple[Gateway, Gateway], items: list[tuple[str, bool]]) -> None:
    """Each header, on a new key: ignore mode answers as the valid items alone would, and says
    what it left out; reject mode answers 400 as it always did."""
    ignore, reject = both
    mixed = ", ".join(text for text, _ in items).strip(" \t")
    valid = ", ".join(text for text, ok in items if ok)
    extra = _segments(mixed)
    got = call(ignore.openai(ignore.key(f"k{next(_serial)}")), **{POLICY: mixed}, **extra)
    alone = call(ignore.openai(ignore.key(f"k{next(_serial)}")), **({POLICY: valid} if valid else {}), **extra)
    strict = call(reject.openai(reject.key(f"k{next(_serial)}")), **{POLICY: mixed}, **extra)
    assert got[0] == alone[0]
    assert [got[1].get(h) for h in RATE_HEADERS] == [alone[1].get(h) for h in RATE_HEADERS]
    if all(ok for _, ok in items):
        assert got[1].get("x-helicone-error") == alone[1].get("x-helicone-error")  # rate_limited or nothing
        assert (strict[0], strict[1].get("ratelimit-policy")) == (got[0], got[1].get("ratelimit-policy"))
    else:
        assert got[1]["x-helicone-error"] == (INVALID if got[0] != 429 else "rate_limited")
        assert strict[0] == 400 and "x-helicone-error" not in strict[1]
