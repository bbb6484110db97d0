"""Error types caught at the edge, and the OpenAI-style JSON error body every error response carries."""

from __future__ import annotations

import errno
import http.client
import json

from gevent import GreenletExit

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    501: "invalid_request_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
    505: "invalid_request_error",
}


def error_type(status: int) -> str:
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, code: str, message: str, request_id: str) -> bytes:
    """{"error": {"message", "type", "code", "request_id"}}: what OpenAI SDKs know how to show."""
    return json.dumps(
        {"error": {"message": message, "type": error_type(status), "code": code, "request_id": request_id}}
    ).encode()


# RFC 9110 names where http.client still has the older ones.
_REASONS = {413: "Content Too Large", 414: "URI Too Long"}


def reason_phrase(status: int) -> str:
    return _REASONS.get(status) or http.client.responses.get(status, "Unknown")


def error_response(
    status: int, code: str, message: str, request_id: str, extra_headers=()
) -> tuple[str, list[tuple[str, str]], bytes]:
    """(status line, headers, body) of every error the proxy answers itself: the server layer's
    400/408/413/414/431..., the views' 404/405/500 and the request path's 401/502/503/504."""
    body = error_body(status, code, message, request_id)
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("X-Request-ID", request_id),
        *extra_headers,
    ]
    return f"{status} {reason_phrase(status)}", headers, body


class ClientError(Exception):
    """The client's request is unusable (bad framing, too large, too slow...). Answered, then closed."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class ClientGone(ConnectionResetError):
    """The client closed its connection (EOF while we still needed its bytes)."""

    def __init__(self, reason: str = "client_gone") -> None:
        super().__init__(errno.ECONNRESET, reason)
        self.reason = reason


class ExchangeAborted(GreenletExit):
    """Thrown into a request's greenlet to stop it wherever it waits: the client went away, or the
    total deadline passed. A GreenletExit, so urllib3 does not wrap or retry it and pywsgi closes
    the client connection without logging a traceback."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
