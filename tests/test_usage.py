"""Token usage metering (proxyapp.usage): unit tests on recorded bytes, no socket involved."""

from __future__ import annotations

import gzip
import json
import time
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyapp.usage import FIELDS, MAX_EVENT_BYTES, UsageMeter, request_fields

SSE = "text/event-stream; charset=utf-8"
NONE = dict.fromkeys(FIELDS)


def counts(**values):
    return {**NONE, **values}


def metered(chunks, content_type=SSE, encoding=None, **caps):
    meter = UsageMeter(content_type, encoding, **caps)
    for chunk in chunks:
        meter.feed(chunk)
    meter.finish()
    return meter.result()


def splits(body: bytes):
    """Every split of body into two chunks (the empty chunks at both ends included)."""
    for i in range(len(body) + 1):
        yield [body[:i], body[i:]]


def three_pieces(body: bytes):
    return st.tuples(st.integers(0, len(body)), st.integers(0, len(body))).map(
        lambda ij: [body[: min(ij)], body[min(ij) : max(ij)], body[max(ij) :]]
    )


# -- recorded streams -----------------------------------------------------------------------------

OPENAI_USAGE = {
    "prompt_tokens": 120,
    "completion_tokens": 48,
    "total_tokens": 168,
    "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 16, "audio_tokens": 0},
}
OPENAI_EXPECTED = counts(
    prompt_tokens=120, completion_tokens=48, total_tokens=168, cached_tokens=64, reasoning_tokens=16
)


def openai_chunk(**fields) -> str:
    base = {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion.chunk",
        "created": 1741570283,
        "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_eb9dce56a8",
    }
    return json.dumps({**base, **fields}, separators=(",", ":"))


def openai_events() -> list[str]:
    """Each event as its field lines (no trailing blank line)."""
    events = [f"data: {openai_chunk(choices=[{'index': 0, 'delta': {'role': 'assistant', 'content': ''}}])}"]
    for word in ["Hello", "!", " How", " can", " I", ' help "usage" you', " today", "?"]:
        delta = {"index": 0, "delta": {"content": word}, "logprobs": None, "finish_reason": None}
        events.append(f"data: {openai_chunk(choices=[delta], usage=None)}")
    events.append(f"data: {openai_chunk(choices=[{'index': 0, 'delta': {}, 'finish_reason': 'stop'}])}")
    events.append(f"data: {openai_chunk(choices=[], usage=OPENAI_USAGE)}")
    events.append("data: [DONE]")
    return events


def stream(events, eol="\n") -> bytes:
    return "".join(event.replace("\n", eol) + eol + eol for event in events).encode()


OPENAI_LF = stream(openai_events())
OPENAI_CRLF = stream(openai_events(), "\r\n")
OPENAI_CR = stream(openai_events(), "\r")

# The usage event split over two data lines, comments and pings between events, other fields.
_usage_json = openai_chunk(choices=[], usage=OPENAI_USAGE)
_cut = _usage_json.index('"usage"')
OPENAI_FANCY_EVENTS = [
    ": ping",
    "retry: 3000",
    *[f": keep-alive\nid: {i}\n{e}" for i, e in enumerate(openai_events()[:-2])],
    f"data: {_usage_json[:_cut]}\ndata:{_usage_json[_cut:]}",
    ": ping",
    "data: [DONE]",
]
OPENAI_FANCY = [stream(OPENAI_FANCY_EVENTS, eol) for eol in ("\n", "\r\n", "\r")]

ANTHROPIC_EVENTS = [
    'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_01","type":"message",'
    '"role":"assistant","model":"claude-sonnet-4-5","content":[],"stop_reason":null,'
    '"usage":{"input_tokens":25,"output_tokens":1,"cache_read_input_tokens":5}}}',
    'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    '"content_block":{"type":"text","text":""}}',
    'event: ping\ndata: {"type": "ping"}',
    *[
        'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        f'"delta":{{"type":"text_delta","text":"{word}"}}}}'
        for word in ["Hello", " there", ", friend", ' \\"usage\\"', "."]
    ],
    'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}',
    'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn",'
    '"stop_sequence":null},"usage":{"output_tokens":15}}',
    'event: message_stop\ndata: {"type":"message_stop"}',
]
ANTHROPIC = stream(ANTHROPIC_EVENTS)
ANTHROPIC_CRLF = stream(ANTHROPIC_EVENTS, "\r\n")
ANTHROPIC_EXPECTED = counts(prompt_tokens=25, completion_tokens=15, total_tokens=40, cached_tokens=5)


# -- SSE: every split position gives the same answer ----------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (OPENAI_LF, OPENAI_EXPECTED),
        (OPENAI_CRLF, OPENAI_EXPECTED),
        (OPENAI_CR, OPENAI_EXPECTED),
        *[(body, OPENAI_EXPECTED) for body in OPENAI_FANCY],
        (ANTHROPIC, ANTHROPIC_EXPECTED),
        (ANTHROPIC_CRLF, ANTHROPIC_EXPECTED),
    ],
    ids=["oai-lf", "oai-crlf", "oai-cr", "fancy-lf", "fancy-crlf", "fancy-cr", "anth-lf", "anth-crlf"],
)
def test_stream_split_at_every_position(body, expected):
    assert metered([body]) == expected
    for chunks in splits(body):
        assert metered(chunks) == expected, chunks


@pytest.mark.parametrize("body", [OPENAI_CRLF, OPENAI_FANCY[1], ANTHROPIC_CRLF])
def test_stream_fed_byte_by_byte(body):
    expected = metered([body])
    assert expected["prompt_tokens"] is not None
    assert metered([body[i : i + 1] for i in range(len(body))]) == expected


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_stream_in_three_random_pieces(data):
    body, expected = data.draw(
        st.sampled_from(
            [(OPENAI_LF, OPENAI_EXPECTED), (ANTHROPIC_CRLF, ANTHROPIC_EXPECTED)]
            + [(body, OPENAI_EXPECTED) for body in (OPENAI_CRLF, *OPENAI_FANCY)]
        )
    )
    assert metered(data.draw(three_pieces(body))) == expected


def test_only_events_that_may_carry_usage_are_parsed(monkeypatch):
    import proxyapp.usage

    parsed = []
    loads = json.loads
    monkeypatch.setattr(proxyapp.usage.json, "loads", lambda data: parsed.append(data) or loads(data))
    assert metered([OPENAI_LF]) == OPENAI_EXPECTED
    assert len(parsed) == 1  # not the content chunks ("usage":null), not [DONE]
    parsed.clear()
    assert metered([ANTHROPIC]) == ANTHROPIC_EXPECTED
    assert len(parsed) == 2  # message_start and message_delta
    parsed.clear()
    assert metered([b'data: {"x": {"usage":null}, "usage" : {"prompt_tokens":4}}\n\n'])["prompt_tokens"] == 4


def test_crlf_split_between_chunks_is_one_line_end():
    # Were the CR|LF counted as two line ends, the blank line would dispatch '{"usage":' alone.
    body = b'data: {"usage":\r\ndata: {"prompt_tokens": 3, "completion_tokens": 4}}\r\n\r\n'
    cut = body.index(b"\r\n") + 1
    assert metered([body[:cut], body[cut:]]) == counts(prompt_tokens=3, completion_tokens=4, total_tokens=7)
    # ... also when the LF arrives alone, or after an empty chunk.
    assert metered([body[:cut], b"", b"\n", body[cut + 1 :]])["total_tokens"] == 7


def test_multiline_data_joined_with_newline_and_field_without_colon():
    # "data" with no colon is a data line with an empty value: the JSON gets a blank line inside.
    body = b'data: {"usage":\ndata\ndata:{"prompt_tokens":\ndata:  2}}\n\n'
    assert metered([body])["prompt_tokens"] == 2


def test_event_name_gates_anthropic_events_and_one_space_is_stripped():
    # No literal "usage" substring (the key is escaped): only the event name gets it parsed.
    data = b'data: {"type":"message_delta","\\u0075sage":{"output_tokens":7}}\n\n'
    assert metered([b"event:message_delta\n" + data])["completion_tokens"] == 7
    assert metered([b"event: message_delta\n" + data])["completion_tokens"] == 7
    assert metered([b"event:  message_delta\n" + data])["completion_tokens"] is None  # " message_delta"
    assert metered([b"event: content_block_delta\n" + data])["completion_tokens"] is None
    # The event name does not outlive its event.
    assert metered([b"event: message_delta\n\n" + data])["completion_tokens"] is None


def test_comment_and_blank_lines_alone_dispatch_nothing():
    body = b': {"usage":{"prompt_tokens":9}}\n\n\n\n:data: {"usage":{"prompt_tokens":9}}\n\n'
    assert metered([body]) == NONE


def test_incomplete_last_event_is_discarded():
    # WHATWG: an event not ended by a blank line when the stream ends is not dispatched.
    assert metered([b'data: {"usage":{"prompt_tokens":9,"completion_tokens":1}}\n']) == NONE


def test_leading_bom_is_stripped_even_when_split():
    body = b"\xef\xbb\xbf" + OPENAI_LF
    for cut in range(5):
        assert metered([body[:1], body[1:cut], body[cut:]]) == OPENAI_EXPECTED


def test_oversized_event_is_dropped_and_parsing_resumes():
    big = b'data: {"usage":{"prompt_tokens":999,"completion_tokens":999},"pad":"' + b"x" * 5000 + b'"}\n\n'
    after = b'data: {"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    expected = counts(prompt_tokens=1, completion_tokens=2, total_tokens=3)
    for chunks in (
        [big + after],
        [big[i : i + 100] for i in range(0, len(big), 100)] + [after],
        [big[:-2], big[-2:-1], big[-1:] + after],
        [big[:-1], big[-1:], after],
    ):
        assert metered(chunks, max_event=1024) == expected
    # Several data lines adding up past the cap, then one more line, then the blank line.
    lines = b"".join(b'data: {"usage":{"prompt_tokens":999}} ' + b" " * 300 + b"\n" for _ in range(5))
    assert metered([lines + b"data: x\n\n" + after], max_event=1024) == expected
    # The default cap (1 MiB): a 2 MiB event in 64 KiB chunks, and the usage event after it.
    huge = b'data: {"usage":{"prompt_tokens":999},"pad":"' + b"y" * (2 * MAX_EVENT_BYTES) + b'"}\r\n\r\n'
    assert metered([huge[i : i + 65536] for i in range(0, len(huge), 65536)] + [after]) == expected


def test_client_leaving_early_reports_what_was_counted():
    meter = UsageMeter(SSE, None)
    cut = ANTHROPIC.index(b"event: content_block_delta")
    meter.feed(ANTHROPIC[:cut])
    assert meter.result() == counts(prompt_tokens=25, cached_tokens=5)  # message_start's output ignored
    meter.feed(ANTHROPIC[cut:])
    assert meter.result() == ANTHROPIC_EXPECTED  # readable at any time, before finish() too

    meter = UsageMeter(SSE, None)
    meter.feed(OPENAI_LF[: len(OPENAI_LF) // 2])
    assert meter.result() == NONE


def test_anthropic_message_delta_with_cumulative_input_and_cache_creation():
    body = stream(
        [
            'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":10,'
            '"cache_creation_input_tokens":2048,"cache_read_input_tokens":0,"output_tokens":1}}}',
            'event: message_delta\ndata: {"type":"message_delta","usage":{"input_tokens":12,'
            '"output_tokens":30,"cache_creation_input_tokens":2048,"cache_read_input_tokens":0}}',
        ]
    )
    assert metered([body]) == counts(
        prompt_tokens=12, completion_tokens=30, total_tokens=42, cached_tokens=0, cache_creation_tokens=2048
    )


def test_openai_responses_api_stream():
    usage = {
        "input_tokens": 36,
        "input_tokens_details": {"cached_tokens": 6},
        "output_tokens": 87,
        "output_tokens_details": {"reasoning_tokens": 40},
        "total_tokens": 123,
    }
    body = stream(
        [
            "event: response.created\ndata: "
            + json.dumps({"type": "response.created", "response": {"id": "resp_1", "usage": None}}),
            "event: response.output_text.delta\ndata: "
            + json.dumps({"type": "response.output_text.delta", "delta": "Hi"}),
            "event: response.completed\ndata: "
            + json.dumps({"type": "response.completed", "response": {"id": "resp_1", "usage": usage}}),
        ]
    )
    assert metered([body]) == counts(
        prompt_tokens=36, completion_tokens=87, total_tokens=123, cached_tokens=6, reasoning_tokens=40
    )


def test_gzip_encoded_stream():
    body = gzip.compress(OPENAI_CRLF)
    assert metered([body], encoding="gzip") == OPENAI_EXPECTED
    assert metered([body[i : i + 7] for i in range(0, len(body), 7)], encoding="gzip") == OPENAI_EXPECTED


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6))
def test_arbitrary_bytes_never_raise(junk, cuts):
    """feed() and finish() swallow errors by switching the meter off, so "no exception" proves
    nothing: the checks are that the parsers themselves never failed on junk (the meter is still
    on until finish), that the counts are sane, and that the chunking did not matter."""
    body = junk + OPENAI_LF[:300] + junk
    cuts = sorted(c % (len(body) + 1) for c in cuts)
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    for content_type, encoding in ((SSE, None), ("application/json", None), (SSE, "gzip")):
        meter = UsageMeter(content_type, encoding, max_event=256)
        whole = UsageMeter(content_type, encoding, max_event=256)
        mode = meter.mode
        for chunk in chunks:
            meter.feed(chunk)
        whole.feed(body)
        assert set(meter.result()) == set(FIELDS)
        if encoding is None:  # junk is no gzip: only there may the meter switch itself off
            assert meter.mode == mode, "an internal error switched the meter off"
        meter.finish()
        whole.finish()
        result = meter.result()
        assert set(result) == set(FIELDS)
        assert all(value is None or (type(value) is int and value >= 0) for value in result.values()), result
        assert meter.mode is None  # finish() ends it: later feeds are ignored
        meter.feed(OPENAI_LF)
        assert meter.result() == result == whole.result(), (content_type, encoding)


SSE_FRAGMENTS = [
    b"data:", b"data: ", b"data", b"event: message_delta", b"event: message_start", b"event:", b": ping",
    b"id: 1", b"\r", b"\n", b"\r\n", b"\n\n", b" ", b":", b"\xef\xbb\xbf", b"\xff", b"[DONE]",
    b'{"usage":{"prompt_tokens":3,', b'"completion_tokens":4}}', b'{"usage":null}', b'"usage"',
    b'{"type":"message_start","message":{"usage":{"input_tokens":7}}}', b'{"usage":{"output_tokens":9}}',
]  # fmt: skip


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(SSE_FRAGMENTS), max_size=40).map(b"".join), st.lists(st.integers(0, 2000)))
def test_sse_parser_is_chunking_invariant(body, cuts):
    cuts = sorted(c % (len(body) + 1) for c in cuts)
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    meter = UsageMeter(SSE, None)
    for chunk in chunks:
        meter.feed(chunk)
    assert meter.mode == "sse"  # no internal error switched it off
    assert meter.result() == metered([body])


# -- non-streaming JSON ---------------------------------------------------------------------------

OPENAI_JSON = json.dumps(
    {
        "id": "chatcmpl-123",
        "object": "chat.completion",
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": 'The "usage": {} is here'}}],
        "usage": OPENAI_USAGE,
        "system_fingerprint": "fp_44709d6fcb",
    },
    indent=2,
).encode()


def test_json_answer_with_usage():
    assert metered([OPENAI_JSON], "application/json") == OPENAI_EXPECTED
    assert metered([OPENAI_JSON[:10], OPENAI_JSON[10:]], "Application/JSON; charset=utf-8") == OPENAI_EXPECTED
    anthropic = {
        "type": "message",
        "content": [{"type": "text", "text": "Hi"}],
        "usage": {"input_tokens": 2095, "output_tokens": 503, "cache_read_input_tokens": 1000},
    }
    assert metered([json.dumps(anthropic).encode()], "application/json") == counts(
        prompt_tokens=2095, completion_tokens=503, total_tokens=2598, cached_tokens=1000
    )


def test_gzip_json_answer_in_small_pieces():
    body = gzip.compress(OPENAI_JSON)
    for size in (1, 5, 64, len(body)):
        pieces = [body[i : i + size] for i in range(0, len(body), size)]
        assert metered(pieces, "application/json", "gzip") == OPENAI_EXPECTED
    for chunks in splits(body):
        assert metered(chunks, "application/json", "gzip") == OPENAI_EXPECTED
    # deflate (zlib-wrapped), and a gzip body in two members
    assert metered([zlib.compress(OPENAI_JSON)], "application/json", "deflate") == OPENAI_EXPECTED
    half = len(OPENAI_JSON) // 2
    two = gzip.compress(OPENAI_JSON[:half]) + gzip.compress(OPENAI_JSON[half:])
    pieces = [two[i : i + 9] for i in range(0, len(two), 9)]
    assert metered(pieces, "application/json", "gzip") == OPENAI_EXPECTED


def test_json_answer_without_usage_or_not_json():
    assert metered([b'{"object":"list","data":[]}'], "application/json") == NONE
    assert metered([b'{"usage": null}'], "application/json") == NONE
    wrong_types = b'{"usage": {"prompt_tokens": "12", "completion_tokens": true, "total_tokens": -1}}'
    assert metered([wrong_types], "application/json") == NONE
    assert metered([b"<html>502 Bad Gateway</html>"], "application/json") == NONE
    assert metered([b"\xff\xfe\x00garbage", b"{"], "application/json") == NONE
    assert metered([b"[1, 2, 3]"], "application/json") == NONE
    assert metered([b"[" * 100_000], "application/json") == NONE
    assert metered([], "application/json") == NONE
    assert metered([b"not gzip at all"], "application/json", "gzip") == NONE
    assert metered([gzip.compress(OPENAI_JSON)[:-30]], "application/json", "gzip") == NONE  # truncated


def test_modes_and_unmetered_bodies():
    assert UsageMeter("text/event-stream", None).mode == "sse"
    assert UsageMeter("application/json; charset=utf-8", "identity").mode == "json"
    assert UsageMeter("application/problem+json", None).mode == "json"
    assert UsageMeter("text/plain", None).mode is None
    assert UsageMeter(None, None).mode is None
    assert UsageMeter("application/json", "br").mode is None
    assert metered([OPENAI_JSON], "text/plain") == NONE
    assert metered([OPENAI_LF], "application/octet-stream") == NONE
    assert metered([gzip.compress(OPENAI_JSON)], "application/json", "br") == NONE


def test_feed_never_raises_and_switches_off():
    meter = UsageMeter(SSE, None)
    meter.feed(OPENAI_LF[:50])
    meter.feed("not bytes")  # a bug upstream of the meter must not break the stream
    assert meter.mode is None
    meter.feed(OPENAI_LF[50:])
    assert meter.result() == NONE
    meter = UsageMeter(SSE, None)
    meter.feed(bytearray(OPENAI_LF[:100]))
    meter.feed(memoryview(OPENAI_LF[100:]))
    meter.finish()
    meter.finish()
    assert meter.result() == OPENAI_EXPECTED


def test_json_answer_over_the_cap():
    # Large embedding answers end with their usage: past the cap, it is read from the kept tail.
    vectors = [{"object": "embedding", "index": i, "embedding": [0.0123456789] * 1536} for i in range(60)]
    answer = {"object": "list", "data": vectors, "model": "text-embedding-3-small"}
    body = json.dumps({**answer, "usage": {"prompt_tokens": 480, "total_tokens": 480}}).encode()
    assert len(body) > 1 << 20
    chunks = [body[i : i + 16384] for i in range(0, len(body), 16384)]
    expected = counts(prompt_tokens=480, total_tokens=480)
    assert metered(chunks, "application/json") == expected
    assert metered([gzip.compress(body)], "application/json", "gzip") == expected
    assert metered(chunks[:-3], "application/json") == NONE  # cut before the usage
    assert metered([json.dumps(answer).encode()], "application/json") == NONE
    # A "usage" inside a string (escaped quotes) or not at a key position is not taken.
    tail = b'"text": "x \\"usage\\": {\\"prompt_tokens\\": 5}", "y": ["usage", {"prompt_tokens": 6}]}'
    assert metered([b"{" + b" " * 5000, tail], "application/json", max_json=1024) == NONE


def test_gzip_bomb_is_inflated_in_bounded_steps():
    bomb = gzip.compress(b"data: " + b"a" * (64 << 20) + b"\n\n" + OPENAI_LF[-200:], compresslevel=9)
    assert len(bomb) < 100_000
    meter = UsageMeter(SSE, "gzip")
    meter.feed(bomb)
    assert meter.result() == NONE  # the giant event was dropped, without holding 64 MiB
    assert meter._plen + meter._size <= MAX_EVENT_BYTES


# -- request fields -------------------------------------------------------------------------------


def test_request_fields():
    body = b'{"model": "gpt-4o-mini", "stream": true, "messages": []}'
    assert request_fields(body, "application/json") == ("gpt-4o-mini", True)
    assert request_fields(body, "application/json; charset=utf-8") == ("gpt-4o-mini", True)
    assert request_fields(b'{"model": "m", "stream": false}', "APPLICATION/JSON") == ("m", False)
    assert request_fields(b'{"model": "m"}', "application/json") == ("m", None)
    assert request_fields(b'{"model": "m", "stream": "true"}', "application/json") == ("m", None)
    assert request_fields(b'{"model": "m", "stream": 1}', "application/json") == ("m", None)
    assert request_fields(b'{"model": 5, "stream": true}', "application/json") == (None, True)
    assert request_fields(body, "text/plain") == (None, None)
    assert request_fields(body, "multipart/form-data; boundary=x") == (None, None)
    assert request_fields(body, None) == (None, None)
    assert request_fields(b"model=gpt-4o&stream=true", "application/json") == (None, None)
    assert request_fields(b"\xff\xfe{", "application/json") == (None, None)
    assert request_fields(b'["model"]', "application/json") == (None, None)
    assert request_fields(b"", "application/json") == (None, None)
    assert request_fields(b"[" * 100_000, "application/json") == (None, None)


# -- cost -----------------------------------------------------------------------------------------


def test_feed_cost_per_event(capsys):
    events = [stream([event]) for event in openai_events()[1:-3]]  # content chunks of ~250 B
    chunks = [events[i % len(events)] for i in range(1000)] + [stream(openai_events()[-2:])]

    def noop(chunk):
        pass

    def run(make_feed):
        best = float("inf")
        for _ in range(7):
            feed = make_feed()
            start = time.process_time()
            for chunk in chunks:
                feed(chunk)
            best = min(best, time.process_time() - start)
        return best

    base = run(lambda: noop)
    cost = run(lambda: UsageMeter(SSE, None).feed)
    encoder = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip, flushed per event
    gz_chunks = [encoder.compress(chunk) + encoder.flush(zlib.Z_SYNC_FLUSH) for chunk in chunks]
    gz_chunks.append(encoder.flush())
    start = time.process_time()
    meter = UsageMeter(SSE, "gzip")
    for chunk in gz_chunks:
        meter.feed(chunk)
    gz_cost = time.process_time() - start
    assert meter.result() == OPENAI_EXPECTED
    with capsys.disabled():
        print(
            f"\nUsageMeter.feed, 1000 OpenAI events of ~{len(events[0])} B, one per chunk: "
            f"{cost * 1e3:.2f} ms CPU (no-op loop {base * 1e3:.2f} ms, net {(cost - base) * 1e3:.2f} ms "
            f"= {(cost - base) * 1e3:.2f} µs/event); gzip-encoded, one flushed event per chunk: "
            f"{gz_cost * 1e3:.2f} ms"
        )
    assert (cost - base) / len(chunks) < 50e-6  # catches pathology only
