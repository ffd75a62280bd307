"""Which endpoint a request calls, decided once: the path decoded and normalised, classified, and
that same normalised path forwarded, so that no spelling means one thing here and another upstream.

    raw path ─► segments (escapes decoded once; empty segments dropped) ─► route prefix ─► Endpoint
            └─► refused: a '%' that is no escape, bytes that are not UTF-8, an encoded '/' or a
                backslash, a control character (400); '.' and '..' segments (404)
    forwarded: the route's segments re-encoded canonically (RFC 3986 pchar), the query as sent

What is not recognised is `Endpoint.OTHER`, and OTHER fails closed: a gateway-held provider key
does not reach it, and a cents or token budget refuses it unless it has a per-call price.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote_to_bytes

if TYPE_CHECKING:
    from .config import Upstream

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PCHAR_SAFE = "!$&'()*+,;=:@"  # kept as they are, with the unreserved characters (RFC 3986 §3.3)
_METHOD = re.compile(r"[A-Z]+|\*")


class RouteError(ValueError):
    """A path the gateway does not forward: 404 when it names no route (`unknown`), else 400."""

    def __init__(self, message: str, unknown: bool = False) -> None:
        super().__init__(message)
        self.unknown = unknown


class Endpoint(Enum):
    """What a request asks of its provider, as far as metering and key scope care."""

    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"
    MESSAGES = "messages"
    COUNT_TOKENS = "count_tokens"
    MODELS = "models"
    OTHER = "other"

    @property
    def metered(self) -> bool:
        """Its response reports the usage it is charged for."""
        return self in _METERED

    @property
    def free(self) -> bool:
        """It costs nothing (model lists, token counting)."""
        return self in (Endpoint.COUNT_TOKENS, Endpoint.MODELS)

    @property
    def inference(self) -> bool:
        """A gateway-held provider key reaches it by default."""
        return self is not Endpoint.OTHER

    @property
    def generates(self) -> bool:
        """It generates output tokens, and may stream them."""
        return self in _GENERATES


_GENERATES = frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.RESPONSES, Endpoint.MESSAGES})
_METERED = _GENERATES | {Endpoint.EMBEDDINGS}

# (method, path after an optional leading /v1) -> endpoint; "*" stands for one segment (an id)
_CLASSES: dict[str, dict[tuple[str, tuple[str, ...]], Endpoint]] = {
    "openai": {
        ("POST", ("chat", "completions")): Endpoint.CHAT,
        ("POST", ("completions",)): Endpoint.COMPLETIONS,
        ("POST", ("embeddings",)): Endpoint.EMBEDDINGS,
        ("POST", ("responses",)): Endpoint.RESPONSES,
        ("POST", ("responses", "input_tokens")): Endpoint.COUNT_TOKENS,
        ("GET", ("models",)): Endpoint.MODELS,
        ("GET", ("models", "*")): Endpoint.MODELS,
    },
    "anthropic": {
        ("POST", ("messages",)): Endpoint.MESSAGES,
        ("POST", ("messages", "count_tokens")): Endpoint.COUNT_TOKENS,
        ("GET", ("models",)): Endpoint.MODELS,
        ("GET", ("models", "*")): Endpoint.MODELS,
    },
}


def endpoint(provider: str, method: str, segments: Sequence[str]) -> Endpoint:
    """The endpoint of a request, from the decoded segments of its path after the route prefix."""
    rest = tuple(segments[1:] if segments[:1] == ("v1",) else segments)
    table = _CLASSES.get(provider, {})
    found = table.get((method, rest))
    if found is None and len(rest) == 2:
        found = table.get((method, (rest[0], "*")))
    return found or Endpoint.OTHER


def normalise(raw_path: str) -> tuple[str, ...]:
    """The decoded segments of a request path, empty ones (repeated and trailing slashes) dropped."""
    if not raw_path.startswith("/"):
        raise RouteError(f"request target {raw_path[:200]!r} is not a path")
    return tuple(_segment(raw) for raw in raw_path.split("/") if raw)


def _segment(raw: str) -> str:
    """One segment, decoded once; what an upstream could read as another path is refused."""
    if _BAD_ESCAPE.search(raw):
        raise RouteError(f"path segment {raw[:200]!r} has a '%' that is not a percent-escape (%XX)")
    try:
        text = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise RouteError(f"path segment {raw[:200]!r} does not decode to UTF-8 text") from None
    if "/" in text or "\\" in text:
        raise RouteError(f"path segment {raw[:200]!r} holds an encoded '/' or a backslash, which upstreams read apart")
    if _CONTROL.search(text):
        raise RouteError(f"path segment {raw[:200]!r} holds a control character")
    if text.split(";", 1)[0] in (".", ".."):
        raise RouteError(f"path segment {raw[:200]!r} is a '.' or '..' segment: only plain paths are forwarded", True)
    return text


def encode(segments: Iterable[str]) -> str:
    """Decoded segments as a path on the wire: one canonical encoding."""
    return "".join("/" + quote(s, safe=_PCHAR_SAFE) for s in segments) or "/"


@dataclass(frozen=True, slots=True)
class Pattern:
    """`METHOD /path` from the config: a method or `*`; segments literal, `*` (any one segment) or
    a last `**` (any number of segments, none included)."""

    text: str
    method: str
    parts: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Pattern:
        method, _, path = text.strip().partition(" ")
        method, path = method.upper(), path.strip()
        if not _METHOD.fullmatch(method) or not path.startswith("/") or " " in path:
            raise ValueError("expected 'METHOD /path', e.g. 'POST /v1/images/generations' or 'GET /v1/files/*'")
        parts = tuple(p for p in path.split("/") if p)
        if any(p in (".", "..") or "%" in p for p in parts):
            raise ValueError("the path must be plain: no '.', '..' or percent-escapes")
        if "**" in parts[:-1]:
            raise ValueError("'**' may only be the last segment")
        return cls(text, method, parts)

    def matches(self, method: str, segments: Sequence[str]) -> bool:
        if self.method != "*" and self.method != method:
            return False
        parts = self.parts
        if parts[-1:] == ("**",):
            parts = parts[:-1]
            if len(segments) < len(parts):
                return False
            segments = segments[: len(parts)]
        return len(parts) == len(segments) and all(p in ("*", s) for p, s in zip(parts, segments, strict=True))

    @property
    def literal(self) -> bool:
        return not any(p in ("*", "**") for p in self.parts) and self.method != "*"


@dataclass(frozen=True, slots=True)
class Route:
    """A request's destination, decided once: what it is, and exactly what is forwarded."""

    prefix: str  # the route's first segment: "v1", "anthropic" or a configured upstream's name
    upstream: Upstream
    method: str
    segments: tuple[str, ...]  # the normalised gateway path, decoded
    path: str  # the path appended to the upstream's base URL: normalised, canonically encoded
    endpoint: Endpoint

    @property
    def gateway_path(self) -> str:
        """The path as a client called it, normalised and decoded."""
        return "/" + "/".join(self.segments)

    @property
    def name(self) -> str:
        """`METHOD /path`, for messages and the log line."""
        return f"{self.method} {self.gateway_path}"


def resolve(routes: dict[str, Upstream], method: str, raw_path: str) -> Route:
    """The route of a request; RouteError for a path that cannot be forwarded or names no route."""
    segments = normalise(raw_path)
    upstream = routes.get(segments[0]) if segments else None
    if upstream is None:
        raise RouteError(
            f"no route for {encode(segments)!r}: use /v1/... (OpenAI), /anthropic/... or a configured "
            f"upstream ({', '.join('/' + r for r in routes)})",
            unknown=True,
        )
    rest = segments if segments[0] == "v1" else segments[1:]
    kind = endpoint(upstream.provider, method, rest)
    return Route(segments[0], upstream, method, segments, encode(rest), kind)


def patterns(raw: Any) -> tuple[Pattern, ...]:
    """A config list of `METHOD /path` strings; ValueError naming the entry that is wrong."""
    if not isinstance(raw, list | tuple) or not all(isinstance(p, str) for p in raw):
        raise ValueError("must be a list of 'METHOD /path' strings")
    parsed = []
    for text in raw:
        try:
            parsed.append(Pattern.parse(text))
        except ValueError as exc:
            raise ValueError(f"entry {text!r}: {exc}") from None
    return tuple(parsed)


_BOOLEAN = (bool, type(None))
_INTEGER = (int, type(None))
_OBJECT = (dict, type(None))
_COUNTS = ("n", "best_of", "max_tokens", "max_completion_tokens", "max_output_tokens")


def misread_field(kind: Endpoint, body: dict[str, Any]) -> tuple[str, str] | None:
    """A field the gateway decides on whose value an upstream could read otherwise ("stream": 1,
    "n": "5"): its name and what it must be; None when every such field is plain."""
    if not kind.generates:
        return None
    if not isinstance(body.get("stream"), _BOOLEAN):
        return "stream", "true, false or null"
    for name in _COUNTS:
        value = body.get(name)
        if value is not None and (value.__class__ is bool or not isinstance(value, _INTEGER)):
            return name, "an integer or null"
    options = body.get("stream_options")
    if not isinstance(options, _OBJECT):
        return "stream_options", "an object or null"
    if options is not None and not isinstance(options.get("include_usage"), _BOOLEAN):
        return "stream_options.include_usage", "true, false or null"
    return None
