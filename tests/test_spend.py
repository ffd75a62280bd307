"""Spend (`u=cents`) and token (`u=token`) budgets through real HTTP, on every store.

The fake provider reports the usage a test asks for (X-Fake-* headers); the test reads what the
store charged. Expected charges are computed here by hand from the providers' published prices
in US dollars per million tokens, never by calling the pricing library: a token at $P per million
costs P * 1e-6 dollars = P * 1e-4 cents = P * 100 micro-cents, the unit cents budgets are kept in.
The store's clock is injected (FakeClock), so windows pass without sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import anthropic
import openai
import pytest

from quotagate.config import PriceOverride, Settings
from quotagate.fake_upstream import BackgroundServer, FakeUpstream
from quotagate.keys import split_key
from quotagate.server import PROXY, build_app
from quotagate.stores import open_store

from .conftest import CHAT, CLAUDE, POLICY, FakeClock, Gateway, free_port, httpx

ROOMY = "1000;w=3600;u=cents, 100000000;w=3600;u=token"  # never exhausted: only the charges matter
# What the gateway estimates for CHAT (and CLAUDE): the 6 cl100k tokens of "Say hello to the test
# suite", its role and the keys around it (4) and the message object (1); for the same text as a
# bare `input` (responses, embeddings): its 6 tokens and the key.
PROMPT_ESTIMATE = 11
TEXT_ESTIMATE = 7


def microcents(*priced: tuple[int, str]) -> int:
    """(tokens, USD per million tokens) pairs, in micro-cents; the tests pick whole results."""
    total = sum(Decimal(tokens) * Decimal(usd_per_mtok) for tokens, usd_per_mtok in priced) * 100
    assert total == int(total)
    return int(total)


def usage_headers(prompt: int, completion: int = 0, cached: int = 0, cache_write: int = 0) -> dict[str, str]:
    return {
        "X-Fake-Prompt-Tokens": str(prompt),
        "X-Fake-Completion-Tokens": str(completion),
        "X-Fake-Cached-Tokens": str(cached),
        "X-Fake-Cache-Write-Tokens": str(cache_write),
    }


@pytest.fixture
def served(upstream: FakeUpstream, store_url: str, clock: FakeClock) -> Iterator[Callable[[bool], Gateway]]:
    """Gateways in either of aiohttp's modes: `served(True)` cancels a handler whose client went away
    (as the in-process test gateways do), `served(False)` does not (as `quotagate serve` does)."""
    servers: list[BackgroundServer] = []

    def start(handler_cancellation: bool) -> Gateway:
        settings = Settings(
            port=free_port(),
            store=store_url,
            workers=1,
            access_log=False,
            openai_base_url=upstream.url,
            anthropic_base_url=upstream.url,
        )
        app = build_app(settings, open_store(store_url, clock))
        server = BackgroundServer(app, port=settings.port, handler_cancellation=handler_cancellation).start()
        servers.append(server)
        return Gateway(server.url, settings, store_url, server=server)

    yield start
    for server in servers:
        server.stop()


def ledger(gw: Gateway, key: str) -> dict[str, tuple[int, int]]:
    """What the store holds for a key: unit -> (charged, held), in stored units (micro-cents,
    tokens). Read through the gateway's own store object, on its event loop, as the admin API
    reads it (a Redis store indexes budgets for listing off the request path, on its own)."""
    store = gw.server.app[PROXY].store
    future = asyncio.run_coroutine_threadsafe(store.usage(key_id=split_key(key)[0]), gw.server.loop)  # type: ignore[index]
    rows = future.result(timeout=30)
    assert len({r.unit for r in rows}) == len(rows)
    return {r.unit: (r.used, r.held) for r in rows}


def settled(gw: Gateway, key: str) -> dict[str, tuple[int, int]]:
    """The ledger once no call of the key holds anything (a charge that runs after a disconnect)."""
    deadline = time.monotonic() + 20
    while True:
        state = ledger(gw, key)
        if all(held == 0 for _, held in state.values()) or time.monotonic() > deadline:
            return state
        time.sleep(0.02)


def remaining(headers: httpx.Headers | dict[str, str]) -> list[int]:
    """The `r` of every policy in the IETF `RateLimit` header, in policy order."""
    items = [item.strip() for item in headers["ratelimit"].split(",")]
    return [int(next(p for p in item.split(";") if p.startswith("r="))[2:]) for item in items]


# --- exact charges, per provider, route and model ---------------------------------------------

# OpenAI's published prices (USD per million tokens): input, cached input, output.
GPT_4O_MINI = ("0.15", "0.075", "0.60")
GPT_4O = ("2.50", "1.25", "10.00")
GPT_41 = ("2.00", "0.50", "8.00")
GPT_41_MINI = ("0.40", "0.10", "1.60")
GPT_5 = ("1.25", "0.125", "10.00")


def openai_cost(prices: tuple[str, str, str], prompt: int, completion: int, cached: int = 0) -> int:
    uncached_in, cached_in, out = prices
    return microcents((prompt - cached, uncached_in), (cached, cached_in), (completion, out))


# e.g. gpt-4o-mini, 1,000 tokens in (400 of them cached) and 500 out: 600 * $0.15 + 400 * $0.075
# + 500 * $0.60 per million = $0.00042 = 0.042 cents = 42,000 micro-cents.
CHAT_CASES = [
    pytest.param("gpt-4o-mini", 1000, 500, 0, openai_cost(GPT_4O_MINI, 1000, 500), id="gpt-4o-mini"),
    pytest.param("gpt-4o-mini", 1000, 500, 400, 42_000, id="gpt-4o-mini-cached"),
    pytest.param("gpt-4o", 1200, 300, 0, openai_cost(GPT_4O, 1200, 300), id="gpt-4o"),
    pytest.param("gpt-4.1", 2000, 100, 1000, openai_cost(GPT_41, 2000, 100, 1000), id="gpt-4.1-cached"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("model", "prompt", "completion", "cached", "expected"), CHAT_CASES)
def test_openai_chat_charges_exact_cost(
    gw: Gateway,
    upstream: FakeUpstream,
    model: str,
    prompt: int,
    completion: int,
    cached: int,
    expected: int,
    stream: bool,
) -> None:
    key = gw.key()
    client = gw.openai(key, **{POLICY: ROOMY}, **usage_headers(prompt, completion, cached))
    if stream:
        chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=completion, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).count("word") == completion
    else:
        reply = client.chat.completions.create(model=model, messages=CHAT, max_tokens=completion)
        assert reply.usage is not None and reply.usage.prompt_tokens == prompt
    assert ledger(gw, key) == {"cents": (expected, 0), "token": (prompt + completion, 0)}
    assert upstream.count("/chat/completions") == 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_openai_completions_charge(gw: Gateway, stream: bool) -> None:
    key = gw.key()
    client = gw.openai(key, **{POLICY: ROOMY}, **usage_headers(3000, 40))
    if stream:
        chunks = list(
            client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once", max_tokens=40, stream=True)
        )
        assert all(c.usage is None for c in chunks)
    else:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once", max_tokens=40)
    # gpt-3.5-turbo-instruct: $1.50 in, $2.00 out
    assert ledger(gw, key) == {"cents": (microcents((3000, "1.50"), (40, "2.00")), 0), "token": (3040, 0)}


@pytest.mark.parametrize(
    ("model", "usd_per_mtok"),
    [("text-embedding-3-small", "0.02"), ("text-embedding-3-large", "0.13"), ("text-embedding-ada-002", "0.10")],
)
def test_openai_embeddings_charge_input_only(gw: Gateway, model: str, usd_per_mtok: str) -> None:
    key = gw.key()
    client = gw.openai(key, **{POLICY: ROOMY}, **usage_headers(50_000))
    client.embeddings.create(model=model, input=["first text", "second text"])
    assert ledger(gw, key) == {"cents": (microcents((50_000, usd_per_mtok)), 0), "token": (50_000, 0)}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    ("model", "prices"), [("gpt-4.1-mini", GPT_41_MINI), ("gpt-5", GPT_5), ("gpt-4o", GPT_4O)], ids=lambda v: v
)
def test_openai_responses_charge(gw: Gateway, model: str, prices: tuple[str, str, str], stream: bool) -> None:
    key = gw.key()
    client = gw.openai(key, **{POLICY: ROOMY}, **usage_headers(8000, 700, cached=6000))
    if stream:
        events = list(client.responses.create(model=model, input="Hello there", max_output_tokens=700, stream=True))
        assert events[-1].type == "response.completed"
    else:
        assert client.responses.create(model=model, input="Hello there", max_output_tokens=700).output_text
    expected = openai_cost(prices, 8000, 700, cached=6000)
    assert ledger(gw, key) == {"cents": (expected, 0), "token": (8700, 0)}


# Anthropic's published prices (USD per million tokens): input, cache read, cache write (5 min), output.
HAIKU_45 = ("1", "0.10", "1.25", "5")
SONNET_45 = ("3", "0.30", "3.75", "15")
OPUS_41 = ("15", "1.50", "18.75", "75")
OPUS_45 = ("5", "0.50", "6.25", "25")


def anthropic_cost(prices: tuple[str, str, str, str], uncached: int, read: int, write: int, output: int) -> int:
    return microcents((uncached, prices[0]), (read, prices[1]), (write, prices[2]), (output, prices[3]))


CLAUDE_CASES = [
    # model, uncached input, cache read, cache write, output, expected
    ("claude-haiku-4-5", 2000, 0, 0, 300, anthropic_cost(HAIKU_45, 2000, 0, 0, 300)),
    ("claude-haiku-4-5", 1000, 5000, 2000, 300, anthropic_cost(HAIKU_45, 1000, 5000, 2000, 300)),
    ("claude-sonnet-4-5", 10_000, 0, 4000, 1000, anthropic_cost(SONNET_45, 10_000, 0, 4000, 1000)),
    # past 200k input tokens every token at the long-context rate: 150,000 * $6 + 60,000 * $0.60
    # + 2,000 * $22.50 per million = $0.981 = 98.1 cents
    ("claude-sonnet-4-5", 150_000, 60_000, 0, 2000, 98_100_000),
    ("claude-opus-4-1", 3000, 1000, 0, 500, anthropic_cost(OPUS_41, 3000, 1000, 0, 500)),
    ("claude-opus-4-5", 3000, 1000, 800, 500, anthropic_cost(OPUS_45, 3000, 1000, 800, 500)),
]


@pytest.mark.filterwarnings("ignore:The model 'claude-sonnet-4-5' is deprecated:DeprecationWarning")
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("model", "uncached", "read", "write", "output", "expected"), CLAUDE_CASES)
def test_anthropic_messages_charge_exact_cost(
    gw: Gateway,
    model: str,
    uncached: int,
    read: int,
    write: int,
    output: int,
    expected: int,
    stream: bool,
) -> None:
    key = gw.key()
    total_input = uncached + read + write
    claude = gw.anthropic(key, **{POLICY: ROOMY}, **usage_headers(total_input, output, read, write))
    final: anthropic.types.Message
    if stream:
        with claude.messages.stream(model=model, max_tokens=output, messages=CLAUDE) as events:
            final = events.get_final_message()
    else:
        final = claude.messages.create(model=model, max_tokens=output, messages=CLAUDE)
    assert (final.usage.input_tokens, final.usage.output_tokens) == (uncached, output)
    assert ledger(gw, key) == {"cents": (expected, 0), "token": (total_input + output, 0)}


def test_token_unit_is_input_plus_output_tokens(gw: Gateway) -> None:
    """Cached input counts like any input token; Anthropic's cache reads and writes included."""
    key = gw.key()
    gw.openai(key, **{POLICY: "100000;w=60;u=token"}, **usage_headers(1000, 100, cached=400)).chat.completions.create(
        model="gpt-4o-mini", messages=CHAT, max_tokens=100
    )
    assert ledger(gw, key) == {"token": (1100, 0)}
    claude = gw.anthropic(key, **{POLICY: "100000;w=60;u=token"}, **usage_headers(600, 50, cached=300, cache_write=200))
    claude.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=CLAUDE)
    assert ledger(gw, key) == {"token": (1100 + 650, 0)}  # 100 uncached + 300 read + 200 written + 50 out


# --- the usage the gateway asks for on its own -------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("options", [None, {"include_usage": False}], ids=["no-options", "include_usage-false"])
def test_injected_include_usage_is_invisible(
    gw: Gateway, upstream: FakeUpstream, route: str, options: dict[str, bool] | None
) -> None:
    """A stream whose client did not ask for usage: the gateway asks the upstream for it, charges
    it, and hands back the stream the client asked for, with no usage chunk and no usage field."""
    key = gw.key()
    body: dict[str, object] = {"model": "gpt-4o-mini", "stream": True, "max_tokens": 3}
    body.update({"messages": CHAT} if route.endswith("chat/completions") else {"prompt": "Once upon"})
    if options is not None:
        body["stream_options"] = options
    headers = {"Helicone-Auth": f"Bearer {key}", POLICY: ROOMY, **usage_headers(1000, 3)}
    with httpx.Client(base_url=gw.url) as http, http.stream("POST", route, headers=headers, json=body) as response:
        raw = response.read()
    assert response.status_code == 200
    assert b"usage" not in raw
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert len(events) == (5 if route.endswith("chat/completions") else 3) + 1  # the reply's chunks, [DONE]
    assert upstream.received[0].json()["stream_options"] == {"include_usage": True}
    assert ledger(gw, key)["cents"] == (openai_cost(GPT_4O_MINI, 1000, 3), 0)


def test_sdk_stream_without_usage_sees_no_usage_chunk(gw: Gateway) -> None:
    key = gw.key()
    client = gw.openai(key, **{POLICY: ROOMY}, **usage_headers(1000, 4))
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=4, stream=True))
    assert all(c.choices and c.usage is None for c in chunks)
    assert ledger(gw, key)["token"] == (1004, 0)


def test_a_client_that_asks_for_usage_gets_it_unchanged(gw: Gateway) -> None:
    key = gw.key()
    headers = {"Helicone-Auth": f"Bearer {key}", POLICY: ROOMY, **usage_headers(1000, 2)}
    body = {
        "model": "gpt-4o-mini",
        "messages": CHAT,
        "stream": True,
        "max_tokens": 2,
        "stream_options": {"include_usage": True},
    }
    with (
        httpx.Client(base_url=gw.url) as http,
        http.stream("POST", "/v1/chat/completions", headers=headers, json=body) as r,
    ):
        raw = r.read()
    events = [e for e in raw.split(b"\n\n") if e]
    assert all(e.endswith(b',"usage":null}') for e in events[:-2])
    assert b'"choices":[],"usage":{"prompt_tokens":1000,"completion_tokens":2' in events[-2]
    assert ledger(gw, key)["token"] == (1002, 0)


# --- when the charge lands -----------------------------------------------------------------------


@pytest.mark.parametrize("handler_cancellation", [True, False], ids=["cancelling", "serve-like"])
def test_charge_is_committed_before_the_stream_ends(
    served: Callable[[bool], Gateway], handler_cancellation: bool
) -> None:
    """The SDKs stop reading at a stream's terminal event ([DONE], message_stop,
    response.completed) and may send the next call at once: by then the store has the charge,
    even from an upstream that keeps the connection open a while after its last event."""
    gw = served(handler_cancellation)
    key = gw.key()
    steer = {POLICY: ROOMY, "X-Fake-Linger": "0.3", **usage_headers(1000, 5)}
    client, claude = gw.openai(key, **steer), gw.anthropic(key, **steer)
    streams: list[Callable[[], object]] = [
        lambda: list(client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=5, stream=True)),
        lambda: list(client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Hi", max_tokens=5, stream=True)),
        lambda: list(client.responses.create(model="gpt-4o", input="Hi", max_output_tokens=5, stream=True)),
        lambda: claude_stream(claude),
    ]
    for done, stream in enumerate(streams, start=1):
        stream()
        assert ledger(gw, key)["token"] == (done * 1005, 0)


def claude_stream(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model="claude-haiku-4-5", max_tokens=5, messages=CLAUDE) as events:
        events.until_done()


def test_the_next_call_sees_a_stream_s_charge(gw: Gateway, upstream: FakeUpstream, clock: FakeClock) -> None:
    """A stream that spends the whole budget: the very next call of the same client is denied."""
    steer = {POLICY: "1000;w=60;u=token", "X-Fake-Linger": "0.3", **usage_headers(990, 10)}
    client = gw.openai(gw.key(), **steer)
    for _ in range(3):
        list(client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=10, stream=True))
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=10)
        clock.advance(60)
    assert upstream.count() == 3


# --- client disconnects and broken upstreams ------------------------------------------------------

DISCONNECTS = [
    # route, events sent before the hold, events the SDK yields of them, prompt estimate, input charged,
    # streamed tokens
    pytest.param("chat", 4, 4, PROMPT_ESTIMATE, PROMPT_ESTIMATE, 6, id="openai-chat"),  # role + 3 words
    pytest.param("responses", 7, 7, TEXT_ESTIMATE, TEXT_ESTIMATE, 6, id="openai-responses"),  # 4 setup + 3 words
    pytest.param("messages", 6, 5, PROMPT_ESTIMATE, 1000, 6, id="anthropic"),  # message_start: the real input
]


@pytest.mark.parametrize("handler_cancellation", [True, False], ids=["cancelling", "serve-like"])
@pytest.mark.parametrize(("route", "events", "yielded", "estimate", "charged_input", "streamed"), DISCONNECTS)
def test_client_disconnect_mid_stream_charges_what_was_streamed(
    served: Callable[[bool], Gateway],
    upstream: FakeUpstream,
    route: str,
    events: int,
    yielded: int,
    estimate: int,
    charged_input: int,
    streamed: int,
    handler_cancellation: bool,
) -> None:
    gw = served(handler_cancellation)
    key = gw.key()
    steer = {"X-Fake-Hold": f"cut-{route}", "X-Fake-Hold-After": str(events), **usage_headers(1000, 50)}
    policy = {POLICY: "10000;w=3600;u=token"}
    stream: Any
    if route == "messages":
        claude = gw.anthropic(key, **policy, **steer)
        stream = claude.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=CLAUDE, stream=True)
    elif route == "chat":
        client = gw.openai(key, **policy, **steer)
        stream = client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=50, stream=True)
    else:
        client = gw.openai(key, **policy, **steer)
        stream = client.responses.create(
            model="gpt-4o", input="Say hello to the test suite", max_output_tokens=50, stream=True
        )
    iterator = iter(stream)
    for _ in range(yielded):
        next(iterator)
    assert ledger(gw, key) == {"token": (0, estimate + 50)}  # held: prompt estimate + max_tokens
    stream.close()  # while the upstream is silent: the gateway notices at once, in either mode
    assert settled(gw, key) == {"token": (charged_input + streamed, 0)}
    assert abandoned(upstream) == [f"cut-{route}"]  # the upstream saw its connection closed
    upstream.release(f"cut-{route}")
    # the next call sees the whole budget but that charge: 10000 - charge - its own 100 + 20
    raw = gw.openai(key, **policy, **usage_headers(100, 20)).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=CHAT, max_tokens=20
    )
    assert remaining(raw.headers) == [10_000 - charged_input - streamed - 120]
    assert upstream.count() == 2


def test_a_broken_upstream_stream_charges_what_was_streamed(gw: Gateway, upstream: FakeUpstream) -> None:
    key = gw.key()
    client = gw.openai(key, **{POLICY: ROOMY, "X-Fake-Cut-After": "4"}, **usage_headers(1000, 50))
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=50, stream=True))
    # the prompt's estimate (11) and " word0 word1 word2" (6): 11 * $2.50 + 6 * $10 per million
    assert settled(gw, key) == {"cents": (microcents((11, "2.50"), (6, "10.00")), 0), "token": (17, 0)}


@pytest.mark.parametrize("handler_cancellation", [True, False], ids=["cancelling", "serve-like"])
def test_a_client_gone_before_a_json_answer_is_charged_its_prompt(
    served: Callable[[bool], Gateway], upstream: FakeUpstream, handler_cancellation: bool
) -> None:
    """A client that gives up on a non-stream answer the upstream is working on: the gateway drops
    the upstream call at once (the upstream sees its connection closed), its hold does not linger
    until the hold's TTL, it is charged the prompt's estimate and its request unit stays taken."""
    gw = served(handler_cancellation)
    key = gw.key()
    client = gw.async_openai(key, **{POLICY: "10000;w=3600;u=token, 10;w=3600", "X-Fake-Hold": "slow-json"})

    async def give_up() -> None:
        call = asyncio.create_task(client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=50))
        while not upstream.count() and not call.done():
            await asyncio.sleep(0.01)
        call.cancel()  # the SDK closes its connection
        await asyncio.gather(call, return_exceptions=True)
        await client.close()

    asyncio.run(give_up())
    assert abandoned(upstream) == ["slow-json"]
    assert settled(gw, key) == {"token": (PROMPT_ESTIMATE, 0), "request": (1, 0)}


def abandoned(upstream: FakeUpstream) -> list[str]:
    """The holds whose caller (the gateway) closed the connection, once there is one."""
    deadline = time.monotonic() + 10
    while not upstream.abandoned and time.monotonic() < deadline:
        time.sleep(0.01)
    return upstream.abandoned


def test_a_failed_upstream_call_is_charged_nothing(gw: Gateway, upstream: FakeUpstream) -> None:
    key = gw.key()
    client = gw.openai(key, **{POLICY: "1;w=60;u=cents, 1000;w=60;u=token", "X-Fake-Status": "500"})
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=50)
    assert ledger(gw, key) == {"cents": (0, 0), "token": (0, 0)}
    assert upstream.count() == 3


# --- unknown models and price overrides -----------------------------------------------------------


def unpriced_calls(gw: Gateway) -> float:
    with gw.http() as http:
        page = http.get("/metrics").text
    return float(
        next(line.split()[1] for line in page.splitlines() if line.startswith("quotagate_unpriced_calls_total "))
    )


def test_unknown_model_is_charged_zero_logged_once_and_counted(
    gw: Gateway, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    key = gw.key()
    before = unpriced_calls(gw)
    client = gw.openai(key, **{POLICY: "0.01;w=60;u=cents, 1000000;w=60;u=token"}, **usage_headers(50_000, 1000))
    with caplog.at_level(logging.WARNING, logger="quotagate.pricing"):
        for _ in range(3):
            client.chat.completions.create(model="acme-llm-unlisted", messages=CHAT, max_tokens=1000)
    assert ledger(gw, key) == {"cents": (0, 0), "token": (3 * 51_000, 0)}  # tokens still count
    warnings = [r for r in caplog.records if "acme-llm-unlisted" in r.getMessage()]
    assert len(warnings) == 1
    assert unpriced_calls(gw) - before == 3
    assert upstream.count() == 3


def access_lines(caplog: pytest.LogCaptureFixture, count: int) -> list[dict[str, Any]]:
    """The fields of the first `count` access log lines: a line is written once its answer has
    left, so it may come a moment after the client has read that answer."""
    deadline = time.monotonic() + 10
    while True:
        lines = [r.fields for r in caplog.records if r.name == "quotagate.access"]  # type: ignore[attr-defined]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines[:count]
        time.sleep(0.01)


def test_an_unknown_model_s_log_line_says_it_cost_0_unpriced(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Charged 0, the request's log line says so (cost 0, and that no price was known), next to
    its tokens; a priced model's line has its cost and no such mark."""
    gw = make_gateway(access_log=True)
    client = gw.openai(gw.key(), **{POLICY: "1;w=60;u=cents"}, **usage_headers(50, 10))
    with caplog.at_level(logging.INFO, logger="quotagate.access"):
        client.chat.completions.create(model="acme-llm-unlisted", messages=CHAT, max_tokens=10)
        client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=10)
        lines = access_lines(caplog, 2)  # inside the block: a line written after it would not be captured
    assert [(f["model"], f["input_tokens"], f["output_tokens"]) for f in lines] == [
        ("acme-llm-unlisted", 50, 10),
        ("gpt-4o", 50, 10),
    ]
    assert lines[0]["cost_cents"] == 0 and lines[0]["unpriced"] is True
    assert lines[1]["cost_cents"] == microcents((50, "2.50"), (10, "10.00")) / 1_000_000
    assert lines[1].get("unpriced") is None
    assert upstream.count() == 2


def test_a_stream_that_reports_no_usage_logs_none_rather_than_zero(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream under no cents or token budget is passed as asked (no usage chunk requested): its
    tokens and cost are unknown, and its log line leaves them out instead of claiming 0."""
    gw = make_gateway(access_log=True)
    client = gw.openai(gw.key(), **{POLICY: "10;w=60"}, **usage_headers(50, 10))
    with caplog.at_level(logging.INFO, logger="quotagate.access"):
        list(client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=10, stream=True))
        list(
            client.chat.completions.create(
                model="gpt-4o", messages=CHAT, max_tokens=10, stream=True, stream_options={"include_usage": True}
            )
        )
        unknown, reported = access_lines(caplog, 2)  # inside the block: a later line would not be captured
    assert unknown["status"] == 200 and unknown["outcome"] == "complete"
    assert {"input_tokens", "output_tokens", "cost_cents", "unpriced"}.isdisjoint(
        k for k, v in unknown.items() if v is not None
    )
    assert (reported["input_tokens"], reported["output_tokens"]) == (50, 10)
    assert reported["cost_cents"] == microcents((50, "2.50"), (10, "10.00")) / 1_000_000
    assert upstream.count() == 2


def test_price_overrides_from_the_config(
    make_gateway: Callable[..., Gateway], store_url: str, clock: FakeClock
) -> None:
    prices = {
        "my-finetune": PriceOverride(Decimal("0.30"), Decimal("1.20")),  # a model the library does not know
        "gpt-4o-mini": PriceOverride(Decimal("1"), Decimal("2"), cache_read_mtok=Decimal("0.5")),  # one it does
    }
    gw = make_gateway(store_url=store_url, clock=clock, prices=prices)
    key = gw.key()
    client = gw.openai(key, **{POLICY: ROOMY})
    client.chat.completions.create(
        model="my-finetune", messages=CHAT, max_tokens=200, extra_headers=usage_headers(1000, 200)
    )
    assert ledger(gw, key)["cents"] == (microcents((1000, "0.30"), (200, "1.20")), 0)
    # as OpenAI does, the answer names the dated snapshot: the alias's override applies to it
    snapshot = {"X-Fake-Model": "gpt-4o-mini-2024-07-18", **usage_headers(1000, 100, cached=400)}
    client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=100, extra_headers=snapshot)
    expected = microcents((1000, "0.30"), (200, "1.20")) + microcents((600, "1"), (400, "0.5"), (100, "2"))
    assert ledger(gw, key)["cents"] == (expected, 0)


# --- holds under concurrency ------------------------------------------------------------------------


def burst(gw: Gateway, key: str, upstream: FakeUpstream, calls: int, **create: object) -> tuple[int, list[int]]:
    """`calls` concurrent chat completions, all held at the upstream until every one has been
    admitted or denied, so that none is charged before the last admission: (admitted, statuses)."""
    client = gw.async_openai(key, **{POLICY: "5500;w=3600;u=token", "X-Fake-Hold": "burst"}, **usage_headers(6, 994))

    async def one() -> int:
        try:
            await client.chat.completions.create(model="gpt-4o-mini", **create)  # type: ignore[call-overload]
            return 200
        except openai.RateLimitError:
            return 429

    async def run() -> tuple[int, list[int]]:
        async with client:
            tasks = [asyncio.create_task(one()) for _ in range(calls)]
            deadline = time.monotonic() + 30
            while sum(t.done() for t in tasks) + upstream.count() < calls:
                assert time.monotonic() < deadline, "the burst was not decided"
                await asyncio.sleep(0.01)
            admitted = upstream.count()
            upstream.release("burst")
            return admitted, list(await asyncio.gather(*tasks))

    return asyncio.run(run())


def test_holds_bound_concurrent_admissions(gw: Gateway, upstream: FakeUpstream) -> None:
    """50 concurrent calls of 1,000 tokens (as they then report; the gateway holds 1,005 each: 11
    counted in the prompt + max_tokens 994) against 5,500 tokens: the 6th finds 475 left and is
    the last admitted, exactly as when the calls come one after another."""
    key = gw.key()
    admitted, statuses = burst(gw, key, upstream, 50, messages=CHAT, max_tokens=994)
    assert admitted == 6 and statuses.count(200) == 6 and statuses.count(429) == 44
    assert ledger(gw, key) == {"token": (6000, 0)}  # overshoot: at most one call's cost

    sequential = gw.openai(gw.key("sequential"), **{POLICY: "5500;w=3600;u=token"}, **usage_headers(6, 994))
    outcomes = []
    for _ in range(8):
        try:
            sequential.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=994)
            outcomes.append(200)
        except openai.RateLimitError:
            outcomes.append(429)
    assert outcomes == [200] * 6 + [429] * 2


def test_a_call_holds_its_prompt_and_every_completion_it_asks_for(gw: Gateway, upstream: FakeUpstream) -> None:
    """In flight: the prompt counted locally (11) plus max_tokens for each of n completions, or the
    configured default when max_tokens is absent; embeddings hold their input only."""
    key = gw.key()
    held = {POLICY: "100000;w=60;u=token", "X-Fake-Hold": "in-flight"}
    client = gw.openai(key, **held).with_options(timeout=30)
    cases: list[tuple[Callable[[], object], int]] = [
        (lambda: client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=50, n=3), 11 + 150),
        (lambda: client.chat.completions.create(model="gpt-4o", messages=CHAT), 11 + 4096),
        (lambda: client.embeddings.create(model="text-embedding-3-small", input="Say hello to the test suite"), 7),
    ]
    for send, estimate in cases:
        upstream.reset()
        done = threading.Thread(target=send)
        done.start()
        deadline = time.monotonic() + 20
        while upstream.count() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        state = ledger(gw, key)["token"]
        upstream.release("in-flight")
        done.join(timeout=20)
        assert state[1] == estimate


def test_without_holds_all_concurrent_calls_would_pass(gw: Gateway, upstream: FakeUpstream) -> None:
    """The same burst with calls whose estimate is 6 tokens (an empty message, max_tokens=1) but
    which report 1,000 tokens each: almost nothing is held, so every admission sees a budget
    hardly touched."""
    key = gw.key()
    admitted, statuses = burst(gw, key, upstream, 50, messages=[{"role": "user", "content": ""}], max_tokens=1)
    assert admitted == 50 and statuses == [200] * 50
    assert ledger(gw, key) == {"token": (50_000, 0)}


# --- fractional quotas and headers ----------------------------------------------------------------


def test_fractional_cents_quota_is_exact(gw: Gateway, upstream: FakeUpstream, clock: FakeClock) -> None:
    """0.5 cent a minute; each call costs 400 * $2.50 + 100 * $10 per million = 0.2 cent."""
    key = gw.key()
    client = gw.openai(key, **{POLICY: "0.5;w=60;u=cents"}, **usage_headers(400, 100))

    def call() -> tuple[int, httpx.Headers]:
        try:
            raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=CHAT, max_tokens=100)
            return raw.http_response.status_code, raw.headers
        except openai.RateLimitError as exc:
            return 429, exc.response.headers

    results = [call() for _ in range(4)]
    assert [status for status, _ in results] == [200, 200, 200, 429]  # 0, 0.2, 0.4 cent spent: admitted
    assert ledger(gw, key) == {"cents": (600_000, 0)}
    for _, headers in results:
        assert headers["helicone-ratelimit-limit"] == "0.5"
        assert headers["helicone-ratelimit-policy"] == "0.5;w=60;u=cents"
        assert headers["helicone-ratelimit-remaining"] == "0"  # whole cents, rounded down
        assert headers["ratelimit-policy"] == '"p1";q=0.5;w=60;qu="cents"'
    assert 0 < int(results[3][1]["retry-after"]) <= 60
    clock.advance(60)
    assert call()[0] == 200
    assert upstream.count() == 4


def test_headers_after_the_call_on_json_and_at_admission_on_streams(gw: Gateway) -> None:
    key = gw.key()
    client = gw.openai(key, **{POLICY: "1000;w=60;u=token"})
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=CHAT, max_tokens=20, extra_headers=usage_headers(100, 20)
    )
    assert raw.headers["helicone-ratelimit-remaining"] == "880"  # after this call's 120 tokens
    assert raw.headers["helicone-ratelimit-policy"] == "1000;w=60;u=token"
    assert raw.headers["ratelimit-policy"] == '"p1";q=1000;w=60;qu="tokens"'
    assert raw.headers["ratelimit"] == '"p1";r=880;t=60'
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o", messages=CHAT, max_tokens=50, stream=True, extra_headers=usage_headers(100, 50)
    ) as streamed:
        # at admission: 120 charged and this call's estimate held (11 prompt tokens + max_tokens 50)
        assert streamed.headers["helicone-ratelimit-remaining"] == str(1000 - 120 - PROMPT_ESTIMATE - 50)
        list(streamed.iter_lines())
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=CHAT, max_tokens=20, extra_headers=usage_headers(100, 20)
    )
    assert raw.headers["helicone-ratelimit-remaining"] == str(1000 - 120 - 150 - 120)
    assert ledger(gw, key) == {"token": (390, 0)}


@pytest.mark.filterwarnings("ignore:The model 'claude-sonnet-4-5' is deprecated:DeprecationWarning")
def test_cents_headers_count_whole_cents_left(gw: Gateway) -> None:
    """Remaining counts whole cents, rounded down."""
    client = gw.anthropic(gw.key(), **{POLICY: "100;w=3600;u=cents"}, **usage_headers(10_000, 1000))
    raw = client.messages.with_raw_response.create(model="claude-sonnet-4-5", max_tokens=1000, messages=CLAUDE)
    # claude-sonnet-4-5: 10,000 * $3 + 1,000 * $15 per million = $0.045 = 4.5 cents; 95.5 left
    assert raw.headers["helicone-ratelimit-remaining"] == "95"
    assert raw.headers["ratelimit"].startswith('"p1";r=95;t=')


def test_absurd_usage_is_charged_as_the_largest_amount(gw: Gateway, upstream: FakeUpstream) -> None:
    """An upstream that reports more tokens than any budget can hold: the call is still answered,
    and its budgets are charged the largest amount a store counts exactly (so exhausted), never a
    500 or an overflowed counter."""
    key = gw.key()
    client = gw.openai(key, **{POLICY: ROOMY})
    absurd = usage_headers(10**19, 10**18)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=CHAT, max_tokens=5, extra_headers=absurd
    )
    assert raw.http_response.status_code == 200
    assert remaining(raw.http_response.headers) == [0, 0]
    assert ledger(gw, key) == {"cents": (2**53 - 1, 0), "token": (2**53 - 1, 0)}
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=5)
    assert upstream.count() == 1
