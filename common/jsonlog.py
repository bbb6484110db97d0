"""JSON-lines logging (python-json-logger) and the masking of credentials, for both processes.

Every line is one JSON object on stdout. Secrets are masked before they are logged (see
``mask_secret`` and ``mask_text``); as a last net, the formatter masks anything key-shaped left in
the finished line.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.orjson import OrjsonFormatter

LEVELS = {"debug": "DEBUG", "info": "INFO", "warn": "WARNING", "warning": "WARNING", "error": "ERROR"}

ELLIPSIS = "\u2026"

# Key-shaped strings: OpenAI/DeepSeek/Anthropic style keys, JWTs, bearer credentials, and
# credential-named query or JSON members. The known secrets of a request are masked exactly too.
_KEY_SHAPED = re.compile(
    r"(?P<key>\b(?:sk|pk|rk|ak)-[A-Za-z0-9_\-]{8,})"
    r"|(?P<jwt>\beyJ[A-Za-z0-9_\-]{6,}\.[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]*)"
    r"|(?P<bearer>(?i:bearer)\s+)(?P<credential>[^\s\"',;&\\<>]{6,})"
    # credential-named members: query style (api_key=...) or JSON style ("api_key": "...")
    r"|(?P<named>(?<![A-Za-z0-9])(?i:api[_-]?key|access[_-]?token|auth[_-]?token|token|secret|password"
    r"|passwd|key)(?:=|\\?[\"']\s*:\s*\\?[\"']))(?P<value>[^\s\"'&,;}\\]{4,})"
)


def mask_secret(secret: str) -> str:
    """``sk-6d…e935`` for long secrets; short ones show less, tiny ones nothing."""
    if len(secret) >= 20:
        return secret[:5] + ELLIPSIS + secret[-4:]
    if len(secret) >= 10:
        return secret[:3] + ELLIPSIS
    return ELLIPSIS


def _mask_match(match: re.Match[str]) -> str:
    if match.group("key"):
        return mask_secret(match.group("key"))
    if match.group("jwt"):
        return mask_secret(match.group("jwt"))
    if match.group("credential"):
        return match.group("bearer") + mask_secret(match.group("credential"))
    return match.group("named") + mask_secret(match.group("value"))


# Every match of _KEY_SHAPED contains one of these hints (lower-cased); a match can only start at
# these offsets before the hint ("access_token" starts 7 before its "token").
_HINT_OFFSETS = {
    "k-": (1,),
    "eyj": (0,),
    "bearer": (0,),
    "key": (0, 3, 4),
    "token": (0, 4, 5, 6, 7),
    "secret": (0,),
    "passw": (0,),
}


def mask_key_shaped(text: str) -> str:
    """Mask key-shaped strings; the same result as ``_KEY_SHAPED.sub(_mask_match, text)``.

    The regex costs ~40 ns per character when scanned over a whole text. Here it is only tried
    at the few positions where a match can start, found with str.find.
    """
    lowered = text.lower()
    if len(lowered) != len(text):  # a few characters change length when lower-cased
        return _KEY_SHAPED.sub(_mask_match, text)
    starts: set[int] = set()
    for hint, offsets in _HINT_OFFSETS.items():
        index = lowered.find(hint)
        while index != -1:
            starts.update(index - offset for offset in offsets if index >= offset)
            index = lowered.find(hint, index + 1)
    if not starts:
        return text
    pieces = []
    done = 0
    match_at = _KEY_SHAPED.match
    for start in sorted(starts):
        if start < done:
            continue
        match = match_at(text, start)
        if match is not None:
            pieces.append(text[done:start])
            pieces.append(_mask_match(match))
            done = match.end()
    if not pieces:
        return text
    pieces.append(text[done:])
    return "".join(pieces)


def mask_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask the given secrets wherever they appear in ``text``, then anything key-shaped."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, mask_secret(secret))
    return mask_key_shaped(text)


_AUTH_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9._-]*)(\s+)(.*)$", re.DOTALL)
_COOKIE_VALUE = re.compile(r"=([^;]*)")


def mask_header_value(name_lower: str, value: str) -> str:
    """Mask the value of a credential-bearing header (name already lower-cased)."""
    if name_lower in ("authorization", "proxy-authorization"):
        match = _AUTH_SCHEME.match(value)
        if match:
            return match.group(1) + match.group(2) + mask_secret(match.group(3))
        return mask_secret(value)
    if name_lower in ("cookie", "set-cookie"):
        return _COOKIE_VALUE.sub(lambda m: "=" + mask_secret(m.group(1)), value)
    return mask_secret(value)


SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "api-key", "cookie", "set-cookie"}
)


class MaskingJsonFormatter(OrjsonFormatter):
    """python-json-logger's orjson formatter (the stdlib encoder cost a quarter of the line), whose
    finished line is passed through the key-shaped mask as a last net.

    Records flagged ``premasked`` (the access lines, whose free-text fields were each masked when
    the record was built) skip the net: on a 4 KiB line it would cost more than the request."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if getattr(record, "premasked", False):
            return line
        return mask_key_shaped(line)


def setup(level: str, service: str, stream=None, handler: logging.Handler | None = None) -> logging.Logger:
    """Route the root logger to one JSON line per record on stdout (or through ``handler``: the
    worker's buffered writer); return the service logger."""
    # The logging HOWTO's "Optimization": no caller lookup (a stack walk per record), no thread
    # or process names; none of them is in our lines, and the worker logs once per request.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if handler is None:
        handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(
        MaskingJsonFormatter(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            static_fields={"service": service, "pid": os.getpid()},
            reserved_attrs=[*RESERVED_ATTRS, "premasked"],
            timestamp="time",
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS.get(level, "INFO"))
    # urllib3's debug lines carry full upstream URLs (query strings may hold keys) and know
    # nothing of the request's secrets: keep them off even at LOG_LEVEL=debug.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    return logging.getLogger(service)
