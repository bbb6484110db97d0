"""The request path of a token-routing proxy, end to end: request IDs, the client's credential,
and exactly what the upstream receives (URL, method, body, headers, framing).

One proxy process serves the whole module (none of these tests changes its state); every request
carries its own X-Request-ID, which is how the fake upstream's record of it is found again.
"""

from __future__ import annotations

import base64
import json
import re
import time

import pytest
import requests

from tests.conftest import module_proxy
from tests.support.procs import free_port
from tests.support.rawhttp import RawClient, new_id
from tests.support.tables import CLIENT_TOKEN, UPSTREAM_KEY, row

HEX32 = re.compile(r"[0-9a-f]{32}")
TIMEOUT = 10

# Tokens of the module's table besides CLIENT_TOKEN (none of them is a canary).
PREFIX_TOKEN = "tok-prefix-4b1d"
SLASH_TOKEN = "tok-slash-9c2e"
DEAD_TOKEN = "tok-dead-upstream-1a7f"
EXPIRED_ISO = "tok-expired-iso-5e3a"
EXPIRED_EPOCH = "tok-expired-epoch-6f4b"
FUTURE_ISO = "tok-future-iso-7a5c"
FUTURE_EPOCH = "tok-future-epoch-8b6d"


@pytest.fixture(scope="module")
def rp(tmp_path_factory, upstream):
    """One token-routing proxy for the module, with rows for every routing case."""
    now = int(time.time())
    v1 = upstream.url + "/v1"
    rows = {
        CLIENT_TOKEN: row(v1, UPSTREAM_KEY, token_id=7, ai_model_name="FakeModel"),
        PREFIX_TOKEN: row(upstream.url + "/api/paas/v4", UPSTREAM_KEY, token_id=8),
        SLASH_TOKEN: row(upstream.url + "/api/paas/v4/", UPSTREAM_KEY, token_id=9),
        DEAD_TOKEN: row(f"http://127.0.0.1:{free_port()}/v1", UPSTREAM_KEY, token_id=10),
        EXPIRED_ISO: row(v1, UPSTREAM_KEY, token_id=11, token_expire_at="2001-02-03T04:05:06Z"),
        EXPIRED_EPOCH: row(v1, UPSTREAM_KEY, token_id=12, token_expire_at=now - 3600),
        FUTURE_ISO: row(v1, UPSTREAM_KEY, token_id=13, token_expire_at="2999-01-01T00:00:00Z"),
        FUTURE_EPOCH: row(v1, UPSTREAM_KEY, token_id=14, token_expire_at=now + 86400 * 365),
    }
    yield from module_proxy(tmp_path_factory, "request-path", rows)


def bearer(token: str = CLIENT_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def values(record: dict, name: str) -> list[str]:
    return [v for n, v in record["headers"] if n.lower() == name.lower()]


def names(record: dict) -> set[str]:
    return {n.lower() for n, _ in record["headers"]}


def echo(
    proxy, path="/chat/completions", method="POST", headers=None, **kwargs
) -> tuple[requests.Response, dict]:
    """Send through the proxy with X-Fake: echo; return the response and what the upstream received."""
    all_headers = {"X-Fake": "echo", **(headers if headers is not None else bearer())}
    response = requests.request(method, proxy.url + path, headers=all_headers, timeout=TIMEOUT, **kwargs)
    assert response.status_code == 200, response.text
    return response, response.json()


# ------------------------------------------------------------------------------------ request IDs


@pytest.mark.parametrize(
    "client_id",
    ["abc", "A.b_c-9", "x" * 128, "0123456789abcdef0123456789abcdef", "."],
    ids=["short", "all-classes", "128-chars", "hex", "one-char"],
)
def test_valid_client_request_id_is_kept_everywhere(rp, upstream, client_id):
    response, received = echo(rp, headers={**bearer(), "X-Request-ID": client_id})
    assert response.headers["X-Request-ID"] == client_id
    assert values(received, "X-Request-ID") == [client_id]
    line = rp.access_line(client_id)
    assert line["status"] == 200


@pytest.mark.parametrize(
    "client_id",
    ["x" * 129, "abc def", "abc/def", "abc;def", "abc$", "id:1", "é-accent", "a,b"],
    ids=["129-chars", "space", "slash", "semicolon", "dollar", "colon", "non-ascii", "comma"],
)
def test_invalid_client_request_id_is_replaced_by_fresh_hex(rp, upstream, client_id):
    marker = new_id("t")
    response = requests.post(
        rp.url + "/chat/completions",
        headers={**bearer(), "X-Fake": "echo", "X-Request-ID": client_id.encode("utf-8"), "X-Marker": marker},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    rid = response.headers["X-Request-ID"]
    assert HEX32.fullmatch(rid), rid
    received = response.json()
    assert values(received, "X-Marker") == [marker]
    assert values(received, "X-Request-ID") == [rid]
    assert rp.access_line(rid)["request_id"] == rid


def test_missing_request_id_gets_a_distinct_fresh_id_per_request(rp, upstream):
    ids = set()
    for _ in range(3):
        response, received = echo(rp)
        rid = response.headers["X-Request-ID"]
        assert HEX32.fullmatch(rid), rid
        assert values(received, "X-Request-ID") == [rid]
        rp.access_line(rid)
        ids.add(rid)
    assert len(ids) == 3


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("POST", "/chat/completions", {}, 401),
        ("POST", "/chat/completions", {"Authorization": "Bearer tok-not-in-the-table"}, 401),
        ("POST", "/chat/completions", {"Authorization": f"Bearer {DEAD_TOKEN}"}, 502),
        ("TRACE", "/chat/completions", {"Authorization": f"Bearer {CLIENT_TOKEN}"}, 405),
    ],
    ids=["401-missing", "401-unknown", "502-unreachable", "405-trace"],
)
def test_error_responses_carry_the_request_id(rp, method, path, headers, status):
    client_id = new_id("t")
    response = requests.request(
        method, rp.url + path, headers={**headers, "X-Request-ID": client_id}, timeout=TIMEOUT
    )
    assert response.status_code == status
    assert response.headers["X-Request-ID"] == client_id
    assert response.json()["error"]["request_id"] == client_id
    assert rp.access_line(client_id)["status"] == status

    response = requests.request(method, rp.url + path, headers=headers, timeout=TIMEOUT)
    assert response.status_code == status
    rid = response.headers["X-Request-ID"]
    assert HEX32.fullmatch(rid), rid
    assert response.json()["error"]["request_id"] == rid
    assert rp.access_line(rid)["status"] == status


# ------------------------------------------------------------------------------------ credentials


@pytest.mark.parametrize(
    ("header", "value", "upstream_header"),
    [
        ("Authorization", f"Bearer {CLIENT_TOKEN}", "authorization"),
        ("Authorization", f"bearer {CLIENT_TOKEN}", "authorization"),
        ("Authorization", f"BEARER {CLIENT_TOKEN}", "authorization"),
        ("Authorization", f"BeArEr {CLIENT_TOKEN}", "authorization"),
        ("Authorization", CLIENT_TOKEN, "authorization"),
        ("x-api-key", CLIENT_TOKEN, "x-api-key"),
        ("X-API-Key", CLIENT_TOKEN, "x-api-key"),
    ],
    ids=["Bearer", "bearer", "BEARER", "BeArEr", "bare", "x-api-key", "X-API-Key"],
)
def test_credential_forms_are_accepted_and_replaced_by_the_upstream_key(rp, header, value, upstream_header):
    _, received = echo(rp, headers={header: value})
    assert received["target"] == "/v1/chat/completions"
    if upstream_header == "authorization":
        assert values(received, "Authorization") == [f"Bearer {UPSTREAM_KEY}"]
        assert "x-api-key" not in names(received)
    else:
        assert values(received, "x-api-key") == [UPSTREAM_KEY]
        assert "authorization" not in names(received)
    assert CLIENT_TOKEN not in json.dumps(received)


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_token"),
        ({"Authorization": ""}, None),
        ({"Authorization": "Bearer "}, None),
        ({"Authorization": "Bearer tok-unknown-0000"}, "invalid_token"),
        ({"Authorization": "tok-unknown-0000"}, "invalid_token"),
        ({"x-api-key": "tok-unknown-0000"}, "invalid_token"),
        ({"Authorization": f"Bearer {CLIENT_TOKEN}x"}, "invalid_token"),
    ],
    ids=["none", "empty", "bearer-empty", "unknown-bearer", "unknown-bare", "unknown-x-api-key", "suffix"],
)
def test_missing_or_unknown_token_is_401_json(rp, upstream, headers, code):
    rid = new_id("t")
    response = requests.post(
        rp.url + "/chat/completions",
        headers={**headers, "X-Request-ID": rid, "X-Fake": "echo"},
        json={"model": "x"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 401
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    if code is None:  # an empty credential: either code says what is wrong
        assert error["code"] in ("missing_token", "invalid_token")
    else:
        assert error["code"] == code
    assert error["message"]
    assert error["type"]
    assert error["request_id"] == rid
    assert upstream.records_of(rid) == []


@pytest.mark.parametrize("token", [EXPIRED_ISO, EXPIRED_EPOCH], ids=["iso", "epoch"])
def test_expired_token_is_401_token_expired(rp, upstream, token):
    rid = new_id("t")
    response = requests.post(
        rp.url + "/chat/completions",
        headers={**bearer(token), "X-Request-ID": rid, "X-Fake": "echo"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "token_expired"
    assert upstream.records_of(rid) == []


@pytest.mark.parametrize("token", [FUTURE_ISO, FUTURE_EPOCH], ids=["iso", "epoch"])
def test_token_expiring_in_the_future_passes(rp, token):
    _, received = echo(rp, headers=bearer(token))
    assert received["target"] == "/v1/chat/completions"
    assert values(received, "Authorization") == [f"Bearer {UPSTREAM_KEY}"]


# ------------------------------------------------------------------------------- upstream URL


@pytest.mark.parametrize("token", [PREFIX_TOKEN, SLASH_TOKEN], ids=["no-trailing-slash", "trailing-slash"])
def test_path_is_joined_to_the_api_url_prefix_with_one_slash(rp, token):
    _, received = echo(rp, "/chat/completions", headers=bearer(token))
    assert received["target"] == "/api/paas/v4/chat/completions"
    _, received = echo(rp, "/models/glm-4/x", method="GET", headers=bearer(token))
    assert received["target"] == "/api/paas/v4/models/glm-4/x"


@pytest.mark.parametrize(
    "query",
    ["a=1&b=%2F&c=x+y", "q=%E4%BD%A0%20&empty=&flag", "x=1&x=2&y=%3D%26"],
    ids=["encoded-slash-plus", "utf8-empty-flag", "repeated-escaped"],
)
def test_raw_query_string_is_forwarded_unchanged(rp, query):
    _, received = echo(rp, "/models?" + query, method="GET")
    assert received["target"] == "/v1/models?" + query


def test_percent_encoded_path_is_forwarded_raw(rp):
    _, received = echo(rp, "/files/a%2Fb%20c/content", method="GET")
    assert received["target"] == "/v1/files/a%2Fb%20c/content"


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("POST", b'{"model": "m", "messages": []}'),
        ("PUT", b"put-body \x00\xff binary"),
        ("PATCH", b'{"patch": true}'),
        ("DELETE", b""),
        ("DELETE", b"delete-with-body"),
        ("GET", b""),
        ("OPTIONS", b""),
    ],
    ids=["POST", "PUT", "PATCH", "DELETE", "DELETE-body", "GET", "OPTIONS"],
)
def test_method_and_body_are_forwarded_unchanged(rp, method, body):
    _, received = echo(rp, "/things/1", method=method, data=body)
    assert received["method"] == method
    assert received["target"] == "/v1/things/1"
    assert base64.b64decode(received["body_b64"]) == body
    lengths = values(received, "Content-Length")
    if body:
        assert lengths == [str(len(body))]
        assert received["framing"] == "length"
    else:
        assert lengths in ([], ["0"])


def test_large_body_is_forwarded_intact(rp):
    body = bytes(range(256)) * 4096  # 1 MiB
    _, received = echo(rp, data=body)
    assert base64.b64decode(received["body_b64"]) == body
    assert values(received, "Content-Length") == [str(len(body))]


# ------------------------------------------------------------------------------ request headers


def test_end_to_end_headers_arrive_and_hop_by_hop_ones_do_not(rp):
    _, received = echo(
        rp,
        headers={
            **bearer(),
            "X-Custom": "1",
            "Content-Type": "application/json",
            "OpenAI-Organization": "org-1",
            "Connection": "X-Foo, close",
            "X-Foo": "must-not-pass",
            "Keep-Alive": "timeout=5",
            "Proxy-Connection": "keep-alive",
            "TE": "gzip",
            "Trailer": "X-Checksum",
            "Upgrade": "websocket",
            "Proxy-Authorization": "Basic dXNlcjpwYXNz",
        },
        data=b'{"a": 1}',
    )
    assert values(received, "X-Custom") == ["1"]
    assert values(received, "Content-Type") == ["application/json"]
    assert values(received, "OpenAI-Organization") == ["org-1"]
    present = names(received)
    for name in (
        "x-foo",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
    ):
        assert name not in present, (name, received["headers"])
    for value in values(received, "Connection"):
        assert "x-foo" not in value.lower()


def test_te_trailers_is_kept(rp):
    _, received = echo(rp, headers={**bearer(), "TE": "trailers"})
    assert [v.lower() for v in values(received, "TE")] == ["trailers"]


def test_expect_is_removed(rp):
    body = b'{"expect": "continue"}'
    headers = {**bearer(), "X-Fake": "echo", "Expect": "100-continue", "Content-Length": str(len(body))}
    with RawClient(rp.port, timeout=TIMEOUT) as client:
        client.send_request("POST", "/chat/completions", headers, None, "proxy.local")
        assert client.read_head()[0] == 100  # the interim answer, before any body byte was sent
        client.send(body)
        status, _, payload = client.read_response("POST")
    assert status == 200, payload
    record = json.loads(payload)
    assert "expect" not in names(record)
    assert base64.b64decode(record["body_b64"]) == body


def test_host_is_the_upstreams_own(rp, upstream):
    _, received = echo(rp, headers={**bearer(), "Host": "client-facing.example:8443"})
    assert values(received, "Host") == [f"127.0.0.1:{upstream.port}"]


def test_x_forwarded_for_gets_the_client_address_appended(rp):
    _, received = echo(rp, headers={**bearer(), "X-Forwarded-For": "1.2.3.4"})
    assert values(received, "X-Forwarded-For") == ["1.2.3.4, 127.0.0.1"]
    _, received = echo(rp)
    assert values(received, "X-Forwarded-For") == ["127.0.0.1"]


def test_client_token_appears_nowhere_upstream(rp, upstream):
    rid = new_id("t")
    echo(rp, headers={**bearer(), "X-Request-ID": rid, "X-Other": "1"}, json={"model": "m"})
    (record,) = upstream.records_of(rid)
    assert CLIENT_TOKEN not in json.dumps(record)
    assert CLIENT_TOKEN.encode() not in base64.b64decode(record["body_b64"])
    assert values(record, "Authorization") == [f"Bearer {UPSTREAM_KEY}"]


def test_chunked_client_body_is_sent_upstream_with_one_framing(rp):
    _, received = echo(rp, data=iter([b"ab", b"cd"]))
    assert received["framing"] == "length"
    assert base64.b64decode(received["body_b64"]) == b"abcd"
    assert values(received, "Content-Length") == ["4"]
    assert "transfer-encoding" not in names(received)


@pytest.mark.parametrize("method", ["POST", "PUT", "GET", "DELETE"])
def test_never_both_content_length_and_transfer_encoding(rp, method):
    _, received = echo(rp, "/x", method=method, data=b"0123456789")
    present = names(received)
    assert not ("content-length" in present and "transfer-encoding" in present), received["headers"]
    assert len(values(received, "Content-Length")) == 1
    assert base64.b64decode(received["body_b64"]) == b"0123456789"


def test_nothing_of_our_own_is_added(rp, upstream):
    rid = new_id("t")
    with RawClient(rp.port, timeout=TIMEOUT) as client:  # exactly these headers, nothing else
        client.send_request(
            "POST", "/chat/completions", {**bearer(), "X-Request-ID": rid}, b"{}", "127.0.0.1"
        )
        status, _, _ = client.read_response("POST")
    assert status == 200
    (record,) = upstream.records_of(rid)
    present = names(record)
    for name in ("user-agent", "accept-encoding", "accept", "cookie"):
        assert name not in present, (name, record["headers"])


def test_client_user_agent_and_accept_headers_pass_unchanged(rp):
    _, received = echo(
        rp,
        headers={**bearer(), "User-Agent": "my-agent/1.0", "Accept-Encoding": "br", "Accept": "text/plain"},
    )
    assert values(received, "User-Agent") == ["my-agent/1.0"]
    assert values(received, "Accept-Encoding") == ["br"]
    assert values(received, "Accept") == ["text/plain"]
