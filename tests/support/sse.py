"""An SSE client on a raw socket, in a thread: what arrived, whether the chunked response ended
cleanly (terminal chunk) or was cut, and the first event as a signal."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import uuid

from tests.support.tables import CLIENT_TOKEN

EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
BODY = json.dumps(
    {"model": "m-stream", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
).encode()


class StreamReader(threading.Thread):
    """Reads one chunked SSE response through a raw socket in the background."""

    def __init__(self, port: int, fake: str, token: str = CLIENT_TOKEN) -> None:
        super().__init__(daemon=True)
        self.port, self.fake = port, fake
        self.request_id = "s-" + uuid.uuid4().hex
        self.request = (
            f"POST /chat/completions HTTP/1.1\r\nHost: proxy.test\r\nAuthorization: Bearer {token}\r\n"
            f"X-Fake: {fake}\r\nX-Request-ID: {self.request_id}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n"
        ).encode() + BODY
        self.events: list[str] = []
        self.arrived: list[float] = []  # time.time() at which each event of self.events was read
        self.status = 0
        self.clean_end = False
        self.error: BaseException | None = None
        self.first_event = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc
        finally:
            self.first_event.set()

    def _recv(self, sock: socket.socket) -> bytes:
        try:
            return sock.recv(65536)
        except ConnectionResetError:
            return b""

    def _run(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=20)
        try:
            sock.sendall(self.request)
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = self._recv(sock)
                if not data:
                    raise EOFError(buf)
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            self.status = int(head.split(b" ")[1])
            assert b"transfer-encoding: chunked" in head.lower(), head
            sse = b""
            while True:
                while b"\r\n" not in buf:
                    data = self._recv(sock)
                    if not data:
                        return
                    buf += data
                size_line, _, buf = buf.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                while len(buf) < size + 2:
                    data = self._recv(sock)
                    if not data:
                        return
                    buf += data
                if size == 0:
                    self.clean_end = buf[:2] == b"\r\n"
                    return
                sse += buf[:size]
                buf = buf[size + 2 :]
                while (match := EVENT_END.search(sse)) is not None:
                    block, sse = sse[: match.start()], sse[match.end() :]
                    if block.startswith(b"data: "):
                        self.events.append(block[6:].decode())
                        self.arrived.append(time.time())
                        self.first_event.set()
        finally:
            sock.close()

    def delays(self) -> list[float]:
        """Seconds from each chunk event's ``t_sent`` (the fake upstream's clock) to its arrival here."""
        return [
            arrived - json.loads(event)["t_sent"]
            for arrived, event in zip(self.arrived, self.events, strict=True)
            if event != "[DONE]" and "t_sent" in event
        ]

    def indexes(self) -> list[int]:
        return [json.loads(e)["i"] for e in self.events if e != "[DONE]"]

    def complete(self, events: int) -> bool:
        indexes = [json.loads(e)["i"] for e in self.events if e != "[DONE]"]
        return (
            self.error is None
            and self.status == 200
            and indexes == list(range(events))
            and self.events[-1:] == ["[DONE]"]
            and self.clean_end
        )
