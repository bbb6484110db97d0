"""A fake backend admin API for tests: a real HTTP server on 127.0.0.1, standard library only.

Run it as ``python -m tests.fakes.backend --port N [--host 127.0.0.1] [--tls-cert PEM --tls-key PEM]``;
it prints nothing, so wait for the port to accept connections (tests.support.procs.port_open). All
state is in memory. With ``--tls-cert`` (certificate chain, PEM) and ``--tls-key`` (its key; may be
omitted when the key is in the chain file) it serves HTTPS only, the control API included; the TLS
handshake runs in the request's thread, and failed handshakes are listed by ``/_fake/tls_failures``.

Backend API (what the syncer calls)
-----------------------------------
``GET /api/tokens/with-model``
    ``{"code": 0, "message": "success", "data": [rows...]}`` in mode ``ok``. When a bearer token
    or a login is configured, the call needs ``Authorization: Bearer <token or valid JWT>``,
    otherwise HTTP 401 ``{"code": 401, "message": "未提供认证token"}``.
``POST /api/auth/login`` with ``{"username", "password"}``
    ``{"code": 0, "message": "success", "data": {"token": "<jwt>"}}`` when they match the
    configured login; otherwise HTTP 401 ``{"code": 401, "message": "用户名或密码错误"}``. Each
    JWT is new (``eyJ...`` shaped) and valid for ``jwt_uses`` list calls (0 = for ever); after
    that the list call answers the 401 above.

Control API (same port, JSON in and out)
----------------------------------------
``POST /_fake/state``  merge the given keys into the state; returns the state summary:
    ``rows``        list of row objects served as ``data`` (replaces any generated rows)
    ``generate``    ``{"count": N, "version": V, "models": M, "inactive_every": K}``: serve N
                    synthetic active rows instead (deterministic for a given V; tokens look like
                    ``sk-fakeclient-<V>-<i>-<hex>``, keys ``sk-fakeupstream-<V>-<m>-<hex>``; every
                    K-th row has token_status 0 when K > 0). Bodies are cached, so switching
                    between versions is cheap.
    ``mode``        ok | http500 | garbage | truncated | code_nonzero | data_not_list | hang | empty
                    | drip
                    (hang: accept the request and answer nothing until ``hang_seconds`` pass or
                    the state changes; truncated: announce the whole body, send half, close;
                    code_nonzero: HTTP 200 ``{"code": 500, "message": <error_message>}``, whose
                    default echoes the Authorization header, as a careless backend might;
                    drip: the ok body, 16 bytes every ``drip_interval`` seconds (default 0.2),
                    so every read is quick but the whole reply takes for ever)
    ``bearer``      required bearer token for the list call ("" = none)
    ``username``, ``password``  enable the login endpoint and require a JWT on the list call
    ``jwt_uses``    list calls each JWT is good for (0 = unlimited, negative = none: every JWT
                    is refused, as if revoked at once)
    ``delay``       seconds to wait before answering any backend call
    ``hang_seconds`` how long mode hang holds a request (default 60)
    ``error_message`` message of mode code_nonzero
    ``gzip``        send the mode ok body with ``Content-Encoding: gzip`` when the client
                    accepts it
``POST /_fake/reset``  back to the defaults (mode ok, no rows, no auth) and clear the calls
``GET /_fake/state``   the state summary (row count, not the rows)
``GET /_fake/calls``   ``[{"time", "method", "path", "authorization", "accept", "status"}]`` of
                       every backend call (not control calls), oldest first; time is the epoch
                       second the request arrived, status 0 for a hung request
``DELETE /_fake/calls`` clear the call list
``GET /_fake/tls_failures`` ``[{"time", "error"}]`` of failed TLS handshakes (peers that sent
                       nothing, like port probes, are not listed); cleared by reset

``FakeBackendControl(port)`` below wraps the control API for tests.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import json
import select
import socket
import ssl
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.fakes._common import add_server_args, tls_context

LIST_PATH = "/api/tokens/with-model"
LOGIN_PATH = "/api/auth/login"
MODES = ("ok", "http500", "garbage", "truncated", "code_nonzero", "data_not_list", "hang", "empty", "drip")
UNAUTHORIZED = {"code": 401, "message": "未提供认证token"}
BAD_LOGIN = {"code": 401, "message": "用户名或密码错误"}
DEFAULTS: dict[str, Any] = {
    "mode": "ok",
    "bearer": "",
    "username": "",
    "password": "",
    "jwt_uses": 0,
    "delay": 0.0,
    "hang_seconds": 60.0,
    "error_message": None,
    "gzip": False,
    "drip_interval": 0.2,
}


def _hex(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:16]


def generated_token(version: object, index: int) -> str:
    return f"sk-fakeclient-{version}-{index:06d}-{_hex('t', version, index)}"


def generated_key(version: object, model: int) -> str:
    return f"sk-fakeupstream-{version}-{model}-{_hex('k', version, model)}"


def generate_rows(count: int, version: object = 1, models: int = 5, inactive_every: int = 0) -> list[dict]:
    """Synthetic rows: ``count`` tokens spread over ``models`` upstream models."""
    rows = []
    for index in range(count):
        model = index % models + 1
        rows.append(
            {
                "token_id": index + 1,
                "token": generated_token(version, index),
                "token_status": 0 if inactive_every and index % inactive_every == inactive_every - 1 else 1,
                "token_expire_at": None if index % 3 else "2099-01-01T00:00:00Z",
                "token_usage_limit": 0,
                "ai_model_id": model,
                "ai_model_name": f"model-{version}-{model}",
                "ai_model_api_url": f"http://127.0.0.1:9/v{version}/m{model}",
                "ai_model_api_key": generated_key(version, model),
                "ai_model_status": 1,
                "created_at": "2025-01-01T00:00:00Z",
            }
        )
    return rows


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Event()  # set on every change: releases hung requests
        self.calls: list[dict[str, Any]] = []
        self.tls_failures: list[dict[str, Any]] = []
        self.jwts: dict[str, int] = {}  # JWT -> list calls it may still make (-1 = unlimited)
        self.body_cache: dict[str, bytes] = {}
        self.serial = 0  # names each rows value for the body cache
        self.reset()

    def reset(self) -> None:
        self.settings = dict(DEFAULTS)
        self.rows: list[Any] = []
        self.rows_key = "rows:0"
        self._generate_spec: dict[str, Any] = {}
        self.body_cache.clear()
        self.calls.clear()
        self.tls_failures.clear()
        self.jwts.clear()
        self._bump()

    def _bump(self) -> None:
        old, self.changed = self.changed, threading.Event()
        old.set()

    def update(self, patch: dict[str, Any]) -> None:
        for name, value in patch.items():
            if name == "rows":
                if not isinstance(value, list):
                    raise ValueError("rows must be a list")
                self.serial += 1
                self.rows, self.rows_key = value, f"rows:{self.serial}"
            elif name == "generate":
                spec = {"count": 0, "version": 1, "models": 5, "inactive_every": 0, **value}
                self.rows_key = "gen:" + json.dumps(spec, sort_keys=True)
                self.rows = []
                self._generate_spec = spec
            elif name in DEFAULTS:
                if name == "mode" and value not in MODES:
                    raise ValueError(f"unknown mode {value!r}")
                self.settings[name] = value
            else:
                raise ValueError(f"unknown state key {name!r}")
        self._bump()

    def list_body(self) -> bytes:
        body = self.body_cache.get(self.rows_key)
        if body is None:
            rows = self.rows
            if self.rows_key.startswith("gen:"):
                rows = generate_rows(**self._generate_spec)
            body = json.dumps({"code": 0, "message": "success", "data": rows}).encode()
            if len(self.body_cache) > 8:
                self.body_cache.clear()
            self.body_cache[self.rows_key] = body
        return body

    def summary(self) -> dict[str, Any]:
        count = self._generate_spec["count"] if self.rows_key.startswith("gen:") else len(self.rows)
        return {**self.settings, "rows": count, "calls": len(self.calls), "jwts": len(self.jwts)}

    def issue_jwt(self) -> str:
        header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()
        claims = json.dumps({"sub": self.settings["username"], "n": len(self.jwts) + 1, "t": time.time()})
        payload = base64.urlsafe_b64encode(claims.encode()).rstrip(b"=").decode()
        jwt = f"{header}.{payload}.{_hex('sig', payload)}"
        uses = int(self.settings["jwt_uses"] or 0)
        self.jwts[jwt] = -1 if uses == 0 else max(uses, 0)
        return jwt

    def authorize_list(self, authorization: str) -> bool:
        """Whether a list call with this Authorization header may proceed (uses up a JWT call)."""
        bearer, username = self.settings["bearer"], self.settings["username"]
        if not bearer and not username:
            return True
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credential:
            return False
        if bearer and credential == bearer:
            return True
        left = self.jwts.get(credential)
        if not username or left is None or left == 0:
            return False
        if left > 0:
            self.jwts[credential] = left - 1
        return True


class Handler(BaseHTTPRequestHandler):
    server: FakeBackendServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read the call list
        pass

    # ------------------------------------------------------------------ plumbing

    def _read_json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else None

    def _send(
        self, status: int, body: bytes, content_type: str = "application/json", encoding: str = ""
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value, ensure_ascii=False).encode())

    def _record(self, status: int) -> None:
        call = {
            "time": self.arrived,
            "method": self.command,
            "path": self.path,
            "authorization": self.headers.get("Authorization"),
            "accept": self.headers.get("Accept"),
            "status": status,
        }
        with self.server.state.lock:
            self.server.state.calls.append(call)

    # ------------------------------------------------------------------ routing

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def do_DELETE(self) -> None:
        self._route()

    def _route(self) -> None:
        self.arrived = time.time()
        path = self.path.split("?", 1)[0]
        try:
            if path.startswith("/_fake/"):
                self._control(path)
            elif path == LIST_PATH and self.command == "GET":
                self._list()
            elif path == LOGIN_PATH and self.command == "POST":
                self._login()
            else:
                self._record(404)
                self._send_json(404, {"code": 404, "message": "not found"})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _control(self, path: str) -> None:
        state = self.server.state
        if path == "/_fake/state" and self.command == "POST":
            try:
                patch = self._read_json() or {}
                with state.lock:
                    state.update(patch)
            except (ValueError, TypeError) as exc:
                self._send_json(400, {"error": str(exc)})
                return
        elif path == "/_fake/reset" and self.command == "POST":
            with state.lock:
                state.reset()
        elif path == "/_fake/calls" and self.command == "GET":
            with state.lock:
                calls = list(state.calls)
            self._send_json(200, calls)
            return
        elif path == "/_fake/tls_failures" and self.command == "GET":
            with state.lock:
                failures = list(state.tls_failures)
            self._send_json(200, failures)
            return
        elif path == "/_fake/calls" and self.command == "DELETE":
            with state.lock:
                state.calls.clear()
        elif not (path == "/_fake/state" and self.command == "GET"):
            self._send_json(404, {"error": "unknown control call"})
            return
        with state.lock:
            summary = state.summary()
        self._send_json(200, summary)

    def _pause(self) -> tuple[dict[str, Any], threading.Event]:
        state = self.server.state
        with state.lock:
            settings, changed = dict(state.settings), state.changed
        if settings["delay"]:
            changed.wait(float(settings["delay"]))
        return settings, changed

    def _login(self) -> None:
        settings, _ = self._pause()
        try:
            body = self._read_json()
        except ValueError:
            body = None
        state = self.server.state
        ok = (
            isinstance(body, dict)
            and settings["username"]
            and body.get("username") == settings["username"]
            and body.get("password") == settings["password"]
        )
        if not ok:
            self._record(401)
            self._send_json(401, BAD_LOGIN)
            return
        with state.lock:
            jwt = state.issue_jwt()
        self._record(200)
        self._send_json(200, {"code": 0, "message": "success", "data": {"token": jwt}})

    def _list(self) -> None:
        settings, changed = self._pause()
        state = self.server.state
        mode = settings["mode"]
        if mode == "hang":
            self._record(0)
            changed.wait(float(settings["hang_seconds"]))
            self.close_connection = True
            return
        with state.lock:
            allowed = state.authorize_list(self.headers.get("Authorization") or "")
        if not allowed:
            self._record(401)
            self._send_json(401, UNAUTHORIZED)
            return
        self._record(500 if mode == "http500" else 200)
        if mode == "ok":
            with state.lock:
                body = state.list_body()
            if settings["gzip"] and "gzip" in (self.headers.get("Accept-Encoding") or ""):
                self._send(200, gzip.compress(body, 1), encoding="gzip")
            else:
                self._send(200, body)
        elif mode == "http500":
            self._send(500, b"<html><body>500 Internal Server Error</body></html>", "text/html")
        elif mode == "garbage":
            self._send(200, b"<html>this is not json</html>", "text/html")
        elif mode == "truncated":
            with state.lock:
                body = state.list_body()
            self._send_truncated(body)
        elif mode == "code_nonzero":
            message = settings["error_message"]
            if message is None:
                message = f"permission denied for {self.headers.get('Authorization')}"
            self._send_json(200, {"code": 500, "message": message})
        elif mode == "data_not_list":
            self._send_json(200, {"code": 0, "message": "success", "data": {"tokens": []}})
        elif mode == "empty":
            self._send_json(200, {"code": 0, "message": "success", "data": []})
        elif mode == "drip":
            with state.lock:
                body = state.list_body()
            self._send_drip(body, float(settings["drip_interval"]), changed)

    def _send_drip(self, body: bytes, interval: float, changed: threading.Event) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for start in range(0, len(body), 16):
            self.wfile.write(body[start : start + 16])
            self.wfile.flush()
            if changed.wait(interval):
                break
        self.close_connection = True

    def _send_truncated(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True


class FakeBackendServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext | None = None) -> None:
        self.state = State()
        self.context = context
        super().__init__(address, Handler)

    def finish_request(self, request, client_address) -> None:
        """In the request's thread: the TLS handshake first (when serving HTTPS), then the handler."""
        if self.context is None:
            super().finish_request(request, client_address)
            return
        tls_sock = self._handshake(request)
        if tls_sock is None:
            return
        try:
            super().finish_request(tls_sock, client_address)
        finally:
            try:
                tls_sock.setblocking(False)
                tls_sock.unwrap()  # close_notify, without waiting for the client's
            except (OSError, ValueError):
                pass
            tls_sock.close()

    def _handshake(self, sock: socket.socket) -> ssl.SSLSocket | None:
        """The server side of the handshake; None for a port probe or a failed handshake (recorded)."""
        poller = select.poll()  # not select(): descriptors may exceed FD_SETSIZE
        poller.register(sock, select.POLLIN)
        if not poller.poll(10_000):
            return None
        try:
            if not sock.recv(1, socket.MSG_PEEK):
                return None  # a port probe: nothing to record
        except OSError:
            return None
        tls_sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        try:
            tls_sock.settimeout(10)
            tls_sock.do_handshake()
            tls_sock.settimeout(None)
            return tls_sock
        except (OSError, ValueError) as exc:
            with self.state.lock:
                self.state.tls_failures.append({"time": time.time(), "error": str(exc)})
            tls_sock.close()
            return None


class FakeBackendControl:
    """The control API from a test: ``FakeBackendControl(port).set(mode="http500")``."""

    def __init__(self, port: int, host: str = "127.0.0.1", ca_file: str | None = None) -> None:
        """``ca_file``: the backend serves HTTPS with a certificate signed by this CA."""
        self.base = f"{'https' if ca_file else 'http'}://{host}:{port}"
        self._context = ssl.create_default_context(cafile=ca_file) if ca_file else None

    @property
    def url(self) -> str:
        """The SERVER_API_URL to give the syncer."""
        return self.base

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=30, context=self._context) as response:
            return json.loads(response.read())

    def set(self, **state: Any) -> dict[str, Any]:
        return self._call("POST", "/_fake/state", state)

    def reset(self) -> dict[str, Any]:
        return self._call("POST", "/_fake/reset", {})

    def state(self) -> dict[str, Any]:
        return self._call("GET", "/_fake/state")

    def calls(self, path: str | None = LIST_PATH) -> list[dict[str, Any]]:
        """Calls received, by default only the token-list calls (path=None: all of them)."""
        calls = self._call("GET", "/_fake/calls")
        return [call for call in calls if path is None or call["path"].split("?")[0] == path]

    def clear_calls(self) -> None:
        self._call("DELETE", "/_fake/calls")

    def tls_failures(self) -> list[dict[str, Any]]:
        return self._call("GET", "/_fake/tls_failures")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fake backend admin API for tests")
    add_server_args(parser)
    args = parser.parse_args(argv)
    server = FakeBackendServer((args.host, args.port), tls_context(parser, args))
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
