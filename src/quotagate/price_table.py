"""genai-prices' data as a compact table: what the gateway's price lookups read, and the library's
lookup repeated on it, without the library in the process.

The library's data is a pydantic snapshot of every provider and model (47 providers, 2,330 models
in 0.2.3): loaded in a worker, the library, pydantic and the snapshot take ~12 MB of its memory
(figures: bench/README.md), where pricing a call reads four token prices of one model. `load()`
runs a short-lived child process (this file, run by the same interpreter) that loads the library
and writes out, with `marshal`, what the lookups need: each provider's URL pattern, provider match,
model match and fallback providers, each model's match and its input, output, cache-read and
cache-write prices (tiers and dated or time-of-day conditions kept): 1.6 MB of a worker's memory.
The gateway's process never imports the library. Should the child fail (or the interpreter be a
frozen application, which cannot run this file), the table is extracted in-process instead (the
memory is then spent, as before), with a warning.

`PriceTable.find` is `DataSnapshot.find_provider_model` of genai-prices 0.2.3 on that table (the
provider by id, by API URL or by model; the model by its match, in order, then in the fallback
providers, then with a compact date `-20251211` read as `-2025-12-11`), and `Model.prices_at` is
`ModelInfo.get_prices` (the last conditional price whose condition holds, else the first).
tests/test_price_table.py checks both against the library for every model it knows.
"""

from __future__ import annotations

import logging
import marshal
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

log = logging.getLogger("quotagate.pricing")

PRICE_KEYS = ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok")
"""The prices the gateway applies (see pricing.py), in this order in `Model.prices_at`'s tuple."""

Price = str | tuple[str, tuple[tuple[int, str], ...]] | None
"""USD per million tokens as a decimal string, or a tiered price: (base, ((start, price), ...))."""
Prices = tuple[Price, Price, Price, Price]
Clause = str | tuple[str, Any]
"""A match clause of genai-prices: a lower-cased name it equals, or (kind, argument)."""


# --- the lookup -----------------------------------------------------------------------------------


def matches(clause: Clause, text: str) -> bool:
    """genai-prices' `Clause*.is_match`; string arguments are stored lower-cased."""
    if isinstance(clause, str):  # equals: most clauses
        return text.lower() == clause
    kind, arg = clause
    if kind == "starts_with":
        return text.lower().startswith(arg)
    if kind == "ends_with":
        return text.lower().endswith(arg)
    if kind == "contains":
        return bool(arg in text.lower())
    if kind == "regex":
        return arg.search(text) is not None
    if kind == "or":
        return any(matches(c, text) for c in arg)
    return all(matches(c, text) for c in arg)  # "and"


@dataclass(slots=True, frozen=True)
class Condition:
    """From a date on (`start_date`, UTC), or daily between two times of day (UTC, in µs since
    midnight; an interval past midnight wraps), as genai-prices' constraints."""

    start_date: date | None = None
    start_us: int = 0
    end_us: int = 0

    def holds(self, at: datetime) -> bool:
        at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
        if self.start_date is not None:
            return at.date() >= self.start_date
        now = ((at.hour * 60 + at.minute) * 60 + at.second) * 1_000_000 + at.microsecond
        if self.end_us < self.start_us:
            return now >= self.start_us or now < self.end_us
        return self.start_us <= now < self.end_us


@dataclass(slots=True, frozen=True)
class Model:
    id: str
    match: Clause
    prices: tuple[tuple[Condition | None, Prices], ...]

    def prices_at(self, at: datetime) -> Prices:
        """The last price whose condition holds at `at`, else the first (`ModelInfo.get_prices`)."""
        for condition, prices in reversed(self.prices):
            if condition is None or condition.holds(at):
                return prices
        return self.prices[0][1]


@dataclass(slots=True, frozen=True)
class Provider:
    id: str
    api_pattern: re.Pattern[str]
    provider_match: Clause | None
    model_match: Clause | None
    fallbacks: tuple[str, ...]
    models: tuple[Model, ...]

    def _match_model(self, model_ref: str, providers: tuple[Provider, ...] | None) -> Model | None:
        for model in self.models:
            if matches(model.match, model_ref.lower()):
                return model
        if self.fallbacks and providers:
            for provider_id in self.fallbacks:
                other = next((p for p in providers if p.id == provider_id), None)
                if other is not None and (found := other._match_model(model_ref, None)):  # one step only
                    return found
        return None

    def find_model(self, model_ref: str, providers: tuple[Provider, ...]) -> Model | None:
        model_ref = model_ref.lower()
        if model := self._match_model(model_ref, providers):
            return model
        normalized = _normalize_compact_date(model_ref)
        if normalized != model_ref:
            return self._match_model(normalized, providers)
        return None


_COMPACT_DATE = re.compile(r"(-)(20\d{2})(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])(?=-|:|$)")


def _normalize_compact_date(model_ref: str) -> str:
    def replace(m: re.Match[str]) -> str:
        year, month, day = (int(m.group(i)) for i in range(2, 5))
        try:
            date(year, month, day)
        except ValueError:
            return m.group(0)
        return f"{m.group(1)}{year:04d}-{month:02d}-{day:02d}"

    return _COMPACT_DATE.sub(replace, model_ref)


class PriceTable:
    """Every provider and model of genai-prices' data, in its order."""

    def __init__(self, providers: tuple[Provider, ...]) -> None:
        self.providers = providers

    def find(self, model_ref: str, provider_id: str | None, api_url: str | None) -> tuple[Provider, Model]:
        """`DataSnapshot.find_provider_model(model_ref, None, provider_id, api_url)`: LookupError
        when no provider or no model matches."""
        model_ref = model_ref.lower()
        if provider_id and provider_id.lower() == "litellm" and "/" in model_ref:
            actual_provider, actual_ref = model_ref.split("/", 1)
            if actual_provider and self.provider_by_id(actual_provider):
                provider_id, model_ref = actual_provider, actual_ref
        provider = self.find_provider(model_ref, provider_id, api_url)
        if model := provider.find_model(model_ref, self.providers):
            return provider, model
        raise LookupError(f"no model {model_ref!r} in {provider.id}")

    def find_provider(self, model_ref: str | None, provider_id: str | None, api_url: str | None) -> Provider:
        if provider_id is not None:
            if provider := self.provider_by_id(provider_id):
                return provider
            if provider_id.lower() != "litellm":
                raise LookupError(f"no provider {provider_id!r}")
        if api_url is not None:
            for provider in self.providers:
                if provider.api_pattern.match(api_url):
                    return provider
            raise LookupError(f"no provider for {api_url!r}")
        if model_ref:
            for provider in self.providers:
                if provider.model_match is not None and matches(provider.model_match, model_ref):
                    return provider
        raise LookupError(f"no provider for model {model_ref!r}")

    def provider_by_id(self, provider_id: str) -> Provider | None:
        normalized = provider_id.lower().strip()
        for provider in self.providers:
            if provider.id == normalized:
                return provider
        for provider in self.providers:
            if provider.provider_match is not None and matches(provider.provider_match, normalized):
                return provider
        return None


# --- building it -----------------------------------------------------------------------------------


def _compiled(clause: Any) -> Clause:
    """The clause with its regular expressions compiled (genai-prices: `re.search(regex, text)`)."""
    if isinstance(clause, str):
        return clause
    kind, arg = clause
    if kind == "regex":
        return kind, re.compile(arg)
    if kind in ("or", "and") and any(not isinstance(c, str) for c in arg):
        return kind, tuple(_compiled(c) for c in arg)
    return kind, arg


def from_data(data: tuple[Any, ...]) -> PriceTable:
    """The table from `extract`'s nested tuples."""
    return PriceTable(
        tuple(
            Provider(
                id=pid,
                api_pattern=re.compile(pattern),
                provider_match=_compiled(provider_match) if provider_match else None,
                model_match=_compiled(model_match) if model_match else None,
                fallbacks=fallbacks,
                models=tuple(
                    Model(mid, _compiled(match), tuple((_condition(c), prices) for c, prices in conditional))
                    for mid, match, conditional in models
                ),
            )
            for pid, pattern, provider_match, model_match, fallbacks, models in data
        )
    )


def _condition(raw: tuple[Any, ...] | None) -> Condition | None:
    if raw is None:
        return None
    if raw[0] == "date":
        return Condition(start_date=date.fromisoformat(raw[1]))
    return Condition(start_us=raw[1], end_us=raw[2])


def extract() -> tuple[Any, ...]:
    """What the table needs of genai-prices' bundled data, as nested tuples of strings and numbers
    (run in the child process): per provider (id, URL pattern, provider match, model match,
    fallback providers, models), per model (id, match, ((condition, prices), ...)), each clause
    lower-cased (`matches`), each price a decimal string or (base, ((start, price), ...))."""
    from datetime import time

    from genai_prices import data_snapshot, types

    strings: dict[str, str] = {}

    def one(text: str) -> str:  # each distinct string once
        return strings.setdefault(text, text)

    def clause(c: Any) -> Clause:
        for kind, attr in (("or", "or_"), ("and", "and_")):
            if hasattr(c, attr):
                return kind, tuple(clause(x) for x in getattr(c, attr))
        if hasattr(c, "regex"):
            return "regex", c.regex
        if hasattr(c, "equals"):
            return one(c.equals.lower())
        (kind,) = (k for k in ("starts_with", "ends_with", "contains") if hasattr(c, k))
        return kind, one(getattr(c, kind).lower())

    def price(value: Any) -> Price:
        if value is None:
            return None
        if isinstance(value, types.TieredPrices):
            return one(str(value.base)), tuple((int(t.start), one(str(t.price))) for t in value.tiers)
        return one(str(value))

    def utc_us(t: time) -> int:  # a time of day in UTC, a naive one read as UTC (as the library does)
        if t.tzinfo is not None:
            t = datetime.combine(date(1970, 1, 1), t).astimezone(UTC).timetz()
        return ((t.hour * 60 + t.minute) * 60 + t.second) * 1_000_000 + t.microsecond

    def condition(c: Any) -> tuple[Any, ...] | None:
        if c is None:
            return None
        if isinstance(c, types.StartDateConstraint):
            return "date", c.start_date.isoformat()
        if isinstance(c, types.TimeOfDateConstraint):
            return "time", utc_us(c.start_time), utc_us(c.end_time)
        raise TypeError(f"unknown price condition {c!r}")

    def model(m: Any) -> tuple[Any, ...]:
        conditional = m.prices if isinstance(m.prices, list) else [types.ConditionalPrice(prices=m.prices)]
        prices = tuple(
            (condition(c.constraint), tuple(price(getattr(c.prices, k)) for k in PRICE_KEYS)) for c in conditional
        )
        return one(m.id), clause(m.match), prices

    return tuple(
        (
            p.id,
            p.api_pattern,
            clause(p.provider_match) if p.provider_match else None,
            clause(p.model_match) if p.model_match else None,
            tuple(p.fallback_model_providers or ()),
            tuple(model(m) for m in p.models),
        )
        for p in data_snapshot.get_snapshot().providers
    )


_CHILD = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"


def load() -> PriceTable:
    """The table, extracted by a child process (the same interpreter: `marshal` is its own format);
    in this process if the child fails."""
    try:
        if getattr(sys, "frozen", False):
            raise OSError("a frozen application runs no script")
        done = subprocess.run(
            [sys.executable, "-P", "-c", _CHILD, __file__],
            capture_output=True,
            check=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        return from_data(marshal.loads(done.stdout))
    except (OSError, subprocess.SubprocessError, ValueError, EOFError, TypeError) as exc:
        detail = exc.stderr.decode(errors="replace")[-500:] if isinstance(exc, subprocess.CalledProcessError) else ""
        log.warning("price data extracted in this process (the child process failed: %r %s)", exc, detail)
        return from_data(extract())


if __name__ == "__main__":  # the child: the data to stdout
    sys.stdout.buffer.write(marshal.dumps(extract()))
