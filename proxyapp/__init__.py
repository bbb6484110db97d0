"""The proxy worker: a Flask app served by gevent's WSGIServer (see wsgi.py)."""

from __future__ import annotations

from flask import Flask

from proxyapp.config import ProxyConfig
from proxyapp.egress import EgressProxy
from proxyapp.forward import Forwarder
from proxyapp.limits import Limiter
from proxyapp.metrics import WorkerMetrics
from proxyapp.routing import make_router
from proxyapp.table_store import LimitSettings, TableStore
from proxyapp.upstream import UpstreamClient, make_tls_context
from proxyapp.views import OPERATIONAL_ENDPOINTS, PUBLIC_WITH_ADMIN, ProxyFirst, register


def create_app(
    config: ProxyConfig, *, table_store: TableStore | None = None, upstream: UpstreamClient | None = None
) -> Flask:
    """Wire the app: routing (token table or fixed target), the upstream session, the views.

    Loading the table and watching the file are the caller's job (wsgi.py), so tests and other
    WSGI servers can wire their own store.
    """
    if config.enable_token_routing and table_store is None:
        table_store = TableStore(config.token_file, config.token_file_poll, LimitSettings.from_config(config))
    if not config.enable_token_routing:
        table_store = None
    upstream = upstream or make_upstream_client(config)
    limiter = Limiter.from_config(config)  # disabled (nothing limited) without LIMITS_REDIS_URL
    metrics = WorkerMetrics(
        config.metrics_dir,
        store=table_store,
        limiter=limiter,
        sync_interval_seconds=config.sync_interval_minutes * 60,
        configured_workers=config.configured_workers,
    )
    forwarder = Forwarder(config, make_router(config, table_store), upstream, metrics, limiter)
    metrics.in_flight = lambda: forwarder.in_flight
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = None
    app.extensions["proxy.table_store"] = table_store
    app.extensions["proxy.forwarder"] = forwarder
    app.extensions["proxy.metrics"] = metrics
    app.extensions["proxy.limiter"] = limiter
    operational = PUBLIC_WITH_ADMIN if config.admin_enabled else OPERATIONAL_ENDPOINTS
    register(app, forwarder, table_store, config.sync_interval_minutes, metrics, operational=operational)
    app.wsgi_app = ProxyFirst(forwarder, app.wsgi_app)
    return app


def make_upstream_client(config: ProxyConfig) -> UpstreamClient:
    """The worker's upstream side: the TLS context (trust store loaded once) and the egress proxy.
    A CA bundle that cannot be loaded raises ConfigError naming UPSTREAM_CA_BUNDLE."""
    egress = EgressProxy(config.upstream_proxy, config.upstream_no_proxy) if config.upstream_proxy else None
    return UpstreamClient(
        config.upstream_pool_maxsize,
        tls_context=make_tls_context(config.upstream_ca_bundle),
        egress=egress,
    )
