"""Start and stop the benchmark's processes on 127.0.0.1, and only stop what was started here (by PID).

Peers, in the order every run visits them:
  a  direct        the fake upstream hit directly: the limit
  b  Go reference  bench/peers/refproxy.go (httputil.ReverseProxy, FlushInterval -1)
  c  proxy, 1 w.   ``python wsgi.py`` (c+: the same with per-token limits on, scenario small-limits)
  d  proxy, 2 w.   ``bash scripts/run`` (supervisord, PROXY_WORKERS=2, syncer + fake backend)
  e  deployed      ``bash scripts/run -d`` (supervisord daemonized writing the log files, 1 worker,
                   syncer): the shape users run, the whole tree on the proxy's CPU
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from bench import procstat
from bench.tables import BENCH_TOKEN, Tables
from bench.tlsca import TlsFiles
from bench.tools import REPO, Layout, Toolbox, say

PYTHON = (
    str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
)
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child before exec: SIGTERM when the harness dies
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:
        pass


def base_env(**extra: str) -> dict[str, str]:
    """A clean environment: nothing from the caller's shell changes the proxy's settings."""
    env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG", "LC_ALL", "TZ") if name in os.environ}
    env.update({"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    env.update(extra)
    return env


def request(
    port: int,
    method: str,
    path: str,
    token: str | None = None,
    body: bytes | None = None,
    timeout: float = 2.0,
    ca: Path | None = None,
) -> int:
    """One request on a new connection (HTTPS trusting ``ca`` when given); the status, or 0 when it
    could not be made."""
    return exchange(port, method, path, token, body, timeout, ca)[0]


def exchange(
    port: int,
    method: str,
    path: str,
    token: str | None = None,
    body: bytes | None = None,
    timeout: float = 2.0,
    ca: Path | None = None,
) -> tuple[int, dict[str, str]]:
    """``request``, also giving the response's headers (names in lower case; {} when none came)."""
    if ca is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    else:
        context = ssl.create_default_context(cafile=str(ca))
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status, {name.lower(): value for name, value in response.getheaders()}
    except (OSError, http.client.HTTPException):
        return 0, {}
    finally:
        conn.close()


CHAT_BODY = b'{"model":"bench-model","messages":[{"role":"user","content":"Say something."}]}'


class Proc:
    """A child process; its stdout and stderr go to a log file (never an undrained pipe)."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, cwd: Path = REPO) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - open for the life of the process
        self.popen = subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0, also: list[int] | None = None) -> None:
        """SIGTERM, wait; SIGKILL this PID (and the listed descendants) if it does not exit."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                say(f"  {self.args[0]} (pid {self.pid}) ignored SIGTERM for {timeout}s: SIGKILL")
                for pid in [self.pid, *(also or [])]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.popen.wait(timeout=5)
        self._log.close()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_until(predicate, timeout: float, what: str, proc: Proc | None = None, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and not proc.alive():
            raise RuntimeError(
                f"{what}: the process exited ({proc.popen.returncode}); log:\n{proc.log_tail()}"
            )
        if time.monotonic() > deadline:
            tail = f"; log:\n{proc.log_tail()}" if proc else ""
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}{tail}")
        time.sleep(interval)


# ---------------------------------------------------------------------------- upstream


class Upstream:
    """The fake upstream: bench/peers/upstream.go, or tests/fakes/upstream.py without Go.

    With ``tls``: the Go upstream over HTTPS (HTTP/1.1), closing connections idle for
    ``IDLE_TIMEOUT_TLS``, so that every run of an HTTPS scenario (runs are further apart than
    that) starts with no pooled upstream connection: each run pays its own TLS handshakes. The same
    process also serves plain HTTP on ``plain_port``: "direct" in the HTTPS scenarios."""

    IDLE_TIMEOUT_TLS = 1.0  # seconds
    # Its own safety stop (it also exits when the harness is gone). Its default, 30 minutes, is
    # about what `all --ladder-tls` takes on a 2-core machine: the upstream must outlive the run.
    MAX_LIFE_S = 4 * 3600

    def __init__(self, box: Toolbox, layout: Layout, workdir: Path, tls: TlsFiles | None = None) -> None:
        self.port = free_port()
        self.plain_port = self.port  # HTTPS: the same process also serves plain HTTP on its own port
        self.go = box.have_go
        self.tls = tls
        prefix = layout.prefix(layout.load)
        if tls is not None and not self.go:
            raise RuntimeError("the HTTPS upstream needs Go (bench/peers/upstream.go)")
        if self.go:
            args = [
                *prefix,
                box.bins["upstream"],
                "-addr",
                f"127.0.0.1:{self.port}",
                "-parent-pid",
                str(os.getpid()),
                "-max-life",
                f"{self.MAX_LIFE_S}s",
            ]
            if tls is not None:
                self.plain_port = free_port()
                args += [
                    "-tls-cert",
                    str(tls.cert),
                    "-tls-key",
                    str(tls.key),
                    "-plain-addr",
                    f"127.0.0.1:{self.plain_port}",
                    "-idle-timeout",
                    f"{self.IDLE_TIMEOUT_TLS}s",
                ]
            self.kind = "Go (bench/peers/upstream.go)" + (
                f", HTTPS (HTTP/1.1, bench CA, idle connections closed after {self.IDLE_TIMEOUT_TLS:g} s)"
                if tls
                else ""
            )
            health = "/_bench/health"
        else:
            args = [
                *prefix,
                PYTHON,
                "-m",
                "tests.fakes.upstream",
                "--port",
                str(self.port),
                "--host",
                "127.0.0.1",
            ]
            self.kind = (
                "Python fallback (tests/fakes/upstream.py, thread per connection: may be the bottleneck)"
            )
            health = "/_fake/health"
        self.ca = tls.ca if tls else None  # what a client of the upstream trusts
        self._stats_calls = 0
        self.proc = Proc(args, base_env(), workdir / ("upstream-tls.log" if tls else "upstream.log"))
        try:
            wait_until(
                lambda: request(self.port, "GET", health, ca=self.ca) == 200,
                15,
                "the fake upstream",
                self.proc,
            )
            if tls is not None:
                wait_until(
                    lambda: request(self.plain_port, "GET", health) == 200,
                    15,
                    "its plain listener",
                    self.proc,
                )
        except BaseException:
            self.proc.stop()
            raise
        scheme = "https" if tls else "http"
        self.api_url = f"{scheme}://127.0.0.1:{self.port}/v1"  # the tokens' ai_model_api_url

    def stats(self) -> dict:
        """The Go upstream's counters since start: {"conns": accepted connections, "requests": N}."""
        context = ssl.create_default_context(cafile=str(self.ca)) if self.ca else None
        conn = (
            http.client.HTTPSConnection("127.0.0.1", self.port, timeout=5, context=context)
            if context
            else http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        )
        try:
            conn.request("GET", "/_bench/stats")
            response = conn.getresponse()
            data = json.loads(response.read())
        finally:
            conn.close()
        self._stats_calls += 1  # each call is a connection of its own: not counted
        return {"conns": data["conns"] - self._stats_calls, "requests": data["requests"]}

    def stop(self) -> None:
        self.proc.stop()


# ---------------------------------------------------------------------------- redis


class RedisServer:
    """A redis-server for the per-token limits (scenario small-limits): a unix socket in the work
    directory (no TCP port), no persistence, pinned to the load side's CPU like the fake upstream."""

    def __init__(self, binary: str, layout: Layout, workdir: Path) -> None:
        import redis  # a dependency of the proxy (requirements.txt), so in the venv

        self.socket = workdir / "r.sock"
        self.url = f"unix://{self.socket}"  # LIMITS_REDIS_URL
        args = [
            *layout.prefix(layout.load),
            binary,
            "--port",
            "0",
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ]
        self._errors = (redis.RedisError, OSError)
        self.client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5)
        self.proc = Proc(args, base_env(), workdir / "redis.log")
        self.pid = self.proc.pid
        try:
            wait_until(self._answers, 15, "redis-server", self.proc)
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except self._errors:
            return False

    def evalsha_calls(self) -> int:
        """EVALSHA calls since start (INFO commandstats): the limiter's one round trip per request."""
        return int(self.client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    def stop(self) -> None:
        self.client.close()
        self.proc.stop()


# ---------------------------------------------------------------------------- peers


def _error_of(line: str) -> str:
    """The "error" field of a JSON log line (an access line of a failed request), or ""."""
    try:
        entry = json.loads(line[line.index("{") :])
    except ValueError:
        return ""
    return str(entry.get("error") or "") if isinstance(entry, dict) else ""


def ca_env(tls: TlsFiles | None) -> dict[str, str]:
    """Our proxy's trust store for the HTTPS upstream (it ignores SSL_CERT_FILE & co. by design)."""
    return {"UPSTREAM_CA_BUNDLE": str(tls.ca)} if tls else {}


class Peer:
    key = "?"
    name = "?"
    label = "?"
    reloads = True  # has a token table that can be replaced

    def __init__(self) -> None:
        self.port = 0
        self.proc: Proc | None = None
        self.table_path: Path | None = None
        self.client_ca: Path | None = None  # set when clients reach this peer over HTTPS (direct)

    @property
    def chat_path(self) -> str:
        return "/chat/completions"

    @property
    def url(self) -> str:
        scheme = "https" if self.client_ca else "http"
        return f"{scheme}://127.0.0.1:{self.port}{self.chat_path}"

    def pids(self) -> list[int]:
        """The processes whose CPU and memory count as this peer's."""
        return [self.proc.pid] if self.proc else []

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    @contextlib.contextmanager
    def stopped_on_error(self):
        """A peer that fails to start stops what it started: nothing is left running beside the others."""
        try:
            yield
        except BaseException:
            try:
                self.stop()
            except Exception as exc:
                say(f"  NOTE: stopping {self.label} after a failed start: {exc}")
            raise

    def check_serves(self) -> None:
        status = request(
            self.port, "POST", self.chat_path, BENCH_TOKEN, CHAT_BODY, timeout=10, ca=self.client_ca
        )
        if status != 200:
            hint = ""
            if self.proc and status == 502:
                errors = [_error_of(line) for line in self.proc.log_tail(200).splitlines()]
                errors = [e for e in errors if e and ("certificate" in e.lower() or "ssl" in e.lower())]
                if errors:
                    hint = f" (upstream TLS: {errors[-1][:300]})"
            raise RuntimeError(f"{self.label}: a test request got {status or 'no answer'}, not 200{hint}")


class Direct(Peer):
    """The upstream hit directly. With the HTTPS upstream, over its plain HTTP port: the client's TLS
    (handshakes, decryption) would otherwise run on the load side's CPU, which in a proxy's run
    does not do it, and direct would be no lower bound (its delay is the baseline of "added")."""

    key, name, label = "a", "direct", "direct (limit)"
    reloads = False

    def __init__(self, upstream: Upstream) -> None:
        super().__init__()
        self.port = upstream.plain_port
        self.upstream = upstream

    @property
    def chat_path(self) -> str:
        return "/v1/chat/completions"

    def pids(self) -> list[int]:
        return [self.upstream.proc.pid]

    def stop(self) -> None:
        pass  # the upstream is stopped last, by its owner


class GoReference(Peer):
    key, name, label = "b", "go", "Go reference"

    def __init__(
        self,
        box: Toolbox,
        layout: Layout,
        workdir: Path,
        tables: Tables,
        table_size: int,
        tls: TlsFiles | None = None,
    ) -> None:
        super().__init__()
        self.port = free_port()
        home = workdir / "go-ref"
        home.mkdir(mode=0o700)
        self.table_path = home / "tokens.json"
        tables.write(self.table_path, table_size)
        args = [
            *layout.prefix(layout.proxy_1w),
            box.bins["refproxy"],
            "-addr",
            f"127.0.0.1:{self.port}",
            "-tokens",
            str(self.table_path),
            "-poll",
            "1s",
            "-parent-pid",
            str(os.getpid()),
        ]
        # Go's crypto/x509 takes its roots from SSL_CERT_FILE when set (loaded once per process).
        env = base_env(SSL_CERT_FILE=str(tls.ca)) if tls else base_env()
        self.proc = Proc(args, env, workdir / "go-ref.log")
        with self.stopped_on_error():
            wait_until(lambda: request(self.port, "GET", "/_bench/ping") == 401, 15, self.label, self.proc)
            self.check_serves()


class ProxyOneWorker(Peer):
    key, name, label = "c", "proxy1", "proxy, 1 worker"

    def __init__(
        self,
        layout: Layout,
        workdir: Path,
        tables: Tables,
        table_size: int,
        tls: TlsFiles | None = None,
        extra_env: dict[str, str] | None = None,
        label: str = "",
        repo: Path = REPO,
    ) -> None:
        """``repo``: the checkout whose wsgi.py runs (another one's for an A/B, see bench/ab.py),
        with that checkout's .venv when it has one."""
        super().__init__()
        self.label = label or self.label
        self.port = free_port()
        home = workdir / self.name
        home.mkdir(mode=0o700)
        self.table_path = home / "tokens.json"
        tables.write(self.table_path, table_size)
        env = base_env(
            LISTEN_ADDR=f"127.0.0.1:{self.port}",
            TOKEN_FILE=str(self.table_path),
            LOG_LEVEL="info",
            GRACEFUL_TIMEOUT="5",
            **ca_env(tls),
            **(extra_env or {}),
        )
        log_path = workdir / f"{self.name}.log"
        python = repo / ".venv" / "bin" / "python"
        self.proc = Proc(
            [*layout.prefix(layout.proxy_1w), str(python) if python.exists() else PYTHON, "wsgi.py"],
            env,
            log_path,
            cwd=repo,
        )
        with self.stopped_on_error():
            wait_until(lambda: request(self.port, "GET", "/_proxy/readyz") == 200, 30, self.label, self.proc)
            self.check_serves()

    def limit_header(self) -> str | None:
        """x-ratelimit-limit-requests of one request (None: absent, i.e. no limit applied)."""
        status, headers = exchange(self.port, "POST", self.chat_path, BENCH_TOKEN, CHAT_BODY, timeout=10)
        if status != 200:
            raise RuntimeError(f"{self.label}: a test request got {status or 'no answer'}, not 200")
        return headers.get("x-ratelimit-limit-requests")


class ProxyOneWorkerLimits(ProxyOneWorker):
    """``python wsgi.py`` with default per-token limits (TOKEN_MAX_CONCURRENCY, TOKEN_RPM) so high
    that nothing is ever refused, counted in ``redis`` (LIMITS_REDIS_URL): the limiter's cost."""

    key, name, label = "c+", "proxy1-limits", "proxy, 1 worker, limits on"

    def __init__(
        self,
        layout: Layout,
        workdir: Path,
        tables: Tables,
        table_size: int,
        redis: RedisServer,
        max_concurrency: int,
        rpm: int,
        tpm: int = 0,
    ) -> None:
        self.redis = redis
        limits = {
            "TOKEN_MAX_CONCURRENCY": str(max_concurrency),
            "TOKEN_RPM": str(rpm),
            "TOKEN_TPM": str(tpm),
            "LIMITS_REDIS_URL": redis.url,
        }
        super().__init__(layout, workdir, tables, table_size, extra_env=limits)


class ProxyOneWorkerLimitsTpm(ProxyOneWorkerLimits):
    """Limits on with TOKEN_TPM too (issue 20): the same admission round trip reads the token
    window, and each request's tokens go to Redis at its end in the background pipeline."""

    key, name, label = "c+t", "proxy1-limits-tpm", "proxy, 1 worker, limits on + TPM"


class ProxySupervised(Peer):
    """``bash scripts/run`` in the foreground: supervisord, the syncer and PROXY_WORKERS=2 workers.

    The syncer fetches from the fake backend (tests/fakes/backend.py), which serves the same rows
    as the pre-written table, once at start (SYNC_INTERVAL=60 minutes: no sync during the run).
    """

    key, name, label = "d", "proxy2", "proxy, 2 workers (supervisord)"
    workers = 2
    daemon = False  # scripts/run in the foreground: supervisord relays every log to its stdout

    def __init__(
        self,
        layout: Layout,
        workdir: Path,
        tables: Tables,
        table_size: int,
        tls: TlsFiles | None = None,
        repo: Path = REPO,
    ) -> None:
        super().__init__()
        self.tls = tls
        self.repo = repo
        self.supervisord_pid = 0
        self.port = free_port()
        home = workdir / self.name
        self.home = home
        home.mkdir(mode=0o700)
        self.table_path = home / "tokens.json"
        tables.write(self.table_path, table_size)
        backend_port = free_port()
        self.backend: Proc | None = None
        with self.stopped_on_error():
            self._start(layout, workdir, tables, table_size, home, backend_port)

    def _start(
        self, layout: Layout, workdir: Path, tables: Tables, table_size: int, home: Path, backend_port: int
    ) -> None:
        self.backend = Proc(
            [
                *layout.prefix(layout.load),
                PYTHON,
                "-m",
                "tests.fakes.backend",
                "--port",
                str(backend_port),
                "--host",
                "127.0.0.1",
            ],
            base_env(),
            workdir / "backend.log",
        )
        wait_until(
            lambda: request(backend_port, "GET", "/_fake/state") == 200, 15, "fake backend", self.backend
        )
        body = json.dumps({"rows": tables.backend_rows(table_size)}).encode()
        if request(backend_port, "POST", "/_fake/state", body=body, timeout=30) != 200:
            raise RuntimeError("fake backend: POST /_fake/state failed")
        env = base_env(
            PROXY_ENV_FILE="/nonexistent",
            PROXY_PYTHON=PYTHON,
            PROXY_RUN_DIR=str(home / "run"),
            PROXY_LOG_DIR=str(home / "log"),
            PROXY_WORKERS=str(self.workers),
            LISTEN_ADDR=f"127.0.0.1:{self.port}",
            TOKEN_FILE=str(self.table_path),
            SERVER_API_URL=f"http://127.0.0.1:{backend_port}",
            SYNC_INTERVAL="60",
            LOG_LEVEL="info",
            GRACEFUL_TIMEOUT="5",
            **ca_env(self.tls),
        )
        python = self.repo / ".venv" / "bin" / "python"
        env["PROXY_PYTHON"] = str(python) if python.exists() else PYTHON
        self.log_path = workdir / f"{self.name}.log"
        cpus = layout.proxy_1w if self.workers == 1 else layout.proxy_2w
        args = [*layout.prefix(cpus), "bash", "scripts/run", *(["-d"] if self.daemon else [])]
        self.proc = Proc(args, env, self.log_path, cwd=self.repo)
        watched: Proc | None = self.proc
        if self.daemon:  # scripts/run execs supervisord, which forks away: its pid is in its pidfile
            pidfile = home / "run" / "supervisord.pid"
            wait_until(lambda: _read_pid(pidfile), 30, f"{self.label}: supervisord's pidfile")
            self.supervisord_pid = _read_pid(pidfile)
            watched = None
        else:
            self.supervisord_pid = self.proc.pid
        wait_until(
            self._started, 60, f"{self.label}: {self.workers} workers listening and one sync", watched, 0.2
        )
        wait_until(lambda: request(self.port, "GET", "/_proxy/readyz") == 200, 30, self.label, watched)
        time.sleep(1.5)  # the workers notice the syncer's file within TOKEN_FILE_POLL
        self._known = self.pids()
        self.check_serves()

    def _log_text(self) -> str:
        paths = sorted((self.home / "log").glob("*.log")) if self.daemon else [self.log_path]
        texts = []
        for path in paths:
            try:
                texts.append(path.read_text(errors="replace"))
            except OSError:
                pass
        return "\n".join(texts)

    def _log_lines(self):
        for line in self._log_text().splitlines():
            start = line.find("{")
            if start >= 0:
                try:
                    yield json.loads(line[start:])
                except ValueError:
                    pass

    def _started(self) -> bool:
        listening, synced = set(), False
        for entry in self._log_lines():
            if entry.get("message") == "listening":
                listening.add(entry.get("pid"))
            if entry.get("message") == "sync" and entry.get("service") == "syncer":
                synced = True
        return len(listening) >= self.workers and synced and len(self.pids()) >= self.workers

    def pids(self) -> list[int]:
        if not self.supervisord_pid:
            return []
        return [
            pid for pid in procstat.descendants(self.supervisord_pid) if "wsgi.py" in procstat.cmdline(pid)
        ]

    def stop(self) -> None:
        if self.daemon and self.supervisord_pid and procstat.alive(self.supervisord_pid):
            stop_daemon(self.supervisord_pid, procstat.descendants(self.supervisord_pid), timeout=30)
        if self.proc:
            everything = procstat.descendants(self.proc.pid)
            self.proc.stop(timeout=30, also=everything)
        if self.backend:
            self.backend.stop()


class ProxyDeployed(ProxySupervised):
    """The deployment users run (issue 18): ``scripts/run -d`` with PROXY_WORKERS=1: supervisord
    daemonized, the syncer, one worker, supervisord writing each program's log file; the whole
    process tree on the proxy's CPU. Its CPU is the tree's (supervisord + syncer + worker), and
    supervisord's share is measured apart (``parts``)."""

    key, name, label = "e", "deployed", "proxy, deployed (supervisord -d, 1 worker)"
    workers = 1
    daemon = True

    def pids(self) -> list[int]:
        if not self.supervisord_pid:
            return []
        return [self.supervisord_pid, *procstat.descendants(self.supervisord_pid)]

    def parts(self) -> dict[str, list[int]]:
        return {"supervisord": [self.supervisord_pid]} if self.supervisord_pid else {}

    def worker_log(self) -> Path:
        return self.home / "log" / "proxy_00.log"


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def stop_daemon(pid: int, children: list[int], timeout: float) -> None:
    """SIGTERM a daemon we started (known by its pidfile), wait; SIGKILL it and ``children`` late."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while procstat.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if procstat.alive(pid):
        say(f"  supervisord (pid {pid}) ignored SIGTERM for {timeout}s: SIGKILL")
        for victim in [pid, *children]:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
