"""Streaming through the real proxy process: no buffering, bytes unchanged, faults, timeouts, retries.

Every test talks to ``python wsgi.py`` on a real port, forwarding to the fake upstream
(tests/fakes/upstream.py), and looks at exactly what came over the wire with a raw socket.
"""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
import zlib

import pytest
import requests

from tests.support.procs import wait_for

CHAT = "/v1/chat/completions"
BODY = json.dumps({"model": "m-stream", "messages": [{"role": "user", "content": "hi"}]}).encode()
EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


# ------------------------------------------------------------------------------------------ helpers


class RawClient:
    """An HTTP/1.1 client on a plain socket: what arrives, when, and how the body ended."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = bytearray()
        self.eof = False
        self.reset = False

    def close(self) -> None:
        self.sock.close()

    def send_request(
        self,
        method: str = "POST",
        target: str = CHAT,
        headers: dict[str, str] | None = None,
        body: bytes | None = BODY,
    ) -> None:
        lines = [f"{method} {target} HTTP/1.1", "Host: proxy.test"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data, self.reset = b"", True
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _take(self, n: int) -> bytes:
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise EOFError(f"connection closed before the response head: {bytes(self.buf)!r}")
        head = self._take(self.buf.index(b"\r\n\r\n") + 4).decode("latin-1")
        lines = head.split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
        return self.status, self.headers

    def iter_body(self):
        """Yield (arrival time, bytes) as body bytes arrive; afterwards ``clean_end`` says whether the
        body ended as its framing says it should (last chunk / full Content-Length / EOF)."""
        self.clean_end = False
        headers = self.headers
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                while b"\r\n" not in self.buf:
                    if not self._fill():
                        return
                line_end = self.buf.index(b"\r\n")
                size = int(bytes(self.buf[:line_end]).split(b";")[0], 16)
                if size == 0:
                    while not self.buf.startswith(b"0\r\n\r\n"):
                        if not self._fill():
                            return
                    self._take(5)
                    self.clean_end = True
                    return
                del self.buf[: line_end + 2]
                need = size
                while need:
                    if not self.buf and not self._fill():
                        return
                    piece = self._take(min(need, len(self.buf)))
                    need -= len(piece)
                    yield time.time(), piece
                while len(self.buf) < 2:
                    if not self._fill():
                        return
                assert self._take(2) == b"\r\n", "chunk data not followed by CRLF"
        elif "content-length" in headers:
            need = int(headers["content-length"])
            while need:
                if not self.buf and not self._fill():
                    return
                piece = self._take(min(need, len(self.buf)))
                need -= len(piece)
                yield time.time(), piece
            self.clean_end = True
        else:
            while True:
                if not self.buf and not self._fill():
                    self.clean_end = not self.reset
                    return
                yield time.time(), self._take(len(self.buf))

    def read_body(self) -> bytes:
        return b"".join(piece for _, piece in self.iter_body())

    def at_eof(self, timeout: float) -> bool:
        """True when the server closes the connection within ``timeout`` (pending bytes are read)."""
        self.sock.settimeout(timeout)
        try:
            while self._fill():
                pass
        except TimeoutError:
            return False
        return True


def sse_events(pieces):
    """Parse an SSE byte stream incrementally: yield (arrival time of the event's last byte, data)."""
    buf = b""
    for arrived, piece in pieces:
        buf += piece
        while (match := EVENT_END.search(buf)) is not None:
            block, buf = buf[: match.start()], buf[match.end() :]
            data = [
                line[5:].lstrip(b" ") for line in re.split(rb"\r\n|\n|\r", block) if line.startswith(b"data:")
            ]
            if data:
                yield arrived, b"\n".join(data).decode()


def upstream_records(upstream, request_id: str) -> list[dict]:
    return [
        rec
        for rec in upstream.requests()
        if any(name.lower() == "x-request-id" and value == request_id for name, value in rec["headers"])
    ]


def upstream_connection(upstream, conn_id: int) -> dict | None:
    return next((c for c in upstream.connections() if c["conn_id"] == conn_id), None)


def new_id() -> str:
    return "t-" + uuid.uuid4().hex


def request_headers(auth: dict[str, str], fake: str, request_id: str) -> dict[str, str]:
    return {**auth, "X-Fake": fake, "X-Request-ID": request_id}


def normalize(body: bytes) -> bytes:
    """Blank out what differs between two runs of the same X-Fake spec (ids, clocks)."""
    body = re.sub(rb'"t_sent": [0-9.eE+-]+', b'"t_sent": 0', body)
    body = re.sub(rb'"created": [0-9]+', b'"created": 0', body)
    return re.sub(rb"chatcmpl-fake-[0-9]+", b"chatcmpl-fake-N", body)


def fetch_raw(port: int, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes, bool]:
    client = RawClient(port)
    try:
        client.send_request(headers=headers)
        status, head = client.read_head()
        body = client.read_body()
        return status, head, body, client.clean_end
    finally:
        client.close()


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
def test_sse_events_are_forwarded_as_they_arrive(proxy, auth, framing):
    request_id = new_id()
    client = RawClient(proxy.port)
    try:
        client.send_request(
            headers=request_headers(auth, f"sse;events=20;interval=0.1;framing={framing}", request_id)
        )
        status, headers = client.read_head()
        assert status == 200
        assert headers["content-type"] == "text/event-stream"
        events = list(sse_events(client.iter_body()))
        assert client.clean_end
    finally:
        client.close()
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
    status, headers, proxied, clean = fetch_raw(proxy.port, request_headers(auth, fake, new_id()))
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
        proxy.port, {**request_headers(auth, fake, new_id()), "Accept-Encoding": "gzip"}
    )
    assert status == 200 and clean
    assert headers.get("content-encoding") == direct_headers.get("content-encoding") == "gzip"
    text = zlib.decompressobj(31).decompress(proxied)
    assert normalize(text) == normalize(zlib.decompressobj(31).decompress(direct))
    assert text.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("fault", ["reset_after", "close_after"])
def test_upstream_failure_mid_stream_cuts_the_client_response(proxy, auth, fault):
    request_id = new_id()
    client = RawClient(proxy.port)
    try:
        client.send_request(
            headers=request_headers(auth, f"sse;events=10;interval=0.05;{fault}=3", request_id)
        )
        status, headers = client.read_head()
        assert status == 200
        assert headers.get("transfer-encoding", "").lower() == "chunked"
        events = [data for _, data in sse_events(client.iter_body())]
        assert not client.clean_end, "the response ended with a clean last chunk after an upstream failure"
        assert client.eof, "the connection was not closed"
        assert b"0\r\n\r\n" not in client.buf
    finally:
        client.close()
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
    request_id = new_id()
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
    (record,) = upstream_records(upstream, request_id)
    conn = wait_for(
        lambda: (c := upstream_connection(upstream, record["conn_id"])) and c["closed"] and c,
        timeout=3,
        what="upstream connection closed",
    )
    assert conn["closed_by"] == "client"


def test_upstream_silent_mid_stream_longer_than_the_read_timeout_is_cut(
    proxy_factory, default_rows, upstream, auth
):
    # The read timeout applies between body bytes too (a per-exchange watchdog, not a socket
    # timeout): a stream that goes silent for 3 s with UPSTREAM_READ_TIMEOUT=1 is cut after ~1 s.
    proxy = proxy_factory(env={"UPSTREAM_READ_TIMEOUT": "1"}, rows=default_rows)
    request_id = new_id()
    client = RawClient(proxy.port)
    started = time.monotonic()
    try:
        client.send_request(headers=request_headers(auth, "sse;events=5;interval=0.05;stall=3", request_id))
        status, _ = client.read_head()
        assert status == 200
        body = client.read_body()
        ended = time.monotonic() - started
        assert not client.clean_end and client.eof
    finally:
        client.close()
    assert body.count(b"data: ") == 1  # the first event, then silence
    assert 0.9 <= ended < 2.6, ended
    access = proxy.access_line(request_id)
    assert access["end_reason"] == "upstream_timeout", access
    (record,) = upstream_records(upstream, request_id)
    conn = wait_for(
        lambda: (c := upstream_connection(upstream, record["conn_id"])) and c["closed"] and c,
        timeout=3,
        what="upstream connection closed",
    )
    assert conn["closed_by"] == "client"


def test_total_timeout_cuts_a_trickling_answer(proxy_factory, default_rows, auth):
    proxy = proxy_factory(env={"UPSTREAM_TOTAL_TIMEOUT": "1.5"}, rows=default_rows)
    request_id = new_id()
    client = RawClient(proxy.port)
    started = time.monotonic()
    try:
        client.send_request(headers=request_headers(auth, "json;trickle=0.2;size=400", request_id))
        status, headers = client.read_head()
        assert status == 200
        body = client.read_body()
        ended = time.monotonic() - started
        assert not client.clean_end, "the body was complete: the total timeout did not cut it"
        assert client.eof
    finally:
        client.close()
    declared = int(headers["content-length"])
    assert declared >= 400 and 0 < len(body) < declared
    assert 1.2 <= ended < 3.0, ended
    access = proxy.access_line(request_id)
    assert access["end_reason"] == "total_timeout", access


def test_stale_keep_alive_connection_is_replaced(proxy, upstream, auth):
    """The upstream closes its idle keep-alive connection after 0.3 s; requests sent just before, at
    and after that moment all succeed, and each reaches the upstream exactly once."""
    ids = []
    for pause in (0.5, 0.25, 0.28, 0.3, 0.32, 0.35, 0.5):
        request_id = new_id()
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
        assert len(upstream_records(upstream, request_id)) == 1
    # The upstream really did close idle connections under the proxy.
    conns = {r["conn_id"] for request_id in ids for r in upstream_records(upstream, request_id)}
    assert len(conns) >= 2


def test_post_reset_by_upstream_after_answering_is_not_retried(proxy, upstream, auth):
    """Once the upstream started answering, a reset is the client's to see: the POST is not sent again
    (a second generation could be billed twice)."""
    request_id = new_id()
    client = RawClient(proxy.port)
    try:
        client.send_request(
            headers=request_headers(auth, "json;size=2000;reset_after=1;interval=0.1", request_id)
        )
        status, headers = client.read_head()
        assert status == 200
        body = client.read_body()
        assert not client.clean_end and len(body) < int(headers["content-length"])
    finally:
        client.close()
    assert proxy.access_line(request_id)["end_reason"] == "upstream_error"
    assert len(upstream_records(upstream, request_id)) == 1


def test_garbage_status_line_is_not_retried(proxy, upstream, auth):
    request_id = new_id()
    response = requests.post(
        proxy.url + CHAT, data=BODY, headers=request_headers(auth, "json;garbage", request_id), timeout=10
    )
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "upstream_error"
    assert len(upstream_records(upstream, request_id)) == 1
