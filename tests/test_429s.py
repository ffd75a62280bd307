"""429s an application can act on, with the official SDKs at their default settings (their own
retries included), on every store.

- A wait longer than `max_retry_wait` carries `x-should-retry: false`: the SDK raises its
  RateLimitError at once instead of sleeping for `Retry-After` (the Anthropic SDK would sleep an
  hour for `1;w=3600`); a short wait is left to the SDK's retry.
- A request that can never fit (its estimate exceeds the whole quota, or the quota is below one
  unit) is refused before the store step, without `Retry-After`, saying what to change.
- A 429 from a counter that other policies share says so.

The store's clock is injected (FakeClock): windows pass without sleeping. An SDK call that could
sleep for long runs in a thread, watched through the SDK's own log line announcing a retry.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

from quotagate.config import ConfigError, Settings
from quotagate.fake_upstream import FakeUpstream
from quotagate.keys import split_key
from quotagate.limiter import base_amounts, budgets_for
from quotagate.policy import parse_policies
from quotagate.server import PROXY
from quotagate.stores import open_store

from .conftest import CHAT, CLAUDE, POLICY, FakeClock, Gateway, httpx

RETRYING = re.compile(r"Retrying request .*?in ([0-9.]+) seconds")


def sdk_openai(gw: Gateway, key: str, **headers: str) -> openai.OpenAI:
    """The OpenAI SDK as an application makes it: default retries, default timeouts."""
    return openai.OpenAI(
        base_url=f"{gw.url}/v1", api_key="sk-app", default_headers={"Helicone-Auth": f"Bearer {key}", **headers}
    )


def sdk_anthropic(gw: Gateway, key: str, **headers: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=f"{gw.url}/anthropic",
        api_key="sk-ant-app",
        default_headers={"Helicone-Auth": f"Bearer {key}", **headers},
    )


def chat(sdk: str, gw: Gateway, key: str, headers: dict[str, str], max_tokens: int = 5) -> Callable[[], Any]:
    """One call of the named SDK, at its defaults."""
    if sdk == "openai":
        client = sdk_openai(gw, key, **headers)
        return lambda: client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=max_tokens)
    claude = sdk_anthropic(gw, key, **headers)
    return lambda: claude.messages.create(model="claude-haiku-4-5", max_tokens=max_tokens, messages=CLAUDE)


class Watched:
    """An SDK call in a thread of its own. The SDKs log "Retrying request ... in N seconds" before
    they sleep: a sleep longer than a few seconds fails the test at once instead of hanging it."""

    def __init__(self, caplog: pytest.LogCaptureFixture, send: Callable[[], Any]) -> None:
        self.caplog, self.send = caplog, send
        self.error: BaseException | None = None
        self.result: Any = None
        caplog.set_level(logging.INFO, logger="openai")
        caplog.set_level(logging.INFO, logger="anthropic")

    def run(self) -> Watched:
        thread = threading.Thread(target=self._call, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while thread.is_alive():
            sleeps = self.retry_sleeps()
            if any(s > 5 for s in sleeps):
                pytest.fail(f"the SDK sleeps {max(sleeps):.0f} s before retrying the 429")
            assert time.monotonic() < deadline, "the SDK call did not end"
            thread.join(0.02)
        return self

    def _call(self) -> None:
        try:
            self.result = self.send()
        except BaseException as exc:
            self.error = exc

    def retry_sleeps(self) -> list[float]:
        """The sleeps the SDK announced: "Retrying request [to URL] in N seconds"."""
        found = (RETRYING.match(r.getMessage()) for r in self.caplog.records)
        return [float(m.group(1)) for m in found if m]


def requests_seen(gw: Gateway, status: str) -> float:
    """Requests the gateway answered with this status so far (its metrics)."""
    with gw.http() as http:
        text = http.get("/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("quotagate_requests_total{") and f'status="{status}"' in line
    )


def on_gateway(gw: Gateway, coro: Any) -> Any:
    """Run a coroutine on the gateway's own event loop (its store object lives there)."""
    return asyncio.run_coroutine_threadsafe(coro, gw.server.loop).result(timeout=30)


def fill(gw: Gateway, clock: FakeClock, key: str, policy: str, count: int, user: str | None = None) -> None:
    """Take `count` requests from a request budget directly in the gateway's store (as `count`
    admitted calls would), at the store's clock."""
    key_id = split_key(key)[0]  # type: ignore[index]
    budgets = budgets_for(key_id, parse_policies(policy), {None: None, "user": user})

    async def take() -> None:
        store = open_store(gw.store_url, clock)
        try:
            amounts = base_amounts(budgets)
            done = await asyncio.gather(
                *(store.admit(key_id, budgets, amounts, f"fill{i}", 60.0) for i in range(count))
            )
            assert all(a.allowed for a in done)
        finally:
            await store.close()

    asyncio.run(take())


# --- 1. a long wait fails fast; a short one is the SDK's to retry ------------------------------


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
@pytest.mark.parametrize("policy", ["1;w=60", "1;w=3600", "1000;w=86400;s=user"])
def test_a_long_wait_is_not_retried_by_the_sdks(
    gw: Gateway, upstream: FakeUpstream, clock: FakeClock, caplog: pytest.LogCaptureFixture, sdk: str, policy: str
) -> None:
    key = gw.key()
    headers = {POLICY: policy, "Helicone-User-Id": "alice"}
    fill(gw, clock, key, policy, int(policy.split(";")[0]), user="alice")
    clock.advance(10)
    denied_before = requests_seen(gw, "429")
    call = Watched(caplog, chat(sdk, gw, key, headers)).run()
    error = call.error
    assert isinstance(error, openai.RateLimitError | anthropic.RateLimitError), error
    assert call.retry_sleeps() == []
    assert requests_seen(gw, "429") == denied_before + 1  # exactly one request: no retry
    response = error.response
    assert response.headers["x-should-retry"] == "false"
    window = int(policy.split("w=")[1].split(";")[0])
    assert int(response.headers["retry-after"]) == window - 10  # honest: when the first unit ages out
    assert response.headers["helicone-ratelimit-remaining"] == "0"
    assert upstream.count() == 0


def in_flight(gw: Gateway, key: str, upstream: FakeUpstream, count: int, policy: str) -> list[threading.Thread]:
    """`count` chat completions held by the fake provider (X-Fake-Hold "held") until released."""
    headers = {"Helicone-Auth": f"Bearer {key}", POLICY: policy, "X-Fake-Hold": "held"}
    body = {"model": "gpt-4o-mini", "messages": CHAT, "max_tokens": 500}

    def send() -> None:
        with gw.http() as http:
            assert http.post("/v1/chat/completions", json=body, headers=headers).status_code == 200

    threads = [threading.Thread(target=send) for _ in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while upstream.count("/chat/completions") < count:
        assert time.monotonic() < deadline, "the held calls never reached the provider"
        time.sleep(0.01)
    return threads


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_a_short_wait_is_retried_by_the_sdks(gw: Gateway, upstream: FakeUpstream, sdk: str) -> None:
    """Two calls in flight hold the whole token budget: a third is told Retry-After 1, without
    x-should-retry, and the SDK retries it after a second; by then the two have ended."""
    key = gw.key()
    policy = "1000;w=60;u=token"
    held = in_flight(gw, key, upstream, 2, policy)
    denied_before, allowed_before = requests_seen(gw, "429"), requests_seen(gw, "200")

    def release_after_the_first_429() -> None:
        deadline = time.monotonic() + 20
        while requests_seen(gw, "429") == denied_before and time.monotonic() < deadline:
            time.sleep(0.01)
        upstream.release("held")

    releaser = threading.Thread(target=release_after_the_first_429)
    releaser.start()
    answer = chat(sdk, gw, key, {POLICY: policy})()  # the SDK sleeps its Retry-After: 1 s
    releaser.join(timeout=20)
    for thread in held:
        thread.join(timeout=20)
    assert answer is not None
    assert requests_seen(gw, "429") == denied_before + 1  # the first try, told to wait a second
    assert requests_seen(gw, "200") == allowed_before + 3  # the two held calls and the retry
    assert upstream.count("/chat/completions") + upstream.count("/messages") == 3


def test_max_retry_wait_decides_what_the_sdks_retry(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """With max_retry_wait 0 even a one-second wait carries x-should-retry: false."""
    gw = make_gateway(max_retry_wait=0)
    key = gw.key()
    policy = "1000;w=60;u=token"
    held = in_flight(gw, key, upstream, 2, policy)
    denied_before = requests_seen(gw, "429")
    call = Watched(caplog, chat("anthropic", gw, key, {POLICY: policy})).run()
    upstream.release("held")
    for thread in held:
        thread.join(timeout=20)
    assert isinstance(call.error, anthropic.RateLimitError)
    assert call.error.response.headers["retry-after"] == "1"
    assert call.error.response.headers["x-should-retry"] == "false"
    assert call.retry_sleeps() == [] and requests_seen(gw, "429") == denied_before + 1


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), 10**12])
def test_max_retry_wait_is_validated(value: float) -> None:
    with pytest.raises(ConfigError, match="max_retry_wait"):
        Settings(max_retry_wait=value)


# --- 2. a request that can never fit ------------------------------------------------------------


def refused(response: httpx.Response) -> str:
    """The message of a never-fit 429, after checking what every such 429 carries."""
    assert response.status_code == 429
    assert response.headers["x-should-retry"] == "false"
    assert "retry-after" not in response.headers  # waiting does not help
    assert response.headers["x-helicone-error"] == "rate_limited"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_exceeded", "rate_limited")
    assert "retry_after" not in error
    return str(error["message"])


def post_chat(gw: Gateway, key: str, policy: str, **body: Any) -> httpx.Response:
    headers = {"Helicone-Auth": f"Bearer {key}", POLICY: policy}
    with gw.http() as http:
        return http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": CHAT, **body}, headers=headers)


def ledger(gw: Gateway, key: str) -> dict[str, tuple[int, int]]:
    """unit -> (charged, held) of the key's budgets, read through the gateway's own store."""
    store = gw.server.app[PROXY].store
    rows = on_gateway(gw, store.usage(key_id=split_key(key)[0]))  # type: ignore[index]
    return {r.unit: (r.used, r.held) for r in rows}


def test_an_estimate_above_the_whole_quota_never_fits(gw: Gateway, upstream: FakeUpstream) -> None:
    key = gw.key()
    policy = "1000;w=60;u=token"
    assert post_chat(gw, key, policy, max_tokens=10).status_code == 200
    [(used, _)] = ledger(gw, key).values()
    response = post_chat(gw, key, policy, max_tokens=5000)
    message = refused(response)
    assert "1000;w=60;u=token" in message and "5011 tokens" in message and "lower max_tokens" in message
    assert response.headers["helicone-ratelimit-policy"] == "1000;w=60;u=token"
    assert response.headers["helicone-ratelimit-limit"] == "1000"
    assert response.headers["helicone-ratelimit-remaining"] == str(1000 - used)  # what is left: nothing taken
    assert response.headers["ratelimit"].startswith(f'"p1";r={1000 - used};t=')
    assert upstream.count() == 1
    assert ledger(gw, key) == {"token": (used, 0)}  # nothing held or charged for the refused call
    assert post_chat(gw, key, policy, max_tokens=900).status_code == 200  # 911 still fits
    # SPEC §3 holds for estimates within the quota: admitted while charged plus held is below it
    assert post_chat(gw, gw.key("exact"), policy, max_tokens=989).status_code == 200  # 11 + 989 = the quota
    assert upstream.count() == 3


def test_a_call_without_max_tokens_is_told_to_set_it(gw: Gateway, upstream: FakeUpstream) -> None:
    """No max_tokens: the gateway holds default_max_tokens (4096) for the output, more than 1000."""
    message = refused(post_chat(gw, gw.key(), "1000;w=60;u=token"))
    assert "sets no max_tokens" in message and "default_max_tokens" in message and "4107 tokens" in message
    assert upstream.count() == 0


def test_a_cents_estimate_above_the_quota_never_fits(gw: Gateway, upstream: FakeUpstream) -> None:
    """gpt-4o output at $10 per million: 200,000 tokens may cost 200 cents, against 1 cent."""
    message = refused(post_chat(gw, gw.key(), "1;w=60;u=cents, 100;w=60", max_tokens=200_000))
    assert "1;w=60;u=cents" in message and "lower max_tokens" in message and "cents" in message
    assert upstream.count() == 0


@pytest.mark.parametrize(
    ("policy", "unit"),
    [("0.5;w=60", "request"), ("0.0000001;w=60;u=cents", "cent"), ("0.9;w=60;u=token", "token")],
)
def test_a_quota_below_one_unit_never_fits(gw: Gateway, upstream: FakeUpstream, policy: str, unit: str) -> None:
    key = gw.key()
    response = post_chat(gw, key, policy, max_tokens=5)
    message = refused(response)
    assert policy in message and "raise the quota" in message and unit in message
    assert response.headers["helicone-ratelimit-remaining"] == "0"
    assert upstream.count() == 0
    assert ledger(gw, key) == {}  # no counter was made for it


def test_never_fit_is_not_a_budget_denial(gw: Gateway, upstream: FakeUpstream, clock: FakeClock) -> None:
    """Not counted in quotagate_denials_total nor in the store's recent denials (nothing was
    exhausted); counted in quotagate_requests_total as decision "never_fits". A revoked key is
    still a 401."""
    store = gw.server.app[PROXY].store
    with gw.http() as http:
        before = http.get("/metrics").text
    refused(post_chat(gw, gw.key(), "0.5;w=60"))
    with gw.http() as http:
        after = http.get("/metrics").text
    assert [line for line in after.splitlines() if line.startswith("quotagate_denials_total")] == [
        line for line in before.splitlines() if line.startswith("quotagate_denials_total")
    ]
    assert 'decision="never_fits"' in after
    assert on_gateway(gw, store.denials()) == []
    key = gw.key("revoked")
    assert post_chat(gw, key, "0.5;w=60").status_code == 429  # the gateway now knows the key
    assert on_gateway(gw, store.revoke_key(split_key(key)[0], time.time()))  # type: ignore[index]
    assert post_chat(gw, key, "0.5;w=60").status_code == 401  # revoked comes first


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_the_sdks_raise_at_once_on_a_request_that_never_fits(
    gw: Gateway, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture, sdk: str
) -> None:
    denied_before = requests_seen(gw, "429")
    call = Watched(caplog, chat(sdk, gw, gw.key(), {POLICY: "1000;w=60;u=token"}, max_tokens=5000)).run()
    assert isinstance(call.error, openai.RateLimitError | anthropic.RateLimitError)
    assert requests_seen(gw, "429") == denied_before + 1 and call.retry_sleeps() == []
    assert upstream.count() == 0


# --- 3. a counter that other policies share ---------------------------------------------------


def denied_message(client: openai.OpenAI) -> str:
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=2)
    return str(info.value.body["message"])  # type: ignore[index]


def test_a_429_from_a_shared_counter_says_so(gw: Gateway, upstream: FakeUpstream) -> None:
    key = gw.key()
    busy = gw.openai(key, **{POLICY: "60;w=60"})
    for _ in range(3):
        busy.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=2)
    fresh = gw.openai(key, **{POLICY: "3;w=60"})
    for _ in range(2):  # the second refusal says it too
        message = denied_message(fresh)
        assert "3;w=60" in message and "shared" in message and "60;w=60" in message
        assert "w=60" in message and "no segment" in message  # which counter
        assert "different window" in message and "segment" in message  # how to get a budget of its own
    assert upstream.count() == 3
    alone = gw.openai(key, **{POLICY: "2;w=120"})
    for _ in range(2):
        alone.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=2)
    assert "Rate limit exceeded" in (message := denied_message(alone)) and "shared" not in message
    pair = gw.openai(key, **{POLICY: "60;w=300, 2;w=300"})  # two of its own policies on one counter
    for _ in range(2):
        pair.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=2)
    reordered = gw.openai(key, **{POLICY: "2;w=300, 60;w=300"})
    assert "shared" not in denied_message(reordered)


def test_a_request_counter_used_beyond_the_quota_was_filled_by_others(gw: Gateway, upstream: FakeUpstream) -> None:
    """5 used against this request's quota of 3: other policies' calls, whoever wrote last."""
    key = gw.key()
    busy = gw.openai(key, **{POLICY: "60;w=60;s=user", "Helicone-User-Id": "ann"})
    for _ in range(5):
        busy.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=2)
    both = gw.openai(key, **{POLICY: "3;w=60;s=user, 60;w=60;s=user", "Helicone-User-Id": "ann"})
    message = denied_message(both)
    assert "shared" in message and "5 used" in message and "per user" in message
