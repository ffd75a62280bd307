"""Property-based tests of the policy grammar: the parser never crashes, accepts exactly the
grammar (checked against an independent regular-expression recogniser written here), and its
normal form parses back to the same policy."""

from __future__ import annotations

import re
from decimal import Decimal

from hypothesis import example, given, settings
from hypothesis import strategies as st

from quotagate.policy import Policy, PolicyError, Unit, parse_policies

_ITEM = re.compile(
    r"[ \t]*(?P<quota>[0-9]+(?:\.[0-9]+)?)[ \t]*"
    r"(?P<params>(?:;[ \t]*[A-Za-z]+[ \t]*=[ \t]*[A-Za-z0-9_.-]+[ \t]*)*)"
)
_PARAM = re.compile(r";[ \t]*([A-Za-z]+)[ \t]*=[ \t]*([A-Za-z0-9_.-]+)[ \t]*")


def reference(header: str) -> list[tuple[Decimal, int, str, str | None]] | None:
    """What the spec accepts, as (quota, window, unit, segment) tuples; None if it is an error."""
    if not header.strip(" \t"):
        return []
    items = header.split(",")
    if len(items) > 20:
        return None
    out = []
    for item in items:
        match = _ITEM.fullmatch(item)
        if not match:
            return None
        params: dict[str, str] = {}
        for name, value in _PARAM.findall(match["params"]):
            if name.lower() in params or name.lower() not in ("w", "u", "s"):
                return None
            params[name.lower()] = value
        quota, window = Decimal(match["quota"]), params.get("w", "")
        unit, segment = params.get("u", "request").lower(), params.get("s")
        if quota <= 0 or not window.isdigit() or not 60 <= int(window) <= 31_536_000:
            return None
        if unit not in ("request", "cents", "token") or (segment is not None and "." in segment):
            return None
        if quota > 10**15 - 1 or quota * (10**6 if unit == "cents" else 1) > 2**53 - 1:
            return None  # counted exactly only up to 2**53 (micro-cents), and at most 15 digits
        out.append((quota, int(window), unit, segment.lower() if segment else None))
    return out


def parsed(header: str) -> list[tuple[Decimal, int, str, str | None]] | None:
    try:
        return [(p.quota, p.window, p.unit.value, p.segment) for p in parse_policies(header)]
    except PolicyError:
        return None


ALPHABET = "0123456789.;=,  \twWuUsSxcentsrequestokuser-_é\x00"


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=40))
@example("1;w=60")
@example("1;w=60,")
@example(" 0.5 ;u=Cents; S = org ;W=3600")
def test_accepts_exactly_the_grammar(header: str) -> None:
    assert parsed(header) == reference(header)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60))
def test_never_crashes_on_any_text(header: str) -> None:
    try:
        parse_policies(header)
    except PolicyError as exc:
        assert str(exc)


def _spaces() -> st.SearchStrategy[str]:
    return st.sampled_from(["", " ", "  ", "\t"])


@st.composite
def policy_texts(draw: st.DrawFn) -> tuple[str, Policy]:
    whole = draw(st.integers(0, 10**9))
    fraction = draw(st.one_of(st.just(""), st.from_regex(r"\.[0-9]{1,6}", fullmatch=True)))
    quota_text = f"{whole}{fraction}"
    if Decimal(quota_text) <= 0:
        quota_text = "1" + fraction
    window = draw(st.integers(60, 31_536_000))
    unit = draw(st.sampled_from(list(Unit)))
    segment = draw(st.one_of(st.none(), st.just("user"), st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)))
    params = [f"w={window}"]
    if unit is not Unit.REQUEST or draw(st.booleans()):
        params.append(f"u={unit.value}")
    if segment is not None:
        params.append(f"s={segment}")
    params = draw(st.permutations(params))
    params = ["".join(c.upper() if draw(st.booleans()) else c for c in p) for p in params]
    text = quota_text + "".join(f"{draw(_spaces())};{draw(_spaces())}{p}" for p in params)
    expected = Policy(Decimal(quota_text), window, unit, segment.lower() if segment else None)
    return text, expected


@settings(max_examples=500, deadline=None)
@given(st.lists(policy_texts(), min_size=1, max_size=5))
def test_valid_policies_parse_and_their_normal_form_round_trips(items: list[tuple[str, Policy]]) -> None:
    header = ", ".join(text for text, _ in items)
    policies = parse_policies(header)
    assert list(policies) == [expected for _, expected in items]
    normal = ", ".join(p.normal_form() for p in policies)
    assert parse_policies(normal) == policies
    assert ", ".join(p.normal_form() for p in parse_policies(normal)) == normal
