"""The compact price table (price_table.py) against genai-prices itself: for every model the library
knows, the same model found by the same names, the same prices at any time, and the same cost.

The library is loaded here, in the test process, as the reference; the gateway never loads it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_CEILING, Decimal
from typing import Any

import pytest
from genai_prices import Usage as LibraryUsage
from genai_prices import data_snapshot, types

from quotagate import price_table, pricing
from quotagate.pricing import Pricer
from quotagate.usage import Usage

SNAPSHOT = data_snapshot.get_snapshot()
PROVIDERS: list[types.Provider] = SNAPSHOT.providers
URLS = [
    "https://api.openai.com/v1",
    "https://api.anthropic.com",
    "https://api.groq.com/openai",
    "https://myres.openai.azure.com",
    "https://generativelanguage.googleapis.com/v1beta/openai",
    "https://us-east5-aiplatform.googleapis.com",
    "https://api.together.xyz/v1",
    "https://openrouter.ai/api/v1",
    "https://api.deepseek.com",
    "https://api.mistral.ai/v1",
    "https://api.x.ai/v1",
    "https://api.fireworks.ai/inference/v1",
    "https://api.cerebras.ai/v1",
    "https://bedrock-runtime.us-east-1.amazonaws.com",
    "https://api.perplexity.ai",
    "https://router.huggingface.co/groq/v1",
    "http://10.0.0.5:8000",
    "http://localhost:11434/v1",
]


@pytest.fixture(scope="module")
def table() -> price_table.PriceTable:
    return price_table.load()


def names(clause: Any) -> Iterator[str]:
    """Model names a clause matches, and some it nearly matches."""
    if hasattr(clause, "or_") or hasattr(clause, "and_"):
        for sub in getattr(clause, "or_", None) or clause.and_:
            yield from names(sub)
    elif hasattr(clause, "equals"):
        yield from (clause.equals, clause.equals.upper(), clause.equals + "-x")
    elif hasattr(clause, "starts_with"):
        yield from (clause.starts_with, clause.starts_with + "-2025-01-01", clause.starts_with + "-20250101")
        yield clause.starts_with + "-20251399"  # not a date: left as it is
    elif hasattr(clause, "ends_with"):
        yield from ("x" + clause.ends_with, clause.ends_with)
    elif hasattr(clause, "contains"):
        yield from ("a" + clause.contains + "b", clause.contains)


def library_find(model: str, provider: str | None, url: str | None) -> tuple[str, str] | None:
    try:
        p, m = SNAPSHOT.find_provider_model(model, None, provider, url)
    except LookupError:
        return None
    return p.id, m.id


def table_find(
    table: price_table.PriceTable, model: str, provider: str | None, url: str | None
) -> tuple[str, str] | None:
    try:
        p, m = table.find(model, provider, url)
    except LookupError:
        return None
    return p.id, m.id


def test_the_table_holds_every_provider_and_model_in_order(table: price_table.PriceTable) -> None:
    assert [p.id for p in table.providers] == [p.id for p in PROVIDERS]
    assert [[m.id for m in p.models] for p in table.providers] == [[m.id for m in p.models] for p in PROVIDERS]
    assert sum(len(p.models) for p in table.providers) > 2000


def test_every_name_finds_the_model_the_library_finds(table: price_table.PriceTable) -> None:
    """Each model's names (from its match clauses, near misses and compact dates included) under its
    own provider; a quarter of them under the gateway's two (openai, anthropic) too, and a twelfth
    under azure and google (their fallback providers), an id to normalise and litellm."""
    checked = found = 0
    for provider in PROVIDERS:
        refs = {provider.id + "-unknown-model"}
        for model in provider.models:
            refs.update((model.id, model.id + "-20250101", *names(model.match)))
        for index, ref in enumerate(sorted(refs)):  # the library takes ~1 ms a lookup: some with each
            others = (
                *(("openai", "anthropic") if index % 4 == 0 else ()),
                *(("azure", "google", "OpenAI ", "litellm") if index % 12 == 0 else ()),
            )
            for pid in (provider.id, *others):
                expected = library_find(ref, pid, None)
                assert table_find(table, ref, pid, None) == expected, (ref, pid)
                checked += 1
                found += expected is not None
            if index % 12 == 0:
                ref = f"{provider.id}/{ref}"
                assert table_find(table, ref, "litellm", None) == library_find(ref, "litellm", None), ref
    assert checked > 10_000 and found > 8_000


def test_every_upstream_url_finds_the_provider_the_library_finds(table: price_table.PriceTable) -> None:
    matched = set()
    for url in URLS:
        for provider in PROVIDERS:
            for model in provider.models[:: 1 if url in URLS[:3] else 4]:  # a quarter for most URLs
                expected = library_find(model.id, None, url)
                assert table_find(table, model.id, None, url) == expected, (model.id, url)
                if expected:
                    matched.add(expected[0])
    assert {"openai", "anthropic", "groq", "azure", "google", "together", "openrouter", "deepseek"} <= matched


def instants() -> list[datetime]:
    """Now, the day before and the day of every dated price, and either side of every time-of-day
    price's bounds."""
    days: set[date] = set()
    bounds: set[time] = set()
    for provider in PROVIDERS:
        for model in provider.models:
            for price in model.prices if isinstance(model.prices, list) else ():
                c = price.constraint
                if isinstance(c, types.StartDateConstraint):
                    days.update((c.start_date, c.start_date - timedelta(days=1)))
                elif isinstance(c, types.TimeOfDateConstraint):
                    bounds.update((c.start_time, c.end_time))
    at = [datetime.now(tz=UTC)] + [datetime.combine(d, time(12), tzinfo=UTC) for d in days]
    for bound in bounds:
        edge = datetime.combine(date(2026, 3, 1), bound.replace(tzinfo=None), tzinfo=bound.tzinfo or UTC)
        at += [edge - timedelta(microseconds=1), edge, edge + timedelta(minutes=1)]
    return at


def library_prices(model: types.ModelInfo, at: datetime) -> list[Any]:
    prices = model.get_prices(at)
    return [getattr(prices, key) for key in price_table.PRICE_KEYS]


def as_library(value: price_table.Price) -> Any:
    if value is None or isinstance(value, str):
        return None if value is None else Decimal(value)
    base, tiers = value
    return types.TieredPrices(Decimal(base), [types.Tier(start, Decimal(price)) for start, price in tiers])


def test_every_model_has_the_library_s_prices_at_any_time(table: price_table.PriceTable) -> None:
    at = instants()
    assert len(at) > 50
    conditional = 0
    for provider, ours in zip(PROVIDERS, table.providers, strict=True):
        for model, mine in zip(provider.models, ours.models, strict=True):
            conditional += isinstance(model.prices, list) and len(model.prices) > 1
            for when in at:
                assert [as_library(p) for p in mine.prices_at(when)] == library_prices(model, when), (model.id, when)
    assert conditional > 100


USAGES = [
    Usage(1000, 500),
    Usage(3000, 100, 2000, 500),  # cache reads and writes inside the input
    Usage(250_000, 2000, 10_000),  # past the usual 200k tier
    Usage(1_500_000, 7, 0, 300_000),
]


def library_microcents(model: types.ModelInfo, provider: types.Provider, usage: Usage) -> int:
    price = model.calc_price(
        LibraryUsage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cache_write_tokens=usage.cache_write_tokens,
        ),
        provider,
    )
    return int((price.total_price * 100_000_000).to_integral_value(ROUND_CEILING))  # USD -> micro-cents


def test_every_model_costs_what_the_library_says() -> None:
    """Models priced by their token prices only (the gateway applies no other: per-request fees,
    searches, audio hours... are not counted, docs/counting.md); by the route's provider."""
    pricer = Pricer()
    compared = 0
    for provider in PROVIDERS:
        for model in provider.models:
            keys = {k for k, v in model.get_prices(datetime.now(tz=UTC)).__dict__.items() if v is not None}
            if (
                not keys
                or not keys <= set(price_table.PRICE_KEYS)
                or model.get_prices(datetime.now(tz=UTC)).input_mtok is None
            ):
                continue
            if library_find(model.id, provider.id, None) != (provider.id, model.id):
                continue  # its id matches another model first, or none (`regional.amazon.nova-2-lite-v1:0`)
            for usage in USAGES:
                ours, theirs = pricer.cost(provider.id, model.id, usage), library_microcents(model, provider, usage)
                assert ours is not None
                # a price finer than 1e-6 USD per million tokens (`0.18000000000000002`) is rounded up
                # to it (pricing.py): less than a micro-cent per million tokens more
                tokens = usage.input_tokens + usage.output_tokens
                assert ours == theirs or (finer(model) and 0 < ours - theirs <= tokens // 1_000_000 + 1), (
                    provider.id,
                    model.id,
                    usage,
                )
            compared += 1
    assert compared > 1500


def finer(model: types.ModelInfo) -> bool:
    prices = model.get_prices(datetime.now(tz=UTC))
    values = [getattr(prices, k) for k in price_table.PRICE_KEYS]
    for v in values:
        if isinstance(v, types.TieredPrices):
            values += [v.base, *(t.price for t in v.tiers)]
    return any(isinstance(v, Decimal) and v.as_tuple().exponent < -6 for v in values)  # type: ignore[operator]


def test_the_gateway_never_imports_the_library() -> None:
    code = (
        "import sys\n"
        "from quotagate import pricing\n"
        "pricing.load_prices()\n"
        "from quotagate.usage import Usage\n"
        "assert pricing.Pricer().cost('openai', 'gpt-4o-mini', Usage(1000, 500)) == 45_000\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('genai_prices', 'pydantic', 'httpx2')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert done.stderr == ""


def test_a_failed_child_falls_back_to_the_library_in_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, table: price_table.PriceTable
) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    fallback = price_table.load()
    assert "price data extracted in this process" in caplog.text
    for ref in ("gpt-4o-mini", "claude-sonnet-4-5-20250929", "deepseek-chat", "llama-3.1-8b-instant"):
        for pid in ("openai", "anthropic", "groq", "deepseek"):
            assert table_find(fallback, ref, pid, None) == table_find(table, ref, pid, None)
    assert fallback.find("gpt-4o", "openai", None)[1].prices == table.find("gpt-4o", "openai", None)[1].prices


def test_pricer_loads_the_table_once() -> None:
    pricing.load_prices()
    loaded = pricing._table
    pricing.load_prices()
    assert pricing._table is loaded is not None
