"""Values that clients chose (user ids, property values, key names), printed inertly.

A terminal acts on control characters (ESC starts sequences that clear the screen, set the window
title or make hyperlinks; a newline makes a row of its own), on C1 controls and DEL, and bidi
overrides reorder what follows; Rich interprets `[markup]` in plain strings. Every such value goes
through `inert` (controls and format characters escaped visibly, as Python writes them) and is
printed as a rich `Text`, which is never parsed for markup.
"""

from __future__ import annotations

import unicodedata
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is imported by the commands that print tables, never by a gateway worker
    from rich.text import Text

_ACTIVE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})  # controls, format (bidi, zero-width), separators
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def inert(text: str) -> str:
    """The text with every control, format and line/paragraph separator character escaped."""
    if text.isprintable():  # no such character: the common case, at C speed
        return text
    return "".join(_escape(c) if unicodedata.category(c) in _ACTIVE else c for c in text)


def _escape(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def inert_text(text: str | None, style: str = "") -> Text:
    """A value as a rich Text: escaped, and never read as markup."""
    from rich.text import Text

    return Text(inert(text or ""), style=style)


def json_inert(line: str) -> str:
    """A JSON text with those characters as JSON escapes (json.dumps leaves DEL, C1 controls and
    format characters raw when it keeps non-ASCII text): still the same JSON, now inert."""
    if line.isprintable():
        return line
    return "".join(_json_escape(c) if unicodedata.category(c) in _ACTIVE else c for c in line)


def _json_escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    high, low = divmod(code - 0x10000, 0x400)
    return f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04x}"
