"""Raw-socket HTTP/1.1 for tests that must see exactly what crossed the wire: framing, stray bytes,
resets, whether the connection was closed, and when each body byte arrived.

``RawClient`` is the one client: it sends requests as written and reads responses strictly by their
framing, piece by piece with arrival times (``iter_body``; ``tests.support.sse.sse_events`` turns
those into timed events). ``parse_one``/``read_response``/``read_until_close`` read whole responses
out of bytes already received.
"""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

CHAT = "/v1/chat/completions"
_STATUS_LINE = re.compile(r"HTTP/1\.[01] (\d{3})(?: .*)?")


def new_id(prefix: str = "t") -> str:
    """A fresh X-Request-ID: how a test finds its request again in logs and upstream records."""
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class Resp:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return values[-1] if values else None

    def has(self, name: str) -> bool:
        return any(n.lower() == name.lower() for n, _ in self.headers)


def dechunk(data: bytes) -> tuple[bytes, bytes, bool]:
    body = b""
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return body, b"", False
        size = int(data[pos:eol].split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            while True:  # trailer lines, then the empty line
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    return body, b"", False
                if eol == pos:
                    return body, data[eol + 2 :], True
                pos = eol + 2
        if len(data) < pos + size + 2:
            return body + data[pos : pos + size], b"", False
        body += data[pos : pos + size]
        pos += size + 2


def parse_one(data: bytes, head: bool = False) -> tuple[Resp | None, bytes]:
    """One response from the front of ``data`` (None while its head is incomplete) and the rest."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None, data
    lines = data[:end].decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), data[:200]
    status = int(lines[0].split(" ", 2)[1])
    headers = [(n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])]
    rest = data[end + 4 :]
    lower = {n.lower(): v for n, v in headers}
    if head or status in (204, 304) or 100 <= status < 200:
        return Resp(status, headers, b"", True), rest
    if "chunked" in lower.get("transfer-encoding", "").lower():
        body, rest, complete = dechunk(rest)
        return Resp(status, headers, body, complete), rest
    if "content-length" in lower:
        length = int(lower["content-length"])
        return Resp(status, headers, rest[:length], len(rest) >= length), rest[length:]
    return Resp(status, headers, rest, False), b""


def read_response(sock: socket.socket, timeout: float = 10.0, head: bool = False) -> Resp:
    """One complete response on a keep-alive connection."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        resp, rest = parse_one(data, head)
        if resp is not None and resp.complete:
            assert rest == b"", f"bytes after the response: {rest[:200]!r}"
            return resp
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        piece = sock.recv(65536)
        if not piece:
            raise AssertionError(f"connection closed mid-response: {data[:500]!r}")
        data += piece


def read_until_close(sock: socket.socket, timeout: float) -> tuple[bytes, str]:
    """Everything the server sends until it closes: (bytes, "eof" | "reset" | "open")."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return data, "open"
        sock.settimeout(remaining)
        try:
            piece = sock.recv(65536)
        except TimeoutError:
            return data, "open"
        except ConnectionResetError:
            return data, "reset"
        if not piece:
            return data, "eof"
        data += piece


class RawClient:
    """An HTTP/1.1 client on a plain socket (keep-alive, pipelining allowed)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self.buf = bytearray()
        self.eof = False  # the server closed the connection (FIN or RST)
        self.reset = False  # ... with a RST
        self.clean_end = False  # the last body ended as its framing says (see iter_body)
        self.status = 0
        self.headers: dict[str, str] = {}  # of the last head read, names lower-cased
        self.header_list: list[tuple[str, str]] = []  # the same, as sent

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # -- sending

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_request(
        self,
        method: str = "POST",
        target: str = CHAT,
        headers: Mapping[str, str] | Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
        host: str | None = "proxy.test",
    ) -> None:
        """The request as given, plus Host and, with a body, Content-Length."""
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        lines = [f"{method} {target} HTTP/1.1"] + ([f"Host: {host}"] if host else [])
        lines += [f"{name}: {value}" for name, value in pairs]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))

    # -- reading

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data, self.reset = b"", True
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _need(self, n: int) -> None:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError(f"connection closed; have {bytes(self.buf[:300])!r}")

    def _take(self, n: int) -> bytes:
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_until(self, sep: bytes) -> bytes:
        """The bytes before ``sep`` (consumed too); EOFError if the connection closes first."""
        while sep not in self.buf:
            if not self._fill():
                raise EOFError(f"connection closed before {sep!r}: {bytes(self.buf[:300])!r}")
        data = self._take(self.buf.index(sep))
        del self.buf[: len(sep)]
        return data

    def read_exact(self, n: int) -> bytes:
        self._need(n)
        return self._take(n)

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        return self._take(len(self.buf))

    def read_head(self) -> tuple[int, dict[str, str]]:
        """The status line and headers: (status, {lower-case name: value}); ``header_list`` keeps them
        as sent (repeats apart)."""
        lines = self.read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        match = _STATUS_LINE.fullmatch(lines[0])
        assert match, f"not a status line: {lines[0]!r}"
        self.status = int(match.group(1))
        self.header_list = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            assert sep, f"not a header line: {line!r}"
            self.header_list.append((name.strip(), value.strip()))
        self.headers = {name.lower(): value for name, value in self.header_list}
        return self.status, self.headers

    def read_chunk(self) -> bytes | None:
        """One chunk of a chunked body; None at the last chunk (its empty trailer read too)."""
        size = int(self.read_until(b"\r\n").split(b";")[0], 16)
        if size == 0:
            assert self.read_until(b"\r\n") == b"", "trailers after the last chunk"
            return None
        data = self.read_exact(size)
        assert self.read_exact(2) == b"\r\n", "chunk data not followed by CRLF"
        return data

    def iter_body(self, method: str = "GET") -> Iterator[tuple[float, bytes]]:
        """Yield (arrival time, bytes) as the body of the last head arrives; afterwards ``clean_end``
        says whether it ended as its framing says (last chunk / full Content-Length / EOF)."""
        self.clean_end = False
        headers = self.headers
        if method == "HEAD" or self.status in (204, 304) or self.status < 200:
            self.clean_end = True
            return
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                while b"\r\n" not in self.buf:
                    if not self._fill():
                        return
                line_end = self.buf.index(b"\r\n")
                size = int(bytes(self.buf[:line_end]).split(b";")[0], 16)
                if size == 0:
                    while b"\r\n\r\n" not in self.buf[line_end:]:
                        if not self._fill():
                            return
                    del self.buf[: self.buf.index(b"\r\n\r\n", line_end) + 4]
                    self.clean_end = True
                    return
                del self.buf[: line_end + 2]
                if not (yield from self._counted(size)):
                    return
                while len(self.buf) < 2:
                    if not self._fill():
                        return
                assert self._take(2) == b"\r\n", "chunk data not followed by CRLF"
        elif "content-length" in headers:
            self.clean_end = yield from self._counted(int(headers["content-length"]))
        else:
            while True:
                if not self.buf and not self._fill():
                    self.clean_end = not self.reset
                    return
                yield time.time(), self._take(len(self.buf))

    def _counted(self, need: int):
        """Yield (arrival time, bytes) until ``need`` bytes came; return False if the connection
        ended first."""
        while need:
            if not self.buf and not self._fill():
                return False
            piece = self._take(min(need, len(self.buf)))
            need -= len(piece)
            yield time.time(), piece
        return True

    def read_body(self, method: str = "GET") -> bytes:
        return b"".join(piece for _, piece in self.iter_body(method))

    def read_response(self, method: str = "GET") -> tuple[int, list[tuple[str, str]], bytes]:
        """One whole response, strictly by its framing: (status, headers as sent, body)."""
        status, _ = self.read_head()
        body = self.read_body(method)
        assert self.clean_end, f"response body cut short: {body[:300]!r}"
        return status, self.header_list, body

    def at_eof(self, timeout: float) -> bool:
        """True when the server closes the connection within ``timeout`` (pending bytes are read)."""
        self.sock.settimeout(timeout)
        try:
            while self._fill():
                pass
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(self.timeout)
        return True

    def no_stray_bytes(self, wait: float = 0.3) -> bool:
        """Nothing after the last response: no buffered byte, none arriving within ``wait``."""
        if self.buf:
            return False
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(self.timeout)
        return data == b""
