"""The admin JSON API under /admin/ and the dashboard page, behind the admin token.

Without an admin token the whole surface answers 404: it is off.
"""

from __future__ import annotations

import hmac
from dataclasses import asdict
from importlib import resources
from typing import Any

from aiohttp import web

from . import keys
from .config import Settings
from .policy import PolicyError, Unit, format_quota
from .stores import BudgetUsage, Denial, KeyRecord, Store, StoreError

COOKIE = "quotagate_admin"


def token_matches(request: web.Request, token: str | None) -> bool:
    """The request carries the admin token (bearer header or the dashboard's cookie)."""
    if not token:
        return False
    header = request.headers.get("Authorization", "")
    presented = header[7:].strip() if header[:7].lower() == "bearer " else request.cookies.get(COOKIE, "")
    return hmac.compare_digest(presented.encode(), token.encode())


def _error(status: int, message: str, code: str) -> web.Response:
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    return web.json_response({"error": {"message": message, "type": kind, "code": code}}, status=status)


def add_admin_routes(app: web.Application, settings: Settings, store: Store) -> None:
    api = AdminApi(settings, store)
    app.router.add_get("/dashboard", api.dashboard)
    app.router.add_get("/dashboard/{asset}", api.asset)
    app.router.add_get("/admin/budgets", api.budgets)
    app.router.add_get("/admin/denials", api.denials)
    app.router.add_get("/admin/keys", api.list_keys)
    app.router.add_post("/admin/keys", api.create_key)
    app.router.add_delete("/admin/keys/{key}", api.revoke_key)
    app.router.add_route("*", "/admin/{tail:.*}", api.not_found)


def budget_json(item: BudgetUsage) -> dict[str, Any]:
    scale = Unit(item.unit).scale
    data = asdict(item)
    data.update(
        quota=item.quota / scale,
        used=item.used / scale,
        held=item.held / scale,
        ratio=round(item.ratio, 4),
        quota_text=format_quota_scaled(item.quota, scale),
    )
    return data


def format_quota_scaled(value: int, scale: int) -> str:
    from decimal import Decimal

    return format_quota(Decimal(value) / scale)


def key_json(record: KeyRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "name": record.name,
        "policies": record.policies,
        "created_at": record.created_at,
        "revoked_at": record.revoked_at,
        "active": record.active,
    }


class AdminApi:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store

    def _guard(self, request: web.Request) -> web.Response | None:
        if not self.settings.admin_token:
            return _error(404, "the admin surface is off: start the gateway with --admin-token", "admin_off")
        if not token_matches(request, self.settings.admin_token):
            return _error(
                401, "admin token required: send 'Authorization: Bearer <admin token>'", "admin_token_required"
            )
        return None

    async def not_found(self, request: web.Request) -> web.Response:
        return self._guard(request) or _error(404, f"no admin route {request.path}", "unknown_route")

    async def budgets(self, request: web.Request) -> web.Response:
        if denied := self._guard(request):
            return denied
        q = request.query
        try:
            limit = min(500, max(1, int(q.get("limit", 100))))
            offset = max(0, int(q.get("offset", 0)))
        except ValueError:
            return _error(400, "limit and offset must be integers", "invalid_parameter")
        key_id = await self._key_id(q.get("key"))
        segment = q.get("segment")
        segment = {"global": None, "": None}.get(segment, segment) if segment is not None else None
        try:
            items = await self.store.usage(
                key_id=key_id, segment=segment, value=q.get("value"), limit=limit, offset=offset
            )
        except StoreError as exc:
            return _error(503, f"store unreachable: {exc}", "store_unavailable")
        if q.get("segment") == "global":
            items = [i for i in items if i.segment is None]
        return web.json_response({"budgets": [budget_json(i) for i in items], "limit": limit, "offset": offset})

    async def _key_id(self, name_or_id: str | None) -> str | None:
        if not name_or_id:
            return None
        try:
            return (await keys.find_key(self.store, name_or_id)).id
        except keys.KeyError_:
            return name_or_id

    async def denials(self, request: web.Request) -> web.Response:
        if denied := self._guard(request):
            return denied
        items: list[Denial] = await self.store.denials(limit=min(500, int(request.query.get("limit", 50))))
        return web.json_response({"denials": [asdict(d) for d in items]})

    async def list_keys(self, request: web.Request) -> web.Response:
        if denied := self._guard(request):
            return denied
        return web.json_response({"keys": [key_json(k) for k in await self.store.list_keys()]})

    async def create_key(self, request: web.Request) -> web.Response:
        if denied := self._guard(request):
            return denied
        try:
            data = await request.json()
        except ValueError:
            return _error(400, 'body must be JSON: {"name": ..., "policies": [...]}', "invalid_body")
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return _error(400, "body must be JSON with a string 'name'", "invalid_body")
        policies = data.get("policies") or []
        if isinstance(policies, str):
            policies = [policies]
        try:
            raw, record = await keys.create_key(self.store, data["name"], list(policies))
        except (keys.KeyError_, PolicyError) as exc:
            return _error(400, str(exc), "invalid_key")
        return web.json_response({"key": raw, **key_json(record)}, status=201)

    async def revoke_key(self, request: web.Request) -> web.Response:
        if denied := self._guard(request):
            return denied
        try:
            record = await keys.revoke_key(self.store, request.match_info["key"])
        except keys.KeyError_ as exc:
            return _error(404, str(exc), "unknown_key")
        return web.json_response(key_json(record))

    async def dashboard(self, request: web.Request) -> web.StreamResponse:
        if not self.settings.admin_token:
            return _error(404, "the admin surface is off: start the gateway with --admin-token", "admin_off")
        return web.Response(body=_asset("dashboard.html"), content_type="text/html")

    async def asset(self, request: web.Request) -> web.StreamResponse:
        if not self.settings.admin_token:
            return _error(404, "the admin surface is off", "admin_off")
        name = request.match_info["asset"]
        types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
        suffix = name[name.rfind(".") :] if "." in name else ""
        if suffix not in types or "/" in name:
            return _error(404, "no such asset", "unknown_asset")
        try:
            return web.Response(body=_asset(name), content_type=types[suffix])
        except FileNotFoundError:
            return _error(404, "no such asset", "unknown_asset")


def _asset(name: str) -> bytes:
    return resources.files("quotagate").joinpath("static", name).read_bytes()
