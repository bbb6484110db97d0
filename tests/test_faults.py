"""Faults around the proxy: broken upstream responses, a failing backend under the syncer, a corrupt
table at start, a full disk while the syncer writes, leaks over many aborted streams, and SIGTERM
with 50 streams in flight.

Upstream faults are sent on a keep-alive raw-socket connection; when the first response is complete,
a second request follows on the SAME connection to prove the client side did not desync, and another
request through the proxy to the same upstream proves the upstream pool did not either.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from common import tokentable
from tests.conftest import module_proxy
from tests.support.procs import LOG_FILES, PYTHON, REPO, free_port, json_records, wait_for
from tests.support.rawhttp import Resp, new_id, parse_one, read_response, read_until_close
from tests.support.sse import EVENT_END, StreamReader
from tests.support.tables import CLIENT_TOKEN, UPSTREAM_KEY, row, write_table

pytestmark = pytest.mark.hostile

CHAT = "/chat/completions"
BODY = json.dumps({"model": "m-faults", "messages": [{"role": "user", "content": "hi"}]}).encode()
DEAD_TOKEN = "tok-faults-dead-upstream-3c1d"
TEMP_FILE = re.compile(r"^\.tokens\.json\..*\.tmp$")


@pytest.fixture(scope="module")
def fp(tmp_path_factory, upstream):
    live = row(upstream.url + "/v1", UPSTREAM_KEY, token_id=7)
    dead = row(f"http://127.0.0.1:{free_port()}/v1", UPSTREAM_KEY, token_id=8)  # nobody listens there
    yield from module_proxy(tmp_path_factory, "faults", {CLIENT_TOKEN: live, DEAD_TOKEN: dead})


# ------------------------------------------------------------------------------------------ helpers


def assert_quiet(sock: socket.socket, seconds: float = 0.3) -> None:
    """Nothing more arrives after a complete response (no stray body bytes, no close)."""
    sock.settimeout(seconds)
    try:
        data = sock.recv(65536)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected bytes or close after the response: {data[:300]!r}")


def request(
    fake: str,
    *,
    token: str = CLIENT_TOKEN,
    method: str = "POST",
    path: str = CHAT,
    request_id: str | None = None,
    body: bytes = BODY,
) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: proxy.test\r\nAuthorization: Bearer {token}\r\n"
    head += f"X-Fake: {fake}\r\n"
    if request_id:
        head += f"X-Request-ID: {request_id}\r\n"
    if method in ("POST", "PUT", "PATCH"):
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    else:
        body = b""
    return head.encode() + b"\r\n" + body


def assert_echo_on(sock: socket.socket, path: str = "/after") -> None:
    """A normal request on the same client connection is answered correctly."""
    request_id = new_id("f")
    sock.sendall(request("echo", method="GET", path=path, request_id=request_id))
    resp = read_response(sock)
    assert resp.status == 200, resp
    echoed = json.loads(resp.body)
    assert echoed["target"] == "/v1" + path
    assert ["X-Request-ID", request_id] in echoed["headers"] or any(
        n.lower() == "x-request-id" and v == request_id for n, v in echoed["headers"]
    )


def assert_upstream_in_step(proxy, times: int = 4) -> None:
    """Fresh requests through the proxy to the same upstream get their own, whole responses."""
    for _ in range(times):
        request_id = new_id("f")
        response = requests.post(
            proxy.url + CHAT,
            headers={"Authorization": f"Bearer {CLIENT_TOKEN}", "X-Fake": "echo", "X-Request-ID": request_id},
            data=BODY,
            timeout=10,
        )
        assert response.status_code == 200, response.text
        echoed = response.json()
        assert any(n.lower() == "x-request-id" and v == request_id for n, v in echoed["headers"]), echoed


def error_json(resp: Resp, status: int) -> dict:
    assert resp.status == status, resp
    body = json.loads(resp.body)
    assert body["error"]["request_id"] and resp.header("x-request-id") == body["error"]["request_id"]
    return body


# ------------------------------------------------------------------------------------------ upstream faults


@pytest.mark.parametrize(
    ("token", "fake", "code"),
    [(DEAD_TOKEN, "json", "upstream_unreachable"), (CLIENT_TOKEN, "garbage", "upstream_bad_response")],
    ids=["connection-refused", "garbage-status-line"],
)
def test_unusable_upstream_is_502_and_the_client_connection_stays_usable(fp, token, fake, code):
    with socket.create_connection(("127.0.0.1", fp.port), timeout=10) as sock:
        sock.sendall(request(fake, token=token))
        resp = read_response(sock)
        assert error_json(resp, 502)["error"]["code"] == code
        assert_quiet(sock)
        assert_echo_on(sock)
    assert_upstream_in_step(fp)


@pytest.mark.parametrize("status", [204, 304])
def test_bodyless_status_with_a_bad_content_length_is_passed_without_one(fp, status):
    with socket.create_connection(("127.0.0.1", fp.port), timeout=10) as sock:
        sock.sendall(request(f"status={status};badcl", method="GET", path="/models"))
        resp = read_response(sock)
        assert resp.status == status, resp
        assert not resp.has("content-length"), resp.headers
        assert not resp.has("transfer-encoding"), resp.headers
        assert_quiet(sock)  # no body bytes follow
        assert_echo_on(sock)
    assert_upstream_in_step(fp)


def test_overlong_upstream_body_is_cut_to_its_content_length(fp):
    with socket.create_connection(("127.0.0.1", fp.port), timeout=10) as sock:
        sock.sendall(request("overlong"))
        resp = read_response(sock)
        assert resp.status == 200 and resp.header("content-length") == "10", resp
        assert resp.body == b'{"a":"bc"}'
        assert_quiet(sock)  # the upstream's 10 extra bytes never reach the client
        assert_echo_on(sock)
    assert_upstream_in_step(fp)


def cut_response(fp, fake: str) -> tuple[str, Resp | None, bytes, str]:
    """The fake's answer through the proxy, read until the proxy closes: (request ID, the response
    parsed from what came, the bytes, how the connection ended)."""
    request_id = new_id("f")
    with socket.create_connection(("127.0.0.1", fp.port), timeout=10) as sock:
        sock.sendall(request(fake, request_id=request_id))
        data, end = read_until_close(sock, 5.0)
    return request_id, parse_one(data)[0], data, end


def test_short_upstream_body_cuts_the_client_response(fp):
    request_id, resp, data, end = cut_response(fp, "short")
    assert resp is not None and resp.status == 200 and resp.header("content-length") == "100", data
    assert not resp.complete and len(resp.body) < 100, data
    assert end in ("eof", "reset"), f"the cut response was left open: {data!r}"
    assert fp.access_line(request_id)["end_reason"] != "complete"
    assert_upstream_in_step(fp)


def test_reset_sse_stream_ends_without_a_last_chunk(fp):
    request_id, resp, data, end = cut_response(fp, "sse;events=5;interval=0.05;reset_after=2")
    assert resp is not None and resp.status == 200, data
    assert resp.header("transfer-encoding") == "chunked", resp.headers
    assert not resp.complete, f"the cut stream ended with a clean last chunk: {data[-200:]!r}"
    assert not data.endswith(b"0\r\n\r\n")
    assert resp.body.count(b"data: ") == 2, resp.body
    assert end in ("eof", "reset"), end
    assert fp.access_line(request_id)["end_reason"] == "upstream_error"
    assert_upstream_in_step(fp)


# ------------------------------------------------------------------------------------------ backend / table


_SERIAL = iter(range(1, 1_000_000))


def run_syncer(tmp_path: Path, env: dict[str, str], *, preexec_fn=None, timeout: float = 60):
    """``python -m syncer --once``: (exit code, output, seconds). Output goes to a registered log."""
    log_path = tmp_path / f"syncer-once-{next(_SERIAL)}.log"
    LOG_FILES.append(log_path)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    full_env.update({"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "LOG_LEVEL": "info"})
    full_env.update(env)
    started = time.monotonic()
    with open(log_path, "wb") as out:
        completed = subprocess.run(
            [PYTHON, "-m", "syncer", "--once"],
            cwd=REPO,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            preexec_fn=preexec_fn,
            check=False,
        )
    return completed.returncode, log_path.read_text(errors="replace"), time.monotonic() - started


def syncer_env(backend_url: str, token_file: Path, **extra: str) -> dict[str, str]:
    env = {
        "ENABLE_TOKEN_ROUTING": "true",
        "SERVER_API_URL": backend_url,
        "SERVER_API_TOKEN": "",
        "SERVER_API_USERNAME": "",
        "SERVER_API_PASSWORD": "",
        "SYNC_TIMEOUT": "1",
        "SYNC_ALLOW_EMPTY": "false",
        "TOKEN_FILE": str(token_file),
    }
    env.update(extra)
    return env


def backend_row(upstream) -> dict:
    return {
        "token_id": 7,
        "token": CLIENT_TOKEN,
        "token_status": 1,
        "token_expire_at": None,
        "token_usage_limit": 100,
        "ai_model_id": 1,
        "ai_model_name": "FakeModel",
        "ai_model_api_url": upstream.url + "/v1",
        "ai_model_api_key": UPSTREAM_KEY,
        "ai_model_status": 1,
    }


def temp_files(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if TEMP_FILE.match(name))


def plain_lines(output: str) -> list[str]:
    """What the syncer printed outside its JSON log (its one-line reason on stderr)."""
    return [line for line in output.splitlines() if line.strip() and not line.startswith("{")]


def proxied_ok(proxy) -> bool:
    response = requests.post(
        proxy.url + CHAT,
        headers={"Authorization": f"Bearer {CLIENT_TOKEN}", "X-Fake": "json;size=100"},
        data=BODY,
        timeout=10,
    )
    return response.status_code == 200


BACKEND_FAULTS = [
    ("down", {}),
    ("http500", {"mode": "http500"}),
    ("garbage", {"mode": "garbage"}),
    ("truncated", {"mode": "truncated"}),
    ("code_nonzero", {"mode": "code_nonzero", "error_message": "backend exploded"}),
    ("data_not_list", {"mode": "data_not_list"}),
    ("empty", {"mode": "empty"}),
    ("hang", {"mode": "hang", "hang_seconds": 20}),
    ("drip", {"mode": "drip", "drip_interval": 0.2}),
]


def test_backend_faults_leave_the_table_and_the_proxy_untouched(tmp_path, backend, upstream, proxy_factory):
    token_file = tmp_path / "var" / "tokens.json"
    backend.set(rows=[backend_row(upstream)], mode="ok")
    rc, output, _ = run_syncer(tmp_path, syncer_env(backend.url, token_file, SYNC_TIMEOUT="10"))
    assert rc == 0, output
    good = token_file.read_bytes()
    proxy = proxy_factory(env={"TOKEN_FILE": str(token_file)})
    assert proxied_ok(proxy)
    dead_url = f"http://127.0.0.1:{free_port()}"
    timings = {}
    for name, state in BACKEND_FAULTS:
        backend.reset()
        backend.set(rows=[backend_row(upstream)], **state)
        url = dead_url if name == "down" else backend.url
        rc, output, seconds = run_syncer(tmp_path, syncer_env(url, token_file), timeout=30)
        timings[name] = round(seconds, 2)
        reason = plain_lines(output)
        assert rc != 0, f"{name}: the sync succeeded\n{output}"
        assert seconds < 10, f"{name}: took {seconds:.1f}s with SYNC_TIMEOUT=1"
        assert len(reason) == 1 and reason[0].startswith("syncer: sync failed:"), (name, output)
        assert token_file.read_bytes() == good, f"{name}: the table file changed"
        assert temp_files(token_file.parent) == [], name
        assert proxied_ok(proxy), name
    backend.reset()  # releases a hung request
    ready = requests.get(proxy.url + "/_proxy/readyz", timeout=5).json()
    print(f"backend faults: syncer exit times {timings}; proxy readyz {ready}")
    assert ready["tokens"] == 1 and ready["reload_failures"] == 0, ready


def test_corrupt_table_at_start_answers_503_until_a_good_file_appears(tmp_path, proxy_factory, default_rows):
    token_file = tmp_path / "tokens.json"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, b'{"version": 1, "generated_at": "2025-01-01T00:00:00Z", "tokens": {"sk-trunc')
    os.close(fd)
    proxy = proxy_factory(wait_ready=False)
    assert proxy.process.alive()
    ready = requests.get(proxy.url + "/_proxy/readyz", timeout=5)
    assert ready.status_code == 503 and ready.json()["table_loaded"] is False, ready.text
    response = requests.post(
        proxy.url + CHAT, headers={"Authorization": f"Bearer {CLIENT_TOKEN}"}, data=BODY, timeout=5
    )
    assert response.status_code == 503 and response.headers.get("Retry-After"), response.headers
    error = response.json()["error"]
    assert error["code"] == "table_not_loaded" and error["request_id"], error
    rejected = proxy.process.wait_for_log(lambda r: r.get("event") == "table_rejected", what="table_rejected")
    assert rejected.get("reason") and rejected.get("path") == str(token_file), rejected
    print(f"corrupt table logged as: {rejected.get('reason')!r}")

    write_table(token_file, default_rows)
    wait_for(lambda: requests.get(proxy.url + "/_proxy/readyz", timeout=5).status_code == 200, timeout=10)
    response = requests.post(
        proxy.url + CHAT,
        headers={"Authorization": f"Bearer {CLIENT_TOKEN}", "X-Fake": "json;size=100"},
        data=BODY,
        timeout=5,
    )
    assert response.status_code == 200, response.text


def test_disk_full_during_the_syncer_write_keeps_the_old_table(tmp_path, backend, upstream):
    token_file = tmp_path / "var" / "tokens.json"
    write_table(token_file, {CLIENT_TOKEN: row(upstream.url + "/v1", UPSTREAM_KEY, token_id=7)})
    old = token_file.read_bytes()
    limit = 256 * 1024
    assert len(old) < limit
    backend.set(generate={"count": 20000, "version": "diskfull"}, mode="ok")

    def limit_file_size() -> None:  # runs in the child before exec; Python ignores SIGXFSZ -> EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = syncer_env(backend.url, token_file, SYNC_TIMEOUT="30")
    rc, output, seconds = run_syncer(tmp_path, env, preexec_fn=limit_file_size)
    reason = plain_lines(output)
    print(f"disk full: exit {rc} after {seconds:.2f}s, reason {reason}")
    assert rc != 0, output
    assert len(reason) == 1 and reason[0].startswith("syncer: sync failed:"), output
    assert "too large" in reason[0].lower(), reason
    assert token_file.read_bytes() == old
    assert temp_files(token_file.parent) == [], os.listdir(token_file.parent)
    failed = [r for r in json_records(output) if r.get("message") == "sync" and r.get("outcome") == "failed"]
    assert len(failed) == 1 and "too large" in failed[0].get("error", "").lower(), json_records(output)

    # The same sync without the limit succeeds with a bigger file: the limit was what failed it.
    rc, output, _ = run_syncer(tmp_path, env)
    assert rc == 0, output
    assert token_file.stat().st_size > limit
    assert len(tokentable.read(str(token_file))[0].tokens) == 20000


# ------------------------------------------------------------------------------------------ leaks


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def in_flight(proxy) -> int:
    return requests.get(proxy.url + "/_proxy/readyz", timeout=5).json()["in_flight"]


def disconnect_mid_stream(port: int, index: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(request("sse;events=50;interval=0.02"))
        data = b""
        while b"data: " not in data or not EVENT_END.search(data[data.index(b"data: ") :]):
            piece = sock.recv(65536)
            if not piece:
                raise AssertionError(f"stream {index} ended before its first event: {data!r}")
            data += piece
        assert data.startswith(b"HTTP/1.1 200 "), data[:100]
        if index % 2:  # every other client leaves with a RST instead of a FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


def test_no_fd_or_memory_leak_over_1000_disconnects_mid_stream(proxy_factory, default_rows, upstream):
    proxy = proxy_factory(rows=default_rows)
    pid = proxy.process.pid

    def cycles(first: int, count: int) -> None:
        with ThreadPoolExecutor(20) as pool:
            list(pool.map(lambda i: disconnect_mid_stream(proxy.port, i), range(first, first + count)))
        wait_for(lambda: in_flight(proxy) == 0, timeout=15, what="in_flight back to 0")

    cycles(0, 100)  # warm-up: pools, caches, greenlets
    time.sleep(0.5)
    fds_before, rss_before = fd_count(pid), rss_kib(pid)
    started = time.monotonic()
    cycles(100, 1000)
    elapsed = time.monotonic() - started
    try:  # sockets being closed may take a moment to go
        wait_for(lambda: fd_count(pid) <= fds_before + 5, timeout=5, interval=0.1)
    except AssertionError:
        pass
    fds_after, rss_after = fd_count(pid), rss_kib(pid)
    print(
        f"leaks: 1000 disconnects in {elapsed:.1f}s; fds {fds_before} -> {fds_after}; "
        f"RSS {rss_before / 1024:.1f} MiB -> {rss_after / 1024:.1f} MiB"
    )
    upstream.clear()
    assert proxy.process.alive()
    assert fds_after - fds_before <= 5, (fds_before, fds_after, os.listdir(f"/proc/{pid}/fd"))
    assert rss_after - rss_before <= 10 * 1024, (rss_before, rss_after)


# ------------------------------------------------------------------------------------------ SIGTERM


def test_sigterm_with_50_streams_in_flight_lets_all_finish(proxy_factory, default_rows):
    proxy = proxy_factory(env={"GRACEFUL_TIMEOUT": "10"}, rows=default_rows)
    streams = [StreamReader(proxy.port, "sse;events=20;interval=0.1") for _ in range(50)]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.first_event.wait(10) and stream.error is None, stream.error
    proxy.process.signal(signal.SIGTERM)
    signalled = time.monotonic()
    for stream in streams:
        stream.join(15)
    try:
        code = proxy.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        code = None
    exited_after = time.monotonic() - signalled
    completed = sum(stream.complete(20) for stream in streams)
    print(f"SIGTERM: {completed}/50 streams complete, exit code {code} after {exited_after:.2f}s")
    assert completed == 50, [
        (s.status, len(s.events), s.clean_end, s.error) for s in streams if not s.complete(20)
    ]
    assert code == 0, proxy.process.output()[-2000:]
    assert exited_after < 10, exited_after
