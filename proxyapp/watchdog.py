"""The watchdog of one exchange: stops the request's greenlet, wherever it waits, when

- the client leaves (an io watcher on the client socket: readable with nothing to peek = closed),
  also during a minutes-long wait for the first token, so the upstream stops generating;
- the total deadline (UPSTREAM_TOTAL_TIMEOUT) passes;
- the upstream stays silent for UPSTREAM_READ_TIMEOUT while its body streams.

It throws ``ExchangeAborted(reason)`` into the greenlet from the hub; ``reason`` keeps why. libev
watchers and one periodic timer, instead of socket timeouts: gevent would create and cancel a timer
on every wait for the next chunk, which per event cost more than forwarding it.
"""

from __future__ import annotations

import socket
import time

import gevent

from proxyapp.errors import ExchangeAborted

_monotonic = time.monotonic
_MSG_PEEK = socket.MSG_PEEK


class Watchdog:
    """Armed while an exchange is in flight. The streaming loop sets ``waiting_since`` to None
    while a chunk is with the client and to ``time.monotonic()`` while it waits for the upstream."""

    __slots__ = (
        "_armed",
        "_client",
        "_deadline",
        "_greenlet",
        "_loop",
        "_read_timeout",
        "_silence",
        "_watch",
        "active",
        "reason",
        "waiting_since",
    )

    def __init__(self, loop, read_timeout: float) -> None:
        self._loop = loop
        self._read_timeout = read_timeout
        self._greenlet = None
        self._client = None
        self._watch = None
        self._deadline = None
        self._silence = None
        self._armed = False
        self.active = False
        self.reason: str | None = None  # why the exchange was aborted, if it was
        self.waiting_since: float | None = None

    def arm(self, client_socket, total_timeout: float) -> None:
        """Start watching the client (when there is a socket) and the total deadline (when set)."""
        self.active = self._armed = True
        self._greenlet = gevent.getcurrent()
        loop = self._loop
        if client_socket is not None:
            self._client = client_socket
            self._watch = loop.io(client_socket.fileno(), 1)
            self._watch.start(self._on_client_readable)
        if total_timeout:
            self._deadline = loop.timer(total_timeout)
            self._deadline.start(self._abort, "total_timeout")

    def watch_upstream(self, raw) -> None:
        """UPSTREAM_READ_TIMEOUT while the body streams: one periodic check per exchange. urllib3
        sets the socket's timeout again when the connection is next used."""
        sock = getattr(raw._connection, "sock", None) if raw._connection is not None else None
        if sock is None:
            return
        sock.settimeout(None)
        self.waiting_since = _monotonic()
        period = min(self._read_timeout, 1.0)
        self._silence = self._loop.timer(period, period)
        self._silence.start(self._check_silence)

    def disarm(self) -> bool:
        """Stop every watcher. True the first time after ``arm`` (the exchange was in flight until
        now), also when an abort already stopped them."""
        was_armed = self._armed
        self._armed = False
        self._stop()
        return was_armed

    def _stop(self) -> None:
        self.active = False
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        if self._deadline is not None:
            self._deadline.stop()
            self._deadline = None
        if self._silence is not None:
            self._silence.stop()
            self._silence = None

    def _check_silence(self) -> None:
        since = self.waiting_since
        if since is not None and _monotonic() - since >= self._read_timeout:
            self._abort("upstream_timeout")

    def _on_client_readable(self) -> None:
        try:
            data = self._client.recv(1, _MSG_PEEK)  # the raw non-blocking socket
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            # The client pipelined its next request; nothing more can be learnt from this socket.
            self._watch.stop()
            return
        self._abort("client_gone")

    def _abort(self, reason: str) -> None:
        # Runs in the hub (a watcher callback): stop the request's greenlet wherever it waits.
        if not self.active:
            return
        self.reason = reason
        self._stop()
        self._greenlet.throw(ExchangeAborted(reason))
