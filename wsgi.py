"""Entry point of one proxy worker: ``python wsgi.py``.

Monkey patching comes first of all: requests imported before it breaks SSL under gevent.
``application`` is also exposed for other WSGI servers (built on first access).
"""

from gevent import monkey

monkey.patch_all()

import dataclasses  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402

from common.envparse import ConfigError, without_password  # noqa: E402
from common.jsonlog import setup as setup_logging  # noqa: E402
from proxyapp import create_app  # noqa: E402
from proxyapp.admin import bind_admin_listener, start_admin_server  # noqa: E402
from proxyapp.config import ProxyConfig  # noqa: E402
from proxyapp.logs import write_access  # noqa: E402
from proxyapp.logwriter import BufferedHandler, LogWriter  # noqa: E402
from proxyapp.logwriter import install as install_log_writer  # noqa: E402
from proxyapp.resolver import CachingResolver  # noqa: E402
from proxyapp.server import ProxyServer, bind_listener  # noqa: E402

log = logging.getLogger("proxy")


def build(config: ProxyConfig | None = None, log_writer: LogWriter | None = None):
    """Config, logging, the app, and the first table load; the file watcher is started.

    ``log_writer``: the worker's buffered log writer (``main``); without it (another WSGI server
    imports ``application``) lines are written straight to stdout."""
    if config is None:
        config = ProxyConfig.from_env()
    handler = BufferedHandler(log_writer) if log_writer is not None else None
    setup_logging(config.log_level, "proxy", handler=handler)
    gevent.get_hub().resolver = CachingResolver(config.upstream_dns_cache_seconds)
    app = create_app(config)
    limiter = app.extensions["proxy.limiter"]
    # A few seconds for a Redis that supervisord starts beside us; still unreachable: serve
    # without limits (one error line) and enforce as soon as it answers, never refuse to start.
    limiter.check_reachable(3.0, fail=False)
    limiter.start()
    store = app.extensions["proxy.table_store"]
    if store is not None:
        store.check()
        if store.current is None:
            log.warning(
                "no token table loaded yet: answering 503 until a good file appears",
                extra={"event": "table_not_loaded", "path": store.path},
            )
        store.start_watching()
    metrics = app.extensions["proxy.metrics"]
    if log_writer is not None:
        metrics.count_log_drops(log_writer)
    metrics.start_refresher()
    return config, app


def _connection_limit(wanted: int) -> int:
    """Raise the open-file limit as far as allowed; keep room for one upstream socket per client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1048576 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return max(16, min(wanted, (soft - 64) // 2))


# The collector's thresholds once the worker has started (CPython's default is 700, 10, 10).
GC_THRESHOLDS = (10_000, 10, 10)


def settle_heap() -> int:
    """Keep the cyclic garbage collector's pauses out of the event stream.

    With the defaults, at 1,000 concurrent streams the collector ran ~35 times a second, and its
    full collections walked every object of the worker (start-up's included) for 50-60 ms, each
    an event delay for every stream in flight (gc.callbacks timing each collection). What
    start-up built (modules, the app, the first table) lives as long as the worker: frozen, no
    collection walks it again; a table replaced later is still freed, by reference counting.
    Not frozen again after a reload: the objects of requests in flight would be frozen with the
    new table, and a reference cycle among them would never be collected. Young collections
    every 10,000 allocations instead of 700 take ~4 ms at most, and full ones are rare."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    return gc.get_freeze_count()


def main() -> int:
    try:
        config = ProxyConfig.from_env()
        # From here every line (stderr's too) goes through the buffer; whatever way serve() ends,
        # what it logged is written before the process exits (a clean stop has flushed already).
        log_writer = install_log_writer(config.log_buffer_bytes)
        try:
            return serve(config, log_writer)
        finally:
            log_writer.flush(timeout=5.0)
    except ConfigError as exc:  # a setting read at start-up (the CA bundle, Redis...) included
        print(f"proxy: configuration error: {exc}", file=sys.stderr)
        return 2


def serve(config: ProxyConfig, log_writer: LogWriter) -> int:
    config, app = build(config, log_writer)
    try:
        listener = bind_listener(config.listen_host, config.listen_port)
        admin_listener = bind_admin_listener(config)  # ADMIN_LISTEN_ADDR, or None
    except OSError as exc:
        log.error("cannot listen", extra={"event": "listen_failed", "error": str(exc)})
        return 1
    max_connections = _connection_limit(config.max_client_connections)
    server_config = dataclasses.replace(config, max_client_connections=max_connections)
    server = ProxyServer(listener, app, config=server_config, on_rejected_request=write_access)
    frozen = settle_heap()
    stop = Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    server.start()
    start_admin_server(admin_listener, config, app)
    log.info(
        "listening",
        extra={
            "event": "listening",
            "address": f"{config.listen_host}:{listener.getsockname()[1]}",
            "token_routing": config.enable_token_routing,
            "max_connections": max_connections,
            "gc_frozen_objects": frozen,
            "gc_thresholds": gc.get_threshold(),
            "upstream_ca_bundle": config.upstream_ca_bundle or "certifi",
            "upstream_proxy": without_password(config.upstream_proxy) or None,
            "upstream_no_proxy": ",".join(config.upstream_no_proxy) or None,
        },
    )
    stop.wait()
    deadline = time.monotonic() + config.graceful_timeout
    in_flight = len(server.connection_pool)
    log.info(
        "draining",
        extra={"event": "draining", "connections": in_flight, "timeout_s": config.graceful_timeout},
    )
    server.drain()
    drained = server.wait_drained(config.graceful_timeout)
    app.extensions["proxy.limiter"].close(timeout=1.0)  # the slots still held go back at once
    try:  # its counters stay in the deployment's sums; its live gauges (workers, in flight) go
        app.extensions["proxy.metrics"].close()
    except OSError:
        pass
    log.info("stopped", extra={"event": "stopped", "drained": drained})
    # The lines still buffered get what is left of the grace (supervisord waits 10 s beyond it).
    log_writer.flush(max(1.0, deadline - time.monotonic()))
    return 0


_application = None


def __getattr__(name: str):
    global _application
    if name == "application":
        if _application is None:
            _application = build()[1]
        return _application
    raise AttributeError(name)


if __name__ == "__main__":
    sys.exit(main())
