"""A fake OpenAI and Anthropic provider, for the test suite, the benchmark and `quotagate demo`.

It answers the routes the gateway forwards with realistic bodies: JSON with usage blocks and SSE
streams shaped like the real ones (OpenAI chat and completions chunks with the optional usage
chunk, the responses API's typed events, Anthropic's message events). It records every request it
receives so that tests can count exactly what reached the upstream.

Usage is deterministic: the prompt costs one token per word of every text it sends the model
(messages in any shape, system prompts, tool definitions, tool calls and results, response formats:
every string outside the settings, as a provider bills them; images and files count as one word
each), and one per token id (at least 1 in all), the reply
has `max_tokens` words (at most 12 by default). Request headers steer it (they pass through the
gateway like any header):

    X-Fake-Prompt-Tokens / X-Fake-Completion-Tokens / X-Fake-Cached-Tokens / X-Fake-Cache-Write-Tokens
    X-Fake-Cache-Write-1h-Tokens  of the cache writes, those kept an hour (Anthropic's `cache_creation`)
    X-Fake-Web-Searches: 3   Anthropic web searches the call reports (`usage.server_tool_use`)
    X-Fake-Status: 500       answer with this status and an error body
    X-Fake-Delay: 0.2        seconds to wait before answering
    X-Fake-Chunk-Delay: 0.05 seconds between stream events
    X-Fake-Cut-After: 3      send that many stream events, then drop the connection
    X-Fake-Reset: 1          drop the connection without answering
    X-Fake-Garbage: 1        put a malformed event (not JSON) in the middle of a stream
    X-Fake-Hold: name        wait until `release(name)` is called: streams after their first event,
                             other answers before they are sent; a caller that closes the connection
                             meanwhile is recorded in `abandoned`
    X-Fake-Hold-After: 3     hold a stream after that many events instead of the first
    X-Fake-Linger: 0.3       seconds to keep a stream open after its last event
    X-Fake-Model: name       report this model in the response
    X-Fake-Pad: 2000         make each word of the reply that many characters longer
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from .accept import BACKLOG, EagerSite
from .connections import GatewayRunner

DEFAULT_REPLY_TOKENS = 12
_ids = itertools.count(1)


@dataclass(slots=True)
class Received:
    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes
    target: str = ""  # the request line's target as it arrived: path and query, escapes kept

    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None


@dataclass(slots=True)
class Plan:
    """What one request asked the fake to do."""

    model: str
    prompt: int
    completion: int
    cached: int = 0
    cache_write: int = 0
    cache_write_1h: int = 0  # of the cache writes, those kept an hour (reported in `cache_creation`)
    service_tier: str = "default"  # "priority" when the request asks for it (OpenAI bills it higher)
    web_searches: int = 0  # Anthropic's server web searches, reported in `usage.server_tool_use`
    status: int = 200
    delay: float = 0.0
    chunk_delay: float = 0.0
    cut_after: int | None = None
    hold: str | None = None
    hold_after: int = 1
    linger: float = 0.0
    pad: int = 0

    @property
    def words(self) -> list[str]:
        """The reply's text: a word per completion token, up to 4,096 (usage may claim more), each
        `pad` characters longer when asked (big streams)."""
        return [f" word{i}" + "x" * self.pad for i in range(min(self.completion, 4096))]


# What the fake does not bill: settings, and the parts of a message that are not its text.
_SETTINGS = frozenset(
    {
        "model",
        "user",
        "metadata",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "temperature",
        "n",
        "best_of",
        "encoding_format",
        "tool_choice",
        "prediction",
        "reasoning",
        "reasoning_effort",
        "thinking",
        "service_tier",
        "seed",
        "top_p",
        "top_k",
        "logprobs",
        "top_logprobs",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "parallel_tool_calls",
        "store",
        "modalities",
        "audio",
        "include",
        "truncation",
        "previous_response_id",
        "safety_identifier",
        "prompt_cache_key",
        "verbosity",
        "dimensions",
        "background",
        "echo",
    }
)
_NOT_TEXT = frozenset({"role", "type", "url", "image_url", "data", "file_data", "file_id", "media_type", "detail"})


def billed_words(body: dict[str, Any]) -> int:
    """The prompt's tokens as the fake bills them: words of every billed string, token ids."""
    words = 0
    stack: list[Any] = [v for k, v in body.items() if k not in _SETTINGS]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            words += len(item.split())
        elif isinstance(item, list):
            words += sum(1 for v in item if type(v) is int)
            stack.extend(item)
        elif isinstance(item, dict):
            words += 1 if item.keys() & {"image_url", "source", "file", "file_data", "input_audio"} else 0
            stack.extend(v for k, v in item.items() if k not in _NOT_TEXT)
    return words


def _plan(request: web.Request, body: dict[str, Any]) -> Plan:
    h = request.headers
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or body.get("max_output_tokens")
    completion = min(int(max_tokens), DEFAULT_REPLY_TOKENS) if max_tokens else DEFAULT_REPLY_TOKENS
    cut = h.get("X-Fake-Cut-After")
    return Plan(
        model=h.get("X-Fake-Model") or str(body.get("model") or "gpt-4o-mini"),
        prompt=int(h.get("X-Fake-Prompt-Tokens", max(1, billed_words(body)))),
        completion=int(h.get("X-Fake-Completion-Tokens", completion)),
        cached=int(h.get("X-Fake-Cached-Tokens", 0)),
        cache_write=int(h.get("X-Fake-Cache-Write-Tokens", 0)),
        cache_write_1h=int(h.get("X-Fake-Cache-Write-1h-Tokens", 0)),
        service_tier="priority" if body.get("service_tier") == "priority" else "default",
        web_searches=int(h.get("X-Fake-Web-Searches", 0)),
        status=int(h.get("X-Fake-Status", 200)),
        delay=float(h.get("X-Fake-Delay", 0)),
        chunk_delay=float(h.get("X-Fake-Chunk-Delay", 0)),
        cut_after=int(cut) if cut else None,
        hold=h.get("X-Fake-Hold"),
        hold_after=int(h.get("X-Fake-Hold-After", 1)),
        linger=float(h.get("X-Fake-Linger", 0)),
        pad=min(int(h.get("X-Fake-Pad", 0)), 1 << 20),
    )


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + (data if isinstance(data, bytes) else orjson.dumps(data)) + b"\n\n"


# --- OpenAI ----------------------------------------------------------------------------------


def _openai_usage(plan: Plan) -> dict[str, Any]:
    return {
        "prompt_tokens": plan.prompt,
        "completion_tokens": plan.completion,
        "total_tokens": plan.prompt + plan.completion,
        "prompt_tokens_details": {"cached_tokens": plan.cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def chat_completion(plan: Plan) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-fake{next(_ids)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": plan.model,
        "system_fingerprint": "fp_fake",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(plan.words).strip(), "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _openai_usage(plan),
        "service_tier": plan.service_tier,
    }


def chat_chunks(plan: Plan, include_usage: bool) -> list[bytes]:
    base = {
        "id": f"chatcmpl-fake{next(_ids)}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": plan.model,
        "system_fingerprint": "fp_fake",
    }
    tail = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse({**base, "choices": [choice], **tail})

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [chunk({"content": word}) for word in plan.words]
    events.append(chunk({}, "stop"))
    if include_usage:
        tier = {"service_tier": plan.service_tier} if plan.service_tier != "default" else {}
        events.append(_sse({**base, "choices": [], "usage": _openai_usage(plan), **tier}))
    events.append(b"data: [DONE]\n\n")
    return events


def completion(plan: Plan) -> dict[str, Any]:
    return {
        "id": f"cmpl-fake{next(_ids)}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": plan.model,
        "choices": [{"index": 0, "text": "".join(plan.words), "logprobs": None, "finish_reason": "length"}],
        "usage": {
            "prompt_tokens": plan.prompt,
            "completion_tokens": plan.completion,
            "total_tokens": plan.prompt + plan.completion,
        },
    }


def completion_chunks(plan: Plan, include_usage: bool) -> list[bytes]:
    base = {
        "id": f"cmpl-fake{next(_ids)}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": plan.model,
    }
    tail = {"usage": None} if include_usage else {}
    events = [
        _sse({**base, "choices": [{"index": 0, "text": w, "logprobs": None, "finish_reason": None}], **tail})
        for w in plan.words
    ]
    if include_usage:
        events.append(
            _sse(
                {
                    **base,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": plan.prompt,
                        "completion_tokens": plan.completion,
                        "total_tokens": plan.prompt + plan.completion,
                    },
                }
            )
        )
    events.append(b"data: [DONE]\n\n")
    return events


def embeddings(plan: Plan, body: dict[str, Any]) -> dict[str, Any]:
    inputs = body.get("input")
    count = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
    return {
        "object": "list",
        "model": plan.model,
        "data": [{"object": "embedding", "index": i, "embedding": [0.001 * (i + 1)] * 8} for i in range(count)],
        "usage": {"prompt_tokens": plan.prompt, "total_tokens": plan.prompt},
    }


def models() -> dict[str, Any]:
    names = ["gpt-4o", "gpt-4o-mini", "gpt-4.1-mini", "text-embedding-3-small"]
    return {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": 1715367049, "owned_by": "system"} for n in names],
    }


def _response_object(plan: Plan, status: str, with_output: bool) -> dict[str, Any]:
    text = "".join(plan.words).strip()
    output = (
        [
            {
                "type": "message",
                "id": "msg_fake",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ]
        if with_output
        else []
    )
    usage = {
        "input_tokens": plan.prompt,
        "input_tokens_details": {"cached_tokens": plan.cached},
        "output_tokens": plan.completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": plan.prompt + plan.completion,
    }
    return {
        "id": "resp_fake",
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": plan.model,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "temperature": 1.0,
        "top_p": 1.0,
        "text": {"format": {"type": "text"}},
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "metadata": {},
        "usage": usage if status == "completed" else None,
        **({"service_tier": plan.service_tier} if plan.service_tier != "default" else {}),
    }


def response_events(plan: Plan) -> list[bytes]:
    seq = itertools.count()
    text = "".join(plan.words).strip()

    def ev(kind: str, **data: Any) -> bytes:
        return _sse({"type": kind, "sequence_number": next(seq), **data}, kind)

    item = {"type": "message", "id": "msg_fake", "status": "in_progress", "role": "assistant", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    events = [
        ev("response.created", response=_response_object(plan, "in_progress", False)),
        ev("response.in_progress", response=_response_object(plan, "in_progress", False)),
        ev("response.output_item.added", output_index=0, item=item),
        ev("response.content_part.added", item_id="msg_fake", output_index=0, content_index=0, part=part),
    ]
    events += [
        ev("response.output_text.delta", item_id="msg_fake", output_index=0, content_index=0, delta=w, logprobs=[])
        for w in plan.words
    ]
    events += [
        ev("response.output_text.done", item_id="msg_fake", output_index=0, content_index=0, text=text, logprobs=[]),
        ev(
            "response.content_part.done",
            item_id="msg_fake",
            output_index=0,
            content_index=0,
            part={**part, "text": text},
        ),
        ev(
            "response.output_item.done",
            output_index=0,
            item={**item, "status": "completed", "content": [{**part, "text": text}]},
        ),
        ev("response.completed", response=_response_object(plan, "completed", True)),
    ]
    return events


# --- Anthropic -------------------------------------------------------------------------------


def _anthropic_usage(plan: Plan, output: int) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "input_tokens": max(0, plan.prompt - plan.cached - plan.cache_write),
        "cache_creation_input_tokens": plan.cache_write,
        "cache_read_input_tokens": plan.cached,
        "output_tokens": output,
        "service_tier": "standard",
    }
    if plan.web_searches:
        usage["server_tool_use"] = {"web_search_requests": plan.web_searches, "web_fetch_requests": 0}
    if plan.cache_write_1h:
        usage["cache_creation"] = {
            "ephemeral_5m_input_tokens": max(0, plan.cache_write - plan.cache_write_1h),
            "ephemeral_1h_input_tokens": plan.cache_write_1h,
        }
    return usage


def message(plan: Plan) -> dict[str, Any]:
    return {
        "id": f"msg_fake{next(_ids)}",
        "type": "message",
        "role": "assistant",
        "model": plan.model,
        "content": [{"type": "text", "text": "".join(plan.words).strip()}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": _anthropic_usage(plan, plan.completion),
    }


def message_events(plan: Plan) -> list[bytes]:
    start_usage = _anthropic_usage(plan, 1)
    searches = start_usage.pop("server_tool_use", None)  # (searches are made, and reported, later)
    start = {**message(plan), "content": [], "stop_reason": None, "usage": start_usage}
    events = [
        _sse({"type": "message_start", "message": start}, "message_start"),
        _sse(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            "content_block_start",
        ),
        _sse({"type": "ping"}, "ping"),
    ]
    events += [
        _sse(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}},
            "content_block_delta",
        )
        for w in plan.words
    ]
    events += [
        _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": plan.completion, **({"server_tool_use": searches} if searches else {})},
            },
            "message_delta",
        ),
        _sse({"type": "message_stop"}, "message_stop"),
    ]
    return events


# --- endpoints without a usage block --------------------------------------------------------


def _other(method: str, path: str, plan: Plan) -> dict[str, Any] | None:
    """Token counting, a model, images, files and batches: answers that report no usage."""
    head, _, last = path.rpartition("/")
    if method == "POST" and path.endswith(("/messages/count_tokens", "/responses/input_tokens")):
        return {"input_tokens": plan.prompt}
    if method == "GET" and head.endswith("/models"):
        return {"id": last, "object": "model", "created": 1715367049, "owned_by": "system"}
    if method == "POST" and path.endswith("/images/generations"):
        return {"created": int(time.time()), "data": [{"url": "https://example.invalid/fake.png"}]}
    if method == "GET" and path.endswith("/files"):
        return {"object": "list", "data": [], "has_more": False}
    if method == "DELETE" and head.endswith("/files"):
        return {"id": last, "object": "file", "deleted": True}
    if method == "POST" and path.endswith("/batches"):
        return {"id": f"batch_fake{next(_ids)}", "object": "batch", "status": "validating"}
    return None


# --- the server ------------------------------------------------------------------------------


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class FakeUpstream:
    """The fake provider as an aiohttp application, with a record of what it received (for tests;
    `record=False` keeps none, for a long-running `quotagate serve --fake-provider`)."""

    def __init__(self, record: bool = True) -> None:
        self.url = ""  # set by whoever serves it
        self.record = record
        self.received: list[Received] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.abandoned: list[str] = []  # holds whose caller closed the connection while held
        self.loop: asyncio.AbstractEventLoop | None = None
        self.app = web.Application(client_max_size=1024**3)
        self.app.router.add_route("*", "/{tail:.*}", self._handle)

    def count(self, suffix: str = "") -> int:
        """Requests received whose path ends with `suffix` (all of them by default)."""
        return sum(1 for r in self.received if r.path.endswith(suffix))

    def reset(self) -> None:
        """Forget what was received and every hold's gate (callable from any thread: done on the
        server's loop, so that a `release` of an earlier test cannot land after it)."""
        self._on_loop(self._reset)

    def _reset(self) -> None:
        self.received.clear()
        self.gates.clear()
        self.abandoned.clear()

    def _on_loop(self, action: Callable[[], None]) -> None:
        """`action()` on the server's loop, returned from once it ran (at once if there is no loop
        yet, or if called on it)."""
        loop = self.loop
        if loop is None or not loop.is_running() or _running_loop() is loop:
            action()
            return

        async def run() -> None:
            action()

        asyncio.run_coroutine_threadsafe(run(), loop).result(timeout=30)

    def _gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    async def _hold(self, name: str) -> None:
        try:
            await self._gate(name).wait()
        except asyncio.CancelledError:  # the caller closed the connection
            self.abandoned.append(name)
            raise

    def release(self, name: str) -> None:
        """Let a stream held with `X-Fake-Hold: name` go on (callable from any thread; the gate is
        open when this returns, so a later `reset` closes it again)."""
        assert self.loop is not None
        self._on_loop(lambda: self._gate(name).set())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.loop = asyncio.get_running_loop()
        raw = await request.read()
        if self.record:
            headers = CIMultiDict(request.headers)
            self.received.append(Received(request.method, request.path, headers, raw, request.raw_path))
        try:
            body = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            return _error(400, "invalid_request_error", "We could not parse the JSON body of your request.")
        body = body if isinstance(body, dict) else {}
        plan = _plan(request, body)
        if plan.delay:
            await asyncio.sleep(plan.delay)
        if request.headers.get("X-Fake-Reset") and request.transport is not None:
            request.transport.abort()  # connection reset before any byte of a response
            return web.Response()
        if plan.status != 200:
            kind = "rate_limit_error" if plan.status == 429 else "api_error"
            return _error(plan.status, kind, f"fake upstream error {plan.status}")
        if plan.hold and not body.get("stream"):
            await self._hold(plan.hold)
        return await self._route(request, body, plan)

    async def _route(self, request: web.Request, body: dict[str, Any], plan: Plan) -> web.StreamResponse:
        path, stream = request.path, bool(body.get("stream"))
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        if path.endswith("/chat/completions"):
            if stream:
                return await self._stream(request, chat_chunks(plan, include), plan)
            return _json(chat_completion(plan))
        if path.endswith("/completions"):
            if stream:
                return await self._stream(request, completion_chunks(plan, include), plan)
            return _json(completion(plan))
        if path.endswith("/embeddings"):
            return _json(embeddings(plan, body))
        if path.endswith("/responses"):
            if stream:
                return await self._stream(request, response_events(plan), plan)
            return _json(_response_object(plan, "completed", True))
        if path.endswith("/messages"):
            if stream:
                return await self._stream(request, message_events(plan), plan)
            return _json(message(plan))
        if path.endswith("/models") and request.method == "GET":
            return _json(models())
        answer = _other(request.method, path, plan)
        if answer is not None:
            return _json(answer)
        return _error(404, "invalid_request_error", f"Unknown request URL: {request.method} {path}")

    async def _stream(self, request: web.Request, events: list[bytes], plan: Plan) -> web.StreamResponse:
        if request.headers.get("X-Fake-Garbage"):
            events = [*events[:2], b"data: {not json at all\n\n", b": a comment line\n\n", *events[2:]]
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Fake-Upstream": "1",
            }
        )
        await response.prepare(request)
        for index, event in enumerate(events):
            if plan.cut_after is not None and index >= plan.cut_after:
                assert request.transport is not None
                request.transport.abort()  # a half stream: the connection drops mid-response
                return response
            await response.write(event)
            if plan.hold and index == plan.hold_after - 1:
                await self._hold(plan.hold)
            if plan.chunk_delay:
                await asyncio.sleep(plan.chunk_delay)
        if plan.linger:
            await asyncio.sleep(plan.linger)
        await response.write_eof()
        return response


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json", headers={"X-Fake-Upstream": "1"})


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": None, "code": None}},
        status=status,
        headers={"X-Fake-Upstream": "1"},
    )


class BackgroundServer:
    """Runs an aiohttp application on a real socket in a thread of its own (tests, demo); a gateway
    (`server.build_app`) gets the same connection bounds as under `quotagate serve`.

    With `handler_cancellation` (the default here) aiohttp cancels a handler whose client went
    away; `quotagate serve` runs without it, so a handler notices a gone client when it next writes.
    """

    def __init__(
        self, app: web.Application, host: str = "127.0.0.1", port: int = 0, handler_cancellation: bool = True
    ) -> None:
        self.app, self.host, self.port = app, host, port
        self.handler_cancellation = handler_cancellation
        self.loop = asyncio.new_event_loop()
        self._runner: GatewayRunner | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="fake-upstream")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)
        return self

    async def _start(self) -> None:
        self._runner = GatewayRunner(self.app, access_log=None, handler_cancellation=self.handler_cancellation)
        await self._runner.setup()
        site = EagerSite(self._runner, self.host, self.port, reuse_port=False, backlog=BACKLOG)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the bound port when asked for port 0

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def main(argv: list[str] | None = None) -> None:
    """`python -m quotagate.fake_upstream [--host H] [PORT]`: the fake provider alone, in the
    foreground (the benchmark's upstream); `quotagate serve --fake-provider` is the way to try it."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m quotagate.fake_upstream",
        description="Run the fake OpenAI and Anthropic provider alone, for benchmarks and experiments. "
        "To try quotagate without a provider account, run `quotagate serve --fake-provider` instead.",
    )
    parser.add_argument("port", nargs="?", type=int, default=9999, help="port to listen on (default: 9999)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"port must be from 1 to 65535, not {args.port}")
    web.run_app(FakeUpstream(record=False).app, host=args.host, port=args.port, access_log=None)


if __name__ == "__main__":
    main()
