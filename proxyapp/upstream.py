"""The upstream side: one requests Session per worker, its adapter and pool, and the send call.

The Session is configured so that nothing of its own reaches the upstream or crosses tenants:
no default headers, trust_env off (a ~/.netrc must not replace the Authorization we send), a
cookie jar that keeps nothing, no redirects. Requests go through the session's adapter with
``stream=True`` and ``decode_content=False``: bodies pass through byte for byte.
"""

from __future__ import annotations

import http.client
import select
from collections.abc import Iterator
from contextvars import ContextVar
from http.cookiejar import DefaultCookiePolicy

import requests
import urllib3
from gevent import monkey
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ProtocolError
from urllib3.util import SKIP_HEADER
from urllib3.util.retry import Retry

__all__ = ["SKIP_HEADER", "UpstreamError", "body_chunks", "make_session", "open_upstream"]


class UpstreamError(Exception):
    """The upstream could not be reached or did not answer; status is what the client gets."""

    def __init__(self, status: int, code: str, message: str, detail: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail  # for the log; may carry the upstream host, never a key


class _KeepNothing(DefaultCookiePolicy):
    def set_ok(self, cookie, request) -> bool:
        return False

    def return_ok(self, cookie, request) -> bool:
        return False


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


# The request target exactly as the client sent it (validated by the server layer). urllib3
# re-encodes targets (a '%' not followed by two hex digits anywhere turns every '%' into '%25',
# lower-case escapes are upper-cased): a proxy must forward them byte for byte. Set per request;
# each greenlet has its own context.
_RAW_TARGET: ContextVar[str | None] = ContextVar("raw_target", default=None)


class _RawTargetMixin:
    def _make_request(self, conn, method, url, *args, **kwargs):
        raw = _RAW_TARGET.get()
        return super()._make_request(conn, method, raw if raw is not None else url, *args, **kwargs)


class _HTTPPool(_RawTargetMixin, HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(_RawTargetMixin, HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class ProxyAdapter(HTTPAdapter):
    """HTTPAdapter whose pools check idle connections cheaply, and whose Response skips what a
    proxy never uses (cookie parsing, encoding guess)."""

    def init_poolmanager(self, connections, maxsize, block=False, **pool_kwargs) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

    def build_response(self, req, resp) -> requests.Response:
        response = requests.Response()
        response.status_code = resp.status
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url
        response.request = req
        response.connection = self
        return response


def make_session(pool_maxsize: int, pool_hosts: int = 64) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.headers.clear()
    session.cookies.set_policy(_KeepNothing())
    session.max_redirects = 0
    adapter = ProxyAdapter(
        pool_connections=pool_hosts,
        pool_maxsize=pool_maxsize,
        pool_block=False,
        max_retries=RetryStaleConnectionOnce(total=1, connect=0, read=1, status=0, redirect=0, other=0),
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def open_upstream(
    session: requests.Session,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes | None,
    timeout: tuple[float, float],
    target: str | None = None,
) -> requests.Response:
    """Send the request; return once the response headers are in. Raises UpstreamError.

    ``target`` (path and query, as sent on the request line) is sent unchanged when given."""
    prepared = requests.PreparedRequest()
    prepared.method = method
    prepared.url = url
    prepared.headers = headers
    prepared.body = body
    prepared.hooks = {"response": []}
    reset = _RAW_TARGET.set(target)
    try:
        # The session's adapter, not session.send: with allow_redirects=False, session.send still
        # reads (and decodes) the body of a 3xx to prepare the next hop.
        return session.get_adapter(url).send(prepared, stream=True, timeout=timeout)
    except requests.ReadTimeout:
        raise UpstreamError(504, "upstream_timeout", "The upstream did not answer in time.", "read timeout")
    except requests.ConnectTimeout:
        raise UpstreamError(
            502, "upstream_unreachable", "Could not connect to the upstream.", "connect timeout"
        )
    except requests.ConnectionError as exc:
        cause = _innermost(exc)
        if isinstance(cause, http.client.HTTPException) and not isinstance(cause, ConnectionError):
            # A malformed status line or headers: the upstream answered, but not in HTTP.
            raise UpstreamError(
                502, "upstream_bad_response", "The upstream sent an invalid response.", _describe(exc)
            )
        raise UpstreamError(502, "upstream_unreachable", "Could not reach the upstream.", _describe(exc))
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
        _RAW_TARGET.reset(reset)


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
    """The upstream body as it arrives, undecoded: each HTTP chunk of a chunked body, otherwise
    whatever one read returns (read1 never waits to fill a buffer, so nothing is held back)."""
    if raw.chunked and raw.supports_chunked_reads():
        yield from raw.read_chunked(None, decode_content=False)
        return
    read1 = raw.read1
    while True:
        data = read1(65536, decode_content=False)
        if not data:
            return
        yield data
