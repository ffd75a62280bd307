"""The window algorithm on its own, with time as a plain number: no store, no sleeping."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from quotagate import limiter
from quotagate.limiter import Budget, budgets_for, rate_limit_headers, reports
from quotagate.policy import Unit, parse_policies, parse_policy

T0 = 1_700_000_000.0


def request_budget(quota: int, window: int = 60) -> Budget:
    return budgets_for("k", [parse_policy(f"{quota};w={window}")], {None: None})[0]


def try_take(state: dict, budget: Budget, now: float, amount: int = 1) -> bool:
    limiter.expire(state, budget.window, now)
    if not limiter.fits(state, budget, amount):
        return False
    limiter.take(state, budget, amount, now, "r", 600)
    return True


def test_quota_then_denied_then_released_after_the_window() -> None:
    budget, state = request_budget(3), limiter.new_state()
    assert [try_take(state, budget, T0 + i) for i in range(4)] == [True, True, True, False]
    assert not try_take(state, budget, T0 + 59.9)
    assert try_take(state, budget, T0 + 60.0)  # the first unit is exactly w old: released
    assert not try_take(state, budget, T0 + 60.5)


def test_reset_and_retry_after_never_exceed_the_window() -> None:
    budget, state = request_budget(1), limiter.new_state()
    assert try_take(state, budget, T0 + 0.25)
    view = limiter.view(state, budget, T0 + 0.25, 1, denied=True)
    assert view.reset == 60 and view.retry_after == 60
    view = limiter.view(state, budget, T0 + 30.25, 1, denied=True)
    assert view.reset == 30 and view.retry_after == 30


def test_retry_after_waits_for_enough_units_to_expire() -> None:
    budget, state = request_budget(3, window=600), limiter.new_state()  # buckets of 10 s
    for at in (0, 100, 200):
        assert try_take(state, budget, T0 + at)
    limiter.expire(state, 600, T0 + 300)
    assert limiter.view(state, budget, T0 + 300, 1, denied=True).retry_after == 300  # when the first expires


@settings(max_examples=200, deadline=None)
@given(
    quota=st.integers(1, 20),
    window=st.sampled_from([60, 61, 119, 600, 3600]),
    gaps=st.lists(st.floats(0, 30, allow_nan=False), min_size=1, max_size=150),
)
def test_never_more_than_quota_in_any_window(quota: int, window: int, gaps: list[float]) -> None:
    budget, state = request_budget(quota, window), limiter.new_state()
    now = T0
    admitted: list[float] = []
    for gap in gaps:
        now += gap
        if try_take(state, budget, now):
            admitted.append(now)
    for start in admitted:  # every interval (t - w, t] ending at an admission
        assert sum(1 for t in admitted if start - window < t <= start) <= quota


@settings(max_examples=100, deadline=None)
@given(
    quota=st.integers(1, 10),
    window=st.sampled_from([60, 600, 3600]),
    gaps=st.lists(st.floats(0, 20, allow_nan=False), min_size=1, max_size=100),
)
def test_under_admission_is_bounded_by_one_bucket(quota: int, window: int, gaps: list[float]) -> None:
    """A request is admitted whenever fewer than quota units were taken in the last w + g seconds."""
    budget, state = request_budget(quota, window), limiter.new_state()
    g, now = limiter.granularity(window), T0
    admitted: list[float] = []
    for gap in gaps:
        now += gap
        recent = sum(1 for t in admitted if t > now - window - g)
        ok = try_take(state, budget, now)
        if recent < quota:
            assert ok
        if ok:
            admitted.append(now)


def test_holds_admit_while_something_is_left_and_settle_replaces_them() -> None:
    budget = budgets_for("k", [parse_policy("100;w=60;u=token")], {None: None})[0]
    state = limiter.new_state()
    assert try_take(state, budget, T0, 80)  # 0 + 0 < 100
    state["h"]["r2"] = [30, T0 + 600]  # a second call in flight
    assert not limiter.fits(state, budget, 80)  # 80 + 30 >= 100
    limiter.settle(state, 60, T0 + 1, "r", 50)
    assert state["t"] == 50 and limiter.held(state) == 30 and limiter.fits(state, budget, 80)
    view = limiter.view(state, budget, T0 + 1)
    assert (view.used, view.held) == (50, 30)


def test_holds_of_a_dead_gateway_expire() -> None:
    budget = budgets_for("k", [parse_policy("10;w=60;u=token")], {None: None})[0]
    state = limiter.new_state()
    state["h"]["lost"] = [10, T0 + 660]
    limiter.expire(state, 60, T0 + 10)
    assert not limiter.fits(state, budget, 0)
    assert limiter.view(state, budget, T0 + 10, denied=True).retry_after == 1  # only a hold blocks it
    limiter.expire(state, 60, T0 + 660)
    assert limiter.fits(state, budget, 0)


def test_policies_sharing_a_counter_take_once_and_check_the_strictest() -> None:
    policies = parse_policies("10;w=60, 5;w=60, 100;w=60;s=user, 3;w=3600")
    budgets = budgets_for("k", policies, {None: None, "user": "alice"})
    assert [(b.window, b.segment, b.quota, len(b.policies)) for b in budgets] == [
        (60, None, 5, 2),
        (60, "user", 100, 1),
        (3600, None, 3, 1),
    ]
    assert budgets[1].value == "alice"


def test_budget_ids_never_collide_on_metacharacters() -> None:
    values = ["a:b", "a", "{x}", "a*?", "a\nb", "é", "a:b:c", "", "x" * 500, "x" * 501]
    ids = {limiter.budget_id("k", Unit.REQUEST, 60, "user", v) for v in values}
    assert len(ids) == len(values)
    assert all("{" not in i and "}" not in i and "\n" not in i for i in ids)


def test_headers_pick_the_most_constraining_policy() -> None:
    policies = parse_policies("10;w=60, 100;w=86400;s=user, 0.5;w=3600;u=cents")
    budgets = budgets_for("k", policies, {None: None, "user": "bob"})
    states = [
        limiter.CounterState(used=7, held=0, reset=40),
        limiter.CounterState(used=95, held=0, reset=80000),
        limiter.CounterState(used=100_000, held=50_000, reset=3000),
    ]
    headers = rate_limit_headers(reports(budgets, states))
    assert headers["Helicone-RateLimit-Policy"] == "100;w=86400;s=user"  # 5% left beats 30% and 70%
    assert headers["Helicone-RateLimit-Limit"] == "100"
    assert headers["Helicone-RateLimit-Remaining"] == "5"
    assert headers["Helicone-RateLimit-Reset"] == "80000"
    assert headers["RateLimit-Policy"] == '"p1";q=10;w=60, "p2";q=100;w=86400, "p3";q=0.5;w=3600;qu="cents"'
    assert headers["RateLimit"] == '"p1";r=3;t=40, "p2";r=5;t=80000, "p3";r=0;t=3000'


def test_ties_go_to_the_shorter_window() -> None:
    policies = parse_policies("10;w=3600, 10;w=60;s=user")
    budgets = budgets_for("k", policies, {None: None, "user": "u"})
    states = [limiter.CounterState(5, 0, 100), limiter.CounterState(5, 0, 30)]
    assert rate_limit_headers(reports(budgets, states))["Helicone-RateLimit-Policy"] == "10;w=60;s=user"
