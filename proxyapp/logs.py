"""The access log: one JSON line per request, with every credential masked.

Logging setup itself is shared with the syncer (common.jsonlog). Here: how headers, bodies and
queries of one request are made safe to log. The cost depends on the request only, never on the
size of the token table.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from common.jsonlog import SECRET_HEADERS, mask_header_value, mask_text

access_log = logging.getLogger("proxy.access")


def headers_for_log(headers: Iterable[tuple[str, str]], secrets: tuple[str, ...]) -> dict[str, str]:
    logged: dict[str, str] = {}
    for name, value in headers:
        lower = name.lower()
        masked = mask_header_value(lower, value) if lower in SECRET_HEADERS else mask_text(value, secrets)
        previous = logged.get(name)
        logged[name] = masked if previous is None else previous + ", " + masked
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


def log_access(record: dict[str, object]) -> None:
    """Write the access line. Every free-text field of ``record`` must already be masked."""
    record["premasked"] = True
    access_log.info("request", extra=record)


def log_rejected_request(handler, err, request_id: str) -> None:
    """The access line for a request the server layer refused before the app saw it."""
    address = handler.client_address
    log_access(
        {
            "request_id": request_id,
            "method": getattr(handler, "command", None),
            "path": mask_text(getattr(handler, "raw_path", "") or "", ()),
            "client_ip": address[0] if isinstance(address, tuple) else str(address),
            "status": err.status,
            "end_reason": "bad_request",
            "error": err.message,
        }
    )
