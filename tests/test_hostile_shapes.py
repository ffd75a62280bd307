"""Request shapes a hostile client could use to hold less than it will be billed, over real HTTP
on every store: what a call holds in flight is read from the store while the fake provider holds
the call, and compared with what the provider may bill for it.

The holds bound concurrent overdraw ("overdrawn by at most one call"): a shape that holds less than
it is billed lets a burst of such calls through a budget that one-after-another calls exhaust.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import orjson

from quotagate.fake_upstream import FakeUpstream

from .conftest import CHAT, CLAUDE, POLICY, Gateway, httpx
from .test_spend import ledger

TOKENS = "100000000;w=3600;u=token"


def holds(
    gw: Gateway, upstream: FakeUpstream, key: str, path: str, body: dict[str, Any] | bytes, **headers: str
) -> tuple[dict[str, int], int]:
    """What one call of `body` to `path` holds (unit -> amount) while the provider holds it, and the
    status it then gets."""
    name = f"hold-{time.monotonic_ns()}"
    sent = {"Helicone-Auth": f"Bearer {key}", POLICY: TOKENS, "X-Fake-Hold": name, **headers}
    status: dict[str, int] = {}

    def call() -> None:
        with httpx.Client(timeout=30) as http:
            status["code"] = http.post(
                f"{gw.url}{path}", content=body if isinstance(body, bytes) else orjson.dumps(body), headers=sent
            ).status_code

    before = upstream.count()
    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 20
    while upstream.count() == before and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    amounts = {unit: amount for unit, (_, amount) in ledger(gw, key).items()} if upstream.count() > before else {}
    upstream.release(name)
    thread.join(timeout=20)
    return amounts, status.get("code", 0)


def held(
    gw: Gateway, upstream: FakeUpstream, key: str, path: str, body: dict[str, Any], **headers: str
) -> tuple[int, int]:
    """What one call holds against a token budget in flight (-1 if it never reached the provider),
    and its status."""
    amounts, status = holds(gw, upstream, key, path, body, **headers)
    return amounts.get("token", -1), status


HI = [{"role": "user", "content": "hi"}]


def test_every_output_limit_a_body_names_is_held(gw: Gateway, upstream: FakeUpstream) -> None:
    """An upstream may read any of the output limits a body names (vLLM reads max_completion_tokens
    before max_tokens): the largest is held. A limit of 0, which an upstream may read as unset
    (`max_tokens or default`: the fake provider then replies 12 tokens), holds the default."""
    key = gw.key()
    chat = "/v1/chat/completions"
    amount, status = held(
        gw, upstream, key, chat, {"model": "gpt-4o", "messages": HI, "max_tokens": 1, "max_completion_tokens": 500}
    )
    assert status == 200 and amount >= 500
    body = {"model": "gpt-4o", "input": "hi", "max_tokens": 1, "max_output_tokens": 700}
    amount, status = held(gw, upstream, key, "/v1/responses", body)
    assert status == 200 and amount >= 700
    amount, status = held(gw, upstream, key, chat, {"model": "gpt-4o", "messages": HI, "max_tokens": 0})
    assert status == 200 and amount >= gw.settings.default_max_tokens
    assert upstream.count(chat) == 2 and upstream.count("/responses") == 1


def test_images_inside_an_anthropic_content_document_hold_their_figure(gw: Gateway, upstream: FakeUpstream) -> None:
    """A custom-content document (`source.type: "content"`) may hold image blocks: each holds an
    image's figure (5,000 tokens for a URL), as the same images in the message itself do."""
    key = gw.key()
    url = "https://example.invalid/{}.png"
    images = [{"type": "image", "source": {"type": "url", "url": url.format(i)}} for i in range(20)]
    document = {"type": "document", "source": {"type": "content", "content": images}, "title": "t"}
    body = {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": [document]}]}
    amount, status = held(gw, upstream, key, "/anthropic/v1/messages", body, **{"x-api-key": "sk-ant-client"})
    assert status == 200 and amount >= 20 * 5000
    assert upstream.count("/messages") == 1


def test_a_background_response_is_refused_under_a_token_or_cents_budget(gw: Gateway, upstream: FakeUpstream) -> None:
    """`background: true` makes the Responses API answer at once with a queued response and no
    usage, and generate (and bill) the reply afterwards: the gateway could only charge it 0. Under
    a cents or token budget it is refused like any call whose cost the gateway cannot read, in
    every spelling an upstream reads as true; without such a budget it passes."""
    key = gw.key()
    body = {"model": "gpt-4o", "input": "Write a long essay", "max_output_tokens": 5}
    with gw.http() as http:
        for policy in (TOKENS, "1000;w=3600;u=cents"):
            truthy: tuple[object, ...] = (True, 1, "true", [1])
            for value in truthy:
                response = http.post(
                    "/v1/responses",
                    json={**body, "background": value},
                    headers={"Helicone-Auth": f"Bearer {key}", POLICY: policy},
                )
                assert response.status_code == 403, (policy, value, response.text)
                assert response.json()["error"]["code"] == "unmetered_endpoint"
                assert "background" in response.json()["error"]["message"]
        assert upstream.count() == 0
        for plain_value in (False, None):
            ok = http.post(
                "/v1/responses",
                json={**body, "background": plain_value},
                headers={"Helicone-Auth": f"Bearer {key}", POLICY: TOKENS},
            )
            assert ok.status_code == 200
        plain = http.post(
            "/v1/responses",
            json={**body, "background": True},
            headers={"Helicone-Auth": f"Bearer {key}", POLICY: "10;w=60"},
        )
        assert plain.status_code == 200
    assert upstream.count("/responses") == 3


def test_an_anthropic_prompt_marked_for_caching_holds_the_cache_write_price(
    gw: Gateway, upstream: FakeUpstream
) -> None:
    """Anthropic bills input written to its prompt cache at 1.25 times the input price
    (claude-haiku-4-5: $1.25 a million tokens, 125 micro-cents a token; output 500): a body with
    `cache_control` holds its input at that price under a cents budget, as its charge prices the
    cache writes its usage reports."""
    key = gw.key()
    system = [{"type": "text", "text": "word " * 3000, "cache_control": {"type": "ephemeral"}}]
    body = {"model": "claude-haiku-4-5", "max_tokens": 5, "system": system, "messages": HI}
    both = {POLICY: f"{TOKENS}, 100000;w=3600;u=cents", "x-api-key": "sk-ant-client"}
    amounts, status = holds(gw, upstream, key, "/anthropic/v1/messages", body, **both)
    assert status == 200
    input_tokens = amounts["token"] - 5
    assert input_tokens >= 3000
    assert amounts["cents"] >= input_tokens * 125 + 5 * 500


def test_input_cached_for_an_hour_is_held_and_charged_at_twice_the_input_price(
    gw: Gateway, upstream: FakeUpstream
) -> None:
    """Anthropic bills cache writes with `"ttl": "1h"` at 2 times the input price (claude-haiku-4-5:
    200 micro-cents a token), the 5-minute ones at 1.25 times (125); its usage tells them apart in
    `cache_creation`. A client asking for the hour pays the provider that much, and is held and
    charged that much."""
    key = gw.key()
    system = [{"type": "text", "text": "word " * 3000, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    body = {"model": "claude-haiku-4-5", "max_tokens": 5, "system": system, "messages": HI}
    steer = {
        "X-Fake-Prompt-Tokens": "3000",
        "X-Fake-Cache-Write-Tokens": "3000",
        "X-Fake-Cache-Write-1h-Tokens": "2000",
        "X-Fake-Completion-Tokens": "5",
        "x-api-key": "sk-ant-client",
    }
    amounts, status = holds(
        gw, upstream, key, "/anthropic/v1/messages", body, **{POLICY: "100000;w=3600;u=cents"}, **steer
    )
    assert status == 200
    assert amounts["cents"] >= 3000 * 200 + 5 * 500
    assert upstream.received[-1].json()["system"] == system
    assert ledger(gw, key)["cents"] == (2000 * 200 + 1000 * 125 + 5 * 500, 0)


def test_a_priority_call_is_held_and_charged_at_twice_the_price(gw: Gateway, upstream: FakeUpstream) -> None:
    """OpenAI bills `service_tier: "priority"` at up to twice the standard price (gpt-4o: 1.7 x,
    gpt-5: 2 x) and says so in the answer's `service_tier`: such a call holds and is charged twice
    the library's price, streamed or not. gpt-4o: 250 micro-cents an input token, 1,000 an output
    token."""
    key = gw.key()
    steer = {"X-Fake-Prompt-Tokens": "1000", "X-Fake-Completion-Tokens": "10"}
    body = {"model": "gpt-4o", "messages": HI, "max_tokens": 10, "service_tier": "priority"}
    both = {POLICY: f"{TOKENS}, 100000;w=3600;u=cents"}
    amounts, status = holds(gw, upstream, key, "/v1/chat/completions", body, **both, **steer)
    assert status == 200
    assert amounts["cents"] >= 2 * ((amounts["token"] - 10) * 250 + 10 * 1000)
    standard = 1000 * 250 + 10 * 1000
    assert ledger(gw, key)["cents"] == (2 * standard, 0)
    client = gw.openai(key, **both, **steer)
    list(
        client.chat.completions.create(
            model="gpt-4o", messages=CHAT, max_tokens=10, service_tier="priority", stream=True
        )
    )
    client.responses.create(model="gpt-4o", input="hi", max_output_tokens=10, service_tier="priority")
    client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=10)  # standard
    assert ledger(gw, key)["cents"] == (7 * standard, 0)


def test_anthropic_web_searches_are_charged_their_fee(gw: Gateway, upstream: FakeUpstream) -> None:
    """Anthropic bills its web search tool $10 per 1,000 searches (1 cent each) on top of the
    tokens, and reports them in `usage.server_tool_use.web_search_requests`: a client letting the
    model search is charged them, streamed or not. claude-haiku-4-5: 100 micro-cents an input
    token, 500 an output token."""
    key = gw.key()
    steer = {"X-Fake-Prompt-Tokens": "100", "X-Fake-Completion-Tokens": "5", "X-Fake-Web-Searches": "7"}
    claude = gw.anthropic(key, **{POLICY: "100000;w=3600;u=cents"}, **steer)
    tools: Any = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 10}]
    claude.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=CLAUDE, tools=tools)
    tokens = 100 * 100 + 5 * 500
    assert ledger(gw, key)["cents"] == (tokens + 7 * 1_000_000, 0)
    with claude.messages.stream(model="claude-haiku-4-5", max_tokens=5, messages=CLAUDE, tools=tools) as stream:
        stream.until_done()
    assert ledger(gw, key)["cents"] == (2 * (tokens + 7 * 1_000_000), 0)


def test_a_never_fitting_call_is_told_which_output_limit_was_counted(gw: Gateway, upstream: FakeUpstream) -> None:
    """The 429 of a call that can never fit names the output limit its estimate counted: the
    largest it names, or default_max_tokens for a 0."""
    key = gw.key()
    headers = {"Helicone-Auth": f"Bearer {key}", POLICY: "1000;w=3600;u=token"}
    with gw.http() as http:
        body = {"model": "gpt-4o", "messages": HI, "max_tokens": 1, "max_completion_tokens": 5000}
        refused = http.post("/v1/chat/completions", json=body, headers=headers)
        assert refused.status_code == 429 and "lower max_completion_tokens" in refused.json()["error"]["message"]
        refused = http.post(
            "/v1/chat/completions", json={**body, "max_completion_tokens": 0, "max_tokens": 0}, headers=headers
        )
        assert refused.status_code == 429 and "default_max_tokens" in refused.json()["error"]["message"]
    assert upstream.count() == 0
