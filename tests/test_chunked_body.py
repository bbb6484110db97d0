"""A chunked upstream body, unframed by the worker (proxyapp.upstream.unchunked).

The parser itself is fed scripted reads (no socket is involved in it): every way two cuts can fall
in the wire bytes gives the same payload, one piece per read, and nothing is read past the body's
end. Then the real path: a fake upstream (HTTP and HTTPS) that writes each chunk in pieces cut
inside its size line, data and CRLF, with chunk extensions and a trailer, through the worker.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import requests
from urllib3.exceptions import ProtocolError

from proxyapp.upstream import unchunked
from tests.conftest import start_proxy
from tests.support.chat import CHAT, TIMEOUT, new_id
from tests.support.sse import BODY as STREAM_BODY
from tests.support.sse import sse_events
from tests.support.tables import CLIENT_TOKEN, UPSTREAM_KEY, row, write_table

PAYLOADS = [b"data: one\n\n", b"data: two, a longer event\n\n", b"x"]
PAYLOAD = b"".join(PAYLOADS)


def wire(payloads: list[bytes], ext: bytes = b"", trailer: bytes = b"") -> bytes:
    framed = b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p in payloads)
    return framed + b"0" + ext + b"\r\n" + trailer + b"\r\n"


def scripted(pieces: list[bytes]) -> Callable[[int], bytes]:
    """read1 returning ``pieces`` one per call; a read after them fails the test (the parser must
    stop at the body's end: the connection then carries the next response)."""
    queue = list(pieces)

    def read1(size: int) -> bytes:
        assert queue, "read past the end of the body"
        return queue.pop(0)

    return read1


def unframe(pieces: list[bytes]) -> list[bytes]:
    return list(unchunked(scripted(pieces)))


WIRE_VARIANTS = {
    "plain": wire(PAYLOADS),
    "extensions": wire(PAYLOADS, ext=b";name=value"),
    "trailer": wire(PAYLOADS, trailer=b"X-Checksum: 1\r\nX-Other: 2\r\n"),
    "upper-hex": b"1B\r\n" + b"a" * 27 + b"\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("name", WIRE_VARIANTS)
def test_every_two_cuts_give_the_same_payload(name):
    data = WIRE_VARIANTS[name]
    expected = b"a" * 27 if name == "upper-hex" else PAYLOAD
    for first in range(1, len(data)):
        for second in range(first, len(data)):
            reads = [p for p in (data[:first], data[first:second], data[second:]) if p]
            out = unframe(reads)
            assert b"".join(out) == expected, (first, second)
            assert len(out) <= len(reads) and all(out), (first, second, out)


def test_events_that_arrive_together_leave_as_one_piece():
    assert unframe([wire(PAYLOADS)]) == [PAYLOAD]
    # One event cut in two by the reads leaves in two pieces, nothing held back.
    data = wire(PAYLOADS[:1])
    cut = data.index(b"\n") + 1 + 4
    assert unframe([data[:cut], data[cut:]]) == [PAYLOADS[0][:4], PAYLOADS[0][4:]]


def test_empty_body():
    assert unframe([b"0\r\n\r\n"]) == []


def test_a_missing_final_crlf_after_the_last_chunk_is_accepted():
    # urllib3 accepts it too; the connection is then closed by the peer and not reused.
    assert b"".join(unframe([wire(PAYLOADS)[:-2], b""])) == PAYLOAD


@pytest.mark.parametrize("cut", range(1, len(wire(PAYLOADS)) - 2))
def test_an_early_end_is_a_protocol_error(cut):
    with pytest.raises(ProtocolError):
        unframe([wire(PAYLOADS)[:cut], b""])


@pytest.mark.parametrize("line", [b"zz", b"-1", b"", b";ext", b"5 5"])
def test_a_bad_chunk_size_is_a_protocol_error(line):
    with pytest.raises(ProtocolError, match="Invalid chunk length"):
        unframe([line + b"\r\nhello\r\n0\r\n\r\n"])


def test_an_endless_size_line_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="too long"):
        unframe([b"1" * 40000, b"1" * 40000])


# ---------------------------------------------------------------------------- through the worker

FAKE = "sse;events=4;interval=0.02;split=0.01;chunkext;trailer"


def stream_twice(port: int, upstream, token: str = CLIENT_TOKEN) -> None:
    """Two streams on one client connection; both complete, and both went over one upstream
    connection (the first body's end left the connection reusable)."""
    request_id = new_id("chunk")
    with requests.Session() as session:
        for _ in range(2):
            response = session.post(
                f"http://127.0.0.1:{port}{CHAT}",
                data=STREAM_BODY,
                headers={
                    "Authorization": f"Bearer {token}",
                    "X-Fake": FAKE,
                    "X-Request-ID": request_id,
                    "Content-Type": "application/json",
                },
                timeout=TIMEOUT,
            )
            assert response.status_code == 200
            assert "x-checksum" not in response.headers  # trailers are not forwarded
            events = [data for _, data in sse_events([(0.0, response.content)])]
            assert [json.loads(e)["i"] for e in events[:-1]] == [0, 1, 2, 3]
            assert events[-1] == "[DONE]"
    records = upstream.records_of(request_id)
    assert len(records) == 2
    assert records[0]["conn_id"] == records[1]["conn_id"], records
    assert upstream.connection(records[0]["conn_id"])["requests"] == 2


def test_chunks_cut_anywhere_on_the_wire_stream_through_and_the_connection_is_reused(proxy, upstream):
    stream_twice(proxy.port, upstream)


def test_the_same_over_https(tmp_path, https_upstream, tls_ca):
    write_table(tmp_path / "tokens.json", {CLIENT_TOKEN: row(https_upstream.url + "/v1", UPSTREAM_KEY)})
    proxy = start_proxy(tmp_path, {"UPSTREAM_CA_BUNDLE": str(tls_ca.ca_file)})
    try:
        stream_twice(proxy.port, https_upstream)
    finally:
        proxy.stop()
