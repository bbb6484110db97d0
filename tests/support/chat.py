"""Small client helpers for tests that send chat requests through a proxy worker."""

from __future__ import annotations

import json
import re
import socket
import time
import uuid

import requests

from tests.support.procs import wait_for
from tests.support.tables import CLIENT_TOKEN

CHAT = "/chat/completions"
TIMEOUT = 15


def new_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def post_chat(proxy, token: str, request_id: str, fake: str = "json;size=300") -> requests.Response:
    """POST /chat/completions through ``proxy`` with ``token``; ``fake`` is the X-Fake header."""
    return requests.post(
        proxy.url + CHAT,
        headers={"Authorization": f"Bearer {token}", "X-Request-ID": request_id, "X-Fake": fake},
        json={"model": "m-test", "messages": [{"role": "user", "content": "hi"}]},
        timeout=TIMEOUT,
    )


def leave_mid_stream(port: int, request_id: str, token: str = CLIENT_TOKEN, events: int = 2) -> float:
    """Start a long SSE request on a raw socket, read ``events`` events, close the socket (FIN).
    Returns the time.time() at which the client left."""
    body = json.dumps({"model": "m-test", "stream": True, "messages": []}).encode()
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: proxy.test\r\nAuthorization: Bearer {token}\r\n"
        f"X-Fake: sse;events=200;interval=0.1\r\nX-Request-ID: {request_id}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    try:
        sock.sendall(head.encode() + body)
        data = b""
        while len(re.findall(rb"data: \{", data)) < events:
            piece = sock.recv(65536)
            assert piece, f"closed before {events} events: {data[:300]!r}"
            data += piece
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
    finally:
        sock.close()
    return time.time()


def leave_and_wait_closed(port: int, upstream, request_id: str, what: str) -> tuple[dict, float]:
    """Leave a stream mid-way (leave_mid_stream); wait for ``upstream`` to see its one connection
    for it closed. The fake's record of that connection, and when the client left."""
    left = leave_mid_stream(port, request_id)
    [record] = wait_for(lambda: upstream.records_of(request_id), timeout=5)

    def closed():
        conn = upstream.connection(record["conn_id"])
        return conn if conn["closed"] is not None else None

    return wait_for(closed, timeout=5, what=what), left
