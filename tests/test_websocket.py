"""WebSocket passthrough (issue 19): the Realtime and Responses WebSocket APIs through the proxy.

Real processes on 127.0.0.1 only: the proxy (python wsgi.py), a fake WebSocket upstream built on
the ``websockets`` library (tests/fakes/ws_upstream.py; plain, and TLS with the session's private
CA), the fake egress proxy, a real redis-server for the concurrency limit. Clients: the openai
SDK's realtime client, the ``websockets`` client, and raw sockets for malformed handshakes and
TCP drops. The run-wide secrets grep (conftest) checks every log of these processes too.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time

import pytest
import requests
from openai import OpenAI
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect
from wsproto.frame_protocol import FrameProtocol

from tests.conftest import start_connect_proxy, start_proxy
from tests.support.metrics import scrape, total
from tests.support.procs import start_up_failure, wait_for
from tests.support.rawhttp import new_id
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
from tests.support.wsfake import header, new_key, raw_handshake, start_ws_upstream

PROTOCOL_PREFIX = "openai-insecure-api-key."
UNKNOWN_TOKEN = register_secret("sk-ws-unknown-canary-6b1d9e3f5a7c2e40")
REALTIME = "/realtime?model=gpt-realtime"
MIB = 1024 * 1024


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ws_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ws")


@pytest.fixture(scope="module")
def ws_up(ws_dir):
    fake = start_ws_upstream(ws_dir, UPSTREAM_KEY)
    yield fake
    fake.process.stop()


@pytest.fixture(scope="module")
def ws_tls_up(ws_dir, tls_ca):
    fake = start_ws_upstream(ws_dir, OTHER_UPSTREAM_KEY, tls_ca.server_cert(name="ws-tls"), tls_ca.ca_file)
    yield fake
    fake.process.stop()


def ws_rows(ws_up, ws_tls_up) -> dict[str, dict]:
    return {
        CLIENT_TOKEN: row(ws_up.url + "/v1", UPSTREAM_KEY, token_id=7, ai_model_name="WsModel"),
        OTHER_CLIENT_TOKEN: row(ws_tls_up.url + "/v1", OTHER_UPSTREAM_KEY, token_id=8, ai_model_name="WsTls"),
    }


@pytest.fixture(scope="module")
def wsp(ws_dir, ws_up, ws_tls_up, tls_ca):
    """One proxy for the module: CLIENT_TOKEN -> the plain fake, OTHER_CLIENT_TOKEN -> the TLS one."""
    tmp = ws_dir / "proxy"
    tmp.mkdir()
    write_table(tmp / "tokens.json", ws_rows(ws_up, ws_tls_up))
    proxy = start_proxy(tmp, {"UPSTREAM_CA_BUNDLE": str(tls_ca.ca_file)})
    yield proxy
    proxy.stop()


def ws_url(proxy, path: str = REALTIME) -> str:
    return f"ws://127.0.0.1:{proxy.port}{path}"


def open_ws(proxy, path: str = REALTIME, token: str | None = CLIENT_TOKEN, rid: str | None = None, **kwargs):
    headers = {"X-Request-ID": rid or new_id("ws")}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    kwargs.setdefault("open_timeout", 5)
    kwargs.setdefault("close_timeout", 2)
    kwargs.setdefault("max_size", None)
    return connect(ws_url(proxy, path), additional_headers=headers, **kwargs)


def recv_json(ws, timeout: float = 5.0) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def close_code(ws, timeout: float = 5.0) -> int | None:
    """Wait for the server to close; the close code the client received."""
    try:
        while True:
            ws.recv(timeout=timeout)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None


# ------------------------------------------------------------------------------------------ clients


def test_openai_sdk_realtime_client_key_swapped_and_usage_logged(wsp, ws_up):
    """The official SDK's realtime client, with only base_url pointed at the proxy."""
    rid = new_id("sdk")
    client = OpenAI(api_key=CLIENT_TOKEN, base_url=wsp.url, max_retries=0)
    with client.realtime.connect(model="gpt-realtime", extra_headers={"X-Request-ID": rid}) as conn:
        first = json.loads(conn.recv_bytes())
        assert first["type"] == "session.created"
        conn.send({"type": "response.create"})
        kinds = []
        while "response.done" not in kinds:
            kinds.append(json.loads(conn.recv_bytes())["type"])
        assert kinds == ["response.created", "response.done"]
    upstream = ws_up.record(rid, closed=True)
    assert header(upstream["headers"], "authorization") == f"Bearer {UPSTREAM_KEY}"
    assert CLIENT_TOKEN not in json.dumps(upstream["headers"])
    assert upstream["path"] == "/v1/realtime?model=gpt-realtime"
    line = wsp.access_line(rid)
    assert line["status"] == 101 and line["websocket"] is True and line["end_reason"] == "complete", line
    assert (
        line["prompt_tokens"],
        line["completion_tokens"],
        line["total_tokens"],
        line["cached_tokens"],
    ) == (
        11,
        7,
        18,
        3,
    )
    assert line["upstream_messages"] == 3 and line["client_messages"] == 1, line
    assert line["token_id"] == 7 and line["ai_model_name"] == "WsModel"
    assert line["response_size_bytes"] > 0 and line["request_size_bytes"] > 0


def test_responses_mode_usage_summed_with_deflate_declined_and_metrics(wsp, ws_up):
    """The websockets client's default offers permessage-deflate: declined, and every message metered."""
    before = scrape(wsp.url)
    rid = new_id("resp")
    with open_ws(wsp, "/responses", rid=rid) as ws:  # compression="deflate" by default
        assert ws.protocol.extensions == []
        assert recv_json(ws)["type"] == "session.created"
        during = scrape(wsp.url)
        assert total(during, "in_flight_websockets") == 1
        for _ in range(2):
            ws.send(json.dumps({"type": "response.create", "pad": "x" * 3000}))
            assert recv_json(ws)["type"] == "response.created"
            assert recv_json(ws)["type"] == "response.completed"
    upstream = ws_up.record(rid, closed=True)
    assert header(upstream["headers"], "sec-websocket-extensions") is None, upstream["headers"]
    line = wsp.access_line(rid)
    usage = {k: line[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")}
    assert usage == {"prompt_tokens": 40, "completion_tokens": 18, "total_tokens": 58, "cached_tokens": 8}
    assert line["reasoning_tokens"] == 4
    after = scrape(wsp.url)
    assert total(after, "in_flight_websockets") == 0
    sessions = total(after, "requests_total", model="WsModel", status_class="1xx", end_reason="complete")
    assert (
        sessions - total(before, "requests_total", model="WsModel", status_class="1xx", end_reason="complete")
        >= 1
    )
    for kind, tokens in (("prompt", 40), ("completion", 18)):
        grown = total(after, "usage_tokens_total", model="WsModel", kind=kind) - total(
            before, "usage_tokens_total", model="WsModel", kind=kind
        )
        assert grown >= tokens, (kind, grown)


@pytest.mark.parametrize("token", [CLIENT_TOKEN, OTHER_CLIENT_TOKEN], ids=["plain", "tls"])
def test_messages_both_ways_in_order_text_binary_fragmented_and_large(wsp, ws_up, ws_tls_up, token):
    rid = new_id("order")
    with open_ws(wsp, token=token, rid=rid) as ws:
        assert recv_json(ws)["type"] == "session.created"
        sent = []
        for n in range(40):
            message = f"text {n} é" if n % 2 else bytes([n]) * (n + 1)
            ws.send(message)
            sent.append(message)
        assert [ws.recv(timeout=5) for _ in sent] == sent
        ws.send(["frag", "mented ", "text"])  # one message in three frames
        assert ws.recv(timeout=5) == "fragmented text"
        big = os.urandom(MIB)
        ws.send(big)
        assert ws.recv(timeout=10) == big
        ws.send(json.dumps({"type": "test.binary", "size": MIB}))
        assert len(ws.recv(timeout=10)) == MIB
    fake = ws_up if token == CLIENT_TOKEN else ws_tls_up
    upstream = fake.record(rid, closed=True)
    assert upstream["messages"] == 43 and upstream["close_code"] == 1000
    line = wsp.access_line(rid)
    assert line["client_messages"] == 43 and line["upstream_messages"] == 44, line
    assert line["request_size_bytes"] > MIB and line["response_size_bytes"] > 2 * MIB


# ------------------------------------------------------------------------------------------ credentials


def test_subprotocol_credential_is_replaced_in_place(wsp, ws_up):
    rid = new_id("proto")
    subprotocols = ["realtime", PROTOCOL_PREFIX + CLIENT_TOKEN]
    with open_ws(wsp, token=None, rid=rid, subprotocols=subprotocols) as ws:
        assert ws.subprotocol == "realtime"
        assert recv_json(ws)["type"] == "session.created"
        assert UPSTREAM_KEY not in str(ws.response.headers) and CLIENT_TOKEN not in str(ws.response.headers)
    upstream = ws_up.record(rid)
    assert (
        header(upstream["headers"], "sec-websocket-protocol") == f"realtime, {PROTOCOL_PREFIX}{UPSTREAM_KEY}"
    )
    assert header(upstream["headers"], "authorization") is None
    line = wsp.access_line(rid)
    assert line["status"] == 101
    assert CLIENT_TOKEN not in json.dumps(line) and UPSTREAM_KEY not in json.dumps(line)


@pytest.mark.parametrize(
    "headers, code",
    [
        ({"Authorization": f"Bearer {UNKNOWN_TOKEN}"}, "invalid_token"),
        ({"Sec-WebSocket-Protocol": f"realtime, {PROTOCOL_PREFIX}{UNKNOWN_TOKEN}"}, "invalid_token"),
        ({}, "missing_token"),
    ],
    ids=["bearer", "subprotocol", "none"],
)
def test_unknown_or_missing_token_is_401_json_without_upgrade(wsp, ws_up, headers, code):
    rid = new_id("401")
    sock, answer = raw_handshake(wsp.port, REALTIME, {**headers, "X-Request-ID": rid})
    sock.close()
    assert answer.status == 401, answer.status
    assert "upgrade" not in answer.headers and "sec-websocket-accept" not in answer.headers
    error = json.loads(answer.body)["error"]
    assert error["code"] == code and error["request_id"] == rid
    assert UNKNOWN_TOKEN not in answer.body.decode()
    assert wsp.access_line(rid)["status"] == 401
    assert ws_up.records_of(rid) == []


@pytest.mark.parametrize(
    "key, version, extra, message",
    [
        ("not-base64!", "13", {}, "16 bytes"),
        ("c2hvcnQ=", "13", {}, "16 bytes"),
        ("", "13", {}, "Sec-WebSocket-Key"),
        (None, "8", {}, "Version: 13"),
        (None, "", {}, "Version: 13"),
        (None, "13", {"Content-Length": "5"}, "no body"),
    ],
    ids=["bad-key", "short-key", "no-key", "version-8", "no-version", "body"],
)
def test_malformed_handshakes_get_400_json_and_the_worker_lives_on(wsp, ws_up, key, version, extra, message):
    rid = new_id("bad")
    headers = {"Authorization": f"Bearer {CLIENT_TOKEN}", "X-Request-ID": rid, **extra}
    sock, answer = raw_handshake(wsp.port, REALTIME, headers, key=key, version=version)
    sock.close()
    assert answer.status == 400
    error = json.loads(answer.body)["error"]
    assert error["code"] == "bad_websocket_handshake" and message in error["message"], error
    assert error["request_id"] == rid
    assert ws_up.records_of(rid) == []
    with open_ws(wsp) as ws:  # the same worker still serves
        assert recv_json(ws)["type"] == "session.created"


def test_upstream_403_and_401_pass_through_as_plain_responses(wsp, ws_up):
    rid = new_id("403")
    with pytest.raises(InvalidStatus) as refused:
        open_ws(wsp, "/forbidden", rid=rid)
    response = refused.value.response
    assert response.status_code == 403
    assert json.loads(response.body)["error"]["code"] == "forbidden"
    assert wsp.access_line(rid)["status"] == 403


class SwitchingUpstream:
    """A raw-socket upstream on 127.0.0.1 that answers every request with a 101 (Upgrade: h2c)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    piece = conn.recv(65536)
                    if not piece:
                        break
                    data += piece
                conn.sendall(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
                )
                conn.recv(1)  # held open until the proxy closes it

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("websocket", [False, True], ids=["plain-get", "websocket-answered-h2c"])
def test_a_101_without_a_websocket_upgrade_asked_and_given_is_502(tmp_path, websocket):
    fake = SwitchingUpstream()
    write_table(tmp_path / "t.json", {CLIENT_TOKEN: row(f"http://127.0.0.1:{fake.port}/v1", UPSTREAM_KEY)})
    proxy = start_proxy(tmp_path, {"TOKEN_FILE": str(tmp_path / "t.json")})
    try:
        rid = new_id("switch")
        headers = {"Authorization": f"Bearer {CLIENT_TOKEN}", "X-Request-ID": rid}
        if websocket:
            sock, answer = raw_handshake(proxy.port, REALTIME, headers)
            sock.close()
            status, body = answer.status, json.loads(answer.body)
        else:
            response = requests.get(proxy.url + "/x", headers=headers, timeout=10)
            status, body = response.status_code, response.json()
        assert status == 502 and body["error"]["code"] == "upstream_bad_response", body
        assert proxy.access_line(rid)["status"] == 502
    finally:
        proxy.stop()
        fake.close()


# ------------------------------------------------------------------------------------------ endings


def test_close_from_the_client_completes_and_reaches_the_upstream(wsp, ws_up):
    rid = new_id("cclose")
    ws = open_ws(wsp, rid=rid)
    assert recv_json(ws)["type"] == "session.created"
    ws.close(4000, "client done")
    upstream = ws_up.record(rid, closed=True)
    assert upstream["close_code"] == 4000
    line = wsp.access_line(rid)
    assert line["end_reason"] == "complete" and line["client_close_code"] == 4000


def test_close_from_the_upstream_reaches_the_client(wsp, ws_up):
    rid = new_id("uclose")
    with open_ws(wsp, rid=rid) as ws:
        assert recv_json(ws)["type"] == "session.created"
        ws.send(json.dumps({"type": "test.close", "code": 4001, "reason": "bye"}))
        assert close_code(ws) == 4001
    line = wsp.access_line(rid)
    assert line["end_reason"] == "complete" and line["upstream_close_code"] == 4001, line


def test_client_tcp_drop_closes_the_upstream_within_a_second(wsp, ws_up):
    rid = new_id("drop")
    headers = {"Authorization": f"Bearer {CLIENT_TOKEN}", "X-Request-ID": rid}
    sock, answer = raw_handshake(wsp.port, REALTIME, headers)
    assert answer.status == 101 and answer.headers["upgrade"].lower() == "websocket"
    ws_up.record(rid)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, no close frame
    dropped = time.time()
    sock.close()
    upstream = ws_up.record(rid, closed=True, timeout=5)
    assert upstream["closed"] - dropped < 1.0, upstream["closed"] - dropped
    line = wsp.access_line(rid)
    assert line["end_reason"] == "client_gone" and line["status"] == 101


def test_idle_session_is_closed_1001_and_traffic_keeps_it_open(proxy_factory, ws_up, ws_tls_up):
    proxy = proxy_factory({"WEBSOCKET_IDLE_TIMEOUT": "0.8"}, rows=ws_rows(ws_up, ws_tls_up))
    busy, idle = new_id("busy"), new_id("idle")
    with open_ws(proxy, rid=busy) as ws:
        assert recv_json(ws)["type"] == "session.created"
        for n in range(8):  # 1.6 s of traffic, a message every 0.2 s: never idle
            ws.send(f"message {n}")
            assert ws.recv(timeout=5) == f"message {n}"
            time.sleep(0.2)
    ws = open_ws(proxy, rid=idle)
    assert recv_json(ws)["type"] == "session.created"
    started = time.monotonic()
    assert close_code(ws, timeout=5) == 1001
    assert time.monotonic() - started < 3.0
    assert ws_up.record(idle, closed=True)["close_code"] == 1001
    assert proxy.access_line(idle)["end_reason"] == "idle_timeout"
    assert proxy.access_line(busy)["end_reason"] == "complete"


def test_sigterm_gives_sessions_the_grace_then_closes_both_sides_with_1001(proxy_factory, ws_up, ws_tls_up):
    proxy = proxy_factory({"GRACEFUL_TIMEOUT": "1.5"}, rows=ws_rows(ws_up, ws_tls_up))
    rid = new_id("term")
    ws = open_ws(proxy, rid=rid)
    assert recv_json(ws)["type"] == "session.created"
    proxy.terminate()
    started = time.monotonic()
    time.sleep(0.3)
    ws.send("during the grace")
    assert ws.recv(timeout=2) == "during the grace"
    assert close_code(ws, timeout=6) == 1001
    assert 1.0 < time.monotonic() - started < 4.0
    assert ws_up.record(rid, closed=True)["close_code"] == 1001
    assert proxy.process.wait(timeout=10) == 0
    line = proxy.access_line(rid)
    assert line["end_reason"] == "shutdown" and line["status"] == 101


# ------------------------------------------------------------------------------------------ upstream paths


def test_tls_upstream_through_the_egress_proxy_tunnel(tmp_path, ws_up, ws_tls_up, tls_ca):
    egress = start_connect_proxy(tmp_path, PROXY_USER, PROXY_PASSWORD)
    try:
        write_table(tmp_path / "tokens.json", ws_rows(ws_up, ws_tls_up))
        proxy = start_proxy(
            tmp_path,
            {
                "UPSTREAM_PROXY": egress.url(PROXY_USER, PROXY_PASSWORD),
                "UPSTREAM_CA_BUNDLE": str(tls_ca.ca_file),
            },
        )
        try:
            rid = new_id("tunnel")
            with open_ws(proxy, token=OTHER_CLIENT_TOKEN, rid=rid) as ws:
                assert recv_json(ws)["type"] == "session.created"
                ws.send("through the tunnel")
                assert ws.recv(timeout=5) == "through the tunnel"
            tunnels = [e for e in egress.log() if e["method"] == "CONNECT"]
            assert any(e["target"] == f"127.0.0.1:{ws_tls_up.port}" and e["authorized"] for e in tunnels), (
                tunnels
            )
            assert proxy.access_line(rid)["end_reason"] == "complete"
        finally:
            proxy.stop()
    finally:
        egress.process.stop()


def test_concurrency_limited_token_gets_429_for_a_second_session(
    proxy_factory, redis_server, ws_up, ws_tls_up
):
    proxy = proxy_factory(
        {"LIMITS_REDIS_URL": redis_server.url, "TOKEN_MAX_CONCURRENCY": "1"}, rows=ws_rows(ws_up, ws_tls_up)
    )
    first = open_ws(proxy)
    assert recv_json(first)["type"] == "session.created"
    time.sleep(0.2)
    rid = new_id("429")
    with pytest.raises(InvalidStatus) as refused:
        open_ws(proxy, rid=rid)
    assert refused.value.response.status_code == 429
    assert json.loads(refused.value.response.body)["error"]["code"] == "token_concurrency_limit"
    assert ws_up.records_of(rid) == []
    first.send("still mine")
    assert first.recv(timeout=5) == "still mine"
    first.close()

    def third_session_opens() -> bool:
        try:
            with open_ws(proxy) as ws:
                return recv_json(ws)["type"] == "session.created"
        except InvalidStatus:
            return False

    wait_for(third_session_opens, timeout=5, interval=0.1, what="the slot released")


# ------------------------------------------------------------------------------------------ legacy mode


def test_legacy_mode_whitelist_and_override(tmp_path, ws_up):
    proxy = start_proxy(
        tmp_path,
        {
            "ENABLE_TOKEN_ROUTING": "false",
            "TARGET_URL": ws_up.url + "/v1",
            "REQUIRED_AUTH_TOKENS": CLIENT_TOKEN,
            "OVERRIDE_AUTH_TOKEN": UPSTREAM_KEY,
        },
    )
    try:
        rid, proto_rid, refused = new_id("legacy"), new_id("legacyp"), new_id("legacy401")
        with open_ws(proxy, rid=rid) as ws:
            assert recv_json(ws)["type"] == "session.created"
        assert header(ws_up.record(rid)["headers"], "authorization") == f"Bearer {UPSTREAM_KEY}"
        with open_ws(
            proxy, token=None, rid=proto_rid, subprotocols=["realtime", PROTOCOL_PREFIX + CLIENT_TOKEN]
        ):
            pass
        upstream = ws_up.record(proto_rid)
        assert (
            header(upstream["headers"], "sec-websocket-protocol")
            == f"realtime, {PROTOCOL_PREFIX}{UPSTREAM_KEY}"
        )
        with pytest.raises(InvalidStatus) as error:
            open_ws(proxy, token=OTHER_CLIENT_TOKEN, rid=refused)
        assert error.value.response.status_code == 401
        assert ws_up.records_of(refused) == []
        assert proxy.access_line(rid)["end_reason"] == "complete"
    finally:
        proxy.stop()


@pytest.mark.parametrize("value", ["abc", "0", "-1"])
def test_bad_websocket_idle_timeout_is_a_start_up_error_naming_it(tmp_path, value):
    code, output = start_up_failure(tmp_path, {"WEBSOCKET_IDLE_TIMEOUT": value}, f"bad-idle-{value}.log")
    assert code == 2 and "WEBSOCKET_IDLE_TIMEOUT" in output, output
    assert "Traceback" not in output


def test_total_timeout_bounds_a_session(proxy_factory, ws_up, ws_tls_up):
    proxy = proxy_factory({"UPSTREAM_TOTAL_TIMEOUT": "1.5"}, rows=ws_rows(ws_up, ws_tls_up))
    rid = new_id("total")
    with open_ws(proxy, rid=rid) as ws:
        assert recv_json(ws)["type"] == "session.created"
        started = time.monotonic()
        for n in range(3):  # traffic does not extend a total deadline
            ws.send(f"m{n}")
            assert ws.recv(timeout=5) == f"m{n}"
        assert close_code(ws, timeout=5) == 1001
        assert time.monotonic() - started < 3.0
    assert proxy.access_line(rid)["end_reason"] == "total_timeout"
    assert ws_up.record(rid, closed=True)["close_code"] == 1001


def test_frames_sent_with_the_handshake_and_frames_already_buffered_upstream_are_relayed(wsp, ws_up):
    """The client's first frame in the same packet as its handshake (pywsgi's reader holds it) and
    the upstream's session.created right behind its 101 (http.client's reader holds it)."""
    rid = new_id("early")
    client = FrameProtocol(client=True, extensions=[])
    handshake = (
        f"GET {REALTIME} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {new_key()}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {CLIENT_TOKEN}\r\nX-Request-ID: {rid}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", wsp.port), timeout=5) as sock:
        sock.sendall(handshake + bytes(client.send_data("early bird", fin=True)))
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        received = []
        deadline = time.monotonic() + 5
        client.receive_bytes(rest)
        while len(received) < 2 and time.monotonic() < deadline:
            received += [frame.payload for frame in client.received_frames()]
            if len(received) < 2:
                client.receive_bytes(sock.recv(65536))
        assert json.loads(received[0])["type"] == "session.created"
        assert received[1] == "early bird"
