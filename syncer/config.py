"""SyncerConfig: every setting of the syncer, read once from the environment at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from common.envparse import DEFAULT_TOKEN_FILE, ConfigError, Env, metrics_dir

_LOG_LEVELS = {"debug": "debug", "info": "info", "warn": "warn", "warning": "warn", "error": "error"}


@dataclass(frozen=True, slots=True)
class SyncerConfig:
    enable_token_routing: bool
    server_api_url: str
    server_api_token: str
    server_api_username: str
    server_api_password: str
    sync_interval_minutes: float
    sync_timeout: float
    sync_retry_base: float
    sync_allow_empty: bool
    token_file: str
    log_level: str
    metrics_dir: str = ""
    server_api_ca_bundle: str = ""  # "" = certifi's bundle

    @property
    def interval_seconds(self) -> float:
        return self.sync_interval_minutes * 60.0

    @property
    def login_mode(self) -> bool:
        return bool(self.server_api_username)

    def secrets(self) -> tuple[str, ...]:
        """Every configured credential, for masking error text before it is logged."""
        url_password = urlsplit(self.server_api_url).password or ""
        found = (self.server_api_token, self.server_api_password, url_password)
        return tuple(secret for secret in found if secret)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SyncerConfig:
        environ = os.environ if environ is None else environ
        env = Env(environ)
        username = env.string("SERVER_API_USERNAME")
        # A password is taken verbatim: stripping it would silently change the credential.
        password = environ.get("SERVER_API_PASSWORD") or ""
        if username and not password:
            raise ConfigError("SERVER_API_USERNAME", username, "set without SERVER_API_PASSWORD")
        if password and not username:
            # The value is a secret, so the message does not repeat it.
            raise ConfigError("SERVER_API_PASSWORD", "***", "set without SERVER_API_USERNAME")
        token_file = env.string("TOKEN_FILE", DEFAULT_TOKEN_FILE)
        return cls(
            enable_token_routing=env.boolean("ENABLE_TOKEN_ROUTING", True),
            server_api_url=env.url("SERVER_API_URL", "http://localhost:6808"),
            server_api_token=env.string("SERVER_API_TOKEN"),
            server_api_username=username,
            server_api_password=password,
            sync_interval_minutes=env.number("SYNC_INTERVAL", 10, allow_zero=False),
            sync_timeout=env.number("SYNC_TIMEOUT", 30, allow_zero=False),
            sync_retry_base=env.number("SYNC_RETRY_BASE", 5, allow_zero=False),
            sync_allow_empty=env.boolean("SYNC_ALLOW_EMPTY", False),
            token_file=os.path.abspath(token_file),
            log_level=env.choice("LOG_LEVEL", "info", _LOG_LEVELS),
            metrics_dir=metrics_dir(env, os.path.abspath(token_file)),
            server_api_ca_bundle=env.path("SERVER_API_CA_BUNDLE"),
        )
