"""Clients that never finish a request: a worker's memory and connections under them.

    .venv/bin/python bench/slow_clients.py                        # both phases, about a minute
    .venv/bin/python bench/slow_clients.py --heads 40 --seconds 20 --trickle 0
    .venv/bin/python bench/slow_clients.py -- --head-timeout 5    # extra arguments go to `serve`

1. Endless heads: `--heads` clients each send a request line, then header lines of 60,000 bytes as
   fast as the worker reads them, and never the blank line that ends a head; a client the gateway
   refuses connects again at once. The worker's resident memory (`VmRSS` of `quotagate serve
   --workers 1`) is sampled every 0.5 s; the run reports the baseline, the peak, and how the
   gateway ended the connections (the status it sent, if any).
2. Trickled heads: `--trickle` connections each send one byte of a head every `--every` seconds;
   the run reports how many the gateway closed and after how long (from each one's first byte).

Throughout, a probe asks `GET /healthz` every 0.5 s on a connection of its own: its worst latency
shows whether the worker kept serving others.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PYTHON = sys.executable
PAD = b"X-Pad: " + b"p" * 60_000 + b"\r\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_gateway(port: int, workdir: str, extra: list[str]) -> subprocess.Popen[bytes]:
    command = [
        PYTHON, "-m", "quotagate", "serve", "--workers", "1", "--port", str(port),
        "--store", f"sqlite:///{workdir}/bench.db", "--openai-base-url", "http://127.0.0.1:9",
        "--no-access-log", *extra,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the gateway did not start")


async def endless_head(port: int, stop: float) -> tuple[int, str]:
    """Send header lines until the gateway answers or closes, or time is up: (bytes sent, outcome)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.ensure_future(reader.read(200))
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\n")
    sent = 0
    try:
        while time.monotonic() < stop and not answer.done():
            writer.write(PAD)
            await asyncio.wait_for(writer.drain(), timeout=max(0.01, stop - time.monotonic()))
            sent += len(PAD)
    except (ConnectionError, TimeoutError):
        pass
    outcome = await closed_how(answer, stop)
    writer.close()
    return sent, outcome


async def attacker(port: int, stop: float) -> list[tuple[int, str]]:
    """Endless heads one after another, a new connection each time the gateway refuses one."""
    results = []
    while time.monotonic() < stop:
        results.append(await endless_head(port, stop))
    return results


async def closed_how(answer: asyncio.Future[bytes], stop: float) -> str:
    """'open' if the gateway kept the connection, else the status line it sent (or 'closed')."""
    try:
        data = await asyncio.wait_for(answer, timeout=max(0.05, stop - time.monotonic()))
    except TimeoutError:
        return "open"
    except ConnectionError:
        return "closed (reset)"
    if not data:
        return "closed"
    return "closed with " + data.split(b"\r\n", 1)[0].decode(errors="replace")


async def trickled_head(port: int, every: float, stop: float) -> float | None:
    """One byte of a head every `every` seconds; seconds from the first byte to the close, or None."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"GET /healthz HTTP/1.1\r\nHost: bench\r\nX-Slow: " + b"s" * 10_000
    first = time.monotonic()
    for byte in head:
        if time.monotonic() >= stop:
            break
        try:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.wait_for(reader.read(200), timeout=every)
        except TimeoutError:
            continue
        except ConnectionError:
            pass
        writer.close()  # the gateway answered or closed the connection
        return time.monotonic() - first
    writer.close()
    return None


async def probe(port: int, stop: float) -> list[float]:
    """`GET /healthz` latencies, one request every 0.5 s on a keep-alive connection of its own."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    latencies = []
    while time.monotonic() < stop:
        started = time.monotonic()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        await reader.readuntil(b"}")
        latencies.append(time.monotonic() - started)
        await asyncio.sleep(0.5)
    writer.close()
    return latencies


async def sample(pid: int, stop: float) -> list[float]:
    samples = []
    while time.monotonic() < stop:
        samples.append(rss_mb(pid))
        await asyncio.sleep(0.5)
    return samples


async def phase_heads(port: int, pid: int, count: int, seconds: float) -> None:
    base = rss_mb(pid)
    stop = time.monotonic() + seconds
    runs, rss, lat = await asyncio.gather(
        asyncio.gather(*(attacker(port, stop) for _ in range(count))), sample(pid, stop), probe(port, stop)
    )
    results = [r for run in runs for r in run]
    outcomes: dict[str, int] = {}
    for _, outcome in results:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    sent = [s for s, _ in results]
    print(f"endless heads: {count} clients for {seconds:g} s, each reconnecting when refused")
    print(f"  worker RSS: {base:.1f} MB before, peak {max(rss):.1f} MB, at the end {rss[-1]:.1f} MB")
    print(
        f"  connections: {len(results)}; head bytes sent per connection: median "
        f"{statistics.median(sent):,.0f}, max {max(sent):,}; {sum(sent) / 1e6:,.0f} MB in all"
    )
    print(f"  outcomes: {outcomes}")
    print(f"  /healthz meanwhile: {len(lat)} probes, worst {max(lat) * 1000:.1f} ms")


async def phase_trickle(port: int, pid: int, count: int, every: float, seconds: float) -> None:
    stop = time.monotonic() + seconds
    closed, lat = await asyncio.gather(
        asyncio.gather(*(trickled_head(port, every, stop) for _ in range(count))), probe(port, stop)
    )
    done = sorted(c for c in closed if c is not None)
    print(f"trickled heads: {count} connections, a byte every {every:g} s, for {seconds:g} s")
    if done:
        print(
            f"  closed by the gateway: {len(done)} of {count}, after {done[0]:.1f} s (first) to "
            f"{done[-1]:.1f} s (last) from their first byte"
        )
    else:
        print(f"  closed by the gateway: 0 of {count}")
    print(f"  worker RSS at the end: {rss_mb(pid):.1f} MB; /healthz meanwhile: worst {max(lat) * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=40, help="connections sending endless heads")
    parser.add_argument("--seconds", type=float, default=20, help="how long the endless heads run")
    parser.add_argument("--trickle", type=int, default=200, help="connections trickling a head (0: skip)")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between two trickled bytes")
    parser.add_argument("--trickle-seconds", type=float, default=30)
    parser.add_argument("serve_args", nargs="*", help="extra arguments for quotagate serve")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        gateway = start_gateway(port, workdir, args.serve_args)
        try:
            time.sleep(1)
            if args.heads:
                asyncio.run(phase_heads(port, gateway.pid, args.heads, args.seconds))
            if args.trickle:
                asyncio.run(phase_trickle(port, gateway.pid, args.trickle, args.every, args.trickle_seconds))
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)
    print(f"(python {sys.version.split()[0]}, pid {os.getpid()})")


if __name__ == "__main__":
    main()
