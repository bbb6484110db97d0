"""Token tables for tests, written through the real file contract (common.tokentable)."""

from __future__ import annotations

from common import tokentable

# Canary secrets: every log line and every response of the whole run is grepped for these.
CLIENT_TOKEN = "sk-client-canary-7f3a9c1e5b2d4f60a8e1"
OTHER_CLIENT_TOKEN = "sk-client-canary-other-22b4c6d8e0f1a3b5"
UPSTREAM_KEY = "sk-upstream-canary-1d2c3b4a5f6e7d8c9b0a"
OTHER_UPSTREAM_KEY = "zp-upstream-canary.4e5f6a7b8c9d0e1f"  # not key-shaped: masked only by exact match
# The egress proxy's credentials (UPSTREAM_PROXY=http://PROXY_USER:PROXY_PASSWORD@...): the password
# is a canary too, and not key-shaped, so only knowing it can mask it.
PROXY_USER = "egress-user"
PROXY_PASSWORD = "egress-pw-canary.9c4e1a7b3d5f"
SECRETS = [CLIENT_TOKEN, OTHER_CLIENT_TOKEN, UPSTREAM_KEY, OTHER_UPSTREAM_KEY, PROXY_PASSWORD]


def register_secret(value: str) -> str:
    """Add a value to the canary list checked against all logs at the end of the run."""
    if value not in SECRETS:
        SECRETS.append(value)
    return value


def row(api_url: str, api_key: str = UPSTREAM_KEY, **fields) -> dict:
    base = {
        "token_id": 1,
        "token_expire_at": None,
        "ai_model_id": 1,
        "ai_model_name": "FakeModel",
        "ai_model_api_url": api_url,
        "ai_model_api_key": api_key,
    }
    base.update(fields)
    return base


def make_table(rows: dict[str, dict], generated_at: str | None = None) -> tokentable.TokenTable:
    maker = tokentable.RowMaker()
    return tokentable.TokenTable(
        generated_at=generated_at or tokentable.utc_now_iso(),
        source="tests",
        tokens={token: maker(fields) for token, fields in rows.items()},
    )


def write_table(path, rows: dict[str, dict], generated_at: str | None = None) -> None:
    tokentable.write_table(str(path), make_table(rows, generated_at))
