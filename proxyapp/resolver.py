"""Name resolution for the worker: gevent's thread resolver, with IP literals answered in place and
the answers for names kept for UPSTREAM_DNS_CACHE_SECONDS.

Every new upstream connection asks getaddrinfo (urllib3's create_connection). gevent's default
resolver hands each call to its thread pool, a thread switch and a wake-up of the loop (~150 µs
of the worker's CPU, measured with cProfile on 300 new connections), even for an IP literal;
and without a caching daemon on the host, each call for a name is a DNS query. A burst of new
streams opens a new connection per stream, so this is paid a thousand times in the burst.
"""

from __future__ import annotations

import _socket
import time

from gevent.resolver.thread import Resolver as ThreadResolver

_NUMERIC = _socket.AI_NUMERICHOST
_MAX_ENTRIES = 1024  # names x ports x families asked for; far more than a token table names


class CachingResolver(ThreadResolver):
    """getaddrinfo answered without the thread pool when it can be: an IP literal (the host is
    parsed, nothing is asked of the network), or a name asked less than ``ttl`` seconds ago.
    Failures are not kept: the next connection asks again. Everything else is the thread
    resolver's."""

    def __init__(self, ttl: float, hub=None) -> None:
        super().__init__(hub)
        self.ttl = ttl
        self._answers: dict[tuple, tuple[float, list]] = {}

    def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):
        try:
            return _socket.getaddrinfo(host, port, family, type, proto, flags | _NUMERIC)
        except (_socket.gaierror, UnicodeError):
            pass  # a name (or something the thread resolver should judge)
        if self.ttl <= 0:
            return super().getaddrinfo(host, port, family, type, proto, flags)
        key = (host, port, family, type, proto, flags)
        now = time.monotonic()
        kept = self._answers.get(key)
        if kept is not None and kept[0] > now:
            return kept[1]
        answer = super().getaddrinfo(host, port, family, type, proto, flags)
        if len(self._answers) >= _MAX_ENTRIES:
            self._answers.clear()
        self._answers[key] = (now + self.ttl, answer)
        return answer
