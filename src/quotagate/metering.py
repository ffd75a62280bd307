"""Metering: from an answer's usage to its cost and its charge; no HTTP here.

    usage (a JSON body, or an SSE stream as it passes) ─► cost ─► ONE store step replaces the holds

A stream cut short (the client left, the upstream broke off) is charged the prompt's estimate (or
the input it reported) plus the output that was streamed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from enum import Enum

from . import metrics
from .admission import StoreGuard, Ticket, price_amount
from .limiter import Budget
from .policy import MAX_SCALED_QUOTA, Unit
from .pricing import Pricer
from .stores import StepError, Store, StoreError
from .usage import StreamUsage, Usage, from_body

log = logging.getLogger("quotagate")


class Outcome(Enum):
    """How a forwarded call ended (the `outcome` of its log line)."""

    COMPLETE = "complete"
    CLIENT_GONE = "client_gone"
    UPSTREAM_BROKEN = "upstream_broken"


@dataclass(slots=True)
class Meter:
    """What metering knows of one call's answer, for its charge and its log line."""

    upstream_status: int | None = None
    model: str | None = None  # as the answer names it
    usage: Usage | None = None
    tracker: StreamUsage | None = None
    cost: int | None = None  # micro-cents
    charged: bool = False
    outcome: Outcome = Outcome.COMPLETE

    @property
    def succeeded(self) -> bool:
        return self.upstream_status is not None and 200 <= self.upstream_status < 300


class Metering:
    """Charges for the calls of one worker: usage, cost, one store step per call."""

    def __init__(self, store: Store, guard: StoreGuard, pricer: Pricer) -> None:
        self.store = store
        self.guard = guard
        self.pricer = pricer

    @staticmethod
    def read_body(meter: Meter, body: bytes) -> None:
        """The usage and model a whole JSON answer reports."""
        meter.usage, model = from_body(body)
        meter.model = model or meter.model

    @staticmethod
    def track(ticket: Ticket, meter: Meter, strip: bool) -> StreamUsage:
        """Usage read from an SSE stream as it passes (and its text, when it is held against budgets)."""
        meter.tracker = StreamUsage(track_text=bool(ticket.holding), strip_usage_chunk=strip)
        return meter.tracker

    def stream_ended(self, ticket: Ticket, meter: Meter, outcome: Outcome) -> bytes:
        """A stream's usage once it ended, whole or cut; the terminal event still to send, if any."""
        meter.outcome = outcome
        tracker = meter.tracker
        if tracker is None:
            return b""
        if outcome is Outcome.UPSTREAM_BROKEN and tracker.ended:
            meter.outcome = Outcome.COMPLETE  # cut after its terminal event: nothing is missing
        tail = tracker.finish() if meter.outcome is Outcome.COMPLETE else b""
        meter.model = tracker.model or meter.model
        whole = meter.outcome is Outcome.COMPLETE and tracker.usage is not None
        if whole:
            meter.usage = tracker.usage
        elif ticket.holding or tracker.usage is not None:
            meter.usage = self.partial_usage(ticket, meter)
        else:  # nothing reported, nothing held: its usage is unknown (not 0), and it charges nothing
            meter.usage = None
        return tail

    def cut_usage(self, ticket: Ticket, meter: Meter) -> Usage | None:
        """What a call cut short is charged on: for one holding budgets, its partial usage."""
        return self.partial_usage(ticket, meter) if ticket.holding else None

    @staticmethod
    def partial_usage(ticket: Ticket, meter: Meter) -> Usage:
        """A call cut short: the prompt's estimate (or the reported input) plus what was streamed."""
        tracker = meter.tracker
        usage = (tracker.usage if tracker else None) or Usage(ticket.prompt_tokens, 0)
        streamed = tracker.streamed_tokens() if tracker and ticket.holding else 0
        return Usage(
            usage.input_tokens or ticket.prompt_tokens,
            max(usage.output_tokens, streamed),
            usage.cache_read_tokens,
            usage.cache_write_tokens,
            usage.cache_write_long_tokens,
            usage.priority or ticket.priority,
            usage.web_searches,
        )

    async def charge(self, ticket: Ticket, meter: Meter, usage: Usage | None) -> None:
        """Replace the holds of this call by its real cost (0 without usage), once.

        The store step is shielded: a client that goes away while it runs cannot undo it or make
        it happen twice.
        """
        if meter.charged:
            return
        meter.charged = True
        holding = ticket.holding
        if ticket.price is not None:
            self._count_price(ticket, meter)
        elif usage is not None:
            self._count_usage(ticket, meter, usage)
        if not holding or not ticket.states:
            return
        amounts = [self._amount(ticket, meter, b, usage) for b in holding]
        try:
            states = await asyncio.shield(self.store.charge(holding, ticket.reservation, amounts))
        except StoreError as exc:
            self.guard.failed("charge", exc)
            return
        except StepError as exc:  # this call's own charge failed: its answer still goes out, its hold expires
            log.error("charge of a call failed (its hold expires by itself): %s", exc)
            metrics.STORE_ERRORS.labels("charge").inc()
            return
        self.guard.succeeded()
        by_id = {b.id: s for b, s in zip(holding, states, strict=True)}
        ticket.states = [by_id.get(b.id, s) for b, s in zip(ticket.budgets, ticket.states, strict=True)]

    @staticmethod
    def _amount(ticket: Ticket, meter: Meter, budget: Budget, usage: Usage | None) -> int:
        """What a call is charged, at most the largest amount the stores count exactly (an
        upstream may report any usage); a per-call price when the upstream answered with success."""
        if ticket.price is not None:
            amount = price_amount(ticket.price, budget.unit) if meter.succeeded else 0
            return min(amount or 0, MAX_SCALED_QUOTA)
        if usage is None:
            return 0
        if budget.unit is Unit.TOKEN:
            return min(usage.total_tokens, MAX_SCALED_QUOTA)
        return min(meter.cost or 0, MAX_SCALED_QUOTA)

    @staticmethod
    def _count_price(ticket: Ticket, meter: Meter) -> None:
        """A call charged its per-call price: its cost for the log line and the metric."""
        cents = ticket.price.microcents if ticket.price is not None and meter.succeeded else 0
        meter.cost = cents
        if cents:
            metrics.CHARGED_CENTS.inc(cents / 1_000_000)

    def _count_usage(self, ticket: Ticket, meter: Meter, usage: Usage) -> None:
        metrics.CHARGED_TOKENS.inc(usage.total_tokens)
        meter.cost = ticket.cost(self.pricer, usage, meter.model or ticket.model)
        if meter.cost is None:
            metrics.UNPRICED.inc()
        else:
            metrics.CHARGED_CENTS.inc(meter.cost / 1_000_000)
