"""proxyapp.stream_usage as pure functions: the body rewrite and the usage-chunk filter (no sockets)."""

from __future__ import annotations

import json

import pytest

from proxyapp.stream_usage import HOLD_MAX, UsageChunkFilter, applies, with_include_usage


def event(obj: object, eol: bytes = b"\n\n") -> bytes:
    return b"data: " + json.dumps(obj).encode() + eol


CHUNK = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "x"}}]}
USAGE = {"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": {"total_tokens": 3}}


def test_paths():
    assert applies("/v1/chat/completions") and applies("/completions") and applies("/chat/completions")
    assert not applies("/v1/embeddings") and not applies("/v1/responses") and not applies("/completions/x")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"stream": true}', b'{"stream": true,"stream_options":{"include_usage":true}}'),
        (
            b' {"a":"\\u00e9","stream":true} \n',
            b' {"a":"\\u00e9","stream":true,"stream_options":{"include_usage":true}} \n',
        ),
        (
            b'{"stream":true,"stream_options":null}',
            b'{"stream":true,"stream_options":{"include_usage":true}}',
        ),
        (
            b'{"stream_options": {"x": [1, 2]}, "stream": true}',
            b'{"stream_options": {"x":[1,2],"include_usage":true}, "stream": true}',
        ),
        (
            b'{"stream":false,"stream":true}',
            b'{"stream":false,"stream":true,"stream_options":{"include_usage":true}}',
        ),
    ],
)
def test_rewrites(body, expected):
    assert with_include_usage(body) == expected
    assert json.loads(expected)["stream_options"]["include_usage"] is True


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b'{"stream": "true"}',
        b'{"stream": false, "x": true}',
        b'{"stream": true, "stream_options": {"include_usage": true}}',
        b'{"stream": true, "stream_options": "yes"}',
        b'[{"stream": true}]',
        b'{"stream": true',
        b'{"stream": true} {}',
        b'{"stream": true, }',
        b'{"x": {"stream": true}}',
        b'\xff{"stream": true}',
    ],
)
def test_left_alone(body):
    assert with_include_usage(body) is None


def run(filt: UsageChunkFilter, pieces: list[bytes]) -> bytes:
    return b"".join(filt.feed(p) for p in pieces) + filt.flush()


@pytest.mark.parametrize("eol", [b"\n\n", b"\r\n\r\n", b"\r\r"])
def test_the_usage_chunk_is_removed_wherever_the_reads_cut(eol):
    kept = event(CHUNK, eol) + event(CHUNK, eol)
    done = b"data: [DONE]" + eol
    stream = kept + event(USAGE, eol) + done
    for cut in range(1, len(stream)):
        for cut2 in range(cut, len(stream), 7):
            filt = UsageChunkFilter()
            assert run(filt, [stream[:cut], stream[cut:cut2], stream[cut2:]]) == kept + done, (cut, cut2)
            assert filt.removed == 1


def test_whole_events_pass_at_once_and_a_cut_event_only_until_it_shows_choices():
    filt = UsageChunkFilter()
    first = event(CHUNK)
    assert filt.feed(first) == first
    cut = first.index(b'"delta"')
    assert filt.feed(first[:10]) == b""  # may still be the usage chunk
    assert filt.feed(first[10:cut]) == first[:cut]  # "choices": [{ shows it is not
    assert filt.feed(first[cut:]) == first[cut:]
    assert filt.feed(b": ping\n\n") == b": ping\n\n"


def test_other_empty_choices_chunks_and_usage_in_normal_chunks_stay():
    filtered = event({"choices": [], "prompt_filter_results": []}) + event(
        {**CHUNK, "usage": {"total_tokens": 1}}
    )
    assert run(UsageChunkFilter(), [filtered]) == filtered


def test_an_undecided_event_is_held_only_up_to_the_cap():
    filt = UsageChunkFilter()
    big = b'data: {"x": "' + b"a" * HOLD_MAX
    assert filt.feed(big[:100]) == b""
    assert filt.feed(big[100:]) == big
    assert filt.feed(b'", "choices": []}\n\n') == b'", "choices": []}\n\n'


def test_a_stream_ending_inside_an_event_gets_its_bytes():
    filt = UsageChunkFilter()
    assert filt.feed(b'data: {"id"') == b""
    assert filt.flush() == b'data: {"id"'
