"""Canary secrets must never leak into a response or into any log line.

First, traffic carrying the canaries (tests.support.tables) in headers, bodies, query strings and
paths goes through proxies whose tables use those keys, forced errors included (unreachable
upstream, upstream 401, our own 401/405/400, legacy override), and through an egress proxy
(UPSTREAM_PROXY with the PROXY_PASSWORD canary: tunnels and absolute-form requests that work, a
proxy that cannot be reached, a proxy that answers 407). No response may carry a canary (the fake
upstream never echoes here), nor any log line of these proxies.

Every log file any process of the whole pytest session wrote (tests.support.procs.LOG_FILES) is
grepped the same way when the session ends, by the conftest hook (tests.support.secrets): that
holds whatever runs first or alone, and a leak there fails the run.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid

import pytest
import requests

from tests.conftest import start_connect_proxy, start_proxy
from tests.support.procs import LOG_FILES, REPO, free_port
from tests.support.secrets import log_leaks
from tests.support.tables import (
    CLIENT_TOKEN,
    OTHER_CLIENT_TOKEN,
    OTHER_UPSTREAM_KEY,
    PROXY_PASSWORD,
    PROXY_USER,
    SECRETS,
    UPSTREAM_KEY,
    register_secret,
    row,
    write_table,
)

TIMEOUT = 10

DEAD_CLIENT_TOKEN = register_secret("sk-client-canary-dead-" + uuid.uuid4().hex[:20])
EXPIRED_CLIENT_TOKEN = register_secret("sk-client-canary-expired-" + uuid.uuid4().hex[:20])
UNKNOWN_CLIENT_TOKEN = register_secret("sk-client-canary-unknown-" + uuid.uuid4().hex[:20])
DEAD_UPSTREAM_KEY = register_secret("zp-dead-canary." + uuid.uuid4().hex[:20])
NOT_KEY_SHAPED = "not key-shaped values are masked only because the proxy knows them"


class Recorder:
    """Every response of the traffic, kept to be checked for canaries."""

    def __init__(self) -> None:
        self.responses: list[tuple[str, int, list[tuple[str, str]], bytes]] = []

    def add(self, what: str, status: int, headers, body: bytes) -> None:
        self.responses.append((what, status, list(headers), body))

    def send(self, what: str, method: str, url: str, expect: int, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", TIMEOUT)
        kwargs.setdefault("allow_redirects", False)
        response = requests.request(method, url, stream=True, **kwargs)
        body = b"".join(response.raw.stream(65536, decode_content=False))
        self.add(what, response.status_code, response.raw.headers.items(), body)
        assert response.status_code == expect, (what, response.status_code, body[:500])
        return response

    def raw(self, what: str, port: int, data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            sock.sendall(data)
            received = b""
            while True:
                try:
                    piece = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not piece:
                    break
                received += piece
        self.add(what, int(received.split(b" ", 2)[1]) if received else 0, [], received)
        return received


def token_traffic(rec: Recorder, proxy, name: str) -> None:
    url = proxy.url
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": f"client {CLIENT_TOKEN} upstream {UPSTREAM_KEY} " + NOT_KEY_SHAPED},
        ],
    }
    auth = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    rec.send(
        f"{name}: json with canaries in body, query, custom header",
        "POST",
        f"{url}/chat/completions?api_key={CLIENT_TOKEN}&upstream={UPSTREAM_KEY}&x=1",
        200,
        headers={**auth, "X-Note": f"{CLIENT_TOKEN} {UPSTREAM_KEY}", "X-Fake": "json;size=300"},
        json=body,
    )
    rec.send(
        f"{name}: canary in the path",
        "GET",
        f"{url}/files/{CLIENT_TOKEN}/{UPSTREAM_KEY}/content",
        200,
        headers={**auth, "X-Fake": "json;size=200"},
    )
    rec.send(
        f"{name}: sse stream with canaries",
        "POST",
        f"{url}/chat/completions?key={UPSTREAM_KEY}",
        200,
        headers={**auth, "X-Fake": "sse;events=3;interval=0.01;usage"},
        json={**body, "stream": True},
    )
    other = {"x-api-key": OTHER_CLIENT_TOKEN}
    other_body = {
        "model": "m",
        "input": f"mine {OTHER_CLIENT_TOKEN} and my upstream's {OTHER_UPSTREAM_KEY}",
    }
    rec.send(
        f"{name}: other row (x-api-key) with canaries in body and query",
        "POST",
        f"{url}/embeddings?token={OTHER_CLIENT_TOKEN}&k={OTHER_UPSTREAM_KEY}",
        200,
        headers={**other, "X-Note": OTHER_UPSTREAM_KEY, "X-Fake": "json;size=300"},
        json=other_body,
    )
    rec.send(
        f"{name}: other row, its upstream key in the path",
        "GET",
        f"{url}/files/{OTHER_UPSTREAM_KEY}/{OTHER_CLIENT_TOKEN}",
        200,
        headers={**other, "X-Fake": "json;size=100"},
    )
    rec.send(
        f"{name}: other row, sse",
        "POST",
        f"{url}/chat/completions",
        200,
        headers={"Authorization": f"bearer {OTHER_CLIENT_TOKEN}", "X-Fake": "sse;events=2;interval=0.01"},
        json={**other_body, "stream": True},
    )
    rec.send(
        f"{name}: upstream answers 401",
        "POST",
        f"{url}/chat/completions?api_key={CLIENT_TOKEN}",
        401,
        headers={**auth, "X-Fake": "json;status=401"},
        json=body,
    )
    rec.send(
        f"{name}: upstream answers 401 (other row)",
        "POST",
        f"{url}/chat/completions",
        401,
        headers={**other, "X-Fake": "json;status=401"},
        json=other_body,
    )
    rec.send(
        f"{name}: upstream garbage",
        "POST",
        f"{url}/chat/completions?k={OTHER_UPSTREAM_KEY}",
        502,
        headers={**other, "X-Fake": "garbage"},
        json=other_body,
    )
    rec.send(
        f"{name}: upstream 500",
        "POST",
        f"{url}/chat/completions",
        500,
        headers={**auth, "X-Fake": "json;status=500"},
        json=body,
    )
    rec.send(
        f"{name}: unreachable upstream",
        "POST",
        f"{url}/chat/completions?api_key={DEAD_CLIENT_TOKEN}",
        502,
        headers={"Authorization": f"Bearer {DEAD_CLIENT_TOKEN}"},
        json={"model": "m", "messages": [{"role": "user", "content": DEAD_CLIENT_TOKEN}]},
    )
    rec.send(
        f"{name}: unknown token",
        "POST",
        f"{url}/{UNKNOWN_CLIENT_TOKEN}/chat/completions?api_key={UNKNOWN_CLIENT_TOKEN}",
        401,
        headers={"Authorization": f"Bearer {UNKNOWN_CLIENT_TOKEN}"},
        json={"content": UNKNOWN_CLIENT_TOKEN},
    )
    rec.send(
        f"{name}: unknown token as x-api-key",
        "GET",
        f"{url}/models",
        401,
        headers={"x-api-key": UNKNOWN_CLIENT_TOKEN},
    )
    rec.send(
        f"{name}: bare unknown token",
        "GET",
        f"{url}/models",
        401,
        headers={"Authorization": UNKNOWN_CLIENT_TOKEN},
    )
    rec.send(
        f"{name}: expired token",
        "POST",
        f"{url}/chat/completions?api_key={EXPIRED_CLIENT_TOKEN}",
        401,
        headers={"Authorization": f"Bearer {EXPIRED_CLIENT_TOKEN}"},
        json={"content": EXPIRED_CLIENT_TOKEN},
    )
    rec.send(
        f"{name}: no token, canary in query",
        "GET",
        f"{url}/models?api_key={CLIENT_TOKEN}",
        401,
    )
    rec.send(
        f"{name}: TRACE with canaries",
        "TRACE",
        f"{url}/v1/{CLIENT_TOKEN}?api_key={CLIENT_TOKEN}",
        405,
        headers=auth,
    )
    rec.send(f"{name}: HEAD", "HEAD", f"{url}/models?key={CLIENT_TOKEN}", 200, headers=auth)
    rec.send(
        f"{name}: 204", "DELETE", f"{url}/files/{CLIENT_TOKEN}", 204, headers={**auth, "X-Fake": "status=204"}
    )
    rec.send(
        f"{name}: redirect",
        "GET",
        f"{url}/models?key={CLIENT_TOKEN}",
        302,
        headers={**auth, "X-Fake": "redirect=http://127.0.0.1:1/x"},
    )
    rec.raw(
        f"{name}: malformed header line",
        proxy.port,
        (
            f"GET /v1/{CLIENT_TOKEN}?api_key={CLIENT_TOKEN} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {CLIENT_TOKEN}\r\nthis is not a header\r\n\r\n"
        ).encode(),
    )
    rec.raw(
        f"{name}: dot segments",
        proxy.port,
        (
            f"GET /a/../{OTHER_CLIENT_TOKEN} HTTP/1.1\r\nHost: x\r\n"
            f"x-api-key: {OTHER_CLIENT_TOKEN}\r\nConnection: close\r\n\r\n"
        ).encode(),
    )
    rec.raw(
        f"{name}: both framings",
        proxy.port,
        (
            f"POST /chat/completions?api_key={CLIENT_TOKEN} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {CLIENT_TOKEN}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            "0\r\n\r\n"
        ).encode(),
    )


def legacy_traffic(rec: Recorder, proxy, name: str) -> None:
    url = proxy.url
    own = {"Authorization": f"Bearer {OTHER_CLIENT_TOKEN}"}
    rec.send(
        f"{name}: allowed, canaries in body and query",
        "POST",
        f"{url}/chat/completions?api_key={OTHER_CLIENT_TOKEN}",
        200,
        headers={**own, "X-Fake": "json;size=200"},
        json={"model": "m", "content": OTHER_CLIENT_TOKEN},
    )
    rec.send(
        f"{name}: allowed, sse",
        "POST",
        f"{url}/chat/completions",
        200,
        headers={**own, "X-Fake": "sse;events=2;interval=0.01"},
        json={"model": "m", "stream": True, "content": OTHER_CLIENT_TOKEN},
    )
    rec.send(
        f"{name}: allowed via x-api-key",
        "GET",
        f"{url}/models/{OTHER_CLIENT_TOKEN}",
        200,
        headers={"x-api-key": OTHER_CLIENT_TOKEN, "X-Fake": "json;size=100"},
    )
    rec.send(
        f"{name}: upstream 401",
        "POST",
        f"{url}/chat/completions",
        401,
        headers={**own, "X-Fake": "json;status=401"},
        json={"content": OTHER_CLIENT_TOKEN},
    )
    rec.send(
        f"{name}: not whitelisted",
        "POST",
        f"{url}/chat/completions?api_key={CLIENT_TOKEN}",
        401,
        headers={"Authorization": f"Bearer {CLIENT_TOKEN}"},
        json={"content": CLIENT_TOKEN},
    )
    rec.send(f"{name}: no token", "GET", f"{url}/models", 401)


def dead_legacy_traffic(rec: Recorder, proxy, name: str) -> None:
    rec.send(
        f"{name}: unreachable target with override",
        "POST",
        f"{proxy.url}/chat/completions?api_key={CLIENT_TOKEN}",
        502,
        headers={"Authorization": f"Bearer {CLIENT_TOKEN}"},
        json={"content": CLIENT_TOKEN},
    )


def egress_traffic(rec: Recorder, proxy, name: str, expect: int) -> None:
    """CLIENT_TOKEN routes to an https upstream (CONNECT), OTHER_CLIENT_TOKEN to an http one."""
    url = proxy.url
    body = {"model": "m", "messages": [{"role": "user", "content": f"{CLIENT_TOKEN} {UPSTREAM_KEY}"}]}
    auth = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    rec.send(
        f"{name}: https upstream, json",
        "POST",
        f"{url}/chat/completions?api_key={CLIENT_TOKEN}",
        expect,
        headers={**auth, "X-Fake": "json;size=200"},
        json=body,
    )
    rec.send(
        f"{name}: https upstream, sse",
        "POST",
        f"{url}/chat/completions",
        expect,
        headers={**auth, "X-Fake": "sse;events=3;interval=0.01"},
        json={**body, "stream": True},
    )
    rec.send(
        f"{name}: http upstream (absolute-form), json",
        "POST",
        f"{url}/embeddings?k={OTHER_UPSTREAM_KEY}",
        expect,
        headers={"x-api-key": OTHER_CLIENT_TOKEN, "X-Fake": "json;size=200"},
        json={"model": "m", "input": OTHER_CLIENT_TOKEN},
    )


@pytest.fixture(scope="module")
def traffic(tmp_path_factory, upstream, https_upstream, tls_ca) -> Recorder:
    now = int(time.time())
    rows = {
        CLIENT_TOKEN: row(upstream.url + "/v1", UPSTREAM_KEY, token_id=1),
        OTHER_CLIENT_TOKEN: row(upstream.url + "/v2", OTHER_UPSTREAM_KEY, token_id=2),
        DEAD_CLIENT_TOKEN: row(f"http://127.0.0.1:{free_port()}/v1", DEAD_UPSTREAM_KEY, token_id=3),
        EXPIRED_CLIENT_TOKEN: row(upstream.url + "/v1", UPSTREAM_KEY, token_id=4, token_expire_at=now - 60),
    }
    proxies = []
    fakes = []
    rec = Recorder()
    try:
        for level in ("info", "debug"):
            tmp = tmp_path_factory.mktemp(f"secrets-{level}")
            write_table(tmp / "tokens.json", rows)
            proxy = start_proxy(tmp, {"LOG_LEVEL": level})
            proxies.append(proxy)
            token_traffic(rec, proxy, f"token-routing/{level}")

        tmp = tmp_path_factory.mktemp("secrets-legacy")
        legacy = start_proxy(
            tmp,
            {
                "ENABLE_TOKEN_ROUTING": "false",
                "TARGET_URL": upstream.url + "/v1",
                "OVERRIDE_AUTH_TOKEN": OTHER_UPSTREAM_KEY,
                "REQUIRED_AUTH_TOKENS": f"{OTHER_CLIENT_TOKEN},{DEAD_CLIENT_TOKEN}",
            },
        )
        proxies.append(legacy)
        legacy_traffic(rec, legacy, "legacy")

        tmp = tmp_path_factory.mktemp("secrets-legacy-dead")
        dead = start_proxy(
            tmp,
            {
                "ENABLE_TOKEN_ROUTING": "false",
                "TARGET_URL": f"http://127.0.0.1:{free_port()}/v1",
                "OVERRIDE_AUTH_TOKEN": f"Bearer {UPSTREAM_KEY}",
            },
        )
        proxies.append(dead)
        dead_legacy_traffic(rec, dead, "legacy-dead")

        egress_rows = {
            CLIENT_TOKEN: row(https_upstream.url + "/v1", UPSTREAM_KEY, token_id=1),
            OTHER_CLIENT_TOKEN: row(upstream.url + "/v2", OTHER_UPSTREAM_KEY, token_id=2),
        }
        tmp = tmp_path_factory.mktemp("secrets-egress")
        egress = start_connect_proxy(tmp, PROXY_USER, PROXY_PASSWORD)
        fakes.append(egress)
        # This one wants another password: PROXY_PASSWORD gets 407.
        strict = start_connect_proxy(tmp, PROXY_USER, "another-password-" + uuid.uuid4().hex[:8])
        fakes.append(strict)
        cases = [
            ("egress", egress.url(PROXY_USER, PROXY_PASSWORD), 200),
            ("egress-refused", f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{free_port()}", 502),
            ("egress-407", strict.url(PROXY_USER, PROXY_PASSWORD), 502),
        ]
        for name, proxy_url, expect in cases:
            tmp = tmp_path_factory.mktemp(f"secrets-{name}")
            write_table(tmp / "tokens.json", egress_rows)
            env = {"UPSTREAM_PROXY": proxy_url, "UPSTREAM_CA_BUNDLE": str(tls_ca.ca_file)}
            proxy = start_proxy(tmp, {"LOG_LEVEL": "debug", **env})
            proxies.append(proxy)
            egress_traffic(rec, proxy, name, expect)
        # The traffic really went through the proxies (tunnels and absolute-form), and was refused
        # by the strict one.
        assert {(e["method"], e["authorized"]) for e in egress.log()} == {("CONNECT", True), ("POST", True)}
        assert {(e["method"], e["authorized"]) for e in strict.log()} == {("CONNECT", False), ("POST", False)}
    finally:
        for proxy in proxies:
            proxy.stop()
        for fake in fakes:
            fake.process.stop()
    rec.proxy_logs = [p.process.log_path for p in proxies]
    return rec


def test_no_response_carries_a_canary(traffic):
    leaks = []
    for what, status, headers, body in traffic.responses:
        wire = "\n".join(f"{n}: {v}" for n, v in headers) + "\n" + body.decode("latin-1")
        for secret in SECRETS:
            if secret in wire:
                leaks.append((what, status, secret))
    assert leaks == []
    assert len(traffic.responses) > 40


def test_proxy_logs_of_this_module_recorded_the_traffic(traffic):
    total = 0
    for path in traffic.proxy_logs:
        assert path in LOG_FILES
        records = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
        count = sum(r.get("logger") == "proxy.access" for r in records)
        assert count >= 1, path
        total += count
    assert total >= len(traffic.responses)


def test_no_log_of_this_module_contains_a_secret(traffic):
    leaks = log_leaks(traffic.proxy_logs)
    assert leaks == [], "\n".join(leaks)


LEAKY_TEST = """
from tests.support.procs import LOG_FILES
from tests.support.tables import CLIENT_TOKEN


def test_writes_a_leaky_log(tmp_path):
    path = tmp_path / "proxy-leaky.log"
    path.write_text('{"logger": "proxy.access", "note": "%s"}\\n' % CLIENT_TOKEN)
    LOG_FILES.append(path)
"""


def test_a_leak_in_any_log_of_a_run_fails_that_run(tmp_path):
    """The session-end grep, in a pytest run of its own: its one test passes, the run fails."""
    test_file = tmp_path / "test_leaky.py"
    test_file.write_text(LEAKY_TEST)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest", test_file],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "1 passed" in done.stdout, done.stdout[-2000:]
    assert done.returncode == 1, done.stdout[-2000:]
    assert "SECRETS LEAKED" in done.stdout and "proxy-leaky.log" in done.stdout
