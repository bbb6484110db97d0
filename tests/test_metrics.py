"""/_proxy/metrics: Prometheus text merged over worker processes (prometheus_client's
multiprocess mode), matching the traffic sent, whichever worker answers."""

import json
import os
import signal
import socket
import time

import requests

from tests.support.metrics import scrape, total
from tests.support.procs import PYTHON, REPO, Process, free_port, wait_for
from tests.support.sse import StreamReader
from tests.support.tables import CLIENT_TOKEN, UPSTREAM_KEY, register_secret, row, write_table


def _post(url: str, token: str, fake: str, body=None) -> requests.Response:
    return requests.post(
        url + "/chat/completions",
        json=body or {},
        headers={"Authorization": f"Bearer {token}", "X-Fake": fake, "Connection": "close"},
        timeout=10,
    )


def test_metrics_count_requests_usage_and_table(proxy):
    for _ in range(5):
        assert _post(proxy.url, CLIENT_TOKEN, "json").status_code == 200
    for _ in range(3):
        assert _post(proxy.url, "sk-unknown-token-000000000000", "json").status_code == 401
    body = {"stream": True, "stream_options": {"include_usage": True}}
    assert _post(proxy.url, CLIENT_TOKEN, "sse;events=3;interval=0.01", body).status_code == 200
    samples = scrape(proxy.url)
    assert total(samples, "requests_total") == 9
    assert total(samples, "requests_total", model="FakeModel", status_class="2xx", end_reason="complete") == 6
    assert total(samples, "requests_total", status_class="4xx", end_reason="rejected") == 3
    assert total(samples, "request_duration_seconds_count") == 9
    assert total(samples, "ttfb_seconds_count", model="FakeModel") == 6
    # The fake upstream reports 11 prompt + 22 completion tokens per answer (json and the stream).
    assert total(samples, "usage_tokens_total", model="FakeModel", kind="prompt") == 6 * 11
    assert total(samples, "usage_tokens_total", model="FakeModel", kind="completion") == 6 * 22
    assert total(samples, "table_tokens") == 1
    assert total(samples, "in_flight_requests") == 0
    assert total(samples, "workers") == 1
    # Low cardinality: never a token or token ID in a label.
    assert not [key for key in samples if CLIENT_TOKEN in key or "token_id" in key]


def _start_worker(tmp_path, env: dict[str, str], name: str) -> Process:
    process = Process(
        [PYTHON, str(REPO / "wsgi.py")], env={**env, "HOME": str(tmp_path)}, log_path=tmp_path / f"{name}.log"
    )
    # The port is shared: wait for this process's own "listening" line, not for the port.
    process.wait_for_log(lambda r: r.get("event") == "listening", timeout=20, what=f"{name} listening")
    return process


def test_metrics_agree_over_two_workers_and_outlive_them(tmp_path, upstream, default_rows):
    port = free_port()
    token_file = tmp_path / "tokens.json"
    metrics_dir = tmp_path / "metrics"
    write_table(token_file, default_rows)
    env = {"LISTEN_ADDR": f"127.0.0.1:{port}", "TOKEN_FILE": str(token_file), "METRICS_DIR": str(metrics_dir)}
    workers = [_start_worker(tmp_path, env, name) for name in ("w1", "w2")]
    try:
        url = f"http://127.0.0.1:{port}"
        sent = 60
        for _ in range(sent):
            assert _post(url, CLIENT_TOKEN, "json").status_code == 200
        pids = {r["pid"] for w in workers for r in w.json_lines() if r.get("logger") == "proxy.access"}
        assert len(pids) == 2, "SO_REUSEPORT should have spread new connections over both workers"

        # A request is counted as it finishes, a moment after its client has the last byte.
        wait_for(
            lambda: total(scrape(url), "requests_total") == sent, timeout=5, what="every request counted"
        )
        scrapes = [scrape(url) for _ in range(10)]  # new connections: both workers answer some
        assert all(s.counters() == scrapes[0].counters() for s in scrapes), "scrapes disagree"
        counted = scrapes[0].counters()
        assert total(counted, "requests_total") == sent
        assert total(counted, "request_duration_seconds_count") == sent
        assert total(counted, "usage_tokens_total", kind="prompt") == sent * 11
        assert total(counted, "usage_tokens_total", kind="total") == 0  # no such kind is invented
        assert all(total(s, "workers") == 2 for s in scrapes)

        # SIGKILL: the worker runs nothing; its counters stay, its live gauges are dropped.
        killed = workers.pop(0)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=10)
        after_kill = scrape(url)
        assert after_kill.counters() == counted
        assert total(after_kill, "workers") == 1
        assert not list(metrics_dir.glob(f"gauge_live*_{killed.pid}.db"))

        # SIGTERM: the worker drains and leaves the live gauges itself; a new worker counts on.
        stopped = workers.pop(0)
        assert stopped.stop(timeout=20) == 0
        assert not list(metrics_dir.glob(f"gauge_live*_{stopped.pid}.db"))
        workers.append(_start_worker(tmp_path, env, "w3"))
        restarted = scrape(url)
        assert restarted.counters() == counted
        assert total(restarted, "workers") == 1
        assert _post(url, CLIENT_TOKEN, "json").status_code == 200
        wait_for(lambda: total(scrape(url), "requests_total") == sent + 1, timeout=5, what="one more request")
    finally:
        for worker in workers:
            worker.stop()


def test_in_flight_gauges_follow_a_stream(proxy):
    reader = StreamReader(proxy.port, "sse;events=30;interval=0.1")
    reader.start()
    assert reader.first_event.wait(10) and reader.error is None
    during = scrape(proxy.url)
    reader.join(timeout=20)
    assert reader.complete(30)
    assert total(during, "in_flight_streams") == 1
    assert total(during, "in_flight_requests") == 1
    assert total(during, "requests_total") == 0  # counted when it ends
    wait_for(lambda: total(scrape(proxy.url), "requests_total") == 1, timeout=5, what="the stream counted")
    after = scrape(proxy.url)
    assert total(after, "in_flight_streams") == 0
    assert total(after, "in_flight_requests") == 0


def test_upstream_errors_and_clients_gone_are_counted(proxy_factory, upstream):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    other = register_secret("sk-client-canary-unreachable-0000000001")
    rows = {
        CLIENT_TOKEN: row(upstream.url + "/v1", UPSTREAM_KEY, token_id=7, ai_model_name="FakeModel"),
        other: row(closed, UPSTREAM_KEY, token_id=8, ai_model_name="Down"),
    }
    proxy = proxy_factory(rows=rows)
    assert _post(proxy.url, other, "json").status_code == 502
    # A client that leaves a stream after its first bytes.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(
            f"POST /chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_TOKEN}\r\n"
            "X-Fake: sse;events=50;interval=0.1\r\nContent-Length: 2\r\n\r\n{}".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    wait_for(lambda: total(scrape(proxy.url), "client_gone_total") == 1, timeout=10, what="client gone")
    samples = scrape(proxy.url)
    assert total(samples, "upstream_errors_total", kind="unreachable") == 1
    assert total(samples, "upstream_errors_total") == 1
    assert (
        total(samples, "requests_total", model="Down", status_class="5xx", end_reason="upstream_error") == 1
    )
    assert total(samples, "client_gone_total", model="FakeModel") == 1
    assert total(samples, "requests_total", model="FakeModel", end_reason="client_gone") == 1
    assert total(samples, "in_flight_streams") == 0


def test_rejected_table_versions_are_counted(proxy):
    assert total(scrape(proxy.url), "table_reload_failures_total") == 0
    bad = proxy.token_file.with_name("bad.json")
    bad.write_text("{not json")
    os.replace(bad, proxy.token_file)  # one new version of the file, rejected once
    wait_for(
        lambda: total(scrape(proxy.url), "table_reload_failures_total") == 1, timeout=10, what="one rejection"
    )
    assert total(scrape(proxy.url), "table_tokens") == 1  # the last good table is still served


def test_only_event_streams_carry_x_accel_buffering_no(proxy):
    stream = _post(proxy.url, CLIENT_TOKEN, "sse;events=2;interval=0.01", {"stream": True})
    assert stream.status_code == 200
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    assert stream.headers["X-Accel-Buffering"] == "no"
    # An upstream's own value is replaced, not sent alongside ours.
    told = _post(proxy.url, CLIENT_TOKEN, "sse;events=2;interval=0.01;header=X-Accel-Buffering:yes")
    assert told.headers["X-Accel-Buffering"] == "no"
    answer = _post(proxy.url, CLIENT_TOKEN, "json")
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("application/json")
    assert "X-Accel-Buffering" not in answer.headers


def test_syncer_status_appears_in_the_metrics(proxy_factory, default_rows, tmp_path):
    metrics_dir = tmp_path / "m"
    metrics_dir.mkdir()
    (metrics_dir / "syncer.json").write_text(
        json.dumps(
            {"pid": 1, "last_success": 1700000000.5, "last_attempt": 1700000001, "failures": 2, "tokens": 7}
        )
    )
    proxy = proxy_factory(env={"METRICS_DIR": str(metrics_dir)}, rows=default_rows)
    samples = scrape(proxy.url)
    assert total(samples, "syncer_last_success_timestamp_seconds") == 1700000000.5
    assert total(samples, "syncer_failures_total") == 2
    assert total(samples, "syncer_tokens") == 7


def test_the_running_syncer_reports_through_the_workers_metrics(tmp_path, upstream, proxy_factory):
    from tests.fakes.backend import FakeBackendControl
    from tests.support.procs import port_open

    backend_port = free_port()
    backend = Process(
        [PYTHON, "-m", "tests.fakes.backend", "--port", str(backend_port)],
        env={},
        log_path=tmp_path / "backend.log",
    )
    metrics_dir = tmp_path / "metrics"
    token_file = tmp_path / "tokens.json"
    syncer = None
    try:
        wait_for(lambda: port_open(backend_port), timeout=10, what="fake backend")
        row = {
            "token_id": 3, "token": CLIENT_TOKEN, "token_status": 1, "ai_model_id": 1, "ai_model_name": "M",
            "ai_model_api_url": upstream.url + "/v1", "ai_model_api_key": UPSTREAM_KEY, "ai_model_status": 1,
        }  # fmt: skip
        FakeBackendControl(backend_port).set(rows=[row], mode="ok")
        env = {
            "SERVER_API_URL": f"http://127.0.0.1:{backend_port}",
            "TOKEN_FILE": str(token_file),
            "METRICS_DIR": str(metrics_dir),
            "SYNC_INTERVAL": "0.01",
        }
        syncer = Process([PYTHON, "-m", "syncer"], env=env, log_path=tmp_path / "syncer.log")
        wait_for(lambda: (metrics_dir / "syncer.json").exists(), timeout=10, what="syncer status file")
        proxy = proxy_factory(env={"TOKEN_FILE": str(token_file), "METRICS_DIR": str(metrics_dir)})
        samples = scrape(proxy.url)
        assert total(samples, "syncer_tokens") == 1
        assert abs(total(samples, "syncer_last_success_timestamp_seconds") - time.time()) < 30
        assert total(samples, "syncer_failures_total") == 0
    finally:
        if syncer is not None:
            syncer.stop()
        backend.stop()


def test_settings_for_the_alert_rules_and_error_kinds_at_zero(proxy_factory, default_rows):
    """SYNC_INTERVAL and PROXY_WORKERS as gauges (deploy/prometheus/alerts.yml compares with them),
    and every upstream error kind exported at 0 before the first error (rate() misses the first
    increase of a series that appears already counted)."""
    proxy = proxy_factory(env={"SYNC_INTERVAL": "2.5", "PROXY_WORKERS": "3"}, rows=default_rows)
    samples = scrape(proxy.url)
    assert samples["llmproxy_sync_interval_seconds"] == 150
    assert samples["llmproxy_workers_configured"] == 3
    for kind in ("unreachable", "upstream_error", "timeout", "total_timeout"):
        assert samples[f'llmproxy_upstream_errors_total{{kind="{kind}"}}'] == 0, kind
    assert samples.types["llmproxy_workers_configured"] == "gauge"


def test_no_workers_gauge_without_proxy_workers(proxy_factory, default_rows):
    proxy = proxy_factory(env={"PROXY_WORKERS": ""}, rows=default_rows)
    samples = scrape(proxy.url)
    assert "llmproxy_workers_configured" not in samples
    assert samples["llmproxy_sync_interval_seconds"] == 600  # SYNC_INTERVAL's default, 10 minutes
