"""Header policy, as pure functions: what of the client's headers goes upstream, what of the
upstream's comes back (RFC 9110 §7.6.1, Go's httputil.ReverseProxy checklist).

Upstream: the client's end-to-end headers, repeats joined (``; `` for Cookie); never the hop-by-hop
ones (Connection and the headers it names, Keep-Alive, Proxy-*, TE except ``trailers``, Trailer,
Transfer-Encoding, Upgrade, HTTP2-Settings), Expect, Host, Content-Length (set again from the body)
or X-Request-ID (ours is sent). The client's credential (Authorization or x-api-key) is replaced
by the route's, in the client's style; the client address is appended to X-Forwarded-For; nothing
of our own is added (urllib3 and http.client would add User-Agent and Accept-Encoding).

Back to the client: the upstream's headers in order, repeats apart, minus the hop-by-hop ones and
those its Connection names; Content-Length too when the body is chunked or the status has none.
"""

from __future__ import annotations

from proxyapp.routing import Credential, extract_credential
from proxyapp.upstream import SKIP_HEADER

# Request headers that never go upstream as they came (hop-by-hop, framing, our own).
_DROP = 0
_AUTHORIZATION = 1
_X_API_KEY = 2
_CONNECTION = 3
_TE = 4
_XFF = 5
_REQUEST_HEADER_KIND = {
    "authorization": _AUTHORIZATION,
    "x-api-key": _X_API_KEY,
    "connection": _CONNECTION,
    "te": _TE,
    "x-forwarded-for": _XFF,
    "x-request-id": _DROP,
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
HOP_BY_HOP_RESPONSE = frozenset(
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
NO_BODY_STATUS = frozenset({204, 304})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class ClientHeaders:
    """The client's headers sorted in one pass: ``forward`` (lower-case name -> (name, value)) goes
    upstream; the credential headers and X-Forwarded-For are kept aside for the policy below."""

    __slots__ = ("authorization", "credential", "forward", "x_api_key", "xff")

    def __init__(self, forward, authorization, x_api_key, xff) -> None:
        self.forward: dict[str, tuple[str, str]] = forward
        self.authorization: str | None = authorization
        self.x_api_key: str | None = x_api_key
        self.xff: str | None = xff
        self.credential: Credential | None = extract_credential(authorization, x_api_key)

    def value(self, lower_name: str) -> str | None:
        """A forwarded header's value (repeats joined), None when absent or not forwarded."""
        found = self.forward.get(lower_name)
        return found[1] if found is not None else None


def classify_request_headers(headers) -> ClientHeaders:
    """One pass over the client's (name, value) pairs."""
    forward: dict[str, tuple[str, str]] = {}
    authorization = x_api_key = xff = None
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
    return ClientHeaders(forward, authorization, x_api_key, xff)


def upstream_request_headers(
    client: ClientHeaders,
    auth_header: tuple[str, str] | None,
    client_ip: str,
    request_id: str,
    method: str,
    body: bytes,
) -> dict[str, str]:
    """The headers sent upstream. ``auth_header`` None: the client's own credential goes through
    (legacy mode without an override)."""
    headers = {name: value for name, value in client.forward.values()}
    if auth_header is not None:
        headers[auth_header[0]] = auth_header[1]
    else:
        if client.authorization is not None:
            headers["Authorization"] = client.authorization
        if client.x_api_key is not None:
            headers["x-api-key"] = client.x_api_key
    xff = client.xff
    if client_ip:
        headers["X-Forwarded-For"] = f"{xff}, {client_ip}" if xff else client_ip
    elif xff:
        headers["X-Forwarded-For"] = xff
    headers["X-Request-ID"] = request_id
    if "user-agent" not in client.forward:
        headers["User-Agent"] = SKIP_HEADER
    if "accept-encoding" not in client.forward:
        headers["Accept-Encoding"] = SKIP_HEADER
    if body or method in _BODY_METHODS:
        headers["Content-Length"] = str(len(body))
    return headers


def client_response_headers(
    items, chunked: bool, status: int, event_stream: bool = False
) -> list[tuple[str, str]]:
    """The upstream's (name, value) pairs that go back to the client, in order.

    An event stream also carries ``X-Accel-Buffering: no`` (the upstream's own value replaced), so
    an nginx in front passes it unbuffered even where ``proxy_buffering`` is on."""
    drop = HOP_BY_HOP_RESPONSE
    for name, value in items:
        if name.lower() == "connection":
            drop = drop | {t.strip().lower() for t in value.split(",")}
    if chunked or status in NO_BODY_STATUS:
        drop = drop | {"content-length"}
    if event_stream:
        drop = drop | {"x-accel-buffering"}
        kept = [(name, value) for name, value in items if name.lower() not in drop]
        kept.append(("X-Accel-Buffering", "no"))
        return kept
    return [(name, value) for name, value in items if name.lower() not in drop]
