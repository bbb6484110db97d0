"""Inspect the token table file with keys masked.

    python -m proxyapp.table show [--file PATH]          every route, one line each
    python -m proxyapp.table lookup TOKEN [--file PATH]  the route of one client token

The file is read through the same contract the workers use (common.tokentable), so a file this
command rejects is one the workers reject too. Exit 1 when the file is bad or the token unknown.
Per-token limits: the row's override (null = the default), and the effective limit with the
defaults TOKEN_MAX_CONCURRENCY / TOKEN_RPM / TOKEN_TPM of this environment (0 = unlimited), and the token's
Redis key id.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from common import tokentable
from common.envparse import DEFAULT_TOKEN_FILE, ConfigError, Env
from common.jsonlog import mask_secret
from proxyapp.limits import effective_limits


def _route(token: str, row: tokentable.TokenRow, defaults: tuple[int, int, int] = (0, 0, 0)) -> dict:
    expired = row.expires_at is not None and row.expires_at <= time.time()
    concurrency, rpm, tpm = defaults
    limits = effective_limits(
        token, row.token_id, row.token_max_concurrency, row.token_rpm, concurrency, rpm, row.token_tpm, tpm
    )
    return {
        "token": mask_secret(token),
        "token_id": row.token_id,
        "ai_model_id": row.ai_model_id,
        "ai_model_name": row.ai_model_name,
        "ai_model_api_url": row.ai_model_api_url,
        "ai_model_api_key": mask_secret(row.ai_model_api_key),
        "token_expire_at": row.token_expire_at,
        "expired": expired,
        "token_max_concurrency": row.token_max_concurrency,
        "token_rpm": row.token_rpm,
        "token_tpm": row.token_tpm,
        "max_concurrency": limits.max_concurrency if limits else 0,
        "rpm": limits.rpm if limits else 0,
        "tpm": limits.tpm if limits else 0,
        "limit_key_id": limits.key_id if limits else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxyapp.table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", default=os.environ.get("TOKEN_FILE") or DEFAULT_TOKEN_FILE)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("show", help="print the table header and every route (keys masked)")
    lookup = commands.add_parser("lookup", help="print the route of one client token (keys masked)")
    lookup.add_argument("token")
    args = parser.parse_args(argv)
    env = Env()
    try:
        defaults = (
            env.integer("TOKEN_MAX_CONCURRENCY", 0, maximum=tokentable.MAX_LIMIT),
            env.integer("TOKEN_RPM", 0, maximum=tokentable.MAX_LIMIT),
            env.integer("TOKEN_TPM", 0, maximum=tokentable.MAX_LIMIT),
        )
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        table, stat = tokentable.read(args.file)
    except tokentable.TableFormatError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    if args.command == "lookup":
        row = table.tokens.get(args.token)
        if row is None:
            print(f"token {mask_secret(args.token)} is not in {args.file}", file=sys.stderr)
            return 1
        print(json.dumps(_route(args.token, row, defaults), indent=2, ensure_ascii=False))
        return 0
    header = {
        "file": args.file,
        "mode": oct(stat.st_mode & 0o777),
        "generated_at": table.generated_at,
        "source": table.source,
        "tokens": len(table.tokens),
    }
    print(json.dumps(header, ensure_ascii=False))
    for token in sorted(table.tokens):
        print(json.dumps(_route(token, table.tokens[token], defaults), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
