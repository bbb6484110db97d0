"""The worker's configuration: one frozen dataclass read from the environment at start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from common.envparse import DEFAULT_TOKEN_FILE, ConfigError, Env, metrics_dir
from common.jsonlog import LEVELS
from common.tokentable import MAX_LIMIT

MIB = 1024 * 1024
MIN_LOG_BUFFER_BYTES = 64 * 1024  # a pipe's worth; below it a burst of access lines is dropped


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    enable_token_routing: bool = True
    listen_host: str = "0.0.0.0"
    listen_port: int = 6800
    token_file: str = DEFAULT_TOKEN_FILE
    token_file_poll: float = 1.0
    sync_interval_minutes: float = 10.0
    target_url: str = "https://open.bigmodel.cn"
    override_auth_token: str = ""
    required_auth_tokens: tuple[str, ...] = ()
    log_level: str = "info"
    log_body_max_bytes: int = 4096
    log_buffer_bytes: int = 64 * MIB  # 30 s of a stalled log reader at 1,000 lines/s of 2 KB
    upstream_connect_timeout: float = 10.0
    upstream_read_timeout: float = 600.0
    upstream_total_timeout: float = 0.0
    upstream_pool_maxsize: int = 1000
    upstream_dns_cache_seconds: float = 30.0
    upstream_ca_bundle: str = ""  # "" = certifi's bundle
    upstream_proxy: str = ""
    upstream_no_proxy: tuple[str, ...] = ()
    graceful_timeout: float = 30.0
    client_idle_timeout: float = 75.0
    client_header_timeout: float = 60.0
    client_body_timeout: float = 60.0
    client_send_timeout: float = 60.0
    max_body_bytes: int = 32 * MIB
    max_client_connections: int = 10000
    sse_keepalive_seconds: float = 0.0
    websocket_idle_timeout: float = 600.0  # a WebSocket session with no byte either way is cut
    stream_usage: str = "passthrough"  # or "request": streams asked for usage (proxyapp.stream_usage)
    metrics_dir: str = ""
    token_max_concurrency: int = 0  # default per-token limits; 0 = unlimited
    token_rpm: int = 0
    token_tpm: int = 0
    limits_redis_url: str = ""  # "" = no Redis: limits found in the table are not enforced
    limits_lease_seconds: float = 30.0
    admin_listen_host: str = ""  # "" = no admin address: /_proxy/metrics and readyz on LISTEN_ADDR
    admin_listen_port: int = 0
    configured_workers: int = 0  # PROXY_WORKERS as the launcher set it; 0 = not known

    @property
    def limits_by_env(self) -> bool:
        """A default limit is configured (so every worker needs Redis to start)."""
        return bool(self.token_max_concurrency or self.token_rpm or self.token_tpm)

    @property
    def admin_enabled(self) -> bool:
        return bool(self.admin_listen_host)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ProxyConfig:
        """Build the config; a bad value raises ConfigError naming the variable and the value."""
        env = Env(environ)
        host, port = env.listen_addr("LISTEN_ADDR", ":6800")
        token_file = os.path.abspath(env.string("TOKEN_FILE", DEFAULT_TOKEN_FILE))
        token_max_concurrency = env.integer("TOKEN_MAX_CONCURRENCY", 0, maximum=MAX_LIMIT)
        token_rpm = env.integer("TOKEN_RPM", 0, maximum=MAX_LIMIT)
        token_tpm = env.integer("TOKEN_TPM", 0, maximum=MAX_LIMIT)
        limits_redis_url = env.redis_url("LIMITS_REDIS_URL")
        for name, value in (
            ("TOKEN_MAX_CONCURRENCY", token_max_concurrency),
            ("TOKEN_RPM", token_rpm),
            ("TOKEN_TPM", token_tpm),
        ):
            if value and not limits_redis_url:
                raise ConfigError(
                    name,
                    str(value),
                    "a per-token limit needs LIMITS_REDIS_URL (the counts are shared by every worker "
                    "through Redis; scripts/run starts a local redis-server and sets it)",
                )
        admin_host, admin_port = _admin_addr(env, port)
        return cls(
            enable_token_routing=env.boolean("ENABLE_TOKEN_ROUTING", True),
            listen_host=host,
            listen_port=port,
            token_file=token_file,
            token_file_poll=env.number("TOKEN_FILE_POLL", 1.0, minimum=0.01),
            sync_interval_minutes=env.number("SYNC_INTERVAL", 10.0, allow_zero=False),
            target_url=env.url("TARGET_URL", "https://open.bigmodel.cn"),
            override_auth_token=env.string("OVERRIDE_AUTH_TOKEN"),
            required_auth_tokens=env.csv("REQUIRED_AUTH_TOKENS"),
            log_level=env.choice("LOG_LEVEL", "info", {k: k for k in LEVELS}),
            log_body_max_bytes=env.integer("LOG_BODY_MAX_BYTES", 4096),
            log_buffer_bytes=env.integer("LOG_BUFFER_BYTES", 64 * MIB, minimum=MIN_LOG_BUFFER_BYTES),
            upstream_connect_timeout=env.number("UPSTREAM_CONNECT_TIMEOUT", 10.0, allow_zero=False),
            upstream_read_timeout=env.number("UPSTREAM_READ_TIMEOUT", 600.0, allow_zero=False),
            upstream_total_timeout=env.number("UPSTREAM_TOTAL_TIMEOUT", 0.0),
            upstream_pool_maxsize=env.integer("UPSTREAM_POOL_MAXSIZE", 1000, minimum=1),
            upstream_dns_cache_seconds=env.number("UPSTREAM_DNS_CACHE_SECONDS", 30.0),
            upstream_ca_bundle=env.path("UPSTREAM_CA_BUNDLE"),
            upstream_proxy=env.proxy_url("UPSTREAM_PROXY"),
            upstream_no_proxy=env.csv("UPSTREAM_NO_PROXY"),
            graceful_timeout=env.number("GRACEFUL_TIMEOUT", 30.0),
            client_idle_timeout=env.number("CLIENT_IDLE_TIMEOUT", 75.0, allow_zero=False),
            client_header_timeout=env.number("CLIENT_HEADER_TIMEOUT", 60.0, allow_zero=False),
            client_body_timeout=env.number("CLIENT_BODY_TIMEOUT", 60.0, allow_zero=False),
            client_send_timeout=env.number("CLIENT_SEND_TIMEOUT", 60.0, allow_zero=False),
            max_body_bytes=env.integer("MAX_BODY_BYTES", 32 * MIB, minimum=1),
            max_client_connections=env.integer("MAX_CLIENT_CONNECTIONS", 10000, minimum=1),
            sse_keepalive_seconds=env.number("SSE_KEEPALIVE_SECONDS", 0.0),
            websocket_idle_timeout=env.number("WEBSOCKET_IDLE_TIMEOUT", 600.0, allow_zero=False),
            stream_usage=env.choice(
                "STREAM_USAGE", "passthrough", {"passthrough": "passthrough", "request": "request"}
            ),
            metrics_dir=metrics_dir(env, token_file),
            token_max_concurrency=token_max_concurrency,
            token_rpm=token_rpm,
            token_tpm=token_tpm,
            limits_redis_url=limits_redis_url,
            limits_lease_seconds=env.number("LIMITS_LEASE_SECONDS", 30.0, minimum=1.0),
            admin_listen_host=admin_host,
            admin_listen_port=admin_port,
            configured_workers=env.integer("PROXY_WORKERS", 0),
        )


def _admin_addr(env: Env, listen_port: int) -> tuple[str, int]:
    """ADMIN_LISTEN_ADDR: ("", 0) when unset. Its port must be fixed and differ from LISTEN_ADDR's:
    the workers share it through SO_REUSEPORT, and on the public port the kernel would hand the
    admin socket a share of the client connections."""
    if not env.string("ADMIN_LISTEN_ADDR"):
        return "", 0
    host, port = env.listen_addr("ADMIN_LISTEN_ADDR", "")
    value = env.string("ADMIN_LISTEN_ADDR")
    if port == 0:
        raise ConfigError("ADMIN_LISTEN_ADDR", value, "needs a fixed port (every worker listens on it)")
    if port == listen_port:
        raise ConfigError("ADMIN_LISTEN_ADDR", value, "must use another port than LISTEN_ADDR")
    return host, port


__all__ = ["ConfigError", "ProxyConfig"]
