"""The CLI prints what clients sent inertly: user ids, property values and key names with escape
sequences, control characters, bidi overrides or Rich markup reach the terminal escaped and
visible, never interpreted (no cleared screen, window title, hyperlink or fake row)."""

from __future__ import annotations

import asyncio
import logging
import unicodedata
from collections.abc import Callable

import orjson
import pytest

from quotagate.keys import create_key
from quotagate.limiter import budgets_for
from quotagate.policy import parse_policies
from quotagate.server import JsonFormatter
from quotagate.stores import open_store
from quotagate.terminal import inert

from .conftest import CHAT, Gateway, cli

WIDE = {"COLUMNS": "400"}
TERMINAL = {**WIDE, "FORCE_COLOR": "1", "TERM": "xterm-256color"}  # rich writes as to a terminal
USERS = {
    "\x1b[2J\x1b[Hcleared": r"\x1b[2J\x1b[Hcleared",  # clear the screen
    "\x1b]0;pwned\x07title": r"\x1b]0;pwned\x07title",  # set the window title
    "\x1b]8;;https://evil.example/\x1b\\link\x1b]8;;\x1b\\": r"\x1b]8;;https://evil.example/\x1b\link",  # OSC 8
    "fake\nrow ████ 100% ok": r"fake\nrow ████ 100% ok",  # a row of its own
    "\u202eevil-reversed": r"\u202eevil-reversed",  # bidi override
    "c1\x9b2Jcsi": r"c1\x9b2Jcsi",  # a C1 control (CSI)
    "del\x7fx\rcr\ttab": r"del\x7fx\rcr\ttab",
}
MARKUP = ["[red]marked[/red]", "[link=https://evil.example]click[/link]", ":warning: [bold]loud"]
RAW = ["\x1b[2J", "\x1b]0;", "\x1b]8;", "\x9b", "\u202e", "\x7f", "\r", "⚠"]


def seed(store_url: str) -> None:
    """Keys with hostile names; budgets of hostile users and property values, straight into the store."""

    async def main() -> None:
        store = open_store(store_url)
        try:
            for index, name in enumerate([*MARKUP, "\x1b[31mred-key\u202e"]):
                _, record = await create_key(store, name, [])
                policies = parse_policies("5;w=3600;s=user, 8;w=3600;s=org")
                values = list(USERS) if index == 0 else [f"[blink]{name}[/blink]"]
                for value in values:
                    budgets = budgets_for(record.id, policies, {None: None, "user": value, "org": MARKUP[1]})
                    assert (await store.admit(record.id, budgets, [1] * len(budgets), "seed", 0.0)).allowed
        finally:
            await store.close()

    asyncio.run(main())


def test_inert() -> None:
    assert inert("alice") == "alice" and inert("Zoë 山田 [x]") == "Zoë 山田 [x]"
    assert inert("a\x1b[2Jb\x00\x7f\x9b") == r"a\x1b[2Jb\x00\x7f\x9b"
    assert inert("\u202e\u2066\u200b\u2028\ufeff") == r"\u202e\u2066\u200b\u2028\ufeff"
    assert inert("tag\U000e0041") == r"tag\U000e0041"
    assert inert("\ud800") == r"\ud800"


def test_usage_shows_hostile_values_escaped(store_url: str) -> None:
    seed(store_url)
    plain = cli("usage", "--store", store_url, "--limit", "100", env=WIDE)
    output = plain.stdout + plain.stderr
    assert not [c for c in output if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
    for shown in USERS.values():
        assert shown in output, (shown, output)
    assert "[red]marked[/red]" in output and "[blink]:warning: [bold]loud[/blink]" in output
    assert "[blink][link=https://evil.example]click[/link][/blink]" in output
    assert r"\x1b[31mred-key\u202e" in output
    forced = cli("usage", "--store", store_url, "--limit", "100", env=TERMINAL).stdout
    assert "\x1b[" in forced  # the styles of a terminal, and nothing else:
    assert not [raw for raw in RAW if raw in forced]
    assert "https://evil.example" in forced and "\x1b]8" not in forced


def test_keys_list_shows_names_as_text(store_url: str) -> None:
    seed(store_url)
    for env in (WIDE, TERMINAL):
        output = cli("keys", "list", "--store", store_url, env=env).stdout
        for name in MARKUP:
            assert name in output, (name, output)
        assert r"\x1b[31mred-key\u202e" in output
        assert not [raw for raw in RAW if raw in output]
        if env is WIDE:
            assert not [c for c in output if c != "\n" and unicodedata.category(c) in ("Cc", "Cf")]


@pytest.mark.parametrize("name", ["\x1b]0;title\x07", "[link=https://evil.example]x[/link]\u202e"])
def test_keys_create_and_revoke_echo_names_inertly(sqlite_url: str, name: str) -> None:
    created = cli("keys", "create", "--name", name, "--store", sqlite_url, env=TERMINAL)
    revoked = cli("keys", "revoke", name, "--store", sqlite_url, env=TERMINAL)
    for output in (created.stderr, revoked.stdout):
        assert inert(name) in output and not [raw for raw in RAW if raw in output]


def test_usage_errors_print_the_key_asked_for_inertly(sqlite_url: str) -> None:
    result = cli(
        "usage", "--store", sqlite_url, "--key", "[link=https://evil.example]x\x1b[2J", check=False, env=TERMINAL
    )
    assert result.returncode == 1
    assert "[link=https://evil.example]x" in result.stdout and "\x1b]8" not in result.stdout
    assert "\x1b[2J" not in result.stdout


def test_log_lines_carry_hostile_user_ids_as_json_escapes(
    make_gateway: Callable[..., Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    """The log goes to a terminal too (`quotagate serve` in a shell): the same values are inert there."""
    caplog.set_level(logging.INFO, logger="quotagate")
    gateway = make_gateway(access_log=True)
    key = gateway.key()
    hostile = "\u202eevil\x7f\x9b2J\u2028row"
    with gateway.http() as http:
        response = http.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": CHAT, "user": hostile},
            headers={"Helicone-Auth": f"Bearer {key}"},
        )
    assert response.status_code == 200
    lines = [JsonFormatter().format(r) for r in caplog.records if r.getMessage() == "request"]
    assert len(lines) == 1 and orjson.loads(lines[0])["user"] == hostile
    assert not [c for c in lines[0] if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
