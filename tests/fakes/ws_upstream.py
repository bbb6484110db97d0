"""A fake WebSocket upstream (Realtime / Responses WebSocket mode) on the ``websockets`` library.

- Checks the credential it receives (``Authorization: Bearer``, ``x-api-key`` or a
  ``Sec-WebSocket-Protocol`` entry ``openai-insecure-api-key.<key>``) against ``--key``: 401 JSON
  otherwise, without an upgrade. A path ending in ``/forbidden`` gets a 403 JSON.
- On connect sends ``session.created``; echoes every message (text as text, binary as binary);
  ``{"type": "response.create"}`` is answered with ``response.done`` (Realtime usage) or, on a
  ``/responses`` path, ``response.completed`` (Responses usage); ``{"type": "test.close", "code": N}``
  makes it close with that code; ``{"type": "test.binary", "size": N}`` sends N bytes as binary;
  ``{"type": "test.stream", "count": N, "interval": s}`` sends N ``test.tick`` events.
- ``GET /_fake/log`` (plain HTTP): one record per connection (path, headers, open/close times, close
  code received), ``DELETE /_fake/log`` clears it.

Run: ``python -m tests.fakes.ws_upstream --port P --key K [--tls-cert C --tls-key K]``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import ssl
import sys
import time
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

USAGE_REALTIME = {
    "total_tokens": 18,
    "input_tokens": 11,
    "output_tokens": 7,
    "input_token_details": {"cached_tokens": 3, "text_tokens": 8, "audio_tokens": 3},
    "output_token_details": {"text_tokens": 5, "audio_tokens": 2},
}
USAGE_RESPONSES = {
    "input_tokens": 20,
    "output_tokens": 9,
    "total_tokens": 29,
    "input_tokens_details": {"cached_tokens": 4},
    "output_tokens_details": {"reasoning_tokens": 2},
}
PROTOCOL_KEY_PREFIX = "openai-insecure-api-key."

LOG: list[dict] = []
_ids = itertools.count(1)


def _json_response(status: int, body: object) -> Response:
    payload = json.dumps(body).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
    return Response(status, HTTPStatus(status).phrase, headers, payload)


def _credential(headers: Headers) -> str | None:
    auth = headers.get("Authorization")
    if auth and auth.lower().startswith("bearer "):
        return auth[7:]
    if headers.get("x-api-key"):
        return headers["x-api-key"]
    for entry in ",".join(headers.get_all("Sec-WebSocket-Protocol")).split(","):
        entry = entry.strip()
        if entry.startswith(PROTOCOL_KEY_PREFIX):
            return entry[len(PROTOCOL_KEY_PREFIX) :]
    return None


def make_process_request(key: str):
    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        path = request.path
        if path.startswith("/_fake/log"):
            return _json_response(200, LOG)
        if path.startswith("/_fake/clear"):
            LOG.clear()
            return _json_response(200, {"cleared": True})
        record = {
            "id": next(_ids),
            "path": path,
            "headers": list(request.headers.raw_items()),
            "opened": time.time(),
            "closed": None,
            "close_code": None,
            "status": 101,
            "messages": 0,
        }
        LOG.append(record)
        connection.fake_record = record  # type: ignore[attr-defined]
        if path.split("?")[0].endswith("/forbidden"):
            record["status"] = 403
            return _json_response(403, {"error": {"message": "forbidden by the fake", "code": "forbidden"}})
        if _credential(request.headers) != key:
            record["status"] = 401
            return _json_response(401, {"error": {"message": "bad key", "code": "invalid_api_key"}})
        return None

    return process_request


async def handler(connection: ServerConnection) -> None:
    record = connection.fake_record  # type: ignore[attr-defined]
    path = record["path"]
    responses = "/responses" in path
    try:
        await connection.send(json.dumps({"type": "session.created", "event_id": "evt_0"}))
        async for message in connection:
            record["messages"] += 1
            event = None
            if isinstance(message, str) and message.startswith("{"):
                try:
                    event = json.loads(message)
                except ValueError:
                    event = None
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "response.create":
                if responses:
                    done = {"type": "response.completed", "response": {"usage": USAGE_RESPONSES}}
                else:
                    done = {"type": "response.done", "response": {"usage": USAGE_REALTIME}}
                await connection.send(json.dumps({"type": "response.created"}))
                await connection.send(json.dumps(done))
            elif kind == "test.close":
                await connection.close(int(event.get("code", 1000)), event.get("reason", ""))
                break
            elif kind == "test.binary":
                await connection.send(os.urandom(int(event["size"])))
            elif kind == "test.stream":
                for n in range(int(event["count"])):
                    await connection.send(json.dumps({"type": "test.tick", "n": n, "t": time.time()}))
                    await asyncio.sleep(float(event.get("interval", 0)))
            else:
                await connection.send(message)
    except ConnectionClosed:
        pass
    finally:
        record["closed"] = time.time()
        if connection.protocol.close_rcvd is not None:
            record["close_code"] = connection.protocol.close_rcvd.code


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    args = parser.parse_args()
    context = None
    if args.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    stop = asyncio.get_running_loop().create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set_result, None)
    async with serve(
        handler,
        "127.0.0.1",
        args.port,
        ssl=context,
        process_request=make_process_request(args.key),
        subprotocols=["realtime"],
        select_subprotocol=lambda conn, offered: "realtime" if "realtime" in offered else None,
        ping_interval=None,
        max_size=None,
    ):
        print(f"ready {args.port}", flush=True)
        await stop
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
