"""The request path: one Exchange per request, from the client's headers to the last streamed byte.

Per request: sort the client's headers (proxyapp.headers), resolve the route, read the body, open
the upstream while a Watchdog (proxyapp.watchdog) watches the client socket and the deadlines, then
stream the upstream body through unchanged. The AccessRecord (proxyapp.logs) is filled as the
exchange goes; ``finish`` runs exactly once, however it ends, and hands it to the access line and
the metrics. The request is read through its RequestHead (proxyapp.head) only.
"""

from __future__ import annotations

import http.client
import logging
import time

import flask
import gevent
import urllib3

from proxyapp.config import ProxyConfig
from proxyapp.errors import ClientError, ClientGone, ExchangeAborted, error_response, reason_phrase
from proxyapp.head import RequestHead, head_of
from proxyapp.headers import (
    NO_BODY_STATUS,
    ClientHeaders,
    classify_request_headers,
    client_response_headers,
    upstream_request_headers,
)
from proxyapp.keepalive import is_event_stream, with_keepalive
from proxyapp.limits import UNLIMITED, Admission, Limiter
from proxyapp.logs import AccessRecord, write_access
from proxyapp.routing import Credential, Decision, Rejection, Router
from proxyapp.stream_usage import REQUEST, UsageChunkFilter, applies, stripped, with_include_usage
from proxyapp.upstream import UpstreamClient, UpstreamError, body_chunks, describe_stream_error, open_upstream
from proxyapp.usage import FIELDS as USAGE_FIELDS
from proxyapp.usage import UsageMeter, request_fields
from proxyapp.watchdog import Watchdog
from proxyapp.websocket import (
    Relay,
    client_handshake_headers,
    detach_upstream,
    handshake_problem,
    is_accepted,
    is_websocket_handshake,
    protocol_token,
    upstream_handshake_headers,
)

_RATELIMIT_HEADERS = frozenset(
    {
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
    }
)
_STREAM_ERRORS = (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException, ValueError)
_SWITCHING = "101 Switching Protocols"
_IDENTITY = (None, "", "identity")
_NO_USAGE = dict.fromkeys(USAGE_FIELDS)
log = logging.getLogger("proxy.forward")
_now = time.perf_counter
_monotonic = time.monotonic


class Forwarder:
    """Everything fixed for the life of the worker: config, router, upstream client, limits."""

    def __init__(
        self,
        config: ProxyConfig,
        router: Router,
        upstream: UpstreamClient,
        metrics=None,
        limiter: Limiter | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.router = router
        self.upstream = upstream
        self.limiter = limiter if limiter is not None else Limiter("")
        self.timeout = (config.upstream_connect_timeout, config.upstream_read_timeout)
        # Built once: requests would build (and validate) one from the tuple for every request.
        self.upstream_timeout = urllib3.Timeout(connect=self.timeout[0], read=self.timeout[1])
        self.total_timeout = config.upstream_total_timeout
        self.log_body_max = config.log_body_max_bytes
        self.max_body = config.max_body_bytes
        self.sse_keepalive = config.sse_keepalive_seconds
        self.websocket_idle = config.websocket_idle_timeout
        self.stream_usage = config.stream_usage == REQUEST
        # Origins that answered a request with include_usage added by a 400: never asked again.
        self.usage_refused: set[str] = set()
        self.loop = gevent.get_hub().loop
        self.in_flight = 0

    def handle(self, environ: dict) -> flask.Response:
        return Exchange(self, head_of(environ, self.max_body)).run()


class Exchange:
    """One request and its response. Every outcome sets ``record.end_reason`` once: ``_error``
    (an answer of our own), ``_abort_connection`` (nothing can be sent), or the end of ``_stream``."""

    __slots__ = (
        "admission",
        "client",
        "decision",
        "finished",
        "fw",
        "head",
        "is_stream",
        "meter",
        "raw",
        "record",
        "strip_usage",
        "watchdog",
        "websocket",
    )

    def __init__(self, forwarder: Forwarder, head: RequestHead) -> None:
        self.fw = forwarder
        self.head = head
        self.record = AccessRecord(
            head.request_id,
            head.method,
            head.decoded_path,
            head.query,
            head.client_ip,
            _now(),
            request_headers=head.headers,
        )
        self.client: ClientHeaders | None = None
        self.admission: Admission = UNLIMITED
        self.decision: Decision | None = None
        self.raw = None
        self.meter: UsageMeter | None = None
        self.watchdog: Watchdog | None = None
        self.is_stream = False
        self.strip_usage = False  # include_usage was added: the usage-only chunk is not the client's
        self.finished = False
        # A WebSocket handshake: None (plain HTTP), "header" or "protocol" (where its credential is).
        self.websocket: str | None = None

    # -- the request

    def run(self) -> flask.Response:
        head = self.head
        record = self.record
        self.client = client = classify_request_headers(head.headers)
        credential = client.credential
        if is_websocket_handshake(head.method, head.headers):
            self.websocket = "header"
            if credential is None:  # the browser form: a subprotocol entry carries the token
                token = protocol_token(client.value("sec-websocket-protocol"))
                if token is not None:
                    credential = Credential("sec-websocket-protocol", token)
                    self.websocket = "protocol"
            problem = handshake_problem(head.headers, _declares_body(head.headers))
            if problem is None and not head.can_take_over:
                problem = "WebSocket is not available under this server."
            if problem is not None:
                if credential is not None:
                    record.secrets = (credential.token,)
                head.close_connection()
                return self._error(400, "bad_websocket_handshake", problem)
        decision = self.fw.router.resolve(credential)
        if isinstance(decision, Rejection):
            if credential is not None:
                record.secrets = (credential.token,)
            return self._error(decision.status, decision.code, decision.message, decision.retry_after)
        self.decision = decision
        record.route = decision.route
        record.secrets = decision.secrets
        if self.websocket == "header":  # a key entry beside a header credential: masked too
            token = protocol_token(client.value("sec-websocket-protocol"))
            if token is not None and token not in record.secrets:
                record.secrets = (*record.secrets, token)
        try:
            record.request_body = head.body.read_all()
        except ClientError as err:
            head.close_connection()
            return self._error(err.status, err.code, err.message)
        except ClientGone:
            return self._abort_connection("client_gone")
        # After the body (a slow upload holds no slot; a 429 leaves no unread body behind), before
        # anything goes upstream. An unlimited token costs one attribute test, no I/O.
        self.admission = admission = self.fw.limiter.acquire(decision.route.limits)
        if not admission.admitted:
            record.limit = admission.limit
            return self._error(
                429, admission.code, admission.message, admission.retry_after, reason="rate_limited"
            )
        return self._forward()

    # -- the upstream

    def _forward(self) -> flask.Response:
        head = self.head
        record = self.record
        fw = self.fw
        decision = self.decision
        upstream = decision.route.upstream
        query = head.query
        target = upstream.base_path + head.path + ("?" + query if query else "")
        body = record.request_body
        asked = None
        if (
            fw.stream_usage
            and head.method == "POST"
            and applies(head.path)
            and upstream.origin not in fw.usage_refused
        ):
            asked = with_include_usage(body)
        headers = self._upstream_headers(body if asked is None else asked)
        if self.websocket is not None:
            headers = upstream_handshake_headers(headers, decision.auth_header, self.websocket == "protocol")
        self.watchdog = watchdog = Watchdog(fw.loop, fw.timeout[1])
        watchdog.arm(head.client_socket, fw.total_timeout)
        fw.in_flight += 1
        try:
            if asked is None:
                response = self._open(target, headers, body)
            else:
                response = self._open(target, headers, asked)
                if response.raw.status == 400:  # nothing sent to the client yet: once, unchanged
                    _discard(response)
                    response = self._open(target, self._upstream_headers(body), body)
                    if response.raw.status != 400:  # the change was what it refused
                        self._usage_refused(upstream.origin)
                else:
                    self.strip_usage = True
        except UpstreamError as err:
            self._disarm()
            reason = "upstream_error" if err.status == 502 else "upstream_timeout"
            return self._error(err.status, err.code, err.message, reason=reason, error=err.detail)
        except ExchangeAborted as aborted:
            self._disarm()
            if aborted.reason == "total_timeout":
                return self._error(
                    504, "upstream_timeout", "The upstream did not finish in time.", reason="total_timeout"
                )
            return self._abort_connection(aborted.reason)
        record.upstream_at = _now()
        raw = self.raw = response.raw
        record.status = status = raw.status
        event_stream = is_event_stream(raw.headers.get("Content-Type"))
        out = client_response_headers(list(raw.headers.items()), raw.chunked, status, event_stream)
        out.append(("X-Request-ID", head.request_id))
        limit_headers = self.admission.headers
        if limit_headers:  # a limited token: our figures, not the upstream's of the same names
            out[:] = [item for item in out if item[0].lower() not in _RATELIMIT_HEADERS]
            out.extend(limit_headers)
        record.response_headers = out
        if status == 101:
            if self.websocket is not None and is_accepted(raw.headers.items()):
                return self._upgrade(out)
            self._disarm()  # never switched unasked: the connection is closed by finish()
            return self._error(
                502,
                "upstream_bad_response",
                "The upstream switched protocols without a WebSocket upgrade.",
                reason="upstream_error",
            )
        status_line = f"{status} {raw.reason or reason_phrase(status)}"
        if head.method == "HEAD" or status in NO_BODY_STATUS or status < 200:
            self._disarm()
            self._release_upstream(complete=True)
            return ProxyResponse(status_line, out, EmptyBody(self.finish))
        return ProxyResponse(status_line, out, self._stream())

    def _upstream_headers(self, body: bytes) -> dict[str, str]:
        head = self.head
        headers = upstream_request_headers(
            self.client, self.decision.auth_header, head.client_ip, head.request_id, head.method, body
        )
        if body is not self.record.request_body:
            # include_usage added: its chunk is removed from the stream, which must come unencoded.
            forwarded = self.client.forward.get("accept-encoding")
            headers[forwarded[0] if forwarded else "Accept-Encoding"] = "identity"
        return headers

    def _open(self, target: str, headers: dict[str, str], body: bytes):
        fw = self.fw
        origin = self.decision.route.upstream.origin
        return open_upstream(
            fw.upstream,
            self.head.method,
            origin + target,
            headers,
            body if "Content-Length" in headers else None,
            fw.upstream_timeout,
            target,
            origin,
        )

    def _usage_refused(self, origin: str) -> None:
        refused = self.fw.usage_refused
        if origin not in refused:
            refused.add(origin)
            log.warning(
                "STREAM_USAGE=request: the upstream refused stream_options.include_usage with a 400; "
                "this worker no longer asks it for usage",
                extra={"event": "stream_usage_refused", "origin": origin},
            )

    def _stream(self):
        raw = self.raw
        fw = self.fw
        record = self.record
        watchdog = self.watchdog
        capture_left = fw.log_body_max
        capture = bytearray()
        sent = 0
        first_byte_at = None
        content_type = raw.headers.get("Content-Type")
        watchdog.watch_upstream(raw)
        chunks = body_chunks(raw)
        encoding = raw.headers.get("Content-Encoding")
        meter = UsageMeter(content_type, encoding)
        if meter.mode is not None:
            self.meter = meter
        else:
            meter = None
        if is_event_stream(content_type):
            if self.strip_usage and encoding in _IDENTITY:  # the filter feeds the meter itself
                chunks = stripped(chunks, UsageChunkFilter(), meter)
                meter = None
            if fw.sse_keepalive:
                chunks = with_keepalive(chunks, fw.sse_keepalive)
            if fw.metrics is not None:
                self.is_stream = True
                fw.metrics.in_flight_streams += 1
        end_reason = "complete"
        try:
            for chunk in chunks:
                if first_byte_at is None:
                    first_byte_at = _now()
                sent += len(chunk)
                if capture_left > 0:
                    capture += chunk[:capture_left]
                    capture_left -= len(chunk)
                watchdog.waiting_since = None
                yield chunk
                watchdog.waiting_since = _monotonic()
                if meter is not None:  # after the yield: metering never delays a byte
                    meter.feed(chunk)
        except ExchangeAborted as aborted:
            end_reason = aborted.reason
            raise ClientGone(aborted.reason) from None
        except GeneratorExit:
            end_reason = watchdog.reason or self.head.write_failure or "client_gone"
            raise
        except _STREAM_ERRORS as exc:
            # End the client's response without a clean last chunk, so it can tell it is cut short.
            end_reason = "upstream_error"
            record.error = describe_stream_error(exc)
            raise ClientGone("upstream_error") from None
        finally:
            record.end_reason = end_reason
            record.first_byte_at = first_byte_at
            record.response_bytes = sent
            record.response_capture = capture
            self.finish()

    def _upgrade(self, out: list[tuple[str, str]]) -> flask.Response:
        """The upstream accepted the WebSocket: the 101 goes to the client, then the relay."""
        self._disarm()
        reader, sock = detach_upstream(self.raw)
        self.raw = None
        record = self.record
        record.first_byte_at = record.upstream_at
        headers = client_handshake_headers(out, self.client.value("sec-websocket-protocol"))
        record.response_headers = headers
        metrics = self.fw.metrics
        if metrics is not None:
            self.is_stream = True  # counted as a session, not an event stream (see finish)
            metrics.in_flight_websockets += 1
        body = SessionBody(lambda: self._session(reader, sock), lambda: self._abandon(reader, sock))
        return ProxyResponse(_SWITCHING, headers, body)

    def _abandon(self, reader, sock) -> None:
        """The 101 never reached the client (it left): the upstream side is closed unused."""
        if self.finished:
            return
        for closable in (reader, sock):
            try:
                closable.close()
            except OSError:
                pass
        self.record.end_reason = "client_gone"
        self.finish()

    def _session(self, reader, sock) -> None:
        """Once pywsgi has sent the 101's head: the whole session, then its access line."""
        fw = self.fw
        record = self.record
        total = fw.total_timeout
        if total:
            total = max(0.001, total - (_now() - record.started))
        client_reader, client_sock = self.head.take_over()
        relay = Relay(
            client_reader, client_sock, reader, sock, idle=fw.websocket_idle, total=total, loop=fw.loop
        )
        end_reason = "client_gone"
        try:
            end_reason = relay.run()
        finally:
            record.end_reason = end_reason
            if end_reason == "upstream_error":
                record.error = "the upstream closed the connection without a close frame"
            record.response_bytes = relay.upstream_bytes
            record.usage = relay.usage.result()
            record.websocket = {
                "websocket": True,
                "request_size_bytes": relay.client_bytes,
                "client_messages": relay.up.messages,
                "upstream_messages": relay.down.messages,
                "client_close_code": relay.up.close_code,
                "upstream_close_code": relay.down.close_code,
            }
            self.finish()

    def _disarm(self) -> None:
        if self.watchdog is not None and self.watchdog.disarm():
            self.fw.in_flight -= 1

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
        record = self.record
        self.fw.limiter.release(self.admission)  # never blocks; sent by the limiter's greenlet
        self._disarm()
        self._release_upstream(complete=record.end_reason == "complete")
        meter = self.meter
        if meter is not None:
            meter.finish()  # what was counted so far, also when the client left early
            record.usage = meter.result()
        if self.admission.tpm_key:
            self._count_tokens()
        if record.request_body:  # read here, not before forwarding: it never delays the upstream call
            record.model, record.stream = request_fields(
                record.request_body, self.client.value("content-type")
            )
        record.ended = _now()
        write_access(record, self.fw.log_body_max)
        metrics = self.fw.metrics
        if metrics is not None:
            if self.is_stream:
                if record.status == 101:
                    metrics.in_flight_websockets -= 1
                else:
                    metrics.in_flight_streams -= 1
            metrics.observe(record)

    def _count_tokens(self) -> None:
        """A TPM-limited request that the upstream answered: its usage total, or the estimate
        (request + response body bytes) / 4 when the upstream reported none (marked)."""
        record = self.record
        if record.upstream_at is None or record.status >= 400:
            return  # nothing generated (an error answer, or the upstream never answered)
        usage = record.usage
        tokens = usage.get("total_tokens") if usage else None
        if tokens is None:
            tokens = (len(record.request_body) + record.response_bytes) // 4
            record.usage = {**(usage or _NO_USAGE), "total_tokens": tokens}
            record.usage_estimated = True
        self.fw.limiter.count(self.admission, tokens)

    def _error(
        self,
        status: int,
        code: str,
        message: str,
        retry_after: int | None = None,
        *,
        reason: str | None = None,
        error: str | None = None,
    ) -> flask.Response:
        record = self.record
        record.status = status
        record.end_reason = reason or ("rejected" if status < 500 else "error")
        record.error = error or message
        extra = (("Retry-After", str(retry_after)),) if retry_after is not None else ()
        extra += self.admission.headers
        status_line, headers, body = error_response(status, code, message, record.request_id, extra)
        record.response_headers = headers
        record.response_capture = body
        record.response_bytes = len(body)
        return ProxyResponse(status_line, headers, EmptyBody(self.finish, body))

    def _abort_connection(self, reason: str) -> flask.Response:
        self.record.status = 499  # nginx's "client closed request": nothing is sent
        self.record.end_reason = reason
        self.finish()
        return AbortConnection()


def _discard(response) -> None:
    try:
        response.raw.close()  # a small error body: a new connection costs less than reading it
        response.raw.release_conn()
    except Exception:
        pass


def _declares_body(headers) -> bool:
    for name, value in headers:
        lower = name.lower()
        if lower == "transfer-encoding" or (lower == "content-length" and value.strip() != "0"):
            return True
    return False


class SessionBody:
    """A 101's body: iterating it runs the whole WebSocket session and yields nothing; close() ends
    the exchange if the session never started. Has no length, so pywsgi adds no framing."""

    __slots__ = ("_on_close", "_run")

    def __init__(self, run, on_close) -> None:
        self._run = run
        self._on_close = on_close

    def __iter__(self):
        self._run()
        return iter(())

    def close(self) -> None:
        self._on_close()


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
