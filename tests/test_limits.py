"""Request-unit limits through real HTTP, on every store: counts, windows, segments, headers, 429s.

The store's clock is injected (FakeClock), so windows pass without sleeping.
"""

from __future__ import annotations

import asyncio

import anthropic
import openai
import pytest

from quotagate.fake_upstream import FakeUpstream

from .conftest import CHAT, CLAUDE, POLICY, FakeClock, Gateway


def call(client: openai.OpenAI, **headers: str) -> tuple[int, dict[str, str]]:
    """One chat completion; (status, headers), 429s included."""
    try:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=CHAT,
            max_tokens=2,
            extra_headers=headers or None,
        )
        return raw.http_response.status_code, dict(raw.headers)
    except openai.APIStatusError as exc:
        return exc.status_code, dict(exc.response.headers)


def test_remaining_counts_down_then_429(gw: Gateway, upstream: FakeUpstream) -> None:
    client = gw.openai(gw.key(), **{POLICY: "3;w=60"})
    results = [call(client) for _ in range(4)]
    assert [s for s, _ in results] == [200, 200, 200, 429]
    assert [h["helicone-ratelimit-remaining"] for _, h in results] == ["2", "1", "0", "0"]
    for _, headers in results:
        assert headers["helicone-ratelimit-limit"] == "3"
        assert headers["helicone-ratelimit-policy"] == "3;w=60"
        assert 0 < int(headers["helicone-ratelimit-reset"]) <= 60
        assert headers["ratelimit-policy"] == '"p1";q=3;w=60'
    assert results[0][1]["ratelimit"].startswith('"p1";r=2;t=')
    denied = results[3][1]
    assert denied["x-helicone-error"] == "rate_limited"
    assert 0 < int(denied["retry-after"]) <= 60
    assert upstream.count() == 3


def test_the_largest_quotas_count_exactly(gw: Gateway, upstream: FakeUpstream) -> None:
    client = gw.openai(gw.key(), **{POLICY: "999999999999999;w=60, 9007199254.740991;w=60;u=cents"})
    results = [call(client) for _ in range(2)]
    assert [s for s, _ in results] == [200, 200]
    remaining = [[item.split(";")[1] for item in h["ratelimit"].split(", ")] for _, h in results]
    assert remaining == [["r=999999999999998", "r=9007199254"], ["r=999999999999997", "r=9007199254"]]
    assert upstream.count() == 2


def test_denial_body_and_sdk_exceptions(gw: Gateway, upstream: FakeUpstream) -> None:
    key = gw.key()
    client = gw.openai(key, **{POLICY: "1;w=60"})
    client.chat.completions.create(model="gpt-4o-mini", messages=CHAT)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=CHAT)
    error = info.value.body
    assert isinstance(error, dict)
    assert (error["type"], error["code"]) == ("rate_limit_exceeded", "rate_limited")
    assert "1;w=60" in error["message"]
    claude = gw.anthropic(key, **{POLICY: "1;w=60"})
    with pytest.raises(anthropic.RateLimitError) as denied:
        claude.messages.create(model="claude-haiku-4-5", max_tokens=1, messages=CLAUDE)
    assert denied.value.response.headers["Helicone-RateLimit-Remaining"] == "0"
    assert upstream.count() == 1


def test_sliding_window_releases_after_w_seconds(gw: Gateway, clock: FakeClock, upstream: FakeUpstream) -> None:
    client = gw.openai(gw.key(), **{POLICY: "2;w=60"})
    assert call(client)[0] == 200
    clock.advance(30)
    assert call(client)[0] == 200
    assert call(client)[0] == 429
    clock.advance(29.9)  # the first call is 59.9 s old
    status, headers = call(client)
    assert status == 429 and int(headers["retry-after"]) == 1
    clock.advance(0.1)  # now exactly 60 s: released
    assert call(client)[0] == 200
    assert call(client)[0] == 429  # the second is only 30 s old
    clock.advance(30)
    assert call(client)[0] == 200
    assert upstream.count() == 4


def test_exact_under_concurrency(gw: Gateway, upstream: FakeUpstream) -> None:
    """60 concurrent requests against 10;w=60: exactly 10 admitted, exactly 10 reach the upstream."""
    client = gw.async_openai(gw.key(), **{POLICY: "10;w=60"})

    async def one() -> int:
        try:
            await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT)
            return 200
        except openai.RateLimitError:
            return 429

    async def burst() -> list[int]:
        async with client:
            return await asyncio.gather(*(one() for _ in range(60)))

    statuses = asyncio.run(burst())
    assert statuses.count(200) == 10 and statuses.count(429) == 50
    assert upstream.count("/chat/completions") == 10


def test_per_user_budgets_are_independent(gw: Gateway, upstream: FakeUpstream) -> None:
    client = gw.openai(gw.key(), **{POLICY: "2;w=60;s=user"})
    alice = [call(client, **{"Helicone-User-Id": "alice"})[0] for _ in range(3)]
    bob = [call(client, **{"Helicone-User-Id": "bob"})[0] for _ in range(3)]
    assert alice == bob == [200, 200, 429]
    assert upstream.count() == 4


def test_user_id_from_the_body_and_from_anthropic_metadata(gw: Gateway, upstream: FakeUpstream) -> None:
    key = gw.key()
    client = gw.openai(key, **{POLICY: "1;w=60;s=user"})
    client.chat.completions.create(model="gpt-4o", messages=CHAT, user="carol")
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o", messages=CHAT, user="carol")
    # the header wins over the body
    client.chat.completions.create(
        model="gpt-4o",
        messages=CHAT,
        user="carol",
        extra_headers={"Helicone-User-Id": "dave"},
    )
    claude = gw.anthropic(key, **{POLICY: "1;w=60;s=user"})
    claude.messages.create(
        model="claude-haiku-4-5",
        max_tokens=1,
        messages=CLAUDE,
        metadata={"user_id": "erin"},
    )
    with pytest.raises(anthropic.RateLimitError):
        claude.messages.create(
            model="claude-haiku-4-5",
            max_tokens=1,
            messages=CLAUDE,
            metadata={"user_id": "erin"},
        )
    assert upstream.count() == 3


def test_property_segments(gw: Gateway, upstream: FakeUpstream) -> None:
    client = gw.openai(gw.key(), **{POLICY: "1;w=60;s=Org"})
    assert call(client, **{"Helicone-Property-Org": "acme"})[0] == 200
    assert call(client, **{"helicone-property-org": "acme"})[0] == 429  # the name matched case-insensitively
    status, headers = call(client, **{"Helicone-Property-ORG": "globex"})
    assert status == 200 and headers["helicone-ratelimit-policy"] == "1;w=60;s=org"
    assert upstream.count() == 2


def test_global_budget_is_shared_by_all_users_of_a_key(gw: Gateway) -> None:
    client = gw.openai(gw.key(), **{POLICY: "2;w=60"})
    assert [call(client, **{"Helicone-User-Id": u})[0] for u in ("a", "b", "c")] == [200, 200, 429]


def test_budgets_are_scoped_to_the_key(gw: Gateway) -> None:
    first, second = gw.openai(gw.key("one"), **{POLICY: "1;w=60"}), gw.openai(gw.key("two"), **{POLICY: "1;w=60"})
    assert [call(first)[0], call(first)[0], call(second)[0]] == [200, 429, 200]


def test_every_policy_must_admit(gw: Gateway, clock: FakeClock, upstream: FakeUpstream) -> None:
    client = gw.openai(gw.key(), **{POLICY: "3;w=60, 4;w=3600;s=user", "Helicone-User-Id": "u1"})
    assert [call(client)[0] for _ in range(4)] == [200, 200, 200, 429]
    clock.advance(60)
    statuses = [call(client)[0] for _ in range(2)]
    assert statuses == [200, 429]  # the hourly per-user budget (4) is now the one that says no
    _status, headers = call(client)
    assert headers["helicone-ratelimit-policy"] == "4;w=3600;s=user"
    assert upstream.count() == 4


def test_policies_differing_only_in_quota_share_one_counter(gw: Gateway, upstream: FakeUpstream) -> None:
    client = gw.openai(gw.key(), **{POLICY: "5;w=60, 2;w=60"})
    results = [call(client) for _ in range(3)]
    assert [s for s, _ in results] == [200, 200, 429]
    # each request took one unit from the shared counter: 5-quota policy shows 3 then 2 left
    assert results[1][1]["ratelimit"].startswith('"p1";r=3;')
    assert results[1][1]["helicone-ratelimit-policy"] == "2;w=60"
    assert upstream.count() == 2


def test_key_bound_policies_apply_and_cannot_be_dropped(gw: Gateway, upstream: FakeUpstream) -> None:
    key = gw.key("bound", ["2;w=60"])
    plain = gw.openai(key)
    assert [call(plain)[0] for _ in range(3)] == [200, 200, 429]
    with_header = gw.openai(key, **{POLICY: "100;w=60"})
    assert call(with_header)[0] == 429  # a looser header policy cannot lift the key's own
    assert upstream.count() == 2


def test_key_bound_user_policy_requires_a_user(gw: Gateway, upstream: FakeUpstream) -> None:
    client = gw.openai(gw.key("per-user", ["1;w=60;s=user"]))
    status, _ = call(client)
    assert status == 400
    assert call(client, **{"Helicone-User-Id": "x"})[0] == 200
    assert upstream.count() == 1


def test_streamed_responses_carry_the_headers(gw: Gateway) -> None:
    client = gw.openai(gw.key(), **{POLICY: "2;w=60"})
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini",
        messages=CHAT,
        stream=True,
    ) as response:
        assert response.headers["Helicone-RateLimit-Remaining"] == "1"
        assert response.headers["RateLimit-Policy"] == '"p1";q=2;w=60'
        assert "data: [DONE]" in "".join(response.iter_lines())


def test_a_failed_upstream_call_still_counts(gw: Gateway, upstream: FakeUpstream) -> None:
    client = gw.openai(gw.key(), **{POLICY: "1;w=60"})
    status, headers = call(client, **{"X-Fake-Status": "500"})
    assert status == 500 and headers["helicone-ratelimit-remaining"] == "0"
    assert call(client)[0] == 429
    assert upstream.count() == 1


def test_decimal_request_quota_admits_its_whole_part(gw: Gateway) -> None:
    client = gw.openai(gw.key(), **{POLICY: "2.5;w=60"})
    results = [call(client) for _ in range(3)]
    assert [s for s, _ in results] == [200, 200, 429]
    assert results[0][1]["helicone-ratelimit-limit"] == "2.5"
