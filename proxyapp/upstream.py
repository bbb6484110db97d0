"""The upstream side: one adapter per worker (pools per upstream host, one TLS context), and the
send call.

No requests Session is involved: the request path calls the adapter's ``send`` directly (a
Session's ``send`` would read and decode the body of a 3xx to prepare the next hop). So the
guarantees a shared Session would need settings for hold by construction: nothing reads the
environment (no ~/.netrc replaces our Authorization, no ``*_PROXY`` applies: the egress proxy is
ours, ``UPSTREAM_PROXY``), no cookie jar exists, no redirect is followed (``ProxyAdapter`` builds
the Response without extracting cookies; the adapter never follows a Location). Requests are sent
with ``stream=True`` and ``decode_content=False``: bodies pass through byte for byte.

TLS: one ``SSLContext`` per worker, built at start with the trust store loaded once
(``UPSTREAM_CA_BUNDLE`` or certifi's bundle), handed to every pool. requests' adapter would
otherwise put ``ca_certs`` on each pool, and urllib3 then re-reads the whole bundle for every new
connection (~22 ms of CPU each with OpenSSL 3; urllib3 issue 3623, CPython issue 95031).
Verification is always on: chain and host name.
"""

from __future__ import annotations

import http.client
import os
import re
import select
import ssl
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import certifi
import requests
import urllib3
from gevent import monkey
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ProtocolError
from urllib3.util import SKIP_HEADER
from urllib3.util.retry import Retry
from urllib3.util.ssl_ import create_urllib3_context

from common.envparse import ConfigError
from common.jsonlog import mask_text
from proxyapp.egress import EgressProxy

__all__ = [
    "SKIP_HEADER",
    "UpstreamClient",
    "UpstreamError",
    "body_chunks",
    "make_tls_context",
    "open_upstream",
]


class UpstreamError(Exception):
    """The upstream could not be reached or did not answer; status is what the client gets."""

    def __init__(self, status: int, code: str, message: str, detail: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail  # for the log; may carry the upstream host, never a key


_STALE_CONNECTION_ERRORS = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class RetryStaleConnectionOnce(Retry):
    """Retry exactly once when the connection failed before any byte of the response came back
    (a keep-alive connection the upstream closed as we reused it); nothing else is retried, since
    a blanket POST retry could start a second generation."""

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        if (
            self.total
            and response is None
            and isinstance(error, ProtocolError)
            and error.args
            and isinstance(error.args[-1], _STALE_CONNECTION_ERRORS)
        ):
            return self.new(total=self.total - 1)
        # Otherwise behave exactly like requests' default: Retry(0, read=False).
        return Retry(0, read=False).increment(method, url, response, error, _pool, _stacktrace)


_real_poll = monkey.get_original("select", "poll")
_POLLIN = select.POLLIN


def _idle_socket_is_usable(sock) -> bool:
    # urllib3 asks "is this pooled socket readable right now?" (readable = closed by the peer, or
    # stray bytes) through select.poll, which gevent replaces with a cooperative version costing
    # watchers and a hub switch per request. The real poll with a zero timeout asks it in one
    # syscall (not select(): it fails on descriptors above 1023, and a busy worker has thousands).
    poller = _real_poll()
    poller.register(sock.fileno(), _POLLIN)
    return not poller.poll(0)


class _HTTPConnection(HTTPConnection):
    @property
    def is_connected(self) -> bool:
        return self.sock is not None and _idle_socket_is_usable(self.sock)


class _HTTPSConnection(HTTPSConnection):
    @property
    def is_connected(self) -> bool:
        return self.sock is not None and _idle_socket_is_usable(self.sock)


# What open_upstream knows of the request being sent: the request target exactly as the client
# sent it (validated by the server layer), and the origin it goes to. urllib3 re-encodes targets
# (a '%' not followed by two hex digits anywhere turns every '%' into '%25', lower-case escapes
# are upper-cased): a proxy must forward them byte for byte. Set per request; each greenlet has
# its own context.
_SENDING: ContextVar[tuple[str | None, str]] = ContextVar("sending", default=(None, ""))


class _RawTargetMixin:
    def _make_request(self, conn, method, url, *args, **kwargs):
        raw = _SENDING.get()[0]
        return super()._make_request(conn, method, raw if raw is not None else url, *args, **kwargs)


class _HTTPPool(_RawTargetMixin, HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(_RawTargetMixin, HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_HASHED_CERT = re.compile(r"[0-9a-f]{8}\.r?[0-9]+")


def make_tls_context(ca_bundle: str = "", variable: str = "UPSTREAM_CA_BUNDLE") -> ssl.SSLContext:
    """The worker's one client TLS context: TLS 1.2+, chain and host name verified, the trust store
    (a PEM file or a directory of hashed certificates; default certifi's bundle) loaded once.
    A bundle that cannot be used raises ConfigError naming ``variable``."""
    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    context.check_hostname = True
    where = ca_bundle or certifi.where()
    try:
        if os.path.isdir(where):
            if not any(_HASHED_CERT.fullmatch(name) for name in os.listdir(where)):
                raise ConfigError(variable, where, "no hashed certificates in the directory (openssl rehash)")
            context.load_verify_locations(capath=where)
        else:
            context.load_verify_locations(cafile=where)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(variable, where, f"cannot load CA certificates ({exc})") from None
    return context


class ProxyAdapter(HTTPAdapter):
    """HTTPAdapter whose pools share one TLS context and check idle connections cheaply, and whose
    Response skips what a proxy never uses (cookie parsing, encoding guess)."""

    def __init__(self, tls_context: ssl.SSLContext, **kwargs) -> None:
        self.tls_context = tls_context  # read by init_poolmanager, which HTTPAdapter calls
        self._pools: dict[str, HTTPConnectionPool] = {}
        super().__init__(**kwargs)

    def init_poolmanager(self, connections, maxsize, block=False, **pool_kwargs) -> None:
        super().init_poolmanager(connections, maxsize, block, ssl_context=self.tls_context, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOL_CLASSES

    def proxy_manager_for(self, proxy: str, **proxy_kwargs):
        if proxy not in self.proxy_manager:
            manager = super().proxy_manager_for(proxy, ssl_context=self.tls_context, **proxy_kwargs)
            manager.pool_classes_by_scheme = _POOL_CLASSES
        return self.proxy_manager[proxy]

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        # requests' way costs ~25 µs a request: it parses the URL, builds the pool key attributes,
        # and the pool manager normalises a key from them. Without an egress proxy, the pool of
        # an origin is looked up that way once and kept; the manager stays its owner, and a pool
        # it has closed (evicted for the pool_connections-th host) is looked up again.
        origin = _SENDING.get()[1]
        if proxies or not origin:
            return super().get_connection_with_tls_context(request, verify, proxies, cert)
        pool = self._pools.get(origin)
        if pool is None or pool.pool is None:
            if len(self._pools) >= _KEPT_POOLS:
                self._pools.clear()
            pool = self._pools[origin] = super().get_connection_with_tls_context(request, verify, None, cert)
        return pool

    def request_url(self, request, proxies) -> str:
        # The request line is the raw target whenever open_upstream gave one (requests' answer,
        # two URL parses, would be replaced by it in _RawTargetMixin anyway).
        return _SENDING.get()[0] or super().request_url(request, proxies)

    def cert_verify(self, conn, url, verify, cert) -> None:
        # requests would set ca_certs on the pool here, and urllib3 would then load that bundle
        # into the context again for every new connection. The pool's context already holds the
        # trust store and verifies chain and host name; nothing to add per connection.
        return None

    def build_response(self, req, resp) -> requests.Response:
        response = requests.Response()
        response.status_code = resp.status
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url
        response.request = req
        response.connection = self
        return response


_POOL_CLASSES = {"http": _HTTPPool, "https": _HTTPSPool}
_KEPT_POOLS = 256  # origins whose pool ProxyAdapter keeps at hand; the table has far fewer


class UpstreamClient:
    """Every upstream connection of one worker: the adapter (a pool per upstream host), the TLS
    context, and the egress proxy when one is configured."""

    def __init__(
        self,
        pool_maxsize: int,
        *,
        tls_context: ssl.SSLContext | None = None,
        egress: EgressProxy | None = None,
        pool_hosts: int = 64,
    ) -> None:
        self.egress = egress
        self.adapter = ProxyAdapter(
            tls_context if tls_context is not None else make_tls_context(),
            pool_connections=pool_hosts,
            pool_maxsize=pool_maxsize,
            pool_block=False,
            max_retries=RetryStaleConnectionOnce(total=1, connect=0, read=1, status=0, redirect=0, other=0),
        )

    def close(self) -> None:
        self.adapter.close()


def open_upstream(
    client: UpstreamClient,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes | None,
    timeout: tuple[float, float] | urllib3.Timeout,
    target: str | None = None,
    origin: str = "",
) -> requests.Response:
    """Send the request; return once the response headers are in. Raises UpstreamError.

    ``target`` (path and query, as sent on the request line) is sent unchanged when given;
    ``origin`` (scheme://host[:port] of ``url``) picks the egress proxy or its bypass."""
    prepared = requests.PreparedRequest()
    prepared.method = method
    prepared.url = url
    prepared.headers = headers
    prepared.body = body
    prepared.hooks = {"response": []}
    egress = client.egress
    proxies = egress.proxies_for(origin or url) if egress is not None else None
    if proxies is not None and target is not None and origin.startswith("http:"):
        target = origin + target  # a plain-HTTP request through a proxy names its origin
    reset = _SENDING.set((target, origin))
    try:
        response = client.adapter.send(prepared, stream=True, timeout=timeout, proxies=proxies)
    except requests.ReadTimeout:
        raise UpstreamError(504, "upstream_timeout", "The upstream did not answer in time.", "read timeout")
    except requests.ConnectTimeout:
        if proxies is not None:
            raise _proxy_error(egress, "connect timeout") from None
        raise UpstreamError(
            502, "upstream_unreachable", "Could not connect to the upstream.", "connect timeout"
        )
    except requests.ConnectionError as exc:
        raise _connection_failure(exc, egress if proxies is not None else None) from None
    except (
        requests.RequestException,
        urllib3.exceptions.HTTPError,
        http.client.HTTPException,
        ValueError,
    ) as exc:
        raise UpstreamError(
            502, "upstream_bad_response", "The upstream sent an invalid response.", _describe(exc)
        )
    finally:
        _SENDING.reset(reset)
    if proxies is not None and response.status_code == 407 and origin.startswith("http:"):
        response.raw.close()  # the proxy's own answer to an absolute-form request, not the upstream's
        raise _proxy_error(egress, "407 Proxy Authentication Required")
    return response


_TUNNEL_FAILED = re.compile(r"Tunnel connection failed: (.*)")


def _connection_failure(exc: BaseException, egress: EgressProxy | None) -> UpstreamError:
    """What a requests ConnectionError means for the client: TLS, proxy, bad answer or unreachable."""
    cause = _innermost(exc)
    if isinstance(cause, ssl.SSLCertVerificationError | ssl.CertificateError):
        reason = getattr(cause, "verify_message", None) or str(cause)
        return UpstreamError(
            502,
            "upstream_tls_error",
            "The upstream's TLS certificate could not be verified.",
            f"certificate verify failed: {reason}",
        )
    if isinstance(cause, ssl.SSLError):
        return UpstreamError(
            502, "upstream_tls_error", "The TLS handshake with the upstream failed.", _describe(exc)
        )
    if egress is not None and isinstance(exc, requests.exceptions.ProxyError):
        tunnel = _TUNNEL_FAILED.search(str(cause))
        return _proxy_error(egress, tunnel.group(1) if tunnel else _describe(exc))
    if isinstance(cause, http.client.HTTPException) and not isinstance(cause, ConnectionError):
        # A malformed status line or headers: the upstream answered, but not in HTTP.
        return UpstreamError(
            502, "upstream_bad_response", "The upstream sent an invalid response.", _describe(exc)
        )
    return UpstreamError(502, "upstream_unreachable", "Could not reach the upstream.", _describe(exc))


def _proxy_error(egress: EgressProxy, detail: str) -> UpstreamError:
    """The proxy, not the upstream, failed: unreachable, or it answered with a status (407...)."""
    if detail[:1].isdigit():
        message = f"The egress proxy {egress.safe_url} refused the connection to the upstream ({detail})."
    else:
        message = f"Could not connect to the egress proxy {egress.safe_url}."
    detail = mask_text(f"egress proxy {egress.safe_url}: {detail}", (egress.password,))
    return UpstreamError(502, "upstream_proxy_error", message, detail)


def _innermost(exc: BaseException) -> BaseException:
    """requests and urllib3 wrap errors in errors; the innermost says what actually failed."""
    seen = exc
    for _ in range(10):
        inner = getattr(seen, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((arg for arg in reversed(seen.args) if isinstance(arg, BaseException)), None)
        if inner is None or inner is seen:
            break
        seen = inner
    return seen


def _describe(exc: BaseException) -> str:
    seen = _innermost(exc)
    return f"{type(seen).__name__}: {seen}"[:300]


def describe_stream_error(exc: BaseException) -> str:
    return _describe(exc)


def body_chunks(raw: urllib3.HTTPResponse) -> Iterator[bytes]:
    """The upstream body as it arrives, undecoded: per read of the socket, whatever has arrived
    (never waiting to fill a buffer, so nothing is held back); a chunked body unframed."""
    if raw.chunked and raw.supports_chunked_reads():
        return _chunked_body(raw)
    return _plain_body(raw)


def _chunked_body(raw: urllib3.HTTPResponse) -> Iterator[bytes]:
    # One read1 on the connection's own buffered reader (the one http.client read the headers
    # through) per piece. At the end, what urllib3 does: the http.client response is closed (the
    # connection itself stays open) so that the connection can go back to the pool.
    yield from unchunked(raw._fp.fp.read1)
    raw._fp.close()


def _plain_body(raw: urllib3.HTTPResponse) -> Iterator[bytes]:
    read1 = raw.read1
    size = _READ_MIN
    while True:
        data = read1(size, decode_content=False)
        if not data:
            return
        if len(data) == size and size < _READ_MAX:
            size *= 2
        yield data


# A read allocates its whole size before it learns how much arrived (BufferedReader.read1), and
# an SSE event is a few hundred bytes: reads start small and double up to _READ_MAX while they
# come back full (a large body). 64 KiB reads for every event fragmented the heap: peak RSS at
# 1,000 streams was ~145 MB with them, ~116 MB with these (bench stream1000, A/B, two runs each).
_READ_MIN = 4096
_READ_MAX = 65536
_MAX_LINE = 65536  # http.client's own bound on a header or chunk-size line
_DATA_END = -2  # states of unchunked besides "payload bytes left in this chunk" (> 0)
_SIZE_LINE = -1
_TRAILER = -3


def unchunked(read1: Callable[[int], bytes]) -> Iterator[bytes]:
    """The payload of a chunked body, one piece per ``read1`` call: the payloads of every chunk (or
    part of one) in what that read returned. Ends at the body's last byte: trailers are read and
    dropped, and no read is made after it. Raises ProtocolError on bad framing or an early end.

    urllib3's ``read_chunked`` costs a ``readline`` (and its buffer refill), two ``_safe_read``
    calls and a decode check per HTTP chunk (~16% of the worker's busy samples at 1,000 streams,
    py-spy). Here one read takes what has arrived, and the framing is cut out of it with slices.
    Several events that arrive together leave as one piece, so the client side costs one send.

    As lenient as urllib3 with an upstream (chunk extensions, a missing last CRLF). The request
    body's reader in proxyapp.server is not shared: a client is untrusted, so that one checks
    every line strictly and bounds sizes, and it reads the whole body rather than streaming it."""
    state = _SIZE_LINE
    pending = b""  # the start of a size line, trailer line or chunk end cut by the read
    size = _READ_MIN
    while True:
        data = read1(size)
        if not data:
            if state == _TRAILER:
                break  # some servers end without the last CRLF (urllib3 accepts it too)
            raise ProtocolError("Response ended prematurely", http.client.IncompleteRead(b""))
        if len(data) == size and size < _READ_MAX:
            size *= 2
        if pending:
            data = pending + data
            pending = b""
        pieces = []
        pos = 0
        end = len(data)
        while pos < end:
            if state > 0:  # payload
                stop = pos + state
                if stop >= end:
                    pieces.append(data[pos:] if pos else data)
                    state -= end - pos
                    pos = end
                    if state == 0:
                        state = _DATA_END
                else:
                    pieces.append(data[pos:stop])
                    pos = stop
                    state = _DATA_END
            elif state == _DATA_END:
                if end - pos < 2:
                    pending = data[pos:]
                    break
                pos += 2  # the CRLF that ends a chunk's data (discarded unread, as http.client does)
                state = _SIZE_LINE
            else:
                newline = data.find(b"\n", pos)
                if newline < 0:
                    if end - pos > _MAX_LINE:
                        raise ProtocolError("Chunk-size line too long")
                    pending = data[pos:]
                    break
                line = data[pos:newline]
                pos = newline + 1
                if state == _TRAILER:
                    if not line.strip():
                        state = 0
                        break
                    continue
                state = _chunk_size(line)
                if state == 0:
                    state = _TRAILER
        if pieces:
            yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if state == 0:
            return


def _chunk_size(line: bytes) -> int:
    try:
        size = int(line.split(b";", 1)[0], 16)
    except ValueError:
        size = -1
    if size < 0:
        raise ProtocolError(f"Invalid chunk length {line[:40]!r}")
    return size
