"""The benchmark's fake LLM provider: a bare asyncio Protocol on uvloop answering canned bytes.

It must be far faster than anything it sits behind, so it parses only what HTTP/1.1 keep-alive
needs (the end of the head, Content-Length, Connection: close) and answers every request with
bytes built once at start:

- `POST .../chat/completions` with `"stream": true` in the body: an OpenAI SSE stream, chunked,
  the first event sent at once and the next ones `--chunk-delay` seconds apart (the usage chunk
  too when the body asks for `include_usage`), so that a proxy that buffers shows it in its time
  to first byte;
- any other request: an OpenAI chat completion JSON with a usage block, and the response headers
  the real API sends (request id, rate-limit headers, processing time).

`GET /__bench/stats` answers how many requests it has served (and is not counted), so that the
benchmark can check that a gateway really forwarded what it answered 200 for.

    python bench/upstream.py --port 9000 [--chunk-delay 0.005]

`bench/streams.py` runs it with longer streams, as a real model sends them: `--stream-words 40`
content events 50 ms apart (`--chunk-delay 0.05`), `"usage":null` in every chunk of a stream that
asks for its usage (`--usage-null`, as OpenAI does), and `--prompt-tokens` in that usage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
from typing import cast

import orjson

COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion",
        "created": 1741569952,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Requests queue up,\nbudgets counted one by one,\nthe gateway says wait.",
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 26,
            "completion_tokens": 18,
            "total_tokens": 44,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_06737a9306",
    }
)

_COMMON_HEADERS = (
    b"openai-organization: user-bench\r\n"
    b"openai-processing-ms: 312\r\n"
    b"openai-version: 2020-10-01\r\n"
    b"x-ratelimit-limit-requests: 30000\r\n"
    b"x-ratelimit-limit-tokens: 150000000\r\n"
    b"x-ratelimit-remaining-requests: 29999\r\n"
    b"x-ratelimit-remaining-tokens: 149999975\r\n"
    b"x-ratelimit-reset-requests: 2ms\r\n"
    b"x-ratelimit-reset-tokens: 0s\r\n"
    b"x-request-id: req_8f2d1c0b7a6e4d3c9b8a7f6e5d4c3b2a\r\n"
)

JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(COMPLETION)).encode() + b"\r\n" + _COMMON_HEADERS + b"\r\n" + COMPLETION
)
JSON_RESPONSE_CLOSE = JSON_RESPONSE.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)

STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Transfer-Encoding: chunked\r\n" + _COMMON_HEADERS + b"\r\n"
)
STREAM_WORDS = ("Requests", " queue", " up,", " budgets", " counted", " one", " by", " one,", " the", " gateway")


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(
    delta: dict[str, object],
    finish: str | None = None,
    usage: tuple[int, int] | None = None,
    usage_null: bool = False,
) -> bytes:
    data: dict[str, object] = {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion.chunk",
        "created": 1741569952,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_06737a9306",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage is not None:
        data["choices"] = []
        data["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}
    elif usage_null:
        data["usage"] = None
    return _chunk(b"data: " + orjson.dumps(data) + b"\n\n")


def stream_events(words: int, usage_null: bool = False) -> list[bytes]:
    """The events of a stream of `words` content events (the role event first, the finish last)."""
    texts = [STREAM_WORDS[i % len(STREAM_WORDS)] for i in range(words)]
    return (
        [_event({"role": "assistant", "content": "", "refusal": None}, usage_null=usage_null)]
        + [_event({"content": text}, usage_null=usage_null) for text in texts]
        + [_event({}, finish="stop", usage_null=usage_null)]
    )


STREAM_EVENTS = stream_events(len(STREAM_WORDS))
STREAM_USAGE = _event({}, usage=(26, len(STREAM_WORDS)))
STREAM_END = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"

NOT_SUPPORTED = b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Counter:
    """Requests answered, shared by every connection of the process."""

    served = 0


class Upstream(asyncio.Protocol):
    """One keep-alive connection: heads and bodies parsed just enough to frame requests."""

    chunk_delay = 0.005
    events = STREAM_EVENTS  # without usage asked
    events_usage = [*STREAM_EVENTS, STREAM_USAGE]  # with `include_usage`

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.streaming = False
        self.queued: list[tuple[bool, bool]] = []
        self.task: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.buffer:
            data, self.buffer = self.buffer + data, b""
        while data:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = data
                return
            length = _content_length(data, end)
            if length < 0:
                self._reply(NOT_SUPPORTED, close=True)
                return
            stop = end + 4 + length
            if len(data) < stop:
                self.buffer = data
                return
            self._answer(data[:end], data[end + 4 : stop])
            data = data[stop:]

    def _answer(self, head: bytes, body: bytes) -> None:
        close = b"onnection:" in head and _wants_close(head)
        if head.startswith(b"GET /__bench/"):
            self._stats(close)
            return
        Counter.served += 1
        stream = b'"stream"' in body and (b'"stream":true' in body or b'"stream": true' in body)
        if stream or self.streaming:
            self.queued.append((stream, b"include_usage" in body))
            if not self.streaming:
                self._next_queued(close)
            return
        self._reply(JSON_RESPONSE_CLOSE if close else JSON_RESPONSE, close=close)

    def _stats(self, close: bool) -> None:
        payload = orjson.dumps({"served": Counter.served})
        length = str(len(payload)).encode()
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + length + b"\r\n\r\n"
        self._reply(head + payload, close=close)

    def _next_queued(self, close: bool) -> None:
        """Pipelined requests behind a stream wait for it (HTTP/1.1 answers in order)."""
        while self.queued and not self.streaming:
            stream, usage = self.queued.pop(0)
            if stream:
                self.streaming = True
                self.task = asyncio.ensure_future(self._stream(usage, close))
            else:
                self._reply(JSON_RESPONSE)

    async def _stream(self, usage: bool, close: bool) -> None:
        events = self.events_usage if usage else self.events
        self._reply(STREAM_HEAD + events[0])
        for event in events[1:]:
            await asyncio.sleep(self.chunk_delay)
            self._reply(event)
        self._reply(STREAM_END, close=close)
        self.streaming = False
        self._next_queued(close)

    def _reply(self, data: bytes, close: bool = False) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(data)
        if close:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


def _content_length(data: bytes, end: int) -> int:
    """The body length of the request whose head ends at `end`; -1 for a chunked body (not supported)."""
    at = data.find(b"Content-Length: ", 0, end)
    if at >= 0:
        stop = data.find(b"\r\n", at, end)
        return int(data[at + 16 : stop if stop >= 0 else end])
    lower = data[:end].lower()
    if b"\r\ntransfer-encoding:" in lower:
        return -1
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    stop = lower.find(b"\r\n", at + 17)
    return int(lower[at + 17 : stop if stop >= 0 else None])


def _wants_close(head: bytes) -> bool:
    lower = head.lower()
    return b"\r\nconnection: close" in lower or head.split(b"\r\n", 1)[0].endswith(b"HTTP/1.0")


def configure(chunk_delay: float, words: int, prompt_tokens: int, usage_null: bool) -> None:
    """The streams every connection sends."""
    Upstream.chunk_delay = chunk_delay
    Upstream.events = stream_events(words)
    Upstream.events_usage = [*stream_events(words, usage_null), _event({}, usage=(prompt_tokens, words))]


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, host, port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"upstream listening on http://{host}:{port} (pid {os.getpid()})", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--chunk-delay", type=float, default=0.005, help="seconds between stream events")
    parser.add_argument("--stream-words", type=int, default=len(STREAM_WORDS), help="content events per stream")
    parser.add_argument("--prompt-tokens", type=int, default=26, help="prompt_tokens in a stream's usage")
    parser.add_argument("--usage-null", action="store_true", help='"usage":null in the chunks of a stream asking usage')
    args = parser.parse_args()
    configure(args.chunk_delay, args.stream_words, args.prompt_tokens, args.usage_null)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    runner(serve(args.host, args.port))


if __name__ == "__main__":
    main()
