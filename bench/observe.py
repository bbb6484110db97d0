"""Micro-benchmark: CPU per call of WorkerMetrics.observe(), the metric updates of one request.

    .venv/bin/python -m bench.observe [--calls 200000] [--rounds 7]

Runs under gevent's monkey patching, as a worker does (prometheus_client's lock is then a gevent
lock). Each round times ``--calls`` observe() calls of a finished exchange (a 200 with usage,
request and response bytes, both histograms) with time.process_time; prints the median and the
best round in µs per call. The metrics files go to a temp directory, removed at the end.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from proxyapp.metrics import WorkerMetrics  # noqa: E402


def exchange(model: str = "FakeModel") -> SimpleNamespace:
    started = time.perf_counter() - 0.05
    return SimpleNamespace(
        decision=SimpleNamespace(route=SimpleNamespace(upstream=SimpleNamespace(model_name=model))),
        status=200,
        end_reason="complete",
        request_body=b"x" * 200,
        response_bytes=1000,
        started=started,
        first_byte_at=started + 0.01,
        usage_result={"prompt_tokens": 11, "completion_tokens": 22, "cached_tokens": 0},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="observe-bench-")
    try:
        metrics = WorkerMetrics(directory)
        one = exchange()
        metrics.observe(one)  # first call creates the series; not timed
        per_call = []
        for _ in range(args.rounds):
            observe = metrics.observe
            started = time.process_time()
            for _ in range(args.calls):
                observe(one)
            per_call.append((time.process_time() - started) / args.calls * 1e6)
        print(
            f"observe(): median {statistics.median(per_call):.2f} µs, best {min(per_call):.2f} µs "
            f"per call ({args.rounds} rounds of {args.calls:,} calls)"
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
