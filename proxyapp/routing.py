"""Request credentials -> a Route or a Rejection, behind one interface for both modes.

Token routing looks the client token up in the current table; legacy mode sends everything to
TARGET_URL, with an optional whitelist and an optional credential override.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from proxyapp.config import ProxyConfig
from proxyapp.table_store import Route, TableStore, Upstream


@dataclass(frozen=True, slots=True)
class Credential:
    """The client's credential: which header carried it, and the token itself."""

    header: str  # "authorization" or "x-api-key"
    token: str


@dataclass(frozen=True, slots=True)
class Rejection:
    status: int
    code: str
    message: str
    retry_after: int | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """Where to forward, and the credential header (name, value) to send upstream.

    ``auth_header`` None means the client's own credential goes through (legacy, no override)."""

    route: Route
    auth_header: tuple[str, str] | None
    secrets: tuple[str, ...]  # values to mask in this request's logs


MISSING_TOKEN = Rejection(401, "missing_token", "No API token: send Authorization: Bearer <token>.")
UNKNOWN_TOKEN = Rejection(401, "invalid_token", "Invalid API token.")
EXPIRED_TOKEN = Rejection(401, "token_expired", "API token has expired.")
NO_TABLE = Rejection(503, "table_not_loaded", "Token table not loaded yet; retry shortly.", retry_after=5)


def extract_credential(authorization: str | None, x_api_key: str | None) -> Credential | None:
    """Bearer <t> (scheme case-insensitive), a bare Authorization: <t>, or x-api-key: <t>."""
    if authorization:
        scheme, _, rest = authorization.partition(" ")
        if rest and scheme.lower() == "bearer":
            token = rest.strip()
        elif not rest:
            token = scheme
        else:
            token = ""
        if token:
            return Credential("authorization", token)
    if x_api_key:
        return Credential("x-api-key", x_api_key.strip())
    return None


def upstream_auth_header(credential: Credential | None, upstream: Upstream) -> tuple[str, str]:
    """The upstream key in the header style the client used."""
    if credential is not None and credential.header == "x-api-key":
        return ("x-api-key", upstream.api_key)
    return ("Authorization", upstream.bearer)


class Router(Protocol):
    def resolve(self, credential: Credential | None) -> Decision | Rejection: ...


class TokenTableRouter:
    """Looks the token up in the current table: O(1) whatever its size."""

    def __init__(self, store: TableStore) -> None:
        self.store = store

    def resolve(self, credential: Credential | None) -> Decision | Rejection:
        table = self.store.current
        if table is None:
            return NO_TABLE
        if credential is None:
            return MISSING_TOKEN
        route = table.routes.get(credential.token)
        if route is None:
            return UNKNOWN_TOKEN
        if route.expires_at is not None and route.expires_at <= time.time():
            return EXPIRED_TOKEN
        upstream = route.upstream
        return Decision(
            route, upstream_auth_header(credential, upstream), (credential.token, upstream.api_key)
        )


class FixedTargetRouter:
    """Legacy mode: one TARGET_URL, optional REQUIRED_AUTH_TOKENS whitelist and OVERRIDE_AUTH_TOKEN."""

    def __init__(self, config: ProxyConfig) -> None:
        override = config.override_auth_token
        if override and " " not in override:
            override = "Bearer " + override  # accept the bare token as well as the full header value
        self.override = override
        self.required = frozenset(config.required_auth_tokens)
        self.route = Route(None, None, Upstream.build(config.target_url, override or "-", ""))

    def resolve(self, credential: Credential | None) -> Decision | Rejection:
        if self.required:
            if credential is None:
                return MISSING_TOKEN
            if credential.token not in self.required:
                return UNKNOWN_TOKEN
        secrets = (credential.token,) if credential is not None else ()
        if self.override:
            return Decision(self.route, ("Authorization", self.override), (*secrets, self.override))
        return Decision(self.route, None, secrets)


def make_router(config: ProxyConfig, store: TableStore | None) -> Router:
    if config.enable_token_routing:
        assert store is not None
        return TokenTableRouter(store)
    return FixedTargetRouter(config)
