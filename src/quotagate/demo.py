"""`quotagate demo`: the gateway and a fake provider in one process, and a burst through the
official OpenAI SDK, printing each call's status and rate-limit headers."""

from __future__ import annotations

import asyncio
import socket
import tempfile
from pathlib import Path

from .config import Settings
from .fake_upstream import BackgroundServer, FakeUpstream
from .keys import create_key
from .redact import redact_url
from .server import build_app
from .stores import open_store

POLICY = "3;w=60, 2;w=60;u=cents;s=user"
SHOWN = (
    "Helicone-RateLimit-Limit",
    "Helicone-RateLimit-Remaining",
    "Helicone-RateLimit-Policy",
    "Helicone-RateLimit-Reset",
    "RateLimit",
    "Retry-After",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_demo(calls: int) -> int:
    """The burst, in a temporary folder that is removed afterwards (on an error or Ctrl-C too)."""
    with tempfile.TemporaryDirectory(prefix="quotagate-demo-") as folder:
        upstream = BackgroundServer(FakeUpstream(record=False).app).start()
        try:
            settings = Settings(
                port=free_port(),
                store=f"sqlite:///{Path(folder) / 'demo.db'}",
                workers=1,
                openai_base_url=upstream.url,
                access_log=False,
            )
            gateway = BackgroundServer(build_app(settings, open_store(settings.store)), port=settings.port).start()
            try:
                burst(calls, upstream.url, gateway.url, settings.store)
            finally:
                gateway.stop()
        finally:
            upstream.stop()
    return 0


def burst(calls: int, upstream_url: str, gateway_url: str, store_url: str) -> None:
    import openai

    async def make_key() -> str:
        store = open_store(store_url)
        try:
            return (await create_key(store, "demo", []))[0]
        finally:
            await store.close()

    key = asyncio.run(make_key())
    print(f"fake provider at {upstream_url}, gateway at {gateway_url}, store {redact_url(store_url)}")
    print(f"policy: Helicone-RateLimit-Policy: {POLICY}  (user alice)\n")
    client = openai.OpenAI(
        base_url=f"{gateway_url}/v1",
        api_key="sk-demo-not-a-real-key",
        max_retries=0,
        default_headers={
            "Helicone-Auth": f"Bearer {key}",
            "Helicone-RateLimit-Policy": POLICY,
            "Helicone-User-Id": "alice",
        },
    )
    with client:
        for number in range(1, calls + 1):
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}], max_tokens=8
                )
                status, headers = raw.http_response.status_code, raw.headers
                note = repr(raw.parse().choices[0].message.content)
            except openai.RateLimitError as exc:
                status, headers, note = exc.status_code, exc.response.headers, "openai.RateLimitError raised"
            print(f"call {number}: HTTP {status}  {note}", flush=True)
            for name in SHOWN:
                if name in headers:
                    print(f"    {name}: {headers[name]}")
