"""The proxy process's lifecycle and its client limits: SIGTERM drain, idle keep-alive, slow headers,
stalled bodies, and clients that stop reading. Each test starts its own ``python wsgi.py``."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time

import requests

from tests.support.procs import port_open, wait_for
from tests.support.rawhttp import new_id, parse_one, read_response
from tests.support.sse import StreamReader
from tests.support.tables import CLIENT_TOKEN

CHAT = "/v1/chat/completions"
BODY = json.dumps({"model": "m-life", "messages": [{"role": "user", "content": "hi"}]}).encode()


# ------------------------------------------------------------------------------------------ helpers


def request_bytes(fake: str, request_id: str, method: str = "POST", body: bytes = BODY) -> bytes:
    head = (
        f"{method} {CHAT} HTTP/1.1\r\nHost: proxy.test\r\nAuthorization: Bearer {CLIENT_TOKEN}\r\n"
        f"X-Fake: {fake}\r\nX-Request-ID: {request_id}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def response_or_close(sock: socket.socket, timeout: float) -> tuple[float, bytes]:
    """Wait for the server to answer or close: (seconds waited, bytes received until EOF or timeout)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
            resp, _ = parse_one(data)
            if resp is not None and resp.complete:
                break
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"no answer and no close within {timeout}s; got {data!r}") from None
    return time.monotonic() - started, data


def log_events(proxy, event: str) -> list[dict]:
    return [r for r in proxy.process.json_lines() if r.get("event") == event]


# ------------------------------------------------------------------------------------------ tests


def test_sigterm_drains_streams_in_flight(proxy_factory, default_rows):
    proxy = proxy_factory(env={"GRACEFUL_TIMEOUT": "10"}, rows=default_rows)
    streams = [StreamReader(proxy.port, "sse;events=20;interval=0.1") for _ in range(5)]
    started = time.monotonic()
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.first_event.wait(5) and stream.error is None, stream.error
    time.sleep(max(0.0, 0.5 - (time.monotonic() - started)))

    proxy.process.signal(signal.SIGTERM)
    signalled = time.monotonic()
    wait_for(lambda: not port_open(proxy.port), timeout=1.0, what="the listening port to close")
    refused_after = time.monotonic() - signalled
    try:
        requests.get(proxy.url + "/_proxy/healthz", timeout=2)
    except requests.ConnectionError:
        pass
    else:
        raise AssertionError("a new connection was served after SIGTERM")

    for stream in streams:
        stream.join(10)
        assert not stream.is_alive() and stream.error is None, stream.error
        assert stream.status == 200
        assert stream.indexes() == list(range(20)), stream.indexes()
        assert stream.events[-1] == "[DONE]" and stream.clean_end
    code = proxy.process.wait(timeout=max(0.1, 12 - (time.monotonic() - signalled)))
    exited_after = time.monotonic() - signalled
    print(f"port closed {refused_after:.2f}s after SIGTERM, exit after {exited_after:.2f}s")
    assert code == 0, proxy.process.output()[-2000:]
    assert exited_after < 10 + 2
    assert log_events(proxy, "draining")
    (stopped,) = log_events(proxy, "stopped")
    assert stopped["drained"] is True
    for stream in streams:
        assert proxy.access_line(stream.request_id)["end_reason"] == "complete"


def test_sigterm_cuts_streams_after_graceful_timeout(proxy_factory, default_rows):
    proxy = proxy_factory(env={"GRACEFUL_TIMEOUT": "1"}, rows=default_rows)
    stream = StreamReader(proxy.port, "sse;events=50;interval=0.1")
    stream.start()
    assert stream.first_event.wait(5) and stream.error is None
    time.sleep(0.5)
    proxy.process.signal(signal.SIGTERM)
    signalled = time.monotonic()
    code = proxy.process.wait(timeout=10)
    exited_after = time.monotonic() - signalled
    stream.join(5)
    print(f"exit {exited_after:.2f}s after SIGTERM with GRACEFUL_TIMEOUT=1")
    assert exited_after < 3.5, exited_after
    assert code == 0
    assert not stream.is_alive()
    assert not stream.clean_end and len(stream.indexes()) < 50
    (stopped,) = log_events(proxy, "stopped")
    assert stopped["drained"] is False


def test_idle_keep_alive_connection_is_closed(proxy_factory, default_rows):
    proxy = proxy_factory(env={"CLIENT_IDLE_TIMEOUT": "1"}, rows=default_rows)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(request_bytes("json;size=200", new_id("l")))
        resp = read_response(sock)
        assert resp.status == 200 and json.loads(resp.body)["object"] == "chat.completion"
        assert (resp.header("connection") or "").lower() != "close"
        idle_since = time.monotonic()
        sock.settimeout(3)
        assert sock.recv(1) == b""
        idled = time.monotonic() - idle_since
    assert 0.7 <= idled < 3, idled


def test_slow_headers_are_cut_off_without_blocking_others(proxy_factory, default_rows, auth):
    proxy = proxy_factory(env={"CLIENT_HEADER_TIMEOUT": "1"}, rows=default_rows)
    slow = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    stop = threading.Event()

    def dribble() -> None:
        for byte in b"X-Slow: " + b"a" * 100:
            if stop.wait(0.3):
                return
            try:
                slow.send(bytes([byte]))
            except OSError:
                return

    try:
        slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        dribbler = threading.Thread(target=dribble, daemon=True)
        dribbler.start()

        time.sleep(0.4)
        other_started = time.monotonic()
        response = requests.post(proxy.url + CHAT, data=BODY, headers={**auth, "X-Fake": "json"}, timeout=5)
        other = time.monotonic() - other_started
        assert response.status_code == 200
        assert other < 1.0, f"a normal request took {other:.2f}s while a client sent slow headers"

        _, data = response_or_close(slow, timeout=5)
        elapsed = time.monotonic() - started  # from the request line
    finally:
        stop.set()
        slow.close()
    print(f"slow headers answered after {elapsed:.2f}s: {data[:40]!r}")
    assert 0.8 <= elapsed < 2.5, elapsed
    if data:
        assert data.startswith(b"HTTP/1.1 408"), data
        body = json.loads(data.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "header_timeout"


def test_stalled_request_body_gets_408(proxy_factory, default_rows, upstream):
    proxy = proxy_factory(env={"CLIENT_BODY_TIMEOUT": "1"}, rows=default_rows)
    request_id = new_id("l")
    full = request_bytes("json", request_id, body=b"x" * 100)
    head_len = full.index(b"\r\n\r\n") + 4
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(full[: head_len + 10])
        started = time.monotonic()
        waited, data = response_or_close(sock, timeout=5)
    print(f"stalled body answered after {waited:.2f}s: {data[:40]!r}")
    assert 0.8 <= waited < 3, waited
    if data:
        assert data.startswith(b"HTTP/1.1 408"), data
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"application/json" in head.lower()
        assert json.loads(body)["error"]["code"] == "body_timeout"
    time.sleep(0.3)
    assert upstream.records_of(request_id) == [], "the upstream received a request whose body never came"
    assert time.monotonic() - started < 5


def test_client_that_never_reads_is_dropped(proxy_factory, default_rows, upstream):
    # The fake cannot send sse;events=100000;interval=0 in reasonable time (it builds the whole
    # stream in one growing bytes object first), so the big fast answer is a 50 MB JSON body.
    proxy = proxy_factory(env={"CLIENT_SEND_TIMEOUT": "2"}, rows=default_rows)
    request_id = new_id("l")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill up quickly
    try:
        sock.settimeout(10)
        sock.connect(("127.0.0.1", proxy.port))
        sock.sendall(request_bytes("json;size=50000000", request_id))
        started = time.monotonic()

        access = proxy.access_line(request_id, timeout=15)
        dropped_after = time.monotonic() - started
        print(f"client that never reads dropped after {dropped_after:.2f}s")
        assert access["end_reason"] == "client_send_timeout", access
        assert dropped_after < 10

        # The upstream connection is closed by the proxy (the fake sees its client go mid-response).
        (record,) = upstream.records_of(request_id)
        conn = wait_for(
            lambda: next(
                (c for c in upstream.connections() if c["conn_id"] == record["conn_id"] and c["closed"]), None
            ),
            timeout=3,
            what="upstream connection closed",
        )
        assert conn["closed_by"] == "client" and conn["peer_gone_during_response"] is True, conn

        # The client connection is closed too: what is still buffered arrives, then EOF, with the body
        # cut short.
        received = b""
        sock.settimeout(5)
        try:
            while piece := sock.recv(1 << 20):
                received += piece
        except ConnectionResetError:
            pass
    finally:
        sock.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    declared = int(re.search(rb"(?i)content-length: *([0-9]+)", head).group(1))
    assert declared >= 50_000_000
    assert len(body) < declared
    assert access["response_size_bytes"] < declared


def test_worker_freezes_its_start_up_heap(proxy, auth):
    # What start-up built is frozen before the first request, so no collection walks it again
    # (wsgi.settle_heap); the listening line says how much and with which thresholds.
    listening = proxy.process.wait_for_log(
        lambda r: r.get("event") == "listening", timeout=10, what="listening"
    )
    assert listening["gc_thresholds"] == [10_000, 10, 10]  # wsgi.GC_THRESHOLDS (importing wsgi patches)
    assert listening["gc_frozen_objects"] > 10_000  # modules, the app, the table: tens of thousands
    response = requests.post(proxy.url + CHAT, data=BODY, headers=auth, timeout=10)
    assert response.status_code == 200, response.text
