"""The log path never holds up traffic (issue 18): each worker appends its lines to a bounded
in-memory buffer that one writer greenlet drains with non-blocking writes to stdout.

Real processes only: the real supervisord with the real supervisord.conf, started by
``scripts/run -d`` with one worker (daemon mode: supervisord writes the worker's log file, as in
production), the session's fake upstream, raw-socket clients. The log consumer is stalled by
``kill -STOP`` on the supervisord these tests started (its PID from the pidfile of its private run
directory), always continued in a ``finally``. A few tests run ``python wsgi.py`` with its stdout on
a pipe that the test itself reads (slowly, or not at all for a while).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests import test_deploy
from tests.support import procs
from tests.support.metrics import scrape, total
from tests.support.procs import PYTHON, REPO, free_port, port_open, wait_for
from tests.support.rawhttp import CHAT, RawClient
from tests.support.sse import StreamReader
from tests.support.tables import CLIENT_TOKEN, UPSTREAM_KEY, row, write_table
from tests.test_deploy import Deployment, cmdline, pid_alive

WORKER = "proxy:proxy_00"
SMALL = "json;size=200"
BODY = b'{"model":"m"}'
# Requests whose access lines are ~9 KB: request and response bodies logged up to 4 KiB each.
BIG = "json;size=4000"
BIG_BODY = json.dumps({"model": "m", "filler": "x" * 4000}).encode()
DROPPED = "log_lines_dropped_total"
MIB = 1 << 20


# ---------------------------------------------------------------------------- helpers


class Daemon(Deployment):
    """``scripts/run -d`` with one worker: supervisord daemonizes and writes each program's log
    file in ``log_dir``. A LOG_BUFFER_BYTES of the developer's environment never leaks in."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        settings = {
            "PROXY_WORKERS": "1",
            "SYNC_INTERVAL": "2",
            "GRACEFUL_TIMEOUT": "5",
            "TOKEN_FILE_POLL": "0.2",
        }
        settings.update(env or {})
        with pytest.MonkeyPatch.context() as patch:
            patch.delenv("LOG_BUFFER_BYTES", raising=False)
            super().__init__(log_dir, settings, ("-d",))

    @property
    def worker_log(self) -> Path:
        return self.log_dir / "proxy_00.log"

    def launcher_failed(self) -> bool:
        return not self.process.alive() and self.process.popen.returncode not in (0, None)

    def wait_up(self, timeout: float = 30.0) -> None:
        def check() -> bool:
            assert not self.launcher_failed(), self.tail()
            if not self.running(["syncer", WORKER]):
                return False
            return self.ready()

        wait_for(check, timeout=timeout, interval=0.1, what="daemon deployment up and ready")

    def supervisord(self) -> int:
        """supervisord's PID, from the pidfile in this deployment's own run directory."""
        pid = int((self.run_dir / "supervisord.pid").read_text().strip())
        assert "supervisord" in cmdline(pid), (pid, cmdline(pid))
        self.supervisord_pid = pid
        return pid

    def stop(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, AssertionError):
            os.kill(self.supervisord(), signal.SIGCONT)  # never leave it stopped
        return super().stop()


@contextlib.contextmanager
def consumer_stopped(dep: Daemon) -> Iterator[dict[str, float]]:
    """supervisord (the worker's log consumer) stopped with SIGSTOP for the block; always
    continued. Yields {"stopped": time, "continued": time} (time.time(); continued on exit)."""
    pid = dep.supervisord()
    times = {"stopped": time.time()}
    os.kill(pid, signal.SIGSTOP)
    try:
        yield times
    finally:
        os.kill(pid, signal.SIGCONT)
        times["continued"] = time.time()


class LogTail:
    """Reads a log file as ``tail -f`` does: the file stays open and new bytes are read as they are
    appended; only complete lines count. Records when each line was first seen."""

    def __init__(self, path: Path, from_end: bool = False) -> None:
        self.path = path
        self.handle = None
        self.partial = b""
        self.records: list[dict] = []
        self.bad: list[bytes] = []  # complete lines that are not one JSON object
        self.seen_at: dict[str, float] = {}  # request_id of access lines -> time.time() first seen
        if from_end:
            self._open()
            self.handle.seek(0, os.SEEK_END)

    def _open(self) -> bool:
        if self.handle is None:
            try:
                self.handle = open(self.path, "rb")  # noqa: SIM115 - open while the test reads
            except FileNotFoundError:
                return False
        return True

    def poll(self) -> list[dict]:
        if not self._open():
            return []
        data = self.handle.read()
        if not data:
            return []
        now = time.time()
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        new = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                self.bad.append(line[:300])
                continue
            new.append(record)
            if record.get("logger") == "proxy.access" and "request_id" in record:
                self.seen_at.setdefault(record["request_id"], now)
        self.records.extend(new)
        return new

    def access_counts(self) -> Counter:
        self.poll()
        return Counter(r["request_id"] for r in self.records if r.get("logger") == "proxy.access")

    def events(self, event: str) -> list[dict]:
        self.poll()
        return [r for r in self.records if r.get("event") == event]

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def settled_access_counts(tail: LogTail, wanted: set[str], timeout: float = 15.0) -> Counter:
    """Once every wanted request ID has an access line (or at the timeout), and nothing more has
    arrived for half a second: how many access lines each request ID has."""
    return settled(tail, lambda counts: wanted <= set(counts), timeout)


def settled(tail: LogTail, done, timeout: float) -> Counter:
    """Once ``done(access counts)`` holds (or at the timeout), and nothing more has arrived for
    half a second: how many access lines each request ID has."""
    with contextlib.suppress(AssertionError):
        wait_for(lambda: done(tail.access_counts()), timeout=timeout, interval=0.05)
    size = -1
    while len(tail.records) != size:
        size = len(tail.records)
        time.sleep(0.5)
        tail.poll()
    return tail.access_counts()


def exactly_once(counts: Counter, wanted: list[str]) -> tuple[list[str], list[str]]:
    """(request IDs without an access line, request IDs with more than one)."""
    return [r for r in wanted if counts[r] == 0], [r for r in wanted if counts[r] > 1]


@dataclass
class Outcome:
    client: int  # which client thread (and connection) sent it
    seq: int  # its place among that client's requests
    request_id: str
    result: int | str  # the status, or why there was no complete response
    sent: float  # time.time()
    done: float


class Clients:
    """Small requests from a few client threads, each with its own X-Request-ID, one after another
    per thread; on keep-alive connections (``keep_alive``) or one connection per request. Stops
    when told, after ``limit`` requests in all, or at ``deadline`` seconds after the start."""

    def __init__(
        self,
        port: int,
        threads: int = 4,
        *,
        keep_alive: bool = False,
        limit: int | None = None,
        deadline: float = 60.0,
        pause: float = 0.0,
        timeout: float = 10.0,
        fake: str = SMALL,
        body: bytes = BODY,
        prefix: str = "lp",
    ) -> None:
        self.port, self.keep_alive, self.limit, self.deadline = port, keep_alive, limit, deadline
        self.pause, self.timeout, self.fake, self.body = pause, timeout, fake, body
        self.prefix = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.issued = 0
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        self.started = 0.0

    def _claim(self) -> bool:
        with self.lock:
            if self.limit is not None and self.issued >= self.limit:
                return False
            self.issued += 1
            return True

    def _run(self, index: int) -> None:
        client: RawClient | None = None
        seq = 0
        headers = {
            "Authorization": f"Bearer {CLIENT_TOKEN}",
            "X-Fake": self.fake,
            "Content-Type": "application/json",
        }
        if not self.keep_alive:
            headers["Connection"] = "close"
        try:
            while (
                not self.stop_event.is_set()
                and time.monotonic() < self.started + self.deadline
                and self._claim()
            ):
                request_id = f"{self.prefix}-{index}-{seq}"
                sent = time.time()
                try:
                    if client is None:
                        client = RawClient(self.port, timeout=self.timeout)
                    client.send_request("POST", CHAT, {**headers, "X-Request-ID": request_id}, self.body)
                    result: int | str = client.read_response("POST")[0]
                    if not self.keep_alive or client.headers.get("connection", "").lower() == "close":
                        client.close()
                        client = None
                except (OSError, EOFError, AssertionError) as exc:
                    result = f"{type(exc).__name__}: {exc}"[:200]
                    if client is not None:
                        client.close()
                        client = None
                with self.lock:
                    self.outcomes.append(Outcome(index, seq, request_id, result, sent, time.time()))
                seq += 1
                if self.pause or result != 200:
                    time.sleep(self.pause if result == 200 else max(self.pause, 0.02))
        finally:
            if client is not None:
                client.close()

    def start(self) -> Clients:
        self.started = time.monotonic()
        for thread in self.threads:
            thread.start()
        return self

    def join(self, timeout: float = 60.0) -> None:
        for thread in self.threads:
            if thread.ident is not None:  # started
                thread.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "a client thread did not finish"

    def stop(self) -> None:
        self.stop_event.set()
        self.join()

    def ids(self) -> list[str]:
        return [o.request_id for o in self.outcomes]

    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.result == 200]

    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.result != 200]


def vm_rss(pid: int) -> int:
    """The resident set of the process, in bytes (/proc/PID/status VmRSS)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class RssSampler(threading.Thread):
    """The process's highest VmRSS, sampled every 20 ms until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = vm_rss(pid)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, vm_rss(self.pid))

    def stop(self) -> int:
        self.done.set()
        self.join(5)
        with contextlib.suppress(OSError):
            self.peak = max(self.peak, vm_rss(self.pid))
        return self.peak


def utc_of(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=UTC)


def utc(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert value.utcoffset() == timedelta(0), text
    return value


def max_gap(reader: StreamReader) -> float:
    """The longest wait between two consecutive events of the stream, in seconds."""
    arrived = reader.arrived
    return max((b - a for a, b in itertools.pairwise(arrived)), default=0.0)


def worker_env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    """The environment of a ``python wsgi.py`` run directly by a test."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in test_deploy.CONFIG_VARS and not k.startswith("PYTEST_")
    }
    env.pop("LOG_BUFFER_BYTES", None)
    env.update(
        {
            "LISTEN_ADDR": f"127.0.0.1:{port}",
            "TOKEN_FILE": str(tmp_path / "tokens.json"),
            "TOKEN_FILE_POLL": "0.1",
            "LOG_LEVEL": "info",
            "GRACEFUL_TIMEOUT": "10",
            "HOME": str(tmp_path),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    env.update(extra)
    return env


class PipeReader(threading.Thread):
    """Reads a worker's stdout pipe in pieces of ``piece`` bytes, ``delay`` seconds apart, not at all
    while ``paused`` is set, until EOF; keeps every byte (and writes them to ``log_path`` at the end,
    for the run-wide secrets grep)."""

    def __init__(self, fd: int, log_path: Path, piece: int = 3000, delay: float = 0.001) -> None:
        super().__init__(daemon=True)
        self.fd, self.log_path, self.piece, self.delay = fd, log_path, piece, delay
        self.data = bytearray()
        self.paused = threading.Event()
        self.eof = threading.Event()

    def run(self) -> None:
        try:
            while True:
                while self.paused.is_set():
                    time.sleep(0.01)
                chunk = os.read(self.fd, self.piece)
                if not chunk:
                    break
                self.data += chunk
                if self.delay:
                    time.sleep(self.delay)
        finally:
            self.log_path.write_bytes(bytes(self.data))
            procs.LOG_FILES.append(self.log_path)
            self.eof.set()


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def logs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("log-path")


@pytest.fixture(scope="module")
def backend(logs_dir, upstream):
    fake = test_deploy.FakeBackend(logs_dir)
    fake.control.set(rows=[test_deploy.backend_row(CLIENT_TOKEN, 7, upstream.url + "/v1")])
    yield fake
    fake.stop()


@pytest.fixture
def daemon(logs_dir, backend):
    """Start daemon deployments (``daemon(env)``) that are stopped (continued first) at the end."""
    started: list[Daemon] = []

    def start(env: dict[str, str] | None = None, *, wait: bool = True) -> Daemon:
        deployment = Daemon(logs_dir, {"SERVER_API_URL": backend.url, **(env or {})})
        started.append(deployment)
        if wait:
            deployment.wait_up()
        return deployment

    yield start
    for deployment in started:
        deployment.stop()


@pytest.fixture(scope="module")
def shared(logs_dir, backend):
    """One daemon deployment with the default LOG_BUFFER_BYTES, for the tests that leave it running."""
    deployment = Daemon(logs_dir, {"SERVER_API_URL": backend.url})
    try:
        deployment.wait_up()
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture
def dep(shared) -> Daemon:
    """The shared deployment, with supervisord running and the worker up and serving."""
    os.kill(shared.supervisord(), signal.SIGCONT)
    shared.wait_up()
    return shared


# ---------------------------------------------------------------------------- the stalled consumer


@pytest.mark.deploy
@pytest.mark.slow
def test_streams_and_requests_flow_while_supervisord_is_stopped(dep):
    """100 streams at 20 events/s and a steady small-request load through one worker; supervisord
    stopped for 3 s: no stream waits a second for an event, small requests are still answered
    during the stall, and afterwards the log holds exactly one access line per request."""
    tail = LogTail(dep.worker_log)
    streams = [
        StreamReader(
            dep.port, "sse;events=160;interval=0.05", request_id=f"lp-stall-s{i}-{uuid.uuid4().hex[:8]}"
        )
        for i in range(100)
    ]
    load = Clients(dep.port, threads=4, pause=0.02, timeout=15, prefix="lp-stall")
    try:
        for stream in streams:
            stream.start()
        for stream in streams:
            assert stream.first_event.wait(20), "a stream did not start"
        load.start()
        time.sleep(1.0)
        with consumer_stopped(dep) as stall:
            time.sleep(3.0)
        time.sleep(1.0)
    finally:
        load.stop()
        for stream in streams:
            stream.join(30)
    for stream in streams:
        stream.finish(1)
    gaps = sorted(max_gap(stream) for stream in streams)
    frozen = [g for g in gaps if g > 1.0]
    during = [o for o in load.ok() if stall["stopped"] + 1.0 <= o.done <= stall["continued"]]
    print(
        f"stall {stall['continued'] - stall['stopped']:.2f}s; largest event gap per stream: max "
        f"{gaps[-1] * 1000:.0f} ms, median {gaps[len(gaps) // 2] * 1000:.0f} ms, {len(frozen)} streams over "
        f"1 s; small requests: {len(load.ok())} ok, {len(load.failed())} failed, {len(during)} answered "
        f"while supervisord was stopped"
    )
    assert all(stream.complete(160) for stream in streams)
    assert frozen == [], f"{len(frozen)} of {len(streams)} streams froze: gaps up to {gaps[-1]:.2f}s"
    assert load.failed() == [], load.failed()[:5]
    assert len(during) >= 10, f"only {len(during)} small requests answered while supervisord was stopped"

    wanted = load.ids() + [stream.request_id for stream in streams]
    counts = settled_access_counts(tail, set(wanted))
    missing, repeated = exactly_once(counts, wanted)
    print(f"{len(wanted)} requests; access lines missing for {len(missing)}, repeated for {len(repeated)}")
    assert (missing, repeated) == ([], [])
    assert tail.bad == [], tail.bad[:3]  # every line whole: one JSON object
    tail.close()


@pytest.mark.deploy
@pytest.mark.slow
def test_full_buffer_drops_lines_counts_them_and_says_so(daemon):
    """LOG_BUFFER_BYTES=1 MiB, supervisord stopped twice, 4,000 requests with ~9 KB access lines
    (36 MB of lines: an unbounded buffer would show in the RSS): every request is served, the
    worker's RSS stays within the buffer + 10 MiB, and once supervisord continues the dropped lines
    are counted (metric) and reported in one warning line per stall; written + dropped == made."""
    buffer_bytes = MIB
    dep = daemon({"LOG_BUFFER_BYTES": str(buffer_bytes)})
    tail = LogTail(dep.worker_log)
    worker = dep.pid(WORKER)
    assert "wsgi.py" in cmdline(worker)
    big = {"keep_alive": True, "body": BIG_BODY, "fake": BIG}

    # Warm-up at a pace supervisord keeps up with. Should it fall behind for a moment on a busy
    # machine (a legitimate drop), that is reported and counted before the stalls begin: the stalls
    # are measured from the counter and the warnings as they stand after the warm-up.
    warm = Clients(dep.port, threads=2, limit=300, pause=0.005, prefix="lp-warm", **big).start()
    warm.join()
    assert warm.failed() == [], warm.failed()[:3]

    def warm_accounted(counts: Counter) -> bool:
        written = sum(1 for rid in warm.ids() if counts[rid])
        reported = sum(w["dropped"] for w in tail.events("log_lines_dropped"))
        return written + reported >= len(warm.ids())

    settled(tail, warm_accounted, 15)
    base_warnings = len(tail.events("log_lines_dropped"))
    base_dropped = total(scrape(dep.url), DROPPED)
    assert base_dropped == sum(w["dropped"] for w in tail.events("log_lines_dropped"))
    rss_before = vm_rss(worker)

    made: list[Clients] = []
    warnings: list[dict] = []
    stalls: list[dict[str, float]] = []
    dropped_total = base_dropped
    sampler = RssSampler(worker)
    sampler.start()
    try:
        for n, requests_made in enumerate((2500, 1500)):
            load = Clients(
                dep.port, threads=6, limit=requests_made, deadline=12, timeout=5, prefix="lp-over", **big
            )
            made.append(load)
            with consumer_stopped(dep) as stall:
                load.start()
                load.join(30)
            stalls.append(stall)
            print(
                f"stall {n + 1}: {len(load.outcomes)} requests in "
                f"{stall['continued'] - stall['stopped']:.1f}s, {len(load.ok())} ok, {len(load.failed())} "
                f"failed (first: {[o.result for o in load.failed()[:2]]})"
            )
            assert (len(load.outcomes), len(load.failed())) == (requests_made, 0), (
                f"{len(load.outcomes)} of {requests_made} requests made in 12 s, "
                f"{len(load.failed())} not served: {load.failed()[:3]}"
            )
            # The warning comes once writing resumes, and says how many lines were dropped.
            index = base_warnings + n
            warning = wait_for(
                lambda i=index: (
                    len(tail.events("log_lines_dropped")) > i and tail.events("log_lines_dropped")[i]
                ),
                timeout=15,
                interval=0.05,
                what="the log_lines_dropped warning",
            )
            warnings.append(warning)
            ids = load.ids()
            counts = settled(
                tail, lambda c, ids=ids, d=warning["dropped"]: sum(1 for r in ids if c[r]) + d >= len(ids), 10
            )
            dropped_total = total(scrape(dep.url), DROPPED)
            written = [rid for rid in ids if counts[rid]]
            print(
                f"stall {n + 1}: {len(written)} access lines written, warning says "
                f"{warning.get('dropped')} dropped, counter {dropped_total:.0f}"
            )
            assert [rid for rid in load.ids() if counts[rid] > 1] == []
            assert len(written) + warning["dropped"] == requests_made, (len(written), warning)
            # Only what fit in the buffer (and the pipe) was written; the buffer was really used.
            written_bytes = sum(
                len(json.dumps(r)) for r in tail.records if r.get("request_id") in set(written)
            )
            assert written_bytes >= buffer_bytes // 2, written_bytes
            assert all(len(json.dumps(r)) > 8000 for r in tail.records if r.get("request_id") in set(written))
    finally:
        rss_peak = sampler.stop()
    print(f"worker RSS {rss_before / MIB:.1f} MiB before, peak {rss_peak / MIB:.1f} MiB under the stalls")
    assert rss_peak <= rss_before + buffer_bytes + 10 * MIB

    assert len(warnings) == 2 and len(tail.events("log_lines_dropped")) == base_warnings + 2  # one per stall
    for warning, stall in zip(warnings, stalls, strict=True):
        assert warning["level"] == "WARNING" and warning["logger"] == "proxy.logs", warning
        assert isinstance(warning["dropped"], int) and warning["dropped"] > 0, warning
        first, last = utc(warning["first_dropped_at"]), utc(warning["last_dropped_at"])
        assert first <= last, warning
        slack = timedelta(seconds=2)
        assert utc_of(stall["stopped"]) - slack <= first and last <= utc_of(stall["continued"]) + slack, (
            warning,
            stall,
        )
    assert dropped_total > base_dropped
    assert dropped_total - base_dropped == sum(w["dropped"] for w in warnings)
    assert total(scrape(dep.url), DROPPED) == dropped_total  # nothing dropped since
    assert tail.bad == [], tail.bad[:3]
    tail.close()


# ---------------------------------------------------------------------------- restarts


@pytest.mark.deploy
@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctl-restart", "sigterm-while-stalled"])
def test_restarting_the_worker_under_traffic_loses_no_access_line(dep, how):
    """Requests and streams flow while the worker is restarted (``scripts/ctl restart``, or SIGTERM
    while supervisord is stopped, so lines are still in the buffer when the drain begins): every
    request that got a response has exactly one access line."""
    tail = LogTail(dep.worker_log)
    old = dep.pid(WORKER)
    assert "wsgi.py" in cmdline(old)
    streams = [
        StreamReader(
            dep.port, "sse;events=40;interval=0.05", request_id=f"lp-restart-s{i}-{uuid.uuid4().hex[:8]}"
        )
        for i in range(5)
    ]
    load = Clients(dep.port, threads=3, pause=0.005, timeout=15, prefix="lp-restart")
    try:
        load.start()
        for stream in streams:
            stream.start()
        for stream in streams:
            assert stream.first_event.wait(10), "a stream did not start"
        time.sleep(0.3)
        if how == "ctl-restart":
            result = dep.ctl("restart", WORKER)
            assert result.returncode == 0, result.stdout + result.stderr
        else:
            with consumer_stopped(dep):
                time.sleep(0.5)
                os.kill(old, signal.SIGTERM)
                time.sleep(0.5)
        wait_for(lambda: not pid_alive(old), timeout=15, what="the old worker gone")

        def restarted() -> int | None:
            state, pid = dep.status().get(WORKER, ("?", None))
            return pid if state == "RUNNING" and pid and pid != old else None

        new = wait_for(restarted, timeout=15, interval=0.1, what="the worker restarted")
        wait_for(dep.ready, timeout=15, interval=0.05, what="the new worker ready")
        time.sleep(1.0)  # and served by the new worker for a while
    finally:
        load.stop()
        for stream in streams:
            stream.join(20)
    answered = [o.request_id for o in load.ok()]
    answered += [s.request_id for s in streams if s.status == 200 and s.clean_end]
    counts = settled_access_counts(tail, set(answered))
    missing, repeated = exactly_once(counts, answered)
    by_pid = Counter(r["pid"] for r in tail.records if r.get("request_id") in set(answered))
    print(
        f"{how}: worker {old} -> {new}; {len(load.outcomes)} requests, {len(load.ok())} answered "
        f"(by pid: {dict(by_pid)}), {len(load.failed())} without a response; missing {len(missing)}, "
        f"repeated {len(repeated)}"
    )
    assert all(stream.complete(40) for stream in streams)  # the drain finished them
    assert (missing, repeated) == ([], [])
    assert by_pid[old] > 0 and by_pid[new] > 0, by_pid
    stopped = [r for r in tail.events("stopped") if r.get("pid") == old]
    assert len(stopped) == 1 and stopped[0]["drained"] is True, stopped
    assert tail.bad == [], tail.bad[:3]
    tail.close()


# ---------------------------------------------------------------------------- promptness


@pytest.mark.deploy
@pytest.mark.slow
def test_access_line_reaches_the_log_file_promptly(dep):
    """With supervisord draining, a tail -f reader sees each request's access line within a second
    of its response, for requests after an idle pause and at the end of a burst alike; the worker
    keeps running throughout."""
    worker = dep.pid(WORKER)
    tail = LogTail(dep.worker_log, from_end=True)
    delays: list[float] = []

    def one(request_id: str) -> float:
        with RawClient(dep.port) as client:
            client.send_request(
                "POST",
                CHAT,
                {"Authorization": f"Bearer {CLIENT_TOKEN}", "X-Fake": SMALL, "X-Request-ID": request_id},
                BODY,
            )
            assert client.read_response("POST")[0] == 200
        answered = time.time()
        wait_for(lambda: tail.poll() is not None and request_id in tail.seen_at, timeout=5, interval=0.005)
        return tail.seen_at[request_id] - answered

    for i in range(8):  # an idle worker: each request after a pause
        time.sleep(0.3)
        delays.append(one(f"lp-prompt-idle-{i}-{uuid.uuid4().hex[:8]}"))
    burst = Clients(dep.port, threads=4, keep_alive=True, limit=400, prefix="lp-prompt-burst").start()
    burst.join()
    assert burst.failed() == []
    burst_answered = max(o.done for o in burst.outcomes)
    wait_for(lambda: set(burst.ids()) <= set(tail.access_counts()), timeout=5, interval=0.005)
    burst_delay = max(tail.seen_at[rid] for rid in burst.ids()) - burst_answered
    delays.append(one(f"lp-prompt-after-{uuid.uuid4().hex[:8]}"))
    print(
        f"access line seen after: {[round(d * 1000) for d in delays]} ms; "
        f"burst's last {burst_delay * 1000:.0f} ms"
    )
    assert max(delays) <= 1.0, delays
    assert burst_delay <= 1.0, burst_delay
    assert dep.pid(WORKER) == worker and pid_alive(worker)
    tail.close()


# ---------------------------------------------------------------------------- a pipe the test reads


@pytest.mark.slow
def test_lines_stay_whole_and_in_order_through_a_slow_pipe(tmp_path, upstream):
    """``python wsgi.py`` with stdout and stderr on one pipe that the test reads slower than the
    worker logs, in odd-sized pieces, and not at all for 1.5 s in the middle: requests with ~9 KB
    access lines (more than a pipe takes atomically) are still answered while the pipe is full, and
    in the end every line is one whole JSON object, each request has exactly one, in the order each
    connection sent them, and the stop line is the last."""
    write_table(tmp_path / "tokens.json", {CLIENT_TOKEN: row(upstream.url + "/v1", UPSTREAM_KEY, token_id=7)})
    port = free_port()
    read_fd, write_fd = os.pipe()
    try:
        worker = subprocess.Popen(
            [PYTHON, str(REPO / "wsgi.py")],
            cwd=REPO,
            env=worker_env(tmp_path, port),
            stdin=subprocess.DEVNULL,
            stdout=write_fd,
            stderr=write_fd,
        )
    finally:
        os.close(write_fd)
    reader = PipeReader(read_fd, tmp_path / "worker-pipe.log", piece=3001, delay=0.002)
    reader.start()
    load = Clients(port, threads=4, keep_alive=True, pause=0.01, body=BIG_BODY, fake=BIG, prefix="lp-pipe")
    try:
        wait_for(lambda: port_open(port) or worker.poll() is not None, timeout=20, what="worker port")
        assert worker.poll() is None, bytes(reader.data[-2000:])
        load.start()
        time.sleep(0.5)
        reader.paused.set()
        paused_at = time.time()
        time.sleep(1.5)
        resumed_at = time.time()
        reader.paused.clear()
        time.sleep(0.5)
        load.stop()
        during = [o for o in load.outcomes if paused_at + 0.5 <= o.done <= resumed_at and o.result == 200]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        load.stop()
        if worker.poll() is None:
            worker.kill()
            worker.wait(5)
        reader.join(30)
        os.close(read_fd)
    assert reader.eof.is_set()
    data = bytes(reader.data)
    print(
        f"{len(load.outcomes)} requests, {len(load.failed())} failed, {len(during)} answered while the pipe "
        f"was not read; {len(data)} bytes of log"
    )
    assert load.failed() == [], load.failed()[:3]
    assert len(during) >= 10, f"only {len(during)} requests answered while the pipe was full"
    assert data.endswith(b"\n")
    records = []
    for line in data.split(b"\n")[:-1]:
        record = json.loads(line)  # whole: every line is one JSON object
        assert isinstance(record, dict), line[:200]
        records.append(record)
    access = [r for r in records if r.get("logger") == "proxy.access"]
    assert sorted(r["request_id"] for r in access) == sorted(load.ids())
    assert all(len(json.dumps(r)) > 8000 for r in access)  # lines longer than the pipe's atomic write
    position = {r["request_id"]: i for i, r in enumerate(records) if r.get("logger") == "proxy.access"}
    for client in range(4):
        mine = sorted((o for o in load.outcomes if o.client == client), key=lambda o: o.seq)
        order = [position[o.request_id] for o in mine]
        assert order == sorted(order), f"connection {client}'s access lines out of order"
    assert records[-1].get("event") == "stopped", records[-1]


# ---------------------------------------------------------------------------- start-up errors


@pytest.mark.parametrize("value", ["abc", "10", "65535", "1.5", "-1"])
def test_a_bad_log_buffer_size_is_a_start_up_error(tmp_path, value):
    result = subprocess.run(
        [PYTHON, str(REPO / "wsgi.py")],
        cwd=REPO,
        env=worker_env(tmp_path, free_port(), LOG_BUFFER_BYTES=value),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=15,  # a bad value stops it at once; a worker that accepted it would serve on
    )
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 2, (result.returncode, stderr[-2000:], result.stdout[-2000:])
    assert "proxy: configuration error:" in stderr and "LOG_BUFFER_BYTES" in stderr, stderr


def test_the_smallest_log_buffer_is_accepted(tmp_path, upstream):
    write_table(tmp_path / "tokens.json", {CLIENT_TOKEN: row(upstream.url + "/v1", UPSTREAM_KEY, token_id=7)})
    port = free_port()
    log_path = tmp_path / "worker.log"
    worker = procs.Process(
        [PYTHON, str(REPO / "wsgi.py")], worker_env(tmp_path, port, LOG_BUFFER_BYTES="65536"), log_path
    )
    try:
        wait_for(lambda: port_open(port) or not worker.alive(), timeout=20, what="worker port")
        assert worker.alive(), worker.output()
        with RawClient(port) as client:
            client.send_request(
                "POST",
                CHAT,
                {"Authorization": f"Bearer {CLIENT_TOKEN}", "X-Fake": SMALL, "X-Request-ID": "lp-min-buffer"},
                BODY,
            )
            assert client.read_response("POST")[0] == 200
        worker.wait_for_log(lambda r: r.get("request_id") == "lp-min-buffer", timeout=5)
    finally:
        assert worker.stop() == 0


@pytest.mark.parametrize("case", ["port-in-use", "unusable-ca-bundle"])
def test_start_up_errors_reach_a_piped_stdout_before_exit(tmp_path, case):
    """Errors found once the log writer runs (the listener, the CA bundle loaded by the app) are
    written out before the worker exits, with stdout and stderr on pipes."""
    bundle = tmp_path / "ca-bundle.pem"
    bundle.write_text("this is not a PEM certificate\n")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        extra = {"UPSTREAM_CA_BUNDLE": str(bundle)} if case == "unusable-ca-bundle" else {}
        if extra:
            port = free_port()
        result = subprocess.run(
            [PYTHON, str(REPO / "wsgi.py")],
            cwd=REPO,
            env=worker_env(tmp_path, port, **extra),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )
    output = (result.stdout + result.stderr).decode(errors="replace")
    if case == "port-in-use":
        assert result.returncode == 1, output
        failed = [r for r in procs.json_records(output) if r.get("event") == "listen_failed"]
        assert len(failed) == 1 and failed[0]["level"] == "ERROR", output[-2000:]
    else:
        assert result.returncode == 2, output
        assert "proxy: configuration error:" in output and "UPSTREAM_CA_BUNDLE" in output, output
    assert "Traceback" not in output, output


@pytest.mark.deploy
@pytest.mark.parametrize("case", ["bad-setting", "port-in-use"])
def test_start_up_errors_reach_the_workers_log_file(daemon, case):
    """Under supervisord, a worker that cannot start still leaves its reason in its log file."""
    with socket.socket() as holder:
        env: dict[str, str] = {}
        if case == "bad-setting":
            env["LOG_BUFFER_BYTES"] = "abc"
        else:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            env["LISTEN_ADDR"] = f"127.0.0.1:{holder.getsockname()[1]}"
        dep = daemon(env, wait=False)

        def reason() -> bool:
            assert not dep.launcher_failed(), dep.tail()
            try:
                text = dep.worker_log.read_text(errors="replace")
            except FileNotFoundError:
                return False
            if case == "bad-setting":
                return "proxy: configuration error:" in text and "LOG_BUFFER_BYTES" in text
            return any(r.get("event") == "listen_failed" for r in procs.json_records(text))

        wait_for(reason, timeout=20, interval=0.1, what=f"the {case} reason in the worker's log file")
        assert not dep.ready()


@pytest.mark.slow
def test_a_slow_reader_gets_a_few_drop_reports_that_add_up(tmp_path, upstream):
    """A reader slower than the worker (not stopped): lines are dropped between writes that go
    through. The drops are reported at most once per DROP_REPORT_INTERVAL (not once per write: a
    flood of warnings), and the reports, the last one at the stop, add up to every line missing."""
    write_table(tmp_path / "tokens.json", {CLIENT_TOKEN: row(upstream.url + "/v1", UPSTREAM_KEY, token_id=7)})
    port = free_port()
    read_end, write_end = os.pipe()
    env = worker_env(tmp_path, port, LOG_BUFFER_BYTES="262144")
    worker = subprocess.Popen(
        [PYTHON, str(REPO / "wsgi.py")], cwd=REPO, env=env, stdout=write_end, stderr=write_end
    )
    os.close(write_end)
    reader = PipeReader(read_end, tmp_path / "worker.log", piece=4096, delay=0.004)  # ~1 MB/s
    reader.start()
    try:
        wait_for(lambda: port_open(port), timeout=20)
        started = time.monotonic()
        load = Clients(port, threads=4, keep_alive=True, body=BIG_BODY, fake=BIG, prefix="slow").start()
        time.sleep(4)
        load.stop()
        load.join()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        elapsed = time.monotonic() - started
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        reader.join(30)
        os.close(read_end)
    records = [json.loads(line) for line in bytes(reader.data).split(b"\n")[:-1]]
    warnings = [x for x in records if x.get("event") == "log_lines_dropped"]
    access = [x for x in records if x.get("logger") == "proxy.access"]
    served = [outcome for outcome in load.outcomes if outcome.result == 200]
    assert len(served) > 200, "the worker was held up by its slow reader"
    assert warnings, "lines were dropped (the reader is ~1 MB/s) but never reported"
    assert len(warnings) <= elapsed / 5.0 + 2, f"{len(warnings)} drop reports in {elapsed:.1f} s"
    assert len(access) + sum(x["dropped"] for x in warnings) == len(load.outcomes)
