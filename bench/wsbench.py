"""The WebSocket scenarios (issue 19): ``ws`` and ``ws-tls``.

200 concurrent sessions (``--quick``: the same 200, shorter); the upstream sends 20 messages a
second on each (a ~600-byte JSON text with its send time), each client sends 1 a second. Peers: the
upstream directly (a), the Go reference (b: httputil.ReverseProxy relays the upgrade) and our
proxy with one worker (c). The upstream (bench/peers/ws_upstream.py) and the load generator
(bench/wsload.py) are Python ``websockets`` programs in their own processes on the load side's
CPU; both use the openai SDK's settings (no permessage-deflate, no pings).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

from websockets.sync.client import connect

from bench import procstat
from bench.peers import PYTHON, GoReference, Peer, Proc, ProxyOneWorker, base_env, free_port, wait_until
from bench.report import Figure, Target, get
from bench.scenarios import (
    TABLE_SIZE,
    Context,
    Meter,
    interleave,
    load_side,
    result_dict,
    saturation_notes,
    start_peers,
    stop_peers,
)
from bench.tables import BENCH_TOKEN, Tables
from bench.tlsca import TlsFiles, make_certificates
from bench.tools import REPO, say

SESSIONS = 200
UPSTREAM_RATE = 20.0
CLIENT_RATE = 1.0
PATH = "/realtime?model=bench"

FIGURES = [
    Figure("failed", "failed sessions", ",.0f", ratio=False),
    Figure("delay_p50_ms", "message delay p50 (ms)", ",.2f"),
    Figure("delay_p99_ms", "message delay p99 (ms)", ",.2f"),
    Figure("added_p50_ms", "added delay p50 (ms, vs direct)", ",.2f", ratio=False),
    Figure("added_p99_ms", "added delay p99 (ms, vs direct)", ",.2f", ratio=False),
    Figure("steady_p99_ms", "message delay p99 once every session is open (ms)", ",.2f"),
    Figure("cpu_pct", "CPU (% of one core; direct: the upstream's)", ",.0f"),
    Figure("peak_rss_mb", "peak RSS (MB)", ",.1f"),
    Figure("rss_per_session_kb", "RSS per open session (KB: peak − RSS at start, / sessions)", ",.1f"),
    Figure("load_cpu_pct", "load side CPU: upstream + load generator (% of one core)", ",.0f", ratio=False),
    Figure(
        "runqueue_wait_pct",
        "time the peer waited for its CPU, held by other processes (% of the run)",
        ",.0f",
        ratio=False,
    ),
]


class WsUpstream:
    """bench/peers/ws_upstream.py: plain on ``plain_port``, and TLS on ``port`` with ``tls``."""

    def __init__(self, layout, workdir: Path, tls: TlsFiles | None) -> None:
        self.plain_port = free_port()
        self.port = free_port() if tls else self.plain_port
        args = [
            *layout.prefix(layout.load),
            PYTHON,
            str(REPO / "bench" / "peers" / "ws_upstream.py"),
            "--port",
            str(self.plain_port),
            "--rate",
            str(UPSTREAM_RATE),
        ]
        if tls:
            args += ["--tls-port", str(self.port), "--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
        self.proc = Proc(args, base_env(), workdir / f"ws-upstream-{self.port}.log")
        wait_until(lambda: "ready" in self.proc.log_tail(), 15, "the WebSocket upstream", self.proc)
        scheme = "https" if tls else "http"
        self.api_url = f"{scheme}://127.0.0.1:{self.port}/v1"
        self.kind = "Python websockets (bench/peers/ws_upstream.py)" + (", TLS (bench CA)" if tls else "")

    def stop(self) -> None:
        self.proc.stop()


def _check(peer: Peer, path: str) -> None:
    with connect(
        f"ws://127.0.0.1:{peer.port}{path}",
        additional_headers={"Authorization": f"Bearer {BENCH_TOKEN}"},
        compression=None,
        open_timeout=10,
    ) as ws:
        message = ws.recv(timeout=5)
    if '"t_sent"' not in message:
        raise RuntimeError(f"{peer.label}: unexpected first message {message[:100]!r}")


class WsDirect(Peer):
    key, name, label = "a", "direct", "direct (limit)"
    reloads = False

    def __init__(self, upstream: WsUpstream) -> None:
        super().__init__()
        self.port = upstream.plain_port
        self.upstream = upstream
        _check(self, self.ws_path)

    ws_path = "/v1" + PATH

    def pids(self) -> list[int]:
        return [self.upstream.proc.pid]

    def stop(self) -> None:
        pass


class WsGo(GoReference):
    ws_path = PATH

    def check_serves(self) -> None:
        _check(self, self.ws_path)


class WsProxy(ProxyOneWorker):
    ws_path = PATH

    def check_serves(self) -> None:
        _check(self, self.ws_path)


def run_load(ctx: Context, peer: Peer, duration: float) -> dict:
    args = [
        *ctx.layout.prefix(ctx.layout.load),
        PYTHON,
        "-m",
        "bench.wsload",
        "--url",
        f"ws://127.0.0.1:{peer.port}{peer.ws_path}",
        "--token",
        BENCH_TOKEN,
        "--sessions",
        str(SESSIONS),
        "--duration",
        str(duration),
        "--ramp",
        "2",
        "--rate",
        str(CLIENT_RATE),
        "--upstream-rate",
        str(UPSTREAM_RATE),
    ]
    done = subprocess.run(
        args, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=duration + 120, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _waited(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += procstat.runqueue_wait_seconds(pid)
        except OSError:
            pass
    return total


def _rss(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total = max(total, procstat.rss_mb(pid))
        except OSError:
            pass
    return total


def _ws(ctx: Context, name: str, tls: bool) -> tuple[dict, list[Figure], list[Target]]:
    files = make_certificates(ctx.workdir / f"{name}-tls") if tls else None
    upstream = WsUpstream(ctx.layout, ctx.workdir, files)
    duration = 8.0 if ctx.quick else 20.0
    title = (
        f"{SESSIONS} concurrent WebSocket sessions for {duration:g} s: the upstream sends "
        f"{UPSTREAM_RATE:g} messages/s on each, each client {CLIENT_RATE:g}/s"
        + (", upstream over TLS" if tls else "")
    )
    tables = Tables(upstream.api_url)
    wctx = dataclasses.replace(ctx, upstream=upstream, tables=tables, tls=files)
    notes: list[str] = []
    try:
        peers = start_peers(
            wctx,
            name,
            notes,
            keys="abc",
            makers={
                "a": lambda home: WsDirect(upstream),
                "b": lambda home: WsGo(ctx.box, ctx.layout, home, tables, TABLE_SIZE, files),
                "c": lambda home: WsProxy(ctx.layout, home, tables, TABLE_SIZE, files),
            },
        )
        try:
            started_rss: dict[str, float] = {}  # each peer's RSS before its first run

            def measure(peer: Peer, index: int, runs) -> dict:
                # Before the first run only: memory a process keeps after a run (Python's
                # allocator, Go's heap) would otherwise make later runs look cheaper per session.
                idle = started_rss.setdefault(peer.key, _rss(peer.pids()))
                waited = _waited(peer.pids())
                meter = Meter(peer, notes, upstream)
                out = run_load(wctx, peer, duration)
                used = meter.done()
                waited = _waited(peer.pids()) - waited
                wall = out["wall_s"]
                res = {
                    "sessions": out["sessions"],
                    "failed": out["failed"],
                    "messages": out["messages"],
                    "delay_p50_ms": out["delay_p50_ms"],
                    "delay_p99_ms": out["delay_p99_ms"],
                    "delay_max_ms": out["delay_max_ms"],
                    "steady_p99_ms": out.get("steady_p99_ms"),
                    "cpu_pct": used["cpu_s"] / wall * 100 if wall else None,
                    "peak_rss_mb": used["peak_rss_mb"],
                    "rss_per_session_kb": (
                        (used["peak_rss_mb"] - idle) * 1024 / SESSIONS if used["peak_rss_mb"] else None
                    ),
                    "errors": out["errors"],
                    "runqueue_wait_pct": waited / wall * 100 if wall else None,
                }
                load_side(res, used["upstream_cpu_s"], out.get("cpu_s", 0.0), wall)
                direct = runs.get("a", [])
                if peer.key != "a" and len(direct) > index and direct[index].get("delay_p50_ms") is not None:
                    base = direct[index]
                    if res["delay_p50_ms"] is not None:
                        res["added_p50_ms"] = res["delay_p50_ms"] - base["delay_p50_ms"]
                        res["added_p99_ms"] = res["delay_p99_ms"] - base["delay_p99_ms"]
                if res["failed"]:
                    notes.append(
                        f"{peer.label}, run {index + 1}: {res['failed']} failed, e.g. {out['errors'][:2]}"
                    )
                say(
                    f"    failed {res['failed']}/{res['sessions']}, {res['messages']} messages, "
                    f"delay p50 {res['delay_p50_ms'] or 0:.2f} p99 {res['delay_p99_ms'] or 0:.2f} ms, "
                    f"CPU {res['cpu_pct'] or 0:.0f}%, peak RSS {res['peak_rss_mb'] or 0:.1f} MB "
                    f"({res['rss_per_session_kb'] or 0:.1f} KB/session)"
                )
                return res

            runs = interleave(wctx, peers, measure, notes, pause=1.0)
            saturation_notes(wctx, peers, runs, notes)
        finally:
            stop_peers(peers)
    finally:
        upstream.stop()
    setup = [
        f"sessions open evenly over the first 2 s and last {duration:g} s each; a session fails on a "
        "handshake error, an early end or fewer than 90% of the messages due",
        "message delay = arrival at the client − the upstream's send time (t_sent in the message); added "
        "delay = a peer's percentile − direct's percentile of the same round; 'once every session is "
        "open': messages sent from 1 s after the last handshake on (no handshake costs in it)",
        "CPU % = CPU seconds over the load's wall time × 100; peak RSS = VmHWM reset before each run; RSS "
        "per session = (peak RSS − the peer's RSS before its first run) / sessions",
        "the upstream and the load generator are Python (websockets, asyncio): their own latency is in "
        "every peer's delay alike, and direct's delay is the baseline",
        "CPU wait = the peer's threads runnable but not running (schedstat): other processes on its CPU "
        "(pinning keeps the peer on its CPU, not others off it); delays of a run with a high wait are noise",
        *(
            [
                "upstream over TLS (wss): the Go reference trusts the bench CA through SSL_CERT_FILE, "
                "our proxy "
                "through UPSTREAM_CA_BUNDLE; direct uses the upstream's plain port"
            ]
            if tls
            else []
        ),
    ]
    result = result_dict(name, title, wctx, peers, runs, FIGURES, setup, notes)
    s = result["summary"]
    go_added, go_cpu, go_rss = (
        get(s, "b", "added_p99_ms"),
        get(s, "b", "cpu_pct"),
        get(s, "b", "rss_per_session_kb"),
    )
    targets = [
        Target("1 worker: 0 failed sessions", get(s, "c", "failed", "max"), 0, "worst run", ",.0f"),
        Target(
            "1 worker: added p99 delay ≤ Go's + 10 ms",
            get(s, "c", "added_p99_ms"),
            max(go_added, 0) + 10 if go_added is not None else None,
            "medians; a negative Go figure (noise) counts as 0",
            ",.2f",
        ),
        Target(
            "1 worker: CPU ≤ 2× Go's",
            get(s, "c", "cpu_pct"),
            2 * go_cpu if go_cpu is not None else None,
            "medians",
            ",.0f",
        ),
        Target(
            "1 worker: RSS per open session ≤ 2× Go's",
            get(s, "c", "rss_per_session_kb"),
            2 * go_rss if go_rss else None,
            "medians",
            ",.1f",
        ),
    ]
    return result, FIGURES, targets


def ws(ctx: Context) -> tuple[dict, list[Figure], list[Target]]:
    return _ws(ctx, "ws", tls=False)


def ws_tls(ctx: Context) -> tuple[dict, list[Figure], list[Target]]:
    return _ws(ctx, "ws-tls", tls=True)
