"""One settings object. Each setting is declared once, here; the CLI flags, the `QUOTAGATE_*`
environment variables and the TOML config file keys are derived from the declaration.

Precedence: command-line flag > environment variable > config file > default.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import platformdirs

ENV_PREFIX = "QUOTAGATE_"
RESERVED_ROUTES = {"v1", "anthropic", "admin", "dashboard", "metrics", "healthz", "readyz", "static"}
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


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
    max_in_flight: int = setting(512, "Proxied calls one worker handles at once (503 with Retry-After beyond).")
    max_in_flight_bytes: int = setting(
        256 * 1024 * 1024,
        "Request-body bytes one worker holds for the calls it handles (503 with Retry-After beyond).",
    )
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
        if self.on_store_error not in ("open", "closed"):
            raise ConfigError(f"on_store_error must be 'open' or 'closed', not {self.on_store_error!r}")
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, not {self.workers}")
        if self.max_body_bytes < 1:
            raise ConfigError(f"max_body_bytes must be positive, not {self.max_body_bytes}")
        self._check_http_limits()
        for name in ("openai_base_url", "anthropic_base_url"):
            _check_url(getattr(self, name), name)

    def _check_http_limits(self) -> None:
        for name in ("max_head_bytes", "head_timeout", "body_timeout", "idle_timeout", "max_in_flight"):
            value = getattr(self, name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not 0 < value < float("inf"):
                raise ConfigError(f"{name} must be a positive number, not {value!r}")
        if self.max_in_flight_bytes < self.max_body_bytes:
            raise ConfigError(
                f"max_in_flight_bytes ({self.max_in_flight_bytes}) must be at least max_body_bytes "
                f"({self.max_body_bytes}), or no body of the largest size could ever be accepted"
            )

    def routes(self) -> dict[str, Upstream]:
        """Route prefix (first path segment) to upstream."""
        routes = {
            "v1": Upstream("openai", self.openai_base_url, "openai", self.openai_api_key),
            "anthropic": Upstream("anthropic", self.anthropic_base_url, "anthropic", self.anthropic_api_key),
        }
        routes.update(self.upstreams)
        return routes


def flag_settings() -> list[Any]:
    """The dataclass fields that have a CLI flag and an environment variable."""
    return [f for f in fields(Settings) if f.metadata.get("flag")]


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _check_url(url: str, where: str) -> None:
    if not re.match(r"https?://[^/\s]+", url):
        raise ConfigError(f"{where}: {url!r} is not an http:// or https:// URL")


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into setting values, validating every entry."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    known = {f.name for f in fields(Settings)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        values[name] = value
    try:
        values["upstreams"] = _upstreams(values.get("upstreams", {}))
        values["prices"] = _prices(values.get("prices", {}))
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    return values


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
        if any(v < 0 for v in prices.values()):
            raise ConfigError(f"price for {model!r}: prices cannot be negative")
        out[model] = PriceOverride(**prices)
    return out
