"""Flask routes: the catch-all proxy view and the /_proxy/* operational endpoints."""

from __future__ import annotations

import json
import logging
import time

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import BaseConverter

from proxyapp.errors import error_response
from proxyapp.forward import Forwarder
from proxyapp.head import head_of
from proxyapp.logs import AccessRecord, write_access
from proxyapp.metrics import CONTENT_TYPE, WorkerMetrics
from proxyapp.table_store import TableStore

log = logging.getLogger("proxy.app")

PROXIED_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


class _AnyPath(BaseConverter):
    """Matches every path, '//x' and trailing slashes included (werkzeug's 'path' does not)."""

    regex = ".*"
    part_isolating = False


def _json(payload: bytes, status: int, request_id: str, extra: dict | None = None) -> Response:
    headers = {"X-Request-ID": request_id, "Cache-Control": "no-store"}
    if extra:
        headers.update(extra)
    return Response(payload, status=status, mimetype="application/json", headers=headers)


def register(
    app: Flask,
    forwarder: Forwarder,
    store: TableStore | None,
    sync_interval_minutes: float,
    metrics: WorkerMetrics,
) -> None:
    app.url_map.converters["anypath"] = _AnyPath
    app.url_map.strict_slashes = False
    app.url_map.merge_slashes = False

    def proxy(path: str):
        return forwarder.handle(request.environ)

    def healthz():
        return _json(b'{"status": "ok"}', 200, _request_id())

    def readyz():
        if store is None:
            return _json(json.dumps({"table_loaded": True, "mode": "legacy"}).encode(), 200, _request_id())
        table = store.current
        if table is None:
            body = {"table_loaded": False, "tokens": 0, "path": store.path}
            return _json(json.dumps(body).encode(), 503, _request_id(), {"Retry-After": "5"})
        now = time.time()
        age = round(now - table.generated_epoch, 1) if table.generated_epoch else None
        body = {
            "table_loaded": True,
            "tokens": len(table.routes),
            "generated_at": table.generated_at,
            "age_s": age,
            "stale": age is not None and age > 3 * sync_interval_minutes * 60,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(table.loaded_at)),
            "reload_failures": store.reload_failures,
            "in_flight": forwarder.in_flight,
        }
        return _json(json.dumps(body).encode(), 200, _request_id())

    def prometheus():
        return Response(metrics.render(), status=200, content_type=CONTENT_TYPE)

    app.add_url_rule("/_proxy/metrics", "metrics", prometheus, methods=["GET"])
    app.add_url_rule("/_proxy/healthz", "healthz", healthz, methods=["GET"])
    app.add_url_rule("/_proxy/readyz", "readyz", readyz, methods=["GET"])
    app.add_url_rule(
        "/",
        "proxy_root",
        proxy,
        defaults={"path": ""},
        methods=PROXIED_METHODS,
        provide_automatic_options=False,
    )
    app.add_url_rule(
        "/<anypath:path>", "proxy", proxy, methods=PROXIED_METHODS, provide_automatic_options=False
    )
    # An Upgrade: websocket request is forwarded as plain HTTP (Upgrade is hop-by-hop, never
    # honoured); werkzeug would answer it 400 unless a websocket rule matches too.
    for rule, endpoint, defaults in (
        ("/", "proxy_root_ws", {"path": ""}),
        ("/<anypath:path>", "proxy_ws", None),
    ):
        app.add_url_rule(rule, endpoint, proxy, defaults=defaults, methods=["GET"], websocket=True)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return _logged_error(exc.code or 500, _code_for(exc), exc.description or exc.name)

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception):
        request_id = _request_id()
        log.exception("unhandled error", extra={"event": "unhandled_error", "request_id": request_id})
        return _logged_error(500, "internal_error", "Internal proxy error.", request_id)


def _code_for(exc: HTTPException) -> str:
    return {405: "method_not_allowed", 404: "not_found"}.get(exc.code or 0, "http_error")


def _request_id() -> str:
    return head_of(request.environ).request_id


def _logged_error(status: int, code: str, message: str, request_id: str | None = None) -> Response:
    head = head_of(request.environ)
    request_id = request_id or head.request_id
    record = AccessRecord(
        request_id,
        head.method,
        head.decoded_path,
        head.query,
        head.client_ip,
        None,
        status=status,
        end_reason="rejected" if status < 500 else "error",
        error=message,
    )
    write_access(record)
    status_line, headers, body = error_response(
        status, code, message, request_id, (("Cache-Control", "no-store"),)
    )
    return Response(body, status=status_line, headers=headers)
