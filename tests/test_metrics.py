"""/_proxy/metrics: Prometheus text, summed over worker processes, matching the traffic sent."""

import re
import time
import uuid

import requests

from tests.support.procs import PYTHON, REPO, Process, free_port, wait_for
from tests.support.tables import CLIENT_TOKEN, write_table

_SAMPLE = re.compile(r"^(llmproxy_[a-z_]+)(\{[^}]*\})? (\S+)$")


def scrape(url: str) -> dict[str, float]:
    response = requests.get(url + "/_proxy/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in response.text.splitlines():
        if line.startswith("#") or not line:
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(
        value
        for key, value in samples.items()
        if key.split("{")[0] == "llmproxy_" + name and all(w in key for w in wanted)
    )


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


def test_metrics_add_up_over_two_workers_sharing_a_port(tmp_path, upstream, default_rows):
    port = free_port()
    token_file = tmp_path / "tokens.json"
    write_table(token_file, default_rows)
    env = {
        "LISTEN_ADDR": f"127.0.0.1:{port}",
        "TOKEN_FILE": str(token_file),
        "METRICS_DIR": str(tmp_path / "metrics"),
    }
    workers = []
    for name in ("w1", "w2"):
        process = Process(
            [PYTHON, str(REPO / "wsgi.py")],
            env={**env, "HOME": str(tmp_path)},
            log_path=tmp_path / f"{name}.log",
        )
        workers.append(process)
        # The port is shared: wait for this process's own "listening" line, not for the port.
        process.wait_for_log(lambda r: r.get("event") == "listening", timeout=20, what=f"{name} listening")
    try:
        url = f"http://127.0.0.1:{port}"
        sent = 60
        pids = set()
        for _ in range(sent):
            request_id = uuid.uuid4().hex
            response = requests.post(
                url + "/chat/completions",
                json={},
                headers={
                    "Authorization": f"Bearer {CLIENT_TOKEN}",
                    "X-Fake": "json",
                    "X-Request-ID": request_id,
                    "Connection": "close",
                },
                timeout=10,
            )
            assert response.status_code == 200
        for worker in workers:
            pids.update(r["pid"] for r in worker.json_lines() if r.get("logger") == "proxy.access")
        assert len(pids) == 2, "SO_REUSEPORT should have spread new connections over both workers"

        # Snapshots are written every second; whichever worker answers the scrape sums both.
        def counted() -> bool:
            return total(scrape(url), "requests_total") == sent

        wait_for(counted, timeout=5, interval=0.3, what="both workers' requests in the metrics")
        time.sleep(1.2)  # both snapshots are now newer than the last request, whoever answers
        samples = scrape(url)
        assert total(samples, "requests_total") == sent
        assert total(samples, "workers") == 2
        assert total(samples, "usage_tokens_total", kind="total") == 0  # no such kind is invented
        assert total(samples, "usage_tokens_total", kind="prompt") == sent * 11
    finally:
        for worker in workers:
            worker.stop()


def test_syncer_status_appears_in_the_metrics(proxy_factory, default_rows, tmp_path):
    import json

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
    from tests.support.tables import UPSTREAM_KEY

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
