"""Metering with plain values: a call admitted on a real SQLite store, then its answer (a JSON body,
or SSE events as they pass) charged. No HTTP."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from quotagate.admission import Ticket
from quotagate.config import CallPrice, PriceOverride
from quotagate.metering import Meter, Metering, Outcome
from quotagate.stores import open_store
from quotagate.usage import Usage

from .conftest import FakeClock
from .test_admission import Desk, chat, on_sqlite

# $1 / $2 per million tokens: 100 and 200 micro-cents a token
PRICES = {"gpt-4o": PriceOverride(input_mtok=Decimal(1), output_mtok=Decimal(2))}


def metering(desk: Desk) -> Metering:
    return Metering(desk.store, desk.admitter.guard, desk.admitter.pricer)


def answer(prompt: int, completion: int) -> bytes:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return orjson.dumps({"model": "gpt-4o-2024-08-06", "choices": [], "usage": usage})


def sse(*events: dict[str, Any] | str) -> bytes:
    return b"".join(b"data: " + (e.encode() if isinstance(e, str) else orjson.dumps(e)) + b"\n\n" for e in events)


def delta(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": text}}]}


def metered(
    tmp_path: Path, clock: FakeClock, body: Callable[[Desk, Metering, Ticket], Awaitable[None]], policy: str
) -> None:
    """`body` gets a call admitted under `policy` (a chat call allowing 50 tokens of output)."""

    async def main(desk: Desk) -> None:
        await body(desk, metering(desk), await desk.admit(policy, chat(max_tokens=50)))

    on_sqlite(tmp_path, clock, main, prices=PRICES)


def test_a_charge_replaces_the_hold_with_the_real_cost(tmp_path: Path, clock: FakeClock) -> None:
    async def body(desk: Desk, metering: Metering, ticket: Ticket) -> None:
        assert [s.held for s in ticket.states] == ticket.amounts  # cents and tokens held
        meter = Meter(upstream_status=200)
        metering.read_body(meter, answer(1000, 500))
        await metering.charge(ticket, meter, meter.usage)
        assert meter.model == "gpt-4o-2024-08-06"
        assert meter.cost == 1000 * 100 + 500 * 200
        assert [(s.used, s.held) for s in ticket.states] == [(200_000, 0), (1500, 0)]
        await metering.charge(ticket, meter, Usage(9999, 9999))  # once only
        again = await desk.admit("1;w=60;u=cents, 2000;w=60;u=token", chat(max_tokens=50))
        assert [s.used for s in again.states] == [200_000, 1500]

    metered(tmp_path, clock, body, "1;w=60;u=cents, 2000;w=60;u=token")


def test_a_call_that_fails_before_an_answer_is_charged_nothing(tmp_path: Path, clock: FakeClock) -> None:
    async def body(desk: Desk, metering: Metering, ticket: Ticket) -> None:
        meter = Meter()
        await metering.charge(ticket, meter, None)
        assert meter.cost is None and [(s.used, s.held) for s in ticket.states] == [(0, 0)]

    metered(tmp_path, clock, body, "2000;w=60;u=token")


def test_a_whole_stream_is_charged_the_usage_it_reports(tmp_path: Path, clock: FakeClock) -> None:
    async def body(desk: Desk, metering: Metering, ticket: Ticket) -> None:
        meter = Meter(upstream_status=200)
        tracker = metering.track(ticket, meter, strip=False)
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        sent = tracker.feed(sse(delta(" word0"), {"model": "gpt-4o", "choices": [], "usage": usage}, "[DONE]"))
        assert b"[DONE]" not in sent  # the terminal event waits for the charge
        tail = metering.stream_ended(ticket, meter, Outcome.UPSTREAM_BROKEN)  # broken after its end
        assert meter.outcome is Outcome.COMPLETE and tail == b"data: [DONE]\n\n"
        await metering.charge(ticket, meter, meter.usage)
        assert (ticket.states[0].used, ticket.states[0].held) == (10, 0)

    metered(tmp_path, clock, body, "2000;w=60;u=token")


def test_a_cut_stream_is_charged_the_prompts_estimate_and_what_streamed(tmp_path: Path, clock: FakeClock) -> None:
    async def body(desk: Desk, metering: Metering, ticket: Ticket) -> None:
        meter = Meter(upstream_status=200)
        tracker = metering.track(ticket, meter, strip=False)
        tracker.feed(sse({"model": "gpt-4o", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}))
        tracker.feed(sse(delta(" word0"), delta(" word1"), delta(" word2")))
        assert metering.stream_ended(ticket, meter, Outcome.CLIENT_GONE) == b""
        assert meter.usage == Usage(ticket.prompt_tokens, 6)  # " word0 word1 word2": 6 tokens
        await metering.charge(ticket, meter, meter.usage)
        assert (ticket.states[0].used, ticket.states[0].held) == (ticket.prompt_tokens + 6, 0)

    metered(tmp_path, clock, body, "2000;w=60;u=token")


def test_a_call_cut_before_any_answer_is_charged_its_prompt(tmp_path: Path, clock: FakeClock) -> None:
    async def body(desk: Desk, metering: Metering, ticket: Ticket) -> None:
        meter = Meter()
        await metering.charge(ticket, meter, metering.cut_usage(ticket, meter))
        assert ticket.prompt_tokens > 0 and ticket.states[0].used == ticket.prompt_tokens

    metered(tmp_path, clock, body, "2000;w=60;u=token")


def test_a_charge_the_store_cannot_take_leaves_the_hold_and_marks_the_store_down(
    tmp_path: Path, clock: FakeClock
) -> None:
    async def body(desk: Desk, _: Metering, ticket: Ticket) -> None:
        unreachable = open_store("redis://127.0.0.1:1/0")
        try:
            metering = Metering(unreachable, desk.admitter.guard, desk.admitter.pricer)
            held = list(ticket.states)
            await metering.charge(ticket, Meter(upstream_status=200), Usage(10, 5))
            assert ticket.states == held and desk.admitter.guard.down
        finally:
            await unreachable.close()
        assert desk.admitter.guard.attempt()  # the next request tries the store again

    metered(tmp_path, clock, body, "2000;w=60;u=token")


def test_a_per_call_price_is_held_then_charged_only_when_the_upstream_succeeded(
    tmp_path: Path, clock: FakeClock
) -> None:
    async def body(desk: Desk) -> None:
        for status, cost, used in ((500, 0, 0), (200, 250_000, 250_000)):
            ticket = await desk.admit("1;w=60;u=cents", {"prompt": "a cat"}, path="/v1/images/generations")
            assert ticket.amounts == [250_000] and ticket.states[0].held == 250_000
            meter = Meter(upstream_status=status)
            await metering(desk).charge(ticket, meter, None)
            assert meter.cost == cost and (ticket.states[0].used, ticket.states[0].held) == (used, 0)

    on_sqlite(tmp_path, clock, body, call_prices={"POST /v1/images/generations": CallPrice(cents=Decimal("0.25"))})
