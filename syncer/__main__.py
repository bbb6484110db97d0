"""``python -m syncer [--once]``: keep the token table file in step with the backend.

Signals are never handled asynchronously: they are blocked in every thread and the main thread
takes them with sigtimedwait, then only sets flags and the Event the sync loop waits on. The sync
loop runs in a daemon thread, so a fetch stuck in a socket read cannot delay a stop; the one thing
a stop waits for (briefly) is a write in progress, so no temp file is ever left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

from common import jsonlog, tokentable
from common.envparse import ConfigError
from syncer.backend import BackendClient
from syncer.config import SyncerConfig
from syncer.sync import SyncFailed, SyncResult, sync_once

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
STOP_GRACE = 0.6  # seconds a stop waits for a write in progress, within the 1 s promised
_POLL = 0.02  # how often the main thread looks whether the sync thread has finished
_MAX_WAIT = 3600.0  # Event.wait overflows on huge timeouts; wait in slices instead


class Control:
    """Flags the main thread sets and the sync loop reads; ``wake`` cuts the loop's wait short."""

    def __init__(self) -> None:
        self.stop = False
        self.sync_now = False
        self.wake = threading.Event()
        self.write_lock = threading.Lock()

    def request_sync(self) -> None:
        self.sync_now = True
        self.wake.set()

    def request_stop(self) -> None:
        self.stop = True
        self.wake.set()

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less if a sync or a stop is requested."""
        deadline = time.monotonic() + seconds
        while not (self.stop or self.sync_now):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.wake.wait(min(remaining, _MAX_WAIT))
            self.wake.clear()

    def write(self, path: str, data: bytes) -> None:
        """The atomic write, unless a stop came first (then the write is abandoned)."""
        with self.write_lock:
            if self.stop:
                raise SyncFailed("stopping: write abandoned")
            tokentable.write_atomic(path, data)


def next_delay(config: SyncerConfig, failures: int) -> float:
    """Seconds to the next sync: the interval, or after failures a backoff doubling from the
    retry base, never longer than the interval."""
    if failures == 0:
        return config.interval_seconds
    return min(config.sync_retry_base * 2.0 ** min(failures - 1, 60), config.interval_seconds)


def log_result(logger: logging.Logger, result: SyncResult, **fields: object) -> None:
    level = logging.INFO if result.ok else logging.ERROR
    logger.log(level, "sync", extra={**result.log_fields(), **fields})


def guarded_sync(config: SyncerConfig, client: BackendClient, control: Control) -> SyncResult:
    try:
        return sync_once(config, client, control.write)
    except Exception as exc:  # a bug must not end the loop silently; the next sync may work
        error = client.mask(f"internal error: {exc!r}")
        return SyncResult("failed", 0.0, config.token_file, error=error)


def sync_loop(config: SyncerConfig, client: BackendClient, control: Control, logger: logging.Logger) -> None:
    failures = 0
    trigger = "start"
    status = SyncStatus(config.metrics_dir)
    while not control.stop:
        control.sync_now = False
        result = guarded_sync(config, client, control)
        failures = 0 if result.ok else failures + 1
        status.record(result, logger)
        delay = next_delay(config, failures)
        log_result(logger, result, trigger=trigger, source=client.source, next_sync_s=round(delay, 3))
        control.sleep(delay)
        trigger = "signal" if control.sync_now else ("retry" if failures else "interval")


class SyncStatus:
    """A small JSON status file in METRICS_DIR, which the workers' /_proxy/metrics reports."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "syncer.json")
        self.state: dict[str, float | int | None] = {
            "pid": os.getpid(), "last_success": None, "last_attempt": None, "failures": 0, "tokens": None
        }  # fmt: skip

    def record(self, result: SyncResult, logger: logging.Logger) -> None:
        now = time.time()
        self.state["last_attempt"] = now
        if result.ok:
            self.state["last_success"] = now
            self.state["tokens"] = result.tokens_written
        else:
            self.state["failures"] = int(self.state["failures"] or 0) + 1
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            temp = self.path + ".tmp"
            with open(temp, "w", encoding="utf-8") as handle:
                json.dump(self.state, handle)
            os.replace(temp, self.path)
        except OSError as exc:  # metrics must never stop the syncing
            logger.warning("cannot write the status file", extra={"path": self.path, "error": str(exc)})


def finish_stop(config: SyncerConfig, control: Control, logger: logging.Logger, signum: int) -> None:
    """Let a write in progress finish (briefly), else abandon it and remove its temp file."""
    control.request_stop()
    finished = control.write_lock.acquire(timeout=STOP_GRACE)
    # Holding the lock from here on, no new write can start before the process exits.
    removed = [] if finished else tokentable.remove_stale_temp_files(config.token_file)
    logger.info(
        "stopping",
        extra={
            "signal": signal.Signals(signum).name,
            "write_abandoned": not finished,
            "removed": len(removed),
        },
    )


def wait_signal(timeout: float | None) -> int | None:
    """The next of SIGNALS (None after ``timeout`` seconds; None waits for ever)."""
    if timeout is None:
        return signal.sigwait(SIGNALS)
    info = signal.sigtimedwait(SIGNALS, timeout)
    return None if info is None else info.si_signo


def run_forever(config: SyncerConfig, client: BackendClient, logger: logging.Logger) -> int:
    control = Control()
    worker = threading.Thread(target=sync_loop, args=(config, client, control, logger), daemon=True)
    worker.start()
    while worker.is_alive():
        signum = wait_signal(0.25)
        if signum == signal.SIGHUP:
            logger.info("sync requested", extra={"signal": "SIGHUP"})
            control.request_sync()
        elif signum is not None:
            finish_stop(config, control, logger, signum)
            return 0
    logger.error("sync loop ended unexpectedly")
    return 1


def run_once(config: SyncerConfig, client: BackendClient, logger: logging.Logger) -> int:
    control = Control()
    results: list[SyncResult] = []
    worker = threading.Thread(
        target=lambda: results.append(guarded_sync(config, client, control)), daemon=True
    )
    worker.start()
    while worker.is_alive():
        signum = wait_signal(_POLL)
        if signum is not None and signum != signal.SIGHUP:
            finish_stop(config, control, logger, signum)
            print(f"syncer: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
            return 1
    result = results[0]
    log_result(logger, result, trigger="once", source=client.source)
    if not result.ok:
        print(f"syncer: sync failed: {' '.join(result.error.split())}", file=sys.stderr)
        return 1
    return 0


def idle(logger: logging.Logger) -> int:
    """Token routing is off: nothing to sync, but stay up so supervisord does not restart us."""
    while True:
        signum = wait_signal(None)
        if signum != signal.SIGHUP:
            logger.info("stopping", extra={"signal": signal.Signals(signum).name})
            return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m syncer", description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="sync once; exit 0 on success, 1 on failure")
    args = parser.parse_args(argv)
    # Blocked before any thread starts, so every thread inherits the mask and only the main
    # thread's sigtimedwait ever receives these signals.
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        config = SyncerConfig.from_env()
    except ConfigError as exc:
        print(f"syncer: configuration error: {exc}", file=sys.stderr)
        return 2
    logger = jsonlog.setup(config.log_level, "syncer")
    if not config.enable_token_routing:
        logger.info("token routing disabled (ENABLE_TOKEN_ROUTING=false): nothing to sync")
        return 0 if args.once else idle(logger)
    try:
        removed = tokentable.remove_stale_temp_files(config.token_file)
    except OSError as exc:  # e.g. a directory we may not list; the sync will say more
        logger.warning("cannot remove stale temp files", extra={"error": str(exc)})
        removed = []
    if removed:
        logger.info("removed stale temp files", extra={"count": len(removed), "files": removed})
    client = BackendClient(
        config.server_api_url,
        api_token=config.server_api_token,
        username=config.server_api_username,
        password=config.server_api_password,
        timeout=config.sync_timeout,
        secrets=config.secrets(),
        ca_bundle=config.server_api_ca_bundle,
    )
    auth = "login" if config.login_mode else ("bearer" if config.server_api_token else "none")
    logger.info(
        "syncer started",
        extra={
            "source": client.source,
            "file": config.token_file,
            "auth": auth,
            "once": args.once,
            "interval_s": config.interval_seconds,
            "timeout_s": config.sync_timeout,
            "retry_base_s": config.sync_retry_base,
            "allow_empty": config.sync_allow_empty,
        },
    )
    return run_once(config, client, logger) if args.once else run_forever(config, client, logger)


if __name__ == "__main__":
    sys.exit(main())
