"""Prometheus metrics of the whole deployment, through prometheus_client's multiprocess mode.

Each worker writes every value into its own mmap'd files in METRICS_DIR (the library's
PROMETHEUS_MULTIPROC_DIR, wiped by scripts/run at start) at the moment it changes;
``/_proxy/metrics`` on any worker merges the files of every worker, so two scrapes answered by
different workers read the same figures. Counters and histograms of workers that have exited stay
in the sums, so nothing goes backwards when a worker restarts. The gauges of live state
(``livesum``: in-flight requests and streams, workers; ``livemax``: the table figures) count live
workers only: a worker removes its live files when it exits normally (``close``), and the
scraping worker removes those of a pid that is gone (a worker killed with SIGKILL runs nothing).
The syncer's figures come from its status file, ``syncer.json``, through a custom collector.

One request's metric updates stay on the request path (``observe``, from Exchange.finish): the
labelled series are looked up once per label set and cached, and each update is one write into
the mmap'd file.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from bisect import bisect_left

import gevent
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

log = logging.getLogger("proxy.metrics")

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the text format, version 0.0.4
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
USAGE_KINDS = (
    ("prompt_tokens", "prompt"),
    ("completion_tokens", "completion"),
    ("cached_tokens", "cached"),
    ("cache_creation_tokens", "cache_creation"),
    ("reasoning_tokens", "reasoning"),
)
_UPSTREAM_ERROR_KIND = {
    "upstream_error": "upstream_error",
    "upstream_timeout": "timeout",
    "total_timeout": "total_timeout",
}
UPSTREAM_ERROR_KINDS = ("unreachable", "upstream_error", "timeout", "total_timeout")
_CLIENT_GONE = ("client_gone", "client_send_timeout")


def _use_multiprocess_files(directory: str) -> None:
    """Make every metric created from now on in this process live in ``directory``.

    prometheus_client picks its value class when ``prometheus_client.values`` is first imported,
    from PROMETHEUS_MULTIPROC_DIR (values.get_value_class); this worker imports the library before
    its configuration is read, so the multiprocess class is installed here, before any metric
    exists. One directory per process: labelled series created later use the same class.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.MultiProcessValue()
    # A worker that got the pid of a killed one would start from that one's live gauges.
    mark_process_dead(os.getpid(), directory)


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc here: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class DeploymentFiles:
    """Collector: the merged files of every worker, live gauges of vanished pids left out."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self):
        kept = []
        for path in sorted(glob.glob(os.path.join(self.directory, "*.db"))):  # sorted: same sums
            name = os.path.basename(path)  # <type>_<pid>.db, gauge_<mode>_<pid>.db
            if name.startswith("gauge_live"):
                try:
                    pid = int(name[:-3].rsplit("_", 1)[1])
                except ValueError:
                    continue
                if not _alive(pid):  # killed: nobody ran mark_process_dead for it
                    mark_process_dead(pid, self.directory)
                    continue
            try:
                if os.path.getsize(path) == 0:  # created this instant, not sized yet
                    continue
            except OSError:
                continue
            kept.append(path)
        return MultiProcessCollector.merge(kept, accumulate=True)


class SyncerStatus:
    """Collector: the figures the syncer leaves in its status file (syncer/__main__.py)."""

    _GAUGES = (
        (
            "last_success",
            "llmproxy_syncer_last_success_timestamp_seconds",
            "When the syncer last wrote the table.",
        ),
        (
            "last_attempt",
            "llmproxy_syncer_last_attempt_timestamp_seconds",
            "When the syncer last tried a sync.",
        ),
        ("tokens", "llmproxy_syncer_tokens", "Tokens written by the last successful sync."),
    )

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self):
        try:
            with open(self.path, encoding="utf-8") as handle:
                status = json.load(handle)
        except (OSError, ValueError):
            return []
        if not isinstance(status, dict):
            return []
        families = []
        for field, name, help_text in self._GAUGES:
            value = status.get(field)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                families.append(GaugeMetricFamily(name, help_text, value=value))
        failures = status.get("failures")
        if isinstance(failures, (int, float)) and not isinstance(failures, bool):
            families.append(
                CounterMetricFamily(
                    "llmproxy_syncer_failures", "Failed syncs since the syncer started.", value=failures
                )
            )
        return families


def _add(value, amount: float) -> None:
    """``MmapedValue.inc`` without its lock and fork check: the same value, file and key.

    The library's inc also takes a lock (a gevent lock once monkey-patched: never contended, as
    nothing inside it can yield) and calls getpid(), about 1 µs per update against 0.3, and a
    request makes 9. A worker is one OS thread and never forks once its metrics exist, so neither
    matters here; only observe() updates these series. bench/observe.py measures the whole.
    """
    value._value += amount
    value._file.write_value(value._key, value._value, 0.0)


def _observe(histogram, seconds: float) -> None:
    """``Histogram.observe`` through ``_add``: the sum and the one bucket the value falls in."""
    _add(histogram._sum, seconds)
    _add(histogram._buckets[bisect_left(histogram._upper_bounds, seconds)], 1)


class _Series:
    """The values one (model, status, end reason) updates, looked up once (see observe)."""

    __slots__ = ("duration", "extra", "request_bytes", "requests", "response_bytes", "ttfb", "usage")

    def __init__(self, metrics: WorkerMetrics, model: str, status: int, reason: str) -> None:
        self.requests = metrics.requests_total.labels(model, f"{status // 100}xx", reason)._value
        per_model = metrics.model_series(model)
        self.request_bytes, self.response_bytes, self.duration, self.ttfb, self.usage = per_model
        extra = []  # counted once each
        if reason in _CLIENT_GONE:
            extra.append(metrics.client_gone_total.labels(model)._value)
        kind = _UPSTREAM_ERROR_KIND.get(reason)
        if kind is not None:
            if reason == "upstream_error" and status >= 500:
                kind = "unreachable" if status == 502 else kind
            extra.append(metrics.upstream_errors_total.labels(kind)._value)
        self.extra = tuple(extra)


_COUNTERS = (  # attribute, name, help, labels
    (
        "requests_total",
        "llmproxy_requests_total",
        "Requests by model, status class and end reason.",
        ("model", "status_class", "end_reason"),
    ),
    ("request_bytes_total", "llmproxy_request_bytes_total", "Request body bytes received.", ("model",)),
    ("response_bytes_total", "llmproxy_response_bytes_total", "Response body bytes sent.", ("model",)),
    (
        "usage_tokens_total",
        "llmproxy_usage_tokens_total",
        "Tokens reported by upstreams, by model and kind.",
        ("model", "kind"),
    ),
    (
        "client_gone_total",
        "llmproxy_client_gone_total",
        "Requests whose client left before the end.",
        ("model",),
    ),
    ("upstream_errors_total", "llmproxy_upstream_errors_total", "Upstream failures by kind.", ("kind",)),
)
_HISTOGRAMS = (
    ("request_duration", "llmproxy_request_duration_seconds", "Time from the request to the last byte."),
    ("ttfb", "llmproxy_ttfb_seconds", "Time from the request to the first body byte of the answer."),
)
# Live state, summed over live workers.
_LIVE_SUMS = (
    ("workers", "llmproxy_workers", "Worker processes alive."),
    ("in_flight_requests", "llmproxy_in_flight_requests", "Requests being forwarded now."),
    ("in_flight_streams_gauge", "llmproxy_in_flight_streams", "Event streams being forwarded now."),
    ("in_flight_websockets_gauge", "llmproxy_in_flight_websockets", "WebSocket sessions being relayed now."),
)
# Every worker serves the same file: their figures agree but for the moment of a reload, and a sum
# would count the table once per worker. The largest among live workers: the table's size, its
# last load, and for the age the oldest table still served (a worker that missed a reload shows).
_TABLE_GAUGES = (
    ("table_tokens", "llmproxy_table_tokens", "Tokens in the table the workers serve."),
    ("table_age", "llmproxy_table_age_seconds", "Age of the oldest table served (now - generated_at)."),
    (
        "table_last_reload",
        "llmproxy_table_last_reload_timestamp_seconds",
        "When a worker last loaded a table.",
    ),
)


class WorkerMetrics:
    """This worker's metrics (written into METRICS_DIR as they change) and the scrape registry."""

    def __init__(
        self,
        directory: str,
        *,
        store=None,
        in_flight=lambda: 0,
        limiter=None,
        sync_interval_seconds: float = 0.0,
        configured_workers: int = 0,
    ) -> None:
        self.directory = directory
        self.store = store
        self.limiter = limiter if limiter is not None and limiter.enabled else None
        self.in_flight = in_flight
        self.pid = os.getpid()
        _use_multiprocess_files(directory)
        for attribute, name, help_text, labels in _COUNTERS:
            setattr(self, attribute, Counter(name, help_text, labels, registry=None))
        # Every kind at 0 from the start: a series that appears with its first error already counted
        # is invisible to rate() and increase(), so the first failures after a start would never
        # reach LLMProxyUpstreamErrorRatio (deploy/prometheus/alerts.yml).
        for kind in UPSTREAM_ERROR_KINDS:
            self.upstream_errors_total.labels(kind)
        for attribute, name, help_text in _HISTOGRAMS:
            histogram = Histogram(name, help_text, ("model",), registry=None, buckets=DURATION_BUCKETS)
            setattr(self, attribute, histogram)
        for attribute, name, help_text in _LIVE_SUMS:
            setattr(self, attribute, Gauge(name, help_text, registry=None, multiprocess_mode="livesum"))
        self.workers.set(1)
        self._streams = 0
        self.log_lines_dropped_total = Counter(
            "llmproxy_log_lines_dropped_total",
            "Log lines dropped because the worker's log buffer was full (LOG_BUFFER_BYTES).",
            registry=None,
        )
        self._websockets = 0
        self._setting_gauges: list[Gauge] = []
        self._settings(sync_interval_seconds if store is not None else 0.0, configured_workers)
        if store is not None:
            for attribute, name, help_text in _TABLE_GAUGES:
                setattr(self, attribute, Gauge(name, help_text, registry=None, multiprocess_mode="livemax"))
            self.table_reload_failures_total = Counter(
                "llmproxy_table_reload_failures_total",
                "Table file versions rejected, all workers.",
                registry=None,
            )
            if store.reload_failures:
                self.table_reload_failures_total.inc(store.reload_failures)
            store.on_reject = self.table_reload_failures_total.inc
        if self.limiter is not None:
            self._limiter_counts = {"outages": 0, "unenforced": 0}  # what the files hold already
            refused = Counter(
                "llmproxy_rate_limited_total",
                "Requests refused with 429 by a per-token limit, by limit.",
                ("limit",),
                registry=None,
            )
            self.rate_limited = {
                limit: refused.labels(limit)._value for limit in ("concurrency", "rpm", "tpm")
            }
            self.usage_estimated_total = Counter(
                "llmproxy_usage_estimated_total",
                "Requests of TPM-limited tokens counted by the estimate (no usage from the upstream).",
                ("model",),
                registry=None,
            )
            self.limiter_outages_total = Counter(
                "llmproxy_limiter_outages_total",
                "Times a worker found the limits' Redis unreachable.",
                registry=None,
            )
            self.limiter_unenforced_total = Counter(
                "llmproxy_limiter_unenforced_total",
                "Requests of limited tokens served unchecked while Redis was down.",
                registry=None,
            )
            self.limiter_redis_down = Gauge(
                "llmproxy_limiter_redis_down",
                "Workers that see the limits' Redis down now.",
                registry=None,
                multiprocess_mode="livesum",
            )
        self._series: dict[tuple, _Series] = {}
        self._models: dict[str, tuple] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DeploymentFiles(directory))
        self.registry.register(SyncerStatus(os.path.join(directory, "syncer.json")))
        self._refresher: gevent.Greenlet | None = None
        self.refresh()

    def _settings(self, sync_interval_seconds: float, configured_workers: int) -> None:
        """Configuration the alert rules compare with (deploy/prometheus/alerts.yml): a rule cannot
        know SYNC_INTERVAL or PROXY_WORKERS otherwise. Every worker reads the same environment, so
        the largest among live workers is that value; absent when not configured."""
        for name, help_text, value in (
            ("llmproxy_sync_interval_seconds", "SYNC_INTERVAL in seconds.", sync_interval_seconds),
            ("llmproxy_workers_configured", "PROXY_WORKERS: workers started.", configured_workers),
        ):
            if value:
                gauge = Gauge(name, help_text, registry=None, multiprocess_mode="livemax")
                gauge.set(value)
                self._setting_gauges.append(gauge)

    # -- the request path

    @property
    def in_flight_streams(self) -> int:
        return self._streams

    @in_flight_streams.setter
    def in_flight_streams(self, value: int) -> None:  # forward.py: += 1 / -= 1 around a stream
        self._streams = value
        self.in_flight_streams_gauge.set(value)

    @property
    def in_flight_websockets(self) -> int:
        return self._websockets

    @in_flight_websockets.setter
    def in_flight_websockets(self, value: int) -> None:  # forward.py: += 1 / -= 1 around a session
        self._websockets = value
        self.in_flight_websockets_gauge.set(value)

    def observe(self, record) -> None:
        """Count one finished request, from its access record (proxyapp.logs.AccessRecord)."""
        model = record.model_name
        status = record.status
        reason = record.end_reason
        series = self._series.get((model, status, reason))
        if series is None:
            series = self._series[(model, status, reason)] = _Series(self, model, status, reason)
        _add(series.requests, 1)
        _add(series.request_bytes, len(record.request_body))
        _add(series.response_bytes, record.response_bytes)
        duration = record.duration
        if duration is not None:
            _observe(series.duration, duration)
        ttfb = record.ttfb
        if ttfb is not None:
            _observe(series.ttfb, ttfb)
        for value in series.extra:
            _add(value, 1)
        if record.limit is not None:
            _add(self.rate_limited[record.limit], 1)
        if record.usage_estimated:
            self.usage_estimated_total.labels(model).inc()
        usage = record.usage
        if usage:
            for field, value in series.usage:
                tokens = usage.get(field)
                if tokens:
                    _add(value, tokens)

    def model_series(self, model: str) -> tuple:
        found = self._models.get(model)
        if found is None:
            usage = tuple(
                (field, self.usage_tokens_total.labels(model, kind)._value) for field, kind in USAGE_KINDS
            )
            found = self._models[model] = (
                self.request_bytes_total.labels(model)._value,
                self.response_bytes_total.labels(model)._value,
                self.request_duration.labels(model),
                self.ttfb.labels(model),
                usage,
            )
        return found

    # -- state sampled, not counted: in-flight requests and the table

    def refresh(self) -> None:
        """Write this worker's sampled gauges (once a second, and before answering a scrape)."""
        self.in_flight_requests.set(self.in_flight())
        limiter = self.limiter
        if limiter is not None:  # the limiter counts; the files catch up here, exactly
            seen = self._limiter_counts
            for name, counter, total in (
                ("outages", self.limiter_outages_total, limiter.outages_total),
                ("unenforced", self.limiter_unenforced_total, limiter.unenforced_total),
            ):
                if total > seen[name]:
                    counter.inc(total - seen[name])
                    seen[name] = total
            self.limiter_redis_down.set(1 if limiter.down_since is not None else 0)
        store = self.store
        if store is None:
            return
        table = store.current
        self.table_tokens.set(len(table.routes) if table is not None else 0)
        if table is not None:
            self.table_last_reload.set(table.loaded_at)
            if table.generated_epoch:
                self.table_age.set(round(time.time() - table.generated_epoch, 3))

    def start_refresher(self, interval: float = 1.0) -> gevent.Greenlet:
        def run() -> None:
            while True:
                gevent.sleep(interval)
                try:
                    self.refresh()
                except Exception:  # metrics must never take the worker down
                    log.exception("cannot refresh the metrics", extra={"event": "metrics_error"})

        self.refresh()
        self._refresher = gevent.spawn(run)
        return self._refresher

    # -- scrape and exit

    def render(self) -> bytes:
        """The exposition text of the whole deployment (this worker's sampled gauges fresh)."""
        self.refresh()
        return generate_latest(self.registry)

    def count_log_drops(self, writer) -> None:
        """Count the lines ``writer`` (proxyapp.logwriter.LogWriter) drops, those before now too."""
        if writer.dropped_total:
            self.log_lines_dropped_total.inc(writer.dropped_total)
        writer.on_drop = self.log_lines_dropped_total.inc

    def close(self) -> None:
        """On a normal exit: this worker leaves the live gauges; its counters stay in the sums."""
        if self._refresher is not None:
            self._refresher.kill(block=False)
        mark_process_dead(self.pid, self.directory)
