"""The HTTP/1.1 server layer: gevent.pywsgi with a strict request reader, timeouts and a drain.

gevent.pywsgi is lenient by design (CL+TE, bare CR, obs-fold... all pass) and has no idle,
header, body or send timeouts. ``ProxyHandler`` replaces its request reading with a strict one:
anything whose framing is in doubt gets a JSON 4xx and the connection is closed. It also sets
TCP_NODELAY (without it every keep-alive response waits ~40 ms for a delayed ACK) and writes
the status line, headers and first chunk in one send.

The app gets the request as a ``proxyapp.head.RequestHead`` (environ["proxy.head"]): the only
interface between this layer and the request path. A request refused here gets the same JSON error
(``errors.error_response``) and the same access line (``logs.AccessRecord``) as one refused by the
app, with the client's X-Request-ID when it is valid and was read before the fault.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

import gevent
from gevent import Timeout, getcurrent
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer

from proxyapp.errors import ClientError, ClientGone, error_response
from proxyapp.head import RequestHead, decode_path, request_id_in
from proxyapp.head import request_id as valid_or_new_request_id
from proxyapp.logs import AccessRecord

log = logging.getLogger("proxy.server")

MAX_REQUEST_LINE = 8192
MAX_HEADER_BYTES = 32 * 1024
MAX_HEADER_FIELDS = 100
MAX_CHUNK_LINE = 1024
MAX_TRAILER_BYTES = 8192
DISCARD_LIMIT = 64 * 1024

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])\r\n")
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):([^\x00-\x08\x0a-\x1f\x7f]*)\r\n")
_DIGITS = re.compile(r"[0-9]{1,18}")
_CODINGS = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:[ \t]*,[ \t]*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")
_HOST = re.compile(r"[A-Za-z0-9.\-_~%!$&'()*+,;=\[\]]*(?::[0-9]*)?")
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,15})((?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:=[^\x00-\x1f\x7f]*)?)*)\r\n"
)
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_DECODED_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


class _HeaderTimeout(Exception):
    pass


def _bad(message: str, code: str = "bad_request", status: int = 400) -> ClientError:
    return ClientError(status, code, message)


def check_path(path: str) -> None:
    """Reject dot segments (raw or percent-encoded), NUL/CR/LF and other controls, bad escapes."""
    decoded = path
    if "%" in path:
        if _BAD_PERCENT.search(path):
            raise _bad("Malformed percent-encoding in the path.")
        raw = unquote_to_bytes(path)
        if _DECODED_CONTROL.search(raw):
            raise _bad("Control characters in the path.")
        decoded = raw.decode("latin-1")
    if "." in decoded:
        for segment in decoded.replace("\\", "/").split("/"):
            if segment in (".", ".."):
                raise _bad("Dot segments are not allowed in the path.")


class BodyReader:
    """wsgi.input: reads the whole request body strictly, with a size limit and an inactivity timeout.

    Nothing is read until the app asks (so a 401 can be answered to ``Expect: 100-continue``
    without reading the body). Errors are ClientError (400/413/408) or ClientGone.
    """

    def __init__(self, handler: ProxyHandler, length: int, chunked: bool, expect_continue: bool) -> None:
        self._handler = handler
        self._length = length
        self._chunked = chunked
        self._expect_continue = expect_continue
        self._body: bytes | None = None if (chunked or length) else b""
        self._offset = 0

    @property
    def consumed(self) -> bool:
        return self._body is not None

    def read_all(self) -> bytes:
        if self._body is None:
            handler = self._handler
            limit = handler.server.max_body_bytes
            if not self._chunked and self._length > limit:
                raise ClientError(413, "body_too_large", f"Request body over {limit} bytes.")
            if self._expect_continue and not handler.headers_sent:
                handler.socket.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                self._expect_continue = False
            handler.socket.settimeout(handler.server.client_body_timeout)
            try:
                self._body = self._read_chunked(limit) if self._chunked else self._read_exactly(self._length)
            except TimeoutError:
                raise ClientError(408, "body_timeout", "Request body not received in time.") from None
        return self._body

    def read(self, size: int | None = -1) -> bytes:
        body = self.read_all()
        if size is None or size < 0:
            size = len(body) - self._offset
        data = body[self._offset : self._offset + size]
        self._offset += len(data)
        return data

    def _read_exactly(self, count: int) -> bytes:
        data = self._handler.rfile.read(count)
        if len(data) < count:
            raise ClientGone()
        return data

    def _read_chunked(self, limit: int) -> bytes:
        rfile = self._handler.rfile
        parts = []
        total = 0
        while True:
            line = rfile.readline(MAX_CHUNK_LINE + 1)
            if not line:
                raise ClientGone()
            match = _CHUNK_LINE.fullmatch(line)
            if match is None:
                raise _bad("Invalid chunk size line in the request body.")
            size = int(match.group(1), 16)
            if size == 0:
                break
            total += size
            if total > limit:
                raise ClientError(413, "body_too_large", f"Request body over {limit} bytes.")
            parts.append(self._read_exactly(size))
            if self._read_exactly(2) != b"\r\n":
                raise _bad("Chunk data not followed by CRLF.")
        # Trailers are read and dropped: never forwarded, so nothing can be smuggled through them.
        trailer_bytes = 0
        while True:
            line = rfile.readline(MAX_TRAILER_BYTES + 1)
            if not line:
                raise ClientGone()
            trailer_bytes += len(line)
            if line == b"\r\n":
                break
            if trailer_bytes > MAX_TRAILER_BYTES or _HEADER_LINE.fullmatch(line) is None:
                raise _bad("Invalid trailer section in the chunked request body.")
        return b"".join(parts)

    def _discard(self) -> None:
        """Called by pywsgi after the response: drain a small unread body to keep the connection
        usable, otherwise close it (the rest of the body would be read as the next request)."""
        if self._body is not None:
            return
        handler = self._handler
        if self._chunked or self._expect_continue or self._length > DISCARD_LIMIT:
            handler.close_connection = True
            return
        try:
            with Timeout(1.0, False):
                self._body = b""
                if len(handler.rfile.read(self._length)) == self._length:
                    return
            handler.close_connection = True
        except OSError:
            handler.close_connection = True


class ProxyHandler(WSGIHandler):
    """pywsgi's handler with a strict request reader, client timeouts and a graceful drain."""

    server: ProxyServer
    request_headers: list[tuple[str, str]] | tuple = ()  # of the current request, as far as read
    raw_path = ""
    query = ""
    request_id = ""
    client_failure: str | None = None  # why the last write to the client failed
    served = 0  # requests answered on this connection
    _linger = False

    def handle(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.greenlet = getcurrent()
        try:
            while self.socket is not None:
                self.time_start = time.time()
                self.time_finish = 0
                result = self.handle_one_request()
                if result is None:
                    break
                if result is True:
                    continue
                self.status, response_body = result
                self._linger = True
                self.socket.sendall(response_body)
                break
        except (OSError, Timeout):
            pass
        finally:
            self._close_socket()

    def _close_socket(self) -> None:
        sock = self.__dict__.pop("socket", None)
        self.__dict__.pop("rfile", None)
        self.__dict__.pop("wsgi_input", None)
        if sock is None:
            return
        try:
            if self._linger:
                # Lingering close: stop sending, then read what the client still sends for a
                # moment, so the kernel does not answer it with a RST that destroys our error
                # response before the client reads it.
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(1.0)
                deadline = time.monotonic() + 2.0
                received = 0
                while time.monotonic() < deadline and received < 1024 * 1024:
                    data = sock.recv(65536)
                    if not data:
                        break
                    received += len(data)
        except OSError:
            pass
        finally:
            try:
                sock.close()
            except OSError:
                pass

    # -- reading the request

    def _await_request_line(self) -> bytes | None:
        """Wait up to the idle timeout for the first byte, then read the request line under the
        header deadline. None means close quietly (timeout, EOF, drain)."""
        server = self.server
        # While draining, a connection that was queued before the listener closed still gets its
        # first request served, but only if it comes soon.
        self.socket.settimeout(server.client_idle_timeout if not server.draining else 1.0)
        server.idle_handlers.add(self)
        try:
            if not self.rfile.peek(1):
                return None
        except OSError:
            return None
        finally:
            server.idle_handlers.discard(self)
        self._header_timer = Timeout(server.client_header_timeout, _HeaderTimeout)
        self._header_timer.start()
        self.socket.settimeout(None)
        try:
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        except (OSError, _HeaderTimeout):
            self._header_timer.close()
            return None
        if not line:
            self._header_timer.close()
        return line or None

    def handle_one_request(self):
        if self.rfile.closed or (self.server.draining and self.served):
            return None
        line = self._await_request_line()
        if line is None:
            return None
        self.response_length = 0
        self.requestline = line.decode("latin-1").rstrip("\r\n")
        try:
            self._read_request(line)
        except ClientError as err:
            return self._error_response(err)
        except _HeaderTimeout:
            return self._error_response(
                ClientError(408, "header_timeout", "Request headers not received in time.")
            )
        except OSError:
            return None
        finally:
            self._header_timer.close()
        self.environ = self.get_environ()
        self.application = self.server.application
        self.handle_one_response()
        self.served += 1
        if self.close_connection or self.rfile.closed:
            return None
        return True

    def _read_request(self, line: bytes) -> None:
        self.command = None
        self.raw_path = self.query = ""
        self.request_headers = ()
        if len(line) > MAX_REQUEST_LINE:
            raise ClientError(414, "uri_too_long", f"Request line over {MAX_REQUEST_LINE} bytes.")
        match = _REQUEST_LINE.fullmatch(line)
        if match is None:
            raise _bad("Malformed request line.")
        major, minor = int(match.group(3)), int(match.group(4))
        if major != 1 or minor not in (0, 1):
            raise ClientError(505, "http_version_not_supported", "Only HTTP/1.0 and HTTP/1.1 are supported.")
        self.command = match.group(1).decode("latin-1")
        self.request_version = f"HTTP/1.{minor}"
        target = match.group(2).decode("latin-1")
        if not target.startswith("/"):
            raise _bad("Only origin-form request targets (a path starting with '/') are accepted.")
        path, _, self.query = target.partition("?")
        if "#" in target:
            raise _bad("Fragments are not allowed in the request target.")
        check_path(path)
        self.path = target
        self.raw_path = path
        self.request_headers = headers = []
        self._read_headers(headers, len(line))
        self._check_framing(headers, minor)

    def _read_headers(self, headers: list[tuple[str, str]], used: int) -> None:
        """Append the header fields to ``headers`` (the part read stays there if one is bad)."""
        rfile = self.rfile
        while True:
            raw = rfile.readline(MAX_HEADER_BYTES + 1)
            if not raw:
                raise ClientGone()
            used += len(raw)
            if used > MAX_HEADER_BYTES:
                raise ClientError(431, "headers_too_large", f"Request headers over {MAX_HEADER_BYTES} bytes.")
            if raw == b"\r\n":
                return
            if len(headers) >= MAX_HEADER_FIELDS:
                raise ClientError(431, "too_many_headers", f"More than {MAX_HEADER_FIELDS} header fields.")
            match = _HEADER_LINE.fullmatch(raw)
            if match is None:
                if raw[:1] in (b" ", b"\t"):
                    raise _bad("Obsolete line folding in headers is not accepted.")
                raise _bad("Malformed header line.")
            headers.append((match.group(1).decode("latin-1"), match.group(2).strip(b" \t").decode("latin-1")))

    def _check_framing(self, headers: list[tuple[str, str]], minor: int) -> None:
        hosts = []
        lengths = []
        codings = []
        connection = ""
        expect = ""
        rid = None
        for name, value in headers:
            lower = name.lower()
            if lower == "host":
                hosts.append(value)
            elif lower == "content-length":
                lengths.append(value)
            elif lower == "transfer-encoding":
                codings.append(value)
            elif lower == "connection":
                connection = (connection + "," + value).lower() if connection else value.lower()
            elif lower == "expect":
                expect = value.lower()
            elif lower == "x-request-id":
                rid = value
        self.request_id = valid_or_new_request_id(rid)
        if len(hosts) > 1 or (minor == 1 and not hosts):
            raise _bad("Exactly one Host header is required.")
        if hosts and not _HOST.fullmatch(hosts[0]):
            raise _bad("Malformed Host header.")
        if codings and lengths:
            raise _bad("Both Content-Length and Transfer-Encoding: refusing an ambiguous body.")
        if codings:
            if minor == 0:
                raise _bad("Transfer-Encoding is not allowed in HTTP/1.0 requests.")
            if len(codings) > 1 or codings[0].lower() != "chunked":
                if len(codings) == 1 and _CODINGS.fullmatch(codings[0]):
                    raise ClientError(501, "unsupported_transfer_encoding", "Only chunked is supported.")
                raise _bad("Invalid Transfer-Encoding.")
        if len(lengths) > 1:
            raise _bad("More than one Content-Length header.")
        if lengths and not _DIGITS.fullmatch(lengths[0]):
            raise _bad("Invalid Content-Length.")
        self.content_length = int(lengths[0]) if lengths else 0
        self.chunked_input = bool(codings)
        self.expect_continue = expect == "100-continue" and minor == 1
        tokens = {t.strip() for t in connection.split(",")} if connection else set()
        if minor == 1:
            self.close_connection = "close" in tokens
        else:
            self.close_connection = "keep-alive" not in tokens

    def get_environ(self) -> dict:
        env = self.server.get_environ()
        env["REQUEST_METHOD"] = self.command
        env["SCRIPT_NAME"] = ""
        path = self.raw_path
        env["PATH_INFO"] = decode_path(path)
        env["QUERY_STRING"] = self.query
        env["RAW_URI"] = env["REQUEST_URI"] = self.path
        env["SERVER_PROTOCOL"] = self.request_version
        address = self.client_address
        client_ip = ""
        if isinstance(address, tuple):
            env["REMOTE_ADDR"] = client_ip = str(address[0])
            env["REMOTE_PORT"] = str(address[1])
        for name, value in self.request_headers:
            if "_" in name:
                continue  # X_Foo would spoof HTTP_X_FOO; still forwarded from the raw list
            key = name.upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
            if key in env:
                env[key] += ("; " if key == "HTTP_COOKIE" else ",") + value
            else:
                env[key] = value
        if self.chunked_input:
            env.pop("CONTENT_LENGTH", None)
        self.wsgi_input = BodyReader(self, self.content_length, self.chunked_input, self.expect_continue)
        env["wsgi.input"] = self.wsgi_input
        env["wsgi.input_terminated"] = True
        env["proxy.head"] = RequestHead(
            self.command,
            self.path,
            path,
            self.query,
            self.request_headers,
            client_ip,
            self.request_id,
            self.wsgi_input,
            self.socket._sock,
            self,
        )
        return env

    # -- writing the response

    def _error_response(self, err: ClientError) -> tuple[str, bytes]:
        rid = request_id_in(self.request_headers)
        status_line, headers, body = error_response(
            err.status, err.code, err.message, rid, (("Connection", "close"),)
        )
        head = "".join([f"HTTP/1.1 {status_line}\r\n", *(f"{n}: {v}\r\n" for n, v in headers), "\r\n"])
        address = self.client_address
        record = AccessRecord(
            rid,
            self.command,
            decode_path(self.raw_path),
            self.query,
            str(address[0]) if isinstance(address, tuple) else str(address),
            None,
            status=err.status,
            end_reason="bad_request",
            error=err.message,
        )
        self.server.on_rejected_request(record)
        return (str(err.status), head.encode("latin-1") + body)

    def start_response(self, status, headers, exc_info=None):
        write = super().start_response(status, headers, exc_info)
        if self.server.draining and not self.close_connection and self.code != 101:
            self.response_headers.append((b"Connection", b"close"))
            self.close_connection = True
        return write

    def process_result(self) -> None:
        # pywsgi's loop, with its per-chunk path (write, then _write: a bytearray built in three
        # appends, then _sendall) cut to one formatting and one send once the headers are out.
        # It runs once per forwarded SSE event.
        sendall = self._sendall
        if self.code == 101:
            self.write(b"")  # a WebSocket upgrade: its head goes out now, the body is the relay
        for data in self.result:
            if not data:
                continue
            if not self.headers_sent:
                self.write(data)  # status line, headers and this first chunk in one send
            elif self.response_use_chunked:
                sendall(b"%x\r\n%b\r\n" % (len(data), data))
            else:
                sendall(data)
        if self.status and not self.headers_sent:
            self.write(b"")  # an empty body: the headers still go out
        if self.response_use_chunked:
            sendall(b"0\r\n\r\n")

    def _write_with_headers(self, data) -> None:
        # One send for the status line, headers and first chunk.
        self.headers_sent = True
        self.finalize_headers()
        self.socket.settimeout(self.server.client_send_timeout)
        towrite = bytearray(b"HTTP/1.1 ")
        towrite += self.status
        towrite += b"\r\n"
        for header, value in self.response_headers:
            towrite += header
            towrite += b": "
            towrite += value
            towrite += b"\r\n"
        towrite += b"\r\n"
        if data:
            if self.response_use_chunked:
                towrite += b"%x\r\n" % len(data)
                towrite += data
                towrite += b"\r\n"
            else:
                towrite += data
        self._sendall(towrite)

    def _sendall(self, data) -> None:
        try:
            # One non-blocking send first: it takes the whole of a small response or SSE event.
            # gevent's sendall would also ask the kernel for SO_SNDBUF on every call.
            try:
                sent = self.socket._sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                self.socket.sendall(memoryview(data)[sent:])  # waits, within CLIENT_SEND_TIMEOUT
        except TimeoutError:
            # A client that stops reading: give up on it (pywsgi closes quietly on ECONNRESET).
            self.close_connection = True
            self.client_failure = "client_send_timeout"
            raise ClientGone(self.client_failure) from None
        except OSError:
            self.close_connection = True
            self.client_failure = "client_gone"
            raise ClientGone() from None
        self.response_length += len(data)

    def log_request(self) -> None:
        pass  # the app writes one JSON access line per request


class ProxyServer(WSGIServer):
    """WSGIServer with the client limits, the idle-connection registry and a graceful drain."""

    handler_class = ProxyHandler
    # gevent accepts up to 100 connections per wake of the listener, and each new request's set-up
    # (~0.5 ms of CPU) then runs before the loop gets back to the streams in flight: a burst of
    # new streams stalled every running one. 8 per turn keeps it fair (stream1000, 1 worker, 3 runs
    # each: first event p99 1,151 -> 283 ms, event delay p99 352 -> 152 ms, medians).
    max_accept = 8

    def __init__(self, listener, application, *, config, on_rejected_request: Callable | None = None):
        self.client_idle_timeout = config.client_idle_timeout
        self.client_header_timeout = config.client_header_timeout
        self.client_body_timeout = config.client_body_timeout
        self.client_send_timeout = config.client_send_timeout
        self.max_body_bytes = config.max_body_bytes
        self.graceful_timeout = config.graceful_timeout
        self.draining = False
        self.idle_handlers: set[ProxyHandler] = set()
        self._on_rejected = on_rejected_request
        self.connection_pool = Pool(config.max_client_connections)
        super().__init__(listener, application, spawn=self.connection_pool, log=None, error_log=_ErrorLog())

    def on_rejected_request(self, record: AccessRecord) -> None:
        """A request refused by this layer: its access record (wsgi.py logs it)."""
        if self._on_rejected is not None:
            self._on_rejected(record)

    def drain(self) -> None:
        """Stop accepting, close idle keep-alive connections, let requests in flight finish."""
        self.draining = True
        self.stop_accepting()
        # Connections the kernel already queued on this socket would be reset by close(): with
        # SO_REUSEPORT they are ours alone, so accept and serve them before closing.
        while True:
            try:
                accepted = self.do_read()
            except OSError:
                break
            if not accepted:
                break
            self.do_handle(*accepted)
        self.close()
        self._close_idle()

    def _close_idle(self) -> None:
        for handler in list(self.idle_handlers):
            if handler.served:
                handler.greenlet.kill(block=False)

    def wait_drained(self, timeout: float) -> bool:
        """True when every connection finished within ``timeout``; the rest are killed."""
        deadline = time.monotonic() + timeout
        while self.connection_pool.free_count() < self.connection_pool.size:
            self._close_idle()
            if time.monotonic() >= deadline:
                self.connection_pool.kill(block=True, timeout=1)
                return False
            gevent.sleep(0.05)
        return True


class _ErrorLog:
    """pywsgi's error log (tracebacks of unexpected handler errors) into our JSON log."""

    def write(self, message: str) -> None:
        message = message.strip()
        if message:
            log.error("server error", extra={"event": "server_error", "detail": message[-2000:]})

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass


def bind_listener(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening socket with SO_REUSEPORT, so several worker processes share one port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
