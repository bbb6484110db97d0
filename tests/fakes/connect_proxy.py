"""A real HTTP forward proxy for tests (an egress proxy the LLM proxy is told to use).

Run: ``python -m tests.fakes.connect_proxy --port N [--host 127.0.0.1] [--user U --password P]``.
Prints ``ready <port>`` once listening. Stdlib only, one thread per client connection (two while
relaying). Targets must be on loopback (127.x.x.x or localhost): anything else gets 403.

- ``CONNECT host:port HTTP/1.1`` → connects to host:port, answers ``200 Connection Established``
  and relays bytes both ways until either side closes (then closes both). 502 when the target
  refuses.
- Absolute-form requests (``POST http://host:port/path?q HTTP/1.1``) → connects to that origin and
  forwards the request in origin-form (``POST /path?q HTTP/1.1``), its headers minus
  ``Proxy-Authorization`` and ``Proxy-Connection``, and its body (Content-Length or chunked, copied
  as is); the origin's responses are relayed back byte for byte. Further requests on the same
  client connection are parsed and forwarded the same way (each one logged), on the same origin
  connection while they name the same origin, on a new one when they name another.
- With ``--user``: a CONNECT or absolute-form request without the right
  ``Proxy-Authorization: Basic base64(user:password)`` gets ``407`` with
  ``Proxy-Authenticate: Basic realm="fake"`` and the connection is closed.

Control API (origin-form requests, no authentication):
  GET /_fake/log      JSON list, oldest first, one entry per CONNECT or absolute-form request:
                      {method, target, authorized: bool, status, t}. ``authorized`` is whether the
                      request was let through by the authentication check (always true without
                      --user); ``status`` is the proxy's own answer (200 for a tunnel or a relayed
                      request, 407, 403, 502...).
  DELETE /_fake/log   clear the log.
Other origin-form requests get 404. Nothing is ever printed but the ready line: never a credential.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import json
import socket
import sys
import threading
import time
from urllib.parse import urlsplit

from tests.fakes._common import add_server_args, listen

MAX_HEAD = 1 << 16
RECV_SIZE = 65536
CONNECT_TIMEOUT = 5.0
LOOPBACK_NAMES = ("localhost",)


class Gone(Exception):
    """A peer closed or reset its connection."""


class Log:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: list[dict] = []

    def add(self, method: str, target: str, authorized: bool, status: int) -> None:
        with self.lock:
            self.entries.append(
                {
                    "method": method,
                    "target": target,
                    "authorized": authorized,
                    "status": status,
                    "t": time.time(),
                }
            )

    def dump(self) -> bytes:
        with self.lock:
            return json.dumps(self.entries).encode()

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


LOG = Log()


class Reader:
    """Buffered reads from one socket."""

    def __init__(self, sock: socket.socket, buf: bytes = b"") -> None:
        self.sock = sock
        self.buf = bytearray(buf)

    def fill(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except OSError as exc:
            raise Gone(str(exc))
        if not data:
            raise Gone("eof")
        self.buf += data

    def head(self) -> bytes | None:
        """The next request head (up to and including the empty line); None on a clean EOF before it."""
        while True:
            while self.buf[:2] == b"\r\n":
                del self.buf[:2]
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[: end + 4])
                del self.buf[: end + 4]
                return head
            if len(self.buf) > MAX_HEAD:
                raise Gone("head too large")
            try:
                self.fill()
            except Gone:
                if not self.buf:
                    return None
                raise

    def line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > MAX_HEAD:
                raise Gone("line too long")
            self.fill()
        line = bytes(self.buf[: end + 2])
        del self.buf[: end + 2]
        return line

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data


class Head:
    def __init__(self, raw: bytes) -> None:
        lines = raw[:-4].split(b"\r\n")
        parts = lines[0].decode("latin-1").split(" ")
        if len(parts) != 3:
            raise ValueError(f"bad request line {lines[0][:200]!r}")
        self.method, self.target, self.version = parts
        self.headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep or not name or name != name.strip():
                raise ValueError("bad header line")
            self.headers.append((name, value.strip()))

    def get(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return values[-1] if values else None

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for n, v in self.headers if n.lower() == name.lower() for t in v.split(",")}


def send_status(sock: socket.socket, status: int, reason: str, extra: str = "", body: bytes = b"") -> None:
    head = f"HTTP/1.1 {status} {reason}\r\n{extra}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    try:
        sock.sendall(head.encode("latin-1") + body)
    except OSError:
        pass


def close_both(*socks: socket.socket | None) -> None:
    for sock in socks:
        if sock is None:
            continue
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


def is_loopback(host: str) -> bool:
    return host.lower() in LOOPBACK_NAMES or host.startswith("127.")


def connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def pump(src: socket.socket, dst: socket.socket, first: bytes, done: threading.Event) -> None:
    """Copy src → dst until either fails or src closes; then close both (wakes the other pump)."""
    try:
        if first:
            dst.sendall(first)
        while True:
            data = src.recv(RECV_SIZE)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        done.set()
        close_both(src, dst)


def pump_response(origin: socket.socket, client: socket.socket, retired: threading.Event) -> None:
    """Copy origin → client until the origin closes; then close both, unless the client connection
    has moved on to another origin (``retired``)."""
    try:
        while True:
            data = origin.recv(RECV_SIZE)
            if not data or retired.is_set():
                break
            client.sendall(data)
    except OSError:
        pass
    finally:
        if retired.is_set():
            close_both(origin)
        else:
            close_both(origin, client)


class ProxyConnection:
    def __init__(self, client: socket.socket, user: str | None, password: str | None) -> None:
        self.client = client
        self.reader = Reader(client)
        self.user = user
        self.password = password

    def authorized(self, head: Head) -> bool:
        if self.user is None:
            return True
        value = head.get("Proxy-Authorization") or ""
        scheme, _, credential = value.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(credential.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        expected = f"{self.user}:{self.password}".encode()
        return hmac.compare_digest(decoded, expected)

    def run(self) -> None:
        try:
            raw = self.reader.head()
            if raw is None:
                self.client.close()
                return
            try:
                head = Head(raw)
            except ValueError:
                send_status(self.client, 400, "Bad Request")
                self.client.close()
                return
            if head.method == "CONNECT":
                self.tunnel(head)
            elif head.target.lower().startswith("http://"):
                self.relay(head)
            elif head.target.startswith("/"):
                self.control(head)
            else:
                send_status(self.client, 400, "Bad Request")
                self.client.close()
        except Gone:
            close_both(self.client)
        except Exception as exc:  # never a traceback with request data in it
            print(f"connect-proxy: {type(exc).__name__}", file=sys.stderr, flush=True)
            close_both(self.client)

    # ------------------------------------------------------------------ control API

    def control(self, head: Head) -> None:
        path = head.target.split("?", 1)[0]
        if path == "/_fake/log" and head.method == "GET":
            body, status, reason = LOG.dump(), 200, "OK"
        elif path == "/_fake/log" and head.method == "DELETE":
            LOG.clear()
            body, status, reason = b"[]", 200, "OK"
        else:
            body, status, reason = b'{"error": "unknown control endpoint"}', 404, "Not Found"
        send_status(self.client, status, reason, "Content-Type: application/json\r\n", body)
        self.client.close()

    # ------------------------------------------------------------------ CONNECT

    def refuse(self, head: Head, target: str, status: int, reason: str, authorized: bool, extra="") -> None:
        LOG.add(head.method, target, authorized, status)
        send_status(self.client, status, reason, extra)
        close_both(self.client)

    def check(self, head: Head, target: str, host: str) -> bool:
        """Authentication and the loopback rule; answers and logs a refusal itself."""
        if not self.authorized(head):
            self.refuse(
                head,
                target,
                407,
                "Proxy Authentication Required",
                False,
                'Proxy-Authenticate: Basic realm="fake"\r\n',
            )
            return False
        if not is_loopback(host):
            self.refuse(head, target, 403, "Forbidden", True)
            return False
        return True

    def tunnel(self, head: Head) -> None:
        target = head.target
        host, sep, port_text = target.rpartition(":")
        host = host.strip("[]")
        if not sep or not port_text.isdigit() or not host:
            self.refuse(head, target, 400, "Bad Request", self.authorized(head))
            return
        if not self.check(head, target, host):
            return
        try:
            origin = connect(host, int(port_text))
        except OSError:
            self.refuse(head, target, 502, "Bad Gateway", True)
            return
        LOG.add(head.method, target, True, 200)
        try:
            self.client.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        except OSError:
            close_both(self.client, origin)
            return
        done = threading.Event()
        early = bytes(self.reader.buf)  # bytes the client sent right after the CONNECT head
        threading.Thread(target=pump, args=(origin, self.client, b"", done), daemon=True).start()
        pump(self.client, origin, early, done)

    # ------------------------------------------------------------------ absolute-form

    def relay(self, head: Head) -> None:
        """Absolute-form requests, one after the other on this client connection. The origin
        connection is kept while requests name the same origin; one naming another origin gets a
        new origin connection (the client sends it only once it has the whole previous response)."""
        origin: socket.socket | None = None
        origin_key: tuple[str, int] | None = None
        retired: threading.Event | None = None
        try:
            while True:
                target = head.target
                parts = urlsplit(target)
                host = parts.hostname or ""
                try:
                    port = parts.port or 80
                except ValueError:
                    self.refuse(head, target, 400, "Bad Request", self.authorized(head))
                    return
                if not self.check(head, target, host):
                    return
                if (host.lower(), port) != origin_key:
                    if origin is not None and retired is not None:
                        retired.set()  # its pump must leave the client connection alone
                        close_both(origin)
                    try:
                        origin = connect(host, port)
                    except OSError:
                        self.refuse(head, target, 502, "Bad Gateway", True)
                        return
                    origin_key, retired = (host.lower(), port), threading.Event()
                    args = (origin, self.client, retired)
                    threading.Thread(target=pump_response, args=args, daemon=True).start()
                LOG.add(head.method, target, True, 200)
                if not self.forward(head, origin):
                    # The last request: its response still flows origin → client. Wait until the
                    # origin is done (the pump then shuts the client socket) or the client leaves.
                    while self.client.recv(RECV_SIZE):
                        pass
                    return
                raw = self.reader.head()  # None when the client closed (or the pump closed it)
                if raw is None:
                    return
                head = Head(raw)
                if head.method == "CONNECT" or not head.target.lower().startswith("http://"):
                    return
        except (Gone, ValueError, OSError):
            pass
        finally:
            close_both(self.client, origin)

    def forward(self, head: Head, origin: socket.socket) -> bool:
        """Send one request to the origin in origin-form with its body; whether more may follow."""
        parts = urlsplit(head.target)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        lines = [f"{head.method} {path} {head.version}"]
        lines += [
            f"{n}: {v}"
            for n, v in head.headers
            if n.lower() not in ("proxy-authorization", "proxy-connection")
        ]
        origin.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if "chunked" in head.tokens("transfer-encoding"):
            while True:
                size_line = self.reader.line()
                origin.sendall(size_line)
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while (trailer := self.reader.line()) != b"\r\n":
                        origin.sendall(trailer)
                    origin.sendall(b"\r\n")
                    break
                origin.sendall(self.reader.exact(size + 2))
        else:
            length = int(head.get("Content-Length") or 0)
            while length > 0:
                if not self.reader.buf:
                    self.reader.fill()
                take = min(length, len(self.reader.buf))
                origin.sendall(self.reader.exact(take))
                length -= take
        closing = "close" in head.tokens("connection") | head.tokens("proxy-connection")
        return not closing and head.version == "HTTP/1.1"


def serve(host: str, port: int, user: str | None, password: str | None) -> None:
    listener = listen(host, port, 1024)
    while True:
        try:
            client, _addr = listener.accept()
        except (ConnectionAbortedError, InterruptedError):
            continue
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = ProxyConnection(client, user, password)
        threading.Thread(target=conn.run, daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="fake HTTP forward proxy (CONNECT + absolute-form) for tests"
    )
    add_server_args(parser, tls=False)
    parser.add_argument("--user", help="require Proxy-Authorization: Basic for this user")
    parser.add_argument("--password", default="", help="the password of --user")
    args = parser.parse_args(argv)
    if not args.host.startswith("127."):
        parser.error("the fake proxy binds loopback (127.x.x.x) only")
    serve(args.host, args.port, args.user, args.password if args.user is not None else None)


if __name__ == "__main__":
    main()
