"""proxyapp.ws_meter without sockets: frames split anywhere, close frames, boundaries and usage."""

from __future__ import annotations

import json
import random

from wsproto.frame_protocol import FrameProtocol, Opcode

from proxyapp.ws_meter import FrameTrack, SessionUsage, close_frame

SERVER = FrameProtocol(client=False, extensions=[])  # frames as an upstream sends them (unmasked)
CLIENT = FrameProtocol(client=True, extensions=[])  # frames as a client sends them (masked)

DONE = {
    "type": "response.done",
    "response": {"usage": {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8}},
}
COMPLETED = {
    "type": "response.completed",
    "response": {
        "usage": {
            "input_tokens": 10,
            "output_tokens": 4,
            "total_tokens": 14,
            "input_tokens_details": {"cached_tokens": 2},
            "output_tokens_details": {"reasoning_tokens": 1},
        }
    },
}


def frames(proto: FrameProtocol, *messages) -> bytes:
    out = bytearray()
    for message in messages:
        out += proto.send_data(message, fin=True)
    return bytes(out)


def test_upstream_stream_split_anywhere_counts_messages_and_sums_usage():
    delta = json.dumps({"type": "response.output_audio.delta", "delta": "A" * 70000})
    stream = frames(SERVER, json.dumps(DONE), delta, b"\x00" * 1000, json.dumps(COMPLETED))
    stream += bytes(SERVER.close(1000))
    rng = random.Random(7)
    for _ in range(20):
        usage = SessionUsage()
        track = FrameTrack(from_client=False, usage=usage)
        pos = 0
        while pos < len(stream):
            step = rng.randint(1, 5000)
            track.feed(stream[pos : pos + step])
            pos += step
        assert track.messages == 4 and track.closed and track.close_code == 1000
        assert usage.result() == {
            "prompt_tokens": 15,
            "completion_tokens": 7,
            "total_tokens": 22,
            "cached_tokens": 2,
            "cache_creation_tokens": None,
            "reasoning_tokens": 1,
        }


def test_fragmented_usage_message_and_interleaved_ping():
    text = json.dumps(DONE)
    data = bytes(SERVER.send_data(text[:10], fin=False)) + bytes(SERVER.ping(b"p"))
    data += bytes(SERVER.send_data(text[10:], fin=True))
    usage = SessionUsage()
    track = FrameTrack(from_client=False, usage=usage)
    track.feed(data)
    assert track.messages == 1 and usage.result()["total_tokens"] == 8


def test_boundaries_of_client_frames():
    track = FrameTrack(from_client=True)
    message = frames(CLIENT, "hello there")
    track.feed(message[:5])
    assert not track.at_boundary
    track.feed(message[5:])
    assert track.at_boundary and track.messages == 1
    track.feed(bytes(CLIENT.close(4000, "x")))
    assert track.closed and track.close_code == 4000 and not track.at_boundary


def test_an_unparseable_stream_switches_tracking_off():
    track = FrameTrack(from_client=True)
    track.feed(frames(SERVER, "unmasked: not a client frame"))
    assert track.broken and not track.at_boundary and track.messages == 0


def test_no_usage_without_usage_events():
    usage = SessionUsage()
    track = FrameTrack(from_client=False, usage=usage)
    track.feed(frames(SERVER, json.dumps({"type": "session.created"}), "not json"))
    assert usage.result() is None and track.messages == 2


def test_close_frames_of_ours():
    to_client = FrameProtocol(client=True, extensions=[])  # parses what a client receives
    to_client.receive_bytes(close_frame(1001, "going away", to_client=True))
    frame = next(to_client.received_frames())
    assert frame.opcode is Opcode.CLOSE and frame.payload[0] == 1001
    to_upstream = FrameProtocol(client=False, extensions=[])  # parses masked client frames
    to_upstream.receive_bytes(close_frame(1001, "going away", to_client=False))
    assert next(to_upstream.received_frames()).payload[0] == 1001
