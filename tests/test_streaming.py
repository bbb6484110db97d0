"""Streaming through the real proxy process: no buffering, bytes unchanged, faults, timeouts, retries.

Every test talks to ``python wsgi.py`` on a real port, forwarding to the fake upstream
(tests/fakes/upstream.py), and looks at exactly what came over the wire with a raw socket.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import zlib
from collections.abc import Iterator

import pytest
import requests

from tests.support.rawhttp import CHAT, RawClient, new_id
from tests.support.sse import sse_events

BODY = json.dumps({"model": "m-stream", "messages": [{"role": "user", "content": "hi"}]}).encode()


# ------------------------------------------------------------------------------------------ helpers


def request_headers(auth: dict[str, str], fake: str, request_id: str) -> dict[str, str]:
    return {**auth, "X-Fake": fake, "X-Request-ID": request_id}


def normalize(body: bytes) -> bytes:
    """Blank out what differs between two runs of the same X-Fake spec (ids, clocks)."""
    body = re.sub(rb'"t_sent": [0-9.eE+-]+', b'"t_sent": 0', body)
    body = re.sub(rb'"created": [0-9]+', b'"created": 0', body)
    return re.sub(rb"chatcmpl-fake-[0-9]+", b"chatcmpl-fake-N", body)


def send_chat(client: RawClient, headers: dict[str, str]) -> None:
    client.send_request("POST", CHAT, {**headers, "Content-Type": "application/json"}, BODY)


@contextlib.contextmanager
def chat_stream(port: int, headers: dict[str, str]) -> Iterator[RawClient]:
    """The chat request on a new connection; the client, once the response head is read."""
    with RawClient(port) as client:
        send_chat(client, headers)
        client.read_head()
        yield client


def fetch_timed(port: int, headers: dict[str, str]) -> tuple[RawClient, bytes, float]:
    """The chat request on a new connection, its whole response read: (the closed client, with its
    status, headers, clean_end and eof; the body; seconds from the request to the body's end)."""
    started = time.monotonic()
    with chat_stream(port, headers) as client:
        body = client.read_body()
    return client, body, time.monotonic() - started


def fetch_raw(port: int, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes, bool]:
    client, body, _ = fetch_timed(port, headers)
    return client.status, client.headers, body, client.clean_end


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
def test_sse_events_are_forwarded_as_they_arrive(proxy, auth, framing):
    request_id = new_id("t")
    with chat_stream(
        proxy.port, request_headers(auth, f"sse;events=20;interval=0.1;framing={framing}", request_id)
    ) as client:
        assert client.status == 200
        assert client.headers["content-type"] == "text/event-stream"
        events = list(sse_events(client.iter_body()))
        assert client.clean_end
    assert events[-1][1] == "[DONE]"
    chunks = [(arrived, json.loads(data)) for arrived, data in events[:-1]]
    assert [event["i"] for _, event in chunks] == list(range(20))
    delays = [arrived - event["t_sent"] for arrived, event in chunks]
    print(f"framing={framing}: max delay {max(delays) * 1000:.1f} ms")
    assert max(delays) < 0.2, [round(d, 3) for d in delays]
    # The stream really was spread out (the check above is not vacuous).
    assert chunks[-1][0] - chunks[0][0] > 1.5
    access = proxy.access_line(request_id)
    assert access["status"] == 200 and access["end_reason"] == "complete"


@pytest.mark.parametrize(
    "fake", ["sse;events=6;interval=0.01", "sse;events=6;interval=0.01;framing=length;crlf;usage"]
)
def test_sse_bytes_are_forwarded_unchanged(proxy, upstream, auth, fake):
    direct_status, direct_headers, direct, direct_clean = fetch_raw(upstream.port, {"X-Fake": fake})
    status, headers, proxied, clean = fetch_raw(proxy.port, request_headers(auth, fake, new_id("t")))
    assert (status, clean) == (direct_status, direct_clean) == (200, True)
    assert headers["content-type"] == direct_headers["content-type"] == "text/event-stream"
    assert headers.get("cache-control") == "no-cache"
    # Same structure...
    direct_events = [data for _, data in sse_events([(0.0, direct)])]
    proxied_events = [data for _, data in sse_events([(0.0, proxied)])]
    assert len(proxied_events) == len(direct_events)
    indexes = [json.loads(d)["i"] for d in proxied_events if d != "[DONE]" and "t_sent" in d]
    assert indexes == list(range(6))
    assert proxied_events[-1] == "[DONE]"
    assert proxied.endswith(b"data: [DONE]\r\n\r\n" if "crlf" in fake else b"data: [DONE]\n\n")
    # ...and the same bytes, once the per-run values (ids, clocks) are blanked out.
    assert normalize(proxied) == normalize(direct)


def test_gzip_stream_passes_through_compressed(proxy, upstream, auth):
    fake = "sse;events=5;interval=0.01;gzip;framing=chunked"
    _, direct_headers, direct, _ = fetch_raw(upstream.port, {"X-Fake": fake, "Accept-Encoding": "gzip"})
    status, headers, proxied, clean = fetch_raw(
        proxy.port, {**request_headers(auth, fake, new_id("t")), "Accept-Encoding": "gzip"}
    )
    assert status == 200 and clean
    assert headers.get("content-encoding") == direct_headers.get("content-encoding") == "gzip"
    text = zlib.decompressobj(31).decompress(proxied)
    assert normalize(text) == normalize(zlib.decompressobj(31).decompress(direct))
    assert text.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("fault", ["reset_after", "close_after"])
def test_upstream_failure_mid_stream_cuts_the_client_response(proxy, auth, fault):
    request_id = new_id("t")
    with chat_stream(
        proxy.port, request_headers(auth, f"sse;events=10;interval=0.05;{fault}=3", request_id)
    ) as client:
        assert client.status == 200
        assert client.headers.get("transfer-encoding", "").lower() == "chunked"
        events = [data for _, data in sse_events(client.iter_body())]
        assert not client.clean_end, "the response ended with a clean last chunk after an upstream failure"
        assert client.eof, "the connection was not closed"
        assert b"0\r\n\r\n" not in client.buf
    assert [json.loads(data)["i"] for data in events] == [0, 1, 2]
    access = proxy.access_line(request_id)
    assert access["end_reason"] == "upstream_error", access
    assert access["status"] == 200
    # The proxy keeps serving.
    response = requests.post(proxy.url + CHAT, data=BODY, headers={**auth, "X-Fake": "json"}, timeout=10)
    assert response.status_code == 200 and response.json()["object"] == "chat.completion"


def test_long_wait_for_first_byte_is_served(proxy, auth):
    started = time.monotonic()
    response = requests.post(
        proxy.url + CHAT,
        data=BODY,
        headers={**auth, "X-Fake": "sse;events=3;first_delay=2"},
        stream=True,
        timeout=30,
    )
    pieces = [(time.time(), piece) for piece in response.iter_content(None)]
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    events = [data for _, data in sse_events(pieces)]
    assert [json.loads(data)["i"] for data in events[:-1]] == [0, 1, 2]
    assert events[-1] == "[DONE]"
    assert elapsed >= 1.9


def test_upstream_read_timeout_answers_504(proxy_factory, default_rows, upstream, auth):
    proxy = proxy_factory(env={"UPSTREAM_READ_TIMEOUT": "1"}, rows=default_rows)
    request_id = new_id("t")
    started = time.monotonic()
    response = requests.post(
        proxy.url + CHAT,
        data=BODY,
        headers=request_headers(auth, "sse;events=3;first_delay=3", request_id),
        timeout=10,
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert 0.9 <= elapsed < 2.5, elapsed
    access = proxy.access_line(request_id)
    assert access["status"] == 504 and access["end_reason"] == "upstream_timeout", access
    # The upstream connection is given up, not left to generate for nobody.
    assert len(upstream.records_of(request_id)) == 1
    conn = upstream.closed_connection_of(request_id, timeout=3)
    assert conn["closed_by"] == "client"


def test_upstream_silent_mid_stream_longer_than_the_read_timeout_is_cut(
    proxy_factory, default_rows, upstream, auth
):
    # The read timeout applies between body bytes too (a per-exchange watchdog, not a socket
    # timeout): a stream that goes silent for 3 s with UPSTREAM_READ_TIMEOUT=1 is cut after ~1 s.
    proxy = proxy_factory(env={"UPSTREAM_READ_TIMEOUT": "1"}, rows=default_rows)
    request_id = new_id("t")
    client, body, ended = fetch_timed(
        proxy.port, request_headers(auth, "sse;events=5;interval=0.05;stall=3", request_id)
    )
    assert client.status == 200
    assert not client.clean_end and client.eof
    assert body.count(b"data: ") == 1  # the first event, then silence
    assert 0.9 <= ended < 2.6, ended
    access = proxy.access_line(request_id)
    assert access["end_reason"] == "upstream_timeout", access
    assert len(upstream.records_of(request_id)) == 1
    conn = upstream.closed_connection_of(request_id, timeout=3)
    assert conn["closed_by"] == "client"


def test_total_timeout_cuts_a_trickling_answer(proxy_factory, default_rows, auth):
    proxy = proxy_factory(env={"UPSTREAM_TOTAL_TIMEOUT": "1.5"}, rows=default_rows)
    request_id = new_id("t")
    client, body, ended = fetch_timed(
        proxy.port, request_headers(auth, "json;trickle=0.2;size=400", request_id)
    )
    assert client.status == 200
    assert not client.clean_end, "the body was complete: the total timeout did not cut it"
    assert client.eof
    declared = int(client.headers["content-length"])
    assert declared >= 400 and 0 < len(body) < declared
    assert 1.2 <= ended < 3.0, ended
    access = proxy.access_line(request_id)
    assert access["end_reason"] == "total_timeout", access


def test_stale_keep_alive_connection_is_replaced(proxy, upstream, auth):
    """The upstream closes its idle keep-alive connection after 0.3 s; requests sent just before, at
    and after that moment all succeed, and each reaches the upstream exactly once."""
    ids = []
    for pause in (0.5, 0.25, 0.28, 0.3, 0.32, 0.35, 0.5):
        request_id = new_id("t")
        ids.append(request_id)
        response = requests.post(
            proxy.url + CHAT,
            data=BODY,
            headers=request_headers(auth, "json;idle_close=0.3", request_id),
            timeout=10,
        )
        assert response.status_code == 200, response.text
        assert response.json()["object"] == "chat.completion"
        time.sleep(pause)
    for request_id in ids:
        assert len(upstream.records_of(request_id)) == 1
    # The upstream really did close idle connections under the proxy.
    conns = {r["conn_id"] for request_id in ids for r in upstream.records_of(request_id)}
    assert len(conns) >= 2


def test_post_reset_by_upstream_after_answering_is_not_retried(proxy, upstream, auth):
    """Once the upstream started answering, a reset is the client's to see: the POST is not sent again
    (a second generation could be billed twice)."""
    request_id = new_id("t")
    with chat_stream(
        proxy.port, request_headers(auth, "json;size=2000;reset_after=1;interval=0.1", request_id)
    ) as client:
        assert client.status == 200
        body = client.read_body()
        assert not client.clean_end and len(body) < int(client.headers["content-length"])
    assert proxy.access_line(request_id)["end_reason"] == "upstream_error"
    assert len(upstream.records_of(request_id)) == 1


def test_garbage_status_line_is_not_retried(proxy, upstream, auth):
    request_id = new_id("t")
    response = requests.post(
        proxy.url + CHAT, data=BODY, headers=request_headers(auth, "json;garbage", request_id), timeout=10
    )
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "upstream_error"
    assert len(upstream.records_of(request_id)) == 1
