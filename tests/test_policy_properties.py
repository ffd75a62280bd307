"""Property-based tests of the policy grammar: the parser never crashes, accepts exactly the
grammar (checked against an independent regular-expression recogniser written here), and its
normal form parses back to the same policy."""

from __future__ import annotations

import gc
import re
import tracemalloc
from decimal import Decimal

from hypothesis import example, given, settings
from hypothesis import strategies as st

from quotagate.policy import Policy, PolicyError, Unit, parse_each, parse_policies

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


# --- item by item (on_policy_error = ignore) ----------------------------------------------------------

ITEM_ALPHABET = ALPHABET.replace(",", "")
HTTP_ITEM_ALPHABET = "".join(c for c in ITEM_ALPHABET if c.isascii() and c.isprintable())


def invalid_items(alphabet: str = HTTP_ITEM_ALPHABET) -> st.SearchStrategy[str]:
    """One list item the grammar refuses (by the independent recogniser), never blank."""
    return st.text(alphabet=alphabet, min_size=1, max_size=24).filter(lambda t: reference(t) is None)


def _items(max_size: int, min_size: int = 0) -> st.SearchStrategy[list[tuple[str, Policy | None]]]:
    blank = st.sampled_from(["", " ", "\t "]).map(lambda t: (t, None))
    bad = invalid_items(ITEM_ALPHABET).map(lambda t: (t, None))
    good: st.SearchStrategy[tuple[str, Policy | None]] = policy_texts()
    return st.lists(st.one_of(good, bad, blank), min_size=min_size, max_size=max_size)


@settings(max_examples=500, deadline=None)
@given(_items(20), st.sampled_from([",", ", ", " ,\t"]))
@example([("1;w=60", Policy(Decimal(1), 60)), ("", None)], ",")
@example([("5;w=60;u=cents;u=token", None), ("2;w=60", Policy(Decimal(2), 60))], ",")
def test_each_item_alone(items: list[tuple[str, Policy | None]], comma: str) -> None:
    """Ignore mode keeps exactly the valid items (as parsing them alone does) and one error for each
    other item; reject mode refuses the header whenever one item is bad."""
    header = comma.join(text for text, _ in items)
    policies, errors = parse_each(header)
    if not header.strip(" \t"):
        assert (policies, errors) == ((), ())
        return
    valid = [p for _, p in items if p is not None]
    assert list(policies) == valid
    assert policies == parse_policies(", ".join(text for text, p in items if p is not None))
    assert [e.policy.strip(" \t") for e in errors if e.policy is not None] == [
        text.strip(" \t") for text, p in items if p is None
    ]
    assert len(errors) == len(items) - len(valid)
    assert parsed(header) == (None if errors else [(p.quota, p.window, p.unit.value, p.segment) for p in valid])


@settings(max_examples=200, deadline=None)
@given(_items(40, min_size=21))
def test_items_past_the_twentieth_are_left_out_together(items: list[tuple[str, Policy | None]]) -> None:
    header = ",".join(text for text, _ in items)
    policies, errors = parse_each(header)
    first = items[:20]
    assert list(policies) == [p for _, p in first if p is not None]
    assert len(errors) == sum(1 for _, p in first if p is None) + 1
    assert errors[-1].problem.startswith(f"at most 20 policies per request, got {len(items)}")
    assert parsed(header) is None


def test_a_long_header_is_not_kept_in_a_cache() -> None:
    """Parses are cached, but not those of headers over 1 KB (a client may send a new one each
    time): 200 distinct 20 KB headers, parsed both ways, keep nothing (cached, they would keep 4 MB)."""
    long = " " * 2000 + "1;w=60"
    assert parse_each(long) == ((Policy(Decimal(1), 60),), ())
    assert parse_policies(long) == (Policy(Decimal(1), 60),)
    junk = "," * 60_000
    policies, errors = parse_each(junk)
    assert policies == () and len(errors) == 21 and "got 60001" in errors[-1].problem

    gc.collect()
    tracemalloc.start()
    try:
        for n in range(200):
            header = " " * 20_000 + f"{n + 1};w=60"
            assert parse_each(header)[0] == parse_policies(header) == (Policy(Decimal(n + 1), 60),)
        del header
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert kept < 100_000, kept  # 0; 4.2 MB if they are cached
