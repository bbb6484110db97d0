"""``python -m bench [SCENARIO ...|all] [--quick]``: the benchmark (see bench/README.md).

Not part of the test suite. Everything listens on 127.0.0.1; every load stops by itself; only the
processes started here are stopped, by PID.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench import report, scenarios
from bench.peers import Upstream
from bench.tables import Tables
from bench.tlsca import TlsFiles, make_certificates
from bench.tools import cpu_layout, find_tools, say


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "scenario",
        nargs="*",
        default="all",  # a string: argparse checks a list default against the choices as a whole
        choices=[*scenarios.SCENARIOS, "all"],
        help="one or more, run in the order given (default: all)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short loads (a smoke run; figures not comparable)"
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=None,
        help="interleaved runs per figure (default 3; with --quick 1; minimum 1)",
    )
    parser.add_argument(
        "--ladder-tls",
        action="store_true",
        help="`all` also runs the capacity ladder over HTTPS (ladder-tls, ~5 more minutes)",
    )
    parser.add_argument("--peers", default="abcde", help="subset of peers a b c d e (default all)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--no-go", action="store_true", help="act as if Go were missing (tries the fallbacks)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, tables)")
    return parser.parse_args(argv)


def https_upstream(box, layout, workdir: Path, cache: list) -> tuple[Upstream, Tables, TlsFiles]:
    """The HTTPS fake upstream (a second process), its certificates made on first use; then cached.
    A failure is cached too (as the exception), so that every HTTPS scenario reports it alike."""
    if not cache:
        try:
            files = make_certificates(workdir / "tls")
            upstream = Upstream(box, layout, workdir, tls=files)
            say(f"fake upstream over HTTPS: 127.0.0.1:{upstream.port} (CA {files.ca})")
            cache.append((upstream, Tables(upstream.api_url), files))
        except RuntimeError as exc:
            cache.append(exc)
    if isinstance(cache[0], Exception):
        raise RuntimeError(str(cache[0]))
    return cache[0]


def _terminate(signum, frame):  # SIGTERM: unwind through the finally blocks that stop the peers
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    names: list[str] = []
    for asked in [args.scenario] if isinstance(args.scenario, str) else args.scenario:
        if asked == "all":
            asked_names = [
                name
                for name in scenarios.SCENARIOS
                if name not in scenarios.NOT_IN_ALL or (name == "ladder-tls" and args.ladder_tls)
            ]
        else:
            asked_names = [asked]
        names += [name for name in asked_names if name not in names]
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    layout = cpu_layout(disable=args.no_pin)
    if layout.pinned:
        os.sched_setaffinity(0, layout.load)  # the harness itself stays off the proxy's CPU
    say(layout.note)
    workdir = Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))  # short: supervisord's socket path
    box = find_tools(workdir, no_go=args.no_go)
    failed = False
    done: dict[str, str] = {}
    upstream = None
    https: list = []  # the HTTPS upstream, started on first use
    began = time.monotonic()
    try:
        upstream = Upstream(box, layout, workdir)
        say(f"fake upstream: {upstream.kind}, 127.0.0.1:{upstream.port}")
        if not box.have_go:
            say(
                "NOTE: without Go the fake upstream is the Python fallback (tests/fakes/upstream.py), "
                "which may "
                "limit throughput, and there is no Go reference and no streaming load."
            )
        ctx = scenarios.Context(
            box,
            layout,
            workdir,
            Tables(upstream.api_url),
            upstream,
            args.quick,
            max(1, runs),
            args.peers,
            https=lambda: https_upstream(box, layout, workdir, https),
        )
        for name in names:
            say(f"\n== {name}" + (" (quick)" if args.quick else ""))
            t0 = time.monotonic()
            try:
                result, figures, targets = scenarios.SCENARIOS[name](ctx)
            except scenarios.Skip as exc:
                say(f"SKIPPED {name}: {exc}")
                done[name] = f"## {name}\n\nSkipped: {exc}\n"
                continue
            result["targets"] = [t.to_json() for t in targets]
            result["meta"]["seconds"] = round(time.monotonic() - t0, 1)
            md = report.markdown(result, figures, targets)
            json_path, md_path = report.write(result, md)
            done[name] = md
            say("\n" + md)
            say(
                f"wrote {json_path.relative_to(report.RESULTS.parent.parent)} and "
                f"{md_path.relative_to(report.RESULTS.parent.parent)}"
            )
        latest = report.write_latest(done, args.quick)
        say(
            f"wrote {latest.relative_to(report.RESULTS.parent.parent)}; "
            f"total {time.monotonic() - began:.0f} s"
        )
    except BaseException as exc:
        failed = True
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        say(f"interrupted ({type(exc).__name__})")
        return 130
    finally:
        if https and not isinstance(https[0], Exception):
            https[0][0].stop()
        if upstream is not None:
            upstream.stop()
        if args.keep or failed:
            say(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
