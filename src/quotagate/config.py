"""One settings object. Each setting is declared once, here; the CLI flags, the `QUOTAGATE_*`
environment variables and the TOML config file keys are derived from the declaration.

Precedence: command-line flag > environment variable > config file > default.
"""

from __future__ import annotations

import functools
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import platformdirs

from .bounded import finite_between
from .redact import redact_url
from .routing import Endpoint, Pattern, endpoint, patterns

ENV_PREFIX = "QUOTAGATE_"
RESERVED_ROUTES = {"v1", "anthropic", "admin", "dashboard", "metrics", "healthz", "readyz"}
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
# what each numeric setting may be: anything beyond is a ConfigError at load, never a crash later
NUMBER_BOUNDS: dict[str, tuple[float, float]] = {
    "port": (1, 65535),
    "workers": (1, 1024),
    "max_body_bytes": (1, 2**40),
    "upstream_timeout": (0.001, 86400),
    "connect_timeout": (0.001, 3600),
    "default_max_tokens": (1, 10_000_000),
    "admin_failed_signins": (1, 100_000),
    "max_head_bytes": (1024, 2**30),
    "head_timeout": (0.001, 86400),
    "body_timeout": (0.001, 86400),
    "idle_timeout": (0.001, 86400),
    "write_timeout": (0.001, 86400),
    "max_in_flight": (1, 10_000_000),
    "max_connections": (0, 10_000_000),
    "max_in_flight_bytes": (1, 2**50),
    "max_retry_wait": (0, 31_536_000),
}
MAX_PRICE = Decimal(1_000_000)  # US dollars per million tokens


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the file or flag and the value."""


def default_store_url() -> str:
    path = Path(platformdirs.user_data_dir("quotagate")) / "quotagate.db"
    return f"sqlite:///{path}"


def setting(default: Any, help: str, flag: bool = True, choices: tuple[str, ...] | None = None) -> Any:
    """Declare a setting: its default, its help text, whether it has a CLI flag, and for a text
    setting with a fixed set of values, those values (a usage error for anything else, any case)."""
    factory = default if callable(default) else None
    meta = {"help": help, "flag": flag, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(slots=True, frozen=True)
class Upstream:
    """Where a route prefix forwards to."""

    name: str
    base_url: str
    provider: str = "openai"  # "openai" (OpenAI-compatible) or "anthropic"
    api_key: str | None = None
    api_key_endpoints: tuple[str, ...] | None = None  # what api_key may reach; None: inference endpoints


@dataclass(slots=True, frozen=True)
class PriceOverride:
    """US dollars per million tokens, as providers publish them."""

    input_mtok: Decimal
    output_mtok: Decimal
    cache_read_mtok: Decimal | None = None
    cache_write_mtok: Decimal | None = None


@dataclass(slots=True, frozen=True)
class CallPrice:
    """What one call of an endpoint the gateway cannot meter costs: US cents and/or tokens."""

    cents: Decimal | None = None
    tokens: int | None = None

    @property
    def microcents(self) -> int | None:
        return None if self.cents is None else int((self.cents * 1_000_000).to_integral_value(rounding="ROUND_CEILING"))


@dataclass(slots=True)
class Settings:
    host: str = setting("127.0.0.1", "Address to listen on.")
    port: int = setting(8787, "Port to listen on.")
    store: str = setting(
        default_store_url,
        "Store URL: sqlite:///file.db, redis://host:port/db, rediss://..., redis+cluster://host:port.",
    )
    workers: int = setting(
        lambda: os.cpu_count() or 1,
        "Worker processes sharing the port (SO_REUSEPORT). Default: the number of CPU cores.",
    )
    openai_base_url: str = setting("https://api.openai.com", "OpenAI-compatible upstream for /v1/...")
    anthropic_base_url: str = setting("https://api.anthropic.com", "Anthropic upstream for /anthropic/...")
    openai_api_key: str | None = setting(None, "Provider key sent to the OpenAI upstream when the client sends none.")
    anthropic_api_key: str | None = setting(
        None, "Provider key sent to the Anthropic upstream when the client sends none."
    )
    on_store_error: str = setting(
        "open",
        "When the store is unreachable: 'open' serves without limits, 'closed' answers 503.",
        choices=("open", "closed"),
    )
    on_policy_error: str = setting(
        "reject",
        "A header policy that is malformed or lacks its segment value: 'reject' answers 400; 'ignore' "
        "skips it, as Helicone does, and says so in X-Helicone-Error (key-bound policies are never skipped).",
        choices=("reject", "ignore"),
    )
    admin_token: str | None = setting(None, "Token for /admin/ and /dashboard (off without one).")
    metrics_require_token: bool = setting(False, "Require the admin token on /metrics too.")
    admin_failed_signins: int = setting(
        20, "Failed admin sign-ins (wrong admin token) allowed per client address per minute; 429 beyond."
    )
    max_body_bytes: int = setting(32 * 1024 * 1024, "Largest request body accepted (413 beyond).")
    max_head_bytes: int = setting(
        96 * 1024, "Largest request head: request line and all header lines, each at most 64 KiB (431 beyond)."
    )
    head_timeout: float = setting(
        10.0, "Seconds a client may take to send a request head, from its first byte (408 and closed beyond)."
    )
    body_timeout: float = setting(
        60.0, "Seconds a client may take to send a request body after its head (408, or closed, beyond)."
    )
    idle_timeout: float = setting(75.0, "Seconds a keep-alive connection may wait for its next request.")
    write_timeout: float = setting(
        60.0, "Seconds a client may leave one write of a response unread (the connection is dropped beyond)."
    )
    max_in_flight: int = setting(512, "Proxied calls one worker handles at once (503 with Retry-After beyond).")
    max_connections: int = setting(
        0,
        "Client connections one worker keeps open; a new one beyond closes the oldest without a request "
        "under way. 0: the open-file limit (ulimit -n) less room for upstream calls.",
    )
    max_in_flight_bytes: int = setting(
        256 * 1024 * 1024,
        "Request-body bytes one worker holds for the calls it handles (503 with Retry-After beyond).",
    )
    upstream_timeout: float = setting(600.0, "Seconds to wait for the upstream's next byte (504 beyond).")
    connect_timeout: float = setting(10.0, "Seconds to wait for a connection to the upstream.")
    default_max_tokens: int = setting(
        4096, "Output tokens a call is assumed to cost while in flight when it sets no max_tokens."
    )
    max_retry_wait: float = setting(
        5.0,
        "Seconds of Retry-After up to which a 429 leaves the retry to the client's SDK; a longer wait "
        "carries x-should-retry: false, so the OpenAI and Anthropic SDKs raise at once instead of sleeping.",
    )
    access_log: bool = setting(True, "Write one structured log line per request.")
    log_level: str = setting("info", "Logging level.", choices=("debug", "info", "warning", "error"))
    fake_provider: bool = setting(
        False,
        "Answer every route from the built-in fake provider instead of calling a provider: made-up "
        "replies with usage, counted and limited as real ones (to try quotagate out; nothing is billed).",
    )
    upstreams: dict[str, Upstream] = setting(dict, "Further upstreams ([upstreams.NAME]).", flag=False)
    prices: dict[str, PriceOverride] = setting(dict, "Per-model price overrides ([prices.MODEL]).", flag=False)
    openai_api_key_endpoints: tuple[str, ...] | None = setting(
        None, "'METHOD /path' patterns openai_api_key may reach (default: the inference endpoints).", flag=False
    )
    anthropic_api_key_endpoints: tuple[str, ...] | None = setting(
        None, "'METHOD /path' patterns anthropic_api_key may reach (default: the inference endpoints).", flag=False
    )
    call_prices: dict[str, CallPrice] = setting(
        dict, "Per-call prices of endpoints the gateway cannot meter ([call_prices]).", flag=False
    )

    def __post_init__(self) -> None:
        _check_numbers(self)
        _check_choices(self)
        _check_store(self.store)
        self._check_http_limits()
        for name in ("openai_base_url", "anthropic_base_url"):
            _check_url(getattr(self, name), name)
        for name in ("openai_api_key_endpoints", "anthropic_api_key_endpoints"):
            if getattr(self, name) is not None:
                setattr(self, name, _endpoint_list(getattr(self, name), name))
        _check_routes(self.routes(), self.call_prices)

    def _check_http_limits(self) -> None:
        if self.max_in_flight_bytes < self.max_body_bytes:
            raise ConfigError(
                f"max_in_flight_bytes ({self.max_in_flight_bytes}) must be at least max_body_bytes "
                f"({self.max_body_bytes}), or no body of the largest size could ever be accepted"
            )

    def routes(self) -> dict[str, Upstream]:
        """Route prefix (first path segment) to upstream."""
        routes = {
            "v1": Upstream(
                "openai", self.openai_base_url, "openai", self.openai_api_key, self.openai_api_key_endpoints
            ),
            "anthropic": Upstream(
                "anthropic",
                self.anthropic_base_url,
                "anthropic",
                self.anthropic_api_key,
                self.anthropic_api_key_endpoints,
            ),
        }
        routes.update(self.upstreams)
        return routes


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(Settings)


def _check_numbers(settings: Settings) -> None:
    for name, (low, high) in NUMBER_BOUNDS.items():
        value = getattr(settings, name)
        whole = _hints()[name] is int
        if not finite_between(value, low, high) or (whole and not isinstance(value, int)):
            kind = "a whole number" if whole else "a number"
            raise ConfigError(f"{name} must be {kind} from {low:g} to {high:g}, not {str(value)[:40]!r}")


def choices_of(name: str) -> tuple[str, ...] | None:
    """The values a text setting may take, from its one declaration (None: any text)."""
    return next(f.metadata["choices"] for f in fields(Settings) if f.name == name)


def choice(name: str, value: Any) -> str:
    """The value of a setting with fixed values, in its declared spelling; a ConfigError otherwise."""
    allowed = choices_of(name) or ()
    if isinstance(value, str) and value.lower() in allowed:
        return value.lower()
    listed = ", ".join(repr(c) for c in allowed)
    raise ConfigError(f"{name} must be one of {listed}, not {str(value)[:40]!r}")


def _check_choices(settings: Settings) -> None:
    for item in fields(settings):
        if item.metadata.get("choices"):
            setattr(settings, item.name, choice(item.name, getattr(settings, item.name)))


def _check_store(url: str) -> None:
    from .stores import check_url

    try:
        check_url(url)
    except ValueError as exc:
        raise ConfigError(f"store: {exc}") from None


def flag_settings() -> list[Any]:
    """The dataclass fields that have a CLI flag and an environment variable."""
    return [f for f in fields(Settings) if f.metadata.get("flag")]


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _check_url(url: str, where: str) -> None:
    if not re.match(r"https?://[^/\s]+", url):
        raise ConfigError(f"{where}: {redact_url(url)!r} is not an http:// or https:// URL")


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into setting values, validating every entry."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: also an integer of more than 4,300 digits
        raise ConfigError(f"config file {path}: {str(exc)[:200]}") from None
    known = {f.name for f in fields(Settings)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        values[name] = _typed(name, value, path)
    try:
        values["upstreams"] = _upstreams(values.get("upstreams", {}))
        values["prices"] = _prices(values.get("prices", {}))
        values["call_prices"] = _call_prices(values.get("call_prices", {}))
        for name in ("openai_api_key_endpoints", "anthropic_api_key_endpoints"):
            if name in values:
                values[name] = _endpoint_list(values[name], name)
        _check_routes(_file_routes(values), values["call_prices"])
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    return values


def _typed(name: str, value: Any, path: Path) -> Any:
    """A file's value for a numeric setting must be a number of its kind (`port = 1e999` is not a port)."""
    hint = _hints()[name]
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"config file {path}: {name} must be a whole number, not {str(value)[:40]!r}")
    if hint is float and not finite_between(value, -math.inf, math.inf):
        raise ConfigError(f"config file {path}: {name} must be a finite number, not {str(value)[:40]!r}")
    if choices_of(name):
        try:
            return choice(name, value)
        except ConfigError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    return value


def _upstreams(raw: dict[str, Any]) -> dict[str, Upstream]:
    out = {}
    for name, spec in raw.items():
        if not _NAME.fullmatch(name) or name in RESERVED_ROUTES:
            raise ConfigError(
                f"upstream name {name!r} must be lower-case [a-z0-9_-] and not one of {sorted(RESERVED_ROUTES)}"
            )
        if not isinstance(spec, dict) or "base_url" not in spec:
            raise ConfigError(f"upstream {name!r} needs a base_url")
        unknown = set(spec) - {"base_url", "api_key", "provider", "api_key_endpoints"}
        if unknown:
            raise ConfigError(f"upstream {name!r}: unknown keys {sorted(unknown)}")
        _check_url(spec["base_url"], f"upstream {name!r}")
        provider = spec.get("provider", "openai")
        if provider not in ("openai", "anthropic"):
            raise ConfigError(f"upstream {name!r}: provider must be 'openai' or 'anthropic'")
        scope = spec.get("api_key_endpoints")
        if scope is not None:
            scope = _endpoint_list(scope, f"upstream {name!r}: api_key_endpoints")
        out[name] = Upstream(name, spec["base_url"], provider, spec.get("api_key"), scope)
    return out


def _endpoint_list(raw: Any, where: str) -> tuple[str, ...]:
    try:
        return tuple(p.text for p in patterns(raw))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _file_routes(values: dict[str, Any]) -> dict[str, Upstream]:
    """The routes a config file declares, for checking its patterns before the settings exist."""
    routes = {
        "v1": Upstream("openai", "", "openai", None, values.get("openai_api_key_endpoints")),
        "anthropic": Upstream("anthropic", "", "anthropic", None, values.get("anthropic_api_key_endpoints")),
    }
    return {**routes, **values["upstreams"]}


def _scope_name(prefix: str, upstream: Upstream) -> str:
    if prefix in ("v1", "anthropic"):
        return f"{upstream.provider}_api_key_endpoints"
    return f"upstream {prefix!r}: api_key_endpoints"


def _check_routes(routes: dict[str, Upstream], call_prices: dict[str, CallPrice]) -> None:
    """Every pattern names a path of its route: one that never matches is a mistake."""
    for prefix, upstream in routes.items():
        for text in upstream.api_key_endpoints or ():
            first = Pattern.parse(text).parts[:1]
            if first not in ((prefix,), ("*",), ("**",)):
                raise ConfigError(f"{_scope_name(prefix, upstream)}: {text!r} is not a path under /{prefix}/")
    for text in call_prices:
        pattern = Pattern.parse(text)
        head = pattern.parts[0] if pattern.parts else "/"
        if head not in routes and head not in ("*", "**"):
            raise ConfigError(f"call_prices: {text!r} is not under a route ({', '.join('/' + r for r in routes)})")
        if pattern.literal and head in routes:
            rest = pattern.parts if head == "v1" else pattern.parts[1:]
            kind = endpoint(routes[head].provider, pattern.method, rest)
            if kind is not Endpoint.OTHER:
                raise ConfigError(
                    f"call_prices: {text!r} is metered from the usage its answers report ({kind.value}); "
                    "call_prices is for endpoints the gateway cannot meter"
                )


def _call_prices(raw: Any) -> dict[str, CallPrice]:
    if not isinstance(raw, dict):
        raise ConfigError('call_prices must be a table of "METHOD /path" = cents, or = { cents = ..., tokens = ... }')
    out = {}
    for text, spec in raw.items():
        try:
            Pattern.parse(text)
        except ValueError as exc:
            raise ConfigError(f"call_prices: entry {text!r}: {exc}") from None
        out[text] = _call_price(text, spec if isinstance(spec, dict) else {"cents": spec})
    return out


def _call_price(text: str, spec: dict[str, Any]) -> CallPrice:
    unknown = set(spec) - {"cents", "tokens"}
    if unknown or not spec:
        raise ConfigError(f"call_prices: entry {text!r} takes cents and/or tokens, not {sorted(unknown) or 'nothing'}")
    cents, tokens = spec.get("cents"), spec.get("tokens")
    if cents is not None:
        if isinstance(cents, bool) or not isinstance(cents, int | float) or not 0 <= cents <= 1_000_000_000:
            raise ConfigError(f"call_prices: entry {text!r}: cents must be a number from 0 to 1e9, not {cents!r}")
        cents = Decimal(str(cents))
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 <= tokens < 2**53):
        raise ConfigError(f"call_prices: entry {text!r}: tokens must be a whole number from 0 to 2^53-1, not {tokens}")
    return CallPrice(cents, tokens)


def _prices(raw: dict[str, Any]) -> dict[str, PriceOverride]:
    out = {}
    for model, spec in raw.items():
        if not isinstance(spec, dict) or not {"input_mtok", "output_mtok"} <= set(spec):
            raise ConfigError(f"price for {model!r} needs input_mtok and output_mtok (USD per million tokens)")
        unknown = set(spec) - {"input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok"}
        if unknown:
            raise ConfigError(f"price for {model!r}: unknown keys {sorted(unknown)}")
        try:
            prices = {k: Decimal(str(v)) for k, v in spec.items()}
        except InvalidOperation:
            raise ConfigError(f"price for {model!r}: prices must be numbers") from None
        if not all(v.is_finite() and 0 <= v <= MAX_PRICE for v in prices.values()):
            raise ConfigError(f"price for {model!r}: prices must be from 0 to {MAX_PRICE} USD per million tokens")
        out[model] = PriceOverride(**prices)
    return out
