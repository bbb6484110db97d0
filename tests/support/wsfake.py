"""The fake WebSocket upstream (tests/fakes/ws_upstream.py) as a test sees it, and WebSocket helpers."""

from __future__ import annotations

import base64
import os
import socket
from pathlib import Path

import requests

from tests.support.procs import PYTHON, Process, free_port, wait_for


class FakeWsUpstream:
    def __init__(self, process: Process, port: int, ca_file: Path | None) -> None:
        self.process = process
        self.port = port
        self.tls = ca_file is not None
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        self.verify: str | bool = str(ca_file) if ca_file is not None else True

    def log(self) -> list[dict]:
        return requests.get(self.url + "/_fake/log", timeout=5, verify=self.verify).json()

    def record(self, request_id: str, timeout: float = 5.0, closed: bool = False) -> dict:
        """The fake's record of the connection whose handshake carried this X-Request-ID."""

        def find():
            for record in self.records_of(request_id):
                if not closed or record["closed"] is not None:
                    return record
            return None

        return wait_for(find, timeout=timeout, interval=0.02, what=f"fake ws record of {request_id}")

    def records_of(self, request_id: str) -> list[dict]:
        return [r for r in self.log() if header(r["headers"], "x-request-id") == request_id]


def header(pairs, name: str) -> str | None:
    """The value of ``name`` among (name, value) pairs (repeats joined with ", "), None if absent."""
    values = [v for n, v in pairs if n.lower() == name]
    return ", ".join(values) if values else None


def start_ws_upstream(log_dir: Path, key: str, cert=None, ca_file: Path | None = None) -> FakeWsUpstream:
    port = free_port()
    command = [PYTHON, "-m", "tests.fakes.ws_upstream", "--port", str(port), "--key", key]
    if cert is not None:
        command += ["--tls-cert", str(cert.cert_file), "--tls-key", str(cert.key_file)]
    process = Process(command, env={}, log_path=log_dir / f"upstream-ws-{port}.log")
    wait_for(lambda: f"ready {port}" in process.output() or not process.alive(), timeout=15)
    assert process.alive(), process.output()
    return FakeWsUpstream(process, port, ca_file)


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


class RawAnswer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, rest: bytes) -> None:
        self.status = status
        self.headers = headers  # lower-case names
        self.body = body
        self.rest = rest  # bytes after the head of a 101 (the first frames)


def raw_handshake(
    port: int, path: str, headers: dict[str, str], *, key: str | None = None, version: str = "13"
) -> tuple[socket.socket, RawAnswer]:
    """A WebSocket handshake on a raw socket (``key=""``: none sent): the socket, still open, and
    the answer (its body read by Content-Length)."""
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade"]
    if key != "":
        lines.append(f"Sec-WebSocket-Key: {key or new_key()}")
    if version:
        lines.append(f"Sec-WebSocket-Version: {version}")
    lines += [f"{name}: {value}" for name, value in headers.items()]
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, f"closed before the answer's head: {data!r}"
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    found = {}
    for field in fields:
        name, _, value = field.partition(":")
        found[name.strip().lower()] = value.strip()
    length = int(found.get("content-length", "0"))
    while len(rest) < length:
        piece = sock.recv(65536)
        assert piece, "closed mid-body"
        rest += piece
    body, rest = (rest[:length], rest[length:]) if length else (b"", rest)
    return sock, RawAnswer(int(status_line.split()[1]), found, body, rest)
