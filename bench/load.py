"""The load generators: wrk (non-streaming) and bench/peers/sseload.go (concurrent SSE streams).

Every load is bounded in time: wrk by -d, sseload by its -deadline, and both by a subprocess timeout.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
from pathlib import Path

from bench.tools import Layout, Toolbox

LUA = Path(__file__).resolve().parent / "post.lua"


def run_wrk(
    box: Toolbox,
    layout: Layout,
    url: str,
    token: str,
    duration: float,
    connections: int,
    close_upstream: bool = False,
    delay_ms: int = 0,
) -> dict:
    """``close_upstream``: every request carries X-Bench-Close: 1, which the bench upstream answers
    with Connection: close (so a proxy opens a new upstream connection for each request).
    ``delay_ms``: each connection pauses that long between requests (a paced load, not a flood)."""
    threads = max(1, min(len(layout.load) or 2, 4))
    args = [
        *layout.prefix(layout.load),
        box.wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(LUA),
        url,
    ]
    env = {**os.environ, "BENCH_TOKEN": token, "BENCH_CLOSE": "1" if close_upstream else ""}
    if delay_ms:
        env["BENCH_DELAY_MS"] = str(delay_ms)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=duration + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            raw = json.loads(line[len("BENCHJSON ") :])
            break
    else:
        raise RuntimeError(
            f"wrk gave no result (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout[-500:]}"
        )
    seconds = raw["duration_us"] / 1e6
    errors = raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"]
    return {
        "requests": raw["requests"],
        "seconds": seconds,
        "rps": raw["requests"] / seconds if seconds else 0.0,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "non2xx": raw["status_errors"],
        "socket_errors": errors,
        "loadgen_cpu_s": wrk_cpu,
    }


def sseload_args(
    box: Toolbox,
    layout: Layout,
    url: str,
    token: str,
    *,
    streams: int,
    rounds: int,
    events: int,
    interval_ms: int,
    ramp_ms: int,
    ca: Path | None = None,
) -> list[str]:
    """``ca``: the CA sseload trusts for an https:// URL (direct to the HTTPS upstream)."""
    return [
        *layout.prefix(layout.load),
        box.bins["sseload"],
        "-url",
        url,
        "-token",
        token,
        "-c",
        str(streams),
        "-rounds",
        str(rounds),
        "-events",
        str(events),
        "-interval",
        str(interval_ms),
        "-ramp",
        str(ramp_ms),
        *(["-ca", str(ca)] if ca else []),
    ]


def expected_seconds(rounds: int, events: int, interval_ms: int, ramp_ms: int) -> float:
    return (ramp_ms + rounds * events * interval_ms) / 1000


def start_sseload(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )


def finish_sseload(proc: subprocess.Popen, timeout: float) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # our own child, by its handle
        proc.communicate()
        raise RuntimeError("sseload overran its deadline") from None
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"sseload gave no result (exit {proc.returncode}): {err.strip()[-500:]}") from None


def run_sseload(
    box: Toolbox, layout: Layout, url: str, token: str, ca: Path | None = None, **shape: int
) -> dict:
    proc = start_sseload(sseload_args(box, layout, url, token, ca=ca, **shape))
    return finish_sseload(
        proc, expected_seconds(shape["rounds"], shape["events"], shape["interval_ms"], shape["ramp_ms"]) + 90
    )
