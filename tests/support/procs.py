"""Start and stop the real processes the tests talk to (proxy, syncer, fakes) on 127.0.0.1.

Every process's combined stdout/stderr goes to a log file under the test's tmp dir and is
registered in LOG_FILES, so a session-wide check can grep every line any process logged.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
LOG_FILES: list[Path] = []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "",
    sleep: Callable[[float], object] = time.sleep,
):
    """Poll until predicate() is truthy; return its value or raise AssertionError on timeout.

    ``sleep`` is how to wait between polls (gevent.sleep, to let greenlets run meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def json_records(output: str) -> list[dict]:
    """Every line of ``output`` that is a JSON object, parsed."""
    records = []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    return records


class Process:
    """A child process started by a test; stopped by PID only."""

    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Path, cwd: Path = REPO):
        self.args = args
        self.log_path = log_path
        LOG_FILES.append(log_path)
        self._log = open(log_path, "ab")  # noqa: SIM115 - open for the life of the process
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
        full_env.update({"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"})
        full_env.update(env)
        self.popen = subprocess.Popen(
            args, cwd=cwd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
        self._log.close()
        return self.popen.returncode

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def json_lines(self) -> list[dict]:
        """Every line of the process's output that is a JSON object."""
        return json_records(self.output())

    def wait_for_log(self, predicate: Callable[[dict], bool], timeout: float = 10.0, what: str = "") -> dict:
        def find():
            for record in self.json_lines():
                if predicate(record):
                    return record
            return None

        return wait_for(find, timeout=timeout, what=what or "a log line")


def start_up_failure(tmp_path: Path, env: Mapping[str, str], log_name: str) -> tuple[int, str]:
    """Start a proxy worker (wsgi.py) that is expected to refuse to start; its exit code and log."""
    port = free_port()
    env = {
        "LISTEN_ADDR": f"127.0.0.1:{port}",
        "TOKEN_FILE": str(tmp_path / "tokens.json"),
        "HOME": str(tmp_path),
        **env,
    }
    process = Process([PYTHON, str(REPO / "wsgi.py")], env=env, log_path=tmp_path / log_name)
    try:
        code = process.wait(timeout=15)
    finally:
        process.stop()
    return code, process.log_path.read_text(errors="replace")
