"""Who may use the admin surface: the admin token, dashboard sessions kept in the store, the
throttle on failed sign-ins, and the rule that state-changing requests are JSON.

A session cookie reads `<session id>.<HMAC(admin token, session id)>`. The store keeps a hash of
the id with its expiry, so signing out ends the session in every worker and instance sharing the
store, and a changed admin token ends every session (no cookie's HMAC matches any more).

Every sign-in attempt (`POST /admin/session`, or a bearer token on `/admin/` and on a `/metrics`
that wants the token) first takes one from its client address's allowance for the minute, an
atomic count in the store; a right token gives it back. Beyond the allowance every attempt from
that address gets 429 without its token being looked at, so the answers tell a guesser nothing.
A session cookie is no guess (it was given for a right token) and is never throttled.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import re
import secrets
import time

from aiohttp import web

from .config import Settings
from .errors import admin_error
from .stores import Store, StoreError

log = logging.getLogger("quotagate.admin")

COOKIE = "quotagate_admin"
SESSION_SECONDS = 12 * 3600
SIGNIN_WINDOW = 60  # seconds: the allowance of failed sign-ins is per address per minute
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)
_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # any str, even one with a lone surrogate


# --- the session cookie ---------------------------------------------------------------------------


def session_cookie(token: str, session_id: str) -> str:
    mac = hmac.new(_bytes(token), f"quotagate-session:{session_id}".encode(), hashlib.sha256).hexdigest()
    return f"{session_id}.{mac}"


def cookie_session(value: str, token: str) -> str | None:
    """The session id of a cookie made with this token, else None."""
    session_id, _, _ = value.partition(".")
    if not _SESSION_ID.fullmatch(session_id):
        return None
    return session_id if hmac.compare_digest(_bytes(value), _bytes(session_cookie(token, session_id))) else None


def session_hash(session_id: str) -> str:
    """What the store keeps: whoever reads the store cannot present the session."""
    return hashlib.sha256(session_id.encode()).hexdigest()


# --- where a sign-in attempt comes from -----------------------------------------------------------


def client_scope(request: web.Request) -> str:
    """The address a sign-in is counted against: an IPv4 address, or an IPv6 /64 (one host
    usually holds a whole /64, so counting single IPv6 addresses would count nothing)."""
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    return str(address)


def json_required(request: web.Request) -> web.Response | None:
    """415 for a state-changing request that is not JSON: forms and `text/plain` are what a page on
    another site (or another port of this host) can send without the browser asking first."""
    if request.method not in _STATE_CHANGING:
        return None
    if request.method == "DELETE" and not request.body_exists and "Content-Type" not in request.headers:
        return None
    if request.content_type == "application/json":
        return None
    return admin_error(
        415,
        f"{request.method} {request.path} takes a JSON body: send Content-Type: application/json",
        "json_required",
        {"Accept-Post": "application/json"},
    )


class Gatekeeper:
    """Checks admin tokens and session cookies for the admin routes and /metrics."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.allowance = settings.admin_failed_signins

    async def check(self, request: web.Request) -> web.Response | None:
        """None when the request carries the admin token or a live session; else the answer."""
        if not self.settings.admin_token:
            return admin_error(401, "admin token required, and none is configured", "admin_token_required")
        header = request.headers.get("Authorization", "")
        if header[:7].lower() == "bearer ":
            return await self.verify(request, header[7:].strip())
        try:
            if await self.session_expiry(request) is not None:
                return None
        except StoreError as exc:
            return admin_error(503, f"cannot check the session: {exc}", "store_unavailable")
        return admin_error(
            401,
            "admin token required: send 'Authorization: Bearer <admin token>' or sign in at /dashboard",
            "admin_token_required",
        )

    async def verify(self, request: web.Request, presented: str) -> web.Response | None:
        """A sign-in attempt: None if the token is right; 429 beyond the address's allowance, 401."""
        token = self.settings.admin_token or ""
        scope = client_scope(request)
        refusal = await self._take_attempt(scope)
        if refusal is not None:
            return refusal
        if not hmac.compare_digest(_bytes(presented), _bytes(token)):
            return admin_error(401, "wrong admin token", "admin_token_invalid")
        try:
            await self.store.refund_attempt(scope, SIGNIN_WINDOW)
        except StoreError as exc:
            log.warning("could not give back a sign-in attempt of %s: %s", scope, exc)
        return None

    async def _take_attempt(self, scope: str) -> web.Response | None:
        try:
            count, remaining = await self.store.count_attempt(scope, SIGNIN_WINDOW)
        except StoreError as exc:
            if self.settings.on_store_error == "closed":
                return admin_error(503, f"cannot count sign-in attempts: {exc}", "store_unavailable")
            log.warning("sign-in attempts of %s not counted (store unreachable): %s", scope, exc)
            return None
        if count <= self.allowance:
            return None
        if count == self.allowance + 1:
            log.warning("admin sign-ins from %s throttled: over %d failed this minute", scope, self.allowance)
        wait = max(1, math.ceil(remaining))
        return admin_error(
            429,
            f"too many failed admin sign-ins from your address: try again in {wait} s",
            "too_many_signins",
            {"Retry-After": str(wait)},
        )

    # -- sessions ---------------------------------------------------------------------------

    async def start_session(self) -> tuple[str, int]:
        """A new session: its cookie value and its expiry. Raises StoreError."""
        session_id = secrets.token_urlsafe(32)
        expires = int(time.time()) + SESSION_SECONDS
        await self.store.create_session(session_hash(session_id), expires)
        return session_cookie(self.settings.admin_token or "", session_id), expires

    async def session_expiry(self, request: web.Request) -> float | None:
        """The expiry of the request's live session, else None. Raises StoreError."""
        session_id = cookie_session(request.cookies.get(COOKIE, ""), self.settings.admin_token or "")
        if session_id is None:
            return None
        expires = await self.store.session_expiry(session_hash(session_id))
        return expires if expires is not None and expires > time.time() else None

    async def end_session(self, request: web.Request) -> None:
        """Raises StoreError."""
        session_id = cookie_session(request.cookies.get(COOKIE, ""), self.settings.admin_token or "")
        if session_id is not None:
            await self.store.delete_session(session_hash(session_id))
