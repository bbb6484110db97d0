"""The request path: one Exchange per request, from the client's headers to the last streamed byte.

Per request: classify the client's headers in one pass, resolve the route, read the body, open
the upstream (while watching the client socket, so a client that leaves during a long wait for
the first token closes the upstream within a moment), then stream the upstream body through
unchanged, and write one access line when the exchange ends, however it ends.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import socket
import time
import uuid
from urllib.parse import quote

import flask
import gevent
import urllib3

from common.jsonlog import mask_text
from proxyapp.config import ProxyConfig
from proxyapp.errors import ClientError, ClientGone, ExchangeAborted, error_body
from proxyapp.keepalive import is_event_stream, with_keepalive
from proxyapp.logs import access_log, body_for_log, headers_for_log, log_access
from proxyapp.routing import Decision, Rejection, Router, extract_credential
from proxyapp.upstream import (
    SKIP_HEADER,
    UpstreamClient,
    UpstreamError,
    body_chunks,
    describe_stream_error,
    open_upstream,
)
from proxyapp.usage import FIELDS as USAGE_FIELDS
from proxyapp.usage import UsageMeter, request_fields

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")

# Request headers that never go upstream as they came (hop-by-hop, framing, our own).
_DROP = 0
_AUTHORIZATION = 1
_X_API_KEY = 2
_REQUEST_ID_HEADER = 3
_CONNECTION = 4
_TE = 5
_XFF = 6
_REQUEST_HEADER_KIND = {
    "authorization": _AUTHORIZATION,
    "x-api-key": _X_API_KEY,
    "x-request-id": _REQUEST_ID_HEADER,
    "connection": _CONNECTION,
    "te": _TE,
    "x-forwarded-for": _XFF,
    "host": _DROP,
    "content-length": _DROP,
    "transfer-encoding": _DROP,
    "expect": _DROP,
    "keep-alive": _DROP,
    "proxy-connection": _DROP,
    "proxy-authenticate": _DROP,
    "proxy-authorization": _DROP,
    "trailer": _DROP,
    "upgrade": _DROP,
    "http2-settings": _DROP,
}
_HOP_BY_HOP_RESPONSE = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_NO_BODY_STATUS = frozenset({204, 304})
_STREAM_ERRORS = (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException, ValueError)
_PID = os.getpid()


def _now() -> float:
    return time.perf_counter()


_monotonic = time.monotonic


class Forwarder:
    """Everything fixed for the life of the worker: config, router, session, limits."""

    def __init__(self, config: ProxyConfig, router: Router, upstream: UpstreamClient, metrics=None) -> None:
        self.config = config
        self.metrics = metrics
        self.router = router
        self.upstream = upstream
        self.timeout = (config.upstream_connect_timeout, config.upstream_read_timeout)
        self.total_timeout = config.upstream_total_timeout
        self.log_body_max = config.log_body_max_bytes
        self.max_body = config.max_body_bytes
        self.sse_keepalive = config.sse_keepalive_seconds
        self.loop = gevent.get_hub().loop
        self.in_flight = 0

    def handle(self, environ: dict) -> flask.Response:
        return Exchange(self, environ).run()


class Exchange:
    """One request and its response. ``finish`` runs exactly once and writes the access line."""

    def __init__(self, forwarder: Forwarder, environ: dict) -> None:
        self.fw = forwarder
        self.environ = environ
        self.started = _now()
        self.handler = environ.get("proxy.handler")
        self.method = environ["REQUEST_METHOD"]
        self.status = 0
        self.end_reason = "complete"
        self.error: str | None = None
        self.abort_reason: str | None = None
        self.decision: Decision | None = None
        self.secrets: tuple[str, ...] = ()
        self.request_body = b""
        self.response_headers: list[tuple[str, str]] = []
        self.response_bytes = 0
        self.response_capture = bytearray()
        self.upstream_ms: float | None = None
        self.first_byte_at: float | None = None
        self.raw = None
        self.meter: UsageMeter | None = None
        self.usage_result: dict[str, int | None] | None = None
        self.is_stream = False
        self.model: str | None = None
        self.stream_requested: bool | None = None
        self.finished = False
        self.active = False
        self._watch = None
        self._timer = None
        self._idle_timer = None
        self.waiting_since: float | None = None  # when we started waiting for the upstream's next byte

    # -- the request

    def run(self) -> flask.Response:
        self._classify_headers()
        decision = self.fw.router.resolve(self.credential)
        if isinstance(decision, Rejection):
            if self.credential is not None:
                self.secrets = (self.credential.token,)
            return self._error(decision.status, decision.code, decision.message, decision.retry_after)
        self.decision = decision
        self.secrets = decision.secrets
        try:
            self.request_body = self._read_body()
        except ClientError as err:
            if self.handler is not None:
                self.handler.close_connection = True
            return self._error(err.status, err.code, err.message)
        except ClientGone:
            self.end_reason = "client_gone"
            return self._abort_connection()
        return self._forward()

    def _classify_headers(self) -> None:
        """One pass over the client's headers: what goes upstream, and what we need ourselves."""
        environ = self.environ
        handler = self.handler
        headers = handler.request_headers if handler is not None else _headers_from_environ(environ)
        self.request_headers = headers
        forward: dict[str, tuple[str, str]] = {}
        authorization = x_api_key = request_id = xff = None
        connection_tokens = ""
        kinds = _REQUEST_HEADER_KIND
        for name, value in headers:
            lower = name.lower()
            kind = kinds.get(lower)
            if kind is None:
                previous = forward.get(lower)
                if previous is None:
                    forward[lower] = (name, value)
                else:
                    joiner = "; " if lower == "cookie" else ", "
                    forward[lower] = (name, previous[1] + joiner + value)
            elif kind == _AUTHORIZATION:
                authorization = value
            elif kind == _X_API_KEY:
                x_api_key = value
            elif kind == _REQUEST_ID_HEADER:
                request_id = value
            elif kind == _CONNECTION:
                connection_tokens += "," + value
            elif kind == _TE:
                if "trailers" in value.lower():
                    forward["te"] = ("TE", "trailers")
            elif kind == _XFF:
                xff = value if xff is None else xff + ", " + value
        if connection_tokens:
            for token in connection_tokens.split(","):
                token = token.strip().lower()
                if token and token != "te":
                    forward.pop(token, None)
        self.forward_headers = forward
        self.authorization = authorization
        self.x_api_key = x_api_key
        self.xff = xff
        self.credential = extract_credential(authorization, x_api_key)
        if request_id is None or not _REQUEST_ID.fullmatch(request_id):
            request_id = uuid.uuid4().hex
        self.request_id = request_id

    def _read_body(self) -> bytes:
        stream = self.environ["wsgi.input"]
        read_all = getattr(stream, "read_all", None)
        if read_all is not None:
            return read_all()
        length = int(self.environ.get("CONTENT_LENGTH") or 0)  # under a foreign WSGI server
        if length > self.fw.max_body:
            raise ClientError(413, "body_too_large", f"Request body over {self.fw.max_body} bytes.")
        return stream.read(length) if length else b""

    def _upstream_request_headers(self) -> dict[str, str]:
        decision = self.decision
        headers = {name: value for name, value in self.forward_headers.values()}
        if decision.auth_header is not None:
            headers[decision.auth_header[0]] = decision.auth_header[1]
        else:  # legacy mode without override: the client's own credential goes through
            if self.authorization is not None:
                headers["Authorization"] = self.authorization
            if self.x_api_key is not None:
                headers["x-api-key"] = self.x_api_key
        client_ip = self.environ.get("REMOTE_ADDR", "")
        if client_ip:
            headers["X-Forwarded-For"] = f"{self.xff}, {client_ip}" if self.xff else client_ip
        elif self.xff:
            headers["X-Forwarded-For"] = self.xff
        headers["X-Request-ID"] = self.request_id
        # Add nothing of our own: urllib3 would add User-Agent, http.client Accept-Encoding.
        if "user-agent" not in self.forward_headers:
            headers["User-Agent"] = SKIP_HEADER
        if "accept-encoding" not in self.forward_headers:
            headers["Accept-Encoding"] = SKIP_HEADER
        if self.request_body or self.method in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(self.request_body))
        return headers

    # -- the upstream

    def _forward(self) -> flask.Response:
        upstream = self.decision.route.upstream
        environ = self.environ
        query = environ.get("QUERY_STRING", "")
        raw_path = self.handler.raw_path if self.handler is not None else _raw_path(environ)
        target = upstream.base_path + raw_path + ("?" + query if query else "")
        url = upstream.origin + target
        headers = self._upstream_request_headers()
        self._arm()
        try:
            response = open_upstream(
                self.fw.upstream,
                self.method,
                url,
                headers,
                self.request_body if "Content-Length" in headers else None,
                self.fw.timeout,
                target,
                upstream.origin,
            )
        except UpstreamError as err:
            self._disarm()
            self.error = err.detail
            self.end_reason = "upstream_error" if err.status == 502 else "upstream_timeout"
            return self._error(err.status, err.code, err.message)
        except ExchangeAborted as aborted:
            self._disarm()
            if aborted.reason == "total_timeout":
                self.end_reason = "total_timeout"
                return self._error(504, "upstream_timeout", "The upstream did not finish in time.")
            self.end_reason = aborted.reason
            return self._abort_connection()
        self.upstream_ms = (_now() - self.started) * 1000
        raw = self.raw = response.raw
        self.status = status = raw.status
        self.response_headers = out = self._response_headers(raw)
        out.append(("X-Request-ID", self.request_id))
        if is_event_stream(raw.headers.get("Content-Type")):
            # An nginx in front passes the stream unbuffered even where proxy_buffering is on.
            out[:] = [item for item in out if item[0].lower() != "x-accel-buffering"]
            out.append(("X-Accel-Buffering", "no"))
        status_line = f"{status} {raw.reason or _reason(status)}"
        if self.method == "HEAD" or status in _NO_BODY_STATUS or status < 200:
            self._disarm()
            self._release_upstream(complete=True)
            return ProxyResponse(status_line, out, EmptyBody(self.finish))
        return ProxyResponse(status_line, out, self._stream())

    def _response_headers(self, raw) -> list[tuple[str, str]]:
        items = list(raw.headers.items())
        drop = _HOP_BY_HOP_RESPONSE
        for name, value in items:
            if name.lower() == "connection":
                drop = drop | {t.strip().lower() for t in value.split(",")}
        if raw.chunked or raw.status in _NO_BODY_STATUS:
            drop = drop | {"content-length"}
        return [(name, value) for name, value in items if name.lower() not in drop]

    def _stream(self):
        raw = self.raw
        capture_left = self.fw.log_body_max
        content_type = raw.headers.get("Content-Type")
        self._watch_upstream_silence(raw)
        chunks = body_chunks(raw)
        if self.fw.sse_keepalive and is_event_stream(content_type):
            chunks = with_keepalive(chunks, self.fw.sse_keepalive)
        if is_event_stream(content_type) and self.fw.metrics is not None:
            self.is_stream = True
            self.fw.metrics.in_flight_streams += 1
        meter = UsageMeter(content_type, raw.headers.get("Content-Encoding"))
        if meter.mode is not None:
            self.meter = meter
        else:
            meter = None
        try:
            for chunk in chunks:
                if self.first_byte_at is None:
                    self.first_byte_at = _now()
                self.response_bytes += len(chunk)
                if capture_left > 0:
                    self.response_capture += chunk[:capture_left]
                    capture_left -= len(chunk)
                self.waiting_since = None
                yield chunk
                self.waiting_since = _monotonic()
                if meter is not None:  # after the yield: metering never delays a byte
                    meter.feed(chunk)
            self.end_reason = "complete"
        except ExchangeAborted as aborted:
            self.end_reason = aborted.reason
            raise ClientGone(aborted.reason) from None
        except GeneratorExit:
            handler = self.handler
            self.end_reason = self.abort_reason or (handler and handler.client_failure) or "client_gone"
            raise
        except _STREAM_ERRORS as exc:
            # End the client's response without a clean last chunk, so it can tell it is cut short.
            self.end_reason = "upstream_error"
            self.error = describe_stream_error(exc)
            raise ClientGone("upstream_error") from None
        finally:
            self.finish()

    # -- watching the client and the deadline while the upstream works

    def _arm(self) -> None:
        self.active = True
        self.fw.in_flight += 1
        handler = self.handler
        loop = self.fw.loop
        self.greenlet = gevent.getcurrent()
        if handler is not None:
            self._client_sock = handler.socket._sock
            self._watch = loop.io(handler.socket.fileno(), 1)
            self._watch.start(self._on_client_readable)
        if self.fw.total_timeout:
            self._timer = loop.timer(self.fw.total_timeout)
            self._timer.start(self._abort, "total_timeout")

    def _watch_upstream_silence(self, raw) -> None:
        """UPSTREAM_READ_TIMEOUT while the body streams, with one periodic check per exchange.

        A socket timeout would make gevent create and cancel a timer on every wait for the next
        chunk; per event, that cost more than forwarding it. urllib3 sets the socket's timeout
        again when the connection is next used."""
        sock = getattr(raw._connection, "sock", None) if raw._connection is not None else None
        if sock is None:
            return
        sock.settimeout(None)
        self.waiting_since = _monotonic()
        period = min(self.fw.timeout[1], 1.0)
        self._idle_timer = self.fw.loop.timer(period, period)
        self._idle_timer.start(self._check_upstream_silence)

    def _check_upstream_silence(self) -> None:
        since = self.waiting_since
        if since is not None and _monotonic() - since >= self.fw.timeout[1]:
            self._abort("upstream_timeout")

    def _disarm(self) -> None:
        if self.active:
            self.active = False
            self.fw.in_flight -= 1
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        if self._idle_timer is not None:
            self._idle_timer.stop()
            self._idle_timer = None

    def _on_client_readable(self) -> None:
        try:
            data = self._client_sock.recv(1, socket.MSG_PEEK)  # the raw non-blocking socket
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            # The client pipelined its next request; nothing more can be learnt from this socket.
            self._watch.stop()
            return
        self._abort("client_gone")

    def _abort(self, reason: str) -> None:
        # Runs in the hub (a watcher callback): stop the request's greenlet wherever it waits.
        if not self.active:
            return
        self.abort_reason = reason
        self._disarm()
        self.greenlet.throw(ExchangeAborted(reason))

    # -- endings

    def _release_upstream(self, complete: bool) -> None:
        raw = self.raw
        if raw is None:
            return
        try:
            if not complete:
                raw.close()  # the upstream sees its connection closed and stops generating
            raw.release_conn()
        except Exception:  # never let cleanup hide the request's own outcome
            pass

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._disarm()
        self._release_upstream(complete=self.end_reason == "complete")
        self.usage_result = self._usage()
        if self.request_body:  # read here, not before forwarding: it never delays the upstream call
            content_type = self.forward_headers.get("content-type")
            self.model, self.stream_requested = request_fields(
                self.request_body, content_type[1] if content_type else None
            )
        self._log()
        metrics = self.fw.metrics
        if metrics is not None:
            if self.is_stream:
                metrics.in_flight_streams -= 1
            metrics.observe(self)

    def _error(self, status: int, code: str, message: str, retry_after: int | None = None) -> flask.Response:
        self.status = status
        if self.end_reason == "complete":
            self.end_reason = "rejected" if status < 500 else "error"
        self.error = self.error or message
        body = error_body(status, code, message, self.request_id)
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("X-Request-ID", self.request_id),
        ]
        if retry_after is not None:
            headers.append(("Retry-After", str(retry_after)))
        self.response_headers = headers
        self.response_capture = bytearray(body)
        self.response_bytes = len(body)
        return ProxyResponse(f"{status} {_reason(status)}", headers, EmptyBody(self.finish, body))

    def _abort_connection(self) -> flask.Response:
        self.status = 499  # nginx's "client closed request": nothing is sent
        self.finish()
        return AbortConnection()

    def _log(self) -> None:
        if not access_log.isEnabledFor(logging.INFO):  # LOG_LEVEL=warn: build nothing
            return
        now = _now()
        environ = self.environ
        secrets = self.secrets
        limit = self.fw.log_body_max
        decision = self.decision
        route = decision.route if decision is not None else None
        upstream = route.upstream if route is not None else None
        request_body, request_truncated = body_for_log(
            self.request_body, len(self.request_body), limit, secrets
        )
        encoding = None
        for name, value in self.response_headers:
            if name.lower() == "content-encoding":
                encoding = value
        response_body, response_truncated = body_for_log(
            bytes(self.response_capture), self.response_bytes, limit, secrets, encoding
        )
        query = environ.get("QUERY_STRING", "")
        first = self.first_byte_at
        log_access(
            {
                "request_id": self.request_id,
                "method": self.method,
                "path": mask_text(environ.get("PATH_INFO", ""), secrets),
                "query": mask_text(query, secrets) if query else "",
                "client_ip": environ.get("REMOTE_ADDR", ""),
                "status": self.status,
                "end_reason": self.end_reason,
                "error": mask_text(self.error, secrets) if self.error else None,
                "latency_ms": round((now - self.started) * 1000, 2),
                "upstream_ms": round(self.upstream_ms, 2) if self.upstream_ms is not None else None,
                "ttfb_ms": round((first - self.started) * 1000, 2) if first is not None else None,
                "request_size_bytes": len(self.request_body),
                "response_size_bytes": self.response_bytes,
                "token_id": route.token_id if route is not None else None,
                "ai_model_name": upstream.model_name if upstream is not None else None,
                "upstream": upstream.host if upstream is not None else None,
                "request_headers": headers_for_log(self.request_headers, secrets),
                "response_headers": headers_for_log(self.response_headers, secrets),
                "request_body": request_body,
                "request_body_truncated": request_truncated,
                "response_body": response_body,
                "response_body_truncated": response_truncated,
                "model": self.model,
                "stream": self.stream_requested,
                **self.usage_result,
            }
        )

    def _usage(self) -> dict[str, int | None]:
        meter = self.meter
        if meter is None:
            return dict.fromkeys(USAGE_FIELDS)
        meter.finish()  # what was counted so far, also when the client left early
        return meter.result()


def _reason(status: int) -> str:
    try:
        return http.client.responses[status]
    except KeyError:
        return "Unknown"


def _raw_path(environ: dict) -> str:
    return environ.get("RAW_URI", "").partition("?")[0] or quote(environ.get("PATH_INFO", "/"))


def _headers_from_environ(environ: dict) -> list[tuple[str, str]]:
    headers = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers.append((key[5:].replace("_", "-").title(), value))
    if environ.get("CONTENT_TYPE"):
        headers.append(("Content-Type", environ["CONTENT_TYPE"]))
    return headers


class EmptyBody:
    """A fixed body (maybe empty) whose close() ends the exchange. Has a length, so pywsgi frames it
    with Content-Length instead of chunked (which would put bytes after a HEAD response)."""

    __slots__ = ("_chunks", "_on_close")

    def __init__(self, on_close, body: bytes = b"") -> None:
        self._chunks = (body,) if body else ()
        self._on_close = on_close

    def __iter__(self):
        return iter(self._chunks)

    def __len__(self) -> int:
        return len(self._chunks)

    def close(self) -> None:
        self._on_close()


class ProxyResponse(flask.Response):
    """A response passed to the WSGI server as-is: the upstream's status line and header list
    (repeated headers kept apart, nothing added, no Content-Type invented) and the body iterable."""

    def __init__(self, status_line: str, headers: list[tuple[str, str]], body) -> None:
        # Werkzeug's Response machinery (Headers copies, default mimetype) is skipped on purpose.
        self._status_line = status_line
        self._header_list = headers
        self._body = body

    def __call__(self, environ, start_response):
        start_response(self._status_line, self._header_list)
        return self._body


class AbortConnection(flask.Response):
    """Close the client connection without a response (the client is already gone)."""

    def __init__(self) -> None:
        pass

    def __call__(self, environ, start_response):
        raise ClientGone()
