"""A client that leaves: the proxy closes the upstream connection at once, logs it, and stays healthy.

The fake upstream polls its sockets while it waits, so its connection records say when the proxy
closed the upstream connection (``closed``) and whether that happened mid-response.
"""

from __future__ import annotations

import json
import socket
import struct
import time

import requests

from tests.support.procs import wait_for
from tests.support.rawhttp import CHAT, RawClient, new_id
from tests.support.sse import sse_events

BODY = json.dumps({"model": "m-disconnect", "messages": [{"role": "user", "content": "hi"}]}).encode()


# ------------------------------------------------------------------------------------------ helpers


def open_stream(port: int, headers: dict[str, str]) -> RawClient:
    client = RawClient(port)
    client.send_request("POST", CHAT, {"Content-Type": "application/json", **headers}, BODY)
    return client


def read_events(client: RawClient, count: int) -> list[str]:
    """Read the response head and the body until ``count`` SSE data events have arrived."""
    status, _ = client.read_head()
    assert status == 200, client.header_list
    events: list[str] = []
    for _, data in sse_events(client.iter_body()):
        events.append(data)
        if len(events) >= count:
            return events
    raise AssertionError(f"connection closed mid-stream after {events}")


def abortive_close(sock: socket.socket) -> None:
    """Close with a TCP RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def leave_before_the_first_byte(proxy, upstream, auth, leave, after: float) -> tuple[str, dict, float]:
    """A stream whose first byte comes after 10 s: once the upstream has the request, wait ``after``
    seconds and ``leave(sock)``. (request ID, the upstream connection once closed, when we left.)"""
    request_id = new_id("d")
    client = open_stream(
        proxy.port, {**auth, "X-Fake": "sse;events=3;first_delay=10", "X-Request-ID": request_id}
    )
    wait_for(lambda: upstream.records_of(request_id), timeout=5, what="request at the upstream")
    time.sleep(after)
    leave(client.sock)
    left = time.time()
    return request_id, upstream.closed_connection_of(request_id, timeout=5), left


def full_stream_size(upstream, fake: str) -> int:
    """Bytes of the whole body the fake sends for ``fake`` (direct, no proxy), framing excluded."""
    response = requests.post(upstream.url + CHAT, data=BODY, headers={"X-Fake": fake}, timeout=30)
    assert response.status_code == 200
    return len(response.content)


def in_flight(proxy) -> int:
    return requests.get(proxy.url + "/_proxy/readyz", timeout=5).json()["in_flight"]


# ------------------------------------------------------------------------------------------ tests


def test_client_leaving_mid_stream_closes_the_upstream(proxy, upstream, auth):
    request_id = new_id("d")
    with open_stream(
        proxy.port, {**auth, "X-Fake": "sse;events=100;interval=0.1", "X-Request-ID": request_id}
    ) as client:
        events = read_events(client, 2)
        assert [json.loads(e)["i"] for e in events[:2]] == [0, 1]
    left = time.time()

    conn = upstream.closed_connection_of(request_id, timeout=5)
    assert conn["peer_gone_during_response"] is True, conn
    assert conn["closed_by"] == "client", conn
    assert conn["closed"] - left < 1.0, f"upstream closed {conn['closed'] - left:.2f}s after the client left"

    access = proxy.access_line(request_id)
    assert access["end_reason"] == "client_gone", access
    assert access["status"] == 200
    # A full stream is 100 events; the client left after about 2 of them (0.1 s apart).
    full = full_stream_size(upstream, "sse;events=100;interval=0")
    assert 0 < access["response_size_bytes"] < full / 4, (access["response_size_bytes"], full)


def test_client_leaving_before_the_first_byte_closes_the_upstream(proxy, upstream, auth):
    """The hard case: the proxy has nothing to write yet, so only watching the client socket can tell."""
    request_id, conn, left = leave_before_the_first_byte(proxy, upstream, auth, socket.socket.close, 0.5)
    assert conn["closed"] - left < 1.0, f"upstream closed {conn['closed'] - left:.2f}s after the client left"
    assert conn["peer_gone_during_response"] is True, conn
    assert conn["closed_by"] == "client", conn

    access = proxy.access_line(request_id)
    assert access["end_reason"] == "client_gone", access
    assert access["status"] == 499, access
    assert access["response_size_bytes"] == 0


def test_client_reset_before_the_first_byte_closes_the_upstream(proxy, upstream, auth):
    request_id, conn, left = leave_before_the_first_byte(proxy, upstream, auth, abortive_close, 0.3)
    assert conn["closed"] - left < 1.0
    assert conn["peer_gone_during_response"] is True
    access = proxy.access_line(request_id)
    assert (access["status"], access["end_reason"]) == (499, "client_gone"), access


def test_many_disconnects_leave_the_proxy_healthy(proxy, upstream, auth):
    ids = []
    for n in range(50):
        request_id = new_id("d")
        ids.append(request_id)
        client = open_stream(
            proxy.port, {**auth, "X-Fake": "sse;events=100;interval=0.02", "X-Request-ID": request_id}
        )
        try:
            read_events(client, 1)
        finally:
            if n % 2:
                abortive_close(client.sock)
            else:
                client.close()

    # Every exchange is over: nothing in flight, every upstream connection closed, one access line each.
    wait_for(lambda: in_flight(proxy) == 0, timeout=2, what="in_flight back to 0")
    for request_id in ids:
        conn = upstream.closed_connection_of(request_id, timeout=5)
        assert conn["peer_gone_during_response"] is True, conn
    wait_for(
        lambda: len({r["request_id"] for r in proxy.access_lines() if r["request_id"] in ids}) == 50,
        timeout=5,
        what="50 access lines",
    )
    lines = {r["request_id"]: r for r in proxy.access_lines() if r["request_id"] in ids}
    assert {r["end_reason"] for r in lines.values()} == {"client_gone"}, lines

    # And it still serves.
    started = time.monotonic()
    response = requests.post(
        proxy.url + CHAT, data=BODY, headers={**auth, "X-Fake": "sse;events=3"}, timeout=10
    )
    assert response.status_code == 200
    assert response.text.endswith("data: [DONE]\n\n") and response.text.count("chat.completion.chunk") == 3
    assert time.monotonic() - started < 2
    assert in_flight(proxy) == 0
    assert "Traceback" not in proxy.process.output()
