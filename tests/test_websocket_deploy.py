"""WebSocket sessions through a rolling restart of the real deployment (issue 19): scripts/run
(supervisord with supervisord.conf, two workers on one port, the syncer reading the fake backend),
the fake WebSocket upstream, and scripts/rolling-restart. Each worker drains: its sessions keep
working for GRACEFUL_TIMEOUT, then both sides get a close frame 1001 and the worker exits; no hang,
and every session has its access line."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.support.procs import REPO, wait_for
from tests.support.rawhttp import new_id
from tests.support.tables import CLIENT_TOKEN, UPSTREAM_KEY
from tests.support.wsfake import start_ws_upstream
from tests.test_deploy import PROGRAMS, Deployment, FakeBackend, backend_row

pytestmark = pytest.mark.deploy

GRACE = 1.5


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("ws-deploy")
    ws_up = start_ws_upstream(log_dir, UPSTREAM_KEY)
    backend = FakeBackend(log_dir)
    backend.control.set(rows=[backend_row(CLIENT_TOKEN, 7, ws_up.url + "/v1")])
    dep = Deployment(
        log_dir, {"SERVER_API_URL": backend.url, "TOKEN_FILE_POLL": "0.2", "GRACEFUL_TIMEOUT": str(GRACE)}
    )
    try:
        dep.wait_running(PROGRAMS, timeout=30)
        wait_for(dep.ready, timeout=20, interval=0.05, what="proxy ready")
        yield dep, ws_up
    finally:
        dep.stop()
        backend.stop()
        ws_up.process.stop()


def open_session(port: int, rid: str):
    ws = connect(
        f"ws://127.0.0.1:{port}/realtime?model=m",
        additional_headers={"Authorization": f"Bearer {CLIENT_TOKEN}", "X-Request-ID": rid},
        open_timeout=5,
        close_timeout=2,
    )
    assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
    return ws


def test_rolling_restart_closes_sessions_with_1001_after_the_grace(deployment):
    dep, ws_up = deployment
    # Both workers must hold the table before sessions are spread over them.
    wait_for(lambda: all(_opens(dep.port) for _ in range(8)), timeout=15, interval=0.1, what="every worker")
    rids = [new_id("roll") for _ in range(6)]
    sessions = {rid: open_session(dep.port, rid) for rid in rids}
    started = time.monotonic()
    restart = subprocess.Popen(
        ["bash", "scripts/rolling-restart"],
        cwd=REPO,
        env=dep.ctl_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(0.5)  # the first worker is draining: its sessions still relay
        for rid, ws in sessions.items():
            ws.send(f"during the drain {rid}")
            assert ws.recv(timeout=3) == f"during the drain {rid}"
        codes = {rid: _close_code(ws, timeout=20) for rid, ws in sessions.items()}
        output, _ = restart.communicate(timeout=60)
    finally:
        if restart.poll() is None:
            restart.kill()
    elapsed = time.monotonic() - started
    assert restart.returncode == 0, output
    assert codes == dict.fromkeys(rids, 1001), codes
    assert elapsed < 30, elapsed
    lines = dep.access_by_id(rids, timeout=10)
    assert {rid: (line["status"], line["end_reason"]) for rid, line in lines.items()} == dict.fromkeys(
        rids, (101, "shutdown")
    )
    for rid in rids:
        assert ws_up.record(rid, closed=True)["close_code"] == 1001
    # The restarted workers serve new sessions.
    with open_session(dep.port, new_id("after")) as ws:
        ws.send("after the restart")
        assert ws.recv(timeout=5) == "after the restart"


def _opens(port: int) -> bool:
    try:
        with open_session(port, new_id("probe")):
            return True
    except Exception:
        return False


def _close_code(ws, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ws.recv(timeout=max(0.01, deadline - time.monotonic()))
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None
    except TimeoutError:
        return None
    return None
