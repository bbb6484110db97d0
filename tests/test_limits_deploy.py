"""The per-token limits' deployment side (issue 14): scripts/run starts a local redis-server under
the real supervisord when a default limit is set and no LIMITS_REDIS_URL is given, and hands the
workers its socket; otherwise no Redis program exists. (The limits on the request path are
tested where they are wired.)
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import redis

from tests import test_deploy
from tests.support.procs import REPO, wait_for
from tests.test_deploy import PROGRAMS, Deployment

pytestmark = pytest.mark.deploy


@pytest.fixture(scope="module")
def logs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("limits-deploy")


# test_deploy's module-scoped fake backend, here over this module's logs_dir
backend = test_deploy.backend


@pytest.fixture
def deploy(logs_dir, backend):
    started: list[Deployment] = []

    def start(env: dict[str, str]) -> Deployment:
        deployment = Deployment(logs_dir, {"SERVER_API_URL": backend.url, "TOKEN_FILE_POLL": "0.2", **env})
        started.append(deployment)
        return deployment

    yield start
    for deployment in started:
        deployment.stop()


def worker_environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as handle:
        items = handle.read().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in items if b"=" in item)


def test_a_default_limit_starts_a_local_redis_on_a_unix_socket_only(deploy):
    dep = deploy({"TOKEN_MAX_CONCURRENCY": "2"})
    states = dep.wait_running(["redis", *PROGRAMS], timeout=30)
    wait_for(dep.ready, timeout=20, interval=0.05, what="proxy ready")
    sock = dep.run_dir / "redis.sock"
    mode = os.stat(sock).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o700
    client = redis.Redis(unix_socket_path=str(sock), socket_timeout=5, decode_responses=True)
    try:
        assert client.config_get("port") == {"port": "0"}  # no TCP port
        assert client.config_get("save") == {"save": ""}  # no snapshots
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("dir") == {"dir": str(dep.run_dir)}
    finally:
        client.close()
    for name in ("proxy:proxy_00", "proxy:proxy_01"):
        environ = worker_environ(states[name][1])
        assert environ["LIMITS_REDIS_URL"] == f"unix://{dep.run_dir}/redis.sock"
        assert environ["TOKEN_MAX_CONCURRENCY"] == "2"
    # In the foreground, its log is on the launcher's output like every program's.
    assert "ready to accept connections" in dep.process.output()
    redis_pid = states["redis"][1]
    dep.stop()
    assert (
        not os.path.exists(f"/proc/{redis_pid}")
        or "redis" not in Path(f"/proc/{redis_pid}/cmdline").read_text()
    )


def test_no_limit_means_no_redis_program(deploy):
    dep = deploy({"TOKEN_RPM": "0"})
    states = dep.wait_running(PROGRAMS, timeout=30)
    assert "redis" not in states
    environ = worker_environ(states["proxy:proxy_00"][1])
    assert "LIMITS_REDIS_URL" not in environ
    assert not (dep.run_dir / "redis.sock").exists()


def test_proxy_local_redis_true_starts_it_for_limits_set_only_in_rows(deploy):
    dep = deploy({"PROXY_LOCAL_REDIS": "true"})
    states = dep.wait_running(["redis", *PROGRAMS], timeout=30)
    environ = worker_environ(states["proxy:proxy_00"][1])
    assert environ["LIMITS_REDIS_URL"] == f"unix://{dep.run_dir}/redis.sock"
    assert "TOKEN_MAX_CONCURRENCY" not in environ


def test_a_given_limits_redis_url_is_used_and_no_local_redis_starts(deploy, redis_server):
    dep = deploy({"TOKEN_RPM": "5", "LIMITS_REDIS_URL": redis_server.url})
    states = dep.wait_running(PROGRAMS, timeout=30)
    wait_for(dep.ready, timeout=20, interval=0.05, what="proxy ready")
    assert "redis" not in states
    assert worker_environ(states["proxy:proxy_01"][1])["LIMITS_REDIS_URL"] == redis_server.url


def launcher(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    base = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PROXY_RUN_DIR": str(tmp_path / "run"),
        "PROXY_LOG_DIR": str(tmp_path / "log"),
        "TOKEN_FILE": str(tmp_path / "var" / "tokens.json"),
        "PROXY_ENV_FILE": "/nonexistent",
        "SERVER_API_URL": "http://127.0.0.1:9",
        "HOME": str(tmp_path),
    }
    return subprocess.run(
        ["bash", "scripts/run"], cwd=REPO, env={**base, **env}, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TOKEN_RPM": "5", "PROXY_REDIS_SERVER": "/nonexistent/redis-server"}, "install"),
        ({"PROXY_LOCAL_REDIS": "maybe"}, "PROXY_LOCAL_REDIS='maybe'"),
        ({"PROXY_LOCAL_REDIS": "true", "LIMITS_REDIS_URL": "unix:///x.sock"}, "both set"),
    ],
)
def test_the_launcher_refuses_a_limit_it_cannot_serve(tmp_path, env, message):
    result = launcher(env, tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "run" / "supervisord.pid").exists()
