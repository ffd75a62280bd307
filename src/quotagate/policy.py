"""The `Helicone-RateLimit-Policy` grammar: parse, validate, normal form.

    policies = policy *( "," policy )
    policy   = quota *( ";" param )         ; w required, u and s optional, any order
    quota    = 1*DIGIT [ "." 1*DIGIT ]      ; ASCII digits only, > 0
    param    = ("w" / "u" / "s") "=" value  ; names and values case-insensitive

Pure functions, no I/O. Every rejection raises `PolicyError` naming the offending input.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache

from .bounded import shown, whole_number

GRAMMAR = (
    "[quota];w=[time_window];u=[unit];s=[segment] — quota: a number > 0 (digits, optional decimals); "
    "w: whole seconds, 60 to 31536000; u: request (default), cents or token; "
    "s: user, or a custom property name [A-Za-z0-9_-]+ (absent: one budget for the gateway key). "
    "Several policies are separated by commas, e.g. '60;w=60, 1000;w=86400;s=user'."
)

MIN_WINDOW = 60
MAX_WINDOW = 31_536_000
MAX_POLICIES = 20
# Quotas are counted as integers in the unit's scale (micro-cents for cents). The stores hold them
# exactly up to 2**53 (Redis scripts count in doubles), and the IETF headers carry them as
# structured-field integers, at most 15 digits: a larger quota is refused, not rounded.
MAX_SCALED_QUOTA = 2**53 - 1
MAX_QUOTA = Decimal(10**15 - 1)

_QUOTA = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_WINDOW = re.compile(r"[0-9]+")
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_OWS = " \t"


class Unit(enum.Enum):
    REQUEST = "request"
    CENTS = "cents"
    TOKEN = "token"

    # members are singletons compared by identity: hash them by identity too, in C (Enum's own
    # __hash__ is Python code, and policies and budget kinds are hashed on every request)
    __hash__ = object.__hash__

    @property
    def scale(self) -> int:
        """Stored amounts are integers: micro-cents for cents, whole tokens and requests."""
        return _SCALES[self]

    @property
    def ietf_unit(self) -> str | None:
        return _IETF_UNITS[self]


_SCALES = {Unit.REQUEST: 1, Unit.CENTS: 1_000_000, Unit.TOKEN: 1}
_IETF_UNITS = {Unit.REQUEST: None, Unit.CENTS: "cents", Unit.TOKEN: "tokens"}
_LARGEST = {unit: min(MAX_QUOTA, Decimal(MAX_SCALED_QUOTA) / scale) for unit, scale in _SCALES.items()}


class PolicyError(ValueError):
    """A policy header that does not follow the grammar."""

    def __init__(self, problem: str, policy: str | None = None) -> None:
        self.problem = problem
        self.policy = policy
        where = f" in policy {shown(policy, 200)}" if policy is not None else ""
        super().__init__(f"{problem}{where}")


USER = "user"


def segment_kind(segment: str | None) -> str:
    """How metrics and the admin API name a budget's segment: global, user or property."""
    return "global" if segment is None else ("user" if segment == USER else "property")


@dataclass(frozen=True, slots=True)
class Policy:
    quota: Decimal
    window: int
    unit: Unit = Unit.REQUEST
    segment: str | None = None  # None: global; "user"; else a property name, lower-case
    # derived once, at parse time, for the request path
    scale: int = field(init=False, compare=False, repr=False)
    scaled_quota: int = field(init=False, compare=False, repr=False)  # rounded down: never over-admits
    budget_kind: tuple[Unit, int, str | None] = field(init=False, compare=False, repr=False)
    quota_text: str = field(init=False, compare=False, repr=False)
    _normal: str = field(init=False, compare=False, repr=False)
    hashed: int = field(init=False, compare=False, repr=False)  # policies key caches on every request

    def __hash__(self) -> int:
        return self.hashed

    def __post_init__(self) -> None:
        derived = {
            "hashed": hash((self.quota, self.window, self.unit, self.segment)),
            "scale": _SCALES[self.unit],
            "scaled_quota": int(self.quota * _SCALES[self.unit]),
            "budget_kind": (self.unit, self.window, self.segment),  # policies differing only in quota share it
            "quota_text": format_quota(self.quota),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_normal", self._normal_form())

    def normal_form(self) -> str:
        """`quota;w=W`, then `;u=` if not request, then `;s=` if not global (built once)."""
        return self._normal

    def _normal_form(self) -> str:
        text = f"{self.quota_text};w={self.window}"
        if self.unit is not Unit.REQUEST:
            text += f";u={self.unit.value}"
        if self.segment is not None:
            text += f";s={self.segment}"
        return text


def format_quota(value: Decimal) -> str:
    """Shortest form: 5, 0.5, 12.25 (never an exponent)."""
    text = f"{value:f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def parse_policies(header: str | None) -> tuple[Policy, ...]:
    """Parse a whole header value (several header lines already joined by commas)."""
    if header is None or not header.strip(_OWS):
        return ()
    return _parse_cached(header) if len(header) <= _CACHED_LENGTH else _parse(header)


def parse_each(header: str | None) -> tuple[tuple[Policy, ...], tuple[PolicyError, ...]]:
    """Item by item, for `on_policy_error = ignore`: the valid policies, and an error for each item
    left out (the items past the 20th are left out together, under one error)."""
    if header is None or not header.strip(_OWS):
        return (), ()
    return _each_cached(header) if len(header) <= _CACHED_LENGTH else _each(header)


def join_header_lines(lines: list[str]) -> str:
    """Several header lines count as one list; blank lines contribute nothing."""
    return ",".join(line for line in lines if line.strip(_OWS))


# a header line may be 64 KiB, and a cache entry keeps its header: longer headers are parsed uncached
_CACHED_LENGTH = 1024


def _parse(header: str) -> tuple[Policy, ...]:
    items = header.split(",", MAX_POLICIES)  # never more than 21 pieces, whatever the header holds
    if len(items) > MAX_POLICIES:
        raise PolicyError(f"at most {MAX_POLICIES} policies per request, got {header.count(',') + 1}")
    return tuple(parse_policy(item) for item in items)


_parse_cached = lru_cache(maxsize=4096)(_parse)


def _each(header: str) -> tuple[tuple[Policy, ...], tuple[PolicyError, ...]]:
    items = header.split(",", MAX_POLICIES)
    policies: list[Policy] = []
    errors: list[PolicyError] = []
    for item in items[:MAX_POLICIES]:
        try:
            policies.append(parse_policy(item))
        except PolicyError as exc:
            errors.append(exc.with_traceback(None))  # cached: no frames kept alive
    if len(items) > MAX_POLICIES:
        count = header.count(",") + 1
        problem = f"at most {MAX_POLICIES} policies per request, got {count}: the {count - MAX_POLICIES} after them"
        errors.append(PolicyError(f"{problem} are left out", items[MAX_POLICIES]))
    return tuple(policies), tuple(errors)


_each_cached = lru_cache(maxsize=4096)(_each)


def parse_policy(text: str) -> Policy:
    """Parse one policy (one list item)."""
    item = text.strip(_OWS)
    if not item:
        raise PolicyError("empty policy (a stray comma?)", text)
    quota_text, *params = (part.strip(_OWS) for part in item.split(";"))
    quota = _parse_quota(quota_text, item)
    values = _parse_params(params, item)
    if "w" not in values:
        raise PolicyError("missing required parameter w (the time window in seconds)", item)
    unit = _parse_unit(values.get("u"), item)
    largest = _LARGEST[unit]
    if quota > largest:
        limit = f"at most {format_quota(largest)} for u={unit.value}"
        raise PolicyError(f"quota {shown(quota_text)} is too large: {limit}", item)
    return Policy(
        quota=quota,
        window=_parse_window(values["w"], item),
        unit=unit,
        segment=_parse_segment(values.get("s"), item),
    )


def _parse_quota(text: str, item: str) -> Decimal:
    if not text:
        raise PolicyError("missing quota: a policy starts with a number, e.g. 100;w=60", item)
    if not _QUOTA.fullmatch(text):
        raise PolicyError(f"quota {shown(text)} is not a plain number (digits, optional decimal part)", item)
    quota = Decimal(text)
    if quota <= 0:
        raise PolicyError(f"quota {shown(text)} must be greater than 0", item)
    return quota


def _parse_params(params: list[str], item: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for param in params:
        if not param:
            raise PolicyError("empty parameter (a stray ';'?)", item)
        name, sep, value = param.partition("=")
        name, value = name.strip(_OWS).lower(), value.strip(_OWS)
        if not sep or not name or not value:
            raise PolicyError(f"parameter {shown(param, 40)} is not name=value", item)
        if name not in ("w", "u", "s"):
            raise PolicyError(f"unknown parameter {shown(name)} (known: w, u, s)", item)
        if name in values:
            raise PolicyError(f"duplicate parameter {shown(name)}", item)
        values[name] = value
    return values


def _parse_window(text: str, item: str) -> int:
    if not _WINDOW.fullmatch(text):
        raise PolicyError(f"window w={shown(text)} is not a whole number of seconds", item)
    window = whole_number(text, MAX_WINDOW)
    if window is None or window < MIN_WINDOW:
        label = text if len(text) <= 24 else shown(text)
        raise PolicyError(f"window w={label} is outside {MIN_WINDOW}..{MAX_WINDOW} seconds", item)
    return window


def _parse_unit(text: str | None, item: str) -> Unit:
    if text is None:
        return Unit.REQUEST
    try:
        return Unit(text.lower())
    except ValueError:
        raise PolicyError(f"unknown unit u={shown(text)} (known: request, cents, token)", item) from None


def _parse_segment(text: str | None, item: str) -> str | None:
    if text is None:
        return None
    if not _SEGMENT.fullmatch(text):
        raise PolicyError(f"segment s={shown(text)} must be 'user' or a property name [A-Za-z0-9_-]+", item)
    return text.lower()
