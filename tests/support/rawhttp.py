"""A raw-socket HTTP/1.1 response reader for tests that must see exactly what crossed the wire:
framing, stray bytes, resets, whether the connection was closed."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass


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
