"""WebSocket passthrough: the handshake's header policy and the relay after a ``101``.

The handshake is an ordinary request of the request path (proxyapp.forward): routed, limited and
sent through the worker's upstream client (its pools, TLS context, egress proxy, DNS cache and
error codes) with ``Connection: Upgrade`` / ``Upgrade: websocket`` kept on this one request. What
is decided here:

- which requests are WebSocket handshakes, and which of them are malformed (400, no upgrade);
- the browser credential form ``Sec-WebSocket-Protocol: openai-insecure-api-key.<token>``, whose
  entry is replaced by the upstream key in the same place;
- ``Sec-WebSocket-Extensions`` is not forwarded: permessage-deflate (which the ``websockets``
  library offers by default; the openai SDK does not) is declined, so that the meter reads every
  upstream message without a zlib inflater per session (memory and CPU per message), and nothing
  is ever decompressed to be measured;
- after the ``101``: the upstream socket is detached from urllib3 (a 101 connection released to
  the pool would be handed to the next request) and both connections are relayed as bytes.

The relay: the request's greenlet copies upstream -> client, one more greenlet client -> upstream;
each chunk is sent as it arrives, then fed to proxyapp.ws_meter. Reads go through the buffered
readers the handshake was read with (http.client's for the upstream, pywsgi's for the client):
the upstream's first frame is often already in its reader. A session ends when either side closes
its connection (the other is closed at once), after ``WEBSOCKET_IDLE_TIMEOUT`` without a byte
either way, at ``UPSTREAM_TOTAL_TIMEOUT``, or when the worker stops (both sides then get a close
frame 1001 first, when the relay stands between two frames on that side).
"""

from __future__ import annotations

import base64
import binascii
import socket
import time

import gevent
from gevent import GreenletExit

from proxyapp.ws_meter import FrameTrack, SessionUsage, close_frame

PROTOCOL_KEY_PREFIX = "openai-insecure-api-key."
# Reads start small and double while they come back full (a large message), back to small after a
# short one: BufferedReader.read1 allocates its whole size before it learns how much arrived, and
# a Realtime event is a few hundred bytes (the same reasoning as proxyapp.upstream's body reads).
_READ_MIN = 4096
_READ_MAX = 65536
_GOING_AWAY = 1001
_CLOSE_SEND_TIMEOUT = 0.5  # a close frame of ours: best effort, never holds the worker's exit
_monotonic = time.monotonic
# Why a session ended -> the close frame both sides get from us (the others end on a close or a drop).
_CLOSE_REASONS = {
    "shutdown": "proxy shutting down",
    "idle_timeout": "idle timeout",
    "total_timeout": "session time limit",
}


def _tokens(headers, name: str) -> set[str]:
    found: set[str] = set()
    for field, value in headers:
        if field.lower() == name:
            found.update(token.strip().lower() for token in value.split(","))
    return found


def is_websocket_handshake(method: str, headers) -> bool:
    """``Upgrade: websocket`` with ``Connection: upgrade`` (other upgrades, h2c, stay plain HTTP)."""
    return (
        method == "GET"
        and "websocket" in _tokens(headers, "upgrade")
        and "upgrade" in _tokens(headers, "connection")
    )


def handshake_problem(headers, has_body: bool) -> str | None:
    """Why a WebSocket handshake request is unusable (RFC 6455 §4.1), or None."""
    versions = [value.strip() for name, value in headers if name.lower() == "sec-websocket-version"]
    keys = [value.strip() for name, value in headers if name.lower() == "sec-websocket-key"]
    if versions != ["13"]:
        return "WebSocket handshake needs Sec-WebSocket-Version: 13."
    if len(keys) != 1:
        return "WebSocket handshake needs one Sec-WebSocket-Key."
    try:
        if len(base64.b64decode(keys[0], validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        return "Sec-WebSocket-Key must be 16 bytes in base64."
    if has_body:
        return "A WebSocket handshake has no body."
    return None


def protocol_token(value: str | None) -> str | None:
    """The token of a ``Sec-WebSocket-Protocol`` entry ``openai-insecure-api-key.<token>``."""
    if not value:
        return None
    for entry in value.split(","):
        entry = entry.strip()
        if entry.startswith(PROTOCOL_KEY_PREFIX) and len(entry) > len(PROTOCOL_KEY_PREFIX):
            return entry[len(PROTOCOL_KEY_PREFIX) :]
    return None


def protocol_entry(value: str | None) -> str | None:
    """The whole ``openai-insecure-api-key.<token>`` entry of a Sec-WebSocket-Protocol value."""
    token = protocol_token(value)
    return PROTOCOL_KEY_PREFIX + token if token is not None else None


def _with_protocol_key(value: str, key: str) -> str:
    entries = [entry.strip() for entry in value.split(",")]
    return ", ".join(
        PROTOCOL_KEY_PREFIX + key if entry.startswith(PROTOCOL_KEY_PREFIX) else entry for entry in entries
    )


def upstream_handshake_headers(
    headers: dict[str, str], auth_header: tuple[str, str] | None, key_in_protocol: bool
) -> dict[str, str]:
    """The handshake's headers as the HTTP policy built them (``headers``, credential already set
    the HTTP way), made a WebSocket handshake: Upgrade and Connection back, extensions declined,
    and a credential carried in Sec-WebSocket-Protocol moved back there."""
    headers.pop("Sec-WebSocket-Extensions", None)
    for name in [name for name in headers if name.lower() == "sec-websocket-extensions"]:
        del headers[name]
    headers["Connection"] = "Upgrade"
    headers["Upgrade"] = "websocket"
    if auth_header is not None:
        # The route's key replaces a key entry wherever one is (also when the token came in a
        # header: the client's token never reaches the upstream), and goes only there when the
        # client put its token there.
        value = auth_header[1]
        key = value[7:] if value[:7].lower() == "bearer " else value
        for name in headers:
            if name.lower() == "sec-websocket-protocol" and PROTOCOL_KEY_PREFIX in headers[name]:
                headers[name] = _with_protocol_key(headers[name], key)
        if key_in_protocol:
            headers.pop(auth_header[0], None)
    return headers


def is_accepted(response_headers) -> bool:
    """The upstream's 101 is a WebSocket one."""
    return "websocket" in _tokens(response_headers, "upgrade")


def client_handshake_headers(
    headers: list[tuple[str, str]], client_protocol: str | None
) -> list[tuple[str, str]]:
    """The 101's headers for the client: the upstream's end-to-end ones (Sec-WebSocket-Accept,
    -Protocol...), Upgrade/Connection back. An upstream that echoes the key entry as the chosen
    subprotocol gets the client's own entry echoed instead (never the upstream key)."""
    out = []
    for name, value in headers:
        if name.lower() == "sec-websocket-protocol" and value.strip().startswith(PROTOCOL_KEY_PREFIX):
            value = protocol_entry(client_protocol) or value
        out.append((name, value))
    out.append(("Upgrade", "websocket"))
    out.append(("Connection", "Upgrade"))
    return out


def detach_upstream(raw) -> tuple[object, object]:
    """(buffered reader, socket) of the upstream connection after its 101, taken from urllib3:
    the pooled connection object goes back without a socket, so the pool never reuses this one."""
    conn = raw.connection
    sock = conn.sock
    reader = raw._fp.fp  # http.client's reader: may already hold the upstream's first frames
    conn.sock = None
    raw._fp.fp = None  # closing the response later must not close our reader
    try:
        raw.release_conn()
    except Exception:  # the pool's bookkeeping only; the socket is ours already
        pass
    sock.settimeout(None)  # ends are the relay's business (idle and total timers)
    return reader, sock


class Relay:
    """One session's two byte streams; ``run()`` returns the end reason."""

    __slots__ = (
        "_client_reader",
        "_client_sock",
        "_helper",
        "_idle",
        "_idle_timer",
        "_loop",
        "_total_timer",
        "_up_reader",
        "_up_sock",
        "client_bytes",
        "down",
        "last",
        "reason",
        "sending_down",
        "sending_up",
        "up",
        "upstream_bytes",
        "usage",
    )

    def __init__(
        self, client_reader, client_sock, up_reader, up_sock, *, idle: float, total: float, loop
    ) -> None:
        self._client_reader = client_reader
        self._client_sock = client_sock
        self._up_reader = up_reader
        self._up_sock = up_sock
        self._idle = idle
        self._loop = loop
        self._helper = None
        self._idle_timer = None
        self._total_timer = loop.timer(total) if total else None
        self.usage = SessionUsage()
        self.down = FrameTrack(from_client=False, usage=self.usage)  # upstream -> client
        self.up = FrameTrack(from_client=True)  # client -> upstream
        self.client_bytes = 0  # client -> upstream
        self.upstream_bytes = 0  # upstream -> client
        self.last = _monotonic()
        self.reason: str | None = None
        self.sending_down = False
        self.sending_up = False

    def run(self) -> str:
        client_sock = self._client_sock
        client_sock.settimeout(None)
        self._idle_timer = self._loop.timer(self._idle)
        self._idle_timer.start(self._check_idle)
        if self._total_timer is not None:
            self._total_timer.start(self._expire, "total_timeout")
        self._helper = gevent.spawn(self._client_to_upstream)
        try:
            self._upstream_to_client()
        except GreenletExit:  # the worker stops: its drain waited GRACEFUL_TIMEOUT, then killed us
            self._end("shutdown")
        finally:
            self._close()
        return self.reason or "complete"

    # -- the two directions

    def _upstream_to_client(self) -> None:
        read = self._up_reader.read1
        raw_client = self._client_sock._sock  # the real non-blocking socket under gevent's
        sendall = self._client_sock.sendall
        track = self.down
        size = _READ_MIN
        while True:
            try:
                data = read(size)
            except OSError:
                data = b""
            if not data:
                self._end("complete" if track.closed else "upstream_error")
                return
            if len(data) == size:
                size = min(size * 2, _READ_MAX)
            elif size > _READ_MIN:
                size = _READ_MIN
            self.last = _monotonic()
            self.sending_down = True
            try:
                # One non-blocking send takes a whole message nearly always; gevent's sendall
                # (timers, SO_SNDBUF query) only for the rest.
                try:
                    sent = raw_client.send(data)
                except BlockingIOError:
                    sent = 0
                if sent < len(data):
                    sendall(memoryview(data)[sent:])
            except OSError:
                self._end("client_gone")
                return
            self.sending_down = False
            self.upstream_bytes += len(data)
            track.feed(data)  # after the send: metering never delays a byte

    def _client_to_upstream(self) -> None:
        read = self._client_reader.read1
        sendall = self._up_sock.sendall
        track = self.up
        reason = "client_gone"
        size = _READ_MIN
        while True:
            try:
                data = read(size)
            except OSError:
                data = b""
            if not data:
                reason = "complete" if track.closed else "client_gone"
                break
            if len(data) == size:
                size = min(size * 2, _READ_MAX)
            elif size > _READ_MIN:
                size = _READ_MIN
            self.last = _monotonic()
            self.sending_up = True
            try:
                sendall(data)
            except OSError:
                reason = "upstream_error"
                break
            self.sending_up = False
            self.client_bytes += len(data)
            track.feed(data)
        self._end(reason)
        self._wake_main()

    # -- endings

    def _end(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def _wake_main(self) -> None:
        """Make the upstream reader return (EOF), wherever the session ended from; the reason is
        already set. Stuck sending to a client that does not read: that socket is shut instead."""
        target = self._client_sock if self.sending_down else self._up_sock
        try:
            target.shutdown(socket.SHUT_RD if target is self._up_sock else socket.SHUT_RDWR)
        except OSError:
            pass

    def _check_idle(self) -> None:
        # A timer in the hub: per message the pumps only store the time; this re-arms itself.
        left = self.last + self._idle - _monotonic()
        self._idle_timer.stop()
        if left > 0.001:
            self._idle_timer = self._loop.timer(left)
            self._idle_timer.start(self._check_idle)
        else:
            self._expire("idle_timeout")

    def _expire(self, reason: str) -> None:
        self._end(reason)
        self._wake_main()

    def _close(self) -> None:
        for timer in (self._idle_timer, self._total_timer):
            if timer is not None:
                timer.stop()
        helper = self._helper
        if helper is not None:
            helper.kill(block=True, timeout=1.0)
        text = _CLOSE_REASONS.get(self.reason or "")
        if text is not None:
            # Going away: each side is told so, if nothing of a frame is half-way to it.
            if not self.sending_down and self.down.at_boundary:
                self._send_quietly(self._client_sock, close_frame(_GOING_AWAY, text, to_client=True))
            if not self.sending_up and self.up.at_boundary:
                self._send_quietly(self._up_sock, close_frame(_GOING_AWAY, text, to_client=False))
        for sock in (self._up_sock, self._client_sock):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for closable in (self._up_reader, self._up_sock):
            try:
                closable.close()
            except OSError:
                pass

    @staticmethod
    def _send_quietly(sock, frame: bytes) -> None:
        try:
            with gevent.Timeout(_CLOSE_SEND_TIMEOUT, False):
                sock.sendall(frame)
        except OSError:
            pass
