"""The deployment as operators run it: scripts/run (supervisord + supervisord.conf), scripts/ctl,
scripts/rolling-restart, with the fake backend as the real backend of the deployed syncer and the
session fake upstream as the model API.

Each deployment runs in a short temp dir under /tmp (AF_UNIX socket paths are limited to ~107
bytes); the launcher runs in the foreground, so every program's log lines are in its output.
Only processes these tests started are ever signalled, always by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

from common import tokentable
from tests.fakes.backend import FakeBackendControl
from tests.support import procs
from tests.support.metrics import scrape, total
from tests.support.procs import PYTHON, REPO, Process, free_port, port_open, wait_for
from tests.support.tables import CLIENT_TOKEN, OTHER_CLIENT_TOKEN, OTHER_UPSTREAM_KEY, UPSTREAM_KEY

pytestmark = pytest.mark.deploy

# Every setting the launcher, supervisord.conf or the programs read: a developer's environment must
# not leak into a deployment under test (only what a test passes explicitly counts).
CONFIG_VARS = (
    "ENABLE_TOKEN_ROUTING",
    "SERVER_API_URL",
    "SERVER_API_TOKEN",
    "SERVER_API_USERNAME",
    "SERVER_API_PASSWORD",
    "SYNC_INTERVAL",
    "SYNC_TIMEOUT",
    "SYNC_RETRY_BASE",
    "SYNC_ALLOW_EMPTY",
    "LOG_LEVEL",
    "LOG_BUFFER_BYTES",
    "LISTEN_ADDR",
    "TARGET_URL",
    "OVERRIDE_AUTH_TOKEN",
    "REQUIRED_AUTH_TOKENS",
    "TOKEN_FILE",
    "TOKEN_FILE_POLL",
    "UPSTREAM_CONNECT_TIMEOUT",
    "UPSTREAM_READ_TIMEOUT",
    "UPSTREAM_TOTAL_TIMEOUT",
    "UPSTREAM_POOL_MAXSIZE",
    "UPSTREAM_DNS_CACHE_SECONDS",
    "LOG_BODY_MAX_BYTES",
    "MAX_BODY_BYTES",
    "MAX_CLIENT_CONNECTIONS",
    "GRACEFUL_TIMEOUT",
    "CLIENT_IDLE_TIMEOUT",
    "CLIENT_HEADER_TIMEOUT",
    "CLIENT_BODY_TIMEOUT",
    "CLIENT_SEND_TIMEOUT",
    "PROXY_WORKERS",
    "PROXY_RUN_DIR",
    "PROXY_LOG_DIR",
    "PROXY_LOG_MAXBYTES",
    "PROXY_LOG_BACKUPS",
    "PROXY_MINFDS",
    "PROXY_STOPWAITSECS",
    "PROXY_PYTHON",
    "PROXY_ENV_FILE",
    "PROXY_EXTRA_CONF",
    "DEMO_BACKEND_PORT",
    "DEMO_UPSTREAM_PORT",
    "TOKEN_MAX_CONCURRENCY",
    "TOKEN_RPM",
    "LIMITS_REDIS_URL",
    "LIMITS_LEASE_SECONDS",
    "PROXY_LOCAL_REDIS",
    "PROXY_REDIS_SERVER",
    "PROXY_REDIS_LOGFILE",
    "PROXY_REDIS_LOG_MAXBYTES",
    "ADMIN_LISTEN_ADDR",
)
STATUS_LINE = re.compile(r"^(\S+)\s+([A-Z]+)\s*(?:pid (\d+),)?")
PROGRAM_MARKERS = ("wsgi.py", "syncer", "demo", "supervisord", "redis-server")


# ---------------------------------------------------------------------------- helpers


def scrubbed_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in CONFIG_VARS and not k.startswith("PYTEST_")}


def pid_alive(pid: int) -> bool:
    """True while any thread of the process runs. A zombie group leader whose other threads are
    still exiting has not closed its files yet (its listening socket may still queue connections)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            return True
    return False


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def backend_row(token: str, token_id: int, api_url: str, api_key: str = UPSTREAM_KEY, **fields) -> dict:
    """A row as the backend's GET /api/tokens/with-model returns it."""
    value = {
        "token_id": token_id,
        "token": token,
        "token_status": 1,
        "token_expire_at": None,
        "token_usage_limit": 0,
        "ai_model_id": 1,
        "ai_model_name": "FakeModel",
        "ai_model_api_url": api_url,
        "ai_model_api_key": api_key,
        "ai_model_status": 1,
    }
    value.update(fields)
    return value


def parse_sse(lines: list[str]) -> list[str]:
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


class FakeBackend:
    """The fake backend admin API (tests/fakes/backend.py) as a process, with its control API."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.process = Process(
            [PYTHON, "-m", "tests.fakes.backend", "--port", str(self.port)],
            env={},
            log_path=log_dir / f"backend-{self.port}.log",
        )
        wait_for(lambda: port_open(self.port) or not self.process.alive(), timeout=15, what="backend port")
        assert self.process.alive(), self.process.output()
        self.control = FakeBackendControl(self.port)
        self.url = self.control.url

    def list_calls(self) -> int:
        return len(self.control.calls())

    def stop(self) -> None:
        self.process.stop()


class Deployment:
    """One deployment started with the real launcher: ``bash scripts/run [args]`` from the repo."""

    def __init__(
        self, log_dir: Path, env: dict[str, str], args: tuple[str, ...] = (), *, test_defaults: bool = True
    ) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sv", dir="/tmp"))
        self.run_dir = self.root / "run"
        self.log_dir = self.root / "log"
        self.token_file = self.root / "var" / "tokens.json"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            "PROXY_RUN_DIR": str(self.run_dir),
            "PROXY_LOG_DIR": str(self.log_dir),
            "TOKEN_FILE": str(self.token_file),
            "LISTEN_ADDR": f"127.0.0.1:{self.port}",
            "PROXY_ENV_FILE": "/nonexistent",
            "PROXY_PYTHON": PYTHON,
            "HOME": str(self.root),  # a ~/.netrc of the machine must not matter
        }
        if test_defaults:  # otherwise the launcher's own defaults apply
            self.env.update({"PROXY_WORKERS": "2", "SYNC_INTERVAL": "0.02", "GRACEFUL_TIMEOUT": "5"})
        self.env.update(env)
        self.seen_pids: set[int] = set()
        self.supervisord_pid: int | None = None
        self._saved_logs = log_dir
        with pytest.MonkeyPatch.context() as patch:
            for name in CONFIG_VARS:
                if name not in self.env:
                    patch.delenv(name, raising=False)
            self.process = Process(
                ["bash", "scripts/run", *args], self.env, log_path=log_dir / f"run-{self.port}.log"
            )

    # -------------------------------------------------------------- supervisorctl

    def ctl_env(self) -> dict[str, str]:
        return {
            **scrubbed_environ(),
            "PROXY_RUN_DIR": str(self.run_dir),
            "PROXY_PYTHON": PYTHON,
            "LISTEN_ADDR": self.env["LISTEN_ADDR"],
        }

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "scripts/ctl", *args],
            cwd=REPO,
            env=self.ctl_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def status(self) -> dict[str, tuple[str, int | None]]:
        """``scripts/ctl status`` as {name: (state, pid)}."""
        result = self.ctl("status", timeout=30)
        states: dict[str, tuple[str, int | None]] = {}
        for line in result.stdout.splitlines():
            match = STATUS_LINE.match(line)
            if match:
                pid = int(match.group(3)) if match.group(3) else None
                states[match.group(1)] = (match.group(2), pid)
                if pid:
                    self.seen_pids.add(pid)
        return states

    def pid(self, name: str) -> int:
        result = self.ctl("pid", name, timeout=30)
        pid = int(result.stdout.strip() or 0)
        if pid:
            self.seen_pids.add(pid)
        return pid

    def running(self, names: list[str]) -> bool:
        states = self.status()
        return all(states.get(name, ("?", None))[0] == "RUNNING" for name in names)

    def wait_running(self, names: list[str], timeout: float = 20.0) -> dict[str, tuple[str, int | None]]:
        def check():
            assert self.process.alive(), f"launcher exited:\n{self.tail()}"
            states = self.status()
            ok = all(states.get(name, ("?", None))[0] == "RUNNING" for name in names)
            return states if ok else None

        return wait_for(check, timeout=timeout, interval=0.1, what=f"{names} RUNNING")

    def ready(self) -> bool:
        try:
            response = requests.get(self.url + "/_proxy/readyz", timeout=2)
        except requests.RequestException:
            return False
        return response.status_code == 200 and response.json().get("tokens", 0) > 0

    def start_all(self, names: list[str]) -> None:
        """Bring every program back (after a test that stopped some) and wait until it serves."""
        if not self.running(names):
            self.ctl("start", "all", timeout=60)
        self.wait_running(names)
        wait_for(self.ready, timeout=15, interval=0.05, what="proxy ready")

    # -------------------------------------------------------------- logs

    def tail(self, chars: int = 6000) -> str:
        return self.process.output()[-chars:]

    def records(self) -> list[dict]:
        return self.process.json_lines()

    def access_lines(self) -> list[dict]:
        return [r for r in self.records() if r.get("logger") == "proxy.access"]

    def access_by_id(self, request_ids, timeout: float = 10.0) -> dict[str, dict]:
        wanted = set(request_ids)

        def find():
            found = {r["request_id"]: r for r in self.access_lines() if r.get("request_id") in wanted}
            return found if len(found) == len(wanted) else None

        return wait_for(find, timeout=timeout, interval=0.1, what=f"access lines of {len(wanted)} requests")

    # -------------------------------------------------------------- teardown

    def stop(self) -> int | None:
        pid_file = self.run_dir / "supervisord.pid"
        with contextlib.suppress(OSError, ValueError):
            self.supervisord_pid = int(pid_file.read_text().strip())
        with contextlib.suppress(Exception):
            self.status()  # remember the current program pids for the safety net below
        rc = self.process.stop(timeout=30)
        # Safety net: supervisord and its programs, by the PIDs this deployment reported.
        supervisord = self.supervisord_pid
        if supervisord and pid_alive(supervisord) and "supervisord" in cmdline(supervisord):
            os.kill(supervisord, signal.SIGTERM)
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not pid_alive(supervisord), timeout=20)
        for pid in self.seen_pids:
            if pid_alive(pid) and any(marker in cmdline(pid) for marker in PROGRAM_MARKERS):
                os.kill(pid, signal.SIGKILL)
        self.save_logs()
        shutil.rmtree(self.root, ignore_errors=True)
        return rc

    def save_logs(self) -> None:
        """Copy the log dir's files next to the launcher's log and register them for the secrets grep."""
        if not self.log_dir.is_dir():
            return
        for path in sorted(self.log_dir.iterdir()):
            if path.is_file():
                target = self._saved_logs / f"{self.port}-{path.name}"
                shutil.copyfile(path, target)
                procs.LOG_FILES.append(target)


def post(url: str, token: str | None, *, fake: str = "json", request_id: str | None = None, **kwargs):
    headers = {"X-Fake": fake, "Connection": "close"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    headers.update(kwargs.pop("headers", {}))
    return requests.post(
        url + "/chat/completions", json={"model": "m"}, headers=headers, timeout=15, **kwargs
    )


def status_of(url: str, token: str) -> int:
    try:
        return post(url, token).status_code
    except requests.RequestException:
        return -1


def raw_request(port: int, request: bytes) -> tuple[bool, str]:
    """One request on a new connection (the server closes it: Connection: close).
    (True, "") when a complete 200 came back, else (False, why)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request)
            chunks = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
    except OSError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    response = b"".join(chunks)
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return False, f"incomplete head: {response[:80]!r}"
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 200 "):
        return False, f"status: {lines[0][:80]!r}"
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length is None or len(body) != length:
        return False, f"body {len(body)} bytes, Content-Length {length}"
    return True, ""


class Load:
    """Small non-streaming requests on new connections from a few threads, until stopped."""

    def __init__(self, port: int, token: str, threads: int = 4) -> None:
        self.port = port
        self.request = (
            f"POST /chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {token}\r\nX-Fake: json;size=200\r\nContent-Type: application/json\r\n"
            f'Connection: close\r\nContent-Length: 13\r\n\r\n{{"model":"m"}}'
        ).encode()
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[tuple[float, str]] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        self.started = self.finished = 0.0

    def _run(self) -> None:
        while not self.stop_event.is_set():
            ok, why = raw_request(self.port, self.request)
            with self.lock:
                if ok:
                    self.ok += 1
                else:
                    self.failures.append((time.monotonic() - self.started, why))

    def start(self) -> None:
        self.started = time.monotonic()
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=30)
        self.finished = time.monotonic()

    @property
    def rate(self) -> float:
        return (self.ok + len(self.failures)) / max(self.finished - self.started, 1e-9)


# ---------------------------------------------------------------------------- fixtures

PROGRAMS = ["syncer", "proxy:proxy_00", "proxy:proxy_01"]


@pytest.fixture(scope="module")
def logs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deploy")


@pytest.fixture(scope="module")
def backend(logs_dir, upstream):
    fake = FakeBackend(logs_dir)
    fake.control.set(rows=[backend_row(CLIENT_TOKEN, 7, upstream.url + "/v1")])
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def deployed(logs_dir, backend):
    deployment = Deployment(logs_dir, {"SERVER_API_URL": backend.url, "TOKEN_FILE_POLL": "0.2"})
    try:
        deployment.wait_running(PROGRAMS, timeout=30)
        wait_for(deployment.ready, timeout=20, interval=0.05, what="proxy ready")
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture
def dep(deployed, backend, upstream) -> Deployment:
    """The module's deployment with every program RUNNING and the backend serving its one row."""
    backend.control.set(rows=[backend_row(CLIENT_TOKEN, 7, upstream.url + "/v1")], mode="ok")
    deployed.start_all(PROGRAMS)
    # Each worker reloads the table on its own poll: only when the token passes on many new
    # connections in a row (spread over both workers by SO_REUSEPORT) is every worker in step.
    streak = []

    def every_worker_serves_the_token() -> bool:
        streak.append(status_of(deployed.url, CLIENT_TOKEN) == 200)
        return len(streak) >= 12 and all(streak[-12:])

    wait_for(every_worker_serves_the_token, timeout=15, interval=0.02, what="all workers serve the token")
    return deployed


# ---------------------------------------------------------------------------- tests


def test_deployment_comes_up(dep, backend, upstream):
    states = dep.status()
    assert {name: state for name, (state, _) in states.items()} == {name: "RUNNING" for name in PROGRAMS}
    assert (dep.run_dir / "supervisor.sock").exists()
    assert (dep.run_dir / "supervisord.pid").exists()

    # The syncer wrote the table file, private to its owner, with the backend's token.
    info = dep.token_file.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    table, _ = tokentable.read(str(dep.token_file))
    assert list(table.tokens) == [CLIENT_TOKEN]
    assert table.tokens[CLIENT_TOKEN].ai_model_api_url == upstream.url + "/v1"
    assert backend.list_calls() >= 1

    # A client token from the backend works through the proxy, with the upstream key swapped in.
    request_id = f"deploy-up-{uuid.uuid4().hex}"
    response = post(dep.url, CLIENT_TOKEN, fake="echo", request_id=request_id)
    assert response.status_code == 200, response.text
    echoed = response.json()
    assert echoed["target"] == "/v1/chat/completions"
    sent = {name.lower(): value for name, value in echoed["headers"]}
    assert sent["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert post(dep.url, "sk-unknown-token-0000000000000000").status_code == 401
    line = dep.access_by_id([request_id])[request_id]
    assert line["status"] == 200
    assert line["pid"] in {pid for _, pid in states.values()}


def settled(url: str) -> dict[str, float]:
    """The counters once two scrapes in a row agree: a request is counted as it finishes, a moment
    after its client has the last byte, so the fixture's own requests may still be landing."""
    readings: list[dict[str, float]] = []

    def still() -> bool:
        readings.append(scrape(url).counters())
        return len(readings) >= 2 and readings[-1] == readings[-2]

    wait_for(still, timeout=10, interval=0.2, what="settled metrics")
    return readings[-1]


def never_lower(before: dict[str, float], now: dict[str, float]) -> list[str]:
    """The counter samples that read lower than before (or vanished)."""
    return [key for key, value in before.items() if now.get(key, -1.0) < value]


def count_requests(url: str, sent: int, base: float) -> dict[str, float]:
    """Wait until ``sent`` more requests are counted, never seeing more; the settled counters."""

    def counted() -> bool:
        seen = total(scrape(url), "requests_total")
        assert seen <= base + sent, (seen, base, sent)
        return seen == base + sent

    wait_for(counted, timeout=10, interval=0.05, what=f"{sent} requests counted")
    return scrape(url).counters()


def test_metrics_of_the_deployment_agree_and_count_every_request(dep):
    base = settled(dep.url)
    # Ten scrapes without traffic, each on a new connection (both workers answer): identical.
    scrapes = [scrape(dep.url) for _ in range(10)]
    assert [s.counters() for s in scrapes] == [base] * 10
    assert all(total(s, "workers") == 2 for s in scrapes)

    sent = 40
    for _ in range(sent):
        assert post(dep.url, CLIENT_TOKEN).status_code == 200
    count_requests(dep.url, sent, total(base, "requests_total"))
    for samples in [scrape(dep.url) for _ in range(10)]:
        assert total(samples, "requests_total") == total(base, "requests_total") + sent
        assert (
            total(samples, "requests_total", status_class="2xx")
            == total(base, "requests_total", status_class="2xx") + sent
        )
        assert (
            total(samples, "request_duration_seconds_count")
            == total(base, "request_duration_seconds_count") + sent
        )
        assert never_lower(base, samples.counters()) == []
        # The syncer's last sync (SYNC_INTERVAL here is 1.2 s) and the table it wrote.
        assert abs(total(samples, "syncer_last_success_timestamp_seconds") - time.time()) < 60
        assert total(samples, "syncer_tokens") == 1
        assert total(samples, "table_tokens") == 1


def test_metrics_never_go_down_when_a_worker_is_killed(dep):
    base = settled(dep.url)
    victim = dep.pid("proxy:proxy_00")
    assert victim and "wsgi.py" in cmdline(victim)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not pid_alive(victim), timeout=5, what="killed worker gone")
    restarted_pid = None
    readings = 0
    deadline = time.monotonic() + 15
    # No traffic: every scrape, while supervisord restarts the worker and after, reads the same.
    while time.monotonic() < deadline:
        assert scrape(dep.url).counters() == base
        readings += 1
        if restarted_pid is None:
            state, pid = dep.status().get("proxy:proxy_00", ("?", None))
            if state == "RUNNING" and pid and pid != victim:
                restarted_pid = pid
                deadline = min(deadline, time.monotonic() + 1.0)
    assert restarted_pid, "proxy:proxy_00 was not restarted"
    print(f"{readings} scrapes while the killed worker was restarted as pid {restarted_pid}")
    # The killed worker left its live gauges behind; the scraping worker drops them.
    wait_for(lambda: total(scrape(dep.url), "workers") == 2, timeout=5, what="two live workers")
    sent = 20
    for _ in range(sent):
        assert post(dep.url, CLIENT_TOKEN).status_code == 200
    after = count_requests(dep.url, sent, total(base, "requests_total"))
    assert never_lower(base, after) == []


def test_metrics_never_go_down_across_a_rolling_restart(dep):
    base = settled(dep.url)
    before = {name: dep.pid(name) for name in ("proxy:proxy_00", "proxy:proxy_01")}
    restart = subprocess.Popen(
        ["bash", "scripts/rolling-restart"],
        cwd=REPO,
        env=dep.ctl_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    previous, sent, failures, readings = base, 0, [], 0
    try:
        # A request and a scrape in turn while the workers restart one after the other.
        while restart.poll() is None:
            try:
                assert post(dep.url, CLIENT_TOKEN).status_code == 200
                sent += 1
            except requests.RequestException as exc:
                failures.append(repr(exc))
            now = scrape(dep.url).counters()
            readings += 1
            assert never_lower(previous, now) == [], never_lower(previous, now)
            previous = now
    finally:
        output = restart.communicate(timeout=60)[0]
    print(f"rolling restart: {sent} requests, {readings} scrapes; failures: {failures[:3]}")
    assert restart.returncode == 0, output
    after = {name: dep.pid(name) for name in before}
    assert all(after[name] != before[name] for name in before), (before, after)
    assert failures == []
    # Every request sent through the restart is counted, by the old workers or the new ones.
    final = count_requests(dep.url, sent, total(base, "requests_total"))
    assert never_lower(base, final) == []
    wait_for(lambda: total(scrape(dep.url), "workers") == 2, timeout=5, what="two live workers")


def test_requests_flow_through_every_worker(dep):
    states = dep.status()
    worker_pids = {states["proxy:proxy_00"][1], states["proxy:proxy_01"][1]}
    assert worker_pids == {dep.pid("proxy:proxy_00"), dep.pid("proxy:proxy_01")}
    assert None not in worker_pids and len(worker_pids) == 2

    request_ids = [f"deploy-spread-{i}-{uuid.uuid4().hex[:12]}" for i in range(60)]
    for request_id in request_ids:
        response = post(dep.url, CLIENT_TOKEN, request_id=request_id)
        assert response.status_code == 200, response.text
    lines = dep.access_by_id(request_ids)
    served_by = {line["pid"] for line in lines.values()}
    counts = {pid: sum(1 for line in lines.values() if line["pid"] == pid) for pid in served_by}
    print(f"requests per worker pid: {counts}")
    assert served_by == worker_pids, (served_by, worker_pids)


def test_rolling_restart_under_load_drops_nothing(dep):
    before = {name: dep.pid(name) for name in ("proxy:proxy_00", "proxy:proxy_01")}
    load = Load(dep.port, CLIENT_TOKEN, threads=4)
    load.start()
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        restart = subprocess.run(
            ["bash", "scripts/rolling-restart"],
            cwd=REPO,
            env=dep.ctl_env(),
            capture_output=True,
            text=True,
            timeout=55,
        )
        restart_s = time.monotonic() - t0
        deadline = load.started + 60
        time.sleep(max(0.0, min(1.0, deadline - time.monotonic())))
    finally:
        load.stop()
    duration = load.finished - load.started
    print(
        f"rolling restart: {restart_s:.2f}s; load {duration:.2f}s, {load.ok} ok, "
        f"{len(load.failures)} failed, {load.rate:.0f} requests/s; first failures: {load.failures[:5]}"
    )
    assert restart.returncode == 0, restart.stdout + restart.stderr
    assert "proxy:proxy_00" in restart.stdout and "proxy:proxy_01" in restart.stdout, restart.stdout
    after = {name: dep.pid(name) for name in before}
    assert all(after[name] and after[name] != before[name] for name in before), (before, after)
    assert dep.running(PROGRAMS)
    assert load.failures == [], f"{len(load.failures)} failed requests during the rolling restart"
    assert load.rate >= 200, f"load reached only {load.rate:.0f} requests/s"


def test_killed_worker_is_restarted_while_the_other_serves(dep):
    victim, survivor = dep.pid("proxy:proxy_00"), dep.pid("proxy:proxy_01")
    assert victim and survivor and victim != survivor
    assert "wsgi.py" in cmdline(victim)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: not pid_alive(victim), timeout=5, what="killed worker gone")

    # No request was in flight at the kill instant; from now on every request must succeed, on
    # new connections, sent one after another from a thread while supervisord restarts the worker.
    sent: list[tuple[float, str, object]] = []  # (seconds after the kill, request id, status or error)
    done = threading.Event()

    def client() -> None:
        while not done.is_set():
            request_id = f"deploy-kill-{len(sent)}-{uuid.uuid4().hex[:12]}"
            at = time.monotonic() - killed_at
            try:
                outcome: object = post(dep.url, CLIENT_TOKEN, request_id=request_id).status_code
            except requests.RequestException as exc:
                outcome = repr(exc)
            sent.append((at, request_id, outcome))
            time.sleep(0.01)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:

        def restarted():
            state, pid = dep.status().get("proxy:proxy_00", ("?", None))
            return pid if state == "RUNNING" and pid and pid != victim else None

        restarted_pid = wait_for(restarted, timeout=10, interval=0.05, what="proxy:proxy_00 RUNNING again")
        restart_s = time.monotonic() - killed_at
        time.sleep(1.0)  # and keep serving with both workers
    finally:
        done.set()
        thread.join(timeout=30)
    failed = [(round(at, 3), outcome) for at, _, outcome in sent if outcome != 200]
    lines = dep.access_by_id([request_id for _, request_id, outcome in sent if outcome == 200])
    while_down = [rid for at, rid, outcome in sent if at < restart_s and outcome == 200]
    by_survivor = [rid for rid in while_down if lines[rid]["pid"] == survivor]
    print(
        f"worker restarted as pid {restarted_pid}, RUNNING after {restart_s:.2f}s; {len(sent)} requests, "
        f"{len(while_down)} before it was RUNNING ({len(by_survivor)} by the survivor); failed: {failed[:5]}"
    )
    assert failed == [], f"{len(failed)} of {len(sent)} requests failed after the kill: {failed[:10]}"
    assert restart_s <= 5.0
    assert dep.pid("proxy:proxy_01") == survivor
    assert len(by_survivor) >= 5, "the surviving worker did not keep serving"
    assert {line["pid"] for line in lines.values()} <= {survivor, restarted_pid}


def test_killed_syncer_is_restarted_and_syncs_resume(dep, backend, upstream):
    syncer = dep.pid("syncer")
    assert syncer and "syncer" in cmdline(syncer)
    os.kill(syncer, signal.SIGKILL)
    wait_for(lambda: not pid_alive(syncer), timeout=5, what="killed syncer gone")

    def restarted():
        state, pid = dep.status().get("syncer", ("?", None))
        return pid if state == "RUNNING" and pid and pid != syncer else None

    new_pid = wait_for(restarted, timeout=10, interval=0.1, what="syncer restarted")
    assert "syncer" in cmdline(new_pid)

    # The table file is intact and still private.
    table, info = tokentable.read(str(dep.token_file))
    assert CLIENT_TOKEN in table.tokens
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert not [p for p in dep.token_file.parent.iterdir() if p.name != dep.token_file.name]

    api_url = upstream.url + "/v1"
    try:
        # Syncs resume: a token added at the backend works through the proxy within ~3 s.
        backend.control.set(
            rows=[
                backend_row(CLIENT_TOKEN, 7, api_url),
                backend_row(OTHER_CLIENT_TOKEN, 8, api_url, OTHER_UPSTREAM_KEY, ai_model_id=2),
            ]
        )
        changed = time.monotonic()
        wait_for(
            lambda: status_of(dep.url, OTHER_CLIENT_TOKEN) == 200, timeout=3, interval=0.05, what="new token"
        )
        added_s = time.monotonic() - changed

        # A token disabled at the backend is refused within ~3 s.
        backend.control.set(
            rows=[
                backend_row(CLIENT_TOKEN, 7, api_url, token_status=0),
                backend_row(OTHER_CLIENT_TOKEN, 8, api_url, OTHER_UPSTREAM_KEY, ai_model_id=2),
            ]
        )
        changed = time.monotonic()
        wait_for(
            lambda: status_of(dep.url, CLIENT_TOKEN) == 401, timeout=3, interval=0.05, what="token disabled"
        )
        disabled_s = time.monotonic() - changed
        print(f"new token served after {added_s:.2f}s, disabled token refused after {disabled_s:.2f}s")
        assert status_of(dep.url, OTHER_CLIENT_TOKEN) == 200
        table, _ = tokentable.read(str(dep.token_file))
        assert sorted(table.tokens) == [OTHER_CLIENT_TOKEN]
    finally:
        backend.control.set(rows=[backend_row(CLIENT_TOKEN, 7, api_url)])
    wait_for(lambda: status_of(dep.url, CLIENT_TOKEN) == 200, timeout=5, interval=0.05, what="token back")


def test_stop_waits_for_streams_in_flight(dep):
    workers = {dep.pid("proxy:proxy_00"), dep.pid("proxy:proxy_01")}
    results: dict[str, dict] = {}
    first_event = {i: threading.Event() for i in range(3)}

    def stream(i: int, request_id: str) -> None:
        record: dict = {"lines": [], "error": None}
        results[request_id] = record
        try:
            with requests.post(
                dep.url + "/chat/completions",
                json={"model": "m", "stream": True},
                headers={
                    "Authorization": f"Bearer {CLIENT_TOKEN}",
                    "X-Fake": "sse;events=20;interval=0.1",
                    "X-Request-ID": request_id,
                },
                stream=True,
                timeout=20,
            ) as response:
                record["status"] = response.status_code
                for line in response.iter_lines(decode_unicode=True):
                    if line:
                        record["lines"].append(line)
                        first_event[i].set()
        except Exception as exc:
            record["error"] = repr(exc)
        finally:
            record["ended"] = time.monotonic()
            first_event[i].set()

    request_ids = [f"deploy-drain-{i}-{uuid.uuid4().hex[:12]}" for i in range(3)]
    threads = [
        threading.Thread(target=stream, args=(i, rid), daemon=True) for i, rid in enumerate(request_ids)
    ]
    for thread in threads:
        thread.start()
    for event in first_event.values():
        assert event.wait(10), "a stream did not start"
    stop_started = time.monotonic()
    stop = dep.ctl("stop", "proxy:*", timeout=60)
    stop_returned = time.monotonic()
    for thread in threads:
        thread.join(timeout=30)

    print(f"stop took {stop_returned - stop_started:.2f}s: {stop.stdout.strip()!r}")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "proxy:proxy_00: stopped" in stop.stdout and "proxy:proxy_01: stopped" in stop.stdout
    for request_id, record in results.items():
        assert record["error"] is None, (request_id, record["error"], record["lines"][-3:])
        assert record["status"] == 200
        events = parse_sse(record["lines"])
        assert events[-1] == "[DONE]", (request_id, events[-3:])
        chunks = [json.loads(event) for event in events[:-1]]
        assert [chunk["i"] for chunk in chunks] == list(range(20)), request_id
        # Every stream ended before the stop command returned (the workers drained them first).
        assert record["ended"] <= stop_returned, request_id
    states = dep.status()
    assert states["proxy:proxy_00"][0] == "STOPPED" and states["proxy:proxy_01"][0] == "STOPPED"
    assert all(not pid_alive(pid) for pid in workers)
    lines = dep.access_by_id(request_ids)
    assert all(line["status"] == 200 and line["end_reason"] == "complete" for line in lines.values())
    stopped = [r for r in dep.records() if r.get("event") == "stopped" and r.get("pid") in workers]
    assert len(stopped) == 2 and all(r["drained"] is True for r in stopped), stopped


# ---------------------------------------------------------------------------- SIGHUP: its own deployment


@pytest.fixture(scope="module")
def slow_sync(logs_dir, upstream):
    """A deployment whose syncer would wait 10 minutes between syncs."""
    fake = FakeBackend(logs_dir)
    fake.control.set(rows=[backend_row(CLIENT_TOKEN, 7, upstream.url + "/v1")])
    deployment = Deployment(
        logs_dir,
        {"SERVER_API_URL": fake.url, "SYNC_INTERVAL": "10", "PROXY_WORKERS": "1", "TOKEN_FILE_POLL": "0.2"},
    )
    try:
        deployment.wait_running(["syncer", "proxy:proxy_00"], timeout=30)
        wait_for(deployment.ready, timeout=20, interval=0.05, what="proxy ready")
        yield deployment, fake
    finally:
        deployment.stop()
        fake.stop()


def test_sighup_to_the_syncer_syncs_now(slow_sync, upstream):
    deployment, fake = slow_sync
    syncer = deployment.pid("syncer")
    time.sleep(1.5)  # the start-up sync is long done; the next one would be in 10 minutes
    before = fake.list_calls()
    assert before >= 1
    assert status_of(deployment.url, OTHER_CLIENT_TOKEN) == 401
    api_url = upstream.url + "/v1"
    fake.control.set(
        rows=[
            backend_row(CLIENT_TOKEN, 7, api_url),
            backend_row(OTHER_CLIENT_TOKEN, 8, api_url, ai_model_id=2),
        ]
    )
    assert fake.list_calls() == before

    result = deployment.ctl("signal", "HUP", "syncer")
    signalled = time.monotonic()
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: fake.list_calls() > before, timeout=1.0, interval=0.02, what="a sync after SIGHUP")
    print(f"sync after SIGHUP within {time.monotonic() - signalled:.3f}s")
    wait_for(
        lambda: status_of(deployment.url, OTHER_CLIENT_TOKEN) == 200,
        timeout=3,
        interval=0.05,
        what="new token",
    )
    assert deployment.pid("syncer") == syncer  # SIGHUP syncs; it does not restart the syncer
    syncs = [r for r in deployment.records() if r.get("message") == "sync" and r.get("pid") == syncer]
    assert syncs[-1]["trigger"] == "signal" and syncs[-1]["outcome"] == "ok", syncs[-1]
