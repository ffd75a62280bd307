"""The admin JSON API under /admin/ and the dashboard page, behind the admin token.

Without an admin token the whole surface answers 404: it is off. With one, every /admin/ route
wants either `Authorization: Bearer <admin token>` or the dashboard's session cookie, which
`POST /admin/session` sets in exchange for the token: HttpOnly (page scripts never hold the token),
SameSite=Strict (other sites cannot make the browser use it), a session kept in the store (see
`adminauth`: signing out ends it everywhere; failed sign-ins are throttled per client address).
State-changing requests must be JSON (415 otherwise).

    GET    /admin/session            200 while the session cookie (or bearer token) is good
    POST   /admin/session            {"token": ...} -> sets the cookie; DELETE ends the session
    GET    /admin/budgets            budgets in use, closest to their limit first (filters, paging)
    GET    /admin/denials            recent 429s, newest first
    GET    /admin/stats              allowed vs denied requests over the last minutes
    GET    /admin/keys               gateway keys (never their secrets)
    POST   /admin/keys               {"name": ..., "policies": [...]} -> the new key, shown once
    DELETE /admin/keys/{name or id}  revoke
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from decimal import Decimal
from importlib import resources
from typing import Any

from aiohttp import web

from . import keys
from .adminauth import COOKIE, SESSION_SECONDS, Gatekeeper, json_required
from .bounded import shown, whole_number
from .config import Settings
from .errors import NO_STORE, AdminError, admin_error, admin_response
from .metrics import RequestHistory
from .policy import PolicyError, Unit, format_quota, segment_kind
from .stores import EVERY_SEGMENT, BudgetUsage, Denial, KeyRecord, SegmentFilter, Store, StoreError

PAGE_MAX = 500
OFFSET_MAX = 10**9  # far beyond any list; SQLite refuses offsets over 2**63
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
PROPERTY_SEGMENT_PREFIX = "property:"  # ?segment=property:NAME asks for a property, even one named global
_PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
}
ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".html": "text/html"}


# --- JSON shapes ----------------------------------------------------------------------------------


def format_scaled(value: int, unit: str) -> str:
    return format_quota(Decimal(value) / Unit(unit).scale)


def strictest_policy(item: BudgetUsage) -> str:
    """The policy whose quota the budget is checked against (the smallest naming the counter)."""
    quota = format_scaled(item.quota, item.unit)
    return next((p for p in item.policies if p.split(";", 1)[0] == quota), item.policies[0] if item.policies else "")


def budget_json(item: BudgetUsage) -> dict[str, Any]:
    scale = Unit(item.unit).scale
    data = asdict(item)
    data.update(
        quota=item.quota / scale,
        used=item.used / scale,
        held=item.held / scale,
        ratio=round(item.ratio, 4),
        quota_text=format_scaled(item.quota, item.unit),
        policy=strictest_policy(item),
        segment_kind=segment_kind(item.segment),
    )
    return data


def denial_json(item: Denial) -> dict[str, Any]:
    return {**asdict(item), "segment_kind": segment_kind(item.segment)}


def key_json(record: KeyRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "name": record.name,
        "policies": record.policies,
        "created_at": record.created_at,
        "revoked_at": record.revoked_at,
        "active": record.active,
    }


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    value = whole_number(raw, high)
    if value is None or value < low:
        raise AdminError(400, f"{name} must be a whole number {low}..{high}, not {shown(raw)}", "invalid_parameter")
    return value


# --- routes ---------------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


GATEKEEPER = web.AppKey("gatekeeper", Gatekeeper)
ADMIN_INDEX = {
    "budgets": "GET /admin/budgets",
    "denials": "GET /admin/denials",
    "stats": "GET /admin/stats",
    "keys": "GET /admin/keys",
    "create_key": "POST /admin/keys",
    "revoke_key": "DELETE /admin/keys/{id or name}",
    "session": "GET|POST|DELETE /admin/session",
}
__all__ = ["COOKIE", "GATEKEEPER", "SESSION_SECONDS", "add_admin_routes"]


def add_admin_routes(app: web.Application, settings: Settings, store: Store) -> None:
    api = AdminApi(settings, store)
    app[GATEKEEPER] = api.gate
    app.router.add_get("/dashboard", api.dashboard)
    app.router.add_get("/dashboard/", api.dashboard)
    app.router.add_get("/dashboard/{asset}", api.asset)
    app.router.add_get("/admin", api.guarded(api.index))
    app.router.add_get("/admin/", api.guarded(api.index))
    app.router.add_get("/admin/session", api.guarded(api.session))
    app.router.add_post("/admin/session", api.login)
    app.router.add_delete("/admin/session", api.logout)
    app.router.add_get("/admin/budgets", api.guarded(api.budgets))
    app.router.add_get("/admin/denials", api.guarded(api.denials))
    app.router.add_get("/admin/stats", api.guarded(api.stats))
    app.router.add_get("/admin/keys", api.guarded(api.list_keys))
    app.router.add_post("/admin/keys", api.guarded(api.create_key))
    app.router.add_delete("/admin/keys/{key}", api.guarded(api.revoke_key))
    app.router.add_route("*", "/admin/{tail:.*}", api.guarded(api.not_found))
    if settings.admin_token:
        app.cleanup_ctx.append(api.sample_history)


class AdminApi:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.history = RequestHistory()
        self.gate = Gatekeeper(settings, store)

    async def sample_history(self, _app: web.Application) -> AsyncIterator[None]:
        """Sample the requests counter twice per chart bucket, so that no bucket goes unsampled."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.history.step / 2)
                self.history.sample()

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def guarded(self, handler: Handler) -> Handler:
        """Admin surface on, token checked; AdminError and StoreError become JSON errors here."""

        async def guarded_handler(request: web.Request) -> web.StreamResponse:
            if not self.settings.admin_token:
                return admin_error(404, "the admin surface is off: start the gateway with --admin-token", "admin_off")
            refusal = await self.gate.check(request) or json_required(request)
            if refusal is not None:
                return refusal
            try:
                return await handler(request)
            except AdminError as exc:
                return admin_response(exc)
            except StoreError as exc:
                return admin_error(503, f"store unreachable: {exc}", "store_unavailable")

        return guarded_handler

    async def index(self, request: web.Request) -> web.Response:
        """The API's root: what it offers, so that it can be found from /admin/ alone."""
        return web.json_response({"routes": ADMIN_INDEX, "dashboard": "/dashboard"}, headers=NO_STORE)

    async def not_found(self, request: web.Request) -> web.Response:
        raise AdminError(404, f"no admin route {request.method} {request.path}", "unknown_route")

    # -- session ----------------------------------------------------------------------------

    async def session(self, request: web.Request) -> web.Response:
        expires = await self.gate.session_expiry(request)
        return web.json_response({"authenticated": True, "expires_at": expires}, headers=NO_STORE)

    async def login(self, request: web.Request) -> web.Response:
        """The admin token for a session cookie: a sign-in attempt, throttled per client address."""
        if not self.settings.admin_token:
            return admin_error(404, "the admin surface is off: start the gateway with --admin-token", "admin_off")
        presented = await _presented_token(request)
        if isinstance(presented, web.Response):
            return presented
        refusal = await self.gate.verify(request, presented)
        if refusal is not None:
            return refusal
        try:
            value, expires = await self.gate.start_session()
        except StoreError as exc:
            return admin_error(503, f"cannot start a session: {exc}", "store_unavailable")
        response = web.json_response({"authenticated": True, "expires_at": expires}, headers=NO_STORE)
        response.set_cookie(
            COOKIE,
            value,
            max_age=SESSION_SECONDS,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https",
        )
        return response

    async def logout(self, request: web.Request) -> web.Response:
        """Ends the session in the store: its cookie is worthless from now on, wherever it is."""
        if not self.settings.admin_token:
            return admin_error(404, "the admin surface is off", "admin_off")
        refusal = json_required(request)
        if refusal is not None:
            return refusal
        try:
            await self.gate.end_session(request)
        except StoreError as exc:
            return admin_error(503, f"cannot end the session: {exc}", "store_unavailable")
        response = web.json_response({"authenticated": False}, headers=NO_STORE)
        response.del_cookie(COOKIE, path="/", httponly=True, samesite="Strict")
        return response

    # -- budgets, denials, stats ------------------------------------------------------------

    async def budgets(self, request: web.Request) -> web.Response:
        limit = _int_param(request, "limit", 100, 1, PAGE_MAX)
        offset = _int_param(request, "offset", 0, 0, OFFSET_MAX)
        sort = request.query.get("sort", "ratio")
        if sort != "ratio":
            raise AdminError(400, f"sort must be 'ratio' (closest to its limit first), not {sort!r}", "invalid_sort")
        key_id = await self._key_id(request.query.get("key"))
        segment = _segment_param(request.query.get("segment"))
        value = request.query.get("value") or None
        items = await self._page(key_id, segment, value, limit + 1, offset)
        return web.json_response(
            {
                "budgets": [budget_json(i) for i in items[:limit]],
                "limit": limit,
                "offset": offset,
                "has_more": len(items) > limit,
                "now": time.time(),
            },
            headers=NO_STORE,
        )

    async def _page(
        self, key_id: str | None, segment: str | None, value: str | None, limit: int, offset: int
    ) -> list[BudgetUsage]:
        wanted: SegmentFilter = EVERY_SEGMENT  # no filter
        if segment == "global":
            wanted = None  # the stores' global budgets
        elif segment:
            wanted = segment.removeprefix(PROPERTY_SEGMENT_PREFIX)
        return await self.store.usage(key_id=key_id, segment=wanted, value=value, limit=limit, offset=offset)

    async def _key_id(self, name_or_id: str | None) -> str | None:
        if not name_or_id:
            return None
        try:
            return (await keys.find_key(self.store, name_or_id)).id
        except keys.GatewayKeyError as exc:
            raise AdminError(404, str(exc), "unknown_key") from None

    async def denials(self, request: web.Request) -> web.Response:
        limit = _int_param(request, "limit", 50, 1, PAGE_MAX)
        items = await self.store.denials(limit=limit)
        return web.json_response({"denials": [denial_json(d) for d in items], "now": time.time()}, headers=NO_STORE)

    async def stats(self, request: web.Request) -> web.Response:
        series = self.history.series()
        window = [p for p in series if p["allowed"] is not None]
        sums = {name: sum(float(p[name] or 0) for p in window) for name in ("allowed", "denied", "rejected")}
        return web.json_response(
            {"step": self.history.step, "now": time.time(), "series": series, "window_totals": sums},
            headers=NO_STORE,
        )

    # -- keys -------------------------------------------------------------------------------

    async def list_keys(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": [key_json(k) for k in await self.store.list_keys()]}, headers=NO_STORE)

    async def create_key(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"].strip():
            raise AdminError(400, 'body must be JSON: {"name": "...", "policies": ["100;w=60", ...]}', "invalid_body")
        policies = data.get("policies") or []
        if isinstance(policies, str):
            policies = [policies]
        if not isinstance(policies, list) or not all(isinstance(p, str) for p in policies):
            raise AdminError(400, "policies must be a list of policy strings", "invalid_body")
        try:
            raw, record = await keys.create_key(self.store, data["name"], policies)
        except PolicyError as exc:
            raise AdminError(400, f"invalid policy: {exc}", "invalid_policy") from None
        except keys.GatewayKeyError as exc:
            raise AdminError(409, str(exc), "duplicate_key") from None
        return web.json_response({"key": raw, **key_json(record)}, status=201, headers=NO_STORE)

    async def revoke_key(self, request: web.Request) -> web.Response:
        try:
            record = await keys.find_key(self.store, request.match_info["key"])
        except keys.GatewayKeyError as exc:
            raise AdminError(404, str(exc), "unknown_key") from None
        if not record.active:
            raise AdminError(409, f"key {record.name!r} ({record.id}) is already revoked", "already_revoked")
        try:
            record = await keys.revoke_key(self.store, record.id)
        except keys.GatewayKeyError as exc:
            raise AdminError(409, str(exc), "already_revoked") from None
        record.revoked_at = record.revoked_at or time.time()
        return web.json_response(key_json(record), headers=NO_STORE)

    # -- the page ---------------------------------------------------------------------------

    async def dashboard(self, request: web.Request) -> web.StreamResponse:
        """The page itself holds no data: it asks /admin/ (behind the token) once loaded. It is
        behind the token too: without the token or a live session it answers with the refusal's
        status (401; 429 or 503 as the admin API would), its body the page, whose sign-in form a
        browser shows."""
        if not self.settings.admin_token:
            return admin_error(404, "the admin surface is off: start the gateway with --admin-token", "admin_off")
        refusal = await self.gate.check(request)
        headers = dict(_PAGE_HEADERS)
        if refusal is not None and "Retry-After" in refusal.headers:
            headers["Retry-After"] = refusal.headers["Retry-After"]
        return web.Response(
            status=200 if refusal is None else refusal.status,
            body=_asset("dashboard.html"),
            content_type="text/html",
            headers=headers,
        )

    async def asset(self, request: web.Request) -> web.StreamResponse:
        if not self.settings.admin_token:
            return admin_error(404, "the admin surface is off", "admin_off")
        name = request.match_info["asset"]
        suffix = name[name.rfind(".") :] if "." in name else ""
        if suffix not in ASSET_TYPES or not re.fullmatch(r"[a-z0-9-]+\.[a-z]+", name):
            return admin_error(404, "no such asset", "unknown_asset")
        try:
            return web.Response(body=_asset(name), content_type=ASSET_TYPES[suffix], headers=_PAGE_HEADERS)
        except FileNotFoundError:
            return admin_error(404, "no such asset", "unknown_asset")


def _segment_param(raw: str | None) -> str | None:
    """`global`, `user` or a property name (case-insensitive); None for no filter.

    Returns "global" for global budgets; a property that is itself named `global` is asked for
    as `property:global`, which the store gets as the plain name.
    """
    if raw is None or raw == "":
        return None
    prefix = len(PROPERTY_SEGMENT_PREFIX)
    name = raw[prefix:] if raw[:prefix].lower() == PROPERTY_SEGMENT_PREFIX else raw
    if not _SEGMENT.fullmatch(name):
        raise AdminError(400, f"segment must be 'global', 'user' or a property name, not {raw!r}", "invalid_segment")
    if name is not raw:
        return PROPERTY_SEGMENT_PREFIX + name.lower()
    return name.lower()


async def _presented_token(request: web.Request) -> str | web.Response:
    """The token from a JSON body {"token": ...}; else the answer (415, 400)."""
    refusal = json_required(request)
    if refusal is not None:
        return refusal
    try:
        data = await request.json()
    except ValueError:
        data = None
    token = data.get("token") if isinstance(data, dict) else None
    if not isinstance(token, str):
        return admin_error(400, 'body must be JSON: {"token": "<admin token>"}', "invalid_body")
    return token


def _asset(name: str) -> bytes:
    return resources.files("quotagate").joinpath("static", name).read_bytes()
