"""Flask routes: the catch-all proxy view and the /_proxy/* operational endpoints."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.routing import BaseConverter

from proxyapp.errors import error_response
from proxyapp.forward import Forwarder
from proxyapp.head import head_of
from proxyapp.logs import AccessRecord, write_access
from proxyapp.metrics import CONTENT_TYPE, WorkerMetrics
from proxyapp.table_store import TableStore

log = logging.getLogger("proxy.app")

PROXIED_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
_PROXIED = frozenset(PROXIED_METHODS)
_OPERATIONAL = "/_proxy/"
# Served by the public app unless ADMIN_LISTEN_ADDR moves metrics and readyz off it (admin.py).
OPERATIONAL_ENDPOINTS = ("metrics", "healthz", "readyz")
PUBLIC_WITH_ADMIN = ("healthz",)  # load balancers probe the public port; it reveals nothing
Views = dict[str, Callable[[], Response]]


class ProxyFirst:
    """In front of Flask (``app.wsgi_app``, Flask's documented place for a middleware): a proxied
    request goes straight to the forwarder, without the request context, URL matching and
    werkzeug Request it would never use (~80 µs per request). ``/_proxy/*`` and methods that are
    not proxied still go through Flask, which answers them (health, metrics, 404/405); so does a
    request whose forwarding failed unexpectedly (a 500 in the same JSON shape, logged)."""

    __slots__ = ("flask_app", "forwarder")

    def __init__(self, forwarder: Forwarder, flask_app) -> None:
        self.forwarder = forwarder
        self.flask_app = flask_app

    def __call__(self, environ: dict, start_response):
        if environ["REQUEST_METHOD"] not in _PROXIED or environ.get("PATH_INFO", "").startswith(_OPERATIONAL):
            return self.flask_app(environ, start_response)
        try:
            response = self.forwarder.handle(environ)
        except Exception:
            head = head_of(environ)
            log.exception(
                "unhandled error", extra={"event": "unhandled_error", "request_id": head.request_id}
            )
            response = _logged_error(environ, 500, "internal_error", "Internal proxy error.")
        return response(environ, start_response)


class _AnyPath(BaseConverter):
    """Matches every path, '//x' and trailing slashes included (werkzeug's 'path' does not)."""

    regex = ".*"
    part_isolating = False


def _json(payload: bytes, status: int, request_id: str, extra: dict | None = None) -> Response:
    headers = {"X-Request-ID": request_id, "Cache-Control": "no-store"}
    if extra:
        headers.update(extra)
    return Response(payload, status=status, mimetype="application/json", headers=headers)


def operational_views(
    forwarder: Forwarder, store: TableStore | None, sync_interval_minutes: float, metrics: WorkerMetrics
) -> Views:
    """The ``/_proxy/<name>`` views by name, for the public app and the admin one (admin.py)."""

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

    return {"metrics": prometheus, "healthz": healthz, "readyz": readyz}


def register_operational(app: Flask, views: Views, names: tuple[str, ...]) -> None:
    """``GET /_proxy/<name>`` for each of ``names``; any other ``/_proxy/*`` path is a 404, never
    proxied (the prefix is ours: an endpoint moved to the admin address must not reach an upstream)."""
    app.url_map.converters["anypath"] = _AnyPath
    for name in names:
        app.add_url_rule(f"{_OPERATIONAL}{name}", name, views[name], methods=["GET"])

    def reserved(rest: str):
        raise NotFound()

    app.add_url_rule(
        _OPERATIONAL + "<anypath:rest>",
        "operational_unknown",
        reserved,
        methods=PROXIED_METHODS,
        provide_automatic_options=False,
    )


def register_errors(app: Flask) -> None:
    """Every error of the app as the one JSON error shape, with an access line."""

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return _logged_error(request.environ, exc.code or 500, _code_for(exc), exc.description or exc.name)

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception):
        request_id = _request_id()
        log.exception("unhandled error", extra={"event": "unhandled_error", "request_id": request_id})
        return _logged_error(request.environ, 500, "internal_error", "Internal proxy error.", request_id)


def register(
    app: Flask,
    forwarder: Forwarder,
    store: TableStore | None,
    sync_interval_minutes: float,
    metrics: WorkerMetrics,
    *,
    operational: tuple[str, ...] = OPERATIONAL_ENDPOINTS,
) -> None:
    """The public app's routes: the ``operational`` endpoints (all of them unless an admin address
    serves metrics and readyz) and the catch-all proxy view."""
    app.url_map.converters["anypath"] = _AnyPath
    app.url_map.strict_slashes = False
    app.url_map.merge_slashes = False

    def proxy(path: str):
        return forwarder.handle(request.environ)

    views = operational_views(forwarder, store, sync_interval_minutes, metrics)
    register_operational(app, views, operational)
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

    register_errors(app)


def _code_for(exc: HTTPException) -> str:
    return {405: "method_not_allowed", 404: "not_found"}.get(exc.code or 0, "http_error")


def _request_id() -> str:
    return head_of(request.environ).request_id


def _logged_error(
    environ: dict, status: int, code: str, message: str, request_id: str | None = None
) -> Response:
    head = head_of(environ)
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
