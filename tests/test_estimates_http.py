"""Estimates against hostile request shapes, over real HTTP with the official SDKs, on every store.

A client that puts its bulk where the old estimate did not look (tool definitions, response
schemas, tool-call arguments, tool results, Anthropic tool_use/tool_result/document blocks) and
asks for 5 output tokens must not get more calls admitted by sending them at once than by sending
them one after another: the in-flight estimate has to cover what the provider bills. The fake
provider bills every billed string (a token per word), as a provider would.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import openai
import orjson
import pytest

from quotagate.fake_upstream import FakeUpstream, billed_words

from .conftest import POLICY, Gateway, httpx
from .test_spend import ledger, settled
from .test_spend import served as served  # the fixture, for the disconnect test

CALLS = 30


def bulk(words: int, seed: str) -> str:
    return " ".join(f"{seed}{i % 10}" for i in range(words))


def schema(words: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": bulk(words, "city")},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": bulk(words, "unit")},
        },
        "required": ["city"],
        "additionalProperties": False,
    }


def chat_call() -> dict[str, Any]:
    """Chat completions: tools, a response schema, an earlier tool call and its result."""
    return {
        "model": "gpt-4o",
        "max_tokens": 5,
        "messages": [
            {"role": "user", "content": "What is the weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": orjson.dumps({"q": bulk(400, "arg")}).decode()},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": bulk(200, "res")}]},
        ],
        "tools": [
            {
                "type": "function",
                "function": {"name": "weather", "description": bulk(600, "tool"), "parameters": schema(150)},
            }
        ],
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema(150)}},
    }


def responses_call() -> dict[str, Any]:
    """Responses: instructions, tools, a function call and its output, a text format schema."""
    return {
        "model": "gpt-4o",
        "max_output_tokens": 16,
        "instructions": bulk(200, "ins"),
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "What is the weather?"}]},
            {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": bulk(400, "arg")},
            {"type": "function_call_output", "call_id": "c1", "output": bulk(300, "out")},
        ],
        "tools": [{"type": "function", "name": "weather", "description": bulk(500, "tool"), "parameters": schema(100)}],
        "text": {"format": {"type": "json_schema", "name": "answer", "schema": schema(100)}},
    }


def claude_call() -> dict[str, Any]:
    """Anthropic: system blocks, tools, a tool_use and its tool_result blocks, a text document."""
    return {
        "model": "claude-haiku-4-5",
        "max_tokens": 5,
        "system": [{"type": "text", "text": bulk(200, "sys")}],
        "tools": [{"name": "weather", "description": bulk(400, "tool"), "input_schema": schema(150)}],
        "messages": [
            {"role": "user", "content": "What is the weather?"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"q": bulk(300, "in")}}],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": bulk(300, "res")}],
                    },
                    {
                        "type": "document",
                        "source": {"type": "text", "media_type": "text/plain", "data": bulk(200, "doc")},
                    },
                ],
            },
        ],
    }


SHAPES = {"chat": chat_call, "responses": responses_call, "anthropic": claude_call}
SUFFIX = {"chat": "/chat/completions", "responses": "/responses", "anthropic": "/messages"}
# Quotas under which one-after-another calls of these shapes admit a handful.
QUOTAS = {"token": "10000;w=3600;u=token;s=user", "cents": "1;w=3600;u=cents;s=user"}


async def one_call(gw: Gateway, key: str, shape: str, policy: str, user: str) -> int:
    """One call of a shape with the official SDK; its status."""
    headers = {"Helicone-Auth": f"Bearer {key}", POLICY: policy, "Helicone-User-Id": user}
    body = SHAPES[shape]()
    try:
        if shape == "anthropic":
            async with anthropic.AsyncAnthropic(
                base_url=f"{gw.url}/anthropic", api_key="sk-ant-client", max_retries=0, default_headers=headers
            ) as claude:
                await claude.messages.create(**body)
        else:
            async with openai.AsyncOpenAI(
                base_url=f"{gw.url}/v1", api_key="sk-client", max_retries=0, default_headers=headers
            ) as client:
                if shape == "chat":
                    await client.chat.completions.create(**body)
                else:
                    await client.responses.create(**body)
        return 200
    except (openai.APIStatusError, anthropic.APIStatusError) as exc:
        return exc.status_code


@pytest.mark.parametrize("unit", list(QUOTAS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_concurrent_calls_of_a_tools_heavy_shape_admit_no_more_than_sequential_ones(
    gw: Gateway, upstream: FakeUpstream, shape: str, unit: str
) -> None:
    key, policy = gw.key(), QUOTAS[unit]
    statuses = []
    for _ in range(CALLS):
        statuses.append(asyncio.run(one_call(gw, key, shape, policy, "one-after-another")))
        if statuses[-1] != 200:
            break
    sequential = upstream.count(SUFFIX[shape])
    assert statuses == [200] * sequential + [429] and 2 <= sequential < 10
    assert billed_words(upstream.received[0].json()) >= 1500  # the shape bills its bulk

    upstream.reset()

    async def burst() -> list[int]:
        return await asyncio.gather(*(one_call(gw, key, shape, policy, "all-at-once") for _ in range(CALLS)))

    concurrent = asyncio.run(burst())
    assert upstream.count(SUFFIX[shape]) == concurrent.count(200)
    assert 1 <= concurrent.count(200) <= sequential
    assert concurrent.count(429) == CALLS - concurrent.count(200)


def test_a_tools_heavy_stream_cut_by_its_client_is_charged_the_prompts_estimate_and_what_streamed(
    served: Callable[[bool], Gateway], upstream: FakeUpstream
) -> None:
    gw = served(True)
    key = gw.key()
    steer = {"X-Fake-Hold": "cut-tools", "X-Fake-Hold-After": "4", "X-Fake-Completion-Tokens": "50"}
    client = gw.openai(key, **{POLICY: "1000000;w=3600;u=token"}, **steer)
    body = {**chat_call(), "max_tokens": 50}
    stream = client.chat.completions.create(**body, stream=True)
    iterator = iter(stream)
    for _ in range(4):  # the role chunk and " word0 word1 word2"
        next(iterator)
    held = ledger(gw, key)["token"][1]
    prompt_estimate = held - 50
    assert prompt_estimate >= billed_words(upstream.received[0].json())  # at least what the provider bills
    stream.close()
    assert settled(gw, key) == {"token": (prompt_estimate + 6, 0)}  # the estimate + 6 tokens streamed
    upstream.release("cut-tools")


def test_a_huge_prompt_does_not_stall_other_requests_on_the_worker(gateway: Gateway, upstream: FakeUpstream) -> None:
    """While a 25 MB prompt is counted for its token budget, /healthz and small calls on the same
    worker are answered: 30 of them, one after another, before the big call reaches the upstream.
    Then the big call is admitted and charged what the provider reports."""
    key = gateway.key()
    big = orjson.dumps(
        {
            "model": "gpt-4o",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": " " * 20_000_000 + "ordinary words " * 300_000}],
        }
    )
    sent = threading.Event()

    def upload() -> Iterator[bytes]:
        for start in range(0, len(big), 1 << 20):
            yield big[start : start + (1 << 20)]
        sent.set()

    headers = {
        "Helicone-Auth": f"Bearer {key}",
        POLICY: "100000000;w=3600;u=token",
        "X-Fake-Prompt-Tokens": "1000",
        "Content-Type": "application/json",
    }
    result: dict[str, int] = {}

    def big_call() -> None:
        with httpx.Client(timeout=120) as http:
            result["status"] = http.post(
                f"{gateway.url}/v1/chat/completions", content=upload(), headers=headers
            ).status_code

    caller = threading.Thread(target=big_call)
    caller.start()
    assert sent.wait(60)
    small = gateway.openai(gateway.key("small"), **{POLICY: "1000;w=60"})
    answered = 0
    with gateway.http() as http:
        for _ in range(15):
            assert http.get("/healthz").status_code == 200
            small.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
            answered += 2
    big_arrived = any(len(r.body) > 1_000_000 for r in upstream.received)
    caller.join(120)
    assert (answered, big_arrived) == (30, False)
    assert result == {"status": 200}
    assert settled(gateway, key) == {"token": (1000 + 5, 0)}
