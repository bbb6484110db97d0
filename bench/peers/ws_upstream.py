"""The WebSocket scenario's upstream (``python bench/peers/ws_upstream.py``): a ``websockets``
asyncio server. Each session gets ``--rate`` messages a second on a fixed schedule from its start,
each a JSON text of about ``--size`` bytes carrying ``t_sent`` (Unix time, float seconds, taken
just before the send); what the client sends is read and counted. Plain HTTP on ``--port``, and
with ``--tls-cert``/``--tls-key`` also TLS on ``--tls-port``. No permessage-deflate, no pings (the
openai SDK's settings). Exits on SIGTERM or when its parent is gone."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import time

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

RECEIVED = [0]


async def session(connection, rate: float, pad: str) -> None:
    async def reader() -> None:
        async for _ in connection:
            RECEIVED[0] += 1

    task = asyncio.create_task(reader())
    interval = 1.0 / rate
    start = time.monotonic()
    n = 0
    try:
        while not task.done():
            n += 1
            delay = start + n * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await connection.send(f'{{"type":"bench.tick","n":{n},"t_sent":{time.time():.6f},"pad":"{pad}"}}')
    except ConnectionClosed:
        pass
    finally:
        task.cancel()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls-port", type=int, default=0)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--size", type=int, default=600)
    args = parser.parse_args()
    pad = "x" * max(0, args.size - 70)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    parent = os.getppid()

    async def handler(connection) -> None:
        await session(connection, args.rate, pad)

    options = {"ping_interval": None, "compression": None, "max_size": None}
    servers = [await serve(handler, "127.0.0.1", args.port, **options)]
    if args.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        servers.append(await serve(handler, "127.0.0.1", args.tls_port, ssl=context, **options))
    print("ready", flush=True)
    while not stop.done():
        if os.getppid() != parent:
            break
        await asyncio.wait([stop], timeout=1.0)
    for server in servers:
        server.close()
    print(json.dumps({"received": RECEIVED[0]}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
