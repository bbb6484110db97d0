"""ADMIN_LISTEN_ADDR and the Prometheus files against a real deployment: scripts/run under
supervisord with three workers, the local Redis of the limits, the fake backend and the session's
fake upstream; then Debian's prometheus scraping the admin address and evaluating every query of
deploy/grafana/llm-token-proxy.json and every alert of deploy/prometheus/alerts.yml.
"""

from __future__ import annotations

import re
import signal
import threading
import uuid

import pytest
import requests

from tests.support.metrics import Scrape, scrape
from tests.support.procs import REPO, free_port, start_up_failure, wait_for
from tests.support.prometheus import Prometheus, dashboard_queries
from tests.support.tables import CLIENT_TOKEN, OTHER_CLIENT_TOKEN
from tests.test_deploy import Deployment, FakeBackend, backend_row, cmdline, pid_alive, post

pytestmark = pytest.mark.deploy

WORKERS = 3
DEAD_TOKEN = "sk-client-deadmodel-0a1b2c3d4e5f60718293"  # its model's API is a closed port
PROGRAMS = ["redis", "syncer", *(f"proxy:proxy_{i:02d}" for i in range(WORKERS))]


class Kit:
    def __init__(self, deployment: Deployment, admin_port: int) -> None:
        self.dep = deployment
        self.public = deployment.url
        self.admin = f"http://127.0.0.1:{admin_port}"
        self.admin_address = f"127.0.0.1:{admin_port}"

    def ready(self) -> bool:
        try:
            response = requests.get(self.admin + "/_proxy/readyz", timeout=2)
        except requests.RequestException:
            return False
        return response.status_code == 200 and response.json().get("tokens", 0) == 3

    def worker_pids(self) -> set[int]:
        return {self.dep.pid(f"proxy:proxy_{i:02d}") for i in range(WORKERS)}


@pytest.fixture(scope="module")
def kit(tmp_path_factory, upstream):
    logs = tmp_path_factory.mktemp("operator-kit")
    backend = FakeBackend(logs)
    dead_port = free_port()  # nothing listens there
    backend.control.set(
        rows=[
            backend_row(CLIENT_TOKEN, 7, upstream.url + "/v1"),
            backend_row(OTHER_CLIENT_TOKEN, 8, upstream.url + "/v1", token_rpm=2),
            backend_row(
                DEAD_TOKEN, 9, f"http://127.0.0.1:{dead_port}/v1", ai_model_id=2, ai_model_name="DeadModel"
            ),
        ]
    )
    admin_port = free_port()
    deployment = Deployment(
        logs,
        {
            "SERVER_API_URL": backend.url,
            "TOKEN_FILE_POLL": "0.2",
            "PROXY_WORKERS": str(WORKERS),
            "ADMIN_LISTEN_ADDR": f"127.0.0.1:{admin_port}",
            # A default limit starts the local Redis (deploy/redis.conf); OTHER_CLIENT_TOKEN's row
            # allows 2 requests a minute, so the limiter's metrics have something to count.
            "TOKEN_RPM": "100000",
        },
    )
    kit = Kit(deployment, admin_port)
    try:
        deployment.wait_running(PROGRAMS, timeout=30)
        wait_for(kit.ready, timeout=20, interval=0.05, what="proxy ready on the admin address")
        yield kit
    finally:
        deployment.stop()
        backend.stop()


def _not_found(response: requests.Response) -> None:
    assert response.status_code == 404, (response.status_code, response.text[:300])
    assert response.json()["error"]["code"] == "not_found"


def test_public_port_answers_404_for_metrics_and_readyz_and_proxies_no_operational_path(kit, upstream):
    auth = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    for path in ("/_proxy/metrics", "/_proxy/readyz", "/_proxy/nothing", "/_proxy/metrics/x"):
        for headers in ({}, auth):
            for method in ("GET", "POST"):
                request_id = f"kit-public-{uuid.uuid4().hex[:12]}"
                response = requests.request(
                    method,
                    kit.public + path,
                    headers={**headers, "X-Request-ID": request_id, "Connection": "close"},
                    timeout=5,
                )
                _not_found(response)
                assert "llmproxy_" not in response.text
                assert upstream.records_of(request_id) == [], (method, path)
    # Load balancers still probe the public port.
    health = requests.get(kit.public + "/_proxy/healthz", timeout=5)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    # And the proxy itself is unchanged there.
    assert post(kit.public, CLIENT_TOKEN).status_code == 200


def test_admin_address_serves_operational_paths_only(kit, upstream):
    assert requests.get(kit.admin + "/_proxy/healthz", timeout=5).status_code == 200
    ready = requests.get(kit.admin + "/_proxy/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["table_loaded"] is True
    for secret in (CLIENT_TOKEN, OTHER_CLIENT_TOKEN, DEAD_TOKEN):
        assert secret not in ready.text
    # Nothing is proxied from the admin address, with a valid token or not.
    request_id = f"kit-admin-{uuid.uuid4().hex[:12]}"
    response = post(kit.admin, CLIENT_TOKEN, request_id=request_id)
    _not_found(response)
    _not_found(requests.get(kit.admin + "/_proxy/nothing", timeout=5))
    assert upstream.records_of(request_id) == []


def test_scrapes_land_on_every_worker_and_agree(kit):
    for _ in range(10):
        assert post(kit.public, CLIENT_TOKEN).status_code == 200
    pids = kit.worker_pids()
    assert len(pids) == WORKERS and 0 not in pids

    # Counted once the request has finished on its worker: wait until two scrapes in a row agree.
    readings: list[dict[str, float]] = []

    def settled() -> bool:
        readings.append(scrape(kit.admin).counters())
        return len(readings) >= 2 and readings[-1] == readings[-2]

    wait_for(settled, timeout=10, interval=0.2, what="settled counters")
    by_worker: dict[int, list[Scrape]] = {}

    def every_worker_answered() -> bool:
        response = requests.get(kit.admin + "/_proxy/metrics", headers={"Connection": "close"}, timeout=5)
        assert response.status_code == 200
        pid = int(response.headers["X-Proxy-Worker"])
        assert pid in pids, (pid, pids)
        by_worker.setdefault(pid, []).append(scrape_text(response.text))
        return len(by_worker) == WORKERS

    wait_for(every_worker_answered, timeout=20, interval=0, what=f"scrapes answered by all {WORKERS} workers")
    reference = readings[-1]
    for pid, samples in by_worker.items():
        for sample in samples:
            assert sample.counters() == reference, pid
            assert sample["llmproxy_workers"] == WORKERS, pid
            assert sample["llmproxy_workers_configured"] == WORKERS, pid
            assert sample["llmproxy_sync_interval_seconds"] == pytest.approx(0.02 * 60), pid
            assert sample["llmproxy_table_tokens"] == 3, pid
    print(f"scrapes per worker: { {pid: len(s) for pid, s in by_worker.items()} }")


def scrape_text(text: str) -> Scrape:
    """The same parse as tests.support.metrics.scrape, of a body already fetched."""
    from tests.support import metrics

    samples = Scrape()
    samples.types = {}
    for line in text.splitlines():
        if not line or line.startswith("# HELP "):
            continue
        if line.startswith("#"):
            match = metrics._TYPE.match(line)
            assert match, line
            samples.types[match.group(1)] = match.group(2)
            continue
        match = metrics._SAMPLE.match(line)
        assert match, line
        samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def test_admin_listen_addr_on_the_public_port_stops_start_up(tmp_path):
    port = free_port()
    code, output = start_up_failure(
        tmp_path, {"LISTEN_ADDR": f"127.0.0.1:{port}", "ADMIN_LISTEN_ADDR": f"127.0.0.1:{port}"}, "same.log"
    )
    assert code == 2, output
    assert "ADMIN_LISTEN_ADDR" in output and "LISTEN_ADDR" in output
    code, output = start_up_failure(tmp_path, {"ADMIN_LISTEN_ADDR": "localhost"}, "bad.log")
    assert code == 2 and "ADMIN_LISTEN_ADDR='localhost'" in output, output


def test_without_an_admin_address_the_public_port_serves_them_and_reserves_the_prefix(proxy, upstream):
    """ADMIN_LISTEN_ADDR unset: today's behaviour (metrics and readyz on the public port); an
    unknown /_proxy/ path is a 404 there too, never forwarded, even with a valid token."""
    assert requests.get(proxy.url + "/_proxy/metrics", timeout=5).status_code == 200
    assert requests.get(proxy.url + "/_proxy/readyz", timeout=5).json()["table_loaded"] is True
    request_id = f"kit-reserved-{uuid.uuid4().hex[:12]}"
    response = requests.post(
        proxy.url + "/_proxy/v1/chat/completions",
        headers={"Authorization": f"Bearer {CLIENT_TOKEN}", "X-Request-ID": request_id},
        json={"model": "m"},
        timeout=5,
    )
    _not_found(response)
    assert response.json()["error"]["request_id"] == request_id
    assert upstream.records_of(request_id) == []
    assert "X-Proxy-Worker" not in response.headers


# ---------------------------------------------------------------------------- a real Prometheus


def _traffic(kit: Kit) -> dict[str, int]:
    """Some of everything the dashboard shows: JSON answers with usage, streams (two still running
    while Prometheus scrapes), 429s of the per-token limit, 502s of an unreachable model API."""
    statuses: dict[str, int] = {}
    for _ in range(6):
        status = post(kit.public, CLIENT_TOKEN).status_code
        statuses[f"json {status}"] = statuses.get(f"json {status}", 0) + 1
    for _ in range(4):
        status = post(kit.public, OTHER_CLIENT_TOKEN).status_code
        statuses[f"limited token {status}"] = statuses.get(f"limited token {status}", 0) + 1
    for _ in range(2):
        status = post(kit.public, DEAD_TOKEN).status_code
        statuses[f"dead model {status}"] = statuses.get(f"dead model {status}", 0) + 1
    for _ in range(3):
        response = post(kit.public, CLIENT_TOKEN, fake="sse;events=5;interval=0.01;usage")
        statuses[f"stream {response.status_code}"] = statuses.get(f"stream {response.status_code}", 0) + 1
    return statuses


def _long_stream(kit: Kit, done: threading.Event) -> None:
    try:
        with requests.post(
            kit.public + "/chat/completions",
            json={"model": "m", "stream": True},
            headers={"Authorization": f"Bearer {CLIENT_TOKEN}", "X-Fake": "sse;events=60;interval=0.1"},
            stream=True,
            timeout=20,
        ) as response:
            for _ in response.iter_content(None):
                if done.is_set():
                    break
    except requests.RequestException:
        pass


def _value(prometheus: Prometheus, expr: str) -> float:
    result = prometheus.query(expr)
    return float(result[0]["value"][1]) if result else 0.0


def test_prometheus_evaluates_every_dashboard_query_and_alert(kit, tmp_path):
    # A series that first appears already counted is invisible to rate(): one answer of each model
    # before Prometheus starts, so the traffic below increases series it has seen at their start
    # (the earlier tests of this module may not have run).
    assert post(kit.public, CLIENT_TOKEN).status_code == 200
    assert post(kit.public, DEAD_TOKEN).status_code == 502
    prometheus = Prometheus(tmp_path, kit.admin_address)
    done = threading.Event()
    streams = [threading.Thread(target=_long_stream, args=(kit, done), daemon=True) for _ in range(2)]
    try:
        wait_for(prometheus.scrapes_up, timeout=15, interval=0.2, what="Prometheus scraping the admin")
        base = _value(prometheus, "sum(llmproxy_requests_total)")
        statuses = _traffic(kit)
        assert statuses["json 200"] == 6 and statuses["stream 200"] == 3, statuses
        assert statuses["limited token 429"] == 2 and statuses["dead model 502"] == 2, statuses
        for thread in streams:
            thread.start()
        # Every request counted, the two streams running, and at least 3 samples of every series
        # of requests_total (those this traffic created too), so each rate has samples on both sides of it.
        wait_for(
            lambda: (
                _value(prometheus, "sum(llmproxy_requests_total)") >= base + 15
                and _value(prometheus, "sum(llmproxy_in_flight_streams)") >= 2
                and _value(prometheus, "min(count_over_time(llmproxy_requests_total[30s]))") >= 3
            ),
            timeout=20,
            interval=0.5,
            what="the traffic and the two streams in Prometheus",
        )
        rules = prometheus.alert_rules()
        assert len(rules) == 9, [rule["name"] for rule in rules]
        queries = dashboard_queries() + [(f"alert {rule['name']}", rule["query"]) for rule in rules]
        report: dict[str, str] = {}
        for where, expr in queries:
            result = prometheus.query(expr)  # raises with Prometheus's error on a bad query
            values = [r["value"][1] for r in result]
            numbers = [v for v in values if v not in ("NaN", "+Inf", "-Inf")]
            report[where] = f"{len(numbers)} series" if numbers else ("NaN only" if values else "empty")
        # Every rule was evaluated by Prometheus itself without error too.
        wait_for(
            lambda: all(rule["health"] == "ok" for rule in prometheus.alert_rules()),
            timeout=10,
            interval=0.5,
            what="every alert rule evaluated with health ok",
        )
    finally:
        done.set()
        prometheus.stop()
    print("\nqueries evaluated by Prometheus against the deployment:")
    for where, outcome in report.items():
        print(f"  {outcome:>10}  {where}")

    def has_data(where: str) -> bool:
        return report[where].endswith("series")

    # What this traffic must fill (the alerts may be empty: their conditions do not hold).
    for where in (
        "panel 'Requests/s by status class' A",
        "panel 'Requests/s by end reason' A",
        "panel 'Time to first byte p50 / p99' A",
        "panel 'Time to first byte p50 / p99' B",
        "panel 'Request duration p50 / p99' A",
        "panel 'Request duration p50 / p99' B",
        "panel 'In flight: requests and streams' A",
        "panel 'In flight: requests and streams' B",
        "panel 'Usage tokens/min by model and kind' A",
        "panel 'Upstream errors/s by kind' A",
        "panel 'Rate-limited requests/s by limit' A",
        "panel 'Token table age' A",
        "panel 'Tokens in the table' A",
        "panel 'Syncer: since last success' A",
        "panel 'Syncer failures (1h)' A",
        "panel 'Workers live / configured' A",
        "panel 'Workers live / configured' B",
        "panel 'Log lines dropped' A",  # 0: nothing dropped, but the counter is there
        "variable instance",
        # 2 of the 15 requests failed upstream: above the 5% threshold (the 5 m `for:` keeps it pending).
        "alert LLMProxyUpstreamErrorRatio",
    ):
        assert has_data(where), (where, report[where])
    for where in ("alert LLMProxyDown", "alert LLMProxyWorkersMissing", "alert LLMProxyLimiterRedisDown"):
        assert report[where] == "empty", (where, report[where])


# ---------------------------------------------------------------------------- systemd's stop, without systemd


def test_sigterm_to_the_launcher_drains_and_exits_0_within_the_units_timeout(kit):
    """What `systemctl stop` does with deploy/systemd/llm-token-proxy.service (KillMode=mixed,
    KillSignal=SIGTERM): SIGTERM to the main process, scripts/run, and nothing else until
    TimeoutStopSec. Streams in flight finish, every program stops, the launcher exits 0. Runs last
    in this module: it stops the module's deployment."""
    unit = (REPO / "deploy" / "systemd" / "llm-token-proxy.service").read_text()
    timeout_stop = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE).group(1))
    dep = kit.dep
    programs = dep.status()
    pids = [pid for _, pid in programs.values() if pid]
    assert len(pids) == len(PROGRAMS), programs
    results: list[dict] = []
    started = [threading.Event() for _ in range(2)]

    def stream(index: int) -> None:
        record: dict = {"events": [], "error": None}
        results.append(record)
        try:
            with requests.post(
                kit.public + "/chat/completions",
                json={"model": "m", "stream": True},
                headers={"Authorization": f"Bearer {CLIENT_TOKEN}", "X-Fake": "sse;events=20;interval=0.1"},
                stream=True,
                timeout=20,
            ) as response:
                record["status"] = response.status_code
                for line in response.iter_lines(decode_unicode=True):
                    if line.startswith("data: "):
                        record["events"].append(line[6:])
                        started[index].set()
        except requests.RequestException as exc:
            record["error"] = repr(exc)
        finally:
            started[index].set()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()
    assert all(event.wait(10) for event in started), "a stream did not start"
    dep.process.signal(signal.SIGTERM)  # the launcher's PID only, as systemd's KillMode=mixed
    code = dep.process.wait(timeout=timeout_stop)
    for thread in threads:
        thread.join(timeout=10)
    assert code == 0, dep.tail()
    for record in results:
        assert record["error"] is None and record["status"] == 200, record
        assert record["events"][-1] == "[DONE]" and len(record["events"]) == 21, record["events"][-3:]
    assert not any(pid_alive(pid) for pid in pids), {pid: cmdline(pid) for pid in pids if pid_alive(pid)}
    stopped = [r for r in dep.records() if r.get("event") == "stopped"]
    assert len([r for r in stopped if r.get("service") == "proxy"]) == WORKERS, stopped
    assert all(r["drained"] is True for r in stopped if r.get("service") == "proxy"), stopped
