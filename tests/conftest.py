"""Live-server fixtures: fake upstreams (plain and HTTPS, with a private test CA), a fake egress
proxy, and the proxy started as deployed (python wsgi.py)."""

from __future__ import annotations

import json
import os
import signal
import ssl
import sys
import urllib.request
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.procs import PYTHON, Process, free_port, port_open, wait_for  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.secrets import log_leaks  # noqa: E402
from tests.support.tables import CLIENT_TOKEN, UPSTREAM_KEY, row, write_table  # noqa: E402
from tests.support.tls import LocalCA, ServerCert  # noqa: E402


class FakeUpstream:
    """The fake upstream process (tests/fakes/upstream.py) and its control API.

    Over TLS (``cert`` given) the control API is reached with ``verify=ca_file``; a fake serving a
    deliberately bad certificate (``verify_control=False``) is controlled without verification.
    """

    def __init__(
        self, process: Process, port: int, ca_file: Path | None = None, verify_control: bool = True
    ) -> None:
        self.process = process
        self.port = port
        self.tls = ca_file is not None or not verify_control
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        self.verify: str | bool = str(ca_file) if ca_file is not None else True
        self._insecure: ssl.SSLContext | None = None
        if not verify_control:
            self._insecure = ssl.create_default_context()
            self._insecure.check_hostname = False
            self._insecure.verify_mode = ssl.CERT_NONE

    def _control(self, method: str, path: str):
        if self._insecure is None:
            response = requests.request(method, self.url + path, timeout=5, verify=self.verify)
            response.raise_for_status()
            return response.json()
        request = urllib.request.Request(self.url + path, method=method)
        with urllib.request.urlopen(request, timeout=5, context=self._insecure) as response:
            return json.loads(response.read())

    def requests(self) -> list[dict]:
        return self._control("GET", "/_fake/requests")

    def connections(self) -> list[dict]:
        return self._control("GET", "/_fake/connections")

    def tls_failures(self) -> list[dict]:
        """Failed TLS handshakes seen by the fake: [{t, peer_port, error}]."""
        return self._control("GET", "/_fake/tls_failures")

    def clear(self) -> None:
        self._control("DELETE", "/_fake/requests")

    def records_of(self, request_id: str) -> list[dict]:
        """The requests the fake received with this X-Request-ID (how a test finds its own)."""
        return [
            record
            for record in self.requests()
            if any(n.lower() == "x-request-id" and v == request_id for n, v in record["headers"])
        ]

    def connection(self, conn_id: int) -> dict | None:
        return next((c for c in self.connections() if c["conn_id"] == conn_id), None)

    def closed_connection_of(self, request_id: str, timeout: float) -> dict:
        """The fake's record of the connection that carried ``request_id``, once it is closed."""

        def find():
            records = self.records_of(request_id)
            if not records:
                return None
            conn = self.connection(records[0]["conn_id"])
            return conn if conn is not None and conn["closed"] is not None else None

        return wait_for(
            find, timeout=timeout, interval=0.02, what=f"upstream connection of {request_id} closed"
        )


def start_ready_fake(command: list[str], port: int, log_path: Path) -> Process:
    """Start a fake server (tests/fakes/) and wait for its ``ready <port>`` line."""
    process = Process(command, env={}, log_path=log_path)
    try:
        wait_for(lambda: f"ready {port}" in process.output() or not process.alive(), timeout=15)
    except AssertionError:
        process.stop()
        raise
    assert process.alive(), process.output()
    return process


def start_fake_upstream(
    log_dir: Path, cert: ServerCert | None = None, ca_file: Path | None = None, verify_control: bool = True
) -> FakeUpstream:
    """A fake upstream; with ``cert`` it serves HTTPS with that certificate."""
    port = free_port()
    command = [PYTHON, "-m", "tests.fakes.upstream", "--port", str(port)]
    if cert is not None:
        command += ["--tls-cert", str(cert.cert_file), "--tls-key", str(cert.key_file)]
    process = start_ready_fake(command, port, log_dir / f"upstream-{port}.log")
    if cert is None:
        return FakeUpstream(process, port)
    return FakeUpstream(process, port, ca_file, verify_control)


class FakeConnectProxy:
    """The fake egress proxy (tests/fakes/connect_proxy.py) and its log."""

    def __init__(self, process: Process, port: int) -> None:
        self.process = process
        self.port = port
        self.address = f"127.0.0.1:{port}"

    def url(self, user: str | None = None, password: str | None = None) -> str:
        """The UPSTREAM_PROXY value for this proxy, with these credentials."""
        return f"http://{user}:{password}@{self.address}" if user is not None else f"http://{self.address}"

    def log(self) -> list[dict]:
        return requests.get(f"http://{self.address}/_fake/log", timeout=5).json()

    def clear(self) -> None:
        requests.delete(f"http://{self.address}/_fake/log", timeout=5).raise_for_status()


def start_connect_proxy(
    log_dir: Path, user: str | None = None, password: str | None = None
) -> FakeConnectProxy:
    port = free_port()
    command = [PYTHON, "-m", "tests.fakes.connect_proxy", "--port", str(port)]
    if user is not None:
        command += ["--user", user, "--password", password or ""]
    process = start_ready_fake(command, port, log_dir / f"connect-proxy-{port}.log")
    return FakeConnectProxy(process, port)


@pytest.fixture(scope="session")
def upstream(tmp_path_factory) -> FakeUpstream:
    fake = start_fake_upstream(tmp_path_factory.mktemp("upstream"))
    yield fake
    fake.process.stop()


@pytest.fixture(scope="session")
def tls_ca(tmp_path_factory) -> LocalCA:
    """A private CA made for this session (trustme); ``tls_ca.ca_file`` is ca.pem."""
    return LocalCA(tmp_path_factory.mktemp("tls-ca"))


@pytest.fixture(scope="session")
def https_upstream_factory(tmp_path_factory, tls_ca):
    """Start extra HTTPS fake upstreams: ``factory(cert, verify_control=True)``; stopped at session end.

    ``verify_control=False`` for a fake whose certificate is bad on purpose (its control API is
    then reached without verification)."""
    started: list[FakeUpstream] = []
    log_dir = tmp_path_factory.mktemp("https-upstreams")

    def factory(cert: ServerCert, verify_control: bool = True) -> FakeUpstream:
        fake = start_fake_upstream(log_dir, cert, tls_ca.ca_file, verify_control)
        started.append(fake)
        return fake

    yield factory
    for fake in started:
        fake.process.stop()


@pytest.fixture(scope="session")
def https_upstream(https_upstream_factory, tls_ca) -> FakeUpstream:
    """A fake upstream over HTTPS with a certificate for 127.0.0.1 and localhost from ``tls_ca``."""
    return https_upstream_factory(tls_ca.server_cert(name="https-upstream"))


class Proxy:
    """A proxy worker process (python wsgi.py) on its own port, with its token file."""

    def __init__(self, process: Process, port: int, token_file: Path) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.token_file = token_file

    def access_lines(self) -> list[dict]:
        return [r for r in self.process.json_lines() if r.get("logger") == "proxy.access"]

    def access_line(self, request_id: str, timeout: float = 5.0) -> dict:
        return self.process.wait_for_log(
            lambda r: r.get("logger") == "proxy.access" and r.get("request_id") == request_id,
            timeout=timeout,
            what=f"access line of {request_id}",
        )

    def stop(self, timeout: float = 15.0) -> int | None:
        return self.process.stop(timeout)

    def terminate(self) -> None:
        self.process.signal(signal.SIGTERM)


def start_proxy(tmp_path: Path, env: dict[str, str] | None = None, *, wait_ready: bool = True) -> Proxy:
    port = free_port()
    token_file = Path((env or {}).get("TOKEN_FILE", tmp_path / "tokens.json"))
    full_env = {
        "LISTEN_ADDR": f"127.0.0.1:{port}",
        "TOKEN_FILE": str(token_file),
        "TOKEN_FILE_POLL": "0.1",
        "LOG_LEVEL": "info",
        "GRACEFUL_TIMEOUT": "10",
        "HOME": str(tmp_path),  # a ~/.netrc of the machine must not matter
    }
    full_env.update(env or {})
    process = Process([PYTHON, str(REPO / "wsgi.py")], env=full_env, log_path=tmp_path / f"proxy-{port}.log")
    try:
        wait_for(lambda: port_open(port) or not process.alive(), timeout=20, what="proxy port")
    except AssertionError:
        process.stop()
        raise
    assert process.alive(), process.output()
    proxy = Proxy(process, port, token_file)
    if wait_ready and full_env.get("ENABLE_TOKEN_ROUTING", "true") == "true" and token_file.exists():
        wait_for(lambda: requests.get(proxy.url + "/_proxy/readyz", timeout=5).status_code == 200, timeout=10)
    return proxy


@pytest.fixture
def backend(tmp_path):
    """The fake token backend (tests/fakes/backend.py) on its own port, for one test."""
    from tests.fakes.backend import FakeBackendControl

    port = free_port()
    process = Process(
        [PYTHON, "-m", "tests.fakes.backend", "--port", str(port)], {}, tmp_path / "backend.log"
    )
    try:
        wait_for(lambda: port_open(port), timeout=15, what="the fake backend to listen")
        yield FakeBackendControl(port)
    finally:
        process.stop()


def module_proxy(tmp_path_factory, name: str, rows: dict[str, dict], env: dict[str, str] | None = None):
    """A proxy serving a whole module, for scope="module" fixtures: ``yield from module_proxy(...)``."""
    tmp = tmp_path_factory.mktemp(name)
    write_table(tmp / "tokens.json", rows)
    proxy = start_proxy(tmp, env)
    yield proxy
    proxy.stop()


@pytest.fixture
def default_rows(upstream) -> dict[str, dict]:
    return {CLIENT_TOKEN: row(upstream.url + "/v1", UPSTREAM_KEY, token_id=7, ai_model_name="FakeModel")}


@pytest.fixture
def proxy_factory(tmp_path):
    started: list[Proxy] = []

    def factory(env: dict[str, str] | None = None, rows: dict[str, dict] | None = None, **kwargs) -> Proxy:
        token_file = Path((env or {}).get("TOKEN_FILE", tmp_path / "tokens.json"))
        if rows is not None:
            write_table(token_file, rows)
        proxy = start_proxy(tmp_path, env, **kwargs)
        started.append(proxy)
        return proxy

    yield factory
    for proxy in started:
        proxy.stop()


@pytest.fixture
def proxy(proxy_factory, default_rows) -> Proxy:
    """A token-routing proxy whose table maps CLIENT_TOKEN to the fake upstream's /v1."""
    return proxy_factory(rows=default_rows)


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {CLIENT_TOKEN}"}


os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a unix socket (no TCP port, no persistence), stopped by PID."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.close()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus) -> None:
    """The run-wide secrets grep, over every log of this session: a leak fails the run."""
    leaks = log_leaks()
    if not leaks:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        write = reporter.write_line
    else:

        def write(line: str, **_markup) -> None:
            print(line, file=sys.stderr)

    write(f"SECRETS LEAKED into the logs of this run ({len(leaks)}):", red=True, bold=True)
    for leak in leaks:
        write("  " + leak)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
