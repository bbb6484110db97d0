"""The admin address (ADMIN_LISTEN_ADDR): ``/_proxy/metrics``, ``readyz`` and ``healthz`` off the
public port.

Every worker listens there too (SO_REUSEPORT, like the public port), so a scrape lands on any
worker; the metrics are the deployment's whichever answers (metrics.py). The public app then
answers those two paths 404 (views.PUBLIC_WITH_ADMIN): the per-model counts and the table's
state are for the operator's Prometheus, not for whoever reaches the public port.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket

from flask import Flask, Response

from proxyapp.config import ProxyConfig
from proxyapp.logs import write_access
from proxyapp.server import ProxyServer, bind_listener
from proxyapp.views import OPERATIONAL_ENDPOINTS, operational_views, register_errors, register_operational

log = logging.getLogger("proxy")

# A handful of scrapers and probes, not clients: a small pool keeps a flood there from taking the
# worker's file descriptors.
ADMIN_MAX_CONNECTIONS = 64


def create_admin_app(config: ProxyConfig, app: Flask) -> Flask:
    """A Flask app with only the operational endpoints, sharing the worker's state with ``app``."""
    admin = Flask(__name__)
    views = operational_views(
        app.extensions["proxy.forwarder"],
        app.extensions["proxy.table_store"],
        config.sync_interval_minutes,
        app.extensions["proxy.metrics"],
    )
    register_operational(admin, views, OPERATIONAL_ENDPOINTS)
    pid = str(os.getpid())

    @admin.after_request
    def which_worker(response: Response) -> Response:
        # Which worker answered (scrapes are spread over them): for an operator chasing one.
        response.headers["X-Proxy-Worker"] = pid
        return response

    register_errors(admin)
    return admin


def bind_admin_listener(config: ProxyConfig) -> socket.socket | None:
    """The admin address's listening socket (SO_REUSEPORT), None when ADMIN_LISTEN_ADDR is unset.
    OSError when it cannot be bound: a worker without it would be invisible to the scraper."""
    if not config.admin_enabled:
        return None
    return bind_listener(config.admin_listen_host, config.admin_listen_port, backlog=128)


def start_admin_server(listener: socket.socket | None, config: ProxyConfig, app: Flask) -> ProxyServer | None:
    """Serve the admin app on ``listener`` (nothing without one). It serves until the worker exits,
    through the drain too: a scrape meanwhile still reads the deployment's figures."""
    if listener is None:
        return None
    server_config = dataclasses.replace(config, max_client_connections=ADMIN_MAX_CONNECTIONS)
    server = ProxyServer(
        listener, create_admin_app(config, app), config=server_config, on_rejected_request=write_access
    )
    server.start()
    address = f"{config.admin_listen_host}:{config.admin_listen_port}"
    log.info("admin listening", extra={"event": "admin_listening", "address": address})
    return server
