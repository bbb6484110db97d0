"""The WebSocket scenario's load generator (``python -m bench.wsload``), a separate process:
``--sessions`` sessions opened evenly over ``--ramp`` seconds, each kept for ``--duration``
seconds, sending ``--rate`` messages a second; every upstream message's delay is its arrival time
minus its ``t_sent``. Prints one JSON object: sessions, failed (a handshake error, or a session
that ended early or got fewer than 90% of the messages due), errors, delay quantiles, CPU."""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import ssl
import time

from websockets.asyncio.client import connect


async def one(index: int, args, delays: list[tuple[float, float]], errors: list[str], context) -> bool:
    await asyncio.sleep(args.ramp * index / args.sessions)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    received = 0
    try:
        async with connect(
            args.url,
            additional_headers=headers,
            compression=None,
            ping_interval=None,
            max_size=None,
            open_timeout=10,
            ssl=context,
        ) as ws:
            append = delays.append

            async def sender() -> None:
                while True:
                    await asyncio.sleep(1.0 / args.rate)
                    await ws.send('{"type":"input_audio_buffer.append","audio":"AAAA"}')

            sending = asyncio.create_task(sender())
            try:
                async with asyncio.timeout(args.duration):
                    async for message in ws:
                        arrived = time.time()
                        at = message.find('"t_sent":')
                        if at >= 0:
                            sent = float(message[at + 9 : message.index(",", at)])
                            append((sent, arrived - sent))
                            received += 1
            except TimeoutError:
                pass
            finally:
                sending.cancel()
        due = args.duration * args.upstream_rate
        if received < 0.9 * due:
            errors.append(f"session {index}: {received} messages of ~{due:.0f}")
            return False
        return True
    except Exception as exc:
        errors.append(f"session {index}: {type(exc).__name__}: {exc}"[:300])
        return False


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", default="")
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--ramp", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--upstream-rate", type=float, default=20.0)
    parser.add_argument("--ca")
    args = parser.parse_args()
    context = ssl.create_default_context(cafile=args.ca) if args.url.startswith("wss:") else None
    delays: list[tuple[float, float]] = []  # (t_sent, delay)
    errors: list[str] = []
    t0 = time.monotonic()
    steady_from = time.time() + args.ramp + 1.0  # every session open: no handshakes in flight
    results = await asyncio.gather(*(one(i, args, delays, errors, context) for i in range(args.sessions)))
    wall = time.monotonic() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    ms = [d * 1000 for _, d in delays]
    steady = [d * 1000 for sent, d in delays if sent >= steady_from]
    print(
        json.dumps(
            {
                "sessions": args.sessions,
                "failed": results.count(False),
                "errors": errors[:5],
                "messages": len(ms),
                "delay_p50_ms": quantile(ms, 0.50),
                "delay_p99_ms": quantile(ms, 0.99),
                "delay_max_ms": max(ms) if ms else None,
                "steady_p50_ms": quantile(steady, 0.50),
                "steady_p99_ms": quantile(steady, 0.99),
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "wall_s": wall,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
