"""Self-test of the fake upstream (tests/fakes/upstream.py), talking to it directly: no proxy involved."""

from __future__ import annotations

import base64
import gzip
import itertools
import json
import time
import uuid

import pytest
import requests

from tests.support.procs import PYTHON, Process, free_port, port_open, wait_for
from tests.support.rawhttp import CHAT, RawClient

USAGE = {"prompt_tokens": 11, "completion_tokens": 22, "total_tokens": 33}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fake_upstream")
    port = free_port()
    proc = Process(
        [PYTHON, "-m", "tests.fakes.upstream", "--port", str(port)], env={}, log_path=tmp_path / "up.log"
    )
    try:
        wait_for(lambda: port_open(port), timeout=10, what="fake upstream port")
        wait_for(lambda: f"ready {port}" in proc.output(), timeout=5, what="ready line")
        yield port
        output = proc.output()
    finally:
        proc.stop()
    assert "Traceback" not in output, output


def control(port: int, path: str, method: str = "GET"):
    resp = requests.request(method, f"http://127.0.0.1:{port}/_fake/{path}", timeout=5)
    resp.raise_for_status()
    return resp.json()


def connection(port: int, conn_id: int) -> dict | None:
    return next((c for c in control(port, "connections") if c["conn_id"] == conn_id), None)


def record_with(port: int, header: str, value: str) -> dict | None:
    for rec in control(port, "requests"):
        if [header, value] in rec["headers"]:
            return rec
    return None


def fake_request(raw: RawClient, target=CHAT, fake=None, method="GET", headers=(), body=None) -> None:
    """Send a request to the fake, with X-Fake: ``fake`` when given."""
    fields = [*([("X-Fake", fake)] if fake is not None else []), *headers]
    raw.send_request(method, target, fields, body, host="upstream.test")


def read_head(raw: RawClient) -> tuple[int, list[tuple[str, str]]]:
    status, _ = raw.read_head()
    return status, raw.header_list


def test_health_and_control_requests_are_not_recorded(upstream):
    resp = requests.get(f"http://127.0.0.1:{upstream}/_fake/health", timeout=5)
    assert resp.status_code == 200 and resp.text == "ok"
    assert not any(r["target"].startswith("/_fake/") for r in control(upstream, "requests"))


def test_sse_events_arrive_on_time_one_chunk_each(upstream):
    with RawClient(upstream, timeout=5.0) as raw:
        fake_request(raw, fake="sse;events=5;interval=0.1;usage")
        status, headers = read_head(raw)
        assert status == 200
        assert ("Content-Type", "text/event-stream") in headers
        assert ("Cache-Control", "no-cache") in headers
        assert ("Transfer-Encoding", "chunked") in headers
        chunks = []
        while (piece := raw.read_chunk()) is not None:
            chunks.append((time.time(), piece))
    events = [json.loads(piece[len(b"data: ") :]) for _, piece in chunks[:5]]
    assert [e["i"] for e in events] == [0, 1, 2, 3, 4]
    for (arrived, piece), event in zip(chunks, events, strict=False):
        assert piece.startswith(b"data: {") and piece.endswith(b"}\n\n")
        assert event["object"] == "chat.completion.chunk"
        assert -0.05 < arrived - event["t_sent"] < 0.2
    gaps = [b["t_sent"] - a["t_sent"] for a, b in itertools.pairwise(events)]
    assert all(0.08 < gap < 0.2 for gap in gaps), gaps
    assert json.loads(chunks[5][1][len(b"data: ") :])["usage"] == USAGE
    assert chunks[6][1] == b"data: [DONE]\n\n"
    assert len(chunks) == 7


def test_gzip_with_content_length(upstream):
    resp = requests.post(
        f"http://127.0.0.1:{upstream}/v1/chat/completions",
        json={"model": "m-gz", "messages": []},
        headers={"X-Fake": "json;gzip"},
        stream=True,
        timeout=5,
    )
    compressed = resp.raw.read(decode_content=False)
    assert resp.headers["Content-Encoding"] == "gzip"
    assert "Transfer-Encoding" not in resp.headers
    assert int(resp.headers["Content-Length"]) == len(compressed)
    body = json.loads(gzip.decompress(compressed))
    assert body["object"] == "chat.completion" and body["model"] == "m-gz" and body["usage"] == USAGE

    fake = "sse;gzip;framing=chunked;events=2"
    streamed = requests.get(f"http://127.0.0.1:{upstream}/v1/x", headers={"X-Fake": fake}, timeout=5)
    assert streamed.headers["Transfer-Encoding"] == "chunked"
    assert streamed.text.endswith("data: [DONE]\n\n") and streamed.text.count("chat.completion.chunk") == 2


def test_echo_records_headers_in_order_and_chunked_body(upstream):
    marker = uuid.uuid4().hex
    with RawClient(upstream, timeout=5.0) as raw:
        raw.sock.sendall(
            b"POST /v1/echo?a=1&b=%2F HTTP/1.1\r\n"
            b"Host: upstream.test\r\n"
            b"x-lower: 1\r\n"
            b"X-Fake: echo\r\n"
            b"X-MiXeD-Case: two  words\r\n"
            b"X-Marker: " + marker.encode() + b"\r\n"
            b"X-Lower: again\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
        )
        status, _headers, body = raw.read_response()
    assert status == 200
    echo = json.loads(body)
    assert echo["method"] == "POST"
    assert echo["target"] == "/v1/echo?a=1&b=%2F"
    assert echo["headers"] == [
        ["Host", "upstream.test"],
        ["x-lower", "1"],
        ["X-Fake", "echo"],
        ["X-MiXeD-Case", "two  words"],
        ["X-Marker", marker],
        ["X-Lower", "again"],
        ["Transfer-Encoding", "chunked"],
    ]
    assert base64.b64decode(echo["body_b64"]) == b"hello world"
    assert echo["framing"] == "chunked"
    recorded = record_with(upstream, "X-Marker", marker)
    assert recorded == echo


def test_reset_after_gives_client_connection_error(upstream):
    events = 0
    with RawClient(upstream, timeout=5.0) as raw:
        fake_request(raw, fake="sse;events=10;interval=0.05;reset_after=2")
        assert read_head(raw)[0] == 200
        with pytest.raises(EOFError):
            while raw.read_chunk() is not None:
                events += 1
    assert events == 2
    assert raw.reset, "the connection ended with a FIN, not a reset"

    marker = uuid.uuid4().hex
    with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
        requests.get(
            f"http://127.0.0.1:{upstream}/v1/x",
            headers={"X-Fake": "json;reset_after=1", "X-Marker": marker},
            timeout=5,
        ).json()
    rec = record_with(upstream, "X-Marker", marker)
    conn = wait_for(lambda: connection(upstream, rec["conn_id"]), timeout=2)
    assert conn["closed_by"] == "server" and not conn["peer_gone_during_response"]


@pytest.mark.parametrize(
    "fake, read_first_event",
    [("sse;first_delay=5", False), ("sse;events=20;interval=0.5", True)],
    ids=["during-first-delay", "mid-stream"],
)
def test_client_gone_is_detected(upstream, fake, read_first_event):
    marker = uuid.uuid4().hex
    with RawClient(upstream, timeout=5.0) as raw:
        fake_request(raw, fake=fake, headers=[("X-Marker", marker)])
        if read_first_event:
            read_head(raw)
            raw.read_chunk()
        rec = wait_for(lambda: record_with(upstream, "X-Marker", marker), timeout=2)
        time.sleep(0.3)
        assert connection(upstream, rec["conn_id"])["closed"] is None
    t_closed = time.time()
    conn = wait_for(
        lambda: (c := connection(upstream, rec["conn_id"])) and c["peer_gone_during_response"] and c,
        timeout=1,
        what="peer_gone_during_response",
    )
    assert conn["closed_by"] == "client"
    assert conn["closed"] - t_closed < 0.3


def test_keep_alive_shares_conn_id_and_close_is_honoured(upstream):
    with RawClient(upstream, timeout=5.0) as raw:
        fake_request(raw, fake="echo")
        first = json.loads(raw.read_response()[2])
        fake_request(raw, fake="json;size=1000", method="POST", body=b'{"model": "ka"}')
        status, headers, body = raw.read_response()
        assert status == 200 and json.loads(body)["model"] == "ka"
        assert int(dict(headers)["Content-Length"]) == len(body) == 1000
        fake_request(raw, fake="echo", headers=[("Connection", "close")])
        status, headers, body = raw.read_response()
        assert ("Connection", "close") in headers
        third = json.loads(body)
        assert raw.read_to_eof() == b""
    assert first["conn_id"] == third["conn_id"]
    conn = connection(upstream, first["conn_id"])
    assert conn["requests"] == 3 and conn["closed_by"] == "server"


def test_status_204_has_no_body(upstream):
    with RawClient(upstream, timeout=5.0) as raw:
        fake_request(raw, fake="json;status=204")
        status, headers = read_head(raw)
        assert status == 204
        assert not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in headers)
        fake_request(raw, fake="json;status=204;cl")
        status, headers = read_head(raw)
        assert status == 204 and ("Content-Length", "0") in headers
        fake_request(raw, fake="json;status=429")
        status, _headers, body = raw.read_response()
        assert status == 429 and json.loads(body)["error"]["type"] == "fake"
        assert raw.buf == b""


def test_header_options_and_wire_faults(upstream):
    with RawClient(upstream, timeout=5.0) as raw:
        fake_request(
            raw,
            fake="json;cookies;noctype;header=Connection:X-Foo;header=X-Foo:bar;"
            "header=Keep-Alive:timeout=5;header=Transfer-Encoding:chunked",
        )
        status, headers, _body = raw.read_response()
    assert status == 200
    assert [v for n, v in headers if n == "Set-Cookie"] == ["a=1; Path=/", "b=2; Path=/"]
    assert ("Connection", "X-Foo") in headers and ("X-Foo", "bar") in headers
    assert ("Keep-Alive", "timeout=5") in headers
    assert not any(n in ("Content-Type", "Transfer-Encoding") for n, _ in headers)

    with RawClient(upstream, timeout=5.0) as raw:
        fake_request(raw, fake="garbage")
        assert raw.read_to_eof() == b"HTTP/1.1 abc\r\n\r\n"

    with RawClient(upstream, timeout=5.0) as raw:
        fake_request(raw, fake="short")
        status, headers = read_head(raw)
        assert ("Content-Length", "100") in headers
        assert len(raw.read_to_eof()) == 10

    with RawClient(upstream, timeout=5.0) as raw:
        fake_request(raw, fake="sse;framing=close;events=2;interval=0.01")
        status, headers = read_head(raw)
        assert ("Connection", "close") in headers
        assert raw.read_to_eof().endswith(b"data: [DONE]\n\n")
