"""The access log, read from the real process's stdout: one JSON line per request (logger
proxy.access) with the request's facts, bodies up to LOG_BODY_MAX_BYTES, and every credential masked.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
import requests

from tests.conftest import module_proxy
from tests.support.rawhttp import new_id
from tests.support.tables import CLIENT_TOKEN, UPSTREAM_KEY, register_secret, row

TIMEOUT = 10
ELLIPSIS = "\u2026"


def rows(upstream) -> dict[str, dict]:
    return {CLIENT_TOKEN: row(upstream.url + "/v1", UPSTREAM_KEY, token_id=7, ai_model_name="FakeModel")}


@pytest.fixture(scope="module")
def lp(tmp_path_factory, upstream):
    yield from module_proxy(tmp_path_factory, "logging", rows(upstream))


@pytest.fixture(scope="module")
def small(tmp_path_factory, upstream):
    yield from module_proxy(tmp_path_factory, "logging-small", rows(upstream), {"LOG_BODY_MAX_BYTES": "100"})


AUTH = {"Authorization": f"Bearer {CLIENT_TOKEN}"}


def lines_of(proxy, request_id: str) -> list[dict]:
    return [r for r in proxy.access_lines() if r.get("request_id") == request_id]


def one_line(proxy, request_id: str) -> dict:
    """The access line of the request; fails if there is more than one."""
    line = proxy.access_line(request_id)
    time.sleep(0.05)  # a duplicate would be written at the same moment
    found = lines_of(proxy, request_id)
    assert len(found) == 1, found
    return line


def test_access_line_has_every_field(lp, upstream):
    rid = new_id("g")
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode()
    response = requests.post(
        lp.url + "/chat/completions?x=1&y=two",
        headers={**AUTH, "X-Request-ID": rid, "X-Custom": "1", "Content-Type": "application/json"},
        data=body,
        timeout=TIMEOUT,
    )
    assert response.status_code == 200
    line = one_line(lp, rid)
    assert line["logger"] == "proxy.access"
    assert line["method"] == "POST"
    assert line["path"] == "/chat/completions"
    assert line["query"] == "x=1&y=two"
    assert line["client_ip"] == "127.0.0.1"
    assert line["status"] == 200
    assert line["end_reason"] == "complete"
    assert isinstance(line["latency_ms"], (int, float)) and 0 <= line["latency_ms"] < 10_000
    assert isinstance(line["ttfb_ms"], (int, float)) and 0 <= line["ttfb_ms"] <= line["latency_ms"]
    assert line["request_size_bytes"] == len(body)
    assert line["response_size_bytes"] == len(response.content)
    assert line["token_id"] == 7
    assert line["ai_model_name"] == "FakeModel"
    assert line["upstream"] == f"127.0.0.1:{upstream.port}"
    assert isinstance(line["request_headers"], dict)
    assert line["request_headers"]["X-Custom"] == "1"
    assert line["request_headers"]["Content-Type"] == "application/json"
    assert isinstance(line["response_headers"], dict)
    assert line["response_headers"]["Content-Type"] == "application/json"
    assert line["request_body"] == body.decode()
    assert line["request_body_truncated"] is False
    assert line["response_body"] == response.text
    assert line["response_body_truncated"] is False


def test_pid_names_the_worker_process(lp):
    rid = new_id("g")
    requests.get(lp.url + "/models", headers={**AUTH, "X-Request-ID": rid}, timeout=TIMEOUT)
    assert one_line(lp, rid)["pid"] == lp.process.pid


@pytest.mark.parametrize(
    ("method", "fake", "status"),
    [
        ("GET", "json", 200),
        ("HEAD", "json", 200),
        ("GET", "json;status=204", 204),
        ("DELETE", "json;status=404", 404),
    ],
)
def test_exactly_one_line_per_proxied_request(lp, method, fake, status):
    rid = new_id("g")
    response = requests.request(
        method, lp.url + "/things/1", headers={**AUTH, "X-Request-ID": rid, "X-Fake": fake}, timeout=TIMEOUT
    )
    assert response.status_code == status
    line = one_line(lp, rid)
    assert line["status"] == status
    assert line["method"] == method
    assert line["response_size_bytes"] == len(response.content)


@pytest.mark.parametrize(
    ("method", "headers", "status"),
    [
        ("POST", {}, 401),
        ("POST", {"Authorization": "Bearer sk-unknown-token-000111222333"}, 401),
        ("TRACE", AUTH, 405),
    ],
    ids=["missing", "unknown", "trace"],
)
def test_exactly_one_line_per_rejected_request(lp, method, headers, status):
    rid = new_id("g")
    response = requests.request(
        method, lp.url + "/chat/completions", headers={**headers, "X-Request-ID": rid}, timeout=TIMEOUT
    )
    assert response.status_code == status
    line = one_line(lp, rid)
    assert line["status"] == status
    assert line["path"] == "/chat/completions"
    assert "sk-unknown-token-000111222333" not in json.dumps(line)


def post_body(proxy, body: bytes, fake: str) -> tuple[str, requests.Response]:
    """POST ``body`` with X-Fake: ``fake``; (request ID, response)."""
    rid = new_id("g")
    response = requests.post(
        proxy.url + "/chat/completions",
        headers={**AUTH, "X-Request-ID": rid, "X-Fake": fake},
        data=body,
        timeout=TIMEOUT,
    )
    return rid, response


def test_default_body_limit_is_4096(lp):
    body = ("0123456789abcdef" * 320).encode()  # 5120 bytes
    rid, response = post_body(lp, body, "json;size=6000")
    assert response.status_code == 200
    assert len(response.content) > 4096
    line = one_line(lp, rid)
    assert line["request_body"] == body[:4096].decode()
    assert line["request_body_truncated"] is True
    assert line["response_body"] == response.content[:4096].decode()
    assert line["response_body_truncated"] is True
    assert line["request_size_bytes"] == len(body)
    assert line["response_size_bytes"] == len(response.content)


def test_body_limit_is_configurable(small):
    body = ("abcdefghij" * 50).encode()  # 500 bytes
    rid, response = post_body(small, body, "json;size=600")
    assert response.status_code == 200
    line = one_line(small, rid)
    assert line["request_body"] == body[:100].decode()
    assert line["request_body_truncated"] is True
    assert line["response_body"] == response.content[:100].decode()
    assert line["response_body_truncated"] is True
    assert line["request_size_bytes"] == 500

    rid, response = post_body(small, b"tiny", "json;status=204")
    assert response.status_code == 204
    line = one_line(small, rid)
    assert line["request_body"] == "tiny"
    assert line["request_body_truncated"] is False
    assert not line["response_body"]
    assert line["response_body_truncated"] is False


def test_credential_headers_are_masked(lp):
    rid = new_id("g")
    requests.get(lp.url + "/models", headers={**AUTH, "X-Request-ID": rid}, timeout=TIMEOUT)
    logged = one_line(lp, rid)["request_headers"]["Authorization"]
    assert CLIENT_TOKEN not in logged
    assert logged.startswith("Bearer ")
    assert ELLIPSIS in logged
    assert logged == f"Bearer {CLIENT_TOKEN[:5]}{ELLIPSIS}{CLIENT_TOKEN[-4:]}"

    rid = new_id("g")
    requests.get(
        lp.url + "/models", headers={"x-api-key": CLIENT_TOKEN, "X-Request-ID": rid}, timeout=TIMEOUT
    )
    line = one_line(lp, rid)
    assert line["status"] == 200
    assert CLIENT_TOKEN not in json.dumps(line)
    assert ELLIPSIS in line["request_headers"]["x-api-key"]


def test_secrets_in_bodies_are_masked(lp):
    random_key = register_secret("sk-" + uuid.uuid4().hex + uuid.uuid4().hex[:8])
    rid = new_id("g")
    content = f"my token is {CLIENT_TOKEN}, the key {UPSTREAM_KEY} and another {random_key} ok"
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]})
    response = requests.post(
        lp.url + "/chat/completions",
        headers={**AUTH, "X-Request-ID": rid, "Content-Type": "application/json"},
        data=body,
        timeout=TIMEOUT,
    )
    assert response.status_code == 200
    line = one_line(lp, rid)
    text = json.dumps(line, ensure_ascii=False)
    for secret in (CLIENT_TOKEN, UPSTREAM_KEY, random_key):
        assert secret not in text
    logged = line["request_body"]
    assert "my token is " in logged and " ok" in logged
    assert logged.count(ELLIPSIS) >= 3


def test_upstream_key_echoed_in_a_response_body_is_masked(lp):
    rid = new_id("g")
    response = requests.post(
        lp.url + "/chat/completions", headers={**AUTH, "X-Request-ID": rid, "X-Fake": "echo"}, timeout=TIMEOUT
    )
    assert UPSTREAM_KEY in response.text  # the fake upstream echoes the key it received
    line = one_line(lp, rid)
    assert line["response_body"]
    assert UPSTREAM_KEY not in json.dumps(line)


def test_secret_in_the_query_is_masked(lp, upstream):
    secret = register_secret("qk" + uuid.uuid4().hex)
    rid = new_id("g")
    response = requests.get(
        lp.url + f"/models?api_key={secret}&x=1", headers={**AUTH, "X-Request-ID": rid}, timeout=TIMEOUT
    )
    assert response.status_code == 200
    line = one_line(lp, rid)
    assert secret not in json.dumps(line)
    assert line["query"].startswith("api_key=")
    assert line["query"].endswith("&x=1")


def test_sse_stream_is_logged_once_when_it_ends(lp):
    rid = new_id("g")
    response = requests.post(
        lp.url + "/chat/completions",
        headers={**AUTH, "X-Request-ID": rid, "X-Fake": "sse;events=4;interval=0.25;usage"},
        json={"model": "m", "stream": True},
        stream=True,
        timeout=TIMEOUT,
    )
    assert response.status_code == 200
    pieces = response.iter_content(None)
    received = next(pieces)
    assert b"tok0 " in received
    assert lines_of(lp, rid) == [], "access line written before the stream ended"
    for piece in pieces:
        received += piece
    assert received.endswith(b"data: [DONE]\n\n")
    line = one_line(lp, rid)
    assert line["response_size_bytes"] == len(received)
    assert line["end_reason"] == "complete"
    assert line["status"] == 200
    assert line["latency_ms"] >= 600
    assert line["ttfb_ms"] < line["latency_ms"] - 400
    assert line["response_body"] == received.decode()
    assert line["response_headers"]["Content-Type"].startswith("text/event-stream")


def test_no_credential_ever_reaches_this_proxys_output(lp, small):
    for proxy in (lp, small):
        output = proxy.process.output()
        assert "proxy.access" in output
        for secret in (CLIENT_TOKEN, UPSTREAM_KEY):
            assert secret not in output
