"""What the client gets back, end to end: the upstream's status, headers and body bytes passed
through (hop-by-hop headers removed, nothing invented), bodyless responses framed cleanly on
keep-alive connections, error responses, the /_proxy/* endpoints, unsupported methods, and
configuration errors at start.
"""

from __future__ import annotations

import gzip
import json
import re
import time

import pytest
import requests

from tests.conftest import module_proxy
from tests.support.procs import PYTHON, REPO, Process, free_port, wait_for
from tests.support.rawhttp import RawClient, new_id
from tests.support.tables import SECRETS, UPSTREAM_KEY, row, write_table

TIMEOUT = 10
HEX32 = re.compile(r"[0-9a-f]{32}")
TOKEN = "tok-responses-3e9d"
DEAD_TOKEN = "tok-responses-dead-5a1c"
DEAD_KEY = "sk-dead-upstream-key-0f9e8d7c6b5a4f3e"


@pytest.fixture(scope="module")
def rp(tmp_path_factory, upstream):
    rows = {
        TOKEN: row(upstream.url + "/v1", UPSTREAM_KEY, token_id=21),
        DEAD_TOKEN: row(f"http://127.0.0.1:{free_port()}/v1", DEAD_KEY, token_id=22),
    }
    yield from module_proxy(tmp_path_factory, "responses", rows)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def one_exchange(proxy, method: str, path: str, headers: dict | None = None):
    """``exchange`` on a connection of its own."""
    with RawClient(proxy.port, timeout=TIMEOUT) as conn:
        return exchange(conn, method, path, headers)


def exchange(
    conn: RawClient, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
):
    """One request with the module's token on a keep-alive connection; its response, read strictly
    by its framing (stray bytes after a response show up as garbage before the next one)."""
    sent_body = body if body or method in ("POST", "PUT", "PATCH") else None
    conn.send_request(method, path, {**AUTH, **(headers or {})}, sent_body, host="127.0.0.1")
    return conn.read_response(method)


def header_values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in headers if n.lower() == name.lower()]


# -------------------------------------------------------------------------- status and headers


@pytest.mark.parametrize("status", [200, 201, 202, 400, 401, 403, 404, 429, 500, 503])
def test_upstream_status_and_body_are_passed_through(rp, status):
    response = requests.post(
        rp.url + "/chat/completions", headers={**AUTH, "X-Fake": f"json;status={status}"}, timeout=TIMEOUT
    )
    assert response.status_code == status
    if status < 300:
        assert response.json()["object"] == "chat.completion"
    else:
        assert response.json() == {"error": {"message": "fake error", "type": "fake"}}


def test_hop_by_hop_response_headers_are_removed(rp):
    response = requests.get(
        rp.url + "/models",
        headers={
            **AUTH,
            "X-Fake": "json;header=Connection:X-Foo;header=X-Foo:bar;header=Keep-Alive:timeout=5;"
            "header=X-Up:1;header=Proxy-Connection:keep-alive;header=Upgrade:h2c;header=Trailer:X-T",
        },
        timeout=TIMEOUT,
    )
    assert response.status_code == 200
    assert response.headers["X-Up"] == "1"
    for name in ("X-Foo", "Keep-Alive", "Proxy-Connection", "Upgrade", "Trailer"):
        assert name not in response.headers, (name, dict(response.headers))
    assert "x-foo" not in response.headers.get("Connection", "").lower()
    response.json()


def test_end_to_end_response_headers_pass_in_order_and_unchanged(rp):
    response = requests.get(
        rp.url + "/models",
        headers={**AUTH, "X-Fake": "json;header=X-Ratelimit-Remaining:42;header=OpenAI-Processing-Ms:17"},
        timeout=TIMEOUT,
    )
    assert response.headers["X-Ratelimit-Remaining"] == "42"
    assert response.headers["OpenAI-Processing-Ms"] == "17"
    assert response.headers["Content-Type"] == "application/json"
    assert HEX32.fullmatch(response.headers["X-Request-ID"])


def test_repeated_set_cookie_headers_are_kept_apart(rp):
    status, headers, body = one_exchange(rp, "GET", "/models", {"X-Fake": "json;cookies"})
    assert status == 200
    assert header_values(headers, "Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    json.loads(body)
    response = requests.get(rp.url + "/models", headers={**AUTH, "X-Fake": "json;cookies"}, timeout=TIMEOUT)
    assert response.raw.headers.getlist("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]


def test_no_content_type_is_invented(rp):
    status, headers, body = one_exchange(rp, "GET", "/models", {"X-Fake": "json;noctype"})
    assert status == 200
    assert header_values(headers, "Content-Type") == []
    json.loads(body)


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_gzip_body_passes_through_byte_for_byte(rp, framing):
    response = requests.post(
        rp.url + "/chat/completions",
        headers={**AUTH, "X-Fake": f"json;gzip;size=3000;framing={framing}"},
        stream=True,
        timeout=TIMEOUT,
    )
    assert response.status_code == 200
    assert response.headers["Content-Encoding"] == "gzip"
    compressed = response.raw.read(decode_content=False)
    if framing == "length":
        assert response.headers["Content-Length"] == str(len(compressed))
    assert compressed[:2] == b"\x1f\x8b"
    document = json.loads(gzip.decompress(compressed))
    assert document["object"] == "chat.completion"
    assert len(compressed) < len(json.dumps(document))


def test_gzip_sse_stream_passes_through_compressed(rp):
    response = requests.post(
        rp.url + "/chat/completions",
        headers={**AUTH, "X-Fake": "sse;gzip;events=4;interval=0.01"},
        json={"stream": True},
        stream=True,
        timeout=TIMEOUT,
    )
    assert response.headers["Content-Encoding"] == "gzip"
    text = gzip.decompress(response.raw.read(decode_content=False)).decode()
    assert [f"tok{i} " in text for i in range(4)] == [True] * 4
    assert text.endswith("data: [DONE]\n\n")


def test_bodyless_responses_leave_a_keep_alive_connection_clean(rp):
    conn = RawClient(rp.port, timeout=TIMEOUT)
    try:
        for method, fake in [
            ("HEAD", "json"),
            ("GET", "json"),
            ("HEAD", "json;framing=chunked"),
            ("GET", "json;size=100"),
            ("GET", "json;status=204"),
            ("GET", "json;status=204;cl"),
            ("GET", "json;status=304"),
            ("GET", "json;status=304;cl"),
            ("POST", "json;status=204"),
            ("HEAD", "json;gzip"),
            ("GET", "json;size=50"),
        ]:
            status, headers, body = exchange(conn, method, "/models", {"X-Fake": fake})
            expected = 204 if "204" in fake else 304 if "304" in fake else 200
            assert status == expected, (method, fake, headers)
            assert body == b"" or method == "GET", (method, fake)
            if method == "GET" and expected == 200:
                assert json.loads(body)["object"] == "chat.completion"
            if expected in (204, 304):
                assert header_values(headers, "Transfer-Encoding") == []
                assert header_values(headers, "Content-Length") in ([], ["0"])
            assert "close" not in ",".join(header_values(headers, "Connection")).lower()
        assert conn.no_stray_bytes()
    finally:
        conn.close()


def test_head_response_keeps_the_upstream_length_and_type(rp):
    conn = RawClient(rp.port, timeout=TIMEOUT)
    try:
        _, _, body = exchange(conn, "GET", "/models", {"X-Fake": "json;size=777"})
        status, headers, head_body = exchange(conn, "HEAD", "/models", {"X-Fake": "json;size=777"})
        assert conn.no_stray_bytes()
    finally:
        conn.close()
    assert status == 200
    assert head_body == b""
    assert header_values(headers, "Content-Type") == ["application/json"]
    assert header_values(headers, "Content-Length") in ([], [str(len(body))])


# ------------------------------------------------------------------------------------- errors


def assert_clean_error(response: requests.Response, status: int, rid: str, *forbidden: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["X-Request-ID"] == rid
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert {"message", "type", "code", "request_id"} <= set(error)
    assert error["request_id"] == rid
    assert isinstance(error["message"], str) and error["message"]
    text = response.text
    for word in ("Traceback", 'File "', "urllib3", "HTTPConnection", *forbidden):
        assert word not in text, (word, text)
    for secret in SECRETS:
        assert secret not in text
    return error


def test_unreachable_upstream_is_502_json(rp):
    rid = new_id("r")
    response = requests.post(
        rp.url + "/chat/completions?api_key=q-secret-7788&x=1",
        headers={"Authorization": f"Bearer {DEAD_TOKEN}", "X-Request-ID": rid},
        json={"model": "m"},
        timeout=TIMEOUT,
    )
    error = assert_clean_error(response, 502, rid, "q-secret-7788", "api_key", DEAD_KEY, DEAD_TOKEN, "/v1/")
    assert error["type"]
    assert error["code"]


def test_garbage_from_upstream_is_502_json(rp):
    rid = new_id("r")
    response = requests.post(
        rp.url + "/chat/completions?secret=zz-9911",
        headers={**AUTH, "X-Fake": "garbage", "X-Request-ID": rid},
        timeout=TIMEOUT,
    )
    assert_clean_error(response, 502, rid, "zz-9911", UPSTREAM_KEY, TOKEN, "abc")


@pytest.mark.parametrize(
    ("method", "path", "fake", "status", "location", "body"),
    [
        (
            "POST",
            "/chat/completions",
            "redirect=http://127.0.0.1:1/x",
            302,
            "http://127.0.0.1:1/x",
            b"redirect\n",
        ),
        ("GET", "/models", "redirect=/elsewhere;status=307", 307, "/elsewhere", None),
    ],
)
def test_redirect_is_passed_to_the_client_not_followed(
    rp, upstream, method, path, fake, status, location, body
):
    rid = new_id("r")
    response = requests.request(
        method,
        rp.url + path,
        headers={**AUTH, "X-Fake": fake, "X-Request-ID": rid},
        allow_redirects=False,
        timeout=TIMEOUT,
    )
    assert response.status_code == status
    assert response.headers["Location"] == location
    if body is not None:
        assert response.content == body
    assert len(upstream.records_of(rid)) == 1


# ------------------------------------------------------------------------ operational endpoints


def test_healthz_needs_no_token(rp):
    response = requests.get(rp.url + "/_proxy/healthz", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_readyz_reports_the_table_and_no_secret(rp):
    response = requests.get(rp.url + "/_proxy/readyz", timeout=TIMEOUT)
    assert response.status_code == 200
    body = response.json()
    assert body["table_loaded"] is True
    assert body["tokens"] == 2
    assert isinstance(body["generated_at"], str) and body["generated_at"]
    assert isinstance(body["age_s"], (int, float)) and 0 <= body["age_s"] < 600
    for secret in (*SECRETS, TOKEN, DEAD_TOKEN, DEAD_KEY):
        assert secret not in response.text


def test_without_a_table_everything_is_503_until_a_good_file_appears(proxy_factory, upstream):
    proxy = proxy_factory()
    assert not proxy.token_file.exists()
    ready = requests.get(proxy.url + "/_proxy/readyz", timeout=TIMEOUT)
    assert ready.status_code == 503
    assert ready.json()["table_loaded"] is False
    assert requests.get(proxy.url + "/_proxy/healthz", timeout=TIMEOUT).status_code == 200

    rid = new_id("r")
    response = requests.post(
        proxy.url + "/chat/completions", headers={**AUTH, "X-Request-ID": rid}, json={}, timeout=TIMEOUT
    )
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) > 0
    assert response.headers["X-Request-ID"] == rid
    assert response.json()["error"]["request_id"] == rid
    # Without a table even a request with no token is "not ready", not "unauthorized".
    assert requests.get(proxy.url + "/models", timeout=TIMEOUT).status_code == 503

    write_table(proxy.token_file, {TOKEN: row(upstream.url + "/v1", UPSTREAM_KEY, token_id=23)})
    written = time.monotonic()

    def routed():
        r = requests.post(proxy.url + "/chat/completions", headers=AUTH, json={"model": "m"}, timeout=TIMEOUT)
        return r.status_code == 200

    wait_for(routed, timeout=2.0, interval=0.05, what="requests routed after the table file appeared")
    assert time.monotonic() - written < 2.0
    assert requests.get(proxy.url + "/_proxy/readyz", timeout=TIMEOUT).json()["table_loaded"] is True


# -------------------------------------------------------------------------- unsupported methods


@pytest.mark.parametrize("method", ["TRACE", "FOO", "PROPFIND"])
def test_unsupported_method_is_405_json_with_request_id(rp, upstream, method):
    rid = new_id("r")
    response = requests.request(
        method, rp.url + "/chat/completions", headers={**AUTH, "X-Request-ID": rid}, timeout=TIMEOUT
    )
    assert response.status_code == 405
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["X-Request-ID"] == rid
    assert response.json()["error"]["request_id"] == rid
    assert upstream.records_of(rid) == []


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SYNC_INTERVAL", "abc"),
        ("TARGET_URL", "example.com"),
        ("UPSTREAM_READ_TIMEOUT", "-1"),
        ("UPSTREAM_DNS_CACHE_SECONDS", "soon"),
    ],
)
def test_bad_configuration_exits_non_zero_naming_the_variable(tmp_path, name, value):
    port = free_port()
    env = {
        "LISTEN_ADDR": f"127.0.0.1:{port}",
        "TOKEN_FILE": str(tmp_path / "tokens.json"),
        "HOME": str(tmp_path),
        name: value,
    }
    process = Process(
        [PYTHON, str(REPO / "wsgi.py")], env=env, log_path=tmp_path / f"proxy-config-{name}.log"
    )
    try:
        code = process.wait(timeout=10)
    finally:
        process.stop()
    assert code != 0
    output = process.log_path.read_text(errors="replace")
    assert name in output, output
    assert value in output, output
    assert "Traceback" not in output, output
