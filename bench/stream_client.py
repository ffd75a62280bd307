"""The load of `bench/streams.py`: many concurrent streamed chat completions, timed event by event.

One process of it holds `--streams` keep-alive connections; on each, one streaming request after
another until `--seconds` have passed since `--start` (a CLOCK_MONOTONIC time, the same in every
process), then it lets the streams in flight finish. It is a bare asyncio Protocol on uvloop, not
an HTTP library: it frames what it needs (the head, the chunked body's end) and counts the SSE
events as they arrive, so that thousands of streams cost it little CPU beside the servers. Each
stream is recorded as `[start, first event, end, longest gap, events, ok, user, body, head]` (times in
seconds, from the start of the stream but `start` itself), and a stream is `ok` only if it answered
200 with the expected header, every event (`[DONE]` last) and the chunked body's end.

    python bench/stream_client.py SPEC.json OUT.json
"""

from __future__ import annotations

import asyncio
import random
import socket
import sys
import time
from typing import Any, cast

import orjson

_END = b"\r\n0\r\n\r\n"


class Connection(asyncio.Protocol):
    """One keep-alive connection, one stream at a time."""

    def __init__(self, header: bytes) -> None:
        self.header = header  # b"\r\nratelimit:" (lowercase) or b""
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[bool] | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.reset()

    def reset(self) -> None:
        self.head = b""
        self.in_body = False
        self.tail = b""
        self.events = 0
        self.sent = self.headed = self.first = self.last = self.end = 0.0
        self.gap = 0.0
        self.ok = False
        self.last_done = False  # [DONE] was the last event so far

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, request: bytes) -> asyncio.Future[bool]:
        assert self.transport is not None
        self.reset()
        self.done = asyncio.get_running_loop().create_future()
        self.sent = time.monotonic()
        self.transport.write(request)
        return self.done

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[: end + 2].lower(), self.head[end + 4 :]
            self.in_body = True
            self.headed = now
            self.ok = head.startswith(b"http/1.1 200") and b"transfer-encoding: chunked" in head
            if self.header and self.header not in head:
                self.ok = False
            self.tail = b"\r\n"
            if not data:
                return
        window = self.tail + data
        found = window.count(b"data:")
        if found:
            if not self.events:
                self.first = now
            else:
                self.gap = max(self.gap, now - self.last)
            self.last = now
            self.events += found
            self.last_done = window.rfind(b"data:") == window.find(b"data: [DONE]")
        self.tail = window[-7:]
        if self.tail == _END:
            self.ok = self.ok and self.last_done
            self.end = now
            self._finish(True)

    def _finish(self, result: bool) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(result)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._finish(False)
        if not self.lost.done():
            self.lost.set_result(None)


class Load:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.port = int(spec["port"])
        self.deadline = float(spec["start"]) + float(spec["seconds"])
        self.users = int(spec["users"])
        self.header = spec["header"].lower().encode()
        # each body has its last question left out ("@@QUESTION@@"): every request asks its own
        self.bodies = [tuple(b.encode().split(b"@@QUESTION@@", 1)) for b in spec["bodies"]]
        self.vocab = list(spec["vocab"])
        self.expected = [int(n) for n in spec["events"]]
        fixed = [
            "POST /v1/chat/completions HTTP/1.1",
            f"Host: 127.0.0.1:{self.port}",
            "Content-Type: application/json",
            "Accept: text/event-stream",
            "Authorization: Bearer sk-bench-not-a-real-key",
            "User-Agent: OpenAI/Python 1.54.0",
            f"Helicone-Auth: Bearer {spec['auth']}",
        ]
        if spec.get("policy"):
            fixed.append(f"Helicone-RateLimit-Policy: {spec['policy']}")
        self.fixed = "\r\n".join(fixed)
        self.records: list[list[float]] = []
        self.errors: list[str] = []
        self.rng = random.Random(int(spec.get("seed", 0)))

    def request(self, body: int, user: int) -> bytes:
        before, after = self.bodies[body]
        question = " ".join(self.rng.choices(self.vocab, k=40)).encode() + b"?"
        length = len(before) + len(question) + len(after)
        head = f"{self.fixed}\r\nHelicone-User-Id: user-{user}\r\nContent-Length: {length}\r\n\r\n"
        return head.encode() + before + question + after

    async def slot(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        conn: Connection | None = None
        # spread the first requests over the first second, as clients arrive
        await asyncio.sleep(self.rng.random() * float(self.spec.get("ramp", 1.0)))
        while time.monotonic() < self.deadline:
            if conn is None or conn.transport is None:
                try:
                    _, proto = await loop.create_connection(lambda: Connection(self.header), "127.0.0.1", self.port)
                except OSError as exc:
                    self.errors.append(f"connect: {exc}")
                    await asyncio.sleep(0.1)
                    continue
                conn = proto
            body, user = self.rng.randrange(len(self.bodies)), self.rng.randrange(self.users)
            whole = await conn.send(self.request(body, user))
            ok = whole and conn.ok and conn.events == self.expected[body]
            if not ok and len(self.errors) < 20:
                what = "cut" if not whole else "wrong"
                self.errors.append(
                    f"stream {what}: {conn.events} events, answer {conn.head[:60]!r}...{conn.head[-160:]!r}"
                )
            start = conn.sent
            first = conn.first - start if conn.events else -1.0
            end = conn.end - start if whole else -1.0
            head = conn.headed - start if conn.headed else -1.0
            self.records.append([start, first, end, conn.gap, conn.events, int(ok), user, body, head])
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    async def run(self) -> None:
        await asyncio.gather(*(self.slot(i) for i in range(int(self.spec["streams"]))))


def main() -> None:
    with open(sys.argv[1], "rb") as file:
        spec = orjson.loads(file.read())
    load = Load(spec)
    try:
        import uvloop
    except ImportError:
        asyncio.run(load.run())
    else:
        uvloop.run(load.run())
    with open(sys.argv[2], "wb") as out:
        out.write(orjson.dumps({"records": load.records, "errors": load.errors}))


if __name__ == "__main__":
    main()
