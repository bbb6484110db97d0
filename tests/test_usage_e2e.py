"""Usage accounting on the access line, through the real proxy and fake upstream."""

import gzip
import socket
import time
import uuid

import requests

from tests.support.tables import CLIENT_TOKEN


def _post(proxy, fake, body, **kwargs):
    request_id = uuid.uuid4().hex
    response = requests.post(
        proxy.url + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {CLIENT_TOKEN}", "X-Fake": fake, "X-Request-ID": request_id},
        timeout=10,
        **kwargs,
    )
    return request_id, response


def test_openai_stream_usage_is_logged(proxy):
    body = {"model": "gpt-x", "stream": True, "stream_options": {"include_usage": True}}
    request_id, response = _post(proxy, "sse;events=4;interval=0.01", body)
    assert response.status_code == 200 and b'"usage"' in response.content
    line = proxy.access_line(request_id)
    assert line["model"] == "gpt-x" and line["stream"] is True
    assert (line["prompt_tokens"], line["completion_tokens"], line["total_tokens"]) == (11, 22, 33)


def test_gzip_json_usage_is_logged_and_the_body_untouched(proxy):
    request_id, response = _post(proxy, "json;gzip", {"model": "m2"}, stream=True)
    raw = response.raw.read(decode_content=False)
    assert response.headers["Content-Encoding"] == "gzip"
    assert b'"usage"' in gzip.decompress(raw)  # the client still gets the compressed bytes
    line = proxy.access_line(request_id)
    assert line["model"] == "m2" and line["stream"] is None
    assert (line["prompt_tokens"], line["completion_tokens"], line["total_tokens"]) == (11, 22, 33)


def test_no_usage_gives_nulls_and_bad_json_never_fails(proxy):
    request_id = uuid.uuid4().hex
    response = requests.post(
        proxy.url + "/chat/completions",
        data=b"{not json",
        headers={
            "Authorization": f"Bearer {CLIENT_TOKEN}",
            "X-Fake": "sse;events=2;interval=0.01;nodone",
            "Content-Type": "application/json",
            "X-Request-ID": request_id,
        },
        timeout=10,
    )
    assert response.status_code == 200
    line = proxy.access_line(request_id)
    assert line["model"] is None and line["stream"] is None
    assert line["prompt_tokens"] is None and line["total_tokens"] is None


def test_client_leaving_early_logs_what_was_counted(proxy):
    request_id = uuid.uuid4().hex
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        payload = b'{"model": "m3", "stream": true}'
        sock.sendall(
            (
                f"POST /chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_TOKEN}\r\n"
                f"X-Fake: sse;events=50;interval=0.05\r\nX-Request-ID: {request_id}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
            ).encode()
            + payload
        )
        received = b""
        deadline = time.monotonic() + 5
        while received.count(b"data: ") < 2 and time.monotonic() < deadline:
            received += sock.recv(65536)
    line = proxy.access_line(request_id)
    assert line["end_reason"] == "client_gone"
    assert line["model"] == "m3" and line["stream"] is True
    assert line["total_tokens"] is None  # the usage chunk never came; nothing invented
