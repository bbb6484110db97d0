"""Issue 18: a stalled log reader must not hold up traffic.

The deployed shape (``ProxyDeployed``: ``scripts/run -d``, one worker, supervisord writing the log
files) carries 100 SSE streams at 20 events/s and a paced small-request load (5 connections, each
pausing 1 ms between requests: ~1,000 requests/s); 2.5 s in, supervisord is stopped (SIGSTOP)
for 3 s and continued.
Each run is measured twice, without and with the stall, so the stall's figures stand beside a
baseline of the same minutes. After each load the worker's log file must hold exactly one access
line per request the upstream served.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from bench import load
from bench.peers import ProxyDeployed, Upstream
from bench.report import Figure
from bench.tables import BENCH_TOKEN
from bench.tools import Layout, Toolbox

SHAPE = {"streams": 100, "rounds": 1, "events": 160, "interval_ms": 50, "ramp_ms": 500}
QUICK_SHAPE = {**SHAPE, "events": 120}
STALL_AT = 2.5  # seconds into the load
STALL_FOR = 3.0
SMALL_CONNECTIONS = 5
SMALL_DELAY_MS = 1

FIGURES = [
    Figure("failed", "failed streams", ",.0f", ratio=False),
    Figure("delay_p50_ms", "event delay p50 (ms)", ",.2f"),
    Figure("delay_p99_ms", "event delay p99 (ms)", ",.2f"),
    Figure("delay_max_ms", "event delay max (ms)", ",.1f"),
    Figure("small_rps", "small requests (req/s over the whole load)", ",.0f"),
    Figure("small_p99_ms", "small request latency p99 (ms)", ",.2f"),
    Figure(
        "missing_lines",
        "access lines missing (served by the upstream − lines in the log)",
        ",.0f",
        ratio=False,
    ),
    Figure("cpu_pct", "CPU of the tree (% of one core)", ",.0f"),
    Figure("supervisord_cpu_pct", "of which supervisord (% of one core)", ",.1f"),
]


def access_lines(path: Path) -> int:
    """Access lines in the log file and its rotated backups (supervisord rotates at
    PROXY_LOG_MAXBYTES, 50 MB: a few runs of this load)."""
    count = 0
    for each in [path, *path.parent.glob(path.name + ".*")]:
        try:
            with open(each, "rb") as handle:
                count += sum(1 for line in handle if b'"message":"request"' in line)
        except OSError:
            pass
    return count


def settled_access_lines(path: Path, expected: int = 0, quiet: float = 2.0, timeout: float = 15.0) -> int:
    """The access lines once the log holds ``expected`` or has not grown for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, still_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = access_lines(path)
        if expected and count >= expected:
            return count
        if count != last:
            last, still_since = count, time.monotonic()
        elif time.monotonic() - still_since > quiet:
            return count
        time.sleep(0.1)
    return access_lines(path)


def run(
    box: Toolbox,
    layout: Layout,
    upstream: Upstream,
    peer: ProxyDeployed,
    *,
    stall: bool,
    quick: bool = False,
) -> dict:
    """One load through ``peer``, supervisord stopped for STALL_FOR seconds when ``stall``."""
    from bench.scenarios import Meter, part_figures  # scenarios imports this module

    shape = QUICK_SHAPE if quick else SHAPE
    seconds = load.expected_seconds(**{k: shape[k] for k in ("rounds", "events", "interval_ms", "ramp_ms")})
    log_path = peer.worker_log()
    lines_before = settled_access_lines(log_path, quiet=0.5)  # the lines of what came before are in
    served_before = upstream.stats()["requests"]
    meter = Meter(peer, [], upstream)
    sse = load.start_sseload(load.sseload_args(box, layout, peer.url, BENCH_TOKEN, **shape))
    small: dict = {}

    def paced_small() -> None:
        small.update(
            load.run_wrk(
                box, layout, peer.url, BENCH_TOKEN, seconds - 0.5, SMALL_CONNECTIONS, delay_ms=SMALL_DELAY_MS
            )
        )

    small_thread = threading.Thread(target=paced_small, daemon=True)
    small_thread.start()
    if stall:
        time.sleep(STALL_AT)
        os.kill(peer.supervisord_pid, signal.SIGSTOP)
        try:
            time.sleep(STALL_FOR)
        finally:
            os.kill(peer.supervisord_pid, signal.SIGCONT)
    out = load.finish_sseload(sse, seconds + 60)
    small_thread.join(seconds + 90)
    used = meter.done()
    served = upstream.stats()["requests"] - served_before
    lines = settled_access_lines(log_path, lines_before + served) - lines_before
    delay = out["delay_ms"]
    res = {
        "failed": out["failed"],
        "delay_p50_ms": delay["p50"],
        "delay_p99_ms": delay["p99"],
        "delay_max_ms": delay["max"],
        "small_rps": small.get("rps"),
        "small_p99_ms": small.get("p99_ms"),
        "served": served,
        "access_lines": lines,
        "missing_lines": served - lines,
        "cpu_pct": used["cpu_s"] / out["wall_s"] * 100 if out["wall_s"] else None,
    }
    part_figures(res, used, out["wall_s"])
    return res
