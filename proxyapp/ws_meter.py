"""What the WebSocket relay learns from the frames it forwards: message counts, where the close
frames are, frame boundaries (so a close frame of our own is only ever sent between frames), and
the token usage of a Realtime or Responses WebSocket session.

Frames are parsed by wsproto's ``FrameProtocol`` (pinned in requirements.txt), fed a copy of each
chunk *after* the chunk was forwarded: parsing never delays a byte. A stream wsproto cannot parse
(a protocol error, an extension's RSV bits) switches tracking off for that direction; the bytes
still flow unchanged.

permessage-deflate is never in effect: the handshake declines it (proxyapp.websocket), so every
data frame is readable here without a zlib inflater per session.

Usage: ``response.done`` (Realtime: ``response.usage`` with ``input_tokens``, ``output_tokens``,
``total_tokens``, ``input_token_details.cached_tokens``) and ``response.completed`` (Responses:
``input_tokens_details.cached_tokens``, ``output_tokens_details.reasoning_tokens``), summed over the
session. Only text messages whose first ``"type"`` is one of those (or cannot be seen in their first
256 characters) are collected and parsed; audio deltas and the like are skipped after a look at
their first characters.
"""

from __future__ import annotations

import json
import re

from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

from proxyapp.usage import FIELDS

MAX_USAGE_MESSAGE = 1 << 20  # a text message longer than this is not parsed for usage
_TYPE_WINDOW = 256  # the first characters of a message looked at for its "type"
_USAGE_TYPES = frozenset(("response.done", "response.completed"))
# The first complete "type" value of a message (OpenAI's events start with it).
_TYPE_VALUE = re.compile(r'"type"\s*:\s*"([^"\\]{0,64})"')
_CLOSE = Opcode.CLOSE
_TEXT = Opcode.TEXT


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
        self._parts: list[str] = []
        self._size = 0
        self._collecting = False
        self._skip = False

    def text(self, piece: str, finished: bool) -> None:
        """One piece of a text message (wsproto's decoded payload of one frame or part of it)."""
        if self._skip:
            if finished:
                self._skip = False
            return
        self._parts.append(piece)
        self._size += len(piece)
        if not self._collecting and (self._size >= _TYPE_WINDOW or finished):
            # Decided once per message, on its first characters: an audio delta or a transcript
            # event is dropped here, whatever its size. Until then the pieces are kept.
            head = "".join(self._parts)[:_TYPE_WINDOW]
            kind = _TYPE_VALUE.search(head)
            if kind is not None and kind.group(1) not in _USAGE_TYPES:
                self._parts = []
                self._size = 0
                self._skip = not finished
                return
            self._collecting = True
        if self._size > MAX_USAGE_MESSAGE:
            self._parts = []
            self._size = 0
            self._collecting = False
            self._skip = not finished
            return
        if finished:
            self._parse("".join(self._parts))
            self._parts = []
            self._size = 0
            self._collecting = False

    def _parse(self, text: str) -> None:
        try:
            event = json.loads(text)
        except (ValueError, RecursionError):
            return
        if not isinstance(event, dict) or event.get("type") not in _USAGE_TYPES:
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
    """One direction of a session: fed every chunk after it was forwarded."""

    __slots__ = ("_decoder", "_proto", "broken", "close_code", "closed", "messages", "usage")

    def __init__(self, from_client: bool, usage: SessionUsage | None = None) -> None:
        # wsproto's "client" parses what a client receives: the server's unmasked frames.
        self._proto = FrameProtocol(client=not from_client, extensions=[])
        self._decoder = self._proto._frame_decoder
        self.usage = usage
        self.messages = 0  # data messages (text or binary) completely forwarded
        self.closed = False  # a close frame went through
        self.close_code: int | None = None
        self.broken = False  # not parseable: counts stop, boundaries unknown

    def feed(self, data: bytes) -> None:
        if self.broken or self.closed:
            return
        proto = self._proto
        try:
            proto.receive_bytes(data)
            for frame in proto.received_frames():
                opcode = frame.opcode
                if opcode is _CLOSE:
                    self.closed = True
                    self.close_code = int(frame.payload[0])
                elif opcode.iscontrol():
                    continue
                else:
                    if frame.message_finished:
                        self.messages += 1
                    if opcode is _TEXT and self.usage is not None:
                        self.usage.text(frame.payload, frame.message_finished)
        except (ParseFailed, ValueError, TypeError, IndexError):
            self.broken = True

    @property
    def at_boundary(self) -> bool:
        """Every byte forwarded so far ends a frame: a frame of our own can be sent now."""
        decoder = self._decoder  # wsproto 1.3.2 internals: no frame header pending, nothing buffered
        return not self.broken and not self.closed and decoder.header is None and len(decoder.buffer) == 0


def close_frame(code: int, reason: str, *, to_client: bool) -> bytes:
    """A close frame; masked (as a client's must be) when it goes to the upstream."""
    return bytes(FrameProtocol(client=not to_client, extensions=[]).close(code, reason))
