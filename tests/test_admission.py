"""Admission with plain values: a key, headers as values, a body, a real SQLite store and a clock
moved by hand. No HTTP: what the http layer would answer is read off the ticket and the error."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from quotagate.admission import Admitter, Asked, Decision, Ticket, asked
from quotagate.config import Settings
from quotagate.errors import MissingSegment, RateLimited, StoreUnavailable, Unauthorized
from quotagate.keys import GatewayKey, create_key
from quotagate.policy import GRAMMAR
from quotagate.pricing import Pricer
from quotagate.routing import resolve
from quotagate.stores import Store, open_store

from .conftest import FakeClock

CHAT_PATH = "/v1/chat/completions"


def chat(max_tokens: int = 50, **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}], **fields}


class Desk:
    """An admitter over a real SQLite store, with one key."""

    def __init__(self, store: Store, settings: Settings, raw_key: str) -> None:
        self.store, self.settings, self.raw_key = store, settings, raw_key
        self.admitter = Admitter(settings, store, Pricer(settings.prices))

    async def ticket(self, body: dict[str, Any] | None = None, path: str = CHAT_PATH) -> Ticket:
        ticket = Ticket(route=resolve(self.settings.routes(), "POST", path))
        ticket.key = await self.admitter.authenticate(f"Bearer {self.raw_key}")
        ticket.body = orjson.dumps(body) if body is not None else b""
        return ticket

    async def admit(
        self, policy: str | None = None, body: dict[str, Any] | None = None, path: str = CHAT_PATH, **asks: Any
    ) -> Ticket:
        """Admit one call; the ticket, whatever was decided (a refusal is raised)."""
        ticket = await self.ticket(body, path)
        await self.admitter.admit(ticket, Asked(policy_lines=(policy,) if policy else (), **asks))
        return ticket

    async def refused(self, error: type[Exception], policy: str, body: dict[str, Any] | None = None) -> Any:
        """Admit one call expected to be refused: (its ticket, the error)."""
        ticket = await self.ticket(body)
        with pytest.raises(error) as refusal:
            await self.admitter.admit(ticket, Asked(policy_lines=(policy,)))
        return ticket, refusal.value


def on_sqlite(
    tmp_path: Path,
    clock: FakeClock,
    body: Callable[[Desk], Awaitable[None]],
    key_policies: list[str] | None = None,
    **settings: Any,
) -> None:
    async def main() -> None:
        store = open_store(f"sqlite:///{tmp_path}/admission.db", clock)
        try:
            raw, _ = await create_key(store, "alice", key_policies or [])
            await body(Desk(store, Settings(**settings), raw))
        finally:
            await store.close()

    asyncio.run(main())


def test_requests_are_admitted_up_to_the_quota_then_denied_until_the_window_passes(
    tmp_path: Path, clock: FakeClock
) -> None:
    async def body(desk: Desk) -> None:
        first = await desk.admit("2;w=60")
        assert first.decision is Decision.ALLOWED
        assert first.headers()["Helicone-RateLimit-Remaining"] == "1"
        second = await desk.admit("2;w=60")
        assert {k: v for k, v in second.headers().items() if k.startswith("Helicone")} == {
            "Helicone-RateLimit-Limit": "2",
            "Helicone-RateLimit-Remaining": "0",
            "Helicone-RateLimit-Policy": "2;w=60",
            "Helicone-RateLimit-Reset": "60",
        }
        clock.advance(15)
        third, denial = await desk.refused(RateLimited, "2;w=60")
        assert third.decision is Decision.DENIED
        assert denial.extra["retry_after"] == 45 and denial.should_retry is False  # beyond max_retry_wait
        assert third.headers()["Helicone-RateLimit-Reset"] == "45"
        assert third.states[0].used == 2  # the denied call took nothing
        clock.advance(45)
        assert (await desk.admit("2;w=60")).decision is Decision.ALLOWED

    on_sqlite(tmp_path, clock, body)


def test_a_short_wait_is_one_the_sdks_may_retry(tmp_path: Path, clock: FakeClock) -> None:
    async def body(desk: Desk) -> None:
        await desk.admit("1;w=60")
        clock.advance(57)
        _, denial = await desk.refused(RateLimited, "1;w=60")
        assert denial.extra["retry_after"] == 3 and denial.should_retry is True

    on_sqlite(tmp_path, clock, body)


def test_no_policy_is_admitted_without_headers(tmp_path: Path, clock: FakeClock) -> None:
    async def body(desk: Desk) -> None:
        ticket = await desk.admit()
        assert ticket.decision is Decision.NO_POLICY and ticket.budgets == [] and ticket.headers() == {}

    on_sqlite(tmp_path, clock, body)


def test_key_bound_policies_count_after_the_header_ones(tmp_path: Path, clock: FakeClock) -> None:
    async def body(desk: Desk) -> None:
        ticket = await desk.admit("5;w=60")
        assert [p.normal_form() for p in ticket.policies] == ["5;w=60", "1;w=3600"]
        assert [s.used for s in ticket.states] == [1, 1]
        await desk.refused(RateLimited, "5;w=60")  # the key's own policy is spent

    on_sqlite(tmp_path, clock, body, key_policies=["1;w=3600"])


def test_a_token_budget_holds_the_estimate_while_the_call_is_in_flight(tmp_path: Path, clock: FakeClock) -> None:
    async def body(desk: Desk) -> None:
        ticket = await desk.admit("1000;w=60;u=token", chat(max_tokens=50))
        assert ticket.decision is Decision.ALLOWED
        assert ticket.prompt_tokens > 0 and ticket.output_tokens == 50
        [amount] = ticket.amounts
        assert amount == ticket.prompt_tokens + 50
        assert (ticket.states[0].used, ticket.states[0].held) == (0, amount)
        assert ticket.headers()["Helicone-RateLimit-Remaining"] == str(1000 - amount)
        assert ticket.model == "gpt-4o"

    on_sqlite(tmp_path, clock, body)


def test_a_call_above_the_whole_quota_never_fits(tmp_path: Path, clock: FakeClock) -> None:
    async def body(desk: Desk) -> None:
        ticket, refusal = await desk.refused(RateLimited, "100;w=60;u=token", chat(max_tokens=500))
        assert ticket.decision is Decision.NEVER_FITS
        assert refusal.should_retry is False and "retry_after" not in refusal.extra
        assert "can never fit" in refusal.message and "lower max_tokens" in refusal.message
        assert ticket.amounts[0] > 100
        assert ticket.headers()["Helicone-RateLimit-Remaining"] == "100"  # read, nothing taken

    on_sqlite(tmp_path, clock, body)


def test_segment_values_come_from_the_header_the_body_or_a_property(tmp_path: Path, clock: FakeClock) -> None:
    async def body(desk: Desk) -> None:
        by_body = await desk.admit("10;w=60;s=user", chat(user="bob"))
        assert by_body.user == "bob" and by_body.budgets[0].value == "bob"
        by_header = await desk.admit("10;w=60;s=user", chat(user="bob"), user_id="carol")
        assert by_header.budgets[0].value == "carol" and by_header.states[0].used == 1
        headers = [("Helicone-Property-Org", "acme"), ("Helicone-Property-Team", ""), ("Other", "x")]
        ask = asked(["5;w=60;s=org"], None, headers)
        assert ask.properties == (("Helicone-Property-Org", "acme"),)  # empty values are not properties
        ticket = await desk.ticket()
        await desk.admitter.admit(ticket, ask)
        assert ticket.properties == {"org": "acme"} and ticket.budgets[0].value == "acme"

    on_sqlite(tmp_path, clock, body)


def test_a_missing_segment_value_is_a_400_or_left_out_under_ignore(tmp_path: Path, clock: FakeClock) -> None:
    async def strict(desk: Desk) -> None:
        _, error = await desk.refused(MissingSegment, "10;w=60;s=user")
        assert {k: error.extra[k] for k in ("policy", "segment")} == {"policy": "10;w=60;s=user", "segment": "user"}
        assert error.extra["grammar"] == GRAMMAR and "user" in error.extra["problem"]

    async def lenient(desk: Desk) -> None:
        ticket = await desk.admit("10;w=60;s=user, 3;w=60")
        assert [p.normal_form() for p in ticket.policies] == ["3;w=60"]
        assert ticket.headers()["X-Helicone-Error"] == "missing_segment_value"
        assert ticket.headers()["Helicone-RateLimit-Policy"] == "3;w=60"

    on_sqlite(tmp_path, clock, strict)
    on_sqlite(tmp_path / "ignore", clock, lenient, on_policy_error="ignore")


def test_a_key_revoked_after_it_was_verified_is_refused_in_the_admission_step(tmp_path: Path, clock: FakeClock) -> None:
    async def body(desk: Desk) -> None:
        ticket = await desk.ticket()
        assert ticket.key is not None
        await desk.store.revoke_key(ticket.key.id, clock())
        with pytest.raises(Unauthorized):
            await desk.admitter.admit(ticket, Asked(policy_lines=("5;w=60",)))
        with pytest.raises(Unauthorized):  # and forgotten: not verified again
            await desk.admitter.authenticate(f"Bearer {desk.raw_key}")
        with pytest.raises(Unauthorized, match="missing gateway key"):
            await desk.admitter.authenticate("Basic abc")

    on_sqlite(tmp_path, clock, body)


@pytest.mark.parametrize("on_store_error", ["open", "closed"])
def test_an_unreachable_store_fails_open_or_closed(on_store_error: str) -> None:
    """A real Redis URL nothing listens on: fail-open lets the call through without limits (and no
    headers); fail-closed answers 503."""

    async def main() -> None:
        store = open_store("redis://127.0.0.1:1/0")
        settings = Settings(on_store_error=on_store_error)
        admitter = Admitter(settings, store, Pricer())
        try:
            for _ in range(2):  # the first finds it down; the next one tries it again
                ticket = Ticket(route=resolve(settings.routes(), "POST", CHAT_PATH))
                ticket.key = GatewayKey("k1", "alice", ())
                if on_store_error == "closed":
                    with pytest.raises(StoreUnavailable):
                        await admitter.admit(ticket, Asked(policy_lines=("5;w=60",)))
                else:
                    assert await admitter.admit(ticket, Asked(policy_lines=("5;w=60",))) is Decision.FAIL_OPEN
                    assert ticket.budgets == [] and ticket.headers() == {}
                assert admitter.guard.down
            with pytest.raises(StoreUnavailable, match="cannot verify the gateway key"):
                await admitter.authenticate("Bearer qg_0123456789ab_secret")
        finally:
            await store.close()

    asyncio.run(main())
