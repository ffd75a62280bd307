"""The gateway's own errors, and the one place where they become HTTP responses.

Bodies are OpenAI-style (`{"error": {"message", "type", "code", ...}}`) so that the OpenAI and
Anthropic SDKs raise their matching exceptions (AuthenticationError, BadRequestError,
RateLimitError, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import orjson
from aiohttp import web


class GatewayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "gateway_error"
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class Unauthorized(GatewayError):
    status, type, code = 401, "authentication_error", "invalid_gateway_key"


class BadPolicy(GatewayError):
    status, type, code = 400, "invalid_request_error", "invalid_rate_limit_policy"


class MissingSegment(GatewayError):
    status, type, code = 400, "invalid_request_error", "missing_segment_value"


class InvalidSegmentValue(GatewayError):
    status, type, code = 400, "invalid_request_error", "invalid_segment_value"


class NotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "unknown_route"


class BodyTooLarge(GatewayError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class RateLimited(GatewayError):
    status, type, code = 429, "rate_limit_exceeded", "rate_limited"


class StoreUnavailable(GatewayError):
    status, type, code = 503, "gateway_error", "store_unavailable"


class UpstreamUnreachable(GatewayError):
    status, type, code = 502, "upstream_error", "upstream_unreachable"


class UpstreamTimeout(GatewayError):
    status, type, code = 504, "upstream_error", "upstream_timeout"


def error_body(exc: GatewayError) -> bytes:
    return orjson.dumps({"error": {"message": exc.message, "type": exc.type, "code": exc.code, **exc.extra}})


def error_response(exc: GatewayError, headers: Mapping[str, str] | None = None) -> web.Response:
    out = dict(headers or {})
    if isinstance(exc, RateLimited):
        out["X-Helicone-Error"] = "rate_limited"
        out["Retry-After"] = str(exc.extra["retry_after"])
    return web.Response(status=exc.status, body=error_body(exc), headers=out, content_type="application/json")
