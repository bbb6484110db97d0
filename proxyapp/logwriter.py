"""The worker's log writer: no request ever waits for whoever reads the log.

Under supervisord a worker's stdout is a pipe that supervisord drains into the log file. A
blocking ``write`` into a full pipe stops the whole gevent process, every stream of the worker
with it (supervisord stopped for 3 s froze every stream for 3 s). So, as the logging cookbook's
"Dealing with handlers that block" and nginx's ``access_log ... buffer=`` do, lines are appended
to memory on the request path and written elsewhere: one writer greenlet drains the buffer with
non-blocking writes on a file description of its own and, when the pipe is full, waits for it
with gevent's fd watcher like any socket.

The buffer is bounded (LOG_BUFFER_BYTES): past it new lines are dropped and counted, never
blocked on; one ``log_lines_dropped`` line says how many once writing resumes. Lines are written
whole and in order (the buffer only ever holds whole lines; a partial write leaves the rest at its
front). Writes are gathered: the first line after a quiet spell is written at once, later ones at
most every ``FLUSH_INTERVAL`` (supervisord pays per read: one write of many lines instead of one
per line).
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import stat
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

import gevent
from gevent.event import Event
from gevent.monkey import get_original
from gevent.socket import wait_write

from common.jsonlog import mask_key_shaped

log = logging.getLogger("proxy.logs")

# The OS thread's id: threading.get_ident, once patched, tells greenlets apart.
_thread_id = get_original("_thread", "get_ident")

FLUSH_INTERVAL = 0.05  # seconds between two writes under load: well inside "tail -f is live"
FLUSH_NOW_BYTES = 64 * 1024  # a pipe's worth: written without waiting for the interval
# At most one log_lines_dropped line per this many seconds: a reader that is slow rather than
# stopped lets some lines through between drops, and a line per write would flood the log.
DROP_REPORT_INTERVAL = 5.0


def open_own_description(fd: int) -> int:
    """A descriptor of what ``fd`` points to, with a file description of its own.

    O_NONBLOCK belongs to the file description, shared by every dup of it (stdout and stderr under
    ``redirect_stderr``): set on fd 1 it would make any other writer of fd 1 or 2 (a C library,
    the interpreter's last words) fail with EAGAIN. A pipe or a terminal is opened again through
    /proc, which gives a new description of the same pipe. A regular file never blocks (the page
    cache takes the write) and keeps sharing its offset; a socket cannot be reopened, so its one
    description is made non-blocking (stdout and stderr are ours, replaced by ``LineStream``)."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return os.dup(fd)
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        try:
            return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            pass
    own = os.dup(fd)
    os.set_blocking(own, False)
    return own


class LogWriter:
    """A bounded buffer of whole lines and the greenlet that writes it to ``fd``."""

    def __init__(
        self,
        fd: int,
        limit: int,
        *,
        flush_interval: float = FLUSH_INTERVAL,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        self.fd = fd
        self.limit = limit
        self.flush_interval = flush_interval
        self.on_drop = on_drop  # the metrics' counter, once they exist
        self.dropped_total = 0
        self._buffer = bytearray()
        self._dropped = 0  # since the last report
        self._first_drop = self._last_drop = 0.0
        self._reporting = False
        self._resumed = False  # a write went through since the last drop
        self._next_report = 0.0
        self._last_write = 0.0
        self._wake = Event()
        self._empty = Event()
        self._empty.set()
        self._thread = _thread_id()
        self._loop = gevent.get_hub().loop
        self._greenlet: gevent.Greenlet | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def start(self) -> LogWriter:
        self._greenlet = gevent.spawn(self._run)
        return self

    def append(self, line: bytes) -> None:
        """Queue one whole line (ending in a newline), or drop it when the buffer is full."""
        if _thread_id() != self._thread:  # a thread-pool thread: hand it to the hub
            self._loop.run_callback_threadsafe(self.append, line)
            return
        buffer = self._buffer
        if len(buffer) + len(line) > self.limit and not self._reporting:
            self._drop()
            return
        buffer += line
        if not self._wake.is_set():
            self._empty.clear()
            self._wake.set()

    def _drop(self) -> None:
        now = time.time()
        if not self._dropped:
            self._first_drop = now
        self._last_drop = now
        self._dropped += 1
        self._resumed = False
        self.dropped_total += 1
        if self.on_drop is not None:
            self.on_drop()

    def _run(self) -> None:
        while True:
            # Drops not yet reported (writing has resumed since): wake up when the report is due,
            # even if no line comes.
            pending = self._dropped and self._resumed
            due = max(0.0, self._next_report - time.monotonic()) if pending else None
            if not self._wake.wait(due):
                self._maybe_report()
                continue
            wait = self._last_write + self.flush_interval - time.monotonic()
            if wait > 0 and len(self._buffer) < FLUSH_NOW_BYTES:
                gevent.sleep(wait)  # gather what the next few ms bring into the same write
            self._wake.clear()
            try:
                self._write_buffer()
            except OSError as exc:  # the reader is gone for good (EPIPE): nothing can be written
                self._lose_buffer(exc)
            if not self._buffer:
                self._empty.set()

    def _write_buffer(self) -> None:
        buffer = self._buffer
        while buffer:
            try:
                written = os.write(self.fd, buffer)
            except BlockingIOError:
                wait_write(self.fd)  # only this greenlet waits for the reader
                continue
            except InterruptedError:
                continue
            del buffer[:written]
            self._last_write = time.monotonic()
            self._resumed = True
            if self._dropped:
                self._maybe_report()

    def _maybe_report(self) -> None:
        """The ``log_lines_dropped`` line, once writing has resumed and the last one is old enough."""
        if self._dropped and self._resumed and not self._reporting and time.monotonic() >= self._next_report:
            self._next_report = time.monotonic() + DROP_REPORT_INTERVAL
            self._report_drops()

    def _lose_buffer(self, exc: OSError) -> None:
        lost = self._buffer.count(b"\n")
        self._buffer.clear()
        for _ in range(lost):
            self._drop()
        gevent.sleep(1.0)  # no busy loop on a reader that has left

    def _report_drops(self) -> None:
        count, first, last = self._dropped, self._first_drop, self._last_drop
        self._dropped = 0
        self._reporting = True  # this one line goes in even over the bound
        try:
            log.warning(
                "log lines dropped: the log's reader did not keep up and the buffer was full",
                extra={
                    "event": "log_lines_dropped",
                    "dropped": count,
                    "first_dropped_at": _iso(first),
                    "last_dropped_at": _iso(last),
                    "buffer_bytes": self.limit,
                },
            )
        finally:
            self._reporting = False

    def flush(self, timeout: float) -> bool:
        """Wait (cooperatively) until everything buffered is written; False if time ran out.
        Drops not reported yet are reported first (a stop must not hide them)."""
        if self._dropped and not self._reporting:
            self._report_drops()
        if not self._buffer:
            return True
        self._last_write = 0.0  # no gathering wait: write now
        self._wake.set()
        self._empty.clear()
        return self._empty.wait(max(timeout, 0.0)) and not self._buffer

    def close(self, timeout: float) -> bool:
        """Flush within ``timeout`` and stop the writer; what is left then is not written."""
        flushed = self.flush(timeout)
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None
        return flushed


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class BufferedHandler(logging.Handler):
    """A logging handler that formats on the caller's greenlet and queues the line."""

    def __init__(self, writer: LogWriter) -> None:
        super().__init__()
        self.writer = writer

    def handle(self, record: logging.LogRecord) -> bool:
        # No handler lock: formatting and appending never yield to another greenlet, and other
        # threads' lines are handed to the hub by LogWriter.append.
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.writer.append(line.encode("utf-8", "backslashreplace") + b"\n")


class LineStream(io.TextIOBase):
    """``sys.stdout`` / ``sys.stderr`` of the worker: what gevent or a library prints (a greenlet's
    traceback...) goes into the same buffer, a whole line at a time, key-shaped strings masked."""

    def __init__(self, writer: LogWriter, fileno: int) -> None:
        super().__init__()
        self._writer = writer
        self._fileno = fileno
        self._partial = ""

    def write(self, text: str) -> int:
        if "\n" not in text:
            self._partial += text
            return len(text)
        whole, _, self._partial = (self._partial + text).rpartition("\n")
        self._writer.append(mask_key_shaped(whole + "\n").encode("utf-8", "backslashreplace"))
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self.write("\n")

    def fileno(self) -> int:  # faulthandler and the like write to the real descriptor
        return self._fileno

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return "utf-8"


def install(limit: int, fd: int = 1) -> LogWriter:
    """Start the worker's writer on (a description of its own of) ``fd`` and send ``sys.stdout``
    and ``sys.stderr`` through it. At interpreter exit what is left gets two more seconds."""
    writer = LogWriter(open_own_description(fd), limit).start()
    sys.stdout = LineStream(writer, 1)
    sys.stderr = LineStream(writer, 2)
    atexit.register(writer.close, 2.0)
    return writer
