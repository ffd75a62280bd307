"""What pricing one call costs: genai-prices' own `calc_price` against quotagate's `Pricer`.

    .venv/bin/python bench/pricing_cost.py [calls]

Both price the same usage of the same models (a model's card is looked up once and cached by the
Pricer, as in the gateway); the script checks that they agree to the micro-cent, then prints the
mean time per call of each.
"""

from __future__ import annotations

import sys
import time
from decimal import ROUND_CEILING

from genai_prices import Usage as LibraryUsage
from genai_prices import calc_price

from quotagate.pricing import Pricer
from quotagate.usage import Usage

CASES = [
    ("openai", "gpt-4o-mini", Usage(1200, 350, 400)),
    ("openai", "gpt-4.1", Usage(5000, 800)),
    ("anthropic", "claude-haiku-4-5", Usage(3000, 500, 1000, 200)),
    ("anthropic", "claude-sonnet-4-5", Usage(250_000, 2000, 10_000)),
]


def library_microcents(provider: str, model: str, usage: Usage) -> int:
    price = calc_price(
        LibraryUsage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cache_write_tokens=usage.cache_write_tokens,
        ),
        model,
        provider_id=provider,
    )
    return int((price.total_price * 100_000_000).to_integral_value(ROUND_CEILING))  # USD -> micro-cents


def per_call(fn: object, calls: int) -> float:
    assert callable(fn)
    started = time.perf_counter()
    for i in range(calls):
        provider, model, usage = CASES[i % len(CASES)]
        fn(provider, model, usage)
    return (time.perf_counter() - started) / calls


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
    pricer = Pricer()
    for provider, model, usage in CASES:
        mine, theirs = pricer.cost(provider, model, usage), library_microcents(provider, model, usage)
        assert mine is not None and mine == theirs, f"{model}: Pricer {mine} µ¢, genai-prices {theirs} µ¢"
        print(f"{model:<20} {mine / 1e6:>12.6f} cents (both agree)")
    library = per_call(library_microcents, calls // 10)
    ours = per_call(pricer.cost, calls)
    print(f"genai_prices.calc_price: {library * 1e6:8.1f} µs per call ({calls // 10} calls)")
    print(f"quotagate Pricer.cost:   {ours * 1e6:8.1f} µs per call ({calls} calls)")
    print(f"ratio: {library / ours:.0f}x")


if __name__ == "__main__":
    main()
