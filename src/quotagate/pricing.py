"""What a call cost, in micro-cents (1e-6 US cent), from the `genai-prices` data.

The library's data, as a compact table (price_table.py: the library itself is never imported
here), finds the model and its price card; the arithmetic per call is done here, in integers,
on the card's per-million-token rates. It gives the same micro-cents as the library's own
`calc_price` at a small fraction of its cost (figures: bench/README.md), which matters because
every call on a cents budget is priced twice: its estimate at admission and its real cost at the
end. Config overrides win over the library. Only text token prices are applied (input, cached
input, cache writes, output).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal

from . import price_table
from .config import PriceOverride
from .price_table import Model, Price, PriceTable
from .usage import Usage

log = logging.getLogger("quotagate.pricing")

# micro-cents per token = (USD per million tokens) * 100 cents * 1e6 micro / 1e6 tokens; rates are
# kept as integers in 1e-6 micro-cents per token, so that a call is priced in integer arithmetic
# (exact for prices with up to six decimals in USD per million tokens; finer ones round up)
_RATE_SCALE = 10**6
_TO_RATE = Decimal(100 * _RATE_SCALE)
_REFRESH_SECONDS = 3600.0
CACHE_SIZE = 4096
MODEL_NAME_MAX = 256  # longer model names (no provider has one) are priced as unknown, never looked up
# A dated snapshot's suffix (`gpt-4o-mini-2024-07-18`, `claude-sonnet-4-5-20250929`): responses
# name the snapshot, so an override given for the alias applies to it too.
_SNAPSHOT_DATE = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")


def _scaled(usd_per_mtok: Decimal | str | int) -> int:
    return int((Decimal(usd_per_mtok) * _TO_RATE).to_integral_value(ROUND_CEILING))


@dataclass(slots=True, frozen=True)
class Rate:
    """A price per token in 1e-6 micro-cents; a tiered rate is a base and (threshold, rate) steps
    on the total input tokens. Built from USD per million tokens with `Rate.usd`."""

    base: int
    tiers: tuple[tuple[int, int], ...] = ()

    @classmethod
    def usd(cls, base: Decimal, tiers: tuple[tuple[int, Decimal], ...] = ()) -> Rate:
        return cls(_scaled(base), tuple((start, _scaled(rate)) for start, rate in tiers))

    def at(self, total_input: int) -> int:
        for start, rate in reversed(self.tiers):
            if total_input > start:
                return rate
        return self.base


LONG_CACHE_WRITE = 2
"""Anthropic bills cache writes kept an hour (`"ttl": "1h"`) at twice the input price."""
WEB_SEARCH = 1_000_000
"""Anthropic's web search tool: $10 per 1,000 searches, 1 cent (a million micro-cents) each."""
PRIORITY = 2
"""OpenAI bills its priority tier at up to twice the standard price (gpt-4o 1.7 x, gpt-5 2 x); the
pricing library has no priority prices."""


@dataclass(slots=True, frozen=True)
class PriceCard:
    input: Rate
    output: Rate
    cache_read: Rate | None = None
    cache_write: Rate | None = None

    def microcents(self, usage: Usage) -> int:
        total_in = usage.input_tokens
        cached = usage.cache_read_tokens + usage.cache_write_tokens
        read = self.cache_read or self.input
        write = (self.cache_write or self.input).at(total_in)
        long = min(usage.cache_write_long_tokens, usage.cache_write_tokens)
        scaled = (
            max(0, total_in - cached) * self.input.at(total_in)
            + usage.cache_read_tokens * read.at(total_in)
            + (usage.cache_write_tokens - long) * write
            + long * max(write, LONG_CACHE_WRITE * self.input.at(total_in))
            + usage.output_tokens * self.output.at(total_in)
        )
        if usage.priority:
            scaled *= PRIORITY
        return -(-scaled // _RATE_SCALE)  # rounded up to a whole micro-cent


def _rate(value: Price) -> Rate | None:
    if value is None:
        return None
    if isinstance(value, str):
        return Rate.usd(Decimal(value))
    base, tiers = value
    return Rate.usd(Decimal(base), tuple((start, Decimal(rate)) for start, rate in tiers))


_table: PriceTable | None = None


def load_prices() -> None:
    """Load the price table now (`serve` does, before it starts its workers, which share it): the
    first call priced would otherwise wait out its extraction (price_table.py), about a second."""
    global _table
    if _table is None:
        _table = price_table.load()


def _find_model(provider: str, model: str, api_url: str | None) -> Model | None:
    """The library's model entry: by the upstream's URL (who serves the call), else by provider."""
    load_prices()
    assert _table is not None
    if api_url:
        try:
            return _table.find(model, None, api_url)[1]
        except LookupError:
            pass
    try:
        return _table.find(model, provider, None)[1]
    except LookupError:
        return None


def _card_from_library(provider: str, model: str, api_url: str | None = None) -> PriceCard | None:
    info = _find_model(provider, model, api_url)
    if info is None:
        return None
    input_mtok, output_mtok, cache_read_mtok, cache_write_mtok = info.prices_at(datetime.now(tz=UTC))
    if input_mtok is None and output_mtok is None:
        return None
    zero = Rate(0)
    return PriceCard(
        input=_rate(input_mtok) or zero,
        output=_rate(output_mtok) or zero,
        cache_read=_rate(cache_read_mtok),
        cache_write=_rate(cache_write_mtok),
    )


def _card_from_override(price: PriceOverride) -> PriceCard:
    return PriceCard(
        input=Rate.usd(price.input_mtok),
        output=Rate.usd(price.output_mtok),
        cache_read=Rate.usd(price.cache_read_mtok) if price.cache_read_mtok is not None else None,
        cache_write=Rate.usd(price.cache_write_mtok) if price.cache_write_mtok is not None else None,
    )


class Pricer:
    """Prices usage per (provider, model), caching each model's card; None for an unknown model.

    `provider` is the route's API flavour (`openai`, `anthropic`); `api_url`, the upstream's base
    URL, is tried first, so that a model served by another OpenAI-compatible provider (Groq,
    Together, ...) gets that provider's price. Overrides are matched case-insensitively, on the
    model's name or, for a dated snapshot, on the name without its date. An unknown model is
    logged once.
    """

    def __init__(self, overrides: dict[str, PriceOverride] | None = None) -> None:
        self.overrides = {m.lower(): _card_from_override(p) for m, p in (overrides or {}).items()}
        self._cards: dict[tuple[str, str | None, str], tuple[PriceCard | None, float]] = {}
        self.unknown_models: set[str] = set()
        self.long_name_seen = False

    def card(self, provider: str, model: str, api_url: str | None = None) -> PriceCard | None:
        if len(model) > MODEL_NAME_MAX:
            # The name comes from the client: matching a megabyte against every model's regular
            # expressions stalls the event loop (~0.2 s per MB), and caching it would keep it.
            if not self.long_name_seen:
                self.long_name_seen = True
                log.warning("a model name of %d characters: priced as unknown (cost 0)", len(model))
            return None
        model = model.lower()
        if self.overrides:
            override = self.overrides.get(model) or self.overrides.get(_SNAPSHOT_DATE.sub("", model))
            if override is not None:
                return override
        cached = self._cards.get((provider, api_url, model))
        now = time.monotonic()
        if cached is not None and now - cached[1] <= _REFRESH_SECONDS:
            return cached[0]
        card = _card_from_library(provider, model, api_url)
        self._cards[(provider, api_url, model)] = (card, now)
        if len(self._cards) > CACHE_SIZE:  # model names come from clients: keep the cache bounded
            del self._cards[next(iter(self._cards))]
        if card is None and model not in self.unknown_models:
            if len(self.unknown_models) >= CACHE_SIZE:
                self.unknown_models.clear()
            self.unknown_models.add(model)
            log.warning("no price known for model %r (provider %s): its calls cost 0", model[:200], provider)
        return card

    def cost(self, provider: str, model: str | None, usage: Usage, api_url: str | None = None) -> int | None:
        """Micro-cents, or None when the model's price is unknown."""
        card = self.card(provider, model, api_url) if model else None
        if card is None:
            return None
        return card.microcents(usage) + usage.web_searches * WEB_SEARCH
