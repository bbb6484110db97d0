"""Prometheus metrics, aggregated over all worker processes, in the text exposition format.

Each worker counts in memory (a few dict updates per request, none per chunk) and writes a
snapshot file into METRICS_DIR every second (atomically). ``/_proxy/metrics`` on any worker sums
the snapshots of every worker that ever ran since the directory was cleaned (scripts/run cleans it
at start), so counters never go backwards when a worker restarts; gauges count live workers only.
The syncer writes its own small status file there. Written by hand because the runtime packages
are fixed (no prometheus_client); the format is the plain text one, version 0.0.4.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict

import gevent

log = logging.getLogger("proxy.metrics")

PREFIX = "llmproxy_"
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

_HELP = {
    "requests_total": ("counter", "Requests by model, status class and end reason."),
    "request_duration_seconds": ("histogram", "Time from the request to the last byte."),
    "ttfb_seconds": ("histogram", "Time from the request to the first body byte of the answer."),
    "request_bytes_total": ("counter", "Request body bytes received."),
    "response_bytes_total": ("counter", "Response body bytes sent."),
    "usage_tokens_total": ("counter", "Tokens reported by upstreams, by model and kind."),
    "client_gone_total": ("counter", "Requests whose client left before the end."),
    "upstream_errors_total": ("counter", "Upstream failures by kind."),
    "in_flight_requests": ("gauge", "Requests being forwarded now."),
    "in_flight_streams": ("gauge", "Event streams being forwarded now."),
    "table_tokens": ("gauge", "Tokens in the table this worker serves."),
    "table_age_seconds": ("gauge", "Age of the table (now - generated_at)."),
    "table_last_reload_timestamp_seconds": ("gauge", "When this worker last loaded a table."),
    "table_reload_failures_total": ("counter", "Table file versions rejected, all workers."),
    "workers": ("gauge", "Worker processes alive."),
    "syncer_last_success_timestamp_seconds": ("gauge", "When the syncer last wrote the table."),
    "syncer_last_attempt_timestamp_seconds": ("gauge", "When the syncer last tried a sync."),
    "syncer_failures_total": ("counter", "Failed syncs since the syncer started."),
    "syncer_tokens": ("gauge", "Tokens written by the last successful sync."),
}


def default_dir(token_file: str) -> str:
    run_dir = os.environ.get("PROXY_RUN_DIR")
    if run_dir:
        return os.path.join(run_dir, "metrics")
    return os.path.join(os.path.dirname(token_file), "metrics")


class WorkerMetrics:
    """This worker's counters and histograms, plus its snapshot file."""

    def __init__(self, directory: str, *, store=None, in_flight=lambda: 0) -> None:
        self.directory = directory
        self.store = store
        self.in_flight = in_flight
        self.pid = os.getpid()
        self.counters: dict[tuple, float] = defaultdict(float)
        self.histograms: dict[tuple, list] = {}
        self.in_flight_streams = 0
        self.seen_files: set[str] = set()  # other workers' snapshot names, for render()

    # -- the request path

    def observe(self, record) -> None:
        """Count one finished request, from its access record (proxyapp.logs.AccessRecord)."""
        model = record.model_name
        status = record.status
        reason = record.end_reason
        counters = self.counters
        counters[
            (
                "requests_total",
                ("model", model),
                ("status_class", f"{status // 100}xx"),
                ("end_reason", reason),
            )
        ] += 1
        counters[("request_bytes_total", ("model", model))] += len(record.request_body)
        counters[("response_bytes_total", ("model", model))] += record.response_bytes
        self._histogram("request_duration_seconds", model, record.duration)
        ttfb = record.ttfb
        if ttfb is not None:
            self._histogram("ttfb_seconds", model, ttfb)
        if reason in ("client_gone", "client_send_timeout"):
            counters[("client_gone_total", ("model", model))] += 1
        kind = _UPSTREAM_ERROR_KIND.get(reason)
        if kind is not None:
            if reason == "upstream_error" and status >= 500:
                kind = "unreachable" if status == 502 else kind
            counters[("upstream_errors_total", ("kind", kind))] += 1
        usage = record.usage
        if usage:
            for field, usage_kind in USAGE_KINDS:
                value = usage.get(field)
                if value:
                    counters[("usage_tokens_total", ("model", model), ("kind", usage_kind))] += value

    def _histogram(self, name: str, model: str, seconds: float) -> None:
        key = (name, ("model", model))
        histogram = self.histograms.get(key)
        if histogram is None:
            histogram = self.histograms[key] = [[0] * (len(DURATION_BUCKETS) + 1), 0.0, 0]
        buckets = histogram[0]
        for index, bound in enumerate(DURATION_BUCKETS):
            if seconds <= bound:
                buckets[index] += 1
                break
        else:
            buckets[-1] += 1
        histogram[1] += seconds
        histogram[2] += 1

    # -- snapshots

    def snapshot(self) -> dict:
        counters = [[list(key[1:]), key[0], value] for key, value in self.counters.items()]
        if self.store is not None:
            counters.append([[], "table_reload_failures_total", self.store.reload_failures])
        return {
            "pid": self.pid,
            "counters": counters,
            "histograms": [[list(key[1:]), key[0], h[0], h[1], h[2]] for key, h in self.histograms.items()],
            "gauges": {"in_flight_requests": self.in_flight(), "in_flight_streams": self.in_flight_streams},
        }

    def write_snapshot(self) -> None:
        # Gauges change without requests finishing; a snapshot a second is cheap enough.
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        path = os.path.join(self.directory, f"worker-{self.pid}.json")
        temp = path + ".tmp"
        with open(temp, "w", encoding="utf-8") as handle:
            json.dump(self.snapshot(), handle)
        os.replace(temp, path)

    def start_writer(self, interval: float = 1.0) -> gevent.Greenlet:
        def run() -> None:
            try:  # at once, so a worker counts among the live ones from its first second
                self.write_snapshot()
            except Exception:
                log.exception("cannot write the metrics snapshot", extra={"event": "metrics_error"})
            while True:
                gevent.sleep(interval)
                try:
                    self.write_snapshot()
                except Exception:  # metrics must never take the worker down
                    log.exception("cannot write the metrics snapshot", extra={"event": "metrics_error"})

        return gevent.spawn(run)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs) -> str:
    if not pairs:
        return ""
    escaped = (f'{name}="{_escape(value)}"' for name, value in pairs)
    return "{" + ",".join(escaped) + "}"


def render(worker: WorkerMetrics, *, syncer_status_path: str | None) -> str:
    """The exposition text: every worker's snapshot summed, this worker's live state included."""
    snapshots = {worker.pid: worker.snapshot()}
    live = {worker.pid}
    try:
        names = set(os.listdir(worker.directory))
    except OSError:
        names = set()
    # A listing taken while another worker renames its snapshot into place may miss that name
    # (readdir during a rename is unspecified): files seen once are opened by path every time.
    names |= worker.seen_files
    for name in sorted(names):
        if not (name.startswith("worker-") and name.endswith(".json")):
            continue
        try:
            pid = int(name[7:-5])
        except ValueError:
            continue
        if pid == worker.pid:
            continue
        try:
            with open(os.path.join(worker.directory, name), encoding="utf-8") as handle:
                snapshots[pid] = json.load(handle)
        except (OSError, ValueError):
            worker.seen_files.discard(name)
            continue
        worker.seen_files.add(name)
        if _alive(pid):
            live.add(pid)
    counters: dict[tuple, float] = defaultdict(float)
    histograms: dict[tuple, list] = {}
    for snap in snapshots.values():
        for labels, name, value in snap.get("counters", ()):
            counters[(name, tuple(tuple(p) for p in labels))] += value
        for labels, name, buckets, total, count in snap.get("histograms", ()):
            key = (name, tuple(tuple(p) for p in labels))
            merged = histograms.setdefault(key, [[0] * len(buckets), 0.0, 0])
            merged[0] = [a + b for a, b in zip(merged[0], buckets, strict=False)]
            merged[1] += total
            merged[2] += count
    gauges: dict[tuple, float] = defaultdict(float)
    gauges[("workers", ())] = len(live)
    for pid in live:
        for name, value in snapshots[pid].get("gauges", {}).items():
            gauges[(name, ())] += value
    store = worker.store
    if store is not None:
        table = store.current
        gauges[("table_tokens", ())] = len(table.routes) if table else 0
        if table is not None:
            gauges[("table_last_reload_timestamp_seconds", ())] = table.loaded_at
            if table.generated_epoch:
                gauges[("table_age_seconds", ())] = round(time.time() - table.generated_epoch, 3)
    if syncer_status_path:
        _add_syncer(syncer_status_path, gauges, counters)
    return _format(counters, histograms, gauges)


def _add_syncer(path: str, gauges: dict, counters: dict) -> None:
    try:
        with open(path, encoding="utf-8") as handle:
            status = json.load(handle)
    except (OSError, ValueError):
        return
    for field, name in (
        ("last_success", "syncer_last_success_timestamp_seconds"),
        ("last_attempt", "syncer_last_attempt_timestamp_seconds"),
        ("tokens", "syncer_tokens"),
    ):
        if isinstance(status.get(field), (int, float)):
            gauges[(name, ())] = status[field]
    if isinstance(status.get("failures"), (int, float)):
        counters[("syncer_failures_total", ())] = status["failures"]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _format(counters: dict, histograms: dict, gauges: dict) -> str:
    by_name: dict[str, list[str]] = defaultdict(list)
    for (name, labels), value in sorted(counters.items()):
        by_name[name].append(f"{PREFIX}{name}{_labels(labels)} {_number(value)}")
    for (name, labels), value in sorted(gauges.items()):
        by_name[name].append(f"{PREFIX}{name}{_labels(labels)} {_number(value)}")
    for (name, labels), (buckets, total, count) in sorted(histograms.items()):
        cumulative = 0
        for bound, bucket in zip((*DURATION_BUCKETS, "+Inf"), buckets, strict=False):
            cumulative += bucket
            le = bound if isinstance(bound, str) else f"{bound:g}"
            by_name[name].append(f"{PREFIX}{name}_bucket{_labels((*labels, ('le', le)))} {cumulative}")
        by_name[name].append(f"{PREFIX}{name}_sum{_labels(labels)} {total:.6f}")
        by_name[name].append(f"{PREFIX}{name}_count{_labels(labels)} {count}")
    lines = []
    for name in sorted(by_name):
        kind, help_text = _HELP.get(name, ("untyped", name))
        lines.append(f"# HELP {PREFIX}{name} {help_text}")
        lines.append(f"# TYPE {PREFIX}{name} {kind}")
        lines.extend(by_name[name])
    return "\n".join(lines) + "\n"
