"""Prometheus metrics. Labels are bounded: routes come from the config, statuses and units are
small sets; user ids, property values and model names never become label values.

With several worker processes `quotagate serve` points `PROMETHEUS_MULTIPROC_DIR` at a fresh
directory before any worker starts, and `/metrics` adds up every worker's values.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)

REQUESTS = Counter(
    "quotagate_requests",
    "Requests handled, by route, HTTP status and rate-limit decision.",
    ["route", "status", "decision"],
)
DENIALS = Counter(
    "quotagate_denials",
    "Requests denied (429), by the unit and segment kind of the policy that denied.",
    ["unit", "segment"],
)
STORE_ERRORS = Counter(
    "quotagate_store_errors",
    "Store operations that failed, by operation.",
    ["operation"],
)
UNLIMITED = Counter(
    "quotagate_unlimited_requests",
    "Requests let through without limits because the store failed (fail-open).",
)
STORE_UP = Gauge(
    "quotagate_store_up",
    "1 while the store answers, 0 while it does not.",
    multiprocess_mode="livemin",
)
UPSTREAM_LATENCY = Histogram(
    "quotagate_upstream_latency_seconds",
    "Time from sending to the upstream to its last byte.",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
OVERHEAD = Histogram(
    "quotagate_gateway_overhead_seconds",
    "Time the gateway itself adds to a request (total time minus the upstream's).",
    buckets=OVERHEAD_BUCKETS,
)
CHARGED_CENTS = Counter("quotagate_charged_cents", "US cents charged to cents budgets' calls.")
CHARGED_TOKENS = Counter("quotagate_charged_tokens", "Tokens charged to calls (input plus output).")
UNPRICED = Counter("quotagate_unpriced_calls", "Calls charged 0 because their model has no known price.")


def render() -> tuple[bytes, str]:
    """The metrics page: every worker's values summed when running several processes."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
