"""A real redis-server process for the limiter tests: unix socket only (--port 0), no persistence.

The socket lives in a short directory under /tmp (AF_UNIX paths are limited to ~107 bytes). The
server is stopped by its PID only, and can be stopped and started again on the same socket (an
outage, then a Redis that comes back empty, as after a restart without persistence).
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

from tests.support.procs import Process, wait_for

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def socket_answers(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, log_dir: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rd", dir="/tmp"))
        self.socket = self.dir / "r.sock"
        self.url = f"unix://{self.socket}"
        self.log_dir = log_dir
        self.process: Process | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.process is None or not self.process.alive()
        self.starts += 1
        command = [
            REDIS_SERVER,
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
        ]  # fmt: skip
        self.process = Process(command, env={}, log_path=self.log_dir / f"redis-{self.starts}.log")
        wait_for(
            lambda: socket_answers(self.socket) or not self.process.alive(), timeout=15, what="redis-server"
        )
        assert self.process.alive(), self.process.output()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
