"""What a request will cost at most: every part of its body a provider bills as input, and the
output it allows.

The whole JSON body is walked (iteratively, so no nesting depth exhausts the stack), skipping only
top-level fields known not to be billed (`model`, `user`, `metadata`, `stream`, sampling
parameters, ...): every string counts its tokens, every object key counts too (the property names
of JSON schemas are billed; in messages they stand in for the role and separator tokens a provider
adds per message), every object one more token, every number its digits in threes. Media count a
per-item figure from the providers' published formulas (`media.py`) instead of their base64 text.
Counting over rather than under only costs a client its own headroom; counting under is the attack.

Texts are counted in chunks (tiktoken is quadratic on long runs of one character), a per-request
number of characters exactly and the rest by their UTF-8 bytes (a token is at least one byte);
counts of texts seen before are remembered. A body too big to count in a moment on the event loop
is walked in slices between which the event loop runs other requests, and its long texts are
counted in a worker thread (tiktoken releases the GIL), so that no request stalls the others.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from . import media
from .routing import Endpoint, endpoint
from .usage import completions_requested, count_tokens, requested_output

# Top-level fields no provider bills as input: model choice, identity, transport, sampling and
# output settings. Anything else, known or not, is counted.
UNBILLED = frozenset(
    {
        "model",
        "user",
        "metadata",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "top_k",
        "n",
        "best_of",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "seed",
        "service_tier",
        "store",
        "parallel_tool_calls",
        "reasoning_effort",
        "reasoning",
        "thinking",
        "modalities",
        "audio",
        "verbosity",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "truncation",
        "background",
        "include",
        "previous_response_id",
        "dimensions",
        "encoding_format",
        "echo",
        "prediction",  # counted as output: rejected predicted tokens are billed as completion tokens
    }
)
# Top-level lists of messages or prompts: lists of integers there are token ids (one token each);
# media items count their figure only in them and in the content lists of their items, where a
# provider reads them as media (elsewhere, as in a tool call's input, they are text).
PROMPT_FIELDS = frozenset({"messages", "input", "prompt"})
PART_LISTS = frozenset({"content", "output"})
ANTHROPIC_TOOL_PROMPT = 350  # the system prompt Anthropic adds when tools are given (346 for Claude 4)
CHUNK_CHARS = 4096  # tiktoken's cost grows with the square of a run's length: count in pieces
EXACT_CHARS = 4_000_000  # characters counted exactly per request (~1M tokens); bytes beyond
CACHED_CHARS = 1_000_000  # texts up to this long have their count remembered
CACHE_ENTRIES = 16_384
INLINE_WORK = 20_000  # work units done on the event loop (a unit: a character counted, ~0.1 us)
SMALL_BODY = 4096  # a body this small is counted at once, without accounting for the work
SHORT_TEXT = 64  # a text this short costs one unit and a key this short is counted at once
SHORT_KEY = 256  # texts up to this long are remembered by themselves


@dataclass(frozen=True, slots=True)
class Estimate:
    input_tokens: int
    output_tokens: int


async def estimate(body: Any, raw: bytes, endpoint: Endpoint, provider: str, default_output: int) -> Estimate:
    """The estimate of a request. A small body is counted at once; a bigger one is walked on the
    event loop a slice of work at a time, its long texts (and documents) counted in a worker
    thread, where tiktoken runs without the GIL."""
    walker = Walker(body, raw, endpoint, provider, default_output)
    if len(raw) <= SMALL_BODY:
        walker.run(None)
        return walker.result()
    while not walker.run(INLINE_WORK):
        if walker.heavy_next():
            await asyncio.get_running_loop().run_in_executor(_executor(), walker.step)
        else:
            await asyncio.sleep(0)  # let the other requests run
    return walker.result()


def estimate_now(
    body: Any, path: str = "/v1/chat/completions", provider: str = "openai", default_output: int = 4096
) -> Estimate:
    """The same estimate, counted here and now (tests, tools), for a request to `path`."""
    walker = Walker(
        body, b"", endpoint(provider, "POST", tuple(s for s in path.split("/") if s)), provider, default_output
    )
    walker.run(None)
    return walker.result()


@functools.cache
def _executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="quotagate-estimate")


# Items of the walk's stack that are not JSON values: a list of messages, prompts or content parts
# (where token ids and media may be), and an item of such a list (a message, a part, maybe media).
_PROMPT, _PART = object(), object()


class Walker:
    """Walks a body with an explicit stack, so that it can stop after some work and go on later.

    The input is walked first, then `prediction` (billed as output), counted apart.
    """

    def __init__(self, body: Any, raw: bytes, kind: Endpoint, provider: str, default_output: int) -> None:
        model = body.get("model") if isinstance(body, dict) else None
        self.provider, self.model = provider, model if isinstance(model, str) else ""
        self.tokens = 0
        self.exact_left = EXACT_CHARS
        self.stack: list[Any] = []
        self.prediction: Any = None
        self.input_tokens: int | None = None  # set when the walk reaches the prediction
        self.output = _output(body, default_output) if kind.generates and (body is not None or raw) else 0
        if kind is Endpoint.COUNT_TOKENS:
            return  # free: Anthropic bills token counting nothing
        if isinstance(body, dict):
            self._start(body)
        elif body is not None:
            self.stack.append(body)
        elif raw:
            self.tokens += media.audio_tokens(len(raw))  # not JSON: an upload (audio, a file)

    def _start(self, body: dict[str, Any]) -> None:
        for key, value in body.items():
            if key not in UNBILLED:
                self.stack += (key, (_PROMPT, value) if key in PROMPT_FIELDS and type(value) is list else value)
        self.prediction = body.get("prediction")
        if self.provider == "anthropic" and body.get("tools"):
            self.tokens += ANTHROPIC_TOOL_PROMPT

    def result(self) -> Estimate:
        if self.input_tokens is None:
            return Estimate(self.tokens, self.output)
        return Estimate(self.input_tokens, self.output + self.tokens - self.input_tokens)

    def run(self, work: int | None) -> bool:
        """Walk until done (True) or until the next item would pass `work` units (False)."""
        stack, visit, budget = self.stack, self._visit, work or 0
        while True:
            if work is None:
                while stack:
                    visit(stack.pop())
            while stack:
                cost = self._cost(stack[-1])
                if cost > budget:
                    return False
                budget -= cost
                visit(stack.pop())
            if self.prediction is None:
                return True
            self.input_tokens = self.tokens
            stack.append(self.prediction)
            self.prediction = None

    def heavy_next(self) -> bool:
        """The next item is more work than a slice: a long text, a big list of ids, a document."""
        return bool(self.stack) and self._cost(self.stack[-1]) > INLINE_WORK

    def step(self) -> None:
        self._visit(self.stack.pop())

    def _visit(self, item: Any) -> None:
        kind = type(item)
        if kind is str:
            self.tokens += self.text(item)
        elif kind is dict:
            self._object(item, False)
        elif kind is list:
            self.stack.extend(item)
        elif kind is tuple:
            if item[0] is _PART:
                self._object(item[1], True)
            else:
                self._prompt(item[1])
        else:
            self.tokens += _scalar_tokens(item)

    def _prompt(self, items: list[Any]) -> None:
        """A list of messages, prompts or content parts: token ids, or items that may be media."""
        ids = _token_ids(items)
        if ids is not None:
            self.tokens += ids
            return
        self.stack.extend((_PART, item) if type(item) is dict else item for item in items)

    def _object(self, item: dict[str, Any], part: bool) -> None:
        """An object: one token, its keys, its values; a media part, its figure instead of its data."""
        self.tokens += 1
        skip: tuple[str, ...] = ()
        if part:
            kind = item.get("type")
            handler = media.HANDLERS.get(kind) if type(kind) is str else None
            if handler is not None:
                figure, skip = handler(item, self.provider, self.model)
                self.tokens += figure
        stack, cache, tokens = self.stack, _cache, 0
        for key, value in item.items():
            if key in skip:
                continue
            if len(key) <= SHORT_TEXT:  # short texts at once (a long one waits its turn on the stack)
                known = cache.get(key)
                tokens += known if known is not None else self._count(key)
            else:
                stack.append(key)
            if type(value) is str and len(value) <= SHORT_TEXT:
                known = cache.get(value)
                tokens += known if known is not None else self._count(value)
            elif part and key in PART_LISTS and type(value) is list:
                stack.append((_PROMPT, value))
            elif part and key == "source" and type(value) is dict:
                stack.append((_PART, value))  # an Anthropic content document's source holds parts (images)
            else:
                stack.append(value)
        self.tokens += tokens

    def _cost(self, item: Any) -> int:
        """Work units of an item: characters to count (none for a text counted before), 8 a node."""
        kind = type(item)
        if kind is str:
            return 1 if len(item) <= SHORT_TEXT or _cache_get(item) is not None else len(item)
        if kind is tuple:
            value = item[1]
            if item[0] is _PROMPT:
                return 8 + len(value)
            kind = value.get("type")
            return media.work(value) if type(kind) is str and kind in media.HANDLERS else 8 + len(value)
        return 8 + len(item) if kind is dict else 8

    def text(self, text: str) -> int:
        """Tokens of a text: remembered, exact up to this request's allowance, else its bytes."""
        known = _cache.get(text) if len(text) <= SHORT_KEY else _cache_get(text)
        return known if known is not None else self._count(text)

    def _count(self, text: str) -> int:
        size = len(text)
        exact = min(size, max(self.exact_left, 0))
        self.exact_left -= size
        if exact < size:
            return chunked_tokens(text[:exact]) + utf8_bytes(text[exact:])
        tokens = chunked_tokens(text)
        _cache_put(text, tokens)
        return tokens


def chunked_tokens(text: str) -> int:
    """cl100k tokens of a text, counted in pieces cut before a space where one is near."""
    total, start, size = 0, 0, len(text)
    while start < size:
        end = min(size, start + CHUNK_CHARS)
        if end < size:
            cut = text.rfind(" ", end - 256, end)
            end = cut if cut > start else end
        total += count_tokens(text[start:end])
        start = end
    return total


def utf8_bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


# -- the count cache: short texts by themselves, longer ones by length and hash (holding no text) --

_cache: dict[Any, int] = {}


def _cache_key(text: str) -> Any:
    size = len(text)
    if size <= SHORT_KEY:
        return text
    return (size, hash(text)) if size <= CACHED_CHARS else None


def _cache_get(text: str) -> int | None:
    key = _cache_key(text)
    return None if key is None else _cache.get(key)


def _cache_put(text: str, tokens: int) -> None:
    key = _cache_key(text)
    if key is None:
        return
    if len(_cache) >= CACHE_ENTRIES:
        for old in list(_cache)[: CACHE_ENTRIES // 4]:  # the oldest quarter
            _cache.pop(old, None)
    _cache[key] = tokens


# -- pieces ----------------------------------------------------------------------------------------


def _scalar_tokens(value: Any) -> int:
    """true, false, null: one token; a number: its digits in threes, as cl100k splits them."""
    if isinstance(value, bool) or value is None:
        return 1
    if isinstance(value, int):  # digits from the bit length: no huge int is ever turned into text
        return max(1, -(-(value.bit_length() * 30103 // 100000 + 2) // 3))
    return max(1, -(-len(repr(value)) // 3)) if isinstance(value, float) else 1


def _token_ids(value: list[Any]) -> int | None:
    """Tokens of a prompt given as token ids (a list of integers, or a list of such lists)."""
    first = type(value[0]) if value else None
    if first is int and all(type(v) is int for v in value):
        return len(value)
    if first is list and all(type(v) is list and all(type(i) is int for i in v) for v in value):
        return sum(len(v) for v in value)
    return None


def _output(body: Any, default: int) -> int:
    if not isinstance(body, dict):
        return default
    requested = requested_output(body)
    return (default if requested is None else requested) * completions_requested(body)
