"""A worker-like process for the limiter tests: gevent monkey-patched like wsgi.py, one Limiter.

python -m tests.support.limits_worker burst URL KEY CONC RPM N LEASE START_AT
    N greenlets acquire at once (after the epoch time START_AT); prints {"admitted", "refused"}
    and holds every slot until killed.
python -m tests.support.limits_worker hold URL KEY CONC RPM N LEASE 0
    acquires N times, prints {"held"}, then keeps the leases renewed until killed.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

from proxyapp.limits import Limiter, TokenLimits  # noqa: E402


def main() -> None:
    mode, url, key, conc, rpm, count, lease, start_at = sys.argv[1:9]
    limiter = Limiter(url, float(lease))
    limiter.check_reachable(5)
    limiter.start()
    limits = TokenLimits.build(int(conc), int(rpm), key)
    gevent.sleep(max(0.0, float(start_at) - time.time()))
    if mode == "burst":
        greenlets = [gevent.spawn(limiter.acquire, limits) for _ in range(int(count))]
        gevent.joinall(greenlets)
        admitted = sum(1 for g in greenlets if g.value.admitted)
        print(json.dumps({"admitted": admitted, "refused": int(count) - admitted}), flush=True)
    else:
        admissions = [limiter.acquire(limits) for _ in range(int(count))]  # kept: held until killed
        held = sum(1 for admission in admissions if admission.admitted)
        print(json.dumps({"held": held, "leases": limiter.in_flight_leases}), flush=True)
    while True:
        gevent.sleep(60)


if __name__ == "__main__":
    main()
