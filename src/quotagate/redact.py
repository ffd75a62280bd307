"""URLs as they may be shown: in responses, log lines, the start banner and CLI errors.

A store URL can carry credentials (`redis://user:password@host`, `?password=...`); every place that
formats one goes through `redact_url`, which keeps what an operator needs to recognise it (scheme,
user name, host, port, path) and masks the rest.
"""

from __future__ import annotations

import re

MASK = "***"
_SECRET_OPTION = re.compile(r"(?i)([?&][^=&#]*(?:pass|pwd|secret|token|auth|credential)[^=&#]*=)[^&#]*")


def redact_url(url: str) -> str:
    """The URL with its user info's password (or a lone user info, which may be a token) and any
    password-like query option masked. Works on malformed URLs too: when in doubt, it masks more."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _SECRET_OPTION.sub(r"\1" + MASK, url)
    if "@" in rest and not rest.startswith("/"):  # sqlite:////path@x.db has no user info
        userinfo, _, rest = rest.rpartition("@")  # a password may hold '@', '/' or '?' unescaped
        user, colon, _password = userinfo.partition(":")
        rest = (f"{user}:{MASK}@" if colon else f"{MASK}@") + rest
    return f"{scheme}://" + _SECRET_OPTION.sub(r"\1" + MASK, rest)
