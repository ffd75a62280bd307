"""Prometheus metrics, and the allowed-vs-denied history the dashboard draws from them.

Labels are bounded: routes come from the config, statuses and units are small sets; user ids,
property values and model names never become label values.

With several worker processes `quotagate serve` points `PROMETHEUS_MULTIPROC_DIR` at a fresh
directory before prometheus_client is first imported (it picks its value class at import), so
every worker writes its values to files there and `/metrics`, whichever worker answers, adds up
every worker's values. The supervisor marks exited workers dead.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric

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
POLICY_SKIPS = Counter(
    "quotagate_policy_skips",
    "Requests that had header policies left out (on_policy_error = ignore), by the error code a 400 would carry.",
    ["reason"],
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
CHARGED_CENTS = Counter("quotagate_charged_cents", "US cents of model cost charged (every call with a known price).")
CHARGED_TOKENS = Counter("quotagate_charged_tokens", "Tokens charged to calls (input plus output).")
UNPRICED = Counter("quotagate_unpriced_calls", "Calls charged 0 because their model has no known price.")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def render() -> tuple[bytes, str]:
    """The metrics page: every worker's values summed when running several processes."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def mark_dead(pid: int) -> None:
    """Forget an exited worker's live gauges (its counters keep counting in the sums)."""
    if multiprocess_dir():
        multiprocess.mark_process_dead(pid)


# --- allowed vs denied over time, for the dashboard -----------------------------------------------

#: decision label -> the dashboard's series it counts in
SERIES = {"allowed": "allowed", "no_policy": "allowed", "fail_open": "allowed", "denied": "denied"}


def request_totals() -> dict[str, float]:
    """Requests handled so far by series (allowed, denied, rejected), summed over every worker."""
    totals = {"allowed": 0.0, "denied": 0.0, "rejected": 0.0}
    for metric in _request_metrics():
        for sample in metric.samples:
            if sample.name == "quotagate_requests_total":
                series = SERIES.get(sample.labels.get("decision", ""), "rejected")
                totals[series] += sample.value
    return totals


def _request_metrics() -> Iterable[Metric]:
    path = multiprocess_dir()
    if path is None:
        return REQUESTS.collect()
    files = glob.glob(os.path.join(path, "counter_*.db"))
    return [m for m in multiprocess.MultiProcessCollector.merge(files) if m.name == "quotagate_requests"]


_children: dict[tuple[object, ...], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, remembered: label sets are few and the request path is hot."""
    key = (metric, *labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


class RequestHistory:
    """Requests per `step`-second bucket over the last `span` buckets, from the requests counter.

    No store write on the hot path: the counter is sampled (by a background task every `step`
    seconds, and on every read) and each bucket is the growth of the totals since the previous
    sampled bucket. With several workers every worker samples the same shared totals, so each
    draws the same chart. A gateway instance sees only its own traffic.
    """

    def __init__(
        self,
        step: int = 10,
        span: int = 90,
        totals: Callable[[], dict[str, float]] = request_totals,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.step, self.span, self.totals, self.clock = step, span, totals, clock
        self.marks: dict[int, dict[str, float]] = {}
        self.started = int(self.clock() // step)
        self.marks[self.started - 1] = self.totals()  # what was counted before this history began

    def sample(self) -> None:
        now = int(self.clock() // self.step)
        self.marks[now] = self.totals()
        old = sorted(i for i in self.marks if i < now - self.span)
        for index in old[:-1]:  # the newest of them is the baseline of the oldest bucket shown
            del self.marks[index]

    def series(self) -> list[dict[str, float | int | None]]:
        """Oldest first: {"t": bucket start, "allowed": n, "denied": n, "rejected": n} (None before the start)."""
        self.sample()
        now = int(self.clock() // self.step)
        previous = max((i for i in self.marks if i < now - self.span + 1), default=None)
        last = self.marks[previous] if previous is not None else None
        out: list[dict[str, float | int | None]] = []
        for index in range(now - self.span + 1, now + 1):
            point: dict[str, float | int | None] = {"t": index * self.step}
            mark = self.marks.get(index)
            for name in ("allowed", "denied", "rejected"):
                point[name] = None if index < self.started else 0
                if mark is not None and last is not None:
                    point[name] = max(0.0, mark[name] - last[name])
            if mark is not None:
                last = mark
            out.append(point)
        return out
