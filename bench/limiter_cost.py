"""``python -m bench.limiter_cost``: the per-request cost of the per-token limiter, in isolation.

Starts its own redis-server (unix socket in a temp dir, no TCP port, no persistence), then in this
gevent monkey-patched process times acquire + release for a token limited by rpm, by concurrency,
and by both — sequentially and from 64 greenlets at once — and prints, per request, the worker's
CPU, the wall time and redis-server's CPU (at clock-tick resolution: 10 ms over 5000 requests).
Compare with the CPU of a small proxied request (README, Performance): the issue's target is at
most 15 % more with limits on. Not part of the test suite.
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

from proxyapp.limits import Limiter, TokenLimits  # noqa: E402

REQUESTS = 5000
RUNS = 5
CASES = {"rpm": (0, 10**9), "concurrency": (10**6, 0), "both": (10**6, 10**9)}


def process_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(limiter: Limiter, limits: TokenLimits, parallel: int, redis_pid: int) -> tuple[float, ...]:
    def work(count: int) -> None:
        for _ in range(count):
            limiter.release(limiter.acquire(limits))

    gevent.sleep(0.05)
    cpu, wall, redis_cpu = time.process_time(), time.perf_counter(), process_cpu(redis_pid)
    gevent.joinall([gevent.spawn(work, REQUESTS // parallel) for _ in range(parallel)])
    while limiter._pending:  # the releases are part of the cost
        gevent.sleep(0.001)
    return (
        (time.process_time() - cpu) / REQUESTS * 1e6,
        (time.perf_counter() - wall) / REQUESTS * 1e6,
        (process_cpu(redis_pid) - redis_cpu) / REQUESTS * 1e6,
    )


def main() -> None:
    directory = Path(tempfile.mkdtemp(prefix="lc", dir="/tmp"))
    socket_path = directory / "r.sock"
    server = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", "0", "--unixsocket",
         str(socket_path), "--save", "", "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        limiter = Limiter(f"unix://{socket_path}")
        limiter.check_reachable(10)
        limiter.start()
        print(f"{REQUESTS} acquire+release per run, median of {RUNS} runs (µs per request)")
        print(f"{'limit':<12} {'greenlets':>9} {'worker CPU':>11} {'wall':>8} {'redis CPU':>10}")
        for name, (conc, rpm) in CASES.items():
            for parallel in (1, 64):
                limits = TokenLimits.build(conc, rpm, f"bench-{name}-{parallel}")
                runs = [one_run(limiter, limits, parallel, server.pid) for _ in range(RUNS)]
                cpu, wall, redis_cpu = (statistics.median(r[i] for r in runs) for i in range(3))
                print(f"{name:<12} {parallel:>9} {cpu:>11.1f} {wall:>8.1f} {redis_cpu:>10.1f}")
        cpu = time.process_time()
        for _ in range(100_000):
            limiter.acquire(None)
        print(f"{'unlimited':<12} {1:>9} {(time.process_time() - cpu) * 10:>11.2f} {'':>8}")
        limiter.close()
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
