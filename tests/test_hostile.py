"""Hostile clients against the proxy's strict HTTP/1.1 reader: framing, header syntax, request targets,
sizes, upgrades, a fuzz run, slow senders and idle keep-alive connections.

Every malformed request is sent on a raw socket and followed, on the same connection, by a pipelined
``GET /smuggled`` carrying a valid token. A proxy that mis-frames the bad request would read part of
it (or the smuggled request) as a second request and forward it. The checks: exactly one response,
with the expected status and a JSON error body carrying ``request_id``; the connection is closed after
it; nothing (and in particular no ``/smuggled``) reaches the fake upstream; the proxy still serves.

One proxy process serves most of the module (MAX_BODY_BYTES=1000, CLIENT_HEADER_TIMEOUT=2); the idle
keep-alive test starts its own with a small connection limit.
"""

from __future__ import annotations

import json
import re
import selectors
import socket
import string
import threading
import time
import uuid

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import module_proxy
from tests.support.rawhttp import Resp, parse_one, read_response, read_until_close
from tests.support.tables import CLIENT_TOKEN, UPSTREAM_KEY, row

pytestmark = pytest.mark.hostile

MAX_BODY = 1000
HEADER_TIMEOUT = 2.0
AUTH = f"Authorization: Bearer {CLIENT_TOKEN}\r\n"
SMUGGLED = f"GET /smuggled HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n".encode()
POST = f"POST /chat/completions HTTP/1.1\r\nHost: proxy.test\r\n{AUTH}X-Fake: echo\r\n"
GET = f"GET /models HTTP/1.1\r\nHost: proxy.test\r\n{AUTH}X-Fake: echo\r\n"
CHUNKED = "Transfer-Encoding: chunked\r\n\r\n"
BODY5 = "5\r\nhello\r\n0\r\n\r\n"

# Figures for the final report (printed by test_zz_figures); proxy_5xx counts unexpected 5xx only.
FIGURES = {"cases": 0, "fuzz": 0, "smuggled": 0, "proxy_5xx": 0}


@pytest.fixture(scope="module")
def hp(tmp_path_factory, upstream):
    rows = {CLIENT_TOKEN: row(upstream.url + "/v1", UPSTREAM_KEY, token_id=7)}
    env = {"MAX_BODY_BYTES": str(MAX_BODY), "CLIENT_HEADER_TIMEOUT": str(HEADER_TIMEOUT)}
    yield from module_proxy(tmp_path_factory, "hostile", rows, env)


# ------------------------------------------------------------------------------------------ helpers


def parse_all(data: bytes) -> tuple[list[Resp], bytes]:
    responses = []
    while data:
        resp, rest = parse_one(data)
        if resp is None:
            break
        responses.append(resp)
        data = rest
        if not resp.complete:
            break
    return responses, data


def send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the proxy may answer and close before reading everything; the answer still counts


def upstream_targets(upstream) -> list[str]:
    return [record["target"] for record in upstream.requests()]


def assert_still_serves(proxy) -> None:
    response = requests.post(
        proxy.url + "/chat/completions",
        headers={"Authorization": f"Bearer {CLIENT_TOKEN}", "X-Fake": "echo"},
        data=b'{"ok": true}',
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.json()["target"] == "/v1/chat/completions"


def assert_error_json(resp: Resp, statuses: set[int]) -> dict:
    assert resp.status in statuses, (resp.status, resp.body[:300])
    assert (resp.header("content-type") or "").startswith("application/json"), resp.headers
    body = json.loads(resp.body)
    request_id = body["error"]["request_id"]
    assert request_id and resp.header("x-request-id") == request_id, (body, resp.headers)
    assert b"Traceback" not in resp.body
    return body


def assert_rejected_alone(proxy, upstream, payload: bytes, statuses: set[int], *, pipeline=True) -> Resp:
    """Send the bad request (+ the pipelined /smuggled): one JSON error, close, nothing forwarded."""
    FIGURES["cases"] += 1
    upstream.clear()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        send(sock, payload + (SMUGGLED if pipeline else b""))
        data, end = read_until_close(sock, 3.0)
    targets = upstream_targets(upstream)
    FIGURES["smuggled"] += sum("smuggled" in t for t in targets)
    responses, rest = parse_all(data)
    assert len(responses) == 1 and rest == b"", f"expected exactly one response, got {data[:1500]!r}"
    resp = responses[0]
    if resp.status >= 500 and resp.status not in statuses:  # 501/505 are expected where listed
        FIGURES["proxy_5xx"] += 1
    assert resp.complete, data
    assert_error_json(resp, statuses)
    assert end == "eof", f"connection after the error: {end} (expected a clean close)"
    assert not [t for t in targets if "smuggled" in t], targets
    assert targets == [], f"forwarded to the upstream: {targets}"
    assert_still_serves(proxy)
    return resp


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


# ------------------------------------------------------------------------------------------ framing

FRAMING_CASES = [
    ("cl-and-te", POST + "Content-Length: 5\r\n" + CHUNKED + BODY5, {400}),
    ("te-and-cl", POST + "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n" + BODY5, {400}),
    ("two-identical-cl", POST + "Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", {400}),
    ("two-differing-cl", POST + "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", {400}),
    ("cl-list", POST + "Content-Length: 5, 5\r\n\r\nhello", {400}),
    ("cl-plus", POST + "Content-Length: +5\r\n\r\nhello", {400}),
    ("cl-underscore", POST + "Content-Length: 0_5\r\n\r\nhello", {400}),
    ("cl-two-numbers", POST + "Content-Length: 5 5\r\n\r\nhello", {400}),
    ("cl-negative", POST + "Content-Length: -5\r\n\r\nhello", {400}),
    ("cl-hex", POST + "Content-Length: 0x5\r\n\r\nhello", {400}),
    ("cl-19-digits", POST + "Content-Length: 1000000000000000000\r\n\r\nhello", {400, 413}),
    # A syntactically valid but unknown coding may be 501 (RFC 9112 6.1); anything else is 400.
    ("te-xchunked", POST + "Transfer-Encoding: xchunked\r\n\r\n" + BODY5, {400, 501}),
    ("te-leading-comma", POST + "Transfer-Encoding: ,chunked\r\n\r\n" + BODY5, {400}),
    ("te-gzip-chunked", POST + "Transfer-Encoding: gzip, chunked\r\n\r\n" + BODY5, {400, 501}),
    ("te-chunked-twice-in-list", POST + "Transfer-Encoding: chunked, chunked\r\n\r\n" + BODY5, {400, 501}),
    ("te-space-before-colon", POST + "Transfer-Encoding : chunked\r\n\r\n" + BODY5, {400}),
    ("te-header-twice", POST + "Transfer-Encoding: chunked\r\n" + CHUNKED + BODY5, {400}),
    ("te-vertical-tab", POST + "Transfer-Encoding:\x0bchunked\r\n\r\n" + BODY5, {400}),
    (
        "te-on-http10",
        f"POST /chat/completions HTTP/1.0\r\nHost: proxy.test\r\n{AUTH}X-Fake: echo\r\n" + CHUNKED + BODY5,
        {400},
    ),
    ("chunk-size-zz", POST + CHUNKED + "zz\r\nhello\r\n0\r\n\r\n", {400}),
    ("chunk-size-negative", POST + CHUNKED + "-1\r\nhello\r\n0\r\n\r\n", {400}),
    ("chunk-size-17-hex-digits", POST + CHUNKED + "1" + "0" * 16 + "\r\nhello\r\n0\r\n\r\n", {400}),
    ("chunk-size-0x", POST + CHUNKED + "0x5\r\nhello\r\n0\r\n\r\n", {400}),
    ("chunk-size-space", POST + CHUNKED + " 5\r\nhello\r\n0\r\n\r\n", {400}),
    ("chunk-size-bare-lf", POST + CHUNKED + "5\nhello\r\n0\r\n\r\n", {400}),
    ("chunk-ext-over-1k", POST + CHUNKED + "5;x=" + "a" * 1100 + "\r\nhello\r\n0\r\n\r\n", {400}),
    ("chunk-data-without-crlf", POST + CHUNKED + "5\r\nhelloXX0\r\n\r\n", {400}),
    ("bad-trailer-line", POST + CHUNKED + "5\r\nhello\r\n0\r\nX Bad: 1\r\n\r\n", {400}),
    ("trailer-obs-fold", POST + CHUNKED + "5\r\nhello\r\n0\r\nX-A: 1\r\n folded\r\n\r\n", {400}),
]


@pytest.mark.parametrize(
    ("payload", "statuses"), [c[1:] for c in FRAMING_CASES], ids=[c[0] for c in FRAMING_CASES]
)
def test_ambiguous_framing_is_refused_and_closed(hp, upstream, payload, statuses):
    assert_rejected_alone(hp, upstream, payload.encode("latin-1"), statuses)


def test_content_length_with_extra_spaces_is_valid(hp, upstream):
    # RFC 9110 5.5: optional whitespace around a field value is not part of it, so
    # "Content-Length:  5  " is a valid Content-Length of 5. It must be accepted and forwarded exactly.
    upstream.clear()
    payload = (POST + "Content-Length:  \t5 \r\nConnection: close\r\n\r\nhello").encode()
    with socket.create_connection(("127.0.0.1", hp.port), timeout=5) as sock:
        send(sock, payload)
        data, end = read_until_close(sock, 5.0)
    responses, rest = parse_all(data)
    assert len(responses) == 1 and rest == b"" and end == "eof", data
    assert responses[0].status == 200, data
    echoed = json.loads(responses[0].body)
    assert echoed["body_b64"] == "aGVsbG8=" and echoed["framing"] == "length"
    assert [v for n, v in echoed["headers"] if n.lower() == "content-length"] == ["5"]


def test_trailer_fields_are_never_forwarded(hp, upstream):
    upstream.clear()
    payload = (
        (POST + "Connection: close\r\n" + CHUNKED).encode() + chunk(b"hello") + b"0\r\nX-Evil: 1\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", hp.port), timeout=5) as sock:
        send(sock, payload)
        data, end = read_until_close(sock, 5.0)
    responses, _ = parse_all(data)
    assert len(responses) == 1 and responses[0].status == 200 and end == "eof", (data, end)
    echoed = json.loads(responses[0].body)
    assert echoed["body_b64"] == "aGVsbG8="
    names = {n.lower() for n, _ in echoed["headers"]}
    assert "x-evil" not in names and "trailer" not in names, echoed["headers"]
    (record,) = upstream.requests()
    assert "x-evil" not in {n.lower() for n, _ in record["headers"]}


# ------------------------------------------------------------------------------------------ header syntax

HEADER_CASES = [
    ("bare-cr-in-value", GET + "X-A: a\rb\r\n\r\n"),
    ("bare-cr-line-end", GET + "X-A: b\r\r\n\r\n"),
    ("bare-lf-line-end", GET + "X-A: b\n\r\n"),
    ("bare-lf-request-line", f"GET /models HTTP/1.1\nHost: proxy.test\r\n{AUTH}\r\n"),
    ("obs-fold-space", GET + "X-A: a\r\n b\r\n\r\n"),
    ("obs-fold-tab", GET + "X-A: a\r\n\tb\r\n\r\n"),
    ("obs-fold-first-line", f"GET /models HTTP/1.1\r\n Host: proxy.test\r\n{AUTH}\r\n"),
    ("nul-in-value", GET + "X-A: a\x00b\r\n\r\n"),
    ("ctl-0x01-in-value", GET + "X-A: a\x01b\r\n\r\n"),
    ("del-in-value", GET + "X-A: a\x7fb\r\n\r\n"),
    ("space-before-colon", GET + "X-A : b\r\n\r\n"),
    ("no-colon", GET + "X-A b\r\n\r\n"),
    ("empty-name", GET + ": b\r\n\r\n"),
    ("no-host-http11", f"GET /models HTTP/1.1\r\n{AUTH}X-Fake: echo\r\n\r\n"),
    ("two-hosts", GET + "Host: other.test\r\n\r\n"),
    ("bad-host", f"GET /models HTTP/1.1\r\nHost: a b@c\r\n{AUTH}\r\n"),
    ("http-2.0", f"GET /models HTTP/2.0\r\nHost: proxy.test\r\n{AUTH}\r\n"),
    ("lowercase-http", f"GET /models http/1.1\r\nHost: proxy.test\r\n{AUTH}\r\n"),
    ("two-spaces-in-request-line", f"GET  /models HTTP/1.1\r\nHost: proxy.test\r\n{AUTH}\r\n"),
]


@pytest.mark.parametrize("payload", [c[1] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES])
def test_header_syntax_errors_are_refused_and_closed(hp, upstream, payload):
    statuses = {505} if "HTTP/2.0" in payload else {400}
    assert_rejected_alone(hp, upstream, payload.encode("latin-1"), statuses)


# ------------------------------------------------------------------------------------------ targets

TARGET_CASES = [
    ("absolute-form", f"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n{AUTH}\r\n", {400}),
    ("connect", f"CONNECT evil:443 HTTP/1.1\r\nHost: evil:443\r\n{AUTH}\r\n", {400, 405}),
    ("asterisk-form", f"OPTIONS * HTTP/1.1\r\nHost: proxy.test\r\n{AUTH}\r\n", {400}),
    ("fragment", f"GET /models#frag HTTP/1.1\r\nHost: proxy.test\r\n{AUTH}\r\n", {400}),
]
DOT_PATHS = [
    "/v1/../admin",
    "/%2e%2e/x",
    "/a/..%2fb",
    "/a/.%2e/b",
    "/a/%2E/b",
    "/a/..",
    "/%00",
    "/a%0d%0ab",
    "/a%zz",
]


@pytest.mark.parametrize(
    ("payload", "statuses"), [c[1:] for c in TARGET_CASES], ids=[c[0] for c in TARGET_CASES]
)
def test_foreign_request_targets_are_refused(hp, upstream, payload, statuses):
    assert_rejected_alone(hp, upstream, payload.encode(), statuses)


@pytest.mark.parametrize("path", DOT_PATHS)
def test_dot_segments_and_encoded_controls_are_refused(hp, upstream, path):
    payload = f"GET {path} HTTP/1.1\r\nHost: proxy.test\r\n{AUTH}X-Fake: echo\r\n\r\n".encode()
    assert_rejected_alone(hp, upstream, payload, {400})


def test_trace_is_405_and_never_forwarded(hp, upstream):
    # TRACE is well framed: after the 405 the pipelined request is a request of its own. Either the
    # proxy closes after the 405 (nothing forwarded at all) or it answers the pipelined GET on its
    # own; in both cases TRACE never reaches the upstream and the two stay separate.
    FIGURES["cases"] += 1
    upstream.clear()
    payload = f"TRACE /x HTTP/1.1\r\nHost: proxy.test\r\n{AUTH}X-Fake: echo\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", hp.port), timeout=5) as sock:
        send(sock, payload + SMUGGLED + b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data, end = read_until_close(sock, 5.0)
    responses, rest = parse_all(data)
    assert responses and rest == b"" and end == "eof", data
    assert_error_json(responses[0], {405})
    methods = [(r["method"], r["target"]) for r in upstream.requests()]
    assert all(m != "TRACE" for m, _ in methods), methods
    if len(responses) > 1:
        assert [r.status for r in responses] == [405, 200, 401], data
        assert methods == [("GET", "/v1/smuggled")], methods
    else:
        assert methods == [], methods


def test_double_slash_path_stays_on_the_tokens_upstream(hp, upstream):
    upstream.clear()
    payload = f"GET //evil/x HTTP/1.1\r\nHost: proxy.test\r\n{AUTH}X-Fake: echo\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", hp.port), timeout=5) as sock:
        send(sock, payload.encode())
        data, _ = read_until_close(sock, 5.0)
    (resp,), _ = parse_all(data)
    assert resp.status == 200, data
    echoed = json.loads(resp.body)
    assert echoed["target"] == "/v1//evil/x"
    assert [r["target"] for r in upstream.requests()] == ["/v1//evil/x"]
    host = [v for n, v in echoed["headers"] if n.lower() == "host"]
    assert host == [upstream.url.removeprefix("http://")], host


def test_odd_query_string_is_forwarded_byte_for_byte(hp, upstream):
    # The query is not a path: no dot-segment or escape rules apply, and it must not be re-encoded.
    upstream.clear()
    query = "a=%ZZ&b=..%2f&c=%00&d=%7e"
    payload = (
        f"GET /models?{query} HTTP/1.1\r\nHost: proxy.test\r\n{AUTH}X-Fake: echo\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", hp.port), timeout=5) as sock:
        send(sock, payload.encode())
        data, _ = read_until_close(sock, 5.0)
    (resp,), _ = parse_all(data)
    assert resp.status == 200, data
    assert json.loads(resp.body)["target"] == "/v1/models?" + query


# ------------------------------------------------------------------------------------------ sizes


def test_request_line_over_8k_is_414(hp, upstream):
    payload = f"GET /{'a' * 9000} HTTP/1.1\r\nHost: proxy.test\r\n{AUTH}\r\n".encode()
    assert_rejected_alone(hp, upstream, payload, {414})


def test_headers_over_32k_are_431(hp, upstream):
    big = "".join(f"X-Big-{i}: {'b' * 4000}\r\n" for i in range(10))
    assert_rejected_alone(hp, upstream, (GET + big + "\r\n").encode(), {431})


def test_101_header_fields_are_431(hp, upstream):
    # Host + Authorization + 99 more = 101 fields.
    fields = "".join(f"X-F-{i}: {i}\r\n" for i in range(99))
    payload = f"GET /models HTTP/1.1\r\nHost: proxy.test\r\n{AUTH}" + fields + "\r\n"
    assert_rejected_alone(hp, upstream, payload.encode(), {431})


def test_100_header_fields_are_accepted(hp):
    fields = "".join(f"X-F-{i}: {i}\r\n" for i in range(96))
    payload = GET + fields + "Connection: close\r\n\r\n"  # Host, Authorization, X-Fake, 96, Connection
    with socket.create_connection(("127.0.0.1", hp.port), timeout=5) as sock:
        send(sock, payload.encode())
        data, _ = read_until_close(sock, 5.0)
    (resp,), _ = parse_all(data)
    assert resp.status == 200, data


def test_content_length_over_the_limit_is_413_before_the_body(hp, upstream):
    FIGURES["cases"] += 1
    upstream.clear()
    head = (POST + "Content-Length: 100000000\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", hp.port), timeout=5) as sock:
        sock.sendall(head)  # and not one byte of the body
        data, end = read_until_close(sock, 3.0)
    (resp,), rest = parse_all(data)
    assert rest == b"" and resp.complete, data
    assert_error_json(resp, {413})
    assert end == "eof", end
    assert upstream_targets(upstream) == []
    assert_still_serves(hp)


def test_chunked_body_over_the_limit_is_413_and_never_forwarded(hp, upstream):
    FIGURES["cases"] += 1
    upstream.clear()
    piece = chunk(b"x" * 600)
    with socket.create_connection(("127.0.0.1", hp.port), timeout=5) as sock:
        send(sock, (POST + CHUNKED).encode() + piece + piece + piece)  # no last chunk: never finished
        data, end = read_until_close(sock, 3.0)
    (resp,), rest = parse_all(data)
    assert rest == b"", data
    assert_error_json(resp, {413})
    assert end == "eof", end
    assert upstream_targets(upstream) == []
    assert not [c for c in upstream.connections() if c["requests"]], upstream.connections()
    assert_still_serves(hp)


def test_expect_100_continue_with_a_bad_token_gets_401_without_the_body(hp, upstream):
    FIGURES["cases"] += 1
    upstream.clear()
    head = (
        b"POST /chat/completions HTTP/1.1\r\nHost: proxy.test\r\n"
        b"Authorization: Bearer sk-not-a-valid-token\r\n"
        b"Expect: 100-continue\r\nContent-Length: 1000000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", hp.port), timeout=5) as sock:
        sock.sendall(head)
        data, end = read_until_close(sock, 3.0)
    assert data.startswith(b"HTTP/1.1 401 "), data[:200]  # no "100 Continue" first
    (resp,), rest = parse_all(data)
    assert rest == b"", data
    assert assert_error_json(resp, {401})["error"]["code"] == "invalid_token"
    assert end == "eof", end
    assert upstream_targets(upstream) == []


# ------------------------------------------------------------------------------------------ request IDs

RID = "X-Request-ID: client-rid-{n}\r\n"


@pytest.mark.parametrize(
    ("name", "payload", "status"),
    [
        ("cl+te", POST + RID + "Content-Length: 5\r\n" + CHUNKED + BODY5, 400),
        ("bad header line", GET + RID + "Bad Header\r\n\r\n", 400),
        ("obs-fold", GET + RID + "X-A: 1\r\n folded\r\n\r\n", 400),
        ("too many fields", GET + RID + "".join(f"X-F-{i}: {i}\r\n" for i in range(99)) + "\r\n", 431),
        ("body too large", POST + RID + f"Content-Length: {MAX_BODY + 1}\r\n\r\n", 413),
    ],
)
def test_server_layer_errors_carry_the_clients_request_id(hp, upstream, name, payload, status):
    rid = f"client-rid-{uuid.uuid4().hex[:12]}"
    payload = payload.replace("client-rid-{n}", rid)
    resp = assert_rejected_alone(hp, upstream, payload.encode(), {status}, pipeline=status != 413)
    assert resp.header("x-request-id") == rid, (name, resp.headers)
    assert json.loads(resp.body)["error"]["request_id"] == rid
    line = hp.access_line(rid)
    assert line["status"] == status and line["end_reason"] in ("bad_request", "rejected"), line


def test_header_timeout_408_carries_the_clients_request_id(hp):
    rid = f"client-rid-{uuid.uuid4().hex[:12]}"
    with socket.create_connection(("127.0.0.1", hp.port), timeout=5) as sock:
        sock.sendall((GET + f"X-Request-ID: {rid}\r\nX-Unfinished: 1\r\n").encode())
        data, end = read_until_close(sock, HEADER_TIMEOUT + 3)
    (resp,), _ = parse_all(data)
    assert_error_json(resp, {408})
    assert resp.header("x-request-id") == rid and end == "eof", (resp.headers, end)
    assert hp.access_line(rid)["end_reason"] == "bad_request"


@pytest.mark.parametrize("sent", ["", "X-Request-ID: bad id!\r\n", f"X-Request-ID: {'a' * 129}\r\n"])
def test_server_layer_errors_without_a_valid_request_id_get_a_fresh_one(hp, upstream, sent):
    payload = GET + sent + "Bad Header\r\n\r\n"
    resp = assert_rejected_alone(hp, upstream, payload.encode(), {400})
    rid = resp.header("x-request-id")
    assert re.fullmatch(r"[0-9a-f]{32}", rid or ""), resp.headers
    assert hp.access_line(rid)["status"] == 400


# ------------------------------------------------------------------------------------------ upgrades


# WebSocket upgrades are relayed (tests/test_websocket.py); every other upgrade stays plain HTTP.
@pytest.mark.parametrize(
    "upgrade",
    [
        "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        "Upgrade: TLS/1.2\r\nConnection: Upgrade\r\n",
        # websocket named without Connection: upgrade is not a handshake
        "Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
    ],
    ids=["h2c", "tls", "websocket-without-connection-upgrade"],
)
def test_upgrade_requests_are_never_switched(hp, upstream, upgrade):
    upstream.clear()
    with socket.create_connection(("127.0.0.1", hp.port), timeout=5) as sock:
        sock.sendall(
            f"GET /realtime HTTP/1.1\r\nHost: proxy.test\r\n{AUTH}X-Fake: echo\r\n{upgrade}\r\n".encode()
        )
        resp = read_response(sock)
        assert resp.status == 200, resp
        assert not resp.has("upgrade"), resp.headers
        echoed = json.loads(resp.body)
        names = {n.lower() for n, _ in echoed["headers"]}
        assert not names & {"upgrade", "connection", "http2-settings"}, echoed["headers"]
        # Still plain HTTP/1.1 on the same connection, not a tunnel.
        sock.sendall(f"GET /after HTTP/1.1\r\nHost: proxy.test\r\n{AUTH}X-Fake: echo\r\n\r\n".encode())
        second = read_response(sock)
        assert second.status == 200 and json.loads(second.body)["target"] == "/v1/after"


# ------------------------------------------------------------------------------------------ fuzz

FUZZ_METHODS = [
    "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "CONNECT", "PROPFIND", "get",
    "M-SEARCH", "X!#$%&'*+.^_`|~", "G(ET", "GE T", "", "A" * 40,
]  # fmt: skip
TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
SAFE_PATH_CHARS = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@"
PATH_CHARS = SAFE_PATH_CHARS + '%%%%%///..?#[]\\"<>^`{|} '
PATH_PIECES = [
    "/", "//", ".", "..", "%41", "%2F", "%2f", "%2e", "%2E%2E", "%25", "%00", "%0A", "%7e", "%zz", "%", "%4",
    "?", "?a=%ZZ&b=..%2f", "??", "#", "\\", "\"", "<>", "{}", "|^`", "[::1]", ";v=1", "%C3%A9", "%ff",
]  # fmt: skip
PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))
RESERVED = {"host", "content-length", "transfer-encoding", "x-fake", "connection", "expect"}


def _mostly(common, rare, one_in: int):
    """``common``, except about once in ``one_in`` draws ``rare``."""
    return st.integers(0, one_in - 1).flatmap(lambda k: rare if k == 0 else common)


# Mostly plausible pieces (so about half the requests get past the reader and reach the upstream).
path_piece = st.one_of(
    st.text(SAFE_PATH_CHARS, min_size=1, max_size=8),
    _mostly(st.sampled_from(PATH_PIECES), st.text(PATH_CHARS, max_size=4), 6),
)
header_name = _mostly(
    st.text(TOKEN_CHARS, min_size=1, max_size=20), st.text(PRINTABLE, min_size=1, max_size=20), 25
).filter(lambda name: name.strip().lower() not in RESERVED)


@st.composite
def fuzz_requests(draw) -> bytes:
    method = draw(st.sampled_from(FUZZ_METHODS))
    path = "/" + "".join(draw(st.lists(path_piece, max_size=6)))
    headers = draw(st.lists(st.tuples(header_name, st.text(PRINTABLE, max_size=40)), max_size=8))
    body = draw(st.binary(max_size=300))
    head = f"{method} {path} HTTP/1.1\r\nHost: proxy.test\r\nX-Fake: echo\r\nConnection: close\r\n"
    if draw(st.integers(0, 3)):
        head += AUTH
    head += "".join(f"{name}: {value}\r\n" for name, value in headers)
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode("latin-1") + b"\r\n" + body


def test_fuzzed_requests_never_get_a_5xx(hp):
    before = len(hp.process.json_lines())
    statuses: dict[int, int] = {}

    @settings(
        max_examples=500,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    @given(fuzz_requests())
    def check(payload: bytes) -> None:
        FIGURES["fuzz"] += 1
        with socket.create_connection(("127.0.0.1", hp.port), timeout=5) as sock:
            send(sock, payload)
            data, end = read_until_close(sock, 5.0)
        assert data.startswith(b"HTTP/1.1 "), (payload, data, end)
        status = int(data[9:12])
        statuses[status] = statuses.get(status, 0) + 1
        if status >= 500:
            FIGURES["proxy_5xx"] += 1
        assert status < 500, (payload, data[:600])
        assert b"Traceback" not in data, (payload, data)
        assert end == "eof", (payload, data, end)

    check()
    print(f"fuzz: {FIGURES['fuzz']} requests, statuses {sorted(statuses.items())}")
    assert hp.process.alive(), hp.process.output()[-3000:]
    assert requests.get(hp.url + "/_proxy/healthz", timeout=5).status_code == 200
    crashes = [
        r for r in hp.process.json_lines()[before:] if r.get("event") in ("server_error", "unhandled_error")
    ]
    assert crashes == [], crashes[:3]


# ------------------------------------------------------------------------------------------ slow clients


def test_slow_header_senders_are_cut_off_and_others_served(hp):
    count = 200
    selector = selectors.DefaultSelector()
    first_byte: dict[socket.socket, float] = {}
    closed_at: dict[socket.socket, float] = {}
    received: dict[socket.socket, bytes] = {}
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", hp.port), timeout=5)
        sock.sendall(b"GET /models HTTP/1.1\r\n")
        first_byte[sock] = time.monotonic()
        received[sock] = b""
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    dribble = b"Host: proxy.test\r\nX-Slow: " + b"a" * 100

    def close(sock: socket.socket) -> None:
        closed_at[sock] = time.monotonic()
        selector.unregister(sock)
        sock.close()

    def drive() -> None:
        started = time.monotonic()
        next_send, position = started + 0.5, 0
        while len(closed_at) < count and time.monotonic() < started + 5.0:
            for key, _ in selector.select(timeout=max(0.0, min(0.05, next_send - time.monotonic()))):
                sock = key.fileobj
                try:
                    piece = sock.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    piece = b""
                if piece:
                    received[sock] += piece
                else:
                    close(sock)
            if time.monotonic() >= next_send:
                for sock in [s for s in first_byte if s not in closed_at]:
                    try:
                        sock.send(dribble[position : position + 1])
                    except BlockingIOError:
                        pass
                    except OSError:
                        pass  # closed by the proxy: the read side reports it
                position += 1
                next_send += 0.5

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    time.sleep(1.0)
    started = time.monotonic()
    normal = requests.post(
        hp.url + "/chat/completions",
        headers={"Authorization": f"Bearer {CLIENT_TOKEN}", "X-Fake": "echo"},
        data=b"{}",
        timeout=5,
    )
    normal_s = time.monotonic() - started
    driver.join(10)
    for sock in first_byte:
        if sock not in closed_at:
            sock.close()
    selector.close()
    lifetimes = sorted(closed_at[s] - first_byte[s] for s in closed_at)
    answers = {received[s][:12] for s in first_byte}
    print(
        f"slow clients: {len(closed_at)}/{count} closed, lifetime min {lifetimes[0]:.2f}s "
        f"max {lifetimes[-1]:.2f}s; normal request {normal_s * 1000:.0f} ms; answers {answers}"
    )
    assert normal.status_code == 200 and normal_s < 1.0, (normal.status_code, normal_s)
    assert len(closed_at) == count, f"{count - len(closed_at)} slow connections still open after 5 s"
    assert lifetimes[0] >= HEADER_TIMEOUT - 0.3 and lifetimes[-1] <= HEADER_TIMEOUT + 1.5, lifetimes
    for sock in first_byte:
        data = received[sock]
        if data:
            (resp,), _ = parse_all(data)
            assert_error_json(resp, {408})
    assert hp.process.alive()


# ------------------------------------------------------------------------------------------ idle keep-alive


def test_idle_keep_alive_connections_are_reaped_at_the_connection_limit(proxy_factory, default_rows):
    proxy = proxy_factory(env={"MAX_CLIENT_CONNECTIONS": "50", "CLIENT_IDLE_TIMEOUT": "2"}, rows=default_rows)
    request = f"GET /models HTTP/1.1\r\nHost: proxy.test\r\n{AUTH}X-Fake: echo\r\n\r\n".encode()
    selector = selectors.DefaultSelector()
    buffers: dict[socket.socket, bytes] = {}
    answered: dict[socket.socket, float] = {}
    closed: dict[socket.socket, tuple[float, str]] = {}
    started = time.monotonic()
    for _ in range(60):
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        sock.sendall(request)
        sock.setblocking(False)
        buffers[sock] = b""
        selector.register(sock, selectors.EVENT_READ)

    newcomer: dict[str, object] = {}

    def new_client() -> None:
        time.sleep(0.5)
        t0 = time.monotonic()
        try:
            response = requests.get(
                proxy.url + "/models",
                headers={"Authorization": f"Bearer {CLIENT_TOKEN}", "X-Fake": "echo"},
                timeout=10,
            )
            newcomer["status"] = response.status_code
        except requests.RequestException as exc:
            newcomer["error"] = repr(exc)
        newcomer["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=new_client, daemon=True)
    thread.start()
    while len(closed) < 60 and time.monotonic() < started + 9:
        for key, _ in selector.select(timeout=0.05):
            sock = key.fileobj
            try:
                piece = sock.recv(65536)
                end = "eof"
            except BlockingIOError:
                continue
            except ConnectionResetError:
                piece, end = b"", "reset"
            if piece:
                buffers[sock] += piece
                resp, _ = parse_one(buffers[sock])
                if resp is not None and resp.complete and sock not in answered:
                    answered[sock] = time.monotonic()
            else:
                closed[sock] = (time.monotonic(), end)
                selector.unregister(sock)
    thread.join(10)
    for sock in buffers:
        sock.close()
    selector.close()
    idle_for = sorted(closed[s][0] - answered[s] for s in closed if s in answered)
    print(
        f"idle: {len(answered)}/60 answered, {len(closed)}/60 closed by the server, idle lifetime "
        f"{idle_for[0] if idle_for else 0:.2f}-{idle_for[-1] if idle_for else 0:.2f}s; newcomer {newcomer}"
    )
    assert newcomer.get("status") == 200 and newcomer["seconds"] < 3.5, newcomer
    assert len(answered) == 60, f"{60 - len(answered)} connections never answered"
    for data in buffers.values():
        resp, rest = parse_one(data)
        assert resp is not None and resp.status == 200 and rest == b"", data[:300]
    assert len(closed) == 60, f"{60 - len(closed)} idle connections still open"
    assert all(end == "eof" for _, end in closed.values()), closed.values()
    assert idle_for[0] >= 1.5 and idle_for[-1] <= 3.5, idle_for
    assert proxy.process.alive()
    assert requests.get(proxy.url + "/_proxy/healthz", timeout=5).status_code == 200
    assert not [
        r for r in proxy.process.json_lines() if r.get("event") in ("server_error", "unhandled_error")
    ]


def test_zz_figures(hp):
    print(f"hostile figures: {FIGURES}")
    assert FIGURES["smuggled"] == 0
