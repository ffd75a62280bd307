"""/metrics as Prometheus scrapes it: values move with the traffic, labels stay bounded, and with
several worker processes every worker's counts add up, whichever worker answers the scrape.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx2 as httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from quotagate.fake_upstream import FakeUpstream

from .conftest import CHAT, POLICY, Gateway, chat, free_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, **headers: str) -> Samples:
    """Every sample of one scrape, on a connection of its own: {(name, sorted labels): value}."""
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def grew(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_metrics_move_with_the_traffic(serve: Callable[..., Gateway], upstream: FakeUpstream) -> None:
    """A gateway process of its own: counters that other tests in this process drove (to 1e30
    tokens, say, where adding 450 changes nothing) are not these."""
    gateway = serve()
    before = scrape(gateway.url)
    tokens = {"X-Fake-Prompt-Tokens": "120", "X-Fake-Completion-Tokens": "30"}
    client = gateway.openai(gateway.key(), **{POLICY: "2;w=60;s=user", "Helicone-User-Id": "alice-secret-id"})
    assert [chat(client, **tokens) for _ in range(3)] == [200, 200, 429]
    assert chat(client, "no-such-model-anywhere", **{"Helicone-User-Id": "bob", **tokens}) == 200
    assert chat(gateway.openai("qg_000000000000_wrong")) == 401
    after = scrape(gateway.url)

    requests = "quotagate_requests_total"
    assert grew(before, after, requests, route="openai", status="200", decision="allowed") == 3
    assert grew(before, after, requests, route="openai", status="429", decision="denied") == 1
    assert grew(before, after, requests, route="openai", status="401", decision="rejected") == 1
    assert grew(before, after, "quotagate_denials_total", unit="request", segment="user") == 1
    assert grew(before, after, "quotagate_denials_total", unit="request", segment="global") == 0
    assert grew(before, after, "quotagate_upstream_latency_seconds_count", route="openai") == 3
    assert grew(before, after, "quotagate_gateway_overhead_seconds_count") == 3
    assert grew(before, after, "quotagate_gateway_overhead_seconds_bucket", le="+Inf") == 3
    assert grew(before, after, "quotagate_charged_tokens_total") == 3 * 150
    assert grew(before, after, "quotagate_unpriced_calls_total") == 1
    cents = grew(before, after, "quotagate_charged_cents_total")
    # gpt-4o-mini at $0.15 / $0.60 per million tokens: two calls of 120 in + 30 out
    assert cents == pytest.approx(2 * (120 * 0.15 + 30 * 0.60) / 1e6 * 100, rel=1e-6)
    assert value(after, "quotagate_store_up") == 1
    text = httpx.get(f"{gateway.url}/metrics").text
    assert "alice-secret-id" not in text and "no-such-model" not in text  # no unbounded label values
    assert upstream.count() == 3


def test_metrics_can_require_the_admin_token(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway(admin_token="tok", metrics_require_token=True)
    assert httpx.get(f"{gateway.url}/metrics").status_code == 401
    assert httpx.get(f"{gateway.url}/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    samples = scrape(gateway.url, Authorization="Bearer tok")
    assert ("quotagate_store_up", ()) in samples


def test_store_errors_and_store_up(make_gateway: Callable[..., Gateway]) -> None:
    """A store nobody listens on: each failed store call is counted and store_up drops to 0."""
    gateway = make_gateway(store_url=f"redis://127.0.0.1:{free_port()}/0")
    before = scrape(gateway.url)
    client = gateway.openai("qg_0123456789ab_some-secret", **{POLICY: "5;w=60"})
    assert chat(client) == 503  # the key cannot be verified
    after = scrape(gateway.url)
    assert grew(before, after, "quotagate_store_errors_total", operation="get_key") == 1
    assert value(after, "quotagate_store_up") == 0
    assert grew(before, after, "quotagate_requests_total", route="openai", status="503", decision="rejected") == 1


def test_two_workers_add_up(serve: Callable[..., Gateway], upstream: FakeUpstream) -> None:
    """Connections spread over both workers; any worker's /metrics (and /admin/stats) counts all."""
    gateway = serve("--workers", "2", "--admin-token", "tok")
    key = gateway.key()
    headers = {"Helicone-Auth": f"Bearer {key}", POLICY: "15;w=60", "Authorization": "Bearer sk-x"}
    body = {"model": "gpt-4o-mini", "messages": CHAT}
    statuses = []
    for _ in range(20):  # a new connection each time, so the kernel picks a worker each time
        response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers, timeout=10)
        statuses.append(response.status_code)
    assert statuses == [200] * 15 + [429] * 5
    logs = [orjson.loads(line) for line in gateway.log_lines() if line.startswith("{")]
    served = {line["pid"] for line in logs if line["logger"] == "quotagate.access"}
    assert len(served) == 2, "both workers should have served requests"

    for _ in range(6):  # each scrape on its own connection, answered by either worker
        samples = scrape(gateway.url)
        assert value(samples, "quotagate_requests_total", route="openai", status="200", decision="allowed") == 15
        assert value(samples, "quotagate_requests_total", route="openai", status="429", decision="denied") == 5
        assert value(samples, "quotagate_denials_total", unit="request", segment="global") == 5
        assert value(samples, "quotagate_upstream_latency_seconds_count", route="openai") == 15
        assert value(samples, "quotagate_store_up") == 1
        stats = httpx.get(f"{gateway.url}/admin/stats", headers={"Authorization": "Bearer tok"}).json()
        assert (stats["window_totals"]["allowed"], stats["window_totals"]["denied"]) == (15, 5)
    assert upstream.count("/chat/completions") == 15
