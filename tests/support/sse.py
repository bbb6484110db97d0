"""SSE on the client side: an incremental event parser with arrival times (``sse_events``), and a
threaded client (``StreamReader``) that streams one chat completion through a raw socket: what
arrived and when, whether the chunked response ended cleanly (terminal chunk) or was cut."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterable, Iterator

from tests.support.chat import TIMEOUT
from tests.support.rawhttp import CHAT, RawClient, new_id
from tests.support.tables import CLIENT_TOKEN

EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE_END = re.compile(rb"\r\n|\n|\r")
BODY = json.dumps(
    {"model": "m-stream", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
).encode()


def sse_events(pieces: Iterable[tuple[float, bytes]]) -> Iterator[tuple[float, str]]:
    """Parse an SSE byte stream incrementally: yield (arrival time of the event's last byte, data)
    for each event with data lines (comments and data-less events are skipped)."""
    buf = b""
    for arrived, piece in pieces:
        buf += piece
        while (match := EVENT_END.search(buf)) is not None:
            block, buf = buf[: match.start()], buf[match.end() :]
            data = [line[5:].lstrip(b" ") for line in _LINE_END.split(block) if line.startswith(b"data:")]
            if data:
                yield arrived, b"\n".join(data).decode()


class StreamReader(threading.Thread):
    """Streams one chat completion (X-Fake: ``fake``) through a raw socket in the background."""

    def __init__(
        self, port: int, fake: str, token: str = CLIENT_TOKEN, request_id: str | None = None
    ) -> None:
        super().__init__(daemon=True)
        self.port, self.fake, self.token = port, fake, token
        self.request_id = request_id or new_id("s")
        self.timed_events: list[tuple[float, str]] = []  # (arrival time, data)
        self.status = 0
        self.clean_end = False
        self.ended_at: float | None = None
        self.error: BaseException | None = None
        self.first_event = threading.Event()

    @property
    def events(self) -> list[str]:
        return [data for _, data in self.timed_events]

    @property
    def arrived(self) -> list[float]:
        """time.time() at which each event of ``events`` was read."""
        return [arrived for arrived, _ in self.timed_events]

    def delays(self) -> list[float]:
        """Seconds from each chunk event's ``t_sent`` (the fake upstream's clock) to its arrival here."""
        return [
            arrived - json.loads(data)["t_sent"]
            for arrived, data in self.timed_events
            if data != "[DONE]" and "t_sent" in data
        ]

    def run(self) -> None:
        try:
            with RawClient(self.port, timeout=20) as client:
                headers = {
                    "Authorization": f"Bearer {self.token}",
                    "X-Fake": self.fake,
                    "X-Request-ID": self.request_id,
                    "Content-Type": "application/json",
                }
                client.send_request("POST", CHAT, headers, BODY)
                self.status, head = client.read_head()
                assert head.get("transfer-encoding") == "chunked", client.header_list
                for event in sse_events(client.iter_body()):
                    self.timed_events.append(event)
                    self.first_event.set()
                self.clean_end = client.clean_end
        except BaseException as exc:
            self.error = exc
        finally:
            self.ended_at = time.time()
            self.first_event.set()

    def wait_events(self, count: int, timeout: float) -> bool:
        """True once ``count`` events arrived (False at the timeout or when the stream ended short)."""
        deadline = time.monotonic() + timeout
        while len(self.timed_events) < count and time.monotonic() < deadline and self.is_alive():
            time.sleep(0.01)
        return len(self.timed_events) >= count

    def finish(self, timeout: float) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the stream did not finish"
        assert self.error is None, repr(self.error)

    def chunk_events(self) -> list[tuple[float, dict]]:
        return [(arrived, json.loads(data)) for arrived, data in self.timed_events if data != "[DONE]"]

    def indexes(self) -> list[int]:
        return [event["i"] for _, event in self.chunk_events()]

    def complete(self, events: int) -> bool:
        return (
            self.error is None
            and self.status == 200
            and self.indexes() == list(range(events))
            and self.events[-1:] == ["[DONE]"]
            and self.clean_end
        )


def read_stream(port: int, fake: str, events: int) -> StreamReader:
    """Read one SSE stream through the proxy at ``port`` to its end; it must be complete."""
    reader = StreamReader(port, fake)
    reader.start()
    reader.join(TIMEOUT)
    assert not reader.is_alive()
    assert reader.complete(events), (reader.error, reader.status, reader.events[-2:], reader.clean_end)
    return reader
