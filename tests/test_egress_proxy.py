"""Egress proxy (issue 10): UPSTREAM_PROXY=http://user:password@host:port takes every upstream
connection (CONNECT tunnels for https upstreams, absolute-form requests for http ones) except
the hosts of UPSTREAM_NO_PROXY. A proxy that cannot be reached or refuses (407) gives 502
upstream_proxy_error naming the proxy, never its password.

The proxy is a real forward proxy on 127.0.0.1 (tests/fakes/connect_proxy.py) with Basic auth; it
logs every CONNECT / absolute-form request it got (method, target, authorized), never a credential.
"""

from __future__ import annotations

import base64
import json
import socket
from urllib.parse import quote

import pytest
import requests

from tests.conftest import start_connect_proxy, start_proxy
from tests.support.chat import CHAT, TIMEOUT, leave_and_wait_closed, new_id, post_chat
from tests.support.procs import free_port, start_up_failure, wait_for
from tests.support.rawhttp import read_response
from tests.support.sse import read_stream
from tests.support.tables import (
    CLIENT_TOKEN,
    OTHER_CLIENT_TOKEN,
    OTHER_UPSTREAM_KEY,
    PROXY_PASSWORD,
    PROXY_USER,
    UPSTREAM_KEY,
    register_secret,
    row,
    write_table,
)

WRONG_PASSWORD = register_secret("egress-wrong-pw-canary.51d7b3f9")
EXPIRED_TOKEN = "sk-egress-expired-upstream-7d3b9f1e5c2a"


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def egress(tmp_path_factory):
    """The fake egress proxy, requiring PROXY_USER / PROXY_PASSWORD."""
    proxy = start_connect_proxy(tmp_path_factory.mktemp("egress"), PROXY_USER, PROXY_PASSWORD)
    yield proxy
    proxy.process.stop()


def routes(https_upstream, upstream, http_host: str = "127.0.0.1") -> dict[str, dict]:
    """CLIENT_TOKEN → the https fake, OTHER_CLIENT_TOKEN → the plain fake (at ``http_host``)."""
    return {
        CLIENT_TOKEN: row(https_upstream.url + "/v1", UPSTREAM_KEY, token_id=1, ai_model_name="TlsModel"),
        OTHER_CLIENT_TOKEN: row(
            f"http://{http_host}:{upstream.port}/v2", OTHER_UPSTREAM_KEY, token_id=2, ai_model_name="Plain"
        ),
    }


def worker(tmp_path_factory, name: str, rows: dict, env: dict):
    tmp = tmp_path_factory.mktemp(name)
    write_table(tmp / "tokens.json", rows)
    return start_proxy(tmp, env)


@pytest.fixture(scope="module")
def expired_upstream(https_upstream_factory, tls_ca):
    return https_upstream_factory(tls_ca.expired_cert(), verify_control=False)


@pytest.fixture(scope="module")
def via_egress(tmp_path_factory, egress, tls_ca, https_upstream, upstream, expired_upstream):
    """A worker whose every upstream connection goes through the egress proxy (right password).
    EXPIRED_TOKEN routes to an https fake whose certificate has expired."""
    rows = routes(https_upstream, upstream)
    rows[EXPIRED_TOKEN] = row(expired_upstream.url + "/v1", UPSTREAM_KEY, token_id=3, ai_model_name="Expired")
    proxy = worker(
        tmp_path_factory,
        "via-egress",
        rows,
        {"UPSTREAM_PROXY": egress.url(PROXY_USER, PROXY_PASSWORD), "UPSTREAM_CA_BUNDLE": str(tls_ca.ca_file)},
    )
    yield proxy
    proxy.stop()
    assert PROXY_PASSWORD not in proxy.process.output()


def entries_since(egress, count: int) -> list[dict]:
    return egress.log()[count:]


def assert_proxy_error(proxy, response: requests.Response, request_id: str) -> str:
    """502 upstream_proxy_error, OpenAI-style, without the password; returns the message."""
    assert response.status_code == 502, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == "upstream_proxy_error", error
    assert error["request_id"] == request_id
    assert isinstance(error["type"], str) and error["type"]
    for secret in (PROXY_PASSWORD, WRONG_PASSWORD, CLIENT_TOKEN, OTHER_CLIENT_TOKEN, UPSTREAM_KEY):
        assert secret not in response.text, secret
    access = proxy.access_line(request_id)
    assert access["status"] == 502, access
    output = proxy.process.output()
    assert PROXY_PASSWORD not in output and WRONG_PASSWORD not in output
    return error["message"]


# ------------------------------------------------------------------------------ the fake itself


def test_fake_egress_proxy_tunnels_and_relays_with_basic_auth(egress, tls_ca, https_upstream, upstream):
    session = requests.Session()
    session.trust_env = False  # explicit proxies only (the environment's NO_PROXY would bypass them)
    good = {"https": egress.url(PROXY_USER, PROXY_PASSWORD), "http": egress.url(PROXY_USER, PROXY_PASSWORD)}
    start = len(egress.log())
    with session:
        tunnelled = new_id()
        response = session.get(
            https_upstream.url + "/v1/models",
            headers={"X-Request-ID": tunnelled},
            proxies=good,
            verify=str(tls_ca.ca_file),
            timeout=TIMEOUT,
        )
        assert response.status_code == 200
        relayed = new_id()
        # Three requests on one connection to the proxy, the last to another origin (the same fake
        # named localhost): each relayed and logged.
        for n, host in enumerate(("127.0.0.1", "127.0.0.1", "localhost")):
            response = session.post(
                f"http://{host}:{upstream.port}/v1/echo?n={n}",
                headers={"X-Request-ID": relayed, "X-Fake": "echo"},
                data=b"payload",
                proxies=good,
                timeout=TIMEOUT,
            )
            assert response.status_code == 200
            echoed = response.json()
            assert echoed["target"] == f"/v1/echo?n={n}"  # origin-form at the origin
            names = {name.lower() for name, _ in echoed["headers"]}
            assert "proxy-authorization" not in names and "proxy-connection" not in names
        with pytest.raises(requests.exceptions.ProxyError, match="407"):
            session.get(
                https_upstream.url + "/v1/models",
                proxies={"https": egress.url(PROXY_USER, "wrong")},
                verify=str(tls_ca.ca_file),
                timeout=TIMEOUT,
            )
        denied = session.get(
            f"http://127.0.0.1:{upstream.port}/v1/models", proxies={"http": egress.url()}, timeout=TIMEOUT
        )
        assert denied.status_code == 407
        assert denied.headers["Proxy-Authenticate"] == 'Basic realm="fake"'
    assert len(https_upstream.records_of(tunnelled)) == 1
    relayed_records = upstream.records_of(relayed)
    assert len(relayed_records) == 3
    assert relayed_records[0]["conn_id"] == relayed_records[1]["conn_id"] != relayed_records[2]["conn_id"]
    log = [(e["method"], e["target"], e["authorized"], e["status"]) for e in entries_since(egress, start)]
    assert log == [
        ("CONNECT", f"127.0.0.1:{https_upstream.port}", True, 200),
        ("POST", f"http://127.0.0.1:{upstream.port}/v1/echo?n=0", True, 200),
        ("POST", f"http://127.0.0.1:{upstream.port}/v1/echo?n=1", True, 200),
        ("POST", f"http://localhost:{upstream.port}/v1/echo?n=2", True, 200),
        ("CONNECT", f"127.0.0.1:{https_upstream.port}", False, 407),
        ("GET", f"http://127.0.0.1:{upstream.port}/v1/models", False, 407),
    ]
    assert PROXY_PASSWORD not in json.dumps(egress.log()) + egress.process.output()


def test_fake_egress_proxy_switches_origin_on_one_client_connection(egress, upstream):
    auth = base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()
    request_id = new_id()
    start = len(egress.log())
    with socket.create_connection(("127.0.0.1", egress.port), timeout=TIMEOUT) as sock:
        for host in ("127.0.0.1", "localhost", "localhost"):
            sock.sendall(
                (
                    f"GET http://{host}:{upstream.port}/v1/models HTTP/1.1\r\n"
                    f"Host: {host}:{upstream.port}\r\nProxy-Authorization: Basic {auth}\r\n"
                    f"X-Request-ID: {request_id}\r\n\r\n"
                ).encode()
            )
            assert read_response(sock, timeout=TIMEOUT).status == 200
    records = upstream.records_of(request_id)
    assert len(records) == 3
    assert records[0]["conn_id"] != records[1]["conn_id"] == records[2]["conn_id"]
    assert [e["target"] for e in entries_since(egress, start)] == [
        f"http://{host}:{upstream.port}/v1/models" for host in ("127.0.0.1", "localhost", "localhost")
    ]


# ------------------------------------------------------------------------------ through the proxy


def test_https_upstream_through_a_connect_tunnel_with_basic_auth(via_egress, egress, https_upstream):
    start = len(egress.log())
    request_id = new_id("egress")
    response = post_chat(via_egress, CLIENT_TOKEN, request_id)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["total_tokens"] == 33
    [record] = https_upstream.records_of(request_id)
    conn = https_upstream.connection(record["conn_id"])
    assert conn["tls"] is True  # TLS end to end with the upstream, inside the tunnel
    headers = {name.lower(): value for name, value in record["headers"]}
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    # The proxy credentials are for the proxy only: never inside the tunnel.
    assert "proxy-authorization" not in headers
    assert PROXY_PASSWORD not in json.dumps(record)
    tunnels = [e for e in entries_since(egress, start) if e["method"] == "CONNECT"]
    assert tunnels, egress.log()
    assert all(e["target"] == f"127.0.0.1:{https_upstream.port}" and e["authorized"] for e in tunnels)
    assert via_egress.access_line(request_id)["end_reason"] == "complete"


def test_sse_through_the_tunnel_is_not_buffered(via_egress, https_upstream):
    reader = read_stream(via_egress.port, "sse;events=8;interval=0.15", 8)
    delays = reader.delays()
    print(f"SSE through the egress tunnel: max delay {max(delays) * 1000:.1f} ms")
    assert max(delays) < 0.5, [round(d, 3) for d in delays]
    assert reader.arrived[7] - reader.arrived[0] > 0.8
    assert len(https_upstream.records_of(reader.request_id)) == 1


def test_client_leaving_closes_the_upstream_connection_through_the_tunnel(via_egress, https_upstream):
    request_id = new_id("egress")
    conn, left = leave_and_wait_closed(
        via_egress.port, https_upstream, request_id, "the tunnelled upstream connection to close"
    )
    assert conn["closed_by"] == "client" and conn["peer_gone_during_response"] is True, conn
    assert conn["closed"] - left < 3.0
    assert via_egress.access_line(request_id)["end_reason"] == "client_gone"


def test_bad_certificate_behind_the_tunnel_is_a_tls_error(via_egress, egress, expired_upstream):
    """The tunnel works; verification of the upstream's certificate, end to end, fails."""
    start = len(egress.log())
    failures_before = len(expired_upstream.tls_failures())
    request_id = new_id("egress")
    response = post_chat(via_egress, EXPIRED_TOKEN, request_id)
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "upstream_tls_error", error
    assert "certificate" in error["message"].lower()
    assert PROXY_PASSWORD not in response.text
    access = via_egress.access_line(request_id)
    assert access["end_reason"] == "upstream_error" and "certificate" in access["error"].lower(), access
    log = entries_since(egress, start)
    assert [(e["method"], e["target"], e["authorized"]) for e in log][:1] == [
        ("CONNECT", f"127.0.0.1:{expired_upstream.port}", True)
    ], log
    assert expired_upstream.records_of(request_id) == []
    failures = wait_for(lambda: expired_upstream.tls_failures()[failures_before:], timeout=5)
    assert "alert" in failures[0]["error"].lower(), failures


def test_http_upstream_through_the_proxy_in_absolute_form(via_egress, egress, upstream):
    start = len(egress.log())
    request_id = new_id("egress")
    response = post_chat(via_egress, OTHER_CLIENT_TOKEN, request_id)
    assert response.status_code == 200, response.text
    [record] = upstream.records_of(request_id)
    assert record["target"] == "/v2" + CHAT
    headers = {name.lower(): value for name, value in record["headers"]}
    assert headers["authorization"] == f"Bearer {OTHER_UPSTREAM_KEY}"
    relayed = [e for e in entries_since(egress, start) if e["method"] == "POST"]
    assert [(e["target"], e["authorized"]) for e in relayed] == [
        (f"http://127.0.0.1:{upstream.port}/v2{CHAT}", True)
    ], egress.log()


@pytest.mark.parametrize(
    ("no_proxy", "https_proxied", "http_proxied"),
    [
        ("127.0.0.1", False, True),  # the https fake at 127.0.0.1 direct, the one named localhost not
        (".localhost", True, False),  # a .domain suffix covers the domain itself
        ("host, .calhost ,127.0.0", True, True),  # exact names and whole labels: none of these match
    ],
)
def test_no_proxy_hosts_bypass_the_proxy(
    tmp_path_factory, egress, tls_ca, https_upstream, upstream, no_proxy, https_proxied, http_proxied
):
    """CLIENT_TOKEN → https://127.0.0.1:P, OTHER_CLIENT_TOKEN → http://localhost:Q; both answer
    whether or not they go through the proxy, and the proxy's log tells which did."""
    proxy = worker(
        tmp_path_factory,
        "no-proxy",
        routes(https_upstream, upstream, http_host="localhost"),
        {
            "UPSTREAM_PROXY": egress.url(PROXY_USER, PROXY_PASSWORD),
            "UPSTREAM_NO_PROXY": no_proxy,
            "UPSTREAM_CA_BUNDLE": str(tls_ca.ca_file),
        },
    )
    try:
        for token, fake, proxied, entry in [
            (CLIENT_TOKEN, https_upstream, https_proxied, ("CONNECT", f"127.0.0.1:{https_upstream.port}")),
            (
                OTHER_CLIENT_TOKEN,
                upstream,
                http_proxied,
                ("POST", f"http://localhost:{upstream.port}/v2{CHAT}"),
            ),
        ]:
            start = len(egress.log())
            request_id = new_id("egress")
            assert post_chat(proxy, token, request_id).status_code == 200
            assert len(fake.records_of(request_id)) == 1
            log = entries_since(egress, start)
            expected = [entry] if proxied else []
            assert [(e["method"], e["target"]) for e in log] == expected, log
    finally:
        proxy.stop()
    assert PROXY_PASSWORD not in proxy.process.output()


SPECIAL_USER = "egress user"
SPECIAL_PASSWORD = register_secret("p@ss:w/rd%#?canary-4b8e")
SPECIAL_ENCODED = register_secret(quote(SPECIAL_PASSWORD, safe=""))


@pytest.mark.parametrize("reachable", [True, False], ids=["proxy-up", "proxy-down"])
def test_percent_encoded_credentials(tmp_path_factory, tls_ca, https_upstream, upstream, reachable):
    """A password with URL delimiters goes percent-encoded in UPSTREAM_PROXY; the proxy gets it
    decoded, and neither form reaches a log or a response."""
    tmp = tmp_path_factory.mktemp("special-egress")
    special = start_connect_proxy(tmp, SPECIAL_USER, SPECIAL_PASSWORD)
    address = special.address if reachable else f"127.0.0.1:{free_port()}"
    url = f"http://{quote(SPECIAL_USER, safe='')}:{SPECIAL_ENCODED}@{address}"
    env = {"UPSTREAM_PROXY": url, "UPSTREAM_CA_BUNDLE": str(tls_ca.ca_file), "LOG_LEVEL": "debug"}
    proxy = worker(tmp_path_factory, "special-creds", routes(https_upstream, upstream), env)
    try:
        for token, fake in ((CLIENT_TOKEN, https_upstream), (OTHER_CLIENT_TOKEN, upstream)):
            request_id = new_id("egress")
            response = post_chat(proxy, token, request_id)
            assert SPECIAL_PASSWORD not in response.text and SPECIAL_ENCODED not in response.text
            if reachable:
                assert response.status_code == 200, response.text
                assert len(fake.records_of(request_id)) == 1
            else:
                assert response.status_code == 502, response.text
                assert response.json()["error"]["code"] == "upstream_proxy_error"
        if reachable:
            log = [(e["method"], e["authorized"]) for e in special.log()]
            assert log == [("CONNECT", True), ("POST", True)], log
    finally:
        proxy.stop()
        special.process.stop()
    output = proxy.process.output()
    assert SPECIAL_PASSWORD not in output and SPECIAL_ENCODED not in output


def test_generic_proxy_variables_are_ignored(tmp_path_factory, egress, tls_ca, https_upstream, upstream):
    """Only UPSTREAM_PROXY names an egress proxy: HTTPS_PROXY / HTTP_PROXY / ALL_PROXY are not ours."""
    url = egress.url(PROXY_USER, PROXY_PASSWORD)
    generic = {"HTTPS_PROXY": url, "HTTP_PROXY": url, "ALL_PROXY": url, "https_proxy": url, "http_proxy": url}
    env = {**generic, "NO_PROXY": "", "no_proxy": "", "UPSTREAM_CA_BUNDLE": str(tls_ca.ca_file)}
    proxy = worker(tmp_path_factory, "generic-proxy-vars", routes(https_upstream, upstream), env)
    try:
        start = len(egress.log())
        for token, fake in ((CLIENT_TOKEN, https_upstream), (OTHER_CLIENT_TOKEN, upstream)):
            request_id = new_id("egress")
            assert post_chat(proxy, token, request_id).status_code == 200
            assert len(fake.records_of(request_id)) == 1
        assert entries_since(egress, start) == []
    finally:
        proxy.stop()


def test_unreachable_proxy_gives_502_naming_the_proxy(tmp_path_factory, https_upstream, upstream, tls_ca):
    closed_port = free_port()
    proxy = worker(
        tmp_path_factory,
        "proxy-refused",
        routes(https_upstream, upstream),
        {
            "UPSTREAM_PROXY": f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{closed_port}",
            "UPSTREAM_CA_BUNDLE": str(tls_ca.ca_file),
        },
    )
    try:
        for token, fake in ((CLIENT_TOKEN, https_upstream), (OTHER_CLIENT_TOKEN, upstream)):
            request_id = new_id("egress")
            response = post_chat(proxy, token, request_id)
            message = assert_proxy_error(proxy, response, request_id)
            print(f"proxy refused: {message}")
            assert f"http://127.0.0.1:{closed_port}" in message, message
            assert str(fake.port) not in message, message  # names the proxy, not the upstream
            assert fake.records_of(request_id) == []
    finally:
        proxy.stop()


def test_proxy_answering_407_gives_502(tmp_path_factory, egress, https_upstream, upstream, tls_ca):
    proxy = worker(
        tmp_path_factory,
        "proxy-407",
        routes(https_upstream, upstream),
        {"UPSTREAM_PROXY": egress.url(PROXY_USER, WRONG_PASSWORD), "UPSTREAM_CA_BUNDLE": str(tls_ca.ca_file)},
    )
    try:
        cases = ((CLIENT_TOKEN, https_upstream, "CONNECT"), (OTHER_CLIENT_TOKEN, upstream, "POST"))
        for token, fake, method in cases:
            start = len(egress.log())
            request_id = new_id("egress")
            response = post_chat(proxy, token, request_id)
            message = assert_proxy_error(proxy, response, request_id)
            print(f"407 via {method}: {message}")
            assert "Proxy-Authenticate" not in response.headers
            assert fake.records_of(request_id) == []
            log = entries_since(egress, start)
            assert log and all(e["method"] == method and e["authorized"] is False for e in log), log
    finally:
        proxy.stop()


@pytest.mark.parametrize(
    "value",
    [
        f"socks5://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:1080",
        f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:port",
    ],
    ids=["socks5-scheme", "bad-port"],  # not the values: they hold the password
)
def test_bad_upstream_proxy_stops_start_up_without_showing_the_password(tmp_path, value):
    code, output = start_up_failure(tmp_path, {"UPSTREAM_PROXY": value}, "proxy-bad-egress.log")
    assert code == 2, output
    assert "UPSTREAM_PROXY" in output, output
    assert PROXY_PASSWORD not in output, output
    assert "Traceback" not in output, output
