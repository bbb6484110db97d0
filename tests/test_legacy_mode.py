"""Legacy mode (ENABLE_TOKEN_ROUTING=false): everything goes to TARGET_URL, with an optional
REQUIRED_AUTH_TOKENS whitelist and an optional OVERRIDE_AUTH_TOKEN. No token file is needed.
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid

import pytest
import requests

from tests.conftest import start_proxy

TIMEOUT = 10
HEX32 = re.compile(r"[0-9a-f]{32}")


def legacy(tmp_path_factory, name: str, **env: str):
    tmp = tmp_path_factory.mktemp(name)
    full = {"ENABLE_TOKEN_ROUTING": "false", "TOKEN_FILE": str(tmp / "no-such-dir" / "tokens.json"), **env}
    return start_proxy(tmp, full)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, upstream):
    """No whitelist, no override; TARGET_URL with a path prefix and a trailing slash."""
    proxy = legacy(tmp_path_factory, "legacy-plain", TARGET_URL=upstream.url + "/api/paas/v4/")
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def whitelist(tmp_path_factory, upstream):
    proxy = legacy(tmp_path_factory, "legacy-whitelist", TARGET_URL=upstream.url, REQUIRED_AUTH_TOKENS="a,b")
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def override(tmp_path_factory, upstream):
    proxy = legacy(
        tmp_path_factory, "legacy-override", TARGET_URL=upstream.url + "/v1", OVERRIDE_AUTH_TOKEN="xyz"
    )
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def override_full(tmp_path_factory, upstream):
    proxy = legacy(
        tmp_path_factory,
        "legacy-override-full",
        TARGET_URL=upstream.url + "/v1",
        OVERRIDE_AUTH_TOKEN="Bearer abc",
        REQUIRED_AUTH_TOKENS="only-me",
    )
    yield proxy
    proxy.stop()


def values(record: dict, name: str) -> list[str]:
    return [v for n, v in record["headers"] if n.lower() == name.lower()]


def echo(
    proxy, path="/chat/completions", headers=None, method="POST", **kwargs
) -> tuple[requests.Response, dict]:
    response = requests.request(
        method, proxy.url + path, headers={"X-Fake": "echo", **(headers or {})}, timeout=TIMEOUT, **kwargs
    )
    assert response.status_code == 200, response.text
    return response, response.json()


def test_everything_goes_to_target_url(plain, upstream):
    _, received = echo(plain, "/chat/completions", json={"model": "glm-4"})
    assert received["target"] == "/api/paas/v4/chat/completions"
    assert json.loads(base64.b64decode(received["body_b64"])) == {"model": "glm-4"}
    _, received = echo(plain, "/models?a=1&b=%2F&c=x+y", method="GET")
    assert received["target"] == "/api/paas/v4/models?a=1&b=%2F&c=x+y"
    assert values(received, "Host") == [f"127.0.0.1:{upstream.port}"]


def test_readyz_is_200_without_a_token_file(plain):
    response = requests.get(plain.url + "/_proxy/readyz", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.json()["table_loaded"] is True
    assert requests.get(plain.url + "/_proxy/healthz", timeout=TIMEOUT).status_code == 200


def test_without_override_the_clients_credential_goes_through_unchanged(plain):
    _, received = echo(plain, headers={"Authorization": "Bearer client-own-key-123"})
    assert values(received, "Authorization") == ["Bearer client-own-key-123"]
    _, received = echo(plain, headers={"x-api-key": "client-own-key-456"})
    assert values(received, "x-api-key") == ["client-own-key-456"]
    assert values(received, "Authorization") == []
    _, received = echo(plain, headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert values(received, "Authorization") == ["Basic dXNlcjpwdw=="]


def test_without_whitelist_no_token_is_needed(plain):
    _, received = echo(plain)
    assert values(received, "Authorization") == []


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer c"}, {"Authorization": "Bearer ab"}, {"x-api-key": "A"}],
    ids=["none", "not-listed", "concatenation", "case"],
)
def test_whitelist_rejects_other_tokens(whitelist, upstream, headers):
    rid = "l-" + uuid.uuid4().hex
    response = requests.post(
        whitelist.url + "/chat/completions",
        headers={**headers, "X-Request-ID": rid, "X-Fake": "echo"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 401
    assert response.headers["X-Request-ID"] == rid
    error = response.json()["error"]
    assert error["request_id"] == rid
    assert error["code"] in ("missing_token", "invalid_token")
    assert not upstream.records_of(rid)


@pytest.mark.parametrize(
    ("headers", "upstream_header", "upstream_value"),
    [
        ({"Authorization": "Bearer a"}, "Authorization", "Bearer a"),
        ({"Authorization": "bearer b"}, "Authorization", "bearer b"),
        ({"Authorization": "a"}, "Authorization", "a"),
        ({"x-api-key": "b"}, "x-api-key", "b"),
    ],
    ids=["bearer-a", "bearer-b-lower", "bare-a", "x-api-key-b"],
)
def test_whitelisted_token_passes_unchanged(whitelist, headers, upstream_header, upstream_value):
    _, received = echo(whitelist, "/v1/chat/completions", headers=headers)
    assert received["target"] == "/v1/chat/completions"
    assert values(received, upstream_header) == [upstream_value]


def test_override_replaces_the_clients_credential(override):
    _, received = echo(override, headers={"Authorization": "Bearer client-tok-5566"})
    assert received["target"] == "/v1/chat/completions"
    assert values(received, "Authorization") == ["Bearer xyz"]
    assert "client-tok-5566" not in json.dumps(received)

    _, received = echo(override, headers={"x-api-key": "client-tok-7788"})
    assert values(received, "Authorization") == ["Bearer xyz"]
    assert values(received, "x-api-key") == []
    assert "client-tok-7788" not in json.dumps(received)

    _, received = echo(override)
    assert values(received, "Authorization") == ["Bearer xyz"]


def test_override_with_a_space_is_used_as_is(override_full):
    _, received = echo(override_full, headers={"Authorization": "Bearer only-me"})
    assert values(received, "Authorization") == ["Bearer abc"]
    assert "only-me" not in json.dumps(received)
    response = requests.post(
        override_full.url + "/x", headers={"Authorization": "Bearer other"}, timeout=TIMEOUT
    )
    assert response.status_code == 401


def test_request_ids_work_the_same(plain, upstream):
    response, received = echo(plain, headers={"X-Request-ID": "legacy.id-1"})
    assert response.headers["X-Request-ID"] == "legacy.id-1"
    assert values(received, "X-Request-ID") == ["legacy.id-1"]
    assert plain.access_line("legacy.id-1")["status"] == 200

    response, received = echo(plain, headers={"X-Request-ID": "bad id!"})
    rid = response.headers["X-Request-ID"]
    assert HEX32.fullmatch(rid)
    assert values(received, "X-Request-ID") == [rid]
    assert plain.access_line(rid)["request_id"] == rid


def test_hop_by_hop_and_xff_handled_the_same(plain):
    _, received = echo(
        plain, headers={"Connection": "X-Foo", "X-Foo": "1", "X-Custom": "2", "X-Forwarded-For": "1.2.3.4"}
    )
    assert values(received, "X-Foo") == []
    assert values(received, "X-Custom") == ["2"]
    assert values(received, "X-Forwarded-For") == ["1.2.3.4, 127.0.0.1"]


def test_streaming_works_the_same(override):
    started = time.monotonic()
    response = requests.post(
        override.url + "/chat/completions",
        headers={"X-Fake": "sse;events=4;interval=0.25"},
        json={"model": "m", "stream": True},
        stream=True,
        timeout=TIMEOUT,
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    arrivals = []
    data = b""
    for piece in response.iter_content(None):
        arrivals.append(time.monotonic() - started)
        data += piece
    text = data.decode()
    assert [f"tok{i} " in text for i in range(4)] == [True] * 4
    assert text.endswith("data: [DONE]\n\n")
    # The first event is delivered as it is sent, not held until the stream ends (~0.75 s later).
    assert arrivals[0] < arrivals[-1] - 0.4, arrivals
