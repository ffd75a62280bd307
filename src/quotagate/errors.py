"""The gateway's own errors, and the one place where they become HTTP responses.

Bodies are OpenAI-style (`{"error": {"message", "type", "code", ...}}`) so that the OpenAI and
Anthropic SDKs raise their matching exceptions (AuthenticationError, BadRequestError,
RateLimitError, ...). The `type` follows from the status (`ERROR_TYPES`). Proxied calls get
`error_response`; the admin surface (/admin/, /dashboard, a /metrics that wants the token) gets
`admin_response`, the same fields as aiohttp's json_response writes them, never cached.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_exceeded",
    499: "gateway_error",
    500: "gateway_error",
    502: "upstream_error",
    503: "gateway_error",
    504: "upstream_error",
}  # any other status: invalid_request_error


class GatewayError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "invalid_request_error")


class Unauthorized(GatewayError):
    status, code = 401, "invalid_gateway_key"


class BadPolicy(GatewayError):
    status, code = 400, "invalid_rate_limit_policy"


class MissingSegment(GatewayError):
    status, code = 400, "missing_segment_value"


class InvalidSegmentValue(GatewayError):
    status, code = 400, "invalid_segment_value"


class NotFound(GatewayError):
    status, code = 404, "unknown_route"


class BadPath(GatewayError):
    status, code = 400, "invalid_path"


class BadBody(GatewayError):
    """A body the gateway must read to meter a call, which it cannot read as the upstream would."""

    status, code = 400, "invalid_body"


class EndpointNotAllowed(GatewayError):
    """An endpoint the gateway's own provider key may not reach."""

    status, code = 403, "endpoint_not_allowed"


class UnmeteredEndpoint(GatewayError):
    """An endpoint whose cost the gateway cannot read, under a cents or token budget."""

    status, code = 403, "unmetered_endpoint"


class BodyTooLarge(GatewayError):
    status, code = 413, "request_too_large"


class UnsupportedEncoding(GatewayError):
    status, code = 415, "unsupported_content_encoding"


class BadRequestHead(GatewayError):
    status, code = 400, "malformed_request"


class HeadTooLarge(GatewayError):
    status, code = 431, "request_head_too_large"


class TargetTooLong(GatewayError):
    status, code = 414, "request_target_too_long"


class RequestTimeout(GatewayError):
    status, code = 408, "request_timeout"


class GatewayBusy(GatewayError):
    status, code = 503, "gateway_busy"


class ClientGone(GatewayError):
    """The client closed its connection: the response (499, as nginx logs it) never leaves."""

    status, code = 499, "client_closed_request"


class RateLimited(GatewayError):
    """A 429. `should_retry=False` tells the OpenAI and Anthropic SDKs not to retry it themselves
    (`x-should-retry: false`): waiting is long or pointless, the application decides."""

    status, code = 429, "rate_limited"

    def __init__(self, message: str, *, should_retry: bool = True, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.should_retry = should_retry


class StoreUnavailable(GatewayError):
    status, code = 503, "store_unavailable"


class UpstreamUnreachable(GatewayError):
    status, code = 502, "upstream_unreachable"


class UpstreamTimeout(GatewayError):
    status, code = 504, "upstream_timeout"


class AdminError(GatewayError):
    """An answer of the admin surface, its status and code given where it is raised."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def error_body(exc: GatewayError) -> bytes:
    body = {"error": {"message": exc.message, "type": exc.type, "code": exc.code, **exc.extra}}
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:  # client text that is not UTF-8 (aiohttp's lone surrogates), echoed
        return orjson.dumps(_utf8(body))


def _utf8(value: Any) -> Any:
    """Strings as UTF-8 can carry them: a byte that is not UTF-8 shown as its escape (`\\udcff`)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {k: _utf8(v) for k, v in value.items()}
    return value


def error_response(exc: GatewayError, headers: Mapping[str, str] | None = None) -> web.Response:
    out = dict(headers or {})
    if isinstance(exc, RateLimited):
        out["X-Helicone-Error"] = "rate_limited"
        if not exc.should_retry:
            out["x-should-retry"] = "false"
    if "retry_after" in exc.extra:
        out["Retry-After"] = str(exc.extra["retry_after"])
    return web.Response(status=exc.status, body=error_body(exc), headers=out, content_type="application/json")


NO_STORE = {"Cache-Control": "no-store"}


def admin_response(exc: GatewayError, headers: Mapping[str, str] | None = None) -> web.Response:
    body = {"error": {"message": exc.message, "type": exc.type, "code": exc.code}}
    return web.json_response(body, status=exc.status, headers={**NO_STORE, **(headers or {})})


def admin_error(status: int, message: str, code: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return admin_response(AdminError(status, message, code), headers)
