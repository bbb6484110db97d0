"""STREAM_USAGE=request through the real worker and the fake upstream: what the upstream receives,
what the client receives, the access line and the metrics."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import requests

from tests.conftest import module_proxy, start_fake_upstream
from tests.support.metrics import scrape, total
from tests.support.sse import sse_events
from tests.support.tables import CLIENT_TOKEN, UPSTREAM_KEY, row

# Member order, spacing and escapes of their own: the upstream must receive them byte for byte.
BODY = (
    '{"model": "gpt-x",  "messages": [{"role": "user", "content": "h\\u00e9llo \u00e9t\u00e9 \u2603"}],'
    '\n "temperature": 0.5, "stream": true, "user": "z"}'
).encode()
ADDED = b',"stream_options":{"include_usage":true}'


@pytest.fixture(scope="module")
def su(tmp_path_factory, upstream):
    rows = {CLIENT_TOKEN: row(upstream.url + "/v1", UPSTREAM_KEY, token_id=7, ai_model_name="SuModel")}
    yield from module_proxy(tmp_path_factory, "stream-usage", rows, {"STREAM_USAGE": "request"})


def post(proxy, body: bytes, fake: str, path: str = "/chat/completions", ctype="application/json"):
    request_id = uuid.uuid4().hex
    response = requests.post(
        proxy.url + path,
        data=body,
        headers={
            "Authorization": f"Bearer {CLIENT_TOKEN}",
            "X-Fake": fake,
            "X-Request-ID": request_id,
            "Content-Type": ctype,
            "Accept-Encoding": "gzip",
        },
        timeout=10,
    )
    return request_id, response


def events_of(content: bytes) -> list[str]:
    return [data for _, data in sse_events([(0.0, content)])]


def sent_bodies(upstream, request_id: str) -> list[bytes]:
    return [base64.b64decode(r["body_b64"]) for r in upstream.records_of(request_id)]


def usage_chunks(events: list[str]) -> list[dict]:
    return [c for c in (json.loads(e) for e in events if e != "[DONE]") if c["choices"] == []]


@pytest.mark.parametrize("fake", ["sse;events=4;interval=0.01", "sse;events=3;interval=0.01;crlf;split=0.01"])
def test_upstream_asked_client_sees_no_usage_chunk_and_usage_is_counted(su, upstream, fake):
    before = scrape(su.url)
    request_id, response = post(su, BODY, fake)
    assert response.status_code == 200
    (sent,) = sent_bodies(upstream, request_id)
    assert sent == BODY[:-1] + ADDED + b"}"  # everything else byte-identical
    (record,) = upstream.records_of(request_id)
    assert [v for n, v in record["headers"] if n.lower() == "accept-encoding"] == ["identity"]
    events = events_of(response.content)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert usage_chunks(events) == [] and all(c["choices"] for c in chunks)
    assert all(c["usage"] is None for c in chunks)  # OpenAI's "usage": null in other chunks stays
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks).startswith("tok0 tok1 tok2 ")
    line = su.access_line(request_id)
    assert (line["prompt_tokens"], line["completion_tokens"], line["total_tokens"]) == (11, 22, 33)
    assert line["response_size_bytes"] == len(response.content)  # what the client got
    after = scrape(su.url)
    for kind, tokens in (("prompt", 11), ("completion", 22)):
        moved = total(after, "usage_tokens_total", model="SuModel", kind=kind) - total(
            before, "usage_tokens_total", model="SuModel", kind=kind
        )
        assert moved == tokens


def test_client_that_asked_gets_the_usage_chunk_once_and_its_body_unchanged(su, upstream):
    body = b'{"stream": true, "stream_options": {"include_usage": true}, "model": "a"}'
    request_id, response = post(su, body, "sse;events=2;interval=0.01")
    assert sent_bodies(upstream, request_id) == [body]
    events = events_of(response.content)
    assert len(usage_chunks(events)) == 1 and events[-1] == "[DONE]"
    assert su.access_line(request_id)["total_tokens"] == 33


def test_other_stream_options_members_are_kept(su, upstream):
    body = b'{"stream":true,"stream_options":{"include_usage":false,"x":"\xc3\xa9"},"model":"a"}'
    request_id, response = post(su, body, "sse;events=2;interval=0.01")
    expected = b'{"stream":true,"stream_options":{"include_usage":true,"x":"\xc3\xa9"},"model":"a"}'
    assert sent_bodies(upstream, request_id) == [expected]
    assert usage_chunks(events_of(response.content)) == []
    assert su.access_line(request_id)["total_tokens"] == 33


@pytest.mark.parametrize(
    ("body", "path", "fake"),
    [
        (b'{not json, "stream": true}', "/chat/completions", "sse;events=2;interval=0.01"),
        (b'[{"stream": true}]', "/chat/completions", "sse;events=2;interval=0.01"),
        (b'{"stream": false, "x": true}', "/chat/completions", "json"),
        (b'{"model": "e", "input": "a", "stream": true}', "/embeddings", "sse;events=2;interval=0.01"),
        (b'{"model": "r", "input": "a", "stream": true}', "/responses", "sse;events=2;interval=0.01"),
    ],
)
def test_other_requests_are_untouched(su, upstream, body, path, fake):
    request_id, response = post(su, body, fake, path)
    assert response.status_code == 200
    assert sent_bodies(upstream, request_id) == [body]
    (record,) = upstream.records_of(request_id)
    assert [v for n, v in record["headers"] if n.lower() == "accept-encoding"] == ["gzip"]


def test_completions_path_is_asked_too(su, upstream):
    body = b'{"model": "c", "prompt": "x", "stream": true}'
    request_id, response = post(su, body, "sse;events=2;interval=0.01", "/completions")
    assert sent_bodies(upstream, request_id) == [body[:-1] + ADDED + b"}"]
    assert usage_chunks(events_of(response.content)) == []


def test_passthrough_is_the_default(proxy, upstream):
    request_id, response = post(proxy, BODY, "sse;events=2;interval=0.01")
    assert response.status_code == 200
    assert sent_bodies(upstream, request_id) == [BODY]
    assert proxy.access_line(request_id)["total_tokens"] is None


def test_an_upstream_refusing_stream_options_is_retried_once_then_never_asked(
    tmp_path_factory, proxy_factory
):
    # An upstream of its own: the worker remembers refusing origins for its life.
    fake = start_fake_upstream(tmp_path_factory.mktemp("refusing"))
    try:
        rows = {CLIENT_TOKEN: row(fake.url + "/v1", UPSTREAM_KEY, token_id=8, ai_model_name="Refusing")}
        proxy = proxy_factory({"STREAM_USAGE": "request"}, rows)
        request_id, response = post(proxy, BODY, "sse;events=3;interval=0.01;nostreamopts")
        assert response.status_code == 200
        contents = [json.loads(e)["choices"][0]["delta"]["content"] for e in events_of(response.content)[:-1]]
        assert contents == ["tok0 ", "tok1 ", "tok2 "]
        assert sent_bodies(fake, request_id) == [BODY[:-1] + ADDED + b"}", BODY]
        line = proxy.access_line(request_id)
        assert line["status"] == 200 and line["total_tokens"] is None
        for _ in range(2):
            request_id, response = post(proxy, BODY, "sse;events=2;interval=0.01;nostreamopts")
            assert response.status_code == 200
            assert sent_bodies(fake, request_id) == [BODY]
            proxy.access_line(request_id)
        warnings = [r for r in proxy.process.json_lines() if r.get("event") == "stream_usage_refused"]
        assert len(warnings) == 1 and warnings[0]["origin"] == fake.url
        assert warnings[0]["level"].lower() == "warning"
    finally:
        fake.process.stop()


def test_a_400_that_is_not_about_stream_options_is_answered_and_the_origin_still_asked(su, upstream):
    # Both the changed body and the client's own get 400: the change was not the cause.
    for _ in range(2):
        request_id, response = post(su, BODY, "sse;status=400")
        assert response.status_code == 400 and response.json()["error"]["message"] == "fake error"
        assert sent_bodies(upstream, request_id) == [BODY[:-1] + ADDED + b"}", BODY]
        su.access_line(request_id)
    assert not [r for r in su.process.json_lines() if r.get("event") == "stream_usage_refused"]


def test_an_upstream_that_encodes_anyway_is_passed_through_unchanged(su, upstream):
    # Asked for identity, it gzips all the same: the bytes cannot be edited, so they go unchanged
    # (the usage chunk included) and the meter still counts them.
    request_id = uuid.uuid4().hex
    response = requests.post(
        su.url + "/chat/completions",
        data=BODY,
        headers={
            "Authorization": f"Bearer {CLIENT_TOKEN}",
            "X-Fake": "sse;events=2;interval=0.01;gzip",
            "X-Request-ID": request_id,
            "Content-Type": "application/json",
        },
        timeout=10,
    )
    assert response.headers["Content-Encoding"] == "gzip"
    assert len(usage_chunks(events_of(response.content))) == 1  # requests decoded it
    assert su.access_line(request_id)["total_tokens"] == 33
