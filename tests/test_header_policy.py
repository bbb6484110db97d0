"""The header policy (proxyapp.headers), as pure functions: what goes upstream, what comes back.

Table-driven: each case is the client's (or the upstream's) header list and what must, or must
not, come out. The live tests (test_request_path.py, test_responses.py) check the same on the wire.
"""

from __future__ import annotations

import pytest

from proxyapp.headers import classify_request_headers, client_response_headers, upstream_request_headers
from proxyapp.upstream import SKIP_HEADER

KEY = ("Authorization", "Bearer sk-upstream")


def upstream_headers(client_headers, *, auth=KEY, client_ip="10.0.0.9", method="GET", body=b""):
    client = classify_request_headers(client_headers)
    return upstream_request_headers(client, auth, client_ip, "rid-1", method, body)


def lower_names(headers) -> set[str]:
    return {name.lower() for name in headers}


HOP_BY_HOP = [
    "Connection: close",
    "Keep-Alive: timeout=5",
    "Proxy-Connection: keep-alive",
    "Proxy-Authenticate: Basic",
    "Proxy-Authorization: Basic Zm9vOmJhcg==",
    "Trailer: X-Sum",
    "Transfer-Encoding: chunked",
    "Upgrade: websocket",
    "HTTP2-Settings: AAMAAABkAAQAAP__",
    "TE: gzip",
    "Expect: 100-continue",
    "Host: proxy.test",
    "Content-Length: 99",
]


@pytest.mark.parametrize("field", HOP_BY_HOP)
def test_hop_by_hop_framing_and_host_never_go_upstream(field):
    name, _, value = field.partition(": ")
    sent = upstream_headers([(name, value), ("X-Keep", "1")])
    assert name.lower() not in lower_names(sent) or name.lower() == "content-length", sent
    assert sent["X-Keep"] == "1"
    assert "Content-Length" not in sent  # a GET without a body: none, whatever the client said


@pytest.mark.parametrize(
    ("client", "dropped", "kept"),
    [
        ([("Connection", "X-A"), ("X-A", "1"), ("X-B", "2")], {"x-a"}, {"x-b"}),
        ([("Connection", "x-a, X-B"), ("X-A", "1"), ("X-B", "2"), ("X-C", "3")], {"x-a", "x-b"}, {"x-c"}),
        ([("Connection", "X-A"), ("Connection", "X-B"), ("X-A", "1"), ("X-B", "2")], {"x-a", "x-b"}, set()),
        ([("X-A", "1"), ("Connection", " X-A ,")], {"x-a"}, set()),  # named after the header itself
        ([("Connection", "TE"), ("TE", "trailers")], set(), {"te"}),  # TE: trailers survives naming
    ],
)
def test_headers_named_by_connection_are_dropped(client, dropped, kept):
    sent = lower_names(upstream_headers(client))
    assert not (dropped & sent), sent
    assert kept <= sent, sent
    assert "connection" not in sent


@pytest.mark.parametrize(
    ("te", "sent"),
    [("trailers", "trailers"), ("gzip, trailers", "trailers"), ("TRAILERS", "trailers"), ("gzip", None)],
)
def test_te_goes_upstream_only_as_trailers(te, sent):
    assert upstream_headers([("TE", te)]).get("TE") == sent


@pytest.mark.parametrize(
    ("client", "auth", "expected", "absent"),
    [
        # token routing: the route's key replaces the client's credential, in the client's style
        (
            [("Authorization", "Bearer sk-client")],
            KEY,
            {"Authorization": "Bearer sk-upstream"},
            {"x-api-key"},
        ),
        ([("x-api-key", "sk-client")], ("x-api-key", "sk-up"), {"x-api-key": "sk-up"}, {"authorization"}),
        ([("X-Api-Key", "sk-client")], ("x-api-key", "sk-up"), {"x-api-key": "sk-up"}, {"authorization"}),
        (
            [("Authorization", "Bearer sk-client"), ("x-api-key", "sk-client")],
            KEY,
            {"Authorization": "Bearer sk-upstream"},
            {"x-api-key"},
        ),
        # legacy mode without an override: the client's own credential goes through, both styles
        ([("authorization", "Bearer sk-own")], None, {"Authorization": "Bearer sk-own"}, {"x-api-key"}),
        ([("X-API-KEY", "sk-own")], None, {"x-api-key": "sk-own"}, {"authorization"}),
    ],
)
def test_credentials_in_both_styles(client, auth, expected, absent):
    sent = upstream_headers(client, auth=auth)
    for name, value in expected.items():
        assert sent[name] == value, sent
    assert not (absent & lower_names(sent)), sent
    values = " ".join(sent.values())
    if auth is not None:
        assert "sk-client" not in values, sent  # the client's token never reaches the upstream


@pytest.mark.parametrize(
    ("client", "client_ip", "expected"),
    [
        ([], "10.0.0.9", "10.0.0.9"),
        ([("X-Forwarded-For", "1.1.1.1")], "10.0.0.9", "1.1.1.1, 10.0.0.9"),
        (
            [("X-Forwarded-For", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2")],
            "10.0.0.9",
            "1.1.1.1, 2.2.2.2, 10.0.0.9",
        ),
        ([("X-Forwarded-For", "1.1.1.1")], "", "1.1.1.1"),
        ([], "", None),
    ],
)
def test_x_forwarded_for_appends_the_client_address(client, client_ip, expected):
    sent = upstream_headers(client, client_ip=client_ip)
    assert sent.get("X-Forwarded-For") == expected
    assert sum(name.lower() == "x-forwarded-for" for name in sent) == (expected is not None)


def test_nothing_of_our_own_is_added_and_request_id_is_ours():
    sent = upstream_headers([("X-Request-ID", "client-said"), ("Accept", "*/*")])
    assert sent["X-Request-ID"] == "rid-1"
    assert sent["User-Agent"] is SKIP_HEADER and sent["Accept-Encoding"] is SKIP_HEADER
    mine = upstream_headers([("User-Agent", "sdk/1"), ("Accept-Encoding", "gzip")])
    assert mine["User-Agent"] == "sdk/1" and mine["Accept-Encoding"] == "gzip"


@pytest.mark.parametrize(
    ("client", "joined"),
    [
        ([("Cookie", "a=1"), ("cookie", "b=2")], ("Cookie", "a=1; b=2")),
        ([("X-Many", "1"), ("X-Many", "2")], ("X-Many", "1, 2")),
    ],
)
def test_repeated_client_headers_are_joined(client, joined):
    sent = {name.lower(): value for name, value in upstream_headers(client).items()}
    assert sent[joined[0].lower()] == joined[1]


@pytest.mark.parametrize(
    ("method", "body", "length"),
    [("POST", b"", "0"), ("PUT", b"{}", "2"), ("PATCH", b"", "0"), ("GET", b"", None), ("DELETE", b"x", "1")],
)
def test_content_length_follows_the_body_read(method, body, length):
    assert (
        upstream_headers([("Content-Length", "999")], method=method, body=body).get("Content-Length")
        == length
    )


@pytest.mark.parametrize(
    ("items", "chunked", "status", "kept", "dropped"),
    [
        (
            [
                ("Content-Type", "text/event-stream"),
                ("Transfer-Encoding", "chunked"),
                ("Connection", "keep-alive"),
            ],
            True,
            200,
            ["Content-Type"],
            {"transfer-encoding", "connection"},
        ),
        (
            [
                ("Connection", "X-Internal"),
                ("X-Internal", "1"),
                ("X-Public", "2"),
                ("Keep-Alive", "timeout=5"),
            ],
            False,
            200,
            ["X-Public"],
            {"x-internal", "keep-alive"},
        ),
        (
            [("Content-Length", "10"), ("Content-Type", "a/b")],
            False,
            200,
            ["Content-Length", "Content-Type"],
            set(),
        ),
        ([("Content-Length", "10"), ("ETag", "x")], False, 304, ["ETag"], {"content-length"}),
        ([("Content-Length", "10")], True, 200, [], {"content-length"}),
        (
            [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Upgrade", "h2c"), ("Trailer", "X"), ("TE", "x")],
            False,
            200,
            ["Set-Cookie", "Set-Cookie"],
            {"upgrade", "trailer", "te"},
        ),
        (
            [("Proxy-Authenticate", "Basic"), ("Proxy-Connection", "close"), ("Date", "d")],
            False,
            200,
            ["Date"],
            set(),
        ),
    ],
)
def test_what_comes_back_to_the_client(items, chunked, status, kept, dropped):
    out = client_response_headers(items, chunked, status)
    assert [name for name, _ in out] == kept
    assert not (dropped & lower_names(name for name, _ in out))
    assert out == [(n, v) for n, v in items if n in kept]  # values and order unchanged, repeats apart


@pytest.mark.parametrize(
    ("items", "event_stream", "expected"),
    [
        (
            [("Content-Type", "text/event-stream")],
            True,
            [("Content-Type", "text/event-stream"), ("X-Accel-Buffering", "no")],
        ),
        (  # the upstream's own value is replaced, not repeated
            [("X-Accel-Buffering", "yes"), ("Content-Type", "text/event-stream")],
            True,
            [("Content-Type", "text/event-stream"), ("X-Accel-Buffering", "no")],
        ),
        (  # anything else passes as it came
            [("X-Accel-Buffering", "yes"), ("Content-Type", "application/json")],
            False,
            [("X-Accel-Buffering", "yes"), ("Content-Type", "application/json")],
        ),
    ],
)
def test_event_streams_ask_nginx_not_to_buffer(items, event_stream, expected):
    assert client_response_headers(items, True, 200, event_stream) == expected
