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

from rich.console import Console, Group, OverflowMethod
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .keys import GatewayKeyError, find_key
from .policy import USER, Unit
from .stores import BudgetUsage, Denial, StoreError, open_store
from .terminal import inert_text

NEAR = 0.8
RECENT_DENIAL = 300.0
DENIALS_SHOWN = 10  # the latest denials under the table, as on the dashboard
DENIALS_KEPT = 1000  # what the stores keep: searched for one key's
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


async def fetch(store_url: str, key: str | None, limit: int) -> tuple[list[BudgetUsage], list[Denial]]:
    """The budgets closest to their limits, and the latest denials (of that key, with one)."""
    store = open_store(store_url)
    try:
        key_id = (await find_key(store, key)).id if key else None
        items = await store.usage(key_id=key_id, limit=limit)
        denials = await store.denials(limit=DENIALS_KEPT if key_id else DENIALS_SHOWN)
        return items, [d for d in denials if key_id is None or d.key_id == key_id][:DENIALS_SHOWN]
    finally:
        await store.close()


# --- formatting -----------------------------------------------------------------------------------


def counted(amount: str, noun: str) -> str:
    """'1 request', '2 requests', '0.50 requests': the noun singular only for exactly one."""
    return f"{amount} {noun}" if amount == "1" else f"{amount} {noun}s"


def window_text(seconds: int) -> str:
    if seconds in WINDOWS:
        return WINDOWS[seconds]
    size, unit = next(
        (s, u) for s, u in ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second")) if seconds % s == 0
    )
    return counted(f"{seconds // size:,}", unit)


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
    """'1 request / minute', '200,000 tokens / 2 hours', '$5.00 / 30 days', '0.5¢ / minute'."""
    quota = amount_text(item.quota, item.unit)
    if item.unit != Unit.CENTS.value:
        quota = counted(quota, item.unit)
    return f"{quota} / {window_text(item.window)}"


def who(entity: Entity) -> Text:
    if entity.segment is None:
        return Text("all traffic", style="dim")
    kind = "user" if entity.segment == USER else entity.segment
    return Text.assemble(
        inert_text(kind + " ", "cyan" if entity.segment == USER else "magenta"), inert_text(entity.value, "bold")
    )


def bar(ratio: float, width: int = 20) -> Text:
    """A bar of `width` cells and the percentage; at width 0, the percentage alone."""
    filled = min(width, round(ratio * width))
    style = "red" if ratio >= 1 else ("yellow" if ratio >= NEAR else "blue")
    percent = f"{ratio * 100:3.0f}%"
    if not width:
        return Text(percent, style=style)
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "bright_black"), " " + percent)


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


HEADERS = ("key", "who", "policy", "used/quota", "status")  # and "usage", the bar, before status
PADDING = 2 * 5  # between the six columns of a box-less table: one space on each side
WIDE = 1_000_000  # the width a pipe gets: no value is ever cut or wrapped


@dataclass(slots=True)
class Row:
    cells: tuple[Text, Text, Text, Text, Text]  # as HEADERS
    ratio: float


def rows_of(entities: list[Entity], now: float) -> list[Row]:
    rows = []
    for entity in entities:
        for index, item in enumerate(entity.budgets):
            first = index == 0
            used = amount_text(item.used + item.held, item.unit, item.quota)
            cells = (
                inert_text(entity.key, "bold") if first else Text(""),
                who(entity) if first else Text(""),
                Text(policy_text(item)),
                Text(f"{used} / {amount_text(item.quota, item.unit)}"),
                status(entity, now) if first else Text(""),
            )
            rows.append(Row(cells, item.ratio))
    return rows


def fit(rows: list[Row], width: int) -> tuple[int, int, int]:
    """The bar's width and the key and who columns' widths in a terminal `width` columns wide:
    policies, amounts and statuses stay whole; the bar shrinks first, then keys and who."""
    key, who_, *rest = (max([len(name), *(row.cells[i].cell_len for row in rows)]) for i, name in enumerate(HEADERS))
    for bar_width in (20, 8, 0) if width >= 120 else (8, 0):
        room = width - PADDING - sum(rest) - max(len("usage"), bar(0, bar_width).cell_len)
        wanted = key + who_ if bar_width == 20 else min(key, 12) + min(who_, 12)
        if room >= wanted:
            break
    if key + who_ <= room:
        return bar_width, key, who_
    short = min(key, who_, max(room // 2, 1))
    long = max(room - short, 1)
    return (bar_width, short, long) if key <= who_ else (bar_width, long, short)


def denials_table(denials: list[Denial], now: float, terminal: bool) -> Table:
    """When, key, who and policy of each denial, newest first. In a terminal the key and who are
    shortened (with `…`) before the policy; in a pipe every value is whole."""
    table = Table(box=None, pad_edge=False, header_style="bold dim", show_edge=False)
    cut: OverflowMethod = "ellipsis" if terminal else "fold"
    table.add_column("when", no_wrap=True)
    table.add_column("key", no_wrap=True, overflow=cut)
    table.add_column("who", no_wrap=True, overflow=cut)
    table.add_column("policy", no_wrap=True, min_width=max(len(d.policy) for d in denials))
    for denial in denials:
        entity = Entity(denial.key_name or denial.key_id, denial.segment, denial.value)
        table.add_row(ago(now - denial.at), inert_text(entity.key, "bold"), who(entity), inert_text(denial.policy))
    return table


def render(
    items: list[BudgetUsage],
    now: float | None = None,
    more: bool = False,
    width: int | None = None,
    denials: list[Denial] | None = None,
) -> Group:
    """The title, the table and the recent denials. In a terminal `width` columns wide every line
    fits (see `fit`); without a width (a pipe, a file) every value is whole, for grep, cut and awk."""
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
    rows = rows_of(entities, now)
    bar_width, key_width, who_width = (20, None, None) if width is None else fit(rows, width)
    table = Table(box=None, pad_edge=False, header_style="bold dim", show_edge=False)
    table.add_column("key", no_wrap=True, width=key_width, overflow="ellipsis")
    table.add_column("who", no_wrap=True, width=who_width, overflow="ellipsis")
    table.add_column("policy", no_wrap=True)
    table.add_column("used/quota", justify="right", no_wrap=True)
    table.add_column("usage", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for row in rows:
        key, who_, policy, used, state = row.cells
        table.add_row(key, who_, policy, used, bar(row.ratio, bar_width), state)
    parts: list[Text | Table] = [title, table]
    if not entities:
        parts.append(Text("no budget in use: budgets appear with the first request that names a policy", "dim"))
    if more:
        parts.append(Text("(more budgets, further from their limits: raise --limit to see them)", "dim"))
    if denials:
        parts += [Text(""), Text("recent denials", "bold"), denials_table(denials, now, width is not None)]
    return Group(*parts)


# --- the command ----------------------------------------------------------------------------------


def snapshot(store_url: str, key: str | None, limit: int, console: Console) -> Group:
    items, denials = asyncio.run(fetch(store_url, key, limit + 1))
    width = console.width if console.is_terminal else None
    return render(items[:limit], more=len(items) > limit, width=width, denials=denials)


def show_usage(store_url: str, key: str | None, watch: bool, limit: int, interval: float = 2.0) -> None:
    console = Console()
    if not console.is_terminal:  # a pipe or a file: lines as long as their values
        console = Console(width=WIDE)
    try:
        view = snapshot(store_url, key, limit, console)
        if not watch:
            console.print(view)
            return
        if console.is_terminal:
            with Live(view, console=console, auto_refresh=False) as live:
                while True:
                    time.sleep(interval)
                    live.update(snapshot(store_url, key, limit, console), refresh=True)
        console.print(view)
        while True:  # not a terminal: one table after another, for pipes and logs
            time.sleep(interval)
            console.print()
            console.print(snapshot(store_url, key, limit, console))
    except GatewayKeyError as exc:
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
