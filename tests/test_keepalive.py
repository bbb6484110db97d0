"""SSE keep-alive comments: only after the configured silence, only at event boundaries,
only for text/event-stream."""

import gevent
import requests

from proxyapp.keepalive import KEEPALIVE, is_event_stream, with_keepalive


def _source(steps):
    """Yield chunks, sleeping (cooperatively) where a step is a number."""
    for step in steps:
        if isinstance(step, (int, float)):
            gevent.sleep(step)
        else:
            yield step


def _collect(steps, silence):
    return list(with_keepalive(_source(steps), silence))


def test_keepalive_only_after_silence_and_at_event_boundaries():
    out = _collect([b"data: 1\n\n", 0.35, b"data: 2\n", 0.35, b"\n", b"data: 3\n\n"], 0.1)
    first = out.index(b"data: 1\n\n")
    second = out.index(b"data: 2\n")
    # Between complete events: keep-alives. Inside the split second event: none.
    assert out[first + 1 : second].count(KEEPALIVE) >= 2
    assert KEEPALIVE not in out[second : out.index(b"\n")]
    assert out[-1] == b"data: 3\n\n"


def test_no_keepalive_when_the_stream_is_never_silent():
    out = _collect([b"data: 1\n\n", 0.01, b"data: 2\n\n"], 0.2)
    assert out == [b"data: 1\n\n", b"data: 2\n\n"]


def test_upstream_errors_reach_the_consumer():
    def failing():
        yield b"data: 1\n\n"
        raise ConnectionResetError("upstream reset")

    got = []
    try:
        for chunk in with_keepalive(failing(), 0.1):
            got.append(chunk)
    except ConnectionResetError:
        pass
    else:
        raise AssertionError("the upstream error was swallowed")
    assert got == [b"data: 1\n\n"]


def test_content_type_detection():
    assert is_event_stream("text/event-stream; charset=utf-8")
    assert not is_event_stream("application/json")
    assert not is_event_stream(None)


def _stream_chunks(url: str, token: str, fake: str) -> list[bytes]:
    response = requests.post(
        url + "/chat/completions",
        json={},
        headers={"Authorization": f"Bearer {token}", "X-Fake": fake},
        stream=True,
        timeout=10,
    )
    assert response.status_code == 200
    return list(response.iter_content(None))


def test_proxy_sends_keepalives_during_a_long_pause(proxy_factory, default_rows):
    from tests.support.tables import CLIENT_TOKEN

    proxy = proxy_factory(env={"SSE_KEEPALIVE_SECONDS": "0.3"}, rows=default_rows)
    chunks = _stream_chunks(proxy.url, CLIENT_TOKEN, "sse;events=3;interval=1.1")
    positions = [i for i, chunk in enumerate(chunks) if chunk == KEEPALIVE]
    assert len(positions) >= 4  # ~3 per 1.1 s gap, two gaps
    # Every comment follows a complete event (the bytes before it end with a blank line).
    for i in positions:
        assert b"".join(chunks[:i]).endswith(b"\n\n")
    assert b"data: [DONE]" in b"".join(chunks)
    # Not for other content types: a slow JSON answer gets none.
    response = requests.post(
        proxy.url + "/chat/completions",
        json={},
        headers={"Authorization": f"Bearer {CLIENT_TOKEN}", "X-Fake": "json;first_delay=0.8"},
        timeout=10,
    )
    assert response.status_code == 200 and b"keep-alive" not in response.content


def test_no_keepalive_by_default(proxy):
    from tests.support.tables import CLIENT_TOKEN

    chunks = _stream_chunks(proxy.url, CLIENT_TOKEN, "sse;events=2;interval=0.8")
    assert KEEPALIVE not in chunks and b"data: [DONE]" in b"".join(chunks)
