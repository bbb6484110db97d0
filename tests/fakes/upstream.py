"""Fake OpenAI-compatible upstream: a real HTTP/1.1 server with byte-exact control of the wire.

Run: ``python -m tests.fakes.upstream --port N [--host 127.0.0.1] [--tls-cert PEM --tls-key PEM]``
(``--port 0`` picks a free port). Prints ``ready <port>`` once listening. Stdlib only: raw sockets, one
thread per connection, keep-alive. With ``--tls-cert`` (certificate chain, PEM) and ``--tls-key``
(its private key, PEM; may be omitted when the key is in the chain file) it serves HTTPS only: every
accepted connection is a TLS server socket (handshake in the connection's thread), the control API
included; everything below works the same over TLS.

Behaviour is chosen per request by the ``X-Fake`` request header: ``X-Fake: mode;key=value;flag``.
Modes are ``json``, ``sse`` and ``echo``; without one, a JSON body with ``"stream": true`` gets ``sse``,
anything else ``json``. Options (unknown ones are ignored; a flag may also be written ``flag=1``):

  size=N          json: body of about N bytes (default 600)
  events=N        sse: number of chat.completion.chunk events (default 5), one HTTP chunk each
  interval=S      sse: seconds between events (default 0.05); json reset_after: pause before the RST
  first_delay=S   wait S seconds before sending the response headers (any mode)
  comment         sse: send ": ping" comments half-way between events
  usage           sse: usage chunk before [DONE] (also when the request has stream_options.include_usage)
  nodone          sse: no usage chunk and no "data: [DONE]"
                  (with stream_options.include_usage every other chunk has "usage": null, as OpenAI's)
  total=N         the usage objects (json, sse usage chunk) report N tokens (prompt N//3, the rest
                  completion) instead of 11 + 22 = 33
  nostreamopts    400 with a JSON error body to a request whose JSON body has "stream_options"
                  (some OpenAI-compatible servers refuse it)
  crlf            sse: end events with CRLF CRLF instead of LF LF
  framing=F       chunked | length | close (json, echo, errors: length; sse: chunked; gzip: length)
  gzip            gzip the body, Content-Encoding: gzip (sse streams with a sync flush per event)
  status=N        status code; 204/304 have no body, >= 300 gets a JSON error body, other 2xx the
                  normal body
  cl              with 204/304: add Content-Length: 0
  badcl[=N]       with 204/304: add Content-Length: N (default 20), a fault; no body is written
  reset_after=N   sse: after N events abort with TCP RST (at the time event N was due);
                  json: headers and half the body, pause `interval`, RST
  close_after=N   sse: after N events close cleanly (FIN) with no terminating chunk;
                  json: headers and N bytes of the body, then FIN
  stall=S         sse: headers and first event, then S seconds of silence, then the rest;
                  json: S seconds of silence before anything
  redirect=URL    302 (or status=3xx) with Location: URL and a small body
  cookies         two Set-Cookie lines: "a=1; Path=/" and "b=2; Path=/"
  noctype         no Content-Type
  header=Name:V   add a response header (repeatable); Transfer-Encoding is refused
  garbage         "HTTP/1.1 abc" status line, then close
  overlong        Content-Length: 10 but 20 body bytes (the connection stays open)
  short           Content-Length: 100 but 10 body bytes, then close
  trickle=S       json: body bytes one at a time, S seconds apart (one chunk per byte if chunked)
  idle_close=S    after this response, close the connection (FIN) if it stays idle S seconds
  split=S         sse, chunked: every HTTP chunk (and the last-chunk) written in pieces cut inside
                  its size line, its data and its closing CRLF, S seconds apart
  chunkext        sse, chunked: a chunk extension on every size line ("1f;ext=1")
  trailer         sse, chunked: a trailer field after the last-chunk ("X-Checksum: 1")

Control API on the same port (never recorded, never counted):
  GET /_fake/health       200 "ok"
  GET /_fake/requests     JSON list of recorded requests, oldest first:
                          {id, conn_id, method, target, headers: [[name, value]...], body_b64,
                           framing: "length"|"chunked"|"none", t_received}
  DELETE /_fake/requests  clear requests and records of closed connections; records of still-open
                          connections stay, with their request count reset to 0
  GET /_fake/connections  JSON list of connection records: {conn_id, opened, closed,
                          closed_by: "client"|"server"|null, peer_gone_during_response, requests,
                          peer_port, tls: bool}. Connections that never sent a byte (port probes) and
                          those that only made control requests are not listed.
  GET /_fake/tls_failures JSON list of failed TLS handshakes, oldest first: {t, peer_port, error}
                          (error: the server side's OpenSSL message, e.g. the client's alert
                          "tlsv1 alert unknown ca"). Probes that send no byte are not listed.
                          DELETE /_fake/requests clears it too.

While a response is waiting (first_delay, stall, interval, trickle) the socket is polled, so a client
that closes is noticed within a few milliseconds: the response stops, the connection is recorded as
closed_by "client" with peer_gone_during_response true. Over TLS the raw descriptor is polled and
bytes already decrypted into the TLS buffer (``SSLSocket.pending()``) count as readable (an
SSLSocket cannot ``recv(MSG_PEEK)``/``MSG_DONTWAIT``: input is taken with a non-blocking read).
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import select
import socket
import ssl
import struct
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Sequence
from http import HTTPStatus

from tests.fakes._common import add_server_args, listen, tls_context

MAX_HEAD = 1 << 20
MAX_LINE = 1 << 16
RECV_SIZE = 65536
MODES = ("json", "sse", "echo")
USAGE = {"prompt_tokens": 11, "completion_tokens": 22, "total_tokens": 33}
FILLER = "lorem ipsum dolor sit amet "
ERROR_BODY = b'{"error": {"message": "fake error", "type": "fake"}}'
HANDSHAKE_TIMEOUT = 10.0
TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
GONE_ERRNOS = {errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.ENOTCONN}
POLL_DEAD = select.POLLERR | select.POLLHUP | select.POLLNVAL


class ClientGone(Exception):
    """The client closed or reset the connection."""


class BadRequest(Exception):
    """The request could not be parsed."""


class ConnectionDone(Exception):
    """The server already closed or aborted the connection."""


class ConnRecord:
    def __init__(self, conn_id: int, peer_port: int, tls: bool = False):
        self.conn_id = conn_id
        self.peer_port = peer_port
        self.tls = tls
        self.opened = time.time()
        self.closed: float | None = None
        self.closed_by: str | None = None
        self.peer_gone = False
        self.requests = 0
        self.control = 0
        self.got_bytes = False

    def visible(self) -> bool:
        return self.got_bytes and not (self.control and not self.requests)

    def to_json(self) -> dict:
        return {
            "conn_id": self.conn_id,
            "opened": self.opened,
            "closed": self.closed,
            "closed_by": self.closed_by,
            "peer_gone_during_response": self.peer_gone,
            "requests": self.requests,
            "peer_port": self.peer_port,
            "tls": self.tls,
        }


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.conns: dict[int, ConnRecord] = {}
        self.tls_failures: list[dict] = []
        self.next_request = 1
        self.next_conn = 1


STATE = State()


class Request:
    def __init__(self, method, target, version, headers, body, framing):
        self.method: str = method
        self.target: str = target
        self.version: str = version
        self.headers: list[list[str]] = headers
        self.body: bytes = body
        self.framing: str = framing
        self.t_received = time.time()

    def values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for v in self.values(name) for t in v.split(",") if t.strip()}

    @property
    def wants_close(self) -> bool:
        tokens = self.tokens("connection")
        if "close" in tokens:
            return True
        return self.version == "HTTP/1.0" and "keep-alive" not in tokens

    def json_body(self) -> dict:
        body = self.body.strip()
        if not body.startswith(b"{"):
            return {}
        try:
            value = json.loads(body)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


class Fake:
    """The parsed X-Fake header."""

    def __init__(self, raw: str):
        self.mode: str | None = None
        self.opts: dict[str, str | bool] = {}
        self.headers: list[tuple[str, str]] = []
        for token in raw.split(";"):
            key, sep, value = token.strip().partition("=")
            key = key.strip().lower()
            value = value.strip()
            if not key:
                continue
            if not sep:
                if key in MODES and self.mode is None:
                    self.mode = key
                else:
                    self.opts[key] = True
            elif key == "mode":
                if value.lower() in MODES and self.mode is None:
                    self.mode = value.lower()
            elif key == "header":
                name, _, hvalue = value.partition(":")
                name = name.strip()
                if name and set(name) <= TOKEN_CHARS and name.lower() != "transfer-encoding":
                    self.headers.append((name, hvalue.strip()))
            else:
                self.opts[key] = value

    def flag(self, key: str) -> bool:
        value = self.opts.get(key)
        if value is None:
            return False
        return value is True or value.lower() not in ("0", "false", "no", "off")

    def num(self, key: str, default, cast=float):
        value = self.opts.get(key)
        if value is None or value is True:
            return default
        try:
            result = cast(value)
        except ValueError:
            return default
        if result != result or result < 0:  # NaN or negative
            return default
        return result

    def text(self, key: str) -> str | None:
        value = self.opts.get(key)
        return value if isinstance(value, str) and value else None

    def framing(self, default: str, req: Request) -> str:
        framing = self.opts.get("framing")
        if framing not in ("chunked", "length", "close"):
            framing = "length" if self.flag("gzip") else default
        if framing == "chunked" and req.version == "HTTP/1.0":
            framing = "close"
        return framing

    def base_headers(self, ctype: str | None) -> list[tuple[str, str]]:
        headers = []
        if ctype and not self.flag("noctype"):
            headers.append(("Content-Type", ctype))
        if self.flag("cookies"):
            headers += [("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; Path=/")]
        return headers + self.headers


def build_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


def has_close_header(headers: Sequence[tuple[str, str]]) -> bool:
    return any(
        name.lower() == "connection" and "close" in [t.strip().lower() for t in value.split(",")]
        for name, value in headers
    )


def wants_close(req: Request, framing: str, headers: list[tuple[str, str]]) -> bool:
    return framing == "close" or req.wants_close or has_close_header(headers)


def framing_headers(
    framing: str, length: int, close: bool, headers: Sequence[tuple[str, str]] = ()
) -> list[tuple[str, str]]:
    """Content-Length / Transfer-Encoding, plus Connection: close unless `headers` already say close."""
    result = []
    if framing == "length":
        result.append(("Content-Length", str(length)))
    elif framing == "chunked":
        result.append(("Transfer-Encoding", "chunked"))
    if close and not has_close_header(headers):
        result.append(("Connection", "close"))
    return result


def model_of(req: Request) -> str:
    model = req.json_body().get("model")
    return model if isinstance(model, str) else "fake-model"


def usage_of(fake: Fake) -> dict:
    total = fake.num("total", None, int)
    if total is None:
        return dict(USAGE)
    return {"prompt_tokens": total // 3, "completion_tokens": total - total // 3, "total_tokens": total}


def completion_body(req_id: int, model: str, size: int, usage: dict | None = None) -> bytes:
    obj = {
        "id": f"chatcmpl-fake-{req_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage or dict(USAGE),
    }
    pad = max(0, size - len(json.dumps(obj)))
    obj["choices"][0]["message"]["content"] = (FILLER * (pad // len(FILLER) + 1))[:pad]
    return json.dumps(obj).encode()


class SseEncoder:
    """Frames SSE pieces for the wire: optional streaming gzip (sync flush per piece), optional chunks
    (with a chunk extension on each size line, and a trailer field, when asked)."""

    def __init__(self, chunked: bool, gz: bool, ext: bool = False, trailer: bool = False):
        self.chunked = chunked
        self.z = zlib.compressobj(6, zlib.DEFLATED, 31) if gz else None
        self.ext = b";ext=1" if ext else b""
        self.trailer = b"X-Checksum: 1\r\n" if trailer else b""

    def _chunk(self, data: bytes) -> bytes:
        return b"%x%s\r\n%s\r\n" % (len(data), self.ext, data) if data else b""

    def piece(self, data: bytes) -> bytes:
        if self.z:
            data = self.z.compress(data) + self.z.flush(zlib.Z_SYNC_FLUSH)
        return self._chunk(data) if self.chunked else data

    def end(self) -> bytes:
        tail = self.z.flush() if self.z else b""
        if self.chunked:
            return self._chunk(tail) + b"0" + self.ext + b"\r\n" + self.trailer + b"\r\n"
        return tail


class Connection:
    def __init__(self, sock: socket.socket, addr):
        self.sock = sock
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.rbuf = bytearray()
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        self.in_response = False
        self.idle_close: float | None = None
        self.sock_closed = False
        with STATE.lock:
            conn_id = STATE.next_conn
            STATE.next_conn += 1
            self.rec = ConnRecord(conn_id, addr[1] if isinstance(addr, tuple) else 0, self.tls)
            STATE.conns[conn_id] = self.rec

    # ---- bookkeeping -------------------------------------------------------------------------

    def mark_closed(self, by: str, gone: bool) -> None:
        with STATE.lock:
            if self.rec.closed is None:
                self.rec.closed = time.time()
                self.rec.closed_by = by
                self.rec.peer_gone = gone

    def close_clean(self) -> None:
        """Close with FIN; mark closed by the server."""
        self.mark_closed("server", False)
        if self.sock_closed:
            return
        self.sock_closed = True
        if self.tls:
            self._send_close_notify()
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.setblocking(False)
            for _ in range(64):  # drain so that close() doesn't turn into a RST
                if not self.sock.recv(RECV_SIZE):
                    break
        except OSError:
            pass
        self.sock.close()

    def _send_close_notify(self) -> None:
        """TLS: send close_notify without waiting for the peer's (the second SSL_shutdown would)."""
        try:
            self.sock.setblocking(False)
            self.sock.unwrap()
        except (OSError, ValueError):
            pass

    def abort(self) -> None:
        """Close with a TCP RST; mark closed by the server."""
        self.mark_closed("server", False)
        if self.sock_closed:
            return
        self.sock_closed = True
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()

    # ---- reading -----------------------------------------------------------------------------

    def _recv_some(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except OSError as exc:
            raise ClientGone(str(exc))
        if not data:
            raise ClientGone("eof")
        self.rec.got_bytes = True
        self.rbuf += data

    def _read_line(self) -> bytes:
        while True:
            end = self.rbuf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.rbuf[:end])
                del self.rbuf[: end + 2]
                return line
            if len(self.rbuf) > MAX_LINE:
                raise BadRequest("line too long")
            self._recv_some()

    def _read_exact(self, n: int) -> bytes:
        while len(self.rbuf) < n:
            self._recv_some()
        data = bytes(self.rbuf[:n])
        del self.rbuf[:n]
        return data

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            line = self._read_line()
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadRequest(f"bad chunk size {line!r}")
            if size_text.startswith((b"-", b"+", b"0x", b"0X")) or size < 0:
                raise BadRequest(f"bad chunk size {line!r}")
            if size == 0:
                while self._read_line():  # trailers
                    pass
                return b"".join(parts)
            parts.append(self._read_exact(size))
            if self._read_exact(2) != b"\r\n":
                raise BadRequest("chunk not followed by CRLF")

    def read_request(self) -> Request:
        while True:
            while self.rbuf[:2] == b"\r\n":
                del self.rbuf[:2]
            end = self.rbuf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self.rbuf) > MAX_HEAD:
                raise BadRequest("header block too large")
            idle = self.idle_close
            if not self.rbuf and idle is not None and not self._poll(int(idle * 1000) + 1):
                self.close_clean()
                raise ConnectionDone()
            self._recv_some()
        lines = bytes(self.rbuf[:end]).split(b"\r\n")
        del self.rbuf[: end + 4]
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[0] or not parts[1] or not parts[2].startswith(b"HTTP/"):
            raise BadRequest(f"bad request line {lines[0]!r}")
        method, target, version = (p.decode("latin-1") for p in parts)
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or line[:1] in (b" ", b"\t") or name != name.strip():
                raise BadRequest(f"bad header line {line!r}")
            headers.append([name.decode("latin-1"), value.strip(b" \t").decode("latin-1")])
        req = Request(method, target, version, headers, b"", "none")
        te = req.tokens("transfer-encoding")
        cls = {p.strip() for v in req.values("content-length") for p in v.split(",")}
        if te or (cls and cls != {"0"}):
            self._maybe_continue(req)
        if te:
            if [t.strip() for v in req.values("transfer-encoding") for t in v.lower().split(",")][
                -1
            ] != "chunked":
                raise BadRequest("unsupported transfer-encoding")
            req.body, req.framing = self._read_chunked(), "chunked"
        elif cls:
            if len(cls) != 1 or not next(iter(cls)).isdigit():
                raise BadRequest("bad content-length")
            req.body, req.framing = self._read_exact(int(next(iter(cls)))), "length"
        req.t_received = time.time()
        return req

    def _maybe_continue(self, req: Request) -> None:
        if "100-continue" in req.tokens("expect") and not self.rbuf:
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    # ---- waiting and writing -----------------------------------------------------------------

    def _poll(self, timeout_ms: int) -> list[tuple[int, int]]:
        """poll() on the socket; over TLS, decrypted bytes waiting in the TLS buffer count as POLLIN."""
        if self.tls and self.sock.pending():
            return [(self.sock.fileno(), select.POLLIN)]
        return self.poller.poll(timeout_ms)

    def _take_input(self) -> None:
        """Called when the socket polls readable during a response: buffer data or detect EOF/RST."""
        try:
            if self.tls:
                # No MSG_DONTWAIT on an SSLSocket: a non-blocking read instead. A record that
                # carries no application data (or only part of one) raises SSLWantReadError.
                self.sock.setblocking(False)
                try:
                    data = self.sock.recv(RECV_SIZE)
                finally:
                    self.sock.setblocking(True)
            else:
                data = self.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError as exc:
            raise ClientGone(str(exc))
        if not data:
            raise ClientGone("eof")
        self.rbuf += data

    def wait(self, seconds: float) -> None:
        """Sleep, but raise ClientGone as soon as the client closes or resets the connection."""
        deadline = time.monotonic() + max(0.0, seconds)
        while True:
            remaining = deadline - time.monotonic()
            timeout = int(remaining * 1000) + 1 if remaining > 0 else 0
            for _fd, event in self._poll(timeout):
                if event & select.POLLIN:
                    self._take_input()
                if event & POLL_DEAD:
                    raise ClientGone("poll hup/err")
            if remaining <= 0:
                return

    def wait_until(self, monotonic_deadline: float) -> None:
        self.wait(monotonic_deadline - time.monotonic())

    def send(self, data: bytes) -> None:
        if not data:
            return
        try:
            self.sock.sendall(data)
        except OSError as exc:
            if exc.errno in GONE_ERRNOS or isinstance(exc, (BrokenPipeError, ConnectionError)):
                raise ClientGone(str(exc))
            raise

    # ---- main loop ---------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                req = self.read_request()
                if not self.handle(req):
                    self.close_clean()
                    return
        except ClientGone:
            self.mark_closed("client", self.in_response)
        except ConnectionDone:
            pass
        except BadRequest:
            try:
                self.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except (ClientGone, OSError):
                pass
            self.close_clean()
        except Exception:
            traceback.print_exc()
            self.abort()
        finally:
            if not self.sock_closed:
                self.sock_closed = True
                self.mark_closed("client", self.in_response)
                try:
                    self.sock.close()
                except OSError:
                    pass

    def handle(self, req: Request) -> bool:
        """Answer one request. Returns whether to keep the connection open."""
        path = req.target.split("?", 1)[0]
        if path.startswith("/_fake/"):
            self.rec.control += 1
            return self.control(req, path)
        record = {
            "id": 0,
            "conn_id": self.rec.conn_id,
            "method": req.method,
            "target": req.target,
            "headers": req.headers,
            "body_b64": base64.b64encode(req.body).decode("ascii"),
            "framing": req.framing,
            "t_received": req.t_received,
        }
        with STATE.lock:
            record["id"] = STATE.next_request
            STATE.next_request += 1
            STATE.requests.append(record)
            self.rec.requests += 1
        self.in_response = True
        keep = self.respond(req, record)
        self.in_response = False
        return keep

    # ---- control API -------------------------------------------------------------------------

    def control(self, req: Request, path: str) -> bool:
        status, body, ctype = 200, b"", "application/json"
        with STATE.lock:
            if path == "/_fake/health" and req.method in ("GET", "HEAD"):
                body, ctype = b"ok", "text/plain"
            elif path == "/_fake/requests" and req.method == "GET":
                body = json.dumps(STATE.requests).encode()
            elif path == "/_fake/requests" and req.method == "DELETE":
                count = len(STATE.requests)
                STATE.requests.clear()
                STATE.tls_failures.clear()
                for conn_id, rec in list(STATE.conns.items()):
                    if rec.closed is not None:
                        del STATE.conns[conn_id]
                    else:
                        rec.requests = 0
                body = json.dumps({"cleared": count}).encode()
            elif path == "/_fake/connections" and req.method == "GET":
                body = json.dumps([r.to_json() for r in STATE.conns.values() if r.visible()]).encode()
            elif path == "/_fake/tls_failures" and req.method == "GET":
                body = json.dumps(STATE.tls_failures).encode()
            else:
                status, body = 404, b'{"error": "unknown control endpoint"}'
        close = req.wants_close
        headers = [("Content-Type", ctype), *framing_headers("length", len(body), close)]
        self.send(build_head(status, headers) + (b"" if req.method == "HEAD" else body))
        return not close

    # ---- fake responses ----------------------------------------------------------------------

    def respond(self, req: Request, record: dict) -> bool:
        fake = Fake(";".join(req.values("x-fake")))
        body_json = req.json_body()
        if fake.mode is None:
            fake.mode = "sse" if body_json.get("stream") is True else "json"
        idle = fake.num("idle_close", None)
        if idle is not None:
            self.idle_close = idle
        self.wait(fake.num("first_delay", 0.0))

        if fake.flag("garbage"):
            self.send(b"HTTP/1.1 abc\r\n\r\n")
            self.close_clean()
            raise ConnectionDone()

        status = fake.num("status", 200, int)
        if not 200 <= status <= 599:
            status = 200
        location = fake.text("redirect")
        if location is not None:
            status = status if 300 <= status < 400 and status != 304 else 302
            return self.send_body(
                req, fake, status, "text/plain; charset=utf-8", b"redirect\n", [("Location", location)]
            )
        if fake.flag("nostreamopts") and "stream_options" in body_json:
            status = 400
        if status in (204, 304):
            return self.send_bodyless(req, fake, status)
        if status >= 300:
            return self.send_body(req, fake, status, "application/json", ERROR_BODY)
        if fake.flag("overlong") or fake.flag("short"):
            return self.send_fault_length(req, fake, status)
        if fake.mode == "echo":
            return self.send_body(req, fake, status, "application/json", json.dumps(record).encode())
        if fake.mode == "sse":
            return self.send_sse(req, fake, status, body_json, record["id"])
        body = completion_body(record["id"], model_of(req), fake.num("size", 600, int), usage_of(fake))
        return self.send_body(req, fake, status, "application/json", body)

    def _finish(self, close: bool) -> bool:
        if close:
            self.close_clean()
            raise ConnectionDone()
        return True

    def send_bodyless(self, req: Request, fake: Fake, status: int) -> bool:
        headers = fake.base_headers(None)
        if fake.opts.get("badcl") is not None:
            headers.append(("Content-Length", str(fake.num("badcl", 20, int) or 20)))
        elif fake.flag("cl"):
            headers.append(("Content-Length", "0"))
        close = wants_close(req, "length", headers)
        headers += framing_headers("none", 0, close, headers)
        self.send(build_head(status, headers))
        return self._finish(close)

    def send_fault_length(self, req: Request, fake: Fake, status: int) -> bool:
        headers = fake.base_headers("application/json")
        if fake.flag("overlong"):
            declared, payload = 10, b'{"a":"bc"}XXXXXXXXXX'
        else:
            declared, payload = 100, b'{"a":"bc",'
        close = req.wants_close or fake.flag("short")
        headers += framing_headers("length", declared, req.wants_close, headers)
        self.send(build_head(status, headers) + payload)
        return self._finish(close)

    def send_body(self, req, fake: Fake, status: int, ctype: str, body: bytes, extra=()) -> bool:
        framing = fake.framing("length", req)
        headers = fake.base_headers(ctype) + list(extra)
        if fake.flag("gzip"):
            z = zlib.compressobj(6, zlib.DEFLATED, 31)
            body = z.compress(body) + z.flush()
            headers.append(("Content-Encoding", "gzip"))
        close = wants_close(req, framing, headers)
        headers += framing_headers(framing, len(body), close, headers)
        head = build_head(status, headers)
        wire = chunk(body) + b"0\r\n\r\n" if framing == "chunked" else body
        if req.method == "HEAD":
            self.send(head)
            return self._finish(close)
        self.wait(fake.num("stall", 0.0))

        reset_after = fake.num("reset_after", None, int)
        close_after = fake.num("close_after", None, int)
        if reset_after is not None:
            self.send(head + wire[: len(wire) // 2])
            self.wait(fake.num("interval", 0.05))
            self.abort()
            raise ConnectionDone()
        if close_after is not None:
            self.send(head + wire[:close_after])
            self.close_clean()
            raise ConnectionDone()

        trickle = fake.num("trickle", None)
        if trickle is not None and body:
            if framing == "chunked":
                pieces = [chunk(body[i : i + 1]) for i in range(len(body))]
                pieces[-1] += b"0\r\n\r\n"
            else:
                pieces = [body[i : i + 1] for i in range(len(body))]
            start = time.monotonic()
            self.send(head + pieces[0])
            for k, piece in enumerate(pieces[1:], start=1):
                self.wait_until(start + k * trickle)
                self.send(piece)
        else:
            self.send(head + wire)
        return self._finish(close)

    def send_sse(self, req: Request, fake: Fake, status: int, body_json: dict, req_id: int) -> bool:
        events = fake.num("events", 5, int)
        interval = fake.num("interval", 0.05)
        stall = fake.num("stall", 0.0)
        comment = fake.flag("comment")
        nodone = fake.flag("nodone")
        stream_options = body_json.get("stream_options")
        asked = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        usage = fake.flag("usage") or asked
        eol = b"\r\n\r\n" if fake.flag("crlf") else b"\n\n"
        gz = fake.flag("gzip")
        framing = fake.framing("chunked", req)
        model = model_of(req)
        created = int(time.time())
        resp_id = f"chatcmpl-fake-{req_id}"

        # Schedule: (offset seconds from the headers, kind, event index).
        items: list[tuple[float, str, int]] = []
        t = 0.0
        for i in range(events):
            if i > 0:
                if comment:
                    items.append((t + interval / 2, "comment", -1))
                t += interval
            items.append((t, "event", i))
            if i == 0:
                t += stall
        if events == 0:
            t += stall
        n_stream_items = len(items)
        if not nodone:
            if usage:
                items.append((t, "usage", -1))
            items.append((t, "done", -1))

        # Faults: how many schedule items go out, and when the connection dies.
        fault, cut, fault_t = None, len(items), 0.0
        for name in ("reset_after", "close_after"):
            n = fake.num(name, None, int)
            if n is not None:
                fault = name
                if n < events:
                    cut = next(k for k, item in enumerate(items) if item[1] == "event" and item[2] == n)
                    fault_t = items[cut][0] if n > 0 else interval
                else:
                    cut = n_stream_items
                    fault_t = (items[cut - 1][0] if cut else stall) + interval
                break

        def payload(kind: str, i: int, t_sent: float) -> bytes:
            if kind == "comment":
                return b": ping" + eol
            if kind == "done":
                return b"data: [DONE]" + eol
            obj = {"id": resp_id, "object": "chat.completion.chunk", "created": created, "model": model}
            if kind == "usage":
                obj.update(choices=[], usage=usage_of(fake))
            else:
                delta = {"role": "assistant", "content": f"tok{i} "} if i == 0 else {"content": f"tok{i} "}
                finish = "stop" if i == events - 1 else None
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                obj.update(choices=[choice], i=i, t_sent=t_sent)
                if asked:
                    obj["usage"] = None
            return b"data: " + json.dumps(obj).encode() + eol

        encoder = SseEncoder(framing == "chunked", gz, fake.flag("chunkext"), fake.flag("trailer"))
        split = fake.num("split", 0.0) if framing == "chunked" else 0.0
        headers = [*fake.base_headers("text/event-stream"), ("Cache-Control", "no-cache")]
        if gz:
            headers.append(("Content-Encoding", "gzip"))
        close = wants_close(req, framing, headers)
        pieces: list[bytes] | None = None
        tail = b""
        wall0 = time.time()
        start = time.monotonic()
        if framing == "length":  # the whole body up front, t_sent = planned send time
            pieces = [encoder.piece(payload(kind, i, wall0 + off)) for off, kind, i in items]
            tail = encoder.end()
            length = sum(map(len, pieces)) + len(tail)
        else:
            length = 0
        headers += framing_headers(framing, length, close, headers)
        pending = build_head(status, headers)
        if req.method == "HEAD":
            self.send(pending)
            return self._finish(close)

        previous = 0.0
        for k, (off, kind, i) in enumerate(items[:cut]):
            if off > previous:
                self.send(pending)
                pending = b""
                self.wait_until(start + off)
                previous = off
            else:
                self.wait(0)  # notice a client that left
            if pieces is not None:
                pending += pieces[k]
            elif split:
                self.send(pending)
                pending = b""
                self.send_cut(encoder.piece(payload(kind, i, time.time())), split)
            else:
                pending += encoder.piece(payload(kind, i, time.time()))
        if fault is not None:
            self.send(pending)
            self.wait_until(start + fault_t)
            if fault == "reset_after":
                self.abort()
            else:
                self.close_clean()
            raise ConnectionDone()
        if split:
            self.send(pending)
            self.send_cut(encoder.end(), split)
        else:
            self.send(pending + (tail if pieces is not None else encoder.end()))
        return self._finish(close)

    def send_cut(self, frame: bytes, pause: float) -> None:
        """Send a chunk's framing in pieces cut after its first byte, inside its data (or trailer)
        and between the CR and LF that end it, ``pause`` seconds apart."""
        line_end = frame.find(b"\n") + 1
        cuts = sorted({1, min(line_end + 2, len(frame) - 1), len(frame) - 1})
        start = 0
        for cut in [*cuts, len(frame)]:
            if cut > start:
                if start:
                    self.wait(pause)
                self.send(frame[start:cut])
                start = cut


def tls_handshake(sock: socket.socket, addr, context: ssl.SSLContext) -> ssl.SSLSocket | None:
    """Server side of the TLS handshake, in the connection's thread. None when it failed (recorded
    unless the peer sent nothing at all, like a port probe)."""
    peer_port = addr[1] if isinstance(addr, tuple) else 0
    try:
        poller = select.poll()  # not select(): descriptors may exceed FD_SETSIZE under load
        poller.register(sock, select.POLLIN)
        if not poller.poll(int(HANDSHAKE_TIMEOUT * 1000)) or not sock.recv(1, socket.MSG_PEEK):
            sock.close()  # a port probe (or a silent peer): nothing to record
            return None
    except OSError:
        sock.close()
        return None
    tls_sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)  # detaches sock
    try:
        tls_sock.settimeout(HANDSHAKE_TIMEOUT)
        tls_sock.do_handshake()
        tls_sock.settimeout(None)
        return tls_sock
    except (OSError, ValueError) as exc:
        with STATE.lock:
            STATE.tls_failures.append({"t": time.time(), "peer_port": peer_port, "error": str(exc)})
        tls_sock.close()
        return None


def run_connection(sock: socket.socket, addr, context: ssl.SSLContext) -> None:
    tls_sock = tls_handshake(sock, addr, context)
    if tls_sock is not None:
        Connection(tls_sock, addr).run()


def serve(host: str, port: int, context: ssl.SSLContext | None = None) -> None:
    listener = listen(host, port, 4096)
    threading.stack_size(512 * 1024)
    while True:
        try:
            sock, addr = listener.accept()
        except (ConnectionAbortedError, InterruptedError):
            continue
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                print(f"fake-upstream: accept failed: {exc}", file=sys.stderr, flush=True)
                time.sleep(0.05)
                continue
            raise
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if context is None:
            conn = Connection(sock, addr)
            threading.Thread(target=conn.run, name=f"conn-{conn.rec.conn_id}", daemon=True).start()
        else:  # the handshake runs in the connection's thread: a slow client must not stall accept()
            threading.Thread(target=run_connection, args=(sock, addr, context), daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible upstream for tests")
    add_server_args(parser)
    args = parser.parse_args(argv)
    if args.host == "localhost":
        args.host = "127.0.0.1"
    if not args.host.startswith("127."):
        parser.error("the fake upstream binds loopback (127.x.x.x) only")
    serve(args.host, args.port, tls_context(parser, args))


if __name__ == "__main__":
    main()
