"""Token usage of one exchange, read on the fly from the bytes the proxy forwards.

From the request: ``model`` and ``stream`` of a JSON body (``request_fields``). From the response
(``UsageMeter``): fed every body chunk as it is forwarded (the raw bytes, still content-encoded),
it never holds the body and never delays it; ``result()`` can be read at any time, so a client
that leaves early is billed for what was counted so far.

- ``application/json`` (or ``+json``): the decoded bytes are collected up to ``max_json`` and
  parsed once in ``finish()``. Past the cap only a tail is kept, in which the last top-level-looking
  ``"usage": {...}`` is read (large embedding answers end with their usage).
- ``text/event-stream``: an incremental WHATWG SSE parser (CRLF, LF or CR line ends, also when a
  CRLF is split between two chunks; comments; ``data:`` lines joined with "\\n"; ``event:``) that
  keeps only the current partial line and event; an event larger than ``max_event`` is dropped and
  parsing resyncs at the next blank line. Only events that may carry usage are JSON-parsed: data
  with a ``"usage"`` key that is not ``null``, or Anthropic ``message_start`` / ``message_delta``.
- ``Content-Encoding: gzip`` (or ``deflate``): a copy is inflated incrementally, in bounded steps.
  Other encodings: the meter stays off.

Usage shapes understood: OpenAI chat/completions/embeddings (``prompt_tokens``...,
``prompt_tokens_details.cached_tokens``, ``completion_tokens_details.reasoning_tokens``, also in the
final ``stream_options.include_usage`` chunk), OpenAI Responses (``input_tokens``...,
``response.*`` events), Anthropic (``input_tokens`` -> prompt, ``output_tokens`` -> completion,
``cache_read_input_tokens`` -> cached, ``cache_creation_input_tokens`` -> cache_creation; the
placeholder ``output_tokens`` of ``message_start`` is ignored). Standard library only.
"""

from __future__ import annotations

import json
import zlib

MAX_JSON_BYTES = 1 << 20  # decoded JSON answer parsed whole up to this size
MAX_EVENT_BYTES = 1 << 20  # one SSE event (its data plus the current partial line)
JSON_TAIL_BYTES = 64 << 10  # past MAX_JSON_BYTES, the tail kept to look for the usage object
_INFLATE_STEP = 64 << 10  # most decoded bytes produced per zlib call (bounds a gzip bomb's memory)

FIELDS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_creation_tokens",
    "reasoning_tokens",
)

_BOM = b"\xef\xbb\xbf"
_ANTHROPIC_EVENTS = frozenset((b"message_start", b"message_delta"))
_WS = b" \t\r\n"


def _mimetype(content_type: str | None) -> str:
    if not content_type:
        return ""
    return content_type.partition(";")[0].strip().lower()


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or mimetype.endswith("+json")


def request_fields(body: bytes, content_type: str | None) -> tuple[str | None, bool | None]:
    """(model, stream) of a JSON request body; (None, None) when absent or the body is not JSON."""
    if not body or not _is_json(_mimetype(content_type)):
        return None, None
    try:
        obj = json.loads(body if isinstance(body, bytes | bytearray) else bytes(body))
    except (ValueError, TypeError, RecursionError):
        return None, None
    if not isinstance(obj, dict):
        return None, None
    model = obj.get("model")
    stream = obj.get("stream")
    return (model if isinstance(model, str) else None), (stream if isinstance(stream, bool) else None)


def _int(value: object) -> int | None:
    return value if type(value) is int and value >= 0 else None


def _detail(details: object, key: str) -> int | None:
    return _int(details.get(key)) if isinstance(details, dict) else None


def _first(*values: int | None) -> int | None:
    for value in values:
        if value is not None:
            return value
    return None


def _may_carry_usage(data: bytes) -> bool:
    """A cheap test: some "usage" key that is not null (OpenAI sends "usage":null in every chunk).

    A "usage" in a JSON string is escaped (\\"usage\\"), so every match is a key; a null written
    in another spacing only costs a parse.
    """
    keys = data.count(b'"usage"')
    return keys > 0 and keys != data.count(b'"usage":null') + data.count(b'"usage": null')


def _usage_in_tail(tail: bytes) -> object:
    """The object after the last ``"usage":`` key of a JSON text's tail (None if there is none)."""
    end = len(tail)
    for _ in range(8):  # the last few candidates only: a tail full of "usage" costs nothing
        at = tail.rfind(b'"usage"', 0, end)
        if at < 0:
            return None
        end = at
        before = tail[:at].rstrip(_WS)[-1:]
        rest = tail[at + 7 :].lstrip(_WS)
        if before in (b"{", b",") and rest[:1] == b":":
            rest = rest[1:].lstrip(_WS)
            if rest[:1] == b"{":
                try:
                    return json.JSONDecoder().raw_decode(rest.decode("utf-8", "replace"))[0]
                except (ValueError, RecursionError):
                    pass
    return None


class UsageMeter:
    """Counts the tokens of one response body; ``feed`` every chunk, ``finish``, then ``result``."""

    __slots__ = (
        "_cache_creation",
        "_cached",
        "_completion",
        "_cr",
        "_data",
        "_drop_line",
        "_event",
        "_head",
        "_inflater",
        "_jlen",
        "_kept",
        "_max_event",
        "_max_json",
        "_parts",
        "_pending",
        "_plen",
        "_prompt",
        "_reasoning",
        "_size",
        "_skip",
        "_sse",
        "_start",
        "_total",
        "_wbits",
        "mode",
    )

    def __init__(
        self,
        content_type: str | None,
        content_encoding: str | None,
        *,
        max_json: int = MAX_JSON_BYTES,
        max_event: int = MAX_EVENT_BYTES,
    ) -> None:
        mimetype = _mimetype(content_type)
        #: "sse", "json", or None (not metered, or switched off after an error / finish()).
        self.mode: str | None = (
            "sse" if mimetype == "text/event-stream" else "json" if _is_json(mimetype) else None
        )
        self._sse = self.mode == "sse"
        self._max_json = max_json
        self._max_event = max_event
        self._prompt: int | None = None
        self._completion: int | None = None
        self._total: int | None = None
        self._cached: int | None = None
        self._cache_creation: int | None = None
        self._reasoning: int | None = None
        # content decoding
        encoding = (content_encoding or "").strip().lower()
        self._wbits = 0
        self._inflater = None
        if encoding in ("gzip", "x-gzip"):
            self._wbits = 16 + zlib.MAX_WBITS
        elif encoding == "deflate":
            self._wbits = 32 + zlib.MAX_WBITS  # zlib (what HTTP means) or gzip header, detected
        elif encoding not in ("", "identity"):
            self.mode = None  # br, zstd, stacked codings...: not read
        if self._wbits and self.mode is not None:
            self._inflater = zlib.decompressobj(self._wbits)
        # json mode
        self._parts: list[bytes] = []
        self._jlen = 0  # decoded bytes seen
        self._kept = 0  # bytes in _parts
        # sse mode
        self._start = True  # no byte seen yet (a leading BOM is stripped)
        self._head = b""  # first bytes while they may still be a split BOM
        self._cr = False  # the last chunk ended with CR: an LF starting the next one ends nothing
        self._pending: list[bytes] = []  # the current partial line
        self._plen = 0
        self._drop_line = False  # the current partial line belongs to a dropped event
        self._data: list[bytes] = []  # data lines of the current event
        self._size = 0
        self._event: bytes | None = None
        self._skip = False  # dropping an oversized event until the next blank line

    # -- public -------------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        """One body chunk, as forwarded. Never raises: on any error the meter switches itself off."""
        if self.mode is None or not chunk:
            return
        try:
            if type(chunk) is not bytes:
                chunk = bytes(chunk)
            if self._wbits:
                self._inflate(chunk)
            elif self._sse:
                self._feed_sse(chunk)
            else:
                self._feed_json(chunk)
        except Exception:
            self._off()

    def finish(self) -> None:
        """End of the body: parse the JSON answer (mode json). Later feeds are ignored."""
        try:
            if self.mode == "json":
                if self._jlen <= self._max_json:
                    obj = json.loads(b"".join(self._parts))
                    if isinstance(obj, dict):
                        self._take(obj.get("usage"), False)
                else:
                    self._take(_usage_in_tail(b"".join(self._parts)[-JSON_TAIL_BYTES:]), False)
        except Exception:
            pass
        self._off()

    def result(self) -> dict[str, int | None]:
        """The six counts (None when the upstream sent none); what was counted so far."""
        prompt, completion, total = self._prompt, self._completion, self._total
        if total is None and prompt is not None and completion is not None:
            total = prompt + completion
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": total,
            "cached_tokens": self._cached,
            "cache_creation_tokens": self._cache_creation,
            "reasoning_tokens": self._reasoning,
        }

    # -- internals ----------------------------------------------------------------------------

    def _off(self) -> None:
        self.mode = None
        self._inflater = None
        self._parts = []
        self._pending = []
        self._data = []

    def _inflate(self, chunk: bytes) -> None:
        while chunk:
            inflater = self._inflater
            if inflater is None:
                return  # a corrupt or finished encoding: the rest is ignored
            try:
                out = inflater.decompress(chunk, _INFLATE_STEP)
                while True:
                    if out:
                        if self._sse:
                            self._feed_sse(out)
                        else:
                            self._feed_json(out)
                        if self.mode is None:
                            return
                    if len(out) < _INFLATE_STEP and not inflater.unconsumed_tail:
                        break
                    out = inflater.decompress(inflater.unconsumed_tail, _INFLATE_STEP)
            except zlib.error:
                self._inflater = None
                return
            if not inflater.eof:
                return
            chunk = inflater.unused_data  # another gzip member may follow
            self._inflater = zlib.decompressobj(self._wbits)

    def _feed_json(self, data: bytes) -> None:
        self._jlen += len(data)
        self._parts.append(data)
        self._kept += len(data)
        if self._jlen > self._max_json and self._kept > 2 * JSON_TAIL_BYTES:
            tail = b"".join(self._parts)[-JSON_TAIL_BYTES:]
            self._parts = [tail]
            self._kept = len(tail)

    def _feed_sse(self, data: bytes) -> None:
        if self._start:
            data = self._head + data
            if len(data) < 3 and _BOM.startswith(data):
                self._head = data
                return
            self._start = False
            self._head = b""
            if data.startswith(_BOM):
                data = data[3:]
                if not data:
                    return
        if self._cr:
            self._cr = False
            if data[0] == 10:
                data = data[1:]
                if not data:
                    return
        if b"\r" in data:
            self._cr = data[-1] == 13
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n" not in data:
            self._hold(data)
            return
        if self._pending:
            self._pending.append(data)
            data = b"".join(self._pending)
            self._pending = []
            self._plen = 0
        lines = data.split(b"\n")
        tail = lines.pop()
        if self._drop_line:
            self._drop_line = False
            del lines[0]  # the end of a line that was dropped: not a blank line
        for line in lines:
            if not line:
                if self._skip:
                    self._skip = False
                elif self._data:
                    self._dispatch()
                else:
                    self._event = None
                continue
            if self._skip or line[0] == 58:  # dropping, or a ':' comment
                continue
            colon = line.find(b":")
            if colon < 0:
                field, value = line, b""
            else:
                field = line[:colon]
                value = line[colon + 1 :]
                if value[:1] == b" ":
                    value = value[1:]
            if field == b"data":
                self._data.append(value)
                self._size += len(value) + 1
                if self._size > self._max_event:
                    self._drop(False)
            elif field == b"event":
                self._event = value
        if tail:
            self._hold(tail)

    def _hold(self, piece: bytes) -> None:
        """Keep a partial line (bounded with the event it belongs to)."""
        if self._skip:
            self._drop_line = True
            return
        self._pending.append(piece)
        self._plen += len(piece)
        if self._plen + self._size > self._max_event:
            self._drop(True)

    def _drop(self, mid_line: bool) -> None:
        """Forget the current (oversized) event; resync at the next blank line."""
        self._skip = True
        self._drop_line = mid_line
        self._data = []
        self._size = 0
        self._event = None
        self._pending = []
        self._plen = 0

    def _dispatch(self) -> None:
        parts = self._data
        data = parts[0] if len(parts) == 1 else b"\n".join(parts)
        event = self._event
        self._data = []
        self._size = 0
        self._event = None
        if event in _ANTHROPIC_EVENTS or _may_carry_usage(data):
            try:
                obj = json.loads(data)
            except (ValueError, RecursionError):
                return
            if not isinstance(obj, dict):
                return
            kind = obj.get("type")
            if kind == "message_start" or (kind is None and event == b"message_start"):
                message = obj.get("message")
                if isinstance(message, dict):
                    self._take(message.get("usage"), True)
            elif isinstance(kind, str) and kind.startswith("response."):
                response = obj.get("response")  # OpenAI Responses API events
                if isinstance(response, dict):
                    self._take(response.get("usage"), False)
            else:
                self._take(obj.get("usage"), False)

    def _take(self, usage: object, start: bool) -> None:
        """Merge one usage object: the counts it carries replace earlier ones (they are cumulative)."""
        if not isinstance(usage, dict):
            return
        get = usage.get
        prompt = _first(_int(get("prompt_tokens")), _int(get("input_tokens")))
        completion = None if start else _first(_int(get("completion_tokens")), _int(get("output_tokens")))
        total = None if start else _int(get("total_tokens"))
        cached = _first(
            _detail(get("prompt_tokens_details"), "cached_tokens"),
            _detail(get("input_tokens_details"), "cached_tokens"),
            _int(get("cache_read_input_tokens")),
            _int(get("prompt_cache_hit_tokens")),
        )
        creation = _int(get("cache_creation_input_tokens"))
        reasoning = _first(
            _detail(get("completion_tokens_details"), "reasoning_tokens"),
            _detail(get("output_tokens_details"), "reasoning_tokens"),
        )
        if prompt is not None:
            self._prompt = prompt
        if completion is not None:
            self._completion = completion
        if total is not None:
            self._total = total
        elif prompt is not None or completion is not None:
            self._total = None  # an earlier explicit total no longer matches: recomputed as the sum
        if cached is not None:
            self._cached = cached
        if creation is not None:
            self._cache_creation = creation
        if reasoning is not None:
            self._reasoning = reasoning
