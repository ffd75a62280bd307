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


class BadPath(GatewayError):
    status, type, code = 400, "invalid_request_error", "invalid_path"


class BadBody(GatewayError):
    """A body the gateway must read to meter a call, which it cannot read as the upstream would."""

    status, type, code = 400, "invalid_request_error", "invalid_body"


class EndpointNotAllowed(GatewayError):
    """An endpoint the gateway's own provider key may not reach."""

    status, type, code = 403, "permission_error", "endpoint_not_allowed"


class UnmeteredEndpoint(GatewayError):
    """An endpoint whose cost the gateway cannot read, under a cents or token budget."""

    status, type, code = 403, "permission_error", "unmetered_endpoint"


class BodyTooLarge(GatewayError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class UnsupportedEncoding(GatewayError):
    status, type, code = 415, "invalid_request_error", "unsupported_content_encoding"


class BadRequestHead(GatewayError):
    status, type, code = 400, "invalid_request_error", "malformed_request"


class HeadTooLarge(GatewayError):
    status, type, code = 431, "invalid_request_error", "request_head_too_large"


class TargetTooLong(GatewayError):
    status, type, code = 414, "invalid_request_error", "request_target_too_long"


class RequestTimeout(GatewayError):
    status, type, code = 408, "invalid_request_error", "request_timeout"


class GatewayBusy(GatewayError):
    status, type, code = 503, "gateway_error", "gateway_busy"


class ClientGone(GatewayError):
    """The client closed its connection: the response (499, as nginx logs it) never leaves."""

    status, type, code = 499, "gateway_error", "client_closed_request"


class RateLimited(GatewayError):
    """A 429. `should_retry=False` tells the OpenAI and Anthropic SDKs not to retry it themselves
    (`x-should-retry: false`): waiting is long or pointless, the application decides."""

    status, type, code = 429, "rate_limit_exceeded", "rate_limited"

    def __init__(self, message: str, *, should_retry: bool = True, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.should_retry = should_retry


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
        if not exc.should_retry:
            out["x-should-retry"] = "false"
    if "retry_after" in exc.extra:
        out["Retry-After"] = str(exc.extra["retry_after"])
    return web.Response(status=exc.status, body=error_body(exc), headers=out, content_type="application/json")
