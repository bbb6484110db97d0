"""The request head: the one object the server layer hands to the request path.

``proxyapp.server.ProxyHandler`` reads a request strictly, then puts a ``RequestHead`` in the WSGI
environ under ``"proxy.head"``; the request path (``proxyapp.forward``) and the views read the
request through it and nothing else (no handler attributes, no environ keys). Under another WSGI
server, ``head_of`` builds the same object from the plain environ, here and nowhere else.

Also here: the one function that decides a request's ID (``request_id``), used by the server
layer, the views and the request path alike.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from proxyapp.errors import ClientError

_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def request_id(value: str | None) -> str:
    """The client's X-Request-ID when it is 1-128 chars of [A-Za-z0-9._-], else a fresh one."""
    if value and _VALID_REQUEST_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


def request_id_in(headers) -> str:
    """``request_id`` of the last X-Request-ID among (name, value) pairs (maybe a partial list)."""
    value = None
    for name, field in headers:
        if name.lower() == "x-request-id":
            value = field
    return request_id(value)


def decode_path(path: str) -> str:
    """A raw path percent-decoded, as WSGI's PATH_INFO (for logs)."""
    return unquote_to_bytes(path).decode("latin-1") if "%" in path else path


@dataclass(slots=True, eq=False)
class RequestHead:
    """One request as the server layer read it.

    - ``method``; ``target``: the request target as sent (path and query, never re-encoded);
      ``path``: its path part, still percent-encoded; ``query``: its query part, without the '?'.
    - ``headers``: every header field as (name, value), in the order received, repeats kept apart.
    - ``client_ip``; ``request_id``: from ``request_id`` (the client's valid X-Request-ID, or new).
    - ``body``: has ``read_all()``, the whole body, raising ClientError (408/413...) or ClientGone.
    - ``client_socket``: the client connection's raw non-blocking socket, to watch for the client
      leaving (readable with nothing to peek = closed); None when the server offers none.
    - ``close_connection()``: close the client connection after this response.
    - ``write_failure``: why the last write to the client failed (``client_gone``,
      ``client_send_timeout``), or None.
    """

    method: str
    target: str
    path: str
    query: str
    headers: Sequence[tuple[str, str]]
    client_ip: str
    request_id: str
    body: object
    client_socket: object = None
    _conn: object = None  # the server's connection: has close_connection and client_failure

    def close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close_connection = True

    @property
    def can_take_over(self) -> bool:
        """The server can hand the connection over after a 101 (``take_over``)."""
        return self._conn is not None

    def take_over(self) -> tuple[object, object]:
        """After a 101: the client connection's buffered reader (it may already hold bytes the
        client sent early) and its socket, for a relay; the server closes it after this response."""
        conn = self._conn
        conn.close_connection = True
        return conn.rfile, conn.socket

    @property
    def write_failure(self) -> str | None:
        return self._conn.client_failure if self._conn is not None else None

    @property
    def decoded_path(self) -> str:
        return decode_path(self.path)


def head_of(environ: dict, max_body: int | None = None) -> RequestHead:
    """The environ's RequestHead; under another WSGI server, one built from the environ (once)."""
    head = environ.get("proxy.head")
    if head is None:
        head = environ["proxy.head"] = _head_from_environ(environ, max_body)
    return head


def _head_from_environ(environ: dict, max_body: int | None) -> RequestHead:
    headers = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers.append((key[5:].replace("_", "-").title(), value))
    if environ.get("CONTENT_TYPE"):
        headers.append(("Content-Type", environ["CONTENT_TYPE"]))
    path = environ.get("RAW_URI", "").partition("?")[0] or quote(environ.get("PATH_INFO", "/"))
    query = environ.get("QUERY_STRING", "")
    length = int(environ.get("CONTENT_LENGTH") or 0)
    return RequestHead(
        environ["REQUEST_METHOD"],
        path + ("?" + query if query else ""),
        path,
        query,
        headers,
        environ.get("REMOTE_ADDR", ""),
        request_id(environ.get("HTTP_X_REQUEST_ID")),
        _EnvironBody(environ.get("wsgi.input"), length, max_body),
    )


class _EnvironBody:
    """The body under another WSGI server: CONTENT_LENGTH bytes of wsgi.input, with the size limit."""

    __slots__ = ("_length", "_limit", "_stream")

    def __init__(self, stream, length: int, limit: int | None) -> None:
        self._stream = stream
        self._length = length
        self._limit = limit

    def read_all(self) -> bytes:
        if self._limit is not None and self._length > self._limit:
            raise ClientError(413, "body_too_large", f"Request body over {self._limit} bytes.")
        return self._stream.read(self._length) if self._length else b""
