"""HTTPS upstreams (issue 10): the proxy verifies the upstream's certificate against
UPSTREAM_CA_BUNDLE (a PEM file or a directory of hashed certificates) or, unset, certifi's bundle.

Everything runs for real on 127.0.0.1: fake upstreams serving TLS with certificates from a private
CA made at test time (tests/support/tls.py), and proxy workers (python wsgi.py). The fake records
every request and every failed handshake, so "nothing reached the upstream" is checked against
proof that the proxy did try (the fake saw the handshake end with the proxy's alert).
"""

from __future__ import annotations

import re
import socket
import ssl
import time

import certifi
import pytest
import requests

from tests.conftest import start_proxy
from tests.support.chat import CHAT, TIMEOUT, leave_and_wait_closed, new_id, post_chat
from tests.support.procs import start_up_failure, wait_for
from tests.support.rawhttp import read_response
from tests.support.sse import read_stream
from tests.support.tables import CLIENT_TOKEN, UPSTREAM_KEY, row, write_table

BAD_TOKENS = {
    "other_host": "sk-tls-other-host-3e1d9c7b5a2f4e60",
    "expired": "sk-tls-expired-8a6c4e2f0b1d3f57",
    "self_signed": "sk-tls-self-signed-5f7a9c1e3b2d4068",
}


# ------------------------------------------------------------------------------------------ helpers


def assert_tls_error(proxy, response: requests.Response, request_id: str) -> dict:
    """502 upstream_tls_error, OpenAI-style, no secret; returns the access line."""
    assert response.status_code == 502, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["X-Request-ID"] == request_id
    error = response.json()["error"]
    assert error["code"] == "upstream_tls_error", error
    assert error["request_id"] == request_id
    assert isinstance(error["type"], str) and error["type"]
    assert "certificate" in error["message"].lower() and "verif" in error["message"].lower(), error
    for secret in (CLIENT_TOKEN, UPSTREAM_KEY, *BAD_TOKENS.values()):
        assert secret not in response.text
    assert "Traceback" not in response.text
    access = proxy.access_line(request_id)
    assert access["status"] == 502
    assert access["end_reason"] == "upstream_error", access
    print(f"access error: {access['error']}")
    assert "certificate" in access["error"].lower(), access
    return access


def assert_refused_by_the_proxy(fake, request_id: str, failures_before: int) -> list[dict]:
    """Nothing reached the fake, yet the proxy did try: a handshake the proxy ended with an alert."""
    assert fake.records_of(request_id) == []
    failures = wait_for(
        lambda: fake.tls_failures()[failures_before:], timeout=5, what="the failed handshake at the fake"
    )
    assert all("alert" in f["error"].lower() for f in failures), failures
    return failures


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def bad_upstreams(https_upstream_factory, tls_ca) -> dict:
    """HTTPS fakes whose certificate must fail verification even with the test CA trusted."""
    return {
        "other_host": https_upstream_factory(tls_ca.other_host_cert(), verify_control=False),
        "expired": https_upstream_factory(tls_ca.expired_cert(), verify_control=False),
        "self_signed": https_upstream_factory(tls_ca.self_signed_cert(), verify_control=False),
    }


@pytest.fixture(scope="module")
def tls_proxy(tmp_path_factory, tls_ca, https_upstream, bad_upstreams):
    """A worker trusting the test CA (UPSTREAM_CA_BUNDLE=ca.pem): CLIENT_TOKEN routes to the good
    HTTPS fake, BAD_TOKENS[name] to the fakes with bad certificates."""
    tmp = tmp_path_factory.mktemp("tls-proxy")
    rows = {CLIENT_TOKEN: row(https_upstream.url + "/v1", UPSTREAM_KEY, token_id=7, ai_model_name="TlsModel")}
    for n, (name, fake) in enumerate(bad_upstreams.items()):
        rows[BAD_TOKENS[name]] = row(fake.url + "/v1", UPSTREAM_KEY, token_id=20 + n, ai_model_name=name)
    write_table(tmp / "tokens.json", rows)
    proxy = start_proxy(tmp, {"UPSTREAM_CA_BUNDLE": str(tls_ca.ca_file)})
    yield proxy
    proxy.stop()


def https_rows(https_upstream) -> dict[str, dict]:
    return {CLIENT_TOKEN: row(https_upstream.url + "/v1", UPSTREAM_KEY, token_id=7, ai_model_name="TlsModel")}


# ------------------------------------------------------------------------------ the fakes themselves


def test_fake_upstream_serves_https_and_records_tls_connections(https_upstream, upstream, tls_ca):
    request_id = new_id()
    session = requests.Session()
    with session:
        for _ in range(3):
            response = session.post(
                https_upstream.url + "/v1" + CHAT,
                json={"model": "m"},
                headers={"X-Request-ID": request_id},
                verify=str(tls_ca.ca_file),
                timeout=TIMEOUT,
            )
            assert response.status_code == 200
            assert response.json()["usage"]["total_tokens"] == 33
    records = https_upstream.records_of(request_id)
    assert len(records) == 3
    assert len({r["conn_id"] for r in records}) == 1  # keep-alive over TLS
    conn = https_upstream.connection(records[0]["conn_id"])
    assert conn["tls"] is True and conn["requests"] == 3
    # The plain fake is unchanged: HTTP, tls false.
    plain_id = new_id()
    assert requests.get(upstream.url + "/v1/models", headers={"X-Request-ID": plain_id}, timeout=5).ok
    plain = upstream.records_of(plain_id)
    assert upstream.connection(plain[0]["conn_id"])["tls"] is False


def test_fake_upstream_over_tls_is_not_trusted_by_certifi(https_upstream):
    before = len(https_upstream.tls_failures())
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.get(https_upstream.url + "/v1/models", verify=certifi.where(), timeout=5)
    failures = wait_for(lambda: https_upstream.tls_failures()[before:], timeout=5)
    assert "unknown ca" in failures[0]["error"].lower(), failures


@pytest.mark.parametrize(
    ("name", "reason"),
    [("other_host", "mismatch"), ("expired", "expired"), ("self_signed", "self-signed")],
)
def test_bad_certificates_fail_verification_for_the_reason_intended(bad_upstreams, tls_ca, name, reason):
    context = ssl.create_default_context(cafile=str(tls_ca.ca_file))
    with (
        socket.create_connection(("127.0.0.1", bad_upstreams[name].port), timeout=5) as sock,
        pytest.raises(ssl.SSLCertVerificationError) as caught,
    ):
        context.wrap_socket(sock, server_hostname="127.0.0.1")
    assert reason in caught.value.verify_message, caught.value.verify_message


def test_fake_upstream_notices_a_tls_client_leaving_mid_stream(https_upstream, tls_ca):
    """The fake's poll-while-waiting works on an SSLSocket (the proxy tests below rely on it)."""
    request_id = new_id()
    context = ssl.create_default_context(cafile=str(tls_ca.ca_file))
    raw = socket.create_connection(("127.0.0.1", https_upstream.port), timeout=TIMEOUT)
    sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
    try:
        sock.sendall(
            (
                f"GET /v1/stream HTTP/1.1\r\nHost: x\r\nX-Fake: sse;events=100;interval=0.1\r\n"
                f"X-Request-ID: {request_id}\r\n\r\n"
            ).encode()
        )
        data = b""
        while data.count(b"data: ") < 2:
            piece = sock.recv(65536)
            assert piece
            data += piece
    finally:
        sock.close()
    left = time.time()
    conn_id = https_upstream.records_of(request_id)[0]["conn_id"]
    conn = wait_for(
        lambda: (c := https_upstream.connection(conn_id))["closed"] is not None and c,
        timeout=5,
        what="the fake to notice the client left",
    )
    assert conn["closed_by"] == "client" and conn["peer_gone_during_response"] is True, conn
    assert conn["tls"] is True
    assert conn["closed"] - left < 1.0


def test_hashed_ca_directory_holds_only_the_ca_under_its_subject_hash(tls_ca, https_upstream):
    directory = tls_ca.hashed_dir()
    names = [p.name for p in directory.iterdir()]
    assert len(names) == 1 and re.fullmatch(r"[0-9a-f]{8}\.0", names[0]), names
    context = ssl.create_default_context(capath=str(directory))
    with (
        socket.create_connection(("127.0.0.1", https_upstream.port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


# ------------------------------------------------------------------------------ through the proxy


def test_json_request_to_an_https_upstream_with_the_private_ca(tls_proxy, https_upstream):
    request_id = new_id()
    response = post_chat(tls_proxy, CLIENT_TOKEN, request_id)
    assert response.status_code == 200, response.text
    assert response.json()["usage"] == {"prompt_tokens": 11, "completion_tokens": 22, "total_tokens": 33}
    [record] = https_upstream.records_of(request_id)
    assert record["target"] == "/v1" + CHAT
    headers = {name.lower(): value for name, value in record["headers"]}
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert https_upstream.connection(record["conn_id"])["tls"] is True
    access = tls_proxy.access_line(request_id)
    assert (access["status"], access["end_reason"]) == (200, "complete")


def test_sse_stream_from_an_https_upstream_is_not_buffered(tls_proxy, https_upstream):
    reader = read_stream(tls_proxy.port, "sse;events=10;interval=0.15", 10)
    delays = reader.delays()
    print(f"SSE over TLS: max delay {max(delays) * 1000:.1f} ms")
    assert len(delays) == 10
    assert max(delays) < 0.5, [round(d, 3) for d in delays]
    assert reader.arrived[9] - reader.arrived[0] > 1.0  # really spread out: not vacuous
    [record] = https_upstream.records_of(reader.request_id)
    assert https_upstream.connection(record["conn_id"])["tls"] is True
    assert tls_proxy.access_line(reader.request_id)["end_reason"] == "complete"


def test_sequential_requests_reuse_one_tls_connection_to_the_upstream(tls_proxy, https_upstream):
    ids = [new_id() for _ in range(20)]
    body = b'{"model": "m-tls"}'
    with socket.create_connection(("127.0.0.1", tls_proxy.port), timeout=TIMEOUT) as sock:
        for request_id in ids:
            sock.sendall(
                (
                    f"POST {CHAT} HTTP/1.1\r\nHost: proxy.test\r\nAuthorization: Bearer {CLIENT_TOKEN}\r\n"
                    f"X-Fake: json;size=200\r\nX-Request-ID: {request_id}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode()
                + body
            )
            response = read_response(sock, timeout=TIMEOUT)
            assert response.status == 200, response
            assert response.header("X-Request-ID") == request_id
    conn_ids = set()
    for request_id in ids:
        [record] = https_upstream.records_of(request_id)
        conn_ids.add(record["conn_id"])
    assert len(conn_ids) == 1, f"20 requests over {len(conn_ids)} upstream connections"
    conn = https_upstream.connection(conn_ids.pop())
    assert conn["tls"] is True
    assert conn["closed"] is None  # still pooled


def test_pooled_tls_connection_closed_by_the_upstream_is_not_a_failure(tls_proxy, https_upstream):
    """The upstream closes an idle kept-alive TLS connection (close_notify + FIN): the next request
    still succeeds, on a new connection."""
    first = new_id()
    assert post_chat(tls_proxy, CLIENT_TOKEN, first, "json;idle_close=0.1").status_code == 200
    [one] = https_upstream.records_of(first)
    wait_for(lambda: https_upstream.connection(one["conn_id"])["closed"] is not None, timeout=5)
    second = new_id()
    response = post_chat(tls_proxy, CLIENT_TOKEN, second)
    assert response.status_code == 200, response.text
    [two] = https_upstream.records_of(second)
    assert two["conn_id"] != one["conn_id"]
    assert tls_proxy.access_line(second)["end_reason"] == "complete"


def test_client_leaving_mid_stream_closes_the_tls_upstream_connection(tls_proxy, https_upstream):
    request_id = new_id()
    conn, left = leave_and_wait_closed(
        tls_proxy.port, https_upstream, request_id, "the TLS upstream connection to close"
    )
    assert conn["tls"] is True
    assert conn["closed_by"] == "client" and conn["peer_gone_during_response"] is True, conn
    assert conn["closed"] - left < 3.0, f"closed {conn['closed'] - left:.2f}s after the client left"
    access = tls_proxy.access_line(request_id)
    assert access["end_reason"] == "client_gone", access


def test_ca_bundle_given_as_a_directory_of_hashed_certificates(proxy_factory, tls_ca, https_upstream):
    env = {"UPSTREAM_CA_BUNDLE": str(tls_ca.hashed_dir())}
    proxy = proxy_factory(env=env, rows=https_rows(https_upstream))
    request_id = new_id()
    response = post_chat(proxy, CLIENT_TOKEN, request_id)
    assert response.status_code == 200, response.text
    assert len(https_upstream.records_of(request_id)) == 1


def test_without_a_ca_bundle_the_private_ca_is_not_trusted(proxy_factory, https_upstream, tls_ca):
    """UPSTREAM_CA_BUNDLE unset: certifi's bundle only, so the test CA is not trusted, even when the
    generic variables of requests and OpenSSL name it (they are not ours to honour)."""
    ca = str(tls_ca.ca_file)
    generic = {"REQUESTS_CA_BUNDLE": ca, "CURL_CA_BUNDLE": ca, "SSL_CERT_FILE": ca, "SSL_CERT_DIR": ""}
    proxy = proxy_factory(env=generic, rows=https_rows(https_upstream))
    before = len(https_upstream.tls_failures())
    request_id = new_id()
    response = post_chat(proxy, CLIENT_TOKEN, request_id)
    access = assert_tls_error(proxy, response, request_id)
    lower = access["error"].lower()
    assert "certificate verify failed" in lower or "certificate_verify_failed" in lower, access
    failures = assert_refused_by_the_proxy(https_upstream, request_id, before)
    assert "unknown ca" in failures[0]["error"].lower(), failures
    # The worker stays healthy and keeps refusing (no connection was pooled by the failure).
    second = new_id()
    assert_tls_error(proxy, post_chat(proxy, CLIENT_TOKEN, second), second)
    assert https_upstream.records_of(second) == []


@pytest.mark.parametrize("name", list(BAD_TOKENS))
def test_bad_upstream_certificate_gives_502_even_with_the_ca_trusted(tls_proxy, bad_upstreams, name):
    fake = bad_upstreams[name]
    before = len(fake.tls_failures())
    request_id = new_id()
    response = post_chat(tls_proxy, BAD_TOKENS[name], request_id)
    access = assert_tls_error(tls_proxy, response, request_id)
    assert access["ai_model_name"] == name
    assert_refused_by_the_proxy(fake, request_id, before)
    # The same worker still serves the good upstream: the failure is about that certificate only.
    ok = new_id()
    assert post_chat(tls_proxy, CLIENT_TOKEN, ok).status_code == 200


@pytest.mark.parametrize("problem", ["missing", "not a certificate"])
def test_unusable_ca_bundle_stops_the_worker_at_start(tmp_path, problem):
    bundle = tmp_path / "ca-bundle.pem"
    if problem == "not a certificate":
        bundle.write_text("this is not a PEM certificate\n")
    code, output = start_up_failure(tmp_path, {"UPSTREAM_CA_BUNDLE": str(bundle)}, "proxy-ca-bundle.log")
    assert code == 2, output
    assert "UPSTREAM_CA_BUNDLE" in output, output
    assert str(bundle) in output, output
    assert "Traceback" not in output, output


def test_ca_bundle_is_read_once_at_start(proxy_factory, tls_ca, https_upstream, tmp_path):
    """The bundle is loaded into one TLS context at start (stack-pitfalls §9: re-reading it per
    connection costs ~20 ms of CPU each); a new upstream connection made after the file is gone
    still verifies."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(tls_ca.ca_file.read_bytes())
    proxy = proxy_factory(env={"UPSTREAM_CA_BUNDLE": str(bundle)}, rows=https_rows(https_upstream))
    first = new_id()
    # Connection: close from the upstream, so the next request needs a new TLS connection.
    assert post_chat(proxy, CLIENT_TOKEN, first, "json;header=Connection:close").status_code == 200
    bundle.unlink()
    second = new_id()
    response = post_chat(proxy, CLIENT_TOKEN, second)
    assert response.status_code == 200, response.text
    [one], [two] = https_upstream.records_of(first), https_upstream.records_of(second)
    assert one["conn_id"] != two["conn_id"]  # a new TLS connection was verified without the file
