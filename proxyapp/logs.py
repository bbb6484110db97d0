"""The access log: one JSON line per request, with every credential masked.

Logging setup itself is shared with the syncer (common.jsonlog). Here: how headers, bodies and
queries of one request are made safe to log. The cost depends on the request only, never on the
size of the token table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from common.jsonlog import SECRET_HEADERS, mask_header_value, mask_text
from proxyapp.table_store import Route
from proxyapp.usage import FIELDS as USAGE_FIELDS

access_log = logging.getLogger("proxy.access")
# Between header values: "&", which no mask pattern matches or lets a credential or value run
# past, so every match ends before it as it would at the end of the value; then a NUL, which no
# header value holds (the server refuses it; an upstream value with one takes the one-by-one path)
# and at which no match can start, so the next value is seen as from its start.
_SEPARATOR = "&\x00"


def headers_for_log(headers: Sequence[tuple[str, str]], secrets: tuple[str, ...]) -> dict[str, str]:
    """The headers as a dict (repeated names joined with ", "), every value masked: credential
    headers by their shape, all others by ``mask_text``, in one call over all the values (one call
    per value cost ~1 µs each) joined by a separator no value holds. A match that runs across a
    separator ("WWW-Authenticate: Bearer", then the next value) changes the separator count, and
    the values are then masked one by one, so that each is masked exactly as it would be alone."""
    lowers = [name.lower() for name, _ in headers]
    # Credential headers are masked by their shape below; they stay out of the joined text.
    values = [
        "" if lower in SECRET_HEADERS else value for lower, (_, value) in zip(lowers, headers, strict=True)
    ]
    joined = _SEPARATOR.join(values)
    masked = mask_text(joined, secrets).split(_SEPARATOR) if joined.count("\x00") < len(values) else ()
    if len(masked) != len(values):
        masked = [mask_text(value, secrets) for value in values]
    logged: dict[str, str] = {}
    for (name, value), lower, text in zip(headers, lowers, masked, strict=True):
        if lower in SECRET_HEADERS:
            text = mask_header_value(lower, value)
        previous = logged.get(name)
        logged[name] = text if previous is None else previous + ", " + text
    return logged


def body_for_log(
    data: bytes, total: int, limit: int, secrets: tuple[str, ...], content_encoding: str | None = None
) -> tuple[str | None, bool]:
    """The first ``limit`` bytes of a body as masked text, and whether it was truncated.
    A compressed body is not logged (its bytes mean nothing as text)."""
    if limit <= 0 or total == 0:
        return None, total > 0
    if content_encoding and content_encoding.lower() != "identity":
        return f"[{content_encoding}-encoded body not logged]", True
    text = data[:limit].decode("utf-8", errors="replace")
    return mask_text(text, secrets), total > limit


_PREMASKED = {"premasked": True}


def log_access(record: dict[str, object]) -> None:
    """Write the access line. Every free-text field of ``record`` must already be masked.

    The fields go as the message (a dict, which python-json-logger merges into the line), not as
    ``extra``, which are copied onto the LogRecord and then sorted from its standard attributes
    again by the formatter."""
    access_log.info(record, extra=_PREMASKED)


_NO_USAGE = dict.fromkeys(USAGE_FIELDS)
_NOT_WEBSOCKET: dict[str, object] = {}


@dataclass(slots=True)
class AccessRecord:
    """What one request did: the access line and the metrics are both made from it.

    Built by every path that answers a request: the server layer (a request refused before the
    app saw it), the views (404/405/500) and the request path (``forward.Exchange``), which fills
    it as the exchange goes. Times are ``time.perf_counter()`` values."""

    request_id: str
    method: str | None
    path: str  # percent-decoded; masked when written
    query: str
    client_ip: str
    started: float | None
    status: int = 0
    end_reason: str = "complete"
    error: str | None = None
    ended: float | None = None
    upstream_at: float | None = None  # the upstream's response headers are in
    first_byte_at: float | None = None  # the first body byte went to the client
    request_headers: Sequence[tuple[str, str]] = ()
    response_headers: Sequence[tuple[str, str]] = ()
    request_body: bytes = b""
    response_bytes: int = 0
    response_capture: bytes | bytearray = b""  # the first LOG_BODY_MAX_BYTES of the response body
    route: Route | None = None
    secrets: tuple[str, ...] = ()  # values to mask wherever they appear
    model: str | None = None  # from a JSON request body
    stream: bool | None = None
    usage: dict[str, int | None] | None = None
    limit: str | None = None  # which per-token limit refused it ("concurrency", "rpm", "tpm"), if one did
    usage_estimated: bool = False  # total_tokens is the TPM estimate (bytes / 4), not the upstream's
    websocket: dict[str, object] | None = None  # a WebSocket session's own fields (proxyapp.forward)

    @property
    def model_name(self) -> str:
        return self.route.upstream.model_name if self.route is not None else ""

    @property
    def duration(self) -> float | None:
        return self.ended - self.started if self.ended is not None and self.started is not None else None

    @property
    def ttfb(self) -> float | None:
        first = self.first_byte_at
        return first - self.started if first is not None and self.started is not None else None


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 2) if seconds is not None else None


def write_access(record: AccessRecord, body_limit: int = 0) -> None:
    """The access line of ``record`` (nothing is built when INFO is off), bodies up to ``body_limit``."""
    if not access_log.isEnabledFor(logging.INFO):  # LOG_LEVEL=warn: build nothing
        return
    secrets = record.secrets
    route = record.route
    upstream = route.upstream if route is not None else None
    request_body, request_truncated = body_for_log(
        record.request_body, len(record.request_body), body_limit, secrets
    )
    encoding = None
    for name, value in record.response_headers:
        if name.lower() == "content-encoding":
            encoding = value
    response_body, response_truncated = body_for_log(
        bytes(record.response_capture), record.response_bytes, body_limit, secrets, encoding
    )
    query = record.query
    started = record.started
    log_access(
        {
            "message": "request",
            "request_id": record.request_id,
            "method": record.method,
            "path": mask_text(record.path, secrets),
            "query": mask_text(query, secrets) if query else "",
            "client_ip": record.client_ip,
            "status": record.status,
            "end_reason": record.end_reason,
            "error": mask_text(record.error, secrets) if record.error else None,
            "latency_ms": _ms(record.duration),
            "upstream_ms": _ms(record.upstream_at - started) if record.upstream_at is not None else None,
            "ttfb_ms": _ms(record.ttfb),
            "request_size_bytes": len(record.request_body),
            "response_size_bytes": record.response_bytes,
            "token_id": route.token_id if route is not None else None,
            "ai_model_name": upstream.model_name if upstream is not None else None,
            "upstream": upstream.host if upstream is not None else None,
            "request_headers": headers_for_log(record.request_headers, secrets),
            "response_headers": headers_for_log(record.response_headers, secrets),
            "request_body": request_body,
            "request_body_truncated": request_truncated,
            "response_body": response_body,
            "response_body_truncated": response_truncated,
            "model": record.model,
            "stream": record.stream,
            "limit": record.limit,
            **(record.usage or _NO_USAGE),
            "usage_estimated": record.usage_estimated,
            **(record.websocket or _NOT_WEBSOCKET),
        }
    )
