"""The policy grammar, as pure functions: what parses, to what, and what is rejected and why."""

from __future__ import annotations

from decimal import Decimal

import pytest

from quotagate.policy import Policy, PolicyError, Unit, join_header_lines, parse_policies, parse_policy


def test_minimal_policy_defaults_to_requests_and_global() -> None:
    assert parse_policy("100;w=60") == Policy(Decimal(100), 60, Unit.REQUEST, None)


def test_all_parameters_any_order_any_case_with_spaces() -> None:
    expected = Policy(Decimal("0.5"), 3600, Unit.CENTS, "org")
    for text in ("0.5;w=3600;u=cents;s=org", "0.5; S = Org ;U=CENTS; W=3600", " 0.5 ;u=cents;s=ORG;w=3600 "):
        assert parse_policy(text) == expected


def test_user_segment_and_token_unit() -> None:
    policy = parse_policy("1000;w=86400;u=token;s=user")
    assert (policy.unit, policy.segment, policy.window) == (Unit.TOKEN, "user", 86400)


def test_several_policies_and_header_lines() -> None:
    header = join_header_lines(["60;w=60", "  ", "1000;w=86400;s=user"])
    assert [p.normal_form() for p in parse_policies(header)] == ["60;w=60", "1000;w=86400;s=user"]


@pytest.mark.parametrize("header", [None, "", "   ", "\t"])
def test_absent_empty_or_blank_header_means_no_policy(header: str | None) -> None:
    assert parse_policies(header) == ()


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("5;w=60", "5;w=60"),
        ("5.0;w=60", "5;w=60"),
        ("0.50;w=60;u=cents", "0.5;w=60;u=cents"),
        ("10;w=60;u=request", "10;w=60"),
        ("100;s=User;w=60;u=Token", "100;w=60;u=token;s=user"),
        ("007;w=0060;s=Team-A_1", "7;w=60;s=team-a_1"),
    ],
)
def test_normal_form(text: str, normal: str) -> None:
    assert parse_policy(text).normal_form() == normal
    assert parse_policy(normal).normal_form() == normal


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("1;w=60,", "empty policy"),
        (";;", "missing quota"),
        ("1;w=60,,2;w=60", "empty policy"),
        ("w=60", "not a plain number"),
        ("1", "missing required parameter w"),
        ("1;u=cents", "missing required parameter w"),
        ("0;w=60", "greater than 0"),
        ("0.0;w=60", "greater than 0"),
        ("-1;w=60", "not a plain number"),
        ("+1;w=60", "not a plain number"),
        ("1e3;w=60", "not a plain number"),
        ("1.;w=60", "not a plain number"),
        (".5;w=60", "not a plain number"),
        ("\u0661\u0660;w=60", "not a plain number"),  # Arabic-Indic digits
        ("1 0;w=60", "not a plain number"),
        ("10;w=59", "outside 60..31536000"),
        ("10;w=31536001", "outside 60..31536000"),
        ("10;w=60.5", "not a whole number"),
        ("10;w=1m", "not a whole number"),
        ("10;w=60;u=dollars", "unknown unit"),
        ("10;w=60;u=tokens", "unknown unit"),
        ("10;w=60;x=1", "unknown parameter"),
        ("10;w=60;w=120", "duplicate parameter"),
        ("10;w=60;W=120", "duplicate parameter"),
        ("10;w=60;s=user;s=org", "duplicate parameter"),
        ("10;w=60;s=a.b", "segment"),
        ("10;w=60;s=", "not name=value"),
        ("10;w", "not name=value"),
        ("10;w=60;", "empty parameter"),
        ("10;;w=60", "empty parameter"),
        ("1000000000000000;w=60", "too large: at most 999999999999999 for u=request"),
        ("9223372036854775808;w=60;u=token", "too large: at most 999999999999999 for u=token"),
        ("9007199254.740992;w=60;u=cents", "too large: at most 9007199254.740991 for u=cents"),
    ],
)
def test_malformed_policies_are_rejected_with_the_problem_named(text: str, problem: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policies(text)
    assert problem in str(info.value)


def test_too_many_policies() -> None:
    with pytest.raises(PolicyError, match="at most 20"):
        parse_policies(",".join(["1;w=60"] * 21))


def test_the_largest_quotas_are_kept_exactly() -> None:
    assert parse_policy("999999999999999;w=60").scaled_quota == 999_999_999_999_999
    assert parse_policy("9007199254.740991;w=60;u=cents").scaled_quota == 2**53 - 1


def test_scaled_quota_rounds_down() -> None:
    assert parse_policy("0.5;w=60;u=cents").scaled_quota == 500_000
    assert parse_policy("2.9;w=60").scaled_quota == 2
    assert parse_policy("0.0000001;w=60;u=cents").scaled_quota == 0
