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

ENV_PREFIX = "QUOTAGATE_"
RESERVED_ROUTES = {"v1", "anthropic", "admin", "dashboard", "metrics", "healthz", "readyz", "static"}
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
}
MAX_PRICE = Decimal(1_000_000)  # US dollars per million tokens


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the file or flag and the value."""


def default_store_url() -> str:
    path = Path(platformdirs.user_data_dir("quotagate")) / "quotagate.db"
    return f"sqlite:///{path}"


def setting(default: Any, help: str, flag: bool = True) -> Any:
    """Declare a setting: its default, its help text, and whether it has a CLI flag."""
    factory = default if callable(default) else None
    meta = {"help": help, "flag": flag}
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


@dataclass(slots=True, frozen=True)
class PriceOverride:
    """US dollars per million tokens, as providers publish them."""

    input_mtok: Decimal
    output_mtok: Decimal
    cache_read_mtok: Decimal | None = None
    cache_write_mtok: Decimal | None = None


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
        "open", "When the store is unreachable: 'open' serves without limits, 'closed' answers 503."
    )
    admin_token: str | None = setting(None, "Token for /admin/ and /dashboard (off without one).")
    metrics_require_token: bool = setting(False, "Require the admin token on /metrics too.")
    admin_failed_signins: int = setting(
        20, "Failed admin sign-ins (wrong admin token) allowed per client address per minute; 429 beyond."
    )
    max_body_bytes: int = setting(32 * 1024 * 1024, "Largest request body accepted (413 beyond).")
    upstream_timeout: float = setting(600.0, "Seconds to wait for the upstream's next byte (504 beyond).")
    connect_timeout: float = setting(10.0, "Seconds to wait for a connection to the upstream.")
    default_max_tokens: int = setting(
        4096, "Output tokens a call is assumed to cost while in flight when it sets no max_tokens."
    )
    access_log: bool = setting(True, "Write one structured log line per request.")
    log_level: str = setting("info", "Logging level: debug, info, warning, error.")
    upstreams: dict[str, Upstream] = setting(dict, "Further upstreams ([upstreams.NAME]).", flag=False)
    prices: dict[str, PriceOverride] = setting(dict, "Per-model price overrides ([prices.MODEL]).", flag=False)

    def __post_init__(self) -> None:
        _check_numbers(self)
        _check_store(self.store)
        if self.on_store_error not in ("open", "closed"):
            raise ConfigError(f"on_store_error must be 'open' or 'closed', not {self.on_store_error!r}")
        for name in ("openai_base_url", "anthropic_base_url"):
            _check_url(getattr(self, name), name)

    def routes(self) -> dict[str, Upstream]:
        """Route prefix (first path segment) to upstream."""
        routes = {
            "v1": Upstream("openai", self.openai_base_url, "openai", self.openai_api_key),
            "anthropic": Upstream("anthropic", self.anthropic_base_url, "anthropic", self.anthropic_api_key),
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
        unknown = set(spec) - {"base_url", "api_key", "provider"}
        if unknown:
            raise ConfigError(f"upstream {name!r}: unknown keys {sorted(unknown)}")
        _check_url(spec["base_url"], f"upstream {name!r}")
        provider = spec.get("provider", "openai")
        if provider not in ("openai", "anthropic"):
            raise ConfigError(f"upstream {name!r}: provider must be 'openai' or 'anthropic'")
        out[name] = Upstream(name, spec["base_url"], provider, spec.get("api_key"))
    return out


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
