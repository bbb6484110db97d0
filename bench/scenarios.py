"""The scenarios. Each starts its peers, runs every peer once per round in the order a, b, c, d
(rounds interleaved, so a drift of the machine hits every peer alike), stops them, and returns the
result dict that bench/report.py writes. The ``-tls`` variants (and ``tlsconn``) do the same against
the fake upstream over HTTPS (a second upstream process, started on first use)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import load, procstat
from bench import logstall as logstall_load
from bench.peers import (
    CHAT_BODY,
    Direct,
    GoReference,
    Peer,
    ProxyDeployed,
    ProxyOneWorker,
    ProxyOneWorkerLimits,
    ProxyOneWorkerLimitsTpm,
    ProxySupervised,
    RedisServer,
    Upstream,
    request,
)
from bench.report import GO, Figure, Target, get, summarize
from bench.tables import BENCH_TOKEN, Tables, replace
from bench.tlsca import TlsFiles
from bench.tools import Layout, Toolbox, machine_facts, say

TABLE_SIZE = 1000  # tokens in the table every peer starts with
BIG_TABLE = 100_000


@dataclass
class Context:
    box: Toolbox
    layout: Layout
    workdir: Path
    tables: Tables
    upstream: Upstream
    quick: bool
    runs: int
    only: str  # peer keys to run
    # The HTTPS upstream, its tables and certificates, made on first use (None: cannot be made).
    https: Callable[[], tuple[Upstream, Tables, TlsFiles]] | None = None
    tls: TlsFiles | None = None  # set in the context of an HTTPS scenario
    summaries: dict[str, dict] = field(default_factory=dict)  # scenario -> summary, this invocation


class Skip(Exception):
    """The scenario cannot run on this machine; the message says why."""


def over_tls(ctx: Context) -> Context:
    """The context of an HTTPS scenario: the HTTPS upstream, tables routing to it, its CA."""
    if not ctx.box.have_go:
        raise Skip("the HTTPS upstream is bench/peers/upstream.go: needs Go (`apt-get install golang-go`)")
    if ctx.https is None:
        raise Skip("no HTTPS upstream available")
    try:
        upstream, tables, files = ctx.https()
    except RuntimeError as exc:
        raise Skip(f"no HTTPS upstream: {exc}") from None
    return dataclasses.replace(ctx, upstream=upstream, tables=tables, tls=files)


def run_pause(ctx: Context, pause: float) -> float:
    """Over HTTPS, runs are further apart than the upstream's idle timeout, so that every run starts
    with no pooled upstream connection (each pays its own TLS handshakes)."""
    return max(pause, Upstream.IDLE_TIMEOUT_TLS + 1.0) if ctx.tls else pause


def start_peers(
    ctx: Context,
    name: str,
    notes: list[str],
    keys: str = "abcd",
    makers: dict[str, Callable[[Path], Peer]] | None = None,
) -> dict[str, Peer]:
    """``makers``: a scenario's own peers (key -> maker of the peer in a directory), instead of
    a b c d; a key is run when its first letter is in ``keys`` and in --peers (c+ with c)."""
    home = ctx.workdir / name
    home.mkdir()
    peers: dict[str, Peer] = {}
    makers = makers or {
        "a": lambda home: Direct(ctx.upstream),
        "b": lambda home: GoReference(ctx.box, ctx.layout, home, ctx.tables, TABLE_SIZE, ctx.tls),
        "c": lambda home: ProxyOneWorker(ctx.layout, home, ctx.tables, TABLE_SIZE, ctx.tls),
        "d": lambda home: ProxySupervised(ctx.layout, home, ctx.tables, TABLE_SIZE, ctx.tls),
        "e": lambda home: ProxyDeployed(ctx.layout, home, ctx.tables, TABLE_SIZE, ctx.tls),
    }
    for key, maker in makers.items():
        if key[0] not in ctx.only or key[0] not in keys:
            continue
        if key == "b" and not ctx.box.have_go:
            notes.append(
                "Go reference skipped: no Go toolchain ("
                + (ctx.box.build_error or "`go` not found")
                + "); install with `apt-get install golang-go`."
            )
            continue
        try:
            peers[key] = maker(home)
            say(f"  started {peers[key].label} on 127.0.0.1:{peers[key].port}")
        except Exception as exc:  # one peer that cannot start must not sink the others
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            short = " / ".join(lines[:1] + lines[-3:] if len(lines) > 4 else lines)
            notes.append(f"peer {key} did not start: {short}"[:800])
            say(f"  NOTE: peer {key} did not start: {exc}")
            if ctx.tls and key in "cd" and "certificate" in str(exc).lower():
                notes.append(
                    f"peer {key}: our proxy did not accept the bench CA given in UPSTREAM_CA_BUNDLE "
                    "(a build without that setting verifies against certifi's bundle only)"
                )
    return peers


def stop_peers(peers: dict[str, Peer]) -> None:
    for peer in reversed(list(peers.values())):
        try:
            peer.stop()
        except Exception as exc:
            say(f"  NOTE: stopping {peer.label}: {exc}")


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += procstat.cpu_seconds(pid)
        except OSError:
            pass
    return total


class Meter:
    """CPU seconds and peak RSS of a peer's processes over one measurement."""

    def __init__(self, peer: Peer, notes: list[str], upstream: Upstream) -> None:
        self.peer, self.notes, self.upstream_pid = peer, notes, upstream.proc.pid
        self.upstream0 = cpu_of([self.upstream_pid])
        self.pids = peer.pids()
        for pid in self.pids:
            procstat.reset_peak_rss(pid)
        self.cpu0 = cpu_of(self.pids)
        # Parts of the peer measured apart (the deployed peer's supervisord): their own CPU.
        self.parts = peer.parts() if hasattr(peer, "parts") else {}
        self.parts0 = {name: cpu_of(pids) for name, pids in self.parts.items()}
        self.t0 = time.monotonic()

    def done(self) -> dict:
        cpu = cpu_of(self.pids) - self.cpu0
        wall = time.monotonic() - self.t0
        peaks = []
        for pid in self.pids:
            try:
                peaks.append(procstat.peak_rss_mb(pid))
            except OSError:
                pass
        if sorted(self.peer.pids()) != sorted(self.pids):
            self.notes.append(
                f"{self.peer.label}: its processes changed during a measurement (a worker restarted?)"
            )
        return {
            "cpu_s": cpu,
            "wall_s": wall,
            "peak_rss_mb": max(peaks) if peaks else None,
            "processes": len(self.pids),
            "upstream_cpu_s": cpu_of([self.upstream_pid]) - self.upstream0,
            "parts_cpu_s": {name: cpu_of(pids) - self.parts0[name] for name, pids in self.parts.items()},
        }


def part_figures(res: dict, used: dict, seconds: float, requests: int | None = None) -> None:
    """Each part's CPU (% of one core, and µs per request when ``requests``) into ``res``."""
    for name, cpu in used.get("parts_cpu_s", {}).items():
        res[f"{name}_cpu_pct"] = cpu / seconds * 100 if seconds else None
        if requests:
            res[f"{name}_us_per_req"] = cpu / requests * 1e6


def load_side(res: dict, upstream_cpu: float, loadgen_cpu: float, wall: float) -> None:
    """The load side's CPU (fake upstream + load generator, % of one core)."""
    res["load_cpu_pct"] = (upstream_cpu + loadgen_cpu) / wall * 100 if wall else None


def saturation_notes(
    ctx: Context, peers: dict[str, Peer], runs: dict[str, list[dict]], notes: list[str]
) -> None:
    """A note per peer whose load side came near saturation: it may have limited that peer's figures."""
    cores = len(ctx.layout.load) if ctx.layout.pinned else (os.cpu_count() or 1)
    for key, peer in peers.items():
        busy = [
            run["load_cpu_pct"] for run in runs.get(key, []) if (run.get("load_cpu_pct") or 0) > 90 * cores
        ]
        if busy:
            why = (
                " (expected for direct: nothing else limits it)"
                if key == "a"
                else ": it may have been the limit"
            )
            notes.append(
                f"{peer.label}: the load side (fake upstream + load generator) used {max(busy):.0f}% of its "
                f"{cores} CPU(s) in {len(busy)} of {len(runs[key])} runs{why}"
            )


def meta(ctx: Context, title: str) -> dict:
    return {
        "date": dt.date.today().isoformat(),
        "started_at": dt.datetime.now().isoformat(timespec="seconds"),
        "quick": ctx.quick,
        "runs": ctx.runs,
        "pinning": ctx.layout.note,
        "upstream": ctx.upstream.kind,
        "upstream_url": ctx.upstream.api_url,
        "machine": machine_facts(),
        "title": title,
    }


def result_dict(
    name: str,
    title: str,
    ctx: Context,
    peers: dict[str, Peer],
    runs: dict,
    figures: list[Figure],
    setup: list[str],
    notes: list[str],
    ratio_base: str = GO,
) -> dict:
    """``ratio_base``: the peer the ratios are to (the Go reference unless said otherwise)."""
    return {
        "scenario": name,
        "title": title,
        "meta": {**meta(ctx, title), "upstream_tls": bool(ctx.tls)},
        "peers": {key: peer.label for key, peer in peers.items()},
        "setup": setup,
        "runs": runs,
        "summary": summarize(runs, figures, ratio_base),
        "notes": notes,
        **({"ratio_base": ratio_base} if ratio_base != GO else {}),
    }


def interleave(
    ctx: Context, peers: dict[str, Peer], measure, notes: list[str], pause: float = 0.5
) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {key: [] for key in peers}
    for index in range(ctx.runs):
        for key, peer in peers.items():
            say(f"  run {index + 1}/{ctx.runs}: {peer.label}")
            try:
                runs[key].append(measure(peer, index, runs))
            except Exception as exc:
                say(f"    FAILED: {exc}")
                runs[key].append({"error": str(exc)[:2000]})
                notes.append(f"{peer.label}, run {index + 1} failed: {str(exc).splitlines()[0][:300]}")
            time.sleep(pause)
    return runs


# ---------------------------------------------------------------------------- small

SMALL_FIGURES = [
    Figure("rps", "throughput (req/s)", ",.0f"),
    Figure("p50_ms", "latency p50 (ms)", ",.2f"),
    Figure("p99_ms", "latency p99 (ms)", ",.2f"),
    Figure("cpu_us_per_req", "CPU per request (µs; direct: the upstream's)", ",.0f"),
    Figure("cpu_pct", "CPU (% of one core)", ",.0f"),
    Figure(
        "supervisord_us_per_req", "of which supervisord per request (µs; e: deployed)", ",.0f", ratio=False
    ),
    Figure("supervisord_cpu_pct", "of which supervisord (% of one core; e: deployed)", ",.1f", ratio=False),
    Figure("errors", "non-2xx + socket errors", ",.0f", ratio=False),
    Figure("load_cpu_pct", "load side CPU: fake upstream + wrk (% of one core)", ",.0f", ratio=False),
]


SHARED_2W = "; the 2 workers share a CPU with the load on this machine"


def small(ctx: Context) -> tuple[dict, list[Figure], list[Target]]:
    return _small(ctx, "small")


def small_tls(ctx: Context) -> tuple[dict, list[Figure], list[Target]]:
    return _small(over_tls(ctx), "small-tls")


def _small(ctx: Context, name: str) -> tuple[dict, list[Figure], list[Target]]:
    duration = 3 if ctx.quick else 10
    connections = 64
    title = (
        f"non-streaming POST /chat/completions, ~600 B answer, {connections} keep-alive connections, "
        f"{duration} s per run (wrk --latency)" + (", upstream over HTTPS" if ctx.tls else "")
    )
    if ctx.box.wrk is None:
        raise Skip("wrk not found: install with `apt-get install wrk`")
    notes: list[str] = []
    # e, the deployed shape (issue 18), over plain HTTP only: what supervisord's log relay costs.
    peers = start_peers(ctx, name, notes, keys="abcd" if ctx.tls else "abcde")
    try:
        for peer in peers.values():  # warm-up, not recorded: pools filled, code paths hot
            load.run_wrk(ctx.box, ctx.layout, peer.url, BENCH_TOKEN, 1, connections)

        def measure(peer: Peer, index: int, runs) -> dict:
            return wrk_run(ctx, peer, notes, duration, connections)[0]

        runs = interleave(ctx, peers, measure, notes, pause=run_pause(ctx, 0.5))
        saturation_notes(ctx, peers, runs, notes)
    finally:
        stop_peers(peers)
    setup = [
        f"client path: /chat/completions through the proxies (tokens' ai_model_api_url ends in /v1), "
        f"/v1/chat/completions direct; token table of {TABLE_SIZE:,} tokens",
        "our proxy: LOG_LEVEL=info (one access line per request, stdout to a file); the Go reference also "
        "writes one access line per request",
        "CPU = utime+stime from /proc/<pid>/stat over the run (2 workers: both summed)",
        *tls_setup(ctx),
    ]
    result = result_dict(name, title, ctx, peers, runs, SMALL_FIGURES, setup, notes)
    s = result["summary"]
    go_cpu, one_cpu = get(s, "b", "cpu_us_per_req"), get(s, "c", "cpu_us_per_req")
    one_rps, two_rps = get(s, "c", "rps"), get(s, "d", "rps")
    targets = []
    if not ctx.tls:
        targets = [
            Target(
                "1 worker: CPU per request ≤ 3× the Go reference's (µs)",
                one_cpu,
                3 * go_cpu if go_cpu else None,
                "medians",
                ",.0f",
            ),
            Target(
                "1 worker: CPU per request ≤ 5× the Go reference's (µs) (issue 12)",
                one_cpu,
                5 * go_cpu if go_cpu else None,
                "medians",
                ",.0f",
            ),
            Target(
                "2 workers: throughput ≥ 1.7× 1 worker (req/s)",
                two_rps,
                1.7 * one_rps if one_rps else None,
                "medians"
                + (
                    "; the 2 workers share a CPU with the load on this machine"
                    if ctx.layout.shared_2w
                    else ""
                ),
                ",.0f",
                below=False,
            ),
        ]
    direct = get(s, "a", "rps")
    fastest = max((get(s, k, "rps") or 0) for k in "bcd")
    if direct and fastest:
        headroom = direct / fastest
        notes.append(
            f"fake upstream hit directly{' (over its plain port)' if ctx.tls else ''}: {direct:,.0f} req/s "
            f"= {headroom:.1f}× the fastest proxy"
            + (
                " — WARNING: under 2×, the upstream may be limiting"
                if headroom < 2
                else " (not the bottleneck)"
            )
        )
    notes += plain_vs_tls(ctx, name, s, "small", [("cpu_us_per_req", "CPU per request", "µs", ",.0f")])
    ctx.summaries[name] = s
    return result, SMALL_FIGURES, targets


def wrk_run(
    ctx: Context, peer: Peer, notes: list[str], duration: float, connections: int
) -> tuple[dict, dict]:
    """One wrk load (the `small` shape) with the peer's CPU over it: (figures, Meter's figures)."""
    meter = Meter(peer, notes, ctx.upstream)
    res = load.run_wrk(ctx.box, ctx.layout, peer.url, BENCH_TOKEN, duration, connections)
    used = meter.done()
    load_side(res, used["upstream_cpu_s"], res["loadgen_cpu_s"], res["seconds"])
    res["errors"] = res["non2xx"] + res["socket_errors"]
    res["cpu_s"] = used["cpu_s"]
    res["cpu_us_per_req"] = used["cpu_s"] / res["requests"] * 1e6 if res["requests"] else None
    res["cpu_pct"] = used["cpu_s"] / res["seconds"] * 100 if res["seconds"] else None
    part_figures(res, used, res["seconds"], res["requests"])
    say(
        f"    {res['rps']:,.0f} req/s, p99 {res['p99_ms']:.2f} ms, "
        f"CPU {res['cpu_us_per_req'] or 0:,.0f} µs/req,"
        f" errors {res['errors']}"
    )
    return res, used


# ---------------------------------------------------------------------------- small-limits

# High enough that nothing is ever refused (the config's bound is common.tokentable.MAX_LIMIT,
# 10^9): the limiter does all its work (a lease and an admission per request), refuses nothing.
LIMITS_CONCURRENCY = 100_000
LIMITS_RPM = 100_000_000
LIMITS_TPM = 1_000_000_000  # issue 20: never reached either (81 tokens per request)
LIMITS_CPU_TARGET = 1.15  # issue 14: worker CPU per request, limits on / off

SMALL_LIMITS_FIGURES = [
    Figure("rps", "throughput (req/s)", ",.0f"),
    Figure("p50_ms", "latency p50 (ms)", ",.2f"),
    Figure("p99_ms", "latency p99 (ms)", ",.2f"),
    Figure("cpu_us_per_req", "worker CPU per request (µs)", ",.0f"),
    Figure("redis_cpu_us_per_req", "redis-server CPU per request (µs)", ",.1f", ratio=False),
    Figure("total_cpu_us_per_req", "worker + redis-server CPU per request (µs)", ",.0f"),
    Figure("cpu_pct", "worker CPU (% of one core)", ",.0f"),
    Figure(
        "evalsha_per_req",
        "Redis EVALSHA calls per request (limits on: ≈ 1.00; + TPM: ≈ 2.00, the count at the end)",
        ",.2f",
        ratio=False,
    ),
    Figure("errors", "non-2xx + socket errors", ",.0f", ratio=False),
    Figure(
        "load_cpu_pct",
        "load side CPU: fake upstream + wrk + redis-server (% of one core)",
        ",.0f",
        ratio=False,
    ),
]


def small_limits(ctx: Context) -> tuple[dict, list[Figure], list[Target]]:
    """Issue 14: the cost of the per-token limits: `small` against 1 worker, limits off and on."""
    name = "small-limits"
    duration = 3 if ctx.quick else 10
    connections = 64
    title = (
        f"per-token limits off vs on (issue 14): the `small` load ({connections} keep-alive connections, "
        f"{duration} s per run, wrk --latency) against 1 worker"
    )
    if ctx.box.wrk is None:
        raise Skip("wrk not found: install with `apt-get install wrk`")
    if ctx.box.redis_server is None:
        raise Skip("redis-server not found: install with `apt-get install redis-server`")
    if "c" not in ctx.only:
        raise Skip("needs peer c (--peers)")
    home = ctx.workdir / name
    home.mkdir()
    try:
        redis = RedisServer(ctx.box.redis_server, ctx.layout, home)
    except RuntimeError as exc:
        raise Skip(f"redis-server did not start: {exc}") from None
    say(f"  started redis-server (pid {redis.pid}) on {redis.socket}")
    notes: list[str] = []
    peers: dict[str, Peer] = {}
    try:
        peers = start_peers(
            ctx,
            f"{name}/peers",
            notes,
            keys="c",
            makers={
                "c": lambda home: ProxyOneWorker(
                    ctx.layout, home, ctx.tables, TABLE_SIZE, label="proxy, 1 worker, limits off (as shipped)"
                ),
                "c+": lambda home: ProxyOneWorkerLimits(
                    ctx.layout, home, ctx.tables, TABLE_SIZE, redis, LIMITS_CONCURRENCY, LIMITS_RPM
                ),
                "c+t": lambda home: ProxyOneWorkerLimitsTpm(
                    ctx.layout,
                    home,
                    ctx.tables,
                    TABLE_SIZE,
                    redis,
                    LIMITS_CONCURRENCY,
                    LIMITS_RPM,
                    LIMITS_TPM,
                ),
            },
        )
        for peer in peers.values():  # warm-up, not recorded: pools filled, code paths hot
            load.run_wrk(ctx.box, ctx.layout, peer.url, BENCH_TOKEN, 1, connections)

        def measure(peer: Peer, index: int, runs) -> dict:
            # Before the load: limits on answers with the limit's header, limits off without.
            header = peer.limit_header()
            expected = str(LIMITS_RPM) if peer.key.startswith("c+") else None
            if header != expected:
                raise RuntimeError(
                    f"x-ratelimit-limit-requests before the load: {header!r}, expected {expected!r}: "
                    + ("limits not enforced" if expected else "limits on where they should be off")
                )
            calls0, redis0 = redis.evalsha_calls(), cpu_of([redis.pid])
            res, used = wrk_run(ctx, peer, notes, duration, connections)
            redis_cpu, calls = cpu_of([redis.pid]) - redis0, redis.evalsha_calls() - calls0
            load_side(res, used["upstream_cpu_s"] + redis_cpu, res["loadgen_cpu_s"], res["seconds"])
            res["limit_header"] = header
            res["redis_cpu_s"] = redis_cpu
            if res["requests"]:
                res["redis_cpu_us_per_req"] = redis_cpu / res["requests"] * 1e6
                res["total_cpu_us_per_req"] = (used["cpu_s"] + redis_cpu) / res["requests"] * 1e6
                res["evalsha_per_req"] = calls / res["requests"]
            say(
                f"    redis-server {res.get('redis_cpu_us_per_req') or 0:,.1f} µs/req, "
                f"{res.get('evalsha_per_req') or 0:.2f} EVALSHA/req"
            )
            return res

        runs = interleave(ctx, peers, measure, notes, pause=0.5)
        saturation_notes(ctx, peers, runs, notes)
    finally:
        stop_peers(peers)
        redis.stop()
    setup = [
        f"limits off: 1 worker as shipped (no limit, no LIMITS_REDIS_URL); limits on: the same with "
        f"TOKEN_MAX_CONCURRENCY={LIMITS_CONCURRENCY:,} and TOKEN_RPM={LIMITS_RPM:,} (every token limited "
        "by both, so high that nothing is refused: a lease and an admission per request, one EVALSHA round "
        "trip, the release sent in the background), LIMITS_LEASE_SECONDS at its default (30 s); limits on "
        f"+ TPM: also TOKEN_TPM={LIMITS_TPM:,} (the admission reads the token window; each request's "
        "tokens are sent at its end in the background pipeline, with the releases)",
        f"LIMITS_REDIS_URL=unix://<work dir>/{name}/r.sock: a redis-server started by the harness (no TCP "
        "port, no persistence), "
        + (
            f"pinned to the load side's CPU {ctx.layout.describe(ctx.layout.load)} like the fake upstream"
            if ctx.layout.pinned
            else "not pinned"
        )
        + "; its CPU counts in the load side's",
        "checked before each run: one request gets `x-ratelimit-limit-requests: "
        f"{LIMITS_RPM}` from limits on and no such header from limits off (else the run fails); during "
        "the load, non-2xx must stay 0 (nothing refused) and EVALSHA calls per request ≈ 1.00 (INFO "
        "commandstats)",
        "CPU = utime+stime from /proc/<pid>/stat over the run (worker; redis-server), divided by the "
        f"requests; token table of {TABLE_SIZE:,} tokens; LOG_LEVEL=info",
    ]
    result = result_dict(name, title, ctx, peers, runs, SMALL_LIMITS_FIGURES, setup, notes, ratio_base="c")
    s = result["summary"]
    off_cpu, on_cpu = get(s, "c", "cpu_us_per_req"), get(s, "c+", "cpu_us_per_req")
    tpm_cpu = get(s, "c+t", "cpu_us_per_req")
    on_errors = get(s, "c+", "errors", "max")
    if on_errors:
        notes.append(
            f"limits on: {on_errors:,.0f} non-2xx/socket errors in a run: refused (429) or failed, "
            "see the worker's log"
        )
    targets = [
        Target(
            f"limits on: worker CPU per request ≤ {LIMITS_CPU_TARGET:.2f}× limits off (µs) (issue 14)",
            on_cpu,
            LIMITS_CPU_TARGET * off_cpu if off_cpu else None,
            "medians",
            ",.0f",
        ),
        Target("limits on: 0 non-2xx + socket errors (nothing refused)", on_errors, 0, "worst run", ",.0f"),
    ]
    if tpm_cpu is not None:
        targets.append(
            Target(
                f"limits on + TPM: worker CPU per request ≤ {LIMITS_CPU_TARGET:.2f}× limits off (µs) "
                "(issue 20)",
                tpm_cpu,
                LIMITS_CPU_TARGET * off_cpu if off_cpu else None,
                "medians",
                ",.0f",
            )
        )
        targets.append(
            Target(
                "limits on + TPM: 0 non-2xx + socket errors (nothing refused)",
                get(s, "c+t", "errors", "max"),
                0,
                "worst run",
                ",.0f",
            )
        )
    ctx.summaries[name] = s
    return result, SMALL_LIMITS_FIGURES, targets


def tls_setup(ctx: Context) -> list[str]:
    if not ctx.tls:
        return []
    return [
        f"upstream over HTTPS: {ctx.upstream.api_url} (HTTP/1.1, TLS 1.3, an ECDSA P-256 certificate for "
        "the IP 127.0.0.1 issued by a CA made at the start of the run); the Go reference trusts it through "
        "SSL_CERT_FILE, our proxy through UPSTREAM_CA_BUNDLE; clients reach the proxies over plain HTTP",
        "direct = the same upstream process over its plain HTTP port (client-side TLS would load the "
        "load side's CPU as no proxy run does): no proxy and no TLS, the baseline of the added delay, "
        "which so includes the proxy's upstream TLS",
        f"the upstream closes connections idle for {Upstream.IDLE_TIMEOUT_TLS:g} s and runs are further "
        "apart: every run starts with no pooled upstream connection, so its TLS handshakes are in it",
    ]


def plain_vs_tls(
    ctx: Context, name: str, summary: dict, plain: str, keys: list[tuple[str, str, str, str]]
) -> list[str]:
    """Notes comparing an HTTPS scenario with its plain one when both ran in this invocation."""
    if not ctx.tls or plain not in ctx.summaries:
        return []
    base = ctx.summaries[plain]
    labels = {"a": "direct", "b": "Go", "c": "1 worker", "d": "2 workers"}
    notes = []
    for key, what, unit, fmt in keys:
        parts = []
        for peer, label in labels.items():
            tls_value, plain_value = get(summary, peer, key), get(base, peer, key)
            if tls_value is not None and plain_value:
                parts.append(
                    f"{label} {format(tls_value, fmt)} vs {format(plain_value, fmt)} "
                    f"(×{tls_value / plain_value:.2f})"
                )
        if parts:
            notes.append(f"{what} ({unit}), HTTPS vs plain `{plain}` of this invocation: " + "; ".join(parts))
    return notes


# ---------------------------------------------------------------------------- stream1000

STREAM_FIGURES = [
    Figure("failed", "failed streams", ",.0f", ratio=False),
    Figure("ttfe_p50_ms", "time to first event p50 (ms)", ",.1f"),
    Figure("ttfe_p99_ms", "time to first event p99 (ms)", ",.1f"),
    Figure("delay_p50_ms", "event delay p50 (ms, upstream send → client)", ",.2f"),
    Figure("delay_p99_ms", "event delay p99 (ms)", ",.2f"),
    Figure("delay_max_ms", "event delay max (ms)", ",.1f"),
    Figure("added_p50_ms", "added delay p50 over direct (ms)", ",.2f"),
    Figure("added_p99_ms", "added delay p99 over direct (ms)", ",.2f"),
    Figure("cpu_pct", "CPU (% of one core; direct: the upstream's)", ",.0f"),
    Figure("supervisord_cpu_pct", "of which supervisord (% of one core; e: deployed)", ",.1f", ratio=False),
    Figure("peak_rss_mb", "peak RSS (MB, VmHWM; largest worker; direct: the upstream's)", ",.1f"),
    Figure("load_cpu_pct", "load side CPU: fake upstream + sseload (% of one core)", ",.0f", ratio=False),
]


def stream1000(ctx: Context) -> tuple[dict, list[Figure], list[Target]]:
    shape = {"streams": 200, "rounds": 1} if ctx.quick else {"streams": 1000, "rounds": 3}
    result, s = _stream(ctx, "stream1000", shape)
    go_added, go_cpu = get(s, "b", "added_p99_ms"), get(s, "b", "cpu_pct")
    targets = [
        Target("1 worker: 0 failed streams", get(s, "c", "failed", "max"), 0, "worst run", ",.0f"),
        Target(
            "1 worker: added p99 event delay ≤ Go's + 5 ms",
            get(s, "c", "added_p99_ms"),
            max(go_added, 0) + 5 if go_added is not None else None,
            "medians; a negative Go figure (noise) counts as 0",
            ",.2f",
        ),
        Target(
            "1 worker: CPU ≤ 1.5× Go's (% of a core) (also issue 12)",
            get(s, "c", "cpu_pct"),
            1.5 * go_cpu if go_cpu is not None else None,
            "medians",
            ",.0f",
        ),
        Target("1 worker: peak RSS ≤ 100 MB", get(s, "c", "peak_rss_mb", "max"), 100, "worst run", ",.1f"),
        Target(
            "1 worker: time to first event p99 ≤ 250 ms (issue 12)",
            get(s, "c", "ttfe_p99_ms"),
            250,
            "median",
            ",.1f",
        ),
        Target(
            "1 worker: added p99 event delay ≤ Go's + 20 ms (issue 12)",
            get(s, "c", "added_p99_ms"),
            max(go_added, 0) + 20 if go_added is not None else None,
            "medians; a negative Go figure (noise) counts as 0",
            ",.2f",
        ),
    ]
    return result, STREAM_FIGURES, targets


def stream1000_tls(ctx: Context) -> tuple[dict, list[Figure], list[Target]]:
    """Issue 10: 1,000 concurrent streams with the upstream over HTTPS, the same shape as stream1000."""
    shape = {"streams": 200, "rounds": 1} if ctx.quick else {"streams": 1000, "rounds": 3}
    result, s = _stream(over_tls(ctx), "stream1000-tls", shape, plain="stream1000")
    return result, STREAM_FIGURES, tls_stream_targets(s)


def stream300_tls(ctx: Context) -> tuple[dict, list[Figure], list[Target]]:
    """300 streams over HTTPS, one round: every stream opens a new upstream TLS connection."""
    shape = {"streams": 100 if ctx.quick else 300, "rounds": 1}
    result, _ = _stream(over_tls(ctx), "stream300-tls", shape)
    return result, STREAM_FIGURES, []  # issue 10 sets its targets at 1,000 streams


def tls_stream_targets(s: dict) -> list[Target]:
    """Issue 10's targets for 1,000 concurrent TLS streams, one worker (medians against Go's)."""
    go_ttfe, go_delay = get(s, "b", "ttfe_p99_ms"), get(s, "b", "delay_p99_ms")
    go_cpu, go_rss = get(s, "b", "cpu_pct"), get(s, "b", "peak_rss_mb")
    tag = " (issue 10)"
    return [
        Target("1 worker: 0 failed streams" + tag, get(s, "c", "failed", "max"), 0, "worst run", ",.0f"),
        Target(
            "1 worker: time to first event p99 ≤ 2× Go's (ms)" + tag,
            get(s, "c", "ttfe_p99_ms"),
            2 * go_ttfe if go_ttfe is not None else None,
            "medians",
            ",.1f",
        ),
        Target(
            "1 worker: event delay p99 ≤ Go's + 10 ms" + tag,
            get(s, "c", "delay_p99_ms"),
            go_delay + 10 if go_delay is not None else None,
            "medians",
            ",.2f",
        ),
        Target(
            "1 worker: CPU ≤ 2× Go's (% of a core)" + tag,
            get(s, "c", "cpu_pct"),
            2 * go_cpu if go_cpu is not None else None,
            "medians",
            ",.0f",
        ),
        Target(
            "1 worker: peak RSS ≤ 1.5× Go's (MB)" + tag,
            get(s, "c", "peak_rss_mb"),
            1.5 * go_rss if go_rss is not None else None,
            "medians",
            ",.1f",
        ),
    ]


def failure_note(notes: list[str], peer: Peer, where: str, res: dict) -> None:
    """Failed streams: a note with sseload's error counts (e.g. {"unexpected EOF": 1}) and what the
    peer's log says (Go: "http: proxy error: ..."; ours: the access lines' "error" field)."""
    if not res["failed"]:
        return
    errors = ", ".join(f"{text} ×{count}" for text, count in sorted(res["errors"].items()))
    note = f"{peer.label}, {where}: {res['failed']} failed stream(s): {errors}"[:400]
    said = peer_errors(peer)
    if said:
        note += "; its log so far: " + "; ".join(f"{text[:160]} ×{count}" for text, count in said)
    notes.append(note)


def peer_errors(peer: Peer, lines: int = 5000, top: int = 3) -> list[tuple[str, int]]:
    """The most frequent error messages at the end of the peer's log (timestamps and ports cut)."""
    if peer.proc is None:
        return []
    counts: dict[str, int] = {}
    for line in peer.proc.log_tail(lines).splitlines():
        text = ""
        if "proxy error" in line:
            text = line[line.index("proxy error") :]
        elif '"error"' in line:
            try:
                text = str(json.loads(line[line.index("{") :]).get("error") or "")
            except (ValueError, AttributeError):
                text = ""
        if text:
            text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:*", text)
            counts[text] = counts.get(text, 0) + 1
    return sorted(counts.items(), key=lambda item: -item[1])[:top]


def stream_figures(out: dict, used: dict) -> dict:
    """One sseload result + the peer's meter → a run's figures."""
    return {
        "streams": out["streams"],
        "failed": out["failed"],
        "errors": out["errors"],
        "events": out["events"],
        "events_expected": out["events_expected"],
        "ttfe_p50_ms": out["ttfe_ms"].get("p50"),
        "ttfe_p99_ms": out["ttfe_ms"].get("p99"),
        "delay_p50_ms": out["delay_ms"].get("p50"),
        "delay_p99_ms": out["delay_ms"].get("p99"),
        "delay_max_ms": out["delay_ms"].get("max"),
        "wall_s": out["wall_s"],
        "cpu_s": used["cpu_s"],
        "cpu_pct": used["cpu_s"] / out["wall_s"] * 100,
        "peak_rss_mb": used["peak_rss_mb"],
    }


def _stream(ctx: Context, name: str, shape: dict, plain: str = "") -> tuple[dict, dict]:
    shape = {**shape, "events": 50, "interval_ms": 50, "ramp_ms": 1000}
    title = (
        f"{shape['streams']:,} concurrent SSE streams × {shape['rounds']} round(s), {shape['events']} events "
        f"each at {shape['interval_ms']} ms (bench/peers/sseload.go)"
        + (", upstream over HTTPS" if ctx.tls else "")
    )
    if not ctx.box.have_go:
        raise Skip(
            "needs Go for the streaming load generator and the upstream's timestamped events: "
            "install with `apt-get install golang-go`"
        )
    notes: list[str] = []
    peers = start_peers(ctx, name, notes, keys="abcd" if ctx.tls else "abcde")
    try:

        def measure(peer: Peer, index: int, runs) -> dict:
            meter = Meter(peer, notes, ctx.upstream)
            out = load.run_sseload(ctx.box, ctx.layout, peer.url, BENCH_TOKEN, ca=peer.client_ca, **shape)
            used = meter.done()
            res = stream_figures(out, used)
            part_figures(res, used, out["wall_s"])
            failure_note(notes, peer, f"run {index + 1}", res)
            load_side(res, used["upstream_cpu_s"], out.get("cpu_s", 0.0), out["wall_s"])
            direct = runs.get("a", [])
            if peer.key != "a" and len(direct) > index and "delay_p50_ms" in direct[index]:
                base = direct[index]
                if res["delay_p50_ms"] is not None and base["delay_p50_ms"] is not None:
                    res["added_p50_ms"] = res["delay_p50_ms"] - base["delay_p50_ms"]
                    res["added_p99_ms"] = res["delay_p99_ms"] - base["delay_p99_ms"]
            say(
                f"    failed {res['failed']}/{res['streams']}, "
                f"first event p99 {res['ttfe_p99_ms'] or 0:.1f} ms, "
                f"delay p50 {res['delay_p50_ms'] or 0:.2f} "
                f"p99 {res['delay_p99_ms'] or 0:.2f} max {res['delay_max_ms'] or 0:.1f} ms, "
                f"CPU {res['cpu_pct']:.0f}%, peak RSS {res['peak_rss_mb'] or 0:.1f} MB"
            )
            return res

        runs = interleave(ctx, peers, measure, notes, pause=run_pause(ctx, 2.0))
        saturation_notes(ctx, peers, runs, notes)
    finally:
        stop_peers(peers)
    setup = [
        f"each of the {shape['streams']:,} streams starts within the first {shape['ramp_ms']} ms "
        "(spread evenly, so they are not all in phase); a worker runs its rounds one after the other "
        "on its keep-alive connection",
        "event delay = arrival at the client − the upstream's send timestamp (t_sent in the event); "
        "added delay = a peer's percentile − direct's percentile of the same round",
        "a stream fails on any error, a non-200 status, a missing event or a missing [DONE]",
        "CPU % = CPU seconds over the load's wall time × 100 (2 workers: summed); peak RSS = VmHWM reset "
        "before each run (clear_refs), the largest worker's",
        *tls_setup(ctx),
    ]
    result = result_dict(name, title, ctx, peers, runs, STREAM_FIGURES, setup, notes)
    s = result["summary"]
    if plain:
        notes += plain_vs_tls(
            ctx,
            name,
            s,
            plain,
            [
                ("ttfe_p99_ms", "time to first event p99", "ms", ",.1f"),
                ("delay_p99_ms", "event delay p99", "ms", ",.2f"),
                ("cpu_pct", "CPU", "% of a core", ",.0f"),
            ],
        )
    ctx.summaries[name] = s
    return result, s


# ---------------------------------------------------------------------------- tlsconn

TLSCONN_FIGURES = [
    Figure("reuse_rps", "throughput, upstream connections reused (req/s)", ",.0f"),
    Figure("reuse_cpu_us", "CPU per request, upstream connections reused (µs)", ",.0f"),
    Figure("close_rps", "throughput, a new upstream TLS connection per request (req/s)", ",.0f"),
    Figure("close_cpu_us", "CPU per request, a new upstream TLS connection per request (µs)", ",.0f"),
    Figure(
        "conns_per_req", "new upstream connections per request (counted by the upstream)", ",.2f", ratio=False
    ),
    Figure(
        "cpu_per_conn_us", "CPU per new upstream TLS connection (µs): the difference, per connection", ",.0f"
    ),
    Figure("errors", "non-2xx + socket errors (both loads)", ",.0f", ratio=False),
]


def tlsconn(ctx: Context) -> tuple[dict, list[Figure], list[Target]]:
    """Issue 10: the CPU a proxy spends per new upstream TLS connection, beside Go's.

    Per peer and run, two wrk loads of the same shape: one with upstream connections reused
    (keep-alive), one where every request carries X-Bench-Close: 1, which the upstream answers with
    Connection: close, so each request costs the proxy a new upstream TLS connection (the upstream
    counts them). CPU per new connection = (CPU of the second load − requests × CPU per request of
    the first) / new connections."""
    name = "tlsconn"
    ctx = over_tls(ctx)
    if ctx.box.wrk is None:
        raise Skip("wrk not found: install with `apt-get install wrk`")
    duration = 1 if ctx.quick else 3
    connections = 8
    title = (
        f"CPU per new upstream TLS connection: {connections} client connections, {duration} s with upstream "
        f"connections reused, then {duration} s with a new upstream TLS connection per request (wrk)"
    )
    notes: list[str] = []
    peers = start_peers(ctx, name, notes, keys="bcd")
    try:
        for peer in peers.values():  # warm-up, not recorded: code paths hot
            load.run_wrk(ctx.box, ctx.layout, peer.url, BENCH_TOKEN, 1, connections)

        def one_load(peer: Peer, close: bool) -> dict:
            meter = Meter(peer, notes, ctx.upstream)
            before = ctx.upstream.stats()
            res = load.run_wrk(
                ctx.box, ctx.layout, peer.url, BENCH_TOKEN, duration, connections, close_upstream=close
            )
            after = ctx.upstream.stats()
            used = meter.done()
            res["cpu_s"] = used["cpu_s"]
            res["conns"] = after["conns"] - before["conns"]
            res["upstream_requests"] = after["requests"] - before["requests"]
            return res

        def measure(peer: Peer, index: int, runs) -> dict:
            reuse = one_load(peer, close=False)
            time.sleep(0.2)
            close = one_load(peer, close=True)
            res: dict = {"reuse": reuse, "close": close}
            res["errors"] = sum(x["non2xx"] + x["socket_errors"] for x in (reuse, close))
            res["reuse_rps"], res["close_rps"] = reuse["rps"], close["rps"]
            if reuse["requests"]:
                res["reuse_cpu_us"] = reuse["cpu_s"] / reuse["requests"] * 1e6
            if close["requests"]:
                res["close_cpu_us"] = close["cpu_s"] / close["requests"] * 1e6
                res["conns_per_req"] = close["conns"] / close["requests"]
            if close["conns"] and "reuse_cpu_us" in res:
                extra = close["cpu_s"] - close["requests"] * res["reuse_cpu_us"] / 1e6
                res["cpu_per_conn_us"] = extra / close["conns"] * 1e6
            say(
                f"    reused: {reuse['rps']:,.0f} req/s, {res.get('reuse_cpu_us') or 0:,.0f} µs/req; "
                f"new connection each: {close['rps']:,.0f} req/s, "
                f"{res.get('close_cpu_us') or 0:,.0f} µs/req, "
                f"{close['conns']:,} connections for {close['requests']:,} requests → "
                f"{res.get('cpu_per_conn_us') or 0:,.0f} µs per connection; errors {res['errors']}"
            )
            return res

        runs = interleave(ctx, peers, measure, notes, pause=run_pause(ctx, 0.5))
    finally:
        stop_peers(peers)
    setup = [
        "each run: wrk with the upstream's connections reused (keep-alive), then the same with "
        "X-Bench-Close: 1 on every request, which the upstream answers with Connection: close "
        "(the proxies keep the client connection; each request opens a new upstream TLS connection)",
        "new connections: counted by the upstream (accepted connections); CPU: utime+stime of the "
        "proxy's process(es) from /proc over each load",
        "CPU per new upstream TLS connection = (CPU of the second load − its requests × the first load's "
        "CPU per request) / new connections: the handshake, certificate verification, socket set-up "
        "and teardown",
        *tls_setup(ctx),
    ]
    result = result_dict(name, title, ctx, peers, runs, TLSCONN_FIGURES, setup, notes)
    s = result["summary"]
    for key, peer in peers.items():
        ratio = get(s, key, "conns_per_req")
        if ratio is not None and ratio < 0.9:
            notes.append(
                f"{peer.label}: only {ratio:.2f} new upstream connections per request in the second load: "
                "the per-connection figure is not what it claims"
            )
    ctx.summaries[name] = s
    # No target in issue 10: the figure is reported beside Go's (the ratio column).
    return result, TLSCONN_FIGURES, []


# ---------------------------------------------------------------------------- ladder

LADDER_LEVELS = (250, 500, 1000, 2000)
LADDER_LEVELS_QUICK = (100, 200)
HOLD_ADDED_P99_MS = 50.0
HOLD_TTFE_P99_MS = 500.0
LADDER_TARGET = 1000  # issue 12: one worker holds at least this many streams
LADDER_KEYS = (
    ("failed", "failed streams", ",.0f", False),
    ("ttfe_p99_ms", "time to first event p99 (ms)", ",.1f", True),
    ("delay_p99_ms", "event delay p99 (ms)", ",.2f", True),
    ("added_p99_ms", "added delay p99 over direct (ms)", ",.2f", True),
    ("cpu_pct", "CPU (% of one core)", ",.0f", True),
)


def ladder_figures(levels: tuple[int, ...]) -> list[Figure]:
    figures = [
        Figure(f"n{level}_{key}", f"{level:,} streams: {label}", fmt, ratio)
        for level in levels
        for key, label, fmt, ratio in LADDER_KEYS
    ]
    return [*figures, Figure("largest_held", "largest number of streams held", ",.0f")]


def ladder(ctx: Context) -> tuple[dict, list[Figure], list[Target]]:
    return _ladder(ctx, "ladder")


def ladder_tls(ctx: Context) -> tuple[dict, list[Figure], list[Target]]:
    return _ladder(over_tls(ctx), "ladder-tls")


def _held(stats: list[dict], key: str) -> tuple[bool, str]:
    """Whether a peer held a level (over that level's runs), and why not."""
    if not stats or any("error" in run for run in stats):
        return False, "a run failed"
    # Medians over the level's runs, failed streams too: one stray failure in one of 3 runs does not
    # end a peer's ladder (the table and the notes still show it).
    failed = statistics.median(run["failed"] for run in stats)
    ttfe = statistics.median(run["ttfe_p99_ms"] or 0 for run in stats)
    delay_key = "added_p99_ms" if key != "a" and all("added_p99_ms" in run for run in stats) else None
    why = []
    if failed:
        why.append(f"{failed:,.0f} failed (median)")
    if ttfe > HOLD_TTFE_P99_MS:
        why.append(f"first event p99 {ttfe:,.0f} ms")
    if delay_key:
        added = statistics.median(run[delay_key] for run in stats)
        if added > HOLD_ADDED_P99_MS:
            why.append(f"added delay p99 {added:,.1f} ms")
    elif key != "a":
        delay = statistics.median(run["delay_p99_ms"] or 0 for run in stats)
        if delay > HOLD_ADDED_P99_MS:
            why.append(f"event delay p99 {delay:,.1f} ms (no direct baseline)")
    return not why, ", ".join(why)


def _ladder(ctx: Context, name: str) -> tuple[dict, list[Figure], list[Target]]:
    """Issue 12: the largest number of concurrent streams (20 events/s each) one worker holds."""
    levels = LADDER_LEVELS_QUICK if ctx.quick else LADDER_LEVELS
    shape = {
        "rounds": 1,
        "events": 20 if ctx.quick else 50,
        "interval_ms": 50,
        "ramp_ms": 1000 if ctx.quick else 2000,
    }
    title = (
        f"capacity ladder: {', '.join(f'{n:,}' for n in levels)} concurrent SSE streams, "
        f"{shape['events']} events each at {shape['interval_ms']} ms, starting over {shape['ramp_ms']} ms"
        + (", upstream over HTTPS" if ctx.tls else "")
    )
    if not ctx.box.have_go:
        raise Skip("needs Go for the streaming load generator: install with `apt-get install golang-go`")
    figures = ladder_figures(levels)
    notes: list[str] = []
    peers = start_peers(ctx, name, notes, keys="abc")
    runs: dict[str, list[dict]] = {key: [] for key in peers}
    verdicts: dict[str, dict[int, tuple[bool, str]]] = {key: {} for key in peers}
    missed: dict[str, int] = {}  # peer -> the level it missed (not run further up)
    try:
        for level in levels:
            active = [key for key in peers if key not in missed]
            if not any(key != "a" for key in active) and len(peers) > 1:
                break  # only the baseline left
            for index in range(ctx.runs):
                for key in active:
                    peer = peers[key]
                    say(f"  {level:,} streams, run {index + 1}/{ctx.runs}: {peer.label}")
                    try:
                        res = _ladder_run(ctx, peer, level, shape, runs, index, notes)
                    except Exception as exc:
                        say(f"    FAILED: {exc}")
                        res = {"level": level, "run": index, "error": str(exc)[:2000]}
                        notes.append(
                            f"{peer.label}, {level:,} streams, run {index + 1} failed: "
                            f"{str(exc).splitlines()[0][:300]}"
                        )
                    runs[key].append(res)
                    time.sleep(run_pause(ctx, 2.0))
            for key in active:
                stats = [run for run in runs[key] if run["level"] == level]
                verdicts[key][level] = _held(stats, key)
                ok, why = verdicts[key][level]
                say(f"  {peers[key].label}: {level:,} streams {'held' if ok else 'NOT held: ' + why}")
                if not ok and key != "a":
                    missed[key] = level
        saturation_notes(
            ctx, peers, {k: [r for r in v if "load_cpu_pct" in r] for k, v in runs.items()}, notes
        )
    finally:
        stop_peers(peers)
    # Each level's figures under its own keys, so that the summary is per level.
    flat = {
        key: [
            {
                f"n{run['level']}_{k}": v
                for k, v in run.items()
                if isinstance(v, (int, float)) and k not in ("level", "run")
            }
            for run in peer_runs
        ]
        for key, peer_runs in runs.items()
    }
    setup = [
        f"a peer holds a level when, in the medians over that level's runs: time to first event p99 ≤ "
        f"{HOLD_TTFE_P99_MS:,.0f} ms, added delay p99 (over direct, same level and run) ≤ "
        f"{HOLD_ADDED_P99_MS:,.0f} ms (issue 12's two conditions) and 0 failed streams (direct: the first "
        "and the last)",
        "levels from the smallest up; a peer that does not hold a level is not run at the larger ones; "
        "largest held = the largest level held with every smaller one held too (0: none)",
        "one round per stream (a new client connection each); the streams start evenly over the ramp; "
        "CPU % = CPU seconds over the load's wall time × 100",
        *tls_setup(ctx),
    ]
    result = result_dict(name, title, ctx, peers, flat, figures, setup, notes)
    result["runs_by_level"] = runs
    s = result["summary"]
    largest: dict[str, int] = {}
    for key in peers:
        largest[key] = 0
        for level in levels:
            if verdicts[key].get(level, (False, ""))[0]:
                largest[key] = level
            else:
                break
        s[key]["largest_held"] = {"median": largest[key], "min": largest[key], "max": largest[key], "n": 1}
    go = largest.get("b")
    for key in peers:
        if key != "b" and go:
            s[key]["largest_held"]["ratio_to_go"] = largest[key] / go
    result["verdicts"] = {
        k: {str(lv): {"held": ok, "why": why} for lv, (ok, why) in v.items()} for k, v in verdicts.items()
    }
    result["extra_md"] = _ladder_table(peers, levels, verdicts, largest, s, missed)
    value = largest.get("c")
    quick_note = "; the --quick ladder stops below it" if ctx.quick else ""
    targets = [
        Target(
            f"1 worker: largest number of streams held ≥ {LADDER_TARGET:,} (issue 12)",
            None if ctx.quick else value,
            LADDER_TARGET,
            f"added delay p99 ≤ {HOLD_ADDED_P99_MS:.0f} ms, first event p99 ≤ {HOLD_TTFE_P99_MS:.0f} ms, "
            f"0 failed streams, medians over the runs{quick_note}",
            ",.0f",
            below=False,
        )
    ]
    if ctx.quick and value is not None:
        notes.append(f"quick run: 1 worker held {value:,} of the quick levels {', '.join(map(str, levels))}")
    ctx.summaries[name] = s
    return result, figures, targets


def _ladder_run(
    ctx: Context, peer: Peer, level: int, shape: dict, runs: dict, index: int, notes: list[str]
) -> dict:
    meter = Meter(peer, notes, ctx.upstream)
    out = load.run_sseload(
        ctx.box, ctx.layout, peer.url, BENCH_TOKEN, ca=peer.client_ca, streams=level, **shape
    )
    used = meter.done()
    res = {"level": level, "run": index, **stream_figures(out, used)}
    failure_note(notes, peer, f"{level:,} streams, run {index + 1}", res)
    load_side(res, used["upstream_cpu_s"], out.get("cpu_s", 0.0), out["wall_s"])
    base = next(
        (r for r in runs.get("a", []) if r["level"] == level and r["run"] == index and "delay_p99_ms" in r),
        None,
    )
    if peer.key != "a" and base and res["delay_p99_ms"] is not None and base["delay_p99_ms"] is not None:
        res["added_p99_ms"] = res["delay_p99_ms"] - base["delay_p99_ms"]
    say(
        f"    failed {res['failed']}/{res['streams']}, first event p99 {res['ttfe_p99_ms'] or 0:.1f} ms, "
        f"delay p99 {res['delay_p99_ms'] or 0:.2f} ms"
        + (f" (added {res['added_p99_ms']:.2f})" if "added_p99_ms" in res else "")
        + f", CPU {res['cpu_pct']:.0f}%"
    )
    return res


def _ladder_table(
    peers: dict[str, Peer],
    levels: tuple[int, ...],
    verdicts: dict[str, dict[int, tuple[bool, str]]],
    largest: dict[str, int],
    summary: dict,
    missed: dict[str, int],
) -> str:
    lines = [
        "| streams | " + " | ".join(peer.label for peer in peers.values()) + " |",
        "|---" * (len(peers) + 1) + "|",
    ]
    for level in levels:
        cells = []
        for key in peers:
            if level not in verdicts[key]:
                below = missed.get(key)
                cells.append(f"not run (missed {below:,})" if below else "not run")
                continue
            ok, why = verdicts[key][level]
            ttfe = get(summary, key, f"n{level}_ttfe_p99_ms")
            added = get(summary, key, f"n{level}_added_p99_ms")
            detail = [f"first event p99 {ttfe:,.0f} ms"] if ttfe is not None else []
            if added is not None:
                detail.append(f"added p99 {added:+,.1f} ms")
            text = "held" if ok else f"**not held** ({why})"
            cells.append(text + (": " + ", ".join(detail) if ok and detail else ""))
        lines.append(f"| {level:,} | " + " | ".join(cells) + " |")
    lines.append(
        "| **largest held** | "
        + " | ".join(f"**{largest[k]:,}**" if largest[k] else f"**none** (< {levels[0]:,})" for k in peers)
        + " |"
    )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- reload

RELOAD_FIGURES = [
    Figure(
        "reload_small_s",
        f"replace → first request served with the new table, {TABLE_SIZE:,} tokens (s)",
        ",.3f",
    ),
    Figure(
        "reload_big_s", f"replace → first request served with the new table, {BIG_TABLE:,} tokens (s)", ",.3f"
    ),
    Figure("max_delay_idle_ms", "max event delay, ~20 streams, no reload (ms)", ",.1f"),
    Figure("max_delay_reload_ms", f"max event delay, ~20 streams, {BIG_TABLE:,}-token reload (ms)", ",.1f"),
    Figure("p99_delay_reload_ms", f"p99 event delay during the {BIG_TABLE:,}-token reload (ms)", ",.2f"),
    Figure("failed", "failed streams (both loads)", ",.0f", ratio=False),
    Figure("write_s", f"write of the {BIG_TABLE:,}-token file (s, harness side)", ",.3f", ratio=False),
]


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _poll_served(peer: Peer, token: str, timeout: float) -> float | None:
    """Seconds until a request with ``token`` (only in the new table) is served; None on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if request(peer.port, "POST", peer.chat_path, token, CHAT_BODY, timeout=5) == 200:
            return time.monotonic() - start
        time.sleep(0.01)
    return None


def reload(ctx: Context) -> tuple[dict, list[Figure], list[Target]]:
    name = "reload"
    shape = {
        "streams": 20,
        "rounds": 1,
        "events": 80 if ctx.quick else 120,
        "interval_ms": 50,
        "ramp_ms": 200,
    }
    stream_s = load.expected_seconds(**{k: shape[k] for k in ("rounds", "events", "interval_ms", "ramp_ms")})
    reload_at = 1.0
    title = (
        f"token table hot reload: replace → served, and the pause a {BIG_TABLE:,}-token reload causes to "
        f"{shape['streams']} streams in flight ({shape['events']} events at {shape['interval_ms']} ms)"
    )
    notes: list[str] = []
    if not ctx.box.have_go:
        notes.append("no Go: the Go reference and the event-delay figures (they need sseload) are skipped")
    peers = start_peers(ctx, name, notes)
    say(f"  building a {BIG_TABLE:,}-token table")
    ctx.tables.prepare(BIG_TABLE)  # builds and caches the rows once
    try:

        def streams_args(peer: Peer) -> list[str]:
            return load.sseload_args(ctx.box, ctx.layout, peer.url, BENCH_TOKEN, **shape)

        def measure(peer: Peer, index: int, runs) -> dict:
            res: dict = {"failed": 0}
            if ctx.box.have_go:
                idle = load.finish_sseload(load.start_sseload(streams_args(peer)), stream_s + 90)
                res["max_delay_idle_ms"] = idle["delay_ms"].get("max")
                res["p99_delay_idle_ms"] = idle["delay_ms"].get("p99")
                res["failed"] += idle["failed"]
            if not peer.reloads:
                return res
            path = peer.table_path
            # 1) a small table, nothing in flight
            token = ctx.tables.new_token(peer.name)
            data = ctx.tables.prepare(TABLE_SIZE, (BENCH_TOKEN, token))
            replace(path, data)
            res["reload_small_s"] = _poll_served(peer, token, 30)
            # 2) a big table while streams are in flight
            token = ctx.tables.new_token(peer.name)
            data = ctx.tables.prepare(BIG_TABLE, (BENCH_TOKEN, token))
            streams = load.start_sseload(streams_args(peer)) if ctx.box.have_go else None
            started = time.monotonic()
            time.sleep(reload_at)
            before = time.monotonic()
            replace(path, data)
            res["write_s"] = time.monotonic() - before
            res["reload_big_s"] = _poll_served(peer, token, 30)
            served_at = time.monotonic() - started
            if streams is not None:
                during = load.finish_sseload(streams, stream_s + 90)
                res["max_delay_reload_ms"] = during["delay_ms"].get("max")
                res["p99_delay_reload_ms"] = during["delay_ms"].get("p99")
                res["failed"] += during["failed"]
                res["reload_within_streams"] = served_at < during["wall_s"]
                if not res["reload_within_streams"]:
                    notes.append(
                        f"{peer.label}, run {index + 1}: the new table was served only after the streams "
                        "had ended: the pause figure does not cover the whole reload"
                    )
            say(
                f"    served after {_fmt(res['reload_small_s'], '.3f')} s ({TABLE_SIZE:,}) / "
                f"{_fmt(res['reload_big_s'], '.3f')} s ({BIG_TABLE:,}); max event delay "
                f"{_fmt(res.get('max_delay_idle_ms'), '.1f')} ms idle, "
                f"{_fmt(res.get('max_delay_reload_ms'), '.1f')} ms during the reload"
            )
            return res

        runs = interleave(ctx, peers, measure, notes, pause=1.0)
    finally:
        stop_peers(peers)
    setup = [
        "replace = common.tokentable.write_atomic (temp file, fsync, os.replace, fsync of the "
        "directory); the "
        "clock starts when it returns",
        "served = the first 200 to a request (new connection each, every 10 ms) with a token that "
        "only the new "
        "table has (2 workers: whichever worker answers)",
        "our proxy: TOKEN_FILE_POLL at its default, 1 s (what users get); the Go reference polls "
        "mtime/size/inode "
        "every 1 s",
        f"the {BIG_TABLE:,}-token file is replaced {reload_at:.0f} s after {shape['streams']} streams "
        "started; "
        "max event delay is over every event of those streams (compare with the same load without a reload)",
    ]
    result = result_dict(name, title, ctx, peers, runs, RELOAD_FIGURES, setup, notes)
    s = result["summary"]
    targets = []
    for key in "cd":
        if key in peers:
            label = peers[key].label
            targets += [
                Target(
                    f"{label}: new {TABLE_SIZE:,}-token table served within 1.5 s (s)",
                    get(s, key, "reload_small_s", "max"),
                    1.5,
                    "worst run",
                    ",.3f",
                ),
                Target(
                    f"{label}: new {BIG_TABLE:,}-token table served within 1.5 s (s)",
                    get(s, key, "reload_big_s", "max"),
                    1.5,
                    "worst run",
                    ",.3f",
                ),
                Target(
                    f"{label}: no event delayed > 200 ms by a {BIG_TABLE:,}-token reload (ms)",
                    get(s, key, "max_delay_reload_ms", "max"),
                    200,
                    "worst run, max event delay",
                    ",.1f",
                ),
            ]
    return result, RELOAD_FIGURES, targets


def ws(ctx: Context) -> tuple[dict, list[Figure], list[Target]]:
    from bench import wsbench  # imported here: it builds on this module

    return wsbench.ws(ctx)


def ws_tls(ctx: Context) -> tuple[dict, list[Figure], list[Target]]:
    from bench import wsbench

    return wsbench.ws_tls(ctx)


# ---------------------------------------------------------------------------- logstall (issue 18)


def logstall(ctx: Context) -> tuple[dict, list[Figure], list[Target]]:
    """The deployed shape with supervisord stopped for 3 s mid-load, beside the same load without."""
    if not ctx.box.have_go or ctx.box.wrk is None:
        raise Skip("needs Go (streams, upstream) and wrk (the small requests)")
    name = "logstall"
    shape = logstall_load.QUICK_SHAPE if ctx.quick else logstall_load.SHAPE
    title = (
        f"deployed shape (scripts/run -d, 1 worker): {shape['streams']} SSE streams at 20 events/s for "
        f"{shape['events'] * shape['interval_ms'] / 1000:.0f} s + small requests paced at ~1,000/s; "
        f"supervisord SIGSTOPped for {logstall_load.STALL_FOR:.0f} s, {logstall_load.STALL_AT} s in"
    )
    notes: list[str] = []
    peers = start_peers(
        ctx,
        name,
        notes,
        keys="e",
        makers={"e": lambda home: ProxyDeployed(ctx.layout, home, ctx.tables, TABLE_SIZE)},
    )
    if "e" not in peers:
        raise Skip("the deployed peer did not start: " + "; ".join(notes))
    deployed = peers["e"]
    try:
        runs: dict[str, list[dict]] = {"e": [], "s": []}
        for index in range(ctx.runs):
            for key, stall in (("e", False), ("s", True)):
                say(f"  run {index + 1}/{ctx.runs}: {'stall' if stall else 'no stall'}")
                res = logstall_load.run(
                    ctx.box, ctx.layout, ctx.upstream, deployed, stall=stall, quick=ctx.quick
                )
                say(
                    f"    delay p99 {res['delay_p99_ms']:.2f} max {res['delay_max_ms']:.1f} ms, "
                    f"small {res['small_rps'] or 0:,.0f} req/s, lines missing {res['missing_lines']}, "
                    f"failed {res['failed']}"
                )
                runs[key].append(res)
                time.sleep(1.0)
    finally:
        stop_peers(peers)
    labels = {"e": "no stall", "s": "supervisord stopped 3 s"}
    setup = [
        "one deployment (scripts/run -d, PROXY_WORKERS=1, the syncer, supervisord writing the log files; "
        f"the whole tree on CPU {ctx.layout.describe(ctx.layout.proxy_1w)}), runs alternating without and "
        "with the stall",
        f"small requests: wrk, {logstall_load.SMALL_CONNECTIONS} connections, each pausing "
        f"{logstall_load.SMALL_DELAY_MS} ms between requests",
        "access lines missing = requests the upstream served during the load − access lines the worker's "
        "log file gained (read once it stopped growing)",
    ]
    result = result_dict(
        name, title, ctx, {"e": deployed, "s": deployed}, runs, logstall_load.FIGURES, setup, notes, "e"
    )
    result["peers"] = labels
    s = result["summary"]
    targets = [
        Target("stall: event delay p99 ≤ 50 ms", get(s, "s", "delay_p99_ms"), 50, "median", ",.2f"),
        Target(
            "stall: event delay max ≤ 250 ms", get(s, "s", "delay_max_ms", "max"), 250, "worst run", ",.1f"
        ),
        Target("stall: 0 access lines missing", get(s, "s", "missing_lines", "max"), 0, "worst run", ",.0f"),
        Target("stall: 0 failed streams", get(s, "s", "failed", "max"), 0, "worst run", ",.0f"),
    ]
    return result, logstall_load.FIGURES, targets


# In the order ``all`` runs them: each HTTPS variant right after its plain one.
SCENARIOS = {
    "small": small,
    "small-tls": small_tls,
    "small-limits": small_limits,
    "stream1000": stream1000,
    "stream1000-tls": stream1000_tls,
    "stream300-tls": stream300_tls,
    "tlsconn": tlsconn,
    "reload": reload,
    "ladder": ladder,
    "ladder-tls": ladder_tls,
    "logstall": logstall,
    "ws": ws,
    "ws-tls": ws_tls,
}
NOT_IN_ALL = ("ladder-tls",)  # `all` runs it only with --ladder-tls (it adds ~5 minutes)
