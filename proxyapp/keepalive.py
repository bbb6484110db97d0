"""SSE keep-alive: comment lines sent to the client while an event stream is silent.

Load balancers between the client and us cut connections idle for 60 s or so; a reasoning model
can think longer than that between two events. Once the upstream has answered with
``text/event-stream``, a silence of SSE_KEEPALIVE_SECONDS makes us send ``: keep-alive``, but
only at an event boundary, never inside an event.
"""

from __future__ import annotations

from collections.abc import Iterator

import gevent
from gevent.queue import Empty, Queue

KEEPALIVE = b": keep-alive\n\n"
_END = object()
_BOUNDARIES = (b"\n\n", b"\r\r", b"\r\n\r\n")


def is_event_stream(content_type: str | None) -> bool:
    return bool(content_type) and content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


def with_keepalive(chunks: Iterator[bytes], silence: float) -> Iterator[bytes]:
    """Yield the upstream's chunks as they come, and KEEPALIVE after each ``silence`` seconds
    without one, when the bytes so far end at an event boundary.

    The upstream is read in a helper greenlet so that a silence can be noticed without
    interrupting a read half way through a chunk; the queue holds one chunk, so a slow client
    still slows the upstream read down. Upstream errors are re-raised here.
    """
    queue: Queue = Queue(maxsize=1)

    def read() -> None:
        try:
            for chunk in chunks:
                queue.put(chunk)
        except gevent.GreenletExit:
            raise
        except BaseException as exc:  # handed over to the consuming greenlet, raised there
            queue.put(exc)
            return
        queue.put(_END)

    reader = gevent.spawn(read)
    at_boundary = True
    try:
        while True:
            try:
                item = queue.get(timeout=silence)
            except Empty:
                if at_boundary:
                    yield KEEPALIVE
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            at_boundary = item.endswith(_BOUNDARIES)
            yield item
    finally:
        reader.kill(block=True, timeout=1)
