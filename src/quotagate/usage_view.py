"""`quotagate usage`: the dashboard's table in a terminal, with rich."""

from __future__ import annotations

import asyncio
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .admin import budget_json
from .keys import KeyError_, find_key
from .stores import BudgetUsage, open_store


async def fetch(store_url: str, key: str | None, limit: int) -> list[BudgetUsage]:
    store = open_store(store_url)
    try:
        key_id = (await find_key(store, key)).id if key else None
        return await store.usage(key_id=key_id, limit=limit)
    finally:
        await store.close()


def _bar(ratio: float, width: int = 20) -> Text:
    filled = min(width, round(ratio * width))
    style = "red" if ratio >= 1 else ("yellow" if ratio >= 0.8 else "green")
    return Text("█" * filled + "░" * (width - filled), style=style)


def render(items: list[BudgetUsage]) -> Table:
    table = Table(title=f"quotagate budgets — {time.strftime('%H:%M:%S')}", title_justify="left")
    for column in ("key", "segment", "value", "policy", "used", "quota", "usage", "%", "last denied"):
        table.add_column(column, justify="right" if column in ("used", "quota", "%") else "left")
    for item in items:
        data = budget_json(item)
        segment = item.segment or "global"
        denied = time.strftime("%H:%M:%S", time.localtime(item.last_denied_at)) if item.last_denied_at else "-"
        table.add_row(
            item.key_name or item.key_id,
            segment,
            item.value or "-",
            ", ".join(item.policies),
            f"{data['used']:g}" + (f" (+{data['held']:g} held)" if item.held else ""),
            data["quota_text"],
            _bar(item.ratio),
            f"{item.ratio * 100:.0f}%",
            denied,
        )
    if not items:
        table.add_row("(no budget in use)", *[""] * 8)
    return table


def show_usage(store_url: str, key: str | None, watch: bool, limit: int) -> None:
    console = Console()
    try:
        items = asyncio.run(fetch(store_url, key, limit))
    except KeyError_ as exc:
        console.print(f"[red]{exc}[/red]")
        raise SystemExit(1) from None
    if not watch:
        console.print(render(items))
        return
    with Live(render(items), console=console, refresh_per_second=1) as live:
        try:
            while True:
                time.sleep(2)
                live.update(render(asyncio.run(fetch(store_url, key, limit))))
        except KeyboardInterrupt:
            pass
