"""The official openai package pointed at the proxy: what real clients do must work unchanged."""

from __future__ import annotations

import re

import openai
import pytest
from openai import OpenAI

from tests.conftest import module_proxy
from tests.support.metrics import scrape, total
from tests.support.tables import CLIENT_TOKEN, UPSTREAM_KEY, row

HEX32 = re.compile(r"[0-9a-f]{32}")
MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def op(tmp_path_factory, upstream):
    rows = {CLIENT_TOKEN: row(upstream.url + "/v1", UPSTREAM_KEY, token_id=7, ai_model_name="FakeModel")}
    yield from module_proxy(tmp_path_factory, "openai", rows)


@pytest.fixture(scope="module")
def op_usage(tmp_path_factory, upstream):
    rows = {CLIENT_TOKEN: row(upstream.url + "/v1", UPSTREAM_KEY, token_id=7, ai_model_name="FakeModel")}
    yield from module_proxy(tmp_path_factory, "openai-usage", rows, {"STREAM_USAGE": "request"})


def client_for(proxy, api_key: str = CLIENT_TOKEN, **kwargs) -> OpenAI:
    return OpenAI(base_url=proxy.url + "/", api_key=api_key, max_retries=0, timeout=10, **kwargs)


def test_chat_completion(op, upstream):
    client = client_for(op)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-fake", messages=MESSAGES, extra_headers={"X-Fake": "json;size=900"}
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-fake"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content.startswith("lorem ipsum")
    assert completion.usage.prompt_tokens == 11
    assert completion.usage.completion_tokens == 22
    assert completion.usage.total_tokens == 33
    rid = raw.headers["x-request-id"]
    assert HEX32.fullmatch(rid)
    line = op.access_line(rid)
    assert line["path"] == "/chat/completions"
    assert line["status"] == 200
    (record,) = upstream.records_of(rid)
    assert record["target"] == "/v1/chat/completions"
    assert [v for n, v in record["headers"] if n.lower() == "authorization"] == [f"Bearer {UPSTREAM_KEY}"]


@pytest.mark.parametrize("events", [1, 5, 12])
def test_streaming_chat_completion_yields_every_chunk(op, events):
    client = client_for(op)
    stream = client.chat.completions.create(
        model="gpt-fake",
        messages=MESSAGES,
        stream=True,
        extra_headers={"X-Fake": f"sse;events={events};interval=0.01"},
    )
    pieces = []
    finish = []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        assert chunk.model == "gpt-fake"
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content)
            finish.append(chunk.choices[0].finish_reason)
    assert pieces == [f"tok{i} " for i in range(events)]
    assert finish[-1] == "stop"
    assert all(f is None for f in finish[:-1])


def test_streaming_with_usage(op):
    client = client_for(op)
    stream = client.chat.completions.create(
        model="gpt-fake",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-Fake": "sse;events=3;interval=0.01;comment"},
    )
    chunks = list(stream)
    contents = [c.choices[0].delta.content for c in chunks if c.choices]
    assert contents == ["tok0 ", "tok1 ", "tok2 "]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 33


def test_unknown_key_raises_authentication_error_with_our_message(op):
    client = client_for(op, api_key="sk-not-a-known-token-0123456789")
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="gpt-fake", messages=MESSAGES)
    error = caught.value
    assert error.status_code == 401
    assert "Invalid API token." in str(error)
    assert isinstance(error.body, dict)
    assert error.body["message"] == "Invalid API token."
    assert error.body["code"] == "invalid_token"
    assert HEX32.fullmatch(error.request_id)
    assert error.body["request_id"] == error.request_id


def test_upstream_error_status_reaches_the_client_as_the_matching_exception(op):
    client = client_for(op)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model="gpt-fake", messages=MESSAGES, extra_headers={"X-Fake": "json;status=429"}
        )
    assert caught.value.status_code == 429
    assert "fake error" in str(caught.value)


def _sdk_stream(proxy, fake: str) -> tuple[list, str]:
    raw = client_for(proxy).chat.completions.with_raw_response.create(
        model="gpt-fake", messages=MESSAGES, stream=True, extra_headers={"X-Fake": fake}
    )
    return list(raw.parse()), raw.headers["x-request-id"]


@pytest.mark.parametrize("fake", ["sse;events=4;interval=0.01", "sse;events=2;interval=0.01;crlf;comment"])
def test_stream_usage_request_the_sdk_default_call_gets_the_same_chunks_and_usage_is_logged(
    op, op_usage, fake
):
    before = scrape(op_usage.url)
    plain, plain_id = _sdk_stream(op, fake)
    asked, asked_id = _sdk_stream(op_usage, fake)
    assert len(asked) == len(plain) and all(chunk.choices for chunk in asked)
    assert [c.choices for c in asked] == [c.choices for c in plain]
    assert all(chunk.usage is None for chunk in asked)
    assert op.access_line(plain_id)["total_tokens"] is None
    line = op_usage.access_line(asked_id)
    assert (line["prompt_tokens"], line["completion_tokens"], line["total_tokens"]) == (11, 22, 33)
    after = scrape(op_usage.url)
    assert (
        total(after, "usage_tokens_total", kind="completion")
        - total(before, "usage_tokens_total", kind="completion")
        == 22
    )
