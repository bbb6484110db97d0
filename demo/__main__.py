"""python -m demo backend|upstream --port N: the demo servers (see demo/__init__.py)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
ANSWER = (
    "Hello from the demo upstream! Your request went through the token-routing proxy, which "
    "swapped your client token for this model's API key and streamed this answer back chunk by chunk."
)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _JSONHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass  # the demo is quiet; the proxy logs every request


class BackendHandler(_JSONHandler):
    """GET /api/tokens/with-model: the token-model list, from the example file, in the backend's shape."""

    data_file = os.path.join(HERE, "tokens.example.json")

    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/api/tokens/with-model":
            return self._json(404, {"code": 404, "message": "not found"})
        with open(self.data_file, encoding="utf-8") as handle:
            text = handle.read()
        # The example file names the demo upstream's port as ${DEMO_UPSTREAM_PORT}.
        text = text.replace("${DEMO_UPSTREAM_PORT}", os.environ.get("DEMO_UPSTREAM_PORT", "6900"))
        rows = json.loads(text)
        self._json(200, {"code": 0, "message": "success", "data": rows})


class UpstreamHandler(_JSONHandler):
    """POST /v1/chat/completions (and /v1/models): a tiny OpenAI-compatible model that streams."""

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            return self._json(200, {"object": "list", "data": [{"id": "demo-model", "object": "model"}]})
        self._json(404, {"error": {"message": "not found", "type": "not_found_error"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            request = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return self._json(
                400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}}
            )
        if not self.headers.get("Authorization", "").startswith("Bearer sk-demo-upstream-"):
            return self._json(401, {"error": {"message": "bad upstream key", "type": "authentication_error"}})
        model = request.get("model") or "demo-model"
        words = ANSWER.split(" ")
        usage = {"prompt_tokens": 12, "completion_tokens": len(words), "total_tokens": 12 + len(words)}
        if not request.get("stream"):
            message = {"role": "assistant", "content": ANSWER}
            return self._json(
                200,
                {
                    "id": "chatcmpl-demo",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": usage,
                },
            )
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for index, word in enumerate(words):
            delta = {"content": word + ("" if index == len(words) - 1 else " ")}
            self._event(self._chunk(model, delta, None))
            time.sleep(0.05)
        self._event(self._chunk(model, {}, "stop"))
        if (request.get("stream_options") or {}).get("include_usage"):
            self._event({**self._chunk(model, {}, None), "choices": [], "usage": usage})
        self._send_chunk(b"data: [DONE]\n\n")
        self._send_chunk(b"")

    def _chunk(self, model: str, delta: dict, finish: str | None) -> dict:
        return {
            "id": "chatcmpl-demo",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def _event(self, payload: dict) -> None:
        self._send_chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _send_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m demo")
    parser.add_argument("role", choices=["backend", "upstream"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    handler = BackendHandler if args.role == "backend" else UpstreamHandler
    server = _Server((args.host, args.port), handler)
    # supervisord stops programs with SIGTERM: exit 0, so the stop is logged as a clean one.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(json.dumps({"event": "demo_listening", "role": args.role, "port": args.port}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
