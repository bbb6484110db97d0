"""What the WebSocket relay learns from the frames it forwards: message counts, where the close
frames are, frame boundaries (so a close frame of our own is only ever sent between frames), and
the token usage of a Realtime or Responses WebSocket session.

``FrameTrack`` is fed a copy of each chunk *after* the chunk was forwarded: parsing never delays a
byte. It reads RFC 6455 §5.2 frame headers and skips payloads by length; only the payloads it needs
are looked at: the first bytes of a text message (its ``"type"``), the whole of a usage message,
and a close frame's code. wsproto's FrameProtocol, which we tried first, decodes every payload
(unmasking, UTF-8, a Frame object and a generator step per frame): 55 µs per 600-byte message,
22% of a core at the benchmark's 4,000 messages/s, and it pushed the median message delay from
13 to 114 ms at 200 sessions; this costs a few µs per message. wsproto still builds our close
frames (proxyapp.websocket) and is the reference the tests check this parser against. A stream
that breaks the framing rules this relies on (RSV bits, reserved opcodes, masking on the wrong
side) switches tracking off for that direction; the bytes still flow unchanged.

permessage-deflate is never in effect: the handshake declines it (proxyapp.websocket), so every
data frame is readable here without a zlib inflater per session.

Usage: ``response.done`` (Realtime: ``response.usage`` with ``input_tokens``, ``output_tokens``,
``total_tokens``, ``input_token_details.cached_tokens``) and ``response.completed`` (Responses:
``input_tokens_details.cached_tokens``, ``output_tokens_details.reasoning_tokens``), summed over the
session. Only text messages whose first ``"type"`` is one of those (or cannot be seen in their first
256 bytes) are collected and parsed; audio deltas and the like are skipped after a look at their
first bytes.
"""

from __future__ import annotations

import json
import re

from wsproto.frame_protocol import FrameProtocol

from proxyapp.usage import FIELDS

MAX_USAGE_MESSAGE = 1 << 20  # a text message longer than this is not parsed for usage
_TYPE_WINDOW = 256  # the first bytes of a message looked at for its "type"
_USAGE_TYPES = frozenset((b"response.done", b"response.completed"))
_USAGE_TYPE_NAMES = frozenset(("response.done", "response.completed"))
# The first complete "type" value of a message (OpenAI's events start with it).
_TYPE_VALUE = re.compile(rb'"type"\s*:\s*"([^"\\]{0,64})"')
_TEXT, _BINARY, _CLOSE = 0x1, 0x2, 0x8
_DATA_OPCODES = frozenset((0x0, 0x1, 0x2))
_CONTROL_OPCODES = frozenset((0x8, 0x9, 0xA))


def _count(value: object) -> int:
    return value if type(value) is int and value >= 0 else 0


def _detail(usage: dict, keys: tuple[str, ...], field: str) -> int | None:
    for key in keys:
        details = usage.get(key)
        if isinstance(details, dict) and type(details.get(field)) is int:
            return _count(details[field])
    return None


class SessionUsage:
    """Token counts of one session, summed over its ``response.done`` / ``response.completed``."""

    __slots__ = ("_collecting", "_parts", "_size", "_skip", "found", "totals")

    def __init__(self) -> None:
        self.totals = dict.fromkeys(FIELDS)
        self.found = False
        self._parts: list[bytes] = []
        self._size = 0
        self._collecting = False
        self._skip = False

    def text(self, piece: bytes, finished: bool) -> None:
        """One piece of a text message's payload, as it arrives (a frame or part of one)."""
        if self._skip:
            if finished:
                self._skip = False
            return
        if not self._collecting:
            # Decided once per message, on its first bytes: an audio delta or a transcript event is
            # dropped here, whatever its size. Until 256 bytes have come, the pieces are kept.
            if self._parts:
                self._parts.append(piece)
                piece = b"".join(self._parts)
                self._parts = []
            if len(piece) < _TYPE_WINDOW and not finished:
                self._parts.append(piece)
                return
            kind = _TYPE_VALUE.search(piece, 0, _TYPE_WINDOW)
            if kind is not None and kind.group(1) not in _USAGE_TYPES:
                self._skip = not finished
                return
            self._collecting = True
            self._size = 0
        self._size += len(piece)
        if self._size > MAX_USAGE_MESSAGE:
            self._parts = []
            self._collecting = False
            self._skip = not finished
            return
        self._parts.append(piece)
        if finished:
            self._parse(b"".join(self._parts))
            self._parts = []
            self._collecting = False

    def _parse(self, text: bytes) -> None:
        try:
            event = json.loads(text)
        except (ValueError, RecursionError):
            return
        if not isinstance(event, dict) or event.get("type") not in _USAGE_TYPE_NAMES:
            return
        response = event.get("response")
        usage = response.get("usage") if isinstance(response, dict) else None
        if not isinstance(usage, dict):
            return
        prompt = usage.get("input_tokens", usage.get("prompt_tokens"))
        completion = usage.get("output_tokens", usage.get("completion_tokens"))
        total = usage.get("total_tokens")
        counts = {
            "prompt_tokens": _count(prompt) if prompt is not None else None,
            "completion_tokens": _count(completion) if completion is not None else None,
            "total_tokens": _count(total) if total is not None else None,
            # Realtime says input_token_details, Responses input_tokens_details.
            "cached_tokens": _detail(usage, ("input_token_details", "input_tokens_details"), "cached_tokens"),
            "reasoning_tokens": _detail(
                usage, ("output_token_details", "output_tokens_details"), "reasoning_tokens"
            ),
        }
        if counts["total_tokens"] is None and prompt is not None and completion is not None:
            counts["total_tokens"] = _count(prompt) + _count(completion)
        totals = self.totals
        for field, value in counts.items():
            if value is not None:
                totals[field] = (totals[field] or 0) + value
        self.found = True

    def result(self) -> dict[str, int | None] | None:
        return dict(self.totals) if self.found else None


class FrameTrack:
    """One direction of a session (``from_client``: masked frames), fed every chunk once forwarded."""

    __slots__ = (
        "_close",
        "_closing",
        "_fin",
        "_from_client",
        "_left",
        "_mask",
        "_partial",
        "_text",
        "_texting",
        "broken",
        "close_code",
        "closed",
        "messages",
        "usage",
    )

    def __init__(self, from_client: bool, usage: SessionUsage | None = None) -> None:
        self._from_client = from_client
        self.usage = usage
        self.messages = 0  # data messages (text or binary) completely forwarded
        self.closed = False  # a close frame went through
        self.close_code: int | None = None
        self.broken = False  # the framing is not understood: counts stop, boundaries unknown
        self._partial = b""  # the start of a frame header cut by the chunk
        self._left = 0  # payload bytes of the current frame still to come
        self._fin = False  # the current frame ends its message
        self._text = False  # the current frame's payload goes to the usage meter
        self._texting = False  # inside a text message (its continuation frames are text too)
        self._closing = False  # the current frame is a close frame
        self._close = b""  # its first payload bytes (the code), still masked
        self._mask = b""

    def feed(self, data: bytes) -> None:
        if self.broken or self.closed:
            return
        if self._partial:
            data = self._partial + data
            self._partial = b""
        pos = 0
        end = len(data)
        while pos < end:
            left = self._left
            if left:
                stop = pos + left if left < end - pos else end
                if self._text:
                    self.usage.text(data[pos:stop], stop - pos == left and self._fin)
                elif self._closing and len(self._close) < 2:
                    self._close += data[pos : min(stop, pos + 2 - len(self._close))]
                self._left = left - (stop - pos)
                pos = stop
                if not self._left:
                    self._frame_end()
                continue
            if end - pos < 2:
                self._partial = data[pos:]
                return
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            size = 2 if length < 126 else 4 if length == 126 else 10
            masked = b1 & 0x80
            if masked:
                size += 4
            if end - pos < size:
                self._partial = data[pos:]
                return
            opcode = b0 & 0x0F
            if b0 & 0x70 or bool(masked) is not self._from_client:
                self.broken = True  # RSV bits (an extension we declined) or masking on the wrong side
                return
            if length == 126:
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            elif length == 127:
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
            fin = bool(b0 & 0x80)
            if opcode in _DATA_OPCODES:
                if opcode:
                    self._texting = opcode == _TEXT
                self._text = self._texting and self.usage is not None
                self._closing = False
            elif opcode in _CONTROL_OPCODES:
                self._text = False
                self._closing = opcode == _CLOSE
                if self._closing and masked:
                    self._mask = data[pos + size - 4 : pos + size]
            else:
                self.broken = True
                return
            self._fin = fin if opcode in _DATA_OPCODES else False
            pos += size
            self._left = length
            if not length:
                if self._text:
                    self.usage.text(b"", fin)
                self._frame_end()

    def _frame_end(self) -> None:
        if self._closing:
            self.closed = True
            code = self._close
            if len(code) == 2:
                if self._mask:
                    code = bytes((code[0] ^ self._mask[0], code[1] ^ self._mask[1]))
                self.close_code = int.from_bytes(code, "big")
            self._closing = False
        elif self._fin:
            self.messages += 1
            self._texting = False
        self._text = False

    @property
    def at_boundary(self) -> bool:
        """Every byte forwarded so far ends a frame: a frame of our own can be sent now."""
        return not self.broken and not self.closed and not self._left and not self._partial


def close_frame(code: int, reason: str, *, to_client: bool) -> bytes:
    """A close frame; masked (as a client's must be) when it goes to the upstream."""
    return bytes(FrameProtocol(client=not to_client, extensions=[]).close(code, reason))
