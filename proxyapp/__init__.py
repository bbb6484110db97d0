"""The proxy worker: a Flask app served by gevent's WSGIServer (see wsgi.py)."""

from __future__ import annotations

from flask import Flask

from proxyapp.config import ProxyConfig
from proxyapp.forward import Forwarder
from proxyapp.metrics import WorkerMetrics
from proxyapp.routing import make_router
from proxyapp.table_store import TableStore
from proxyapp.upstream import make_session
from proxyapp.views import register


def create_app(config: ProxyConfig, *, table_store: TableStore | None = None, session=None) -> Flask:
    """Wire the app: routing (token table or fixed target), the upstream session, the views.

    Loading the table and watching the file are the caller's job (wsgi.py), so tests and other
    WSGI servers can wire their own store.
    """
    if config.enable_token_routing and table_store is None:
        table_store = TableStore(config.token_file, config.token_file_poll)
    if not config.enable_token_routing:
        table_store = None
    session = session or make_session(config.upstream_pool_maxsize)
    metrics = WorkerMetrics(config.metrics_dir, store=table_store)
    forwarder = Forwarder(config, make_router(config, table_store), session, metrics)
    metrics.in_flight = lambda: forwarder.in_flight
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = None
    app.extensions["proxy.table_store"] = table_store
    app.extensions["proxy.forwarder"] = forwarder
    app.extensions["proxy.metrics"] = metrics
    register(app, forwarder, table_store, config.sync_interval_minutes, metrics)
    return app
