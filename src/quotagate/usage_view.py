"""`quotagate usage`: the dashboard's table in a terminal, with rich.

Reads the store directly (the same `usage()` the admin API pages through), groups the budgets by
who they limit (a key's global budget, a user, a property value), closest to its limit first, one
line per policy, and marks those at 80 % or more and those denied in the last five minutes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from decimal import Decimal

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .keys import KeyError_, find_key
from .policy import USER, Unit
from .stores import BudgetUsage, StoreError, open_store
from .terminal import inert_text

NEAR = 0.8
RECENT_DENIAL = 300.0
WINDOWS = {31536000: "year", 2592000: "30 days", 604800: "week", 86400: "day", 3600: "hour", 60: "minute"}


@dataclass(slots=True)
class Entity:
    """Whoever a set of budgets limits: a key's global budget, one user, one property value."""

    key: str
    segment: str | None
    value: str | None
    budgets: list[BudgetUsage] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return max(b.ratio for b in self.budgets)

    @property
    def denied_at(self) -> float | None:
        return max((b.last_denied_at for b in self.budgets if b.last_denied_at), default=None)


def group(items: list[BudgetUsage]) -> list[Entity]:
    """Budgets by who they limit, closest to a limit first; ties in a stable order (key, value)."""
    entities: dict[tuple[str, str | None, str | None], Entity] = {}
    for item in items:
        ident = (item.key_id, item.segment, item.value)
        entity = entities.setdefault(ident, Entity(item.key_name or item.key_id, item.segment, item.value))
        entity.budgets.append(item)
    return sorted(entities.values(), key=lambda e: (-e.ratio, e.key, e.value or ""))


async def fetch(store_url: str, key: str | None, limit: int) -> list[BudgetUsage]:
    store = open_store(store_url)
    try:
        key_id = (await find_key(store, key)).id if key else None
        return await store.usage(key_id=key_id, limit=limit)
    finally:
        await store.close()


# --- formatting -----------------------------------------------------------------------------------


def window_text(seconds: int) -> str:
    if seconds in WINDOWS:
        return WINDOWS[seconds]
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def amount_text(scaled: int, unit: str, quota_scaled: int | None = None) -> str:
    """Requests and tokens with thousands separators; money in dollars, or in cents under a dollar."""
    kind = Unit(unit)
    value = Decimal(scaled) / kind.scale
    if kind is not Unit.CENTS:
        return f"{value:,.0f}" if value == value.to_integral_value() else f"{value:,.2f}"
    quota = Decimal(quota_scaled if quota_scaled is not None else scaled) / kind.scale
    if quota >= 100:
        return f"${value / 100:,.2f}"
    return f"{value:.4f}".rstrip("0").rstrip(".") + "¢"


def policy_text(item: BudgetUsage) -> str:
    unit = {"request": " requests", "token": " tokens", "cents": ""}[item.unit]
    return f"{amount_text(item.quota, item.unit)}{unit} / {window_text(item.window)}"


def who(entity: Entity) -> Text:
    if entity.segment is None:
        return Text("all traffic", style="dim")
    kind = "user" if entity.segment == USER else entity.segment
    return Text.assemble(
        inert_text(kind + " ", "cyan" if entity.segment == USER else "magenta"), inert_text(entity.value, "bold")
    )


def bar(ratio: float, width: int = 20) -> Text:
    filled = min(width, round(ratio * width))
    style = "red" if ratio >= 1 else ("yellow" if ratio >= NEAR else "blue")
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "bright_black"), f" {ratio * 100:3.0f}%")


def ago(seconds: float) -> str:
    if seconds < 60:
        return f"{max(0, int(seconds))}s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)}m ago"
    return f"{int(seconds // 3600)}h ago"


def status(entity: Entity, now: float) -> Text:
    denied = entity.denied_at
    if denied is not None and now - denied < RECENT_DENIAL:
        return Text(f"denied {ago(now - denied)}", style="bold red")
    if entity.ratio >= 1:
        return Text("at the limit", style="bold red")
    if entity.ratio >= NEAR:
        return Text("near the limit", style="bold yellow")
    return Text("ok", style="dim")


def render(items: list[BudgetUsage], now: float | None = None, more: bool = False, bar_width: int = 20) -> Group:
    now = time.time() if now is None else now
    entities = group(items)
    near = sum(1 for e in entities if e.ratio >= NEAR)
    title = Text.assemble(
        ("quotagate", "bold"),
        f" · the {len(items)} budgets closest to their limits · "
        if more
        else f" · {len(items)} budget{'s' if len(items) != 1 else ''} in use · ",
        (f"{near} at 80 % or more", "yellow" if near else ""),
        f" · {time.strftime('%H:%M:%S', time.localtime(now))}",
    )
    table = Table(box=None, pad_edge=False, header_style="bold dim", show_edge=False)
    table.add_column("key", no_wrap=True, min_width=min(12, max((len(e.key) for e in entities), default=3)))
    table.add_column("who", no_wrap=True, min_width=10)
    table.add_column("policy", no_wrap=True, overflow="ellipsis")
    table.add_column("used/quota", justify="right", no_wrap=True, min_width=10)
    table.add_column("usage", no_wrap=True, min_width=bar_width + 5)
    table.add_column("status", no_wrap=True, min_width=14)
    for entity in entities:
        for index, item in enumerate(entity.budgets):
            first = index == 0
            used = amount_text(item.used + item.held, item.unit, item.quota)
            table.add_row(
                inert_text(entity.key, "bold") if first else "",
                who(entity) if first else "",
                Text(policy_text(item)),
                Text(f"{used} / {amount_text(item.quota, item.unit)}"),
                bar(item.ratio, bar_width),
                status(entity, now) if first else "",
            )
    parts: list[Text | Table] = [title, table]
    if not entities:
        parts.append(Text("no budget in use: budgets appear with the first request that names a policy", "dim"))
    if more:
        parts.append(Text("(more budgets, further from their limits: raise --limit to see them)", "dim"))
    return Group(*parts)


# --- the command ----------------------------------------------------------------------------------


def snapshot(store_url: str, key: str | None, limit: int, width: int = 200) -> Group:
    items = asyncio.run(fetch(store_url, key, limit + 1))
    return render(items[:limit], more=len(items) > limit, bar_width=20 if width >= 120 else 8)


def show_usage(store_url: str, key: str | None, watch: bool, limit: int, interval: float = 2.0) -> None:
    console = Console()
    try:
        view = snapshot(store_url, key, limit, console.width)
        if not watch:
            console.print(view)
            return
        if console.is_terminal:
            with Live(view, console=console, auto_refresh=False) as live:
                while True:
                    time.sleep(interval)
                    live.update(snapshot(store_url, key, limit, console.width), refresh=True)
        console.print(view)
        while True:  # not a terminal: one table after another, for pipes and logs
            time.sleep(interval)
            console.print()
            console.print(snapshot(store_url, key, limit, console.width))
    except KeyError_ as exc:
        console.print(inert_text(str(exc), "red"))
        raise SystemExit(1) from None
    except StoreError as exc:
        console.print(inert_text(f"store unreachable: {exc}", "red"))
        raise SystemExit(1) from None
    except ValueError as exc:  # a malformed store URL
        console.print(inert_text(str(exc), "red"))
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        pass
