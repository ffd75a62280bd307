"""Bounded per connection (SPEC §7): a request head has a total size limit, heads and bodies a read
deadline, idle connections a timeout; and aiohttp's own log lines carry no header value.

Over raw sockets, against in-process gateways and `quotagate serve`. Deadlines are set small in each
test's settings; a test waits for the gateway to close the socket, it never times the gateway.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import orjson
import pytest

from quotagate.config import ConfigError, Settings
from quotagate.fake_upstream import FakeUpstream

from .conftest import CHAT, POLICY, Gateway, free_port, quotagate_command, stop_process, wait_ready

BODY = orjson.dumps({"model": "gpt-4o-mini", "messages": CHAT, "max_tokens": 2})


def port_of(gateway: Gateway) -> int:
    return int(gateway.url.rsplit(":", 1)[1])


@contextmanager
def connection(gateway: Gateway) -> Iterator[socket.socket]:
    with socket.create_connection(("127.0.0.1", port_of(gateway)), timeout=10) as sock:
        yield sock


def read_until_closed(sock: socket.socket, limit: float = 10) -> bytes:
    """Everything the gateway sends until it closes the connection (fails if it does not within
    `limit` seconds: a generous bound for a deadline of a fraction of a second)."""
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the gateway kept the connection open; it sent {data[:200]!r}")
    return data


def trickle(sock: socket.socket, data: bytes, every: float = 0.05) -> bytes:
    """Send `data` a byte at a time until the gateway answers or closes; what it sent back."""
    sock.settimeout(every)
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
            answer = sock.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return b""
        return answer + read_until_closed(sock)
    pytest.fail("the gateway read the whole trickle without closing the connection")


def status_and_error(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), orjson.loads(body)["error"]["code"]


def request_head(key: str, *extra: bytes, length: int = len(BODY)) -> bytes:
    lines = [
        b"POST /v1/chat/completions HTTP/1.1",
        b"Host: gateway",
        b"Content-Type: application/json",
        f"Helicone-Auth: Bearer {key}".encode(),
        f"Content-Length: {length}".encode(),
        *extra,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def exchange(sock: socket.socket, data: bytes) -> tuple[int, bytes]:
    """Send one request on a keep-alive connection and read its response (Content-Length framed)."""
    sock.settimeout(10)
    sock.sendall(data)
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split(b" ", 2)[1]), body


# --- head size --------------------------------------------------------------------------------------


def test_a_head_over_the_total_limit_is_431_and_closed_while_a_60_kib_user_id_works(
    gateway: Gateway, upstream: FakeUpstream
) -> None:
    key = gateway.key()
    with connection(gateway) as sock:  # each header under the 64 KiB line limit, 120 KiB in all
        sock.sendall(request_head(key, b"X-Pad-1: " + b"a" * 60_000, b"X-Pad-2: " + b"b" * 60_000) + BODY)
        assert status_and_error(read_until_closed(sock)) == (431, "request_head_too_large")
    user = b"u" * 60 * 1024
    with connection(gateway) as sock:
        status, _ = exchange(
            sock, request_head(key, f"{POLICY}: 5;w=60;s=user".encode(), b"Helicone-User-Id: " + user) + BODY
        )
        assert status == 200
    assert upstream.count() == 1
    assert upstream.received[0].headers.get("Helicone-User-Id") is None  # gateway headers stay home


def test_the_head_limit_counts_the_head_not_the_body_sent_with_it(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    """Head and body in one write: a head under the limit passes however large its body, a head
    over it is refused however small its body."""
    gateway = make_gateway(max_head_bytes=4096)
    key = gateway.key()
    big = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 50_000}]})
    with connection(gateway) as sock:
        status, _ = exchange(sock, request_head(key, b"Helicone-User-Id: " + b"u" * 3000, length=len(big)) + big)
        assert status == 200
    with connection(gateway) as sock:
        sock.sendall(request_head(key, b"Helicone-User-Id: " + b"u" * 4000) + BODY)
        assert status_and_error(read_until_closed(sock)) == (431, "request_head_too_large")
    assert upstream.count() == 1


def test_a_head_that_never_ends_is_431_and_closed(gateway: Gateway, upstream: FakeUpstream) -> None:
    """Header lines under the per-line limit, sent until the gateway stops reading: it answers
    once the head passes the total limit, long before the head would end."""
    with connection(gateway) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n")
        sent = 0
        while sent < 64 * 1024 * 1024 and not select.select([sock], [], [], 0)[0]:  # until it answers
            sock.sendall(b"X-Pad: " + b"p" * 60_000 + b"\r\n")
            sent += 60_009
        assert status_and_error(read_until_closed(sock)) == (431, "request_head_too_large")
    assert sent < 16 * 1024 * 1024  # what the gateway read, plus what socket buffers took
    assert upstream.count() == 0


def test_a_header_line_over_64_kib_is_431_and_quotes_nothing(gateway: Gateway) -> None:
    with connection(gateway) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: g\r\nX-Long: secret-" + b"x" * 70_000 + b"\r\n\r\n")
        answer = read_until_closed(sock)
    assert status_and_error(answer) == (431, "request_head_too_large")
    assert b"secret-" not in answer


# --- read deadlines ---------------------------------------------------------------------------------


def test_a_trickled_head_is_closed_after_its_deadline(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway(head_timeout=0.3, idle_timeout=60)  # the head deadline, not the idle one
    with connection(gateway) as sock:
        answer = trickle(sock, b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Slow: " + b"s" * 400)
    assert status_and_error(answer) == (408, "request_timeout")


def test_a_trickled_body_gets_408_and_the_connection_is_dropped(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    gateway = make_gateway(body_timeout=0.3)
    key = gateway.key()
    with connection(gateway) as sock:
        sock.sendall(request_head(key) + BODY[:10])
        answer = trickle(sock, BODY[10:] * 20)
    assert status_and_error(answer) == (408, "request_timeout")
    assert upstream.count() == 0


def test_a_trickled_body_after_an_answer_is_dropped(make_gateway: Callable[..., Gateway]) -> None:
    """An unknown key is answered at once (401) without reading the body; the body still trickling
    is not read for long: the connection is closed at the body deadline."""
    gateway = make_gateway(body_timeout=0.3)
    with connection(gateway) as sock:
        sock.sendall(request_head("qg_unknown", length=100_000) + b"{")
        sock.settimeout(10)
        assert sock.recv(65536).startswith(b"HTTP/1.1 401")
        sock.settimeout(0.05)
        for _ in range(60):  # 3 s of trickling; aiohttp alone would read on for 10 s
            try:
                sock.sendall(b" ")
                if sock.recv(100) == b"":
                    return
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                return
    pytest.fail("the gateway kept reading a trickled body")


def test_an_idle_connection_is_closed(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway(idle_timeout=0.3)
    with connection(gateway) as sock:  # connected, never a byte
        assert read_until_closed(sock) == b""
    with connection(gateway) as sock:  # one request, then nothing
        assert exchange(sock, b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")[0] == 200
        assert read_until_closed(sock) == b""


def test_a_keep_alive_client_is_not_disturbed(make_gateway: Callable[..., Gateway], upstream: FakeUpstream) -> None:
    """One connection, requests spread over longer than every deadline, a body sent in two parts:
    every request is served on the same connection (each pause a small part of its deadline: room for a
    loaded machine)."""
    gateway = make_gateway(head_timeout=3.0, body_timeout=3.0, idle_timeout=4.0)
    key = gateway.key()
    statuses = []
    with connection(gateway) as sock:
        for _ in range(5):  # 4.5 s in all
            statuses.append(exchange(sock, b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")[0])
            sock.sendall(request_head(key) + BODY[:20])
            time.sleep(0.3)  # a body that arrives in two parts, within its deadline
            statuses.append(exchange(sock, BODY[20:])[0])
            time.sleep(0.6)  # idle between requests, within the idle timeout
    assert statuses == [200] * 10
    assert upstream.count() == 5


def test_the_gateway_serves_others_while_slow_clients_hold_connections(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    gateway = make_gateway(head_timeout=5, body_timeout=5, idle_timeout=5)
    key = gateway.key()
    stop = threading.Event()

    def slow(payload: bytes) -> None:
        with connection(gateway) as sock:
            for byte in payload:
                if stop.is_set():
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.05)

    heads = [b"GET /healthz HTTP/1.1\r\nHost: g\r\nX-Slow: " + b"s" * 1000] * 20
    bodies = [request_head(key, length=1000) + b"x" * 1000] * 20
    threads = [threading.Thread(target=slow, args=(p,)) for p in heads + bodies]
    for thread in threads:
        thread.start()
    try:
        client = gateway.openai(key)
        for _ in range(5):
            client.chat.completions.create(model="gpt-4o-mini", messages=CHAT)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert upstream.count() == 5


# --- quotagate serve ----------------------------------------------------------------------------------


def test_serve_has_the_deadlines_from_flags_and_environment(serve: Callable[..., Gateway]) -> None:
    gateway = serve("--head-timeout", "0.3", env={"QUOTAGATE_IDLE_TIMEOUT": "0.3"})
    with connection(gateway) as sock:
        answer = trickle(sock, b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Slow: " + b"s" * 400)
    assert status_and_error(answer) == (408, "request_timeout")
    with connection(gateway) as sock:
        assert read_until_closed(sock) == b""


SECRETS = [b"sk-live-LEAKED1", b"qg_LEAKED2", b"admin-LEAKED3", b"sk-ant-LEAKED4"]


def test_malformed_heads_leave_no_header_value_in_logs_or_answers(serve: Callable[..., Gateway]) -> None:
    gateway = serve()
    heads = [
        b"Authorization: Bearer " + SECRETS[0] + b"\x01",  # a control character in a value
        b"Helicone-Auth " + SECRETS[1],  # a line without a colon
        b"X-Admin-Token: " + SECRETS[2] + b"\x7f",
        b"x-api-key: " + SECRETS[3] + b"x" * 70_000,  # a line over the 64 KiB limit
    ]
    for line in heads:
        with connection(gateway) as sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n" + line + b"\r\n\r\n")
            answer = read_until_closed(sock)
        assert status_and_error(answer)[0] in (400, 431)
        assert not any(secret in answer for secret in SECRETS)
    lines = wait_for_lines(gateway, "Error handling request", len(heads))
    text = "\n".join(gateway.log_lines())
    assert not any(secret.decode() in text for secret in SECRETS), text[-3000:]
    events = [json.loads(line) for line in lines]  # aiohttp's lines, as JSON, with the event
    assert [(e["logger"], e["status"]) for e in events] == [("aiohttp.server", 400)] * len(heads)
    assert all(e["msg"] == "Error handling request from 127.0.0.1" and "error" in e for e in events)


def wait_for_lines(gateway: Gateway, text: str, count: int) -> list[str]:
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in gateway.log_lines() if text in line]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


# --- settings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        {"head_timeout": 0},
        {"body_timeout": -1.0},
        {"idle_timeout": float("nan")},
        {"max_head_bytes": 0},
        {"max_in_flight": 0},
        {"max_head_bytes": "96k"},
        {"max_in_flight_bytes": 1000, "max_body_bytes": 2000},
    ],
)
def test_http_limits_are_validated_at_load(values: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Settings(**values)  # type: ignore[arg-type]


def test_a_request_line_over_its_limit_is_414_and_quotes_nothing(gateway: Gateway) -> None:
    with connection(gateway) as sock:
        sock.sendall(b"GET /v1/models?key=secret-" + b"x" * 9000 + b" HTTP/1.1\r\nHost: g\r\n\r\n")
        answer = read_until_closed(sock)
    assert status_and_error(answer) == (414, "request_target_too_long")
    assert b"secret-" not in answer


def test_aiohttp_log_records_keep_the_event_and_lose_what_the_client_sent() -> None:
    """Records as aiohttp's loggers make them: an argument that is not a peer address (a cookie
    name, a header line) is withheld; exception text and traceback are dropped, its class and
    status kept."""
    from aiohttp.http_exceptions import BadHttpMessage

    from quotagate.connections import LibraryLogFilter
    from quotagate.server import JsonFormatter

    try:
        raise BadHttpMessage("Invalid header value char: b'Authorization: Bearer sk-LEAKED'")
    except BadHttpMessage:
        failure = sys.exc_info()
    records = [
        logging.LogRecord(
            "aiohttp.server", logging.ERROR, "p", 1, "Error handling request from %s", ("10.0.0.7",), failure
        ),
        logging.LogRecord("aiohttp.internal", logging.WARNING, "p", 1, "Illegal cookie name %r", ("sk-LEAKED",), None),
        logging.LogRecord("aiohttp.server", logging.ERROR, "p", 1, "odd %d", ("sk-LEAKED",), None),
    ]
    lines = []
    for record in records:
        assert LibraryLogFilter().filter(record)
        lines.append(json.loads(JsonFormatter().format(record)))
    assert "LEAKED" not in json.dumps(lines)
    assert lines[0]["msg"] == "Error handling request from 10.0.0.7"
    assert (lines[0]["error"], lines[0]["status"]) == ("BadHttpMessage", 400)
    assert lines[1]["msg"] == "Illegal cookie name [withheld]"
    assert lines[2]["msg"] == "odd %d"


def test_a_client_that_stops_reading_a_stream_is_dropped_and_charged_what_it_was_sent(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    """A stream far bigger than the socket buffers, to a client that reads nothing: once one write
    has waited `write_timeout`, the connection is dropped, the upstream call with it, and the call
    is charged its prompt and what had been written (not the whole reply, nor a hold that lingers);
    the gateway serves others meanwhile."""
    from quotagate.usage import count_tokens

    from .test_spend import ledger

    gateway = make_gateway(write_timeout=0.5)
    key = gateway.key()
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": CHAT, "max_tokens": 4000, "stream": True})
    extra = (b"X-Fake-Pad: 4000", b"X-Fake-Completion-Tokens: 4000", f"{POLICY}: 100000000;w=3600;u=token".encode())
    head = request_head(key, *extra, length=len(body))
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port_of(gateway)))
        sock.sendall(head + body)
        deadline = time.monotonic() + 30
        while (charged := ledger(gateway, key).get("token", (0, 1)))[1] and time.monotonic() < deadline:
            time.sleep(0.05)
        with gateway.http() as http:
            assert http.get("/healthz").status_code == 200
        received = read_until_closed(sock)
    assert charged[1] == 0  # nothing held any more
    whole_reply = 4000 * count_tokens(" word1000" + "x" * 4000)
    assert 0 < charged[0] < whole_reply // 2  # the prompt and the words written, not the whole reply
    assert b"[DONE]" not in received and len(received) < 4000 * 4000
    assert upstream.count("/chat/completions") == 1


# --- many connections -----------------------------------------------------------------------------


def open_idle(port: int, count: int) -> list[socket.socket]:
    """`count` connections that never send a byte (those the kernel does not complete are skipped)."""
    socks = []
    for _ in range(count):
        with suppress(OSError):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=1))
    return socks


def closed_by_gateway(socks: list[socket.socket]) -> int:
    """How many of these connections the gateway has closed (read at once, without waiting)."""
    readable, _, _ = select.select(socks, [], [], 0)
    closed = 0
    for sock in readable:
        try:
            closed += sock.recv(1) == b""
        except ConnectionResetError:
            closed += 1
    return closed


def test_idle_connections_past_the_limit_make_room_for_others_and_spare_calls_in_flight(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    """At `max_connections`, a new connection closes the oldest that waits for a request: 60 idle
    connections against a limit of 16 leave room for every SDK call, and a stream in flight on the
    oldest connection of all is not touched."""
    gateway = make_gateway(max_connections=16)
    key = gateway.key()
    held = gateway.openai(key, **{"X-Fake-Hold": "many", POLICY: "100;w=60"})
    stream = held.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=3, stream=True)
    chunks = iter(stream)
    next(chunks)  # the stream is under way, on the gateway's oldest connection
    idle = open_idle(port_of(gateway), 60)
    try:
        client = gateway.openai(key)
        for _ in range(5):
            client.with_options(max_retries=0).chat.completions.create(model="gpt-4o-mini", messages=CHAT)
        deadline = time.monotonic() + 10
        while (closed := closed_by_gateway(idle)) < 60 - 16 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert closed >= 60 - 16
    finally:
        for sock in idle:
            sock.close()
    upstream.release("many")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == " word0 word1 word2"
    assert upstream.count("/chat/completions") == 6


@contextmanager
def serve_with_open_files(
    upstream: FakeUpstream, tmp_path: Path, soft: int, hard: int
) -> Iterator[tuple[Gateway, subprocess.Popen[bytes]]]:
    """`quotagate serve` (one worker, SQLite) started under an open-file limit of `soft`/`hard`,
    ready; stopped on leaving."""
    port = free_port()
    store = f"sqlite:///{tmp_path / 'files.db'}"
    command = quotagate_command(
        "serve", "--port", str(port), "--store", store, "--workers", "1", "--openai-base-url", upstream.url
    )

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    with (tmp_path / "files.log").open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit_files, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, process)
        yield Gateway(url, Settings(port=port, store=store), store), process
    finally:
        stop_process(process)


def test_a_client_holding_more_connections_than_the_open_file_limit_does_not_shut_others_out(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """`quotagate serve` under `ulimit -n 256`: a client opens 400 connections and sends nothing.
    Without a bound the worker runs out of file descriptors and accepts no one until they time out;
    by default it keeps its connections below its open-file limit, closing idle ones first."""
    with serve_with_open_files(upstream, tmp_path, 256, 256) as (gateway, _process):
        key = gateway.key()
        idle = open_idle(port_of(gateway), 400)
        try:
            assert len(idle) > 256
            client = gateway.openai(key).with_options(timeout=10)
            for _ in range(3):
                client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=2)
        finally:
            for sock in idle:
                sock.close()
        assert upstream.count("/chat/completions") == 3


def test_a_burst_of_connections_never_runs_the_worker_out_of_descriptors(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """`quotagate serve` under `ulimit -n 256` (64 client connections): 400 connections arrive at
    once (queued while the worker is stopped). The worker took every waiting connection in one wake
    before any could make room, ran out of descriptors (upstream calls and the store with it), and
    stopped accepting anyone for a second. It takes what its connection bound leaves room for."""
    with serve_with_open_files(upstream, tmp_path, 256, 256) as (gateway, process):
        key = gateway.key()
        os.killpg(process.pid, signal.SIGSTOP)  # the connections wait in the kernel's queue
        try:
            idle = open_idle(port_of(gateway), 400)
        finally:
            os.killpg(process.pid, signal.SIGCONT)
        try:
            assert len(idle) > 256
            client = gateway.openai(key).with_options(timeout=10, max_retries=0)
            for _ in range(3):
                client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=2)
        finally:
            for sock in idle:
                sock.close()
        assert upstream.count("/chat/completions") == 3
    assert "accept failed" not in (tmp_path / "files.log").read_text()


def test_past_the_limit_a_connection_in_use_outlives_fresher_idle_ones(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    """The victim is the connection whose last request began longest ago: a client's kept-alive
    connection, opened first but used since, survives 16 idle ones opened after it; the oldest of
    those is the one closed for a newcomer."""
    gateway = make_gateway(max_connections=16)
    request = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n"

    def healthy(sock: socket.socket) -> bool:
        sock.sendall(request)
        sock.settimeout(10)
        return sock.recv(65536).startswith(b"HTTP/1.1 200")

    def opened(count: int) -> list[socket.socket]:
        return [socket.create_connection(("127.0.0.1", port_of(gateway)), timeout=10) for _ in range(count)]

    with connection(gateway) as kept:
        assert healthy(kept)
        idle = opened(15)  # 16 connections: the limit
        try:
            assert healthy(kept)  # used last now
            newcomer = opened(1)
            deadline = time.monotonic() + 10
            while closed_by_gateway(idle[:1]) == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert closed_by_gateway(idle[:1]) == 1
            assert healthy(kept)
            assert closed_by_gateway(idle[1:]) == 0
            newcomer[0].close()
        finally:
            for sock in idle:
                sock.close()


def test_serve_raises_its_soft_open_file_limit_to_the_hard_one(upstream: FakeUpstream, tmp_path: Path) -> None:
    """Under a soft limit of 256 and a hard one of 4,096, a worker runs with 4,096, so that its
    connection bound is not a tenth of what the machine allows: 400 idle connections stay open."""
    with serve_with_open_files(upstream, tmp_path, 256, 4096) as (gateway, process):
        port = port_of(gateway)
        limits = Path(f"/proc/{process.pid}/limits").read_text().splitlines()
        assert [line.split()[3:5] for line in limits if line.startswith("Max open files")] == [["4096", "4096"]]
        idle = open_idle(port, 400)
        try:
            assert len(idle) == 400
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            assert closed_by_gateway(idle) == 0
        finally:
            for sock in idle:
                sock.close()
