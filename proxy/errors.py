"""The one exception tree of bol-proxy, and the problem responses it becomes.

    ProxyError                      an answer the proxy gives instead of bol's
    ├── UnknownCredentials          400 unknown-credentials
    ├── BadRequest                  400 bad-request
    ├── NotFound                    404 not-found
    ├── MethodNotAllowed            405 method-not-allowed
    ├── RequestTimeout              408 request-timeout
    ├── BodyTooLarge                413 body-too-large
    ├── RateLimited                 429 rate-limited (+ Retry-After)
    ├── UpstreamUnreachable         502 upstream-unreachable
    ├── TokenUnavailable            503 token-unavailable (+ Retry-After)
    ├── ListenerClosed              503 listener-closed
    └── UpstreamTimeout             504 upstream-timeout

    ConfigError                     invalid configuration: exit status 2, never an HTTP answer
    └── ConfigFileError             a file it names cannot be read: exit status 1
    StartupError                    cannot listen, ...: exit status 1

Each ProxyError knows its status and code (as httpx's exceptions and h11's
``error_status_hint`` do), so the forwarding code raises and a single place renders.
Details are written by the proxy itself and never carry a token, a secret or a header
value: foreign exceptions are translated with a fixed message, not with ``str(exc)``.
"""

from __future__ import annotations

import json
import math
from typing import ClassVar

from aiohttp import web

PROBLEM_TYPE_PREFIX = "urn:bol-proxy:"
PROBLEM_CONTENT_TYPE = "application/problem+json"


class ConfigError(Exception):
    """The configuration is invalid; the message names the key path and the bad value."""


class ConfigFileError(ConfigError):
    """A file named by the configuration cannot be read (exit status 1, not 2: the
    configuration may be right and the file system wrong)."""


class StartupError(Exception):
    """The proxy could not start (a port in use, no C HTTP parser): exit status 1."""


class ProxyError(Exception):
    """An error the proxy answers itself, rendered as an RFC 9457 problem."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal proxy error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def headers(self) -> dict[str, str]:
        """Extra response headers that belong to this error."""
        return {}


class UnknownCredentials(ProxyError):
    status = 400
    code = "unknown-credentials"
    title = "Unknown credential set"


class BadRequest(ProxyError):
    status = 400
    code = "bad-request"
    title = "Bad request"


class NotFound(ProxyError):
    status = 404
    code = "not-found"
    title = "Not found"


class MethodNotAllowed(ProxyError):
    status = 405
    code = "method-not-allowed"
    title = "Method not allowed"


class RequestTimeout(ProxyError):
    status = 408
    code = "request-timeout"
    title = "Request body too slow"


class BodyTooLarge(ProxyError):
    status = 413
    code = "body-too-large"
    title = "Request body too large"


class RateLimited(ProxyError):
    """The set's budget for this endpoint is spent for longer than the request may wait;
    bol was not asked (it would have refused). Retry-After says when budget returns."""

    status = 429
    code = "rate-limited"
    title = "Rate limited"

    def __init__(self, detail: str, retry_after: float,
                 budget: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
        self.budget = budget or {}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": _whole_seconds(self.retry_after), **self.budget}


class UpstreamUnreachable(ProxyError):
    status = 502
    code = "upstream-unreachable"
    title = "Upstream unreachable"


class TokenUnavailable(ProxyError):
    status = 503
    code = "token-unavailable"
    title = "No valid token"

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": _whole_seconds(self.retry_after)}


class ListenerClosed(ProxyError):
    """The request came over a connection whose listener a reload or shutdown closed: a
    port that may have meant another credential set. Answered, then the connection is
    closed; the tool reconnects to the listeners configured now."""

    status = 503
    code = "listener-closed"
    title = "Listener closed"


class UpstreamTimeout(ProxyError):
    status = 504
    code = "upstream-timeout"
    title = "Upstream timeout"


def _whole_seconds(seconds: float) -> str:
    """Retry-After takes whole seconds (RFC 9110 §10.2.3); never advertise 0."""
    return str(max(1, math.ceil(seconds)))


def problem_body(error: ProxyError) -> bytes:
    """The JSON problem document for ``error``, shaped like bol's own problems."""
    return json.dumps(
        {
            "type": PROBLEM_TYPE_PREFIX + error.code,
            "title": error.title,
            "status": error.status,
            "detail": error.detail,
        }
    ).encode()


def problem_response(error: ProxyError) -> web.Response:
    """Render ``error`` as an ``application/problem+json`` response."""
    headers = {"Content-Type": PROBLEM_CONTENT_TYPE, **error.headers()}
    return web.Response(status=error.status, body=problem_body(error), headers=headers)
