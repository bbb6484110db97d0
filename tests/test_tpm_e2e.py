"""TOKEN_TPM / token_tpm (issue 20): real worker processes (python wsgi.py), a real redis-server on a
unix socket and the session's fake upstream. A request's tokens reach Redis from the worker's
background greenlet after the request ends, so each test waits for the count in Redis before the
next admission it relies on."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis
import requests

from proxyapp.limits import limit_key_id
from tests.support.metrics import scrape, total
from tests.support.procs import wait_for
from tests.support.tables import CLIENT_TOKEN, UPSTREAM_KEY, row

TOKEN_ID = 31
TPM_KEY = f"llmproxy:{{{limit_key_id(CLIENT_TOKEN, TOKEN_ID)}}}:tpm"
SIXTY = "json;size=200;total=60"
TOKEN_HEADERS = ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens")


@pytest.fixture
def counted(redis_server):
    client = redis.Redis(unix_socket_path=str(redis_server.socket), socket_timeout=5)

    def tokens() -> int:
        return sum(int(v) for v in client.hgetall(TPM_KEY).values())

    tokens.client = client
    yield tokens
    client.close()


def rows_for(upstream, **fields) -> dict[str, dict]:
    return {
        CLIENT_TOKEN: row(
            upstream.url + "/v1", UPSTREAM_KEY, token_id=TOKEN_ID, ai_model_name="TpmModel", **fields
        )
    }


def env_for(redis_server, **extra: str) -> dict[str, str]:
    return {"LIMITS_REDIS_URL": redis_server.url, **extra}


def post(proxy, fake: str = SIXTY, body: bytes = b'{"model": "m-tpm"}') -> tuple[str, requests.Response]:
    request_id = uuid.uuid4().hex
    response = requests.post(
        proxy.url + "/chat/completions",
        data=body,
        headers={
            "Authorization": f"Bearer {CLIENT_TOKEN}",
            "X-Fake": fake,
            "X-Request-ID": request_id,
            "Content-Type": "application/json",
        },
        timeout=10,
    )
    return request_id, response


def wait_counted(counted, expected: int) -> None:
    wait_for(lambda: counted() == expected, timeout=10, what=f"{expected} tokens counted in Redis")


def token_headers(response: requests.Response) -> tuple[str | None, str | None]:
    return response.headers.get(TOKEN_HEADERS[0]), response.headers.get(TOKEN_HEADERS[1])


def test_admitted_below_the_limit_refused_over_it(proxy_factory, upstream, redis_server, counted):
    proxy = proxy_factory(env_for(redis_server, TOKEN_TPM="100"), rows_for(upstream))
    # The upstream's own figures describe the shared key: ours replace them.
    first_id, first = post(proxy, SIXTY + ";header=x-ratelimit-limit-tokens:999999")
    assert first.status_code == 200
    assert first.headers[TOKEN_HEADERS[0]] == "100"  # one value: the upstream's is gone
    assert token_headers(first) == ("100", "100")
    assert "x-ratelimit-limit-requests" not in first.headers  # no request limit: not invented
    assert proxy.access_line(first_id)["total_tokens"] == 60
    wait_counted(counted, 60)
    _, second = post(proxy)
    assert second.status_code == 200 and token_headers(second) == ("100", "40")  # 60 < 100
    wait_counted(counted, 120)
    third_id, third = post(proxy)
    assert third.status_code == 429
    error = third.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "token_tpm_limit")
    assert 1 <= int(third.headers["Retry-After"]) <= 60
    assert token_headers(third) == ("100", "0")
    line = proxy.access_line(third_id)
    assert line["limit"] == "tpm" and line["status"] == 429 and line["usage_estimated"] is False
    assert total(scrape(proxy.url), "rate_limited_total", limit="tpm") == 1
    assert counted() == 120  # a refusal counts nothing


def test_retry_after_is_when_the_window_falls_below_the_limit(proxy_factory, upstream, redis_server, counted):
    proxy = proxy_factory(env_for(redis_server, TOKEN_TPM="100"), rows_for(upstream))
    second = counted.client.time()[0]
    # 50 tokens counted 50 s ago and 70 now (as COUNT_LUA writes them): below 100 only when the
    # older second leaves the window, in about 10 s.
    counted.client.hset(TPM_KEY, mapping={str(second - 50): 50, str(second): 70})
    _, refused = post(proxy)
    assert refused.status_code == 429
    assert 9 <= int(refused.headers["Retry-After"]) <= 11
    counted.client.hset(TPM_KEY, mapping={str(second - 61): 500, str(second - 50): 20, str(second): 70})
    _, admitted = post(proxy)  # 90 in the window: what is older than 60 s is gone
    assert admitted.status_code == 200 and token_headers(admitted) == ("100", "10")
    assert str(second - 61).encode() not in counted.client.hkeys(TPM_KEY)


def test_two_workers_share_the_count(proxy_factory, upstream, redis_server, counted):
    env = env_for(redis_server, TOKEN_TPM="100")
    one = proxy_factory(env, rows_for(upstream))
    two = proxy_factory(env)
    assert post(one)[1].status_code == 200
    wait_counted(counted, 60)
    assert post(two)[1].status_code == 200
    wait_counted(counted, 120)
    for proxy in (one, two):
        _, refused = post(proxy)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "token_tpm_limit"


@pytest.mark.parametrize(
    ("row_tpm", "default", "refused_at"), [(1000, "100", None), (0, "100", None), (50, "0", 2)]
)
def test_a_rows_token_tpm_overrides_the_default(
    proxy_factory, upstream, redis_server, counted, row_tpm, default, refused_at
):
    proxy = proxy_factory(env_for(redis_server, TOKEN_TPM=default), rows_for(upstream, token_tpm=row_tpm))
    for n in range(1, 4):
        _, response = post(proxy)
        if n == refused_at:
            assert response.status_code == 429 and token_headers(response) == (str(row_tpm), "0")
            return
        assert response.status_code == 200
        if row_tpm:
            assert token_headers(response)[0] == str(row_tpm)
            wait_counted(counted, 60 * n)
        else:  # 0 in the row: unlimited for this token, nothing counted, no headers
            assert token_headers(response) == (None, None)
    assert refused_at is None
    if not row_tpm:
        assert counted() == 0


def test_an_upstream_without_usage_is_counted_by_the_estimate_and_marked(
    proxy_factory, upstream, redis_server, counted
):
    proxy = proxy_factory(env_for(redis_server, TOKEN_TPM="100000"), rows_for(upstream))
    before = scrape(proxy.url)
    body = b'{"model": "m-tpm", "stream": true, "messages": [{"role": "user", "content": "hello"}]}'
    request_id, response = post(proxy, "sse;events=3;interval=0.01", body)
    assert response.status_code == 200 and b'"usage"' not in response.content
    line = proxy.access_line(request_id)
    estimate = (len(body) + len(response.content)) // 4
    assert line["usage_estimated"] is True and line["total_tokens"] == estimate
    assert line["prompt_tokens"] is None and line["completion_tokens"] is None
    wait_counted(counted, estimate)
    after = scrape(proxy.url)
    moved = total(after, "usage_estimated_total", model="TpmModel") - total(
        before, "usage_estimated_total", model="TpmModel"
    )
    assert moved == 1
    assert total(after, "usage_tokens_total", model="TpmModel") == total(
        before, "usage_tokens_total", model="TpmModel"
    )


def test_with_stream_usage_request_a_stream_is_counted_by_its_real_usage(
    proxy_factory, upstream, redis_server, counted
):
    env = env_for(redis_server, TOKEN_TPM="100000", STREAM_USAGE="request")
    proxy = proxy_factory(env, rows_for(upstream))
    body = b'{"model": "m-tpm", "stream": true}'
    request_id, response = post(proxy, "sse;events=3;interval=0.01;total=77", body)
    assert response.status_code == 200 and b'"choices": []' not in response.content
    line = proxy.access_line(request_id)
    assert line["usage_estimated"] is False and line["total_tokens"] == 77
    wait_counted(counted, 77)


def test_upstream_errors_are_not_counted(proxy_factory, upstream, redis_server, counted):
    proxy = proxy_factory(env_for(redis_server, TOKEN_TPM="100"), rows_for(upstream))
    request_id, response = post(proxy, "json;status=500")
    assert response.status_code == 500 and token_headers(response) == ("100", "100")
    assert proxy.access_line(request_id)["usage_estimated"] is False
    _, ok = post(proxy)  # a later count proves the background flush ran: still 60 only
    assert ok.status_code == 200
    wait_counted(counted, 60)


def test_redis_stopped_requests_are_served_unlimited(proxy_factory, upstream, redis_server, counted):
    proxy = proxy_factory(env_for(redis_server, TOKEN_TPM="100"), rows_for(upstream))
    assert post(proxy)[1].status_code == 200
    wait_counted(counted, 60)
    redis_server.stop()
    for _ in range(3):
        _, response = post(proxy)
        assert response.status_code == 200 and token_headers(response) == (None, None)


def test_a_websocket_session_counts_the_usage_of_its_response_done_events(
    tmp_path_factory, proxy_factory, redis_server, counted
):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    from tests.support.wsfake import start_ws_upstream

    fake = start_ws_upstream(tmp_path_factory.mktemp("ws-tpm"), UPSTREAM_KEY)
    try:
        rows = {CLIENT_TOKEN: row(fake.url + "/v1", UPSTREAM_KEY, token_id=TOKEN_ID, ai_model_name="WsTpm")}
        proxy = proxy_factory(env_for(redis_server, TOKEN_TPM="30"), rows)
        url = f"ws://127.0.0.1:{proxy.port}/realtime?model=gpt-realtime"
        headers = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
        with connect(url, additional_headers=headers, open_timeout=5, close_timeout=2) as ws:
            assert ws.response.headers["x-ratelimit-limit-tokens"] == "30"
            ws.recv(timeout=5)  # session.created
            for _ in range(2):  # 18 tokens per response.done: 36 in all, counted when it ends
                ws.send('{"type": "response.create"}')
                kinds = []
                while "response.done" not in kinds:
                    kinds.append(json.loads(ws.recv(timeout=5))["type"])
        wait_counted(counted, 36)
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers=headers, open_timeout=5, close_timeout=2)
        assert refused.value.response.status_code == 429
        assert json.loads(refused.value.response.body)["error"]["code"] == "token_tpm_limit"
    finally:
        fake.process.stop()


def test_a_token_without_a_tpm_limit_counts_no_tokens(proxy_factory, upstream, redis_server, counted):
    proxy = proxy_factory(env_for(redis_server, TOKEN_RPM="1000"), rows_for(upstream))
    body = b'{"model": "m-tpm", "stream": true}'
    request_id, response = post(proxy, "sse;events=2;interval=0.01", body)
    assert response.status_code == 200 and token_headers(response) == (None, None)
    line = proxy.access_line(request_id)
    assert line["usage_estimated"] is False and line["total_tokens"] is None  # nothing invented
    time.sleep(0.5)  # the background flush would have sent a count by now
    stats = counted.client.info("commandstats")
    assert stats.get("cmdstat_evalsha", {}).get("calls") == 1  # the admission only
    assert counted.client.exists(TPM_KEY) == 0
