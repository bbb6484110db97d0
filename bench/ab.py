"""``python -m bench.ab OTHER_CHECKOUT``: one worker of another checkout against this one's.

The benchmark proper measures this checkout only, against Go; a change to the request path is
judged by an A/B of the worker before and after it, on the same machine, in the same minutes:

    git worktree add /tmp/before <commit> && ln -s "$PWD/.venv" /tmp/before/.venv
    .venv/bin/python -m bench.ab /tmp/before --runs 3

Each run starts a fresh ``python wsgi.py`` of each checkout in turn (the other one first), pinned
as the benchmark pins its 1-worker peer, with the same 1,000-token table, and puts one stream
shape through it with sseload (default: the ladder's 1,000 level, 1,000 streams of 50 events at
50 ms starting over 2 s, one round). Figures per run and medians: CPU per stream, time to first
event and event delay percentiles, peak RSS. Needs Go (the fake upstream and sseload). Everything
listens on 127.0.0.1; only the processes started here are stopped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench import load, logstall
from bench.peers import ProxyDeployed, ProxyOneWorker, Upstream
from bench.scenarios import Meter, part_figures
from bench.tables import BENCH_TOKEN, Tables
from bench.tlsca import make_certificates
from bench.tools import REPO, cpu_layout, find_tools, say

TABLE_SIZE = 1_000
STREAM_FIGURES = (  # key, heading, format
    ("cpu_per_stream_us", "CPU per stream (µs)", ",.0f"),
    ("ttfe_p50", "first event p50 (ms)", ",.1f"),
    ("ttfe_p99", "first event p99 (ms)", ",.1f"),
    ("delay_p50", "event delay p50 (ms)", ",.2f"),
    ("delay_p99", "event delay p99 (ms)", ",.2f"),
    ("delay_max", "event delay max (ms)", ",.1f"),
    ("peak_rss_mb", "peak RSS (MB)", ",.1f"),
    ("failed", "failed streams", ",.0f"),
)
# --shape stall: the deployed shape (scripts/run -d, 1 worker) with supervisord stopped for 3 s.
STALL_FIGURES = (
    ("delay_p50_ms", "event delay p50 (ms)", ",.2f"),
    ("delay_p99_ms", "event delay p99 (ms)", ",.2f"),
    ("delay_max_ms", "event delay max (ms)", ",.1f"),
    ("small_rps", "small requests (req/s)", ",.0f"),
    ("missing_lines", "access lines missing", ",.0f"),
    ("failed", "failed streams", ",.0f"),
)
# --shape small: the deployed shape under the `small` load (wrk, 64 connections, 10 s).
SMALL_FIGURES = (
    ("rps", "throughput (req/s)", ",.0f"),
    ("cpu_us_per_req", "CPU per request, whole tree (µs)", ",.0f"),
    ("supervisord_us_per_req", "of which supervisord (µs)", ",.1f"),
    ("supervisord_cpu_pct", "supervisord (% of one core)", ",.1f"),
    ("cpu_pct", "tree CPU (% of one core)", ",.0f"),
)
FIGURES = {"streams": STREAM_FIGURES, "stall": STALL_FIGURES, "small": SMALL_FIGURES}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="the other checkout (a git worktree), run first")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--interval-ms", type=int, default=50)
    parser.add_argument("--ramp-ms", type=int, default=2000)
    parser.add_argument("--tls", action="store_true", help="an HTTPS upstream (certificates made here)")
    parser.add_argument(
        "--shape",
        choices=tuple(FIGURES),
        default="streams",
        help="streams: one bare worker, the stream shape above; stall / small: the deployed shape "
        "(scripts/run -d, 1 worker, supervisord writing the logs) with supervisord stopped for 3 s "
        "under streams and small requests (bench/logstall.py), or under the `small` load",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set for this checkout's worker only (repeatable); with OTHER = . the same code A/B'd on "
        "a setting, e.g. --env STREAM_USAGE=request",
    )
    return parser.parse_args(argv)


def measure_deployed(
    layout, box, workdir: Path, upstream: Upstream, tables: Tables, repo: Path, shape: str
) -> dict:
    home = Path(tempfile.mkdtemp(prefix="peer-", dir=workdir))
    peer = ProxyDeployed(layout, home, tables, TABLE_SIZE, tls=upstream.tls, repo=repo)
    try:
        if shape == "stall":
            return logstall.run(box, layout, upstream, peer, stall=True)
        load.run_wrk(box, layout, peer.url, BENCH_TOKEN, 1, 64)  # warm-up
        meter = Meter(peer, [], upstream)
        res = load.run_wrk(box, layout, peer.url, BENCH_TOKEN, 10, 64)
        used = meter.done()
        res["cpu_us_per_req"] = used["cpu_s"] / res["requests"] * 1e6
        res["cpu_pct"] = used["cpu_s"] / res["seconds"] * 100
        part_figures(res, used, res["seconds"], res["requests"])
        return res
    finally:
        peer.stop()


def measure(
    layout, box, workdir: Path, upstream: Upstream, tables: Tables, repo: Path, shape: dict, env: dict
) -> dict:
    home = Path(tempfile.mkdtemp(prefix="peer-", dir=workdir))
    peer = ProxyOneWorker(layout, home, tables, TABLE_SIZE, tls=upstream.tls, repo=repo, extra_env=env)
    try:
        meter = Meter(peer, [], upstream)
        out = load.run_sseload(box, layout, peer.url, BENCH_TOKEN, rounds=1, **shape)
        used = meter.done()
    finally:
        peer.stop()
    ttfe, delay = out["ttfe_ms"], out["delay_ms"]
    return {
        "cpu_per_stream_us": used["cpu_s"] / shape["streams"] * 1e6,
        "ttfe_p50": ttfe["p50"],
        "ttfe_p99": ttfe["p99"],
        "delay_p50": delay["p50"],
        "delay_p99": delay["p99"],
        "delay_max": delay["max"],
        "peak_rss_mb": used["peak_rss_mb"],
        "failed": out["failed"],
    }


def report(names: list[str], results: dict[str, list[dict]], figures=STREAM_FIGURES) -> str:
    lines = [
        f"| figure | {' | '.join(names)} | ratio |",
        f"|---|{'---|' * len(names)}---|",
    ]
    for key, heading, fmt in figures:
        cells, medians = [], []
        for name in names:
            values = [r[key] for r in results[name]]
            median = statistics.median(values)
            medians.append(median)
            runs = ", ".join(format(v, fmt) for v in values)
            cells.append(f"{format(median, fmt)} [{runs}]")
        ratio = f"×{medians[1] / medians[0]:.2f}" if medians[0] else "–"
        lines.append(f"| {heading} | {' | '.join(cells)} | {ratio} |")
    return "\n".join(lines)


def _brief(figures: dict, keys) -> str:
    return ", ".join(f"{heading} {format(figures[key] or 0, fmt)}" for key, heading, fmt in keys)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    other = args.other.resolve()
    if any("=" not in item for item in args.env):
        print(f"--env takes NAME=VALUE: {args.env}", file=sys.stderr)
        return 2
    if not (other / "wsgi.py").exists():
        print(f"{other}: no wsgi.py there (a checkout of this project?)", file=sys.stderr)
        return 2
    layout = cpu_layout()
    if layout.pinned:
        os.sched_setaffinity(0, layout.load)
    workdir = Path(tempfile.mkdtemp(prefix="bench-ab-", dir="/tmp"))
    upstream = None
    try:
        box = find_tools(workdir)
        if not box.have_go:
            print("bench.ab needs Go (apt-get install golang-go)", file=sys.stderr)
            return 2
        tls = make_certificates(workdir / "tls") if args.tls else None
        upstream = Upstream(box, layout, workdir, tls=tls)
        tables = Tables(upstream.api_url)
        shape = {
            "streams": args.streams,
            "events": args.events,
            "interval_ms": args.interval_ms,
            "ramp_ms": args.ramp_ms,
        }
        this_env = dict(item.split("=", 1) for item in args.env)
        label = " ".join(args.env)
        names = [f"other ({other.name})", f"this ({REPO.name}{', ' + label if label else ''})"]
        results: dict[str, list[dict]] = {name: [] for name in names}
        for run in range(1, args.runs + 1):
            for name, repo, env in zip(names, (other, REPO), ({}, this_env), strict=True):
                if args.shape != "streams":
                    figures = measure_deployed(layout, box, workdir, upstream, tables, repo, args.shape)
                    results[name].append(figures)
                    say(f"run {run}/{args.runs} {name}: " + _brief(figures, FIGURES[args.shape]))
                    continue
                figures = measure(layout, box, workdir, upstream, tables, repo, shape, env)
                results[name].append(figures)
                say(
                    f"run {run}/{args.runs} {name}: {figures['cpu_per_stream_us']:,.0f} µs CPU per stream, "
                    f"first event p99 {figures['ttfe_p99']:,.1f} ms, "
                    f"delay p99 {figures['delay_p99']:,.2f} ms, failed {figures['failed']}"
                )
        scheme = "HTTPS" if args.tls else "plain HTTP"
        if args.shape != "streams":
            what = (
                "supervisord stopped 3 s under 100 streams + ~1,000 small requests/s (bench/logstall.py)"
                if args.shape == "stall"
                else "the `small` load (wrk, 64 connections, 10 s)"
            )
            print(
                f"\nthe deployed shape (scripts/run -d, 1 worker, whole tree pinned), {what}, {scheme} "
                f"upstream; {args.runs} alternating runs (medians [runs]); ratio = this / other\n"
            )
            print(report(names, results, FIGURES[args.shape]))
            return 0
        print(
            f"\n{args.streams:,} streams × {args.events} events at {args.interval_ms} ms, starting over "
            f"{args.ramp_ms} ms, {scheme} upstream; one worker each, {args.runs} alternating runs "
            "(medians [runs]); ratio = this / other\n"
        )
        print(report(names, results))
        return 0
    finally:
        if upstream is not None:
            upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
