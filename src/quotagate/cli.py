"""`quotagate serve | keys | usage | demo`.

Every setting of `config.Settings` that has a flag becomes an option of `serve` here, read from
the command line, else `QUOTAGATE_<NAME>`, else the `--config` TOML file, else its default.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import typing
from collections.abc import Callable, Coroutine
from dataclasses import MISSING, Field, fields
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from .config import ConfigError, Settings, env_name, flag_settings, load_file

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Eager: read the config file first, so that its values become the options' defaults."""
    if value:
        try:
            values = load_file(value)
        except ConfigError as exc:
            raise click.BadParameter(str(exc)) from None
        extras = [f.name for f in fields(Settings) if not f.metadata["flag"]]  # no option to default
        ctx.meta["file_extras"] = {k: values.pop(k) for k in extras if k in values}
        ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


config_option = click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False),
    envvar=env_name("config"),
    is_eager=True,
    expose_value=False,
    callback=_load_config,
    help="TOML config file (flags and QUOTAGATE_* variables win over it).",
)


class SettingChoice(click.Choice):
    """A setting's fixed values, any case; a refusal names the setting, and the variable when the
    value came from it."""

    def __init__(self, setting: str, choices: tuple[str, ...]) -> None:
        super().__init__(choices, case_sensitive=False)
        self.setting = setting

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            listed = ", ".join(repr(c) for c in self.choices)
            where = f"the {self.setting} setting"
            if ctx and param and param.name and ctx.get_parameter_source(param.name) is ParameterSource.ENVIRONMENT:
                where += f", from {env_name(self.setting)}"
            self.fail(f"{value!r} is not one of {listed} ({where})", param, ctx)


def _option_for(field: Field[Any]) -> Callable[[F], F]:
    hint = typing.get_type_hints(Settings)[field.name]
    kind = next((t for t in (bool, int, float, str) if t == hint or t in typing.get_args(hint)), str)
    default = field.default_factory() if field.default is MISSING else field.default  # type: ignore[operator]
    names = "--" + field.name.replace("_", "-")
    if kind is bool:
        names = f"{names}/--no-{field.name.replace('_', '-')}"
    choices = field.metadata["choices"]
    return click.option(
        names,
        field.name,
        type=SettingChoice(field.name, choices) if choices else kind,
        default=default,
        show_default=default is not None,
        envvar=env_name(field.name),
        help=field.metadata["help"],
    )


def settings_options(fn: F) -> F:
    for field in reversed(flag_settings()):
        fn = _option_for(field)(fn)
    return config_option(fn)


def store_options(fn: F) -> F:
    """--store (and --config) for the commands that only need the store."""
    store = next(f for f in flag_settings() if f.name == "store")
    return config_option(_option_for(store)(fn))


def _settings(ctx: click.Context, values: dict[str, Any]) -> Settings:
    try:
        return Settings(**values, **ctx.meta.get("file_extras", {}))
    except (ConfigError, TypeError) as exc:
        raise click.UsageError(str(exc)) from None


@click.group()
@click.version_option(package_name="quotagate")
def main() -> None:
    """quotagate: an LLM API gateway with rate limits and spend quotas."""


@main.command()
@settings_options
@click.pass_context
def serve(ctx: click.Context, **values: Any) -> None:
    """Start the gateway."""
    settings = _settings(ctx, values)
    created = None
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Before prometheus_client is first imported: it picks its multi-process value class then.
        if "prometheus_client" in sys.modules:
            raise click.ClickException("internal error: prometheus_client imported before its multi-process setup")
        created = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="quotagate-metrics-")
    from .server import StartError
    from .server import serve as run

    try:
        run(settings)
    except StartError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:  # Ctrl-C before the worker's own handler was in place
        sys.exit(130)
    finally:
        if created:  # the workers are gone (forked workers never return here)
            shutil.rmtree(created, ignore_errors=True)


@main.group()
def keys() -> None:
    """Create, list and revoke gateway keys."""


def _open(store_url: str) -> Any:
    from .stores import open_store

    try:
        return open_store(store_url)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


async def _with_store(store_url: str, fn: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    from .stores import StoreError

    store = _open(store_url)
    try:
        return await fn(store)
    except StoreError as exc:
        raise click.ClickException(f"store unreachable: {exc}") from None
    finally:
        await store.close()


@keys.command("create")
@click.option("--name", required=True, help="A name for the key (shown in logs and the dashboard).")
@click.option(
    "--policy",
    "policies",
    multiple=True,
    help="A policy bound to the key, applied to every request made with it (repeatable).",
)
@store_options
def keys_create(name: str, policies: tuple[str, ...], store: str) -> None:
    """Create a gateway key; it is printed once, on the last line."""
    from . import keys as keymod
    from .policy import PolicyError

    async def create(s: Any) -> tuple[str, Any]:
        return await keymod.create_key(s, name, list(policies))

    try:
        raw, record = _run(_with_store(store, create))
    except PolicyError as exc:
        raise click.BadParameter(str(exc), param_hint="--policy") from None
    except keymod.GatewayKeyError as exc:
        raise click.ClickException(str(exc)) from None
    from .terminal import inert

    click.echo(
        f"created key '{inert(record.name)}' (id {record.id})"
        + (f" with policies: {inert(record.policies)}" if record.policies else ""),
        err=True,
    )
    click.echo("store it now: it is not shown again", err=True)
    click.echo(raw)


@keys.command("list")
@store_options
def keys_list(store: str) -> None:
    """List gateway keys (never their secrets)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from .terminal import inert_text
    from .usage_view import WIDE

    records = _run(_with_store(store, lambda s: s.list_keys()))
    console = Console()
    if not console.is_terminal:  # a pipe or a file: one line per key, every value whole (grep, awk)
        console = Console(width=WIDE)
    table = Table("id", "name", "policies", "created", "status")
    for column in table.columns:  # in a terminal, a long value wraps in its cell rather than being cut
        column.overflow = "fold"
    for record in records:  # every value as Text: escaped, never read as markup
        status = "active" if record.active else f"revoked {_when(record.revoked_at)}"
        table.add_row(
            inert_text(record.id),
            inert_text(record.name),
            inert_text(record.policies or "-"),
            Text(_when(record.created_at)),
            Text(status),
        )
    console.print(table)


@keys.command("revoke")
@click.argument("name_or_id")
@store_options
def keys_revoke(name_or_id: str, store: str) -> None:
    """Revoke a key by id or name: its requests get 401 from then on."""
    from . import keys as keymod

    async def revoke(s: Any) -> Any:
        return await keymod.revoke_key(s, name_or_id)

    from .terminal import inert

    try:
        record = _run(_with_store(store, revoke))
    except keymod.GatewayKeyError as exc:
        raise click.ClickException(inert(str(exc))) from None

    click.echo(f"revoked key '{inert(record.name)}' (id {inert(record.id)})")


def _bounded(value: float, low: float, high: float) -> float:
    """click's FloatRange lets NaN through (every comparison with it is false), and a long digit
    string becomes infinity."""
    from .bounded import finite_between

    if not finite_between(value, low, high):
        raise click.BadParameter(f"{value} is not a number from {low:g} to {high:g}")
    return value


def _when(ts: float | None) -> str:
    import datetime

    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@main.command(short_help="Show usage per key, user and property, closest to a limit first.")
@click.option("--key", "key_name", help="Only this key (name or id).")
@click.option("--watch", is_flag=True, help="Refresh until interrupted (Ctrl-C).")
@click.option(
    "--interval",
    default=2.0,
    show_default=True,
    type=float,
    callback=lambda _ctx, _param, value: _bounded(value, 0.1, 3600.0),
    help="Seconds between refreshes with --watch (0.1 to 3600).",
)
@click.option(
    "--limit",
    default=50,
    show_default=True,
    type=click.IntRange(1, 500),
    help="Budgets to show, closest to their limit first.",
)
@store_options
def usage(key_name: str | None, watch: bool, interval: float, limit: int, store: str) -> None:
    """Every key, user and property value in use, with its usage against each policy, closest to its limit first."""
    from .usage_view import show_usage

    show_usage(store, key_name, watch, limit, interval)


@main.command(short_help="See limits at work against a fake provider (no account needed).")
@click.option("--calls", default=6, show_default=True, type=click.IntRange(1, 1000), help="Calls in the burst.")
def demo(calls: int) -> None:
    """See it work without a provider account: a burst through the OpenAI SDK to a fake provider."""
    from .demo import run_demo

    sys.exit(run_demo(calls))
