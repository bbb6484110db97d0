"""The worker's view of the token table: the current routes, swapped whole on reload.

``TableStore.check()`` loads the file when its identity (inode, size, mtime, ctime) changed. After
``start_watching()``, libev's stat watcher (inotify on Linux, on the path, so it survives atomic
replaces) wakes a greenlet as soon as the file is replaced; the same greenlet also checks every
TOKEN_FILE_POLL seconds, as a fallback. A new version is parsed with short pauses so streams in
flight keep flowing, then swapped in with one reference assignment: the request path reads
``store.current.routes`` with no lock. A bad version is logged once and the last good table stays
in service.
"""

from __future__ import annotations

import logging
import os
import stat as stat_module
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlsplit

import gevent
from gevent.event import Event

from common import tokentable
from common.jsonlog import mask_secret
from proxyapp.limits import TokenLimits, limit_key_id

log = logging.getLogger("proxy.table")


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a route forwards to and with which key; shared by every token of one model."""

    origin: str  # scheme://host[:port]
    base_path: str  # the API URL's path without a trailing slash; the request path is appended
    host: str  # host[:port], for logs
    api_key: str
    bearer: str  # "Bearer <key>", built once
    masked_key: str
    model_name: str

    @classmethod
    def build(cls, api_url: str, api_key: str, model_name: str) -> Upstream:
        parts = urlsplit(api_url)
        return cls(
            origin=f"{parts.scheme}://{parts.netloc}",
            base_path=parts.path.rstrip("/"),
            host=parts.netloc,
            api_key=api_key,
            bearer="Bearer " + api_key,
            masked_key=mask_secret(api_key),
            model_name=model_name,
        )


@dataclass(frozen=True, slots=True)
class Route:
    token_id: int | str | None
    expires_at: float | None
    upstream: Upstream
    limits: TokenLimits | None = None  # effective per-token limits and Redis keys; None = unlimited


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """The defaults for every token (TOKEN_MAX_CONCURRENCY, TOKEN_RPM, TOKEN_TPM; 0 = unlimited) and
    whether a Limiter with Redis enforces them (else limits found in the table are only warned about)."""

    default_concurrency: int = 0
    default_rpm: int = 0
    enforced: bool = False
    default_tpm: int = 0

    @classmethod
    def from_config(cls, config) -> LimitSettings:
        """From a ProxyConfig: its defaults, enforced when LIMITS_REDIS_URL is set."""
        return cls(
            config.token_max_concurrency,
            config.token_rpm,
            bool(config.limits_redis_url),
            default_tpm=config.token_tpm,
        )


class FileVersion(NamedTuple):
    """What identifies one version of the file; inode numbers alone are reused after a replace."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileVersion:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class LoadedTable:
    routes: dict[str, Route]
    generated_at: str
    generated_epoch: float | None
    loaded_at: float
    version: FileVersion
    limited_tokens: int = 0  # routes with a per-token limit


def _epoch(iso_text: str) -> float | None:
    try:
        return tokentable.parse_expire_at(iso_text)
    except tokentable.TableFormatError:
        return None


def build_routes(
    table: tokentable.TokenTable,
    pause=None,
    pause_every: int = 5000,
    limits: LimitSettings = LimitSettings(),  # frozen: one shared default
    previous: Mapping[str, Route] | None = None,
) -> dict[str, Route]:
    """The routes of one table version. Each token's effective limits and Redis keys are resolved
    here, once per version (the previous version's are reused while unchanged), so the request
    path does no work for them."""
    upstreams: dict[tuple[str, str, str], Upstream] = {}
    routes: dict[str, Route] = {}
    default_concurrency, default_rpm = limits.default_concurrency, limits.default_rpm
    default_tpm = limits.default_tpm
    previous = previous or {}
    for count, (token, row) in enumerate(table.tokens.items(), 1):
        key = (row.ai_model_api_url, row.ai_model_api_key, row.ai_model_name)
        upstream = upstreams.get(key)
        if upstream is None:
            upstream = upstreams[key] = Upstream.build(*key)
        concurrency = default_concurrency if row.token_max_concurrency is None else row.token_max_concurrency
        rpm = default_rpm if row.token_rpm is None else row.token_rpm
        tpm = default_tpm if row.token_tpm is None else row.token_tpm
        token_limits = None
        if concurrency or rpm or tpm:
            before = previous.get(token)
            token_limits = before.limits if before is not None else None
            if (
                token_limits is None
                or token_limits.max_concurrency != concurrency
                or token_limits.rpm != rpm
                or token_limits.tpm != tpm
                or before.token_id != row.token_id
            ):
                token_limits = TokenLimits.build(concurrency, rpm, limit_key_id(token, row.token_id), tpm)
        routes[token] = Route(row.token_id, row.expires_at, upstream, token_limits)
        if pause is not None and count % pause_every == 0:
            pause()
    return routes


class TableStore:
    """Holds the current table (``current``, None until the first good load) and watches the file."""

    def __init__(self, path: str, poll_interval: float, limits: LimitSettings | None = None) -> None:
        self.path = path
        self.poll_interval = poll_interval
        self.limits = limits or LimitSettings()
        self.current: LoadedTable | None = None
        self.reload_failures = 0
        self.on_reject = None  # called once per rejected version (the metrics count them)
        self._rejected: FileVersion | None = None  # last bad version, logged once
        self._missing_logged = False
        self._watcher: gevent.Greenlet | None = None
        self._stat_watcher = None
        self._changed = Event()

    # -- loading

    def check(self) -> bool:
        """Load the file if it changed since the last look. Returns True when a new table was swapped in."""
        try:
            version = FileVersion.of(os.stat(self.path))
        except FileNotFoundError:
            if not self._missing_logged:
                self._missing_logged = True
                log.warning(
                    "token table file is missing; keeping the current table",
                    extra={
                        "event": "table_missing",
                        "path": self.path,
                        "table_loaded": self.current is not None,
                    },
                )
            return False
        except OSError as exc:
            self._reject(None, f"cannot stat: {exc.strerror}")
            return False
        self._missing_logged = False
        if (self.current is not None and version == self.current.version) or version == self._rejected:
            return False
        if self._being_written(version):
            return False  # looked at again at the next poll, when the writer is done
        return self._load()

    def _being_written(self, version: FileVersion) -> bool:
        """A file rewritten in place (the inode we already know) whose last write is this recent
        may still be half-written (truncated, then written): an operator's editor or ``cp``, not
        the syncer's atomic replace, which always brings a new inode and is never delayed."""
        known = (self.current.version if self.current is not None else None, self._rejected)
        in_place = any(v is not None and (v.dev, v.ino) == (version.dev, version.ino) for v in known)
        return in_place and time.time_ns() - version.mtime_ns < _IN_PLACE_QUIET_NS

    def _load(self) -> bool:
        started = time.monotonic()
        try:
            table, st = tokentable.read(self.path, pause=_pause)
            version = FileVersion.of(st)
            previous = self.current.routes if self.current is not None else None
            routes = build_routes(table, pause=_pause, limits=self.limits, previous=previous)
        except tokentable.TableFormatError as exc:
            try:
                version = FileVersion.of(os.stat(self.path))
            except OSError:
                version = None
            self._reject(version, str(exc))
            return False
        self._warn_if_readable_by_others(st)
        limited = sum(1 for route in routes.values() if route.limits is not None)
        self.current = LoadedTable(
            routes=routes,
            generated_at=table.generated_at,
            generated_epoch=_epoch(table.generated_at),
            loaded_at=time.time(),
            version=version,
            limited_tokens=limited,
        )
        self._rejected = None
        log.info(
            "token table loaded",
            extra={
                "event": "table_loaded",
                "path": self.path,
                "tokens": len(routes),
                "generated_at": table.generated_at,
                "load_ms": round((time.monotonic() - started) * 1000, 1),
                "limited_tokens": limited,
            },
        )
        if limited and not self.limits.enforced:
            # Only row overrides can get here: a default limit without Redis stops start-up.
            log.warning(
                "token table sets per-token limits but LIMITS_REDIS_URL is not set: not enforced",
                extra={"event": "limits_not_enforced", "path": self.path, "limited_tokens": limited},
            )
        return True

    def _reject(self, version: FileVersion | None, reason: str) -> None:
        if version is not None and version == self._rejected:
            return
        self._rejected = version
        self.reload_failures += 1
        if self.on_reject is not None:
            self.on_reject()
        log.error(
            "token table file rejected; keeping the last good table",
            extra={
                "event": "table_rejected",
                "path": self.path,
                "reason": reason,
                "table_loaded": self.current is not None,
            },
        )

    def _warn_if_readable_by_others(self, st: os.stat_result) -> None:
        if st.st_mode & (stat_module.S_IRWXG | stat_module.S_IRWXO):
            log.warning(
                "token table file is readable by group or others; it holds upstream keys (chmod 600)",
                extra={"event": "table_permissions", "path": self.path, "mode": oct(st.st_mode & 0o777)},
            )

    # -- watching

    def start_watching(self) -> gevent.Greenlet:
        """Check the file every ``poll_interval`` seconds, and at once when libev's stat watcher
        (inotify on Linux) sees it replaced: a new table is then served in the time it takes to
        load, not up to a poll interval later."""
        self._changed = Event()
        try:
            self._stat_watcher = gevent.get_hub().loop.stat(self.path, self.poll_interval)
            self._stat_watcher.start(self._changed.set)
        except Exception:  # polling alone still works
            self._stat_watcher = None
        self._watcher = gevent.spawn(self._watch_forever)
        return self._watcher

    def stop_watching(self) -> None:
        if self._stat_watcher is not None:
            self._stat_watcher.stop()
        if self._watcher is not None:
            self._watcher.kill(block=False)

    def _watch_forever(self) -> None:
        while True:
            if self._changed.wait(self.poll_interval):
                self._settle()
            self._changed.clear()
            try:
                self.check()
            except Exception:  # the watcher must outlive any fault; a dead watcher never reloads
                log.exception("token table watcher error", extra={"event": "table_watch_error"})

    def _settle(self, quiet: float = 0.05, longest: float = 1.0) -> None:
        # A file written in place (an operator's editor, a plain copy) fires several events: the
        # truncation, then each write. Wait until it has been quiet for a moment, so one edit is
        # one check and a half-written file is not reported as a bad version.
        deadline = time.monotonic() + longest
        while time.monotonic() < deadline:
            self._changed.clear()
            if not self._changed.wait(quiet):
                return


_IN_PLACE_QUIET_NS = 50_000_000  # 50 ms without a write before an in-place edit is read


def _pause() -> None:
    # A positive sleep, not sleep(0): sleep(0) only queues a callback, and the loop runs up to 50
    # queued callbacks before it polls sockets again, so streams would stall for ~50 pauses.
    gevent.sleep(0.001)
