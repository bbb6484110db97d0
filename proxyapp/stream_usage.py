"""STREAM_USAGE=request: ask OpenAI-style streams for their usage, and hide the answer the client
did not ask for.

``with_include_usage`` rewrites a request body: ``"stream": true`` on a (chat) completions path
without ``stream_options.include_usage: true`` gets it. The body is edited in place as text (one
parse, by the json module's own scanner, to find where its members are): every other member, its
spacing, order and escapes stay byte-identical; only ``stream_options`` is appended (absent) or
re-written (present: its other members kept, compact JSON).

``UsageChunkFilter`` removes the one usage-only chunk (``"choices": []`` and a ``usage`` object) the
upstream then adds before ``data: [DONE]``. Complete events pass at once unless they contain that
``"choices":[]`` shape; a partial event (cut between two reads) is held back only until its bytes
show it is not that chunk (a ``"choices"`` member that is not empty), so no other event waits.
"""

from __future__ import annotations

import json
import re

PASSTHROUGH = "passthrough"
REQUEST = "request"

_PATHS = ("/chat/completions", "/completions")
_SCAN = json.JSONDecoder().scan_once  # the C scanner: (value, end) of the JSON value at an index
_WS = re.compile(r"[ \t\n\r]*")
_INCLUDE = '"include_usage":true'

# The usage-only chunk's marker, in the spacings upstreams write (compact, and Python's default).
_EMPTY_CHOICES = (b'"choices":[]', b'"choices": []')
_USAGE_OBJECT = (b'"usage":{', b'"usage": {')
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n")
# A blank line (an SSE event's end): two line ends, each CRLF, LF, or a CR not followed by LF.
_BOUNDARY = re.compile(rb"(?:\r\n|\r(?!\n)|\n){2}")
_CHOICES_VALUE = re.compile(rb'"choices"\s*:\s*\[\s*(.)', re.S)
HOLD_MAX = 64 << 10  # a partial event still undecided past this size is let through


def applies(path: str) -> bool:
    return path.endswith(_PATHS)


def with_include_usage(body: bytes) -> bytes | None:
    """The body asking for usage, or None when it must go unchanged: not a JSON object, not
    ``"stream": true``, usage already asked for, or a ``stream_options`` that is not an object."""
    if b'"stream"' not in body or b"true" not in body:  # cheap: most bodies stop here
        return None
    try:
        text = body.decode("utf-8")
        members = _top_level_members(text)
    except (ValueError, RecursionError, StopIteration):
        return None
    if members is None:
        return None
    stream = members.get("stream")
    if stream is None or stream[0] is not True:
        return None
    options = members.get("stream_options")
    if options is None:  # appended before the closing brace (an object with "stream" is not empty)
        end = text.rstrip(" \t\n\r")
        return (end[:-1] + ',"stream_options":{' + _INCLUDE + "}" + text[len(end) - 1 :]).encode()
    value, start, stop = options
    if value is None:
        replacement = "{" + _INCLUDE + "}"
    elif isinstance(value, dict):
        if value.get("include_usage") is True:
            return None  # the client asked: nothing to add, nothing to remove
        replacement = json.dumps({**value, "include_usage": True}, ensure_ascii=False, separators=(",", ":"))
    else:
        return None  # not ours to fix: the upstream answers it as it would without us
    return (text[:start] + replacement + text[stop:]).encode()


def _top_level_members(text: str) -> dict[str, tuple[object, int, int]] | None:
    """name -> (value, start, end) of a JSON object's members (the last of a repeated name, as
    json.loads keeps it); None when the text is not one JSON object."""
    at = _WS.match(text, 0).end()
    if text[at : at + 1] != "{":
        return None
    members: dict[str, tuple[object, int, int]] = {}
    at = _WS.match(text, at + 1).end()
    if text[at : at + 1] == "}":
        return members if not text[at + 1 :].strip(" \t\n\r") else None
    while True:
        if text[at : at + 1] != '"':
            return None
        name, at = _SCAN(text, at)
        at = _WS.match(text, at).end()
        if text[at : at + 1] != ":":
            return None
        start = _WS.match(text, at + 1).end()
        value, end = _SCAN(text, start)
        members[name] = (value, start, end)
        at = _WS.match(text, end).end()
        sep = text[at : at + 1]
        if sep == "}":
            return members if not text[at + 1 :].strip(" \t\n\r") else None
        if sep != ",":
            return None
        at = _WS.match(text, at + 1).end()


def is_usage_only(event: bytes) -> bool:
    """An SSE event whose data is a chunk with ``"choices": []`` and a ``usage`` object. Judged on
    the bytes (a key inside a JSON string is escaped, so these are keys): the meter parses the
    same event right after, once is enough."""
    return (_EMPTY_CHOICES[0] in event or _EMPTY_CHOICES[1] in event) and (
        _USAGE_OBJECT[0] in event or _USAGE_OBJECT[1] in event
    )


def _not_usage_only(partial: bytes) -> bool:
    """A partial event's bytes already show a non-empty ``choices`` (so it can be forwarded)."""
    found = _CHOICES_VALUE.search(partial)
    return found is not None and found.group(1) != b"]"


class UsageChunkFilter:
    """Fed the upstream's (identity-encoded) event-stream bytes, returns what the client gets."""

    __slots__ = ("_ctx", "_eat_lf", "_held", "_passing", "_quiet", "removed")

    def __init__(self) -> None:
        self._held = b""  # the start of the current event, not sent: it may be the usage chunk
        self._passing = False  # the current event's start was sent: the rest of it follows
        self._ctx = b""  # the stream's last bytes before the current data (a split blank line)
        self._eat_lf = False  # a removed event ended with CR at the end of a read: its LF follows
        self._quiet = True  # none of the three above: the stream stands between two events
        self.removed = 0

    def feed(self, chunk: bytes, _ends=_EVENT_ENDS, _empty=_EMPTY_CHOICES) -> bytes:
        if self._quiet and chunk.endswith(_ends) and _empty[0] not in chunk and _empty[1] not in chunk:
            self._ctx = b"\n\n"  # what ended before the next read: a blank line
            return chunk  # whole events, none of them the usage chunk: the common case
        if self._eat_lf and chunk:
            self._eat_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if not chunk:
                    self._quiet = not self._held and not self._passing
                    return b""
        out = self._slow(chunk)
        self._quiet = not self._held and not self._passing and not self._eat_lf
        return out

    def flush(self) -> bytes:
        """At the end of the body: what is still held goes out (a stream cut inside an event)."""
        held, self._held = self._held, b""
        return held

    def _slow(self, chunk: bytes) -> bytes:
        data = self._held + chunk if self._held else chunk
        self._held = b""
        ctx = self._ctx
        shift = len(ctx)
        out: list[bytes] = []
        pos = 0
        for match in _BOUNDARY.finditer(ctx + data if ctx else data):
            end = match.end() - shift
            if end <= pos:
                continue  # a blank line already seen with the previous bytes
            event = data[pos:end]
            if self._passing:
                self._passing = False
                out.append(event)
            elif is_usage_only(event):
                self.removed += 1
                self._eat_lf = end == len(data) and event[-1:] == b"\r"
            else:
                out.append(event)
            pos = end
        tail = data[pos:]
        if tail:
            if self._passing or _not_usage_only(tail) or len(tail) > HOLD_MAX:
                self._passing = True
                out.append(tail)
            else:
                self._held = tail
        self._ctx = (ctx + data[: len(data) - len(self._held)])[-3:]
        return b"".join(out)


def stripped(chunks, usage_filter: UsageChunkFilter, meter):
    """The client's side of ``chunks``: the meter is fed each upstream chunk (the usage chunk
    included) after what it became was sent, as in forward.Exchange._stream."""
    feed = usage_filter.feed
    for chunk in chunks:
        out = feed(chunk)
        if out:
            yield out
        if meter is not None:
            meter.feed(chunk)
    rest = usage_filter.flush()
    if rest:
        yield rest
