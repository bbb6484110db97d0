"""Token tables for the benchmark, made and written through the real file contract (common.tokentable)."""

from __future__ import annotations

import itertools
from pathlib import Path

from common import tokentable

BENCH_TOKEN = "sk-bench-client-00000000000000000001"
MODELS = 5


def client_token(index: int) -> str:
    return f"sk-bench-client-{index:020d}"


def backend_row(token: str, index: int, api_url: str) -> dict:
    """A row as the backend admin API lists it (what the syncer fetches)."""
    model = index % MODELS + 1
    return {
        "token_id": index,
        "token": token,
        "token_status": 1,
        "token_expire_at": None,
        "ai_model_id": model,
        "ai_model_name": f"bench-model-{model}",
        "ai_model_api_url": api_url,
        "ai_model_api_key": f"sk-bench-upstream-key-{model:04d}",
        "ai_model_status": 1,
    }


class Tables:
    """Tables of ``count`` tokens (BENCH_TOKEN among them) all routed to one upstream API URL."""

    def __init__(self, api_url: str) -> None:
        self.api_url = api_url
        self._maker = tokentable.RowMaker()
        self._bases: dict[int, dict[str, tokentable.TokenRow]] = {}
        self._serial = itertools.count(1)

    def backend_rows(self, count: int) -> list[dict]:
        return [backend_row(client_token(i), i, self.api_url) for i in range(1, count + 1)]

    def _base(self, count: int) -> dict[str, tokentable.TokenRow]:
        if count not in self._bases:
            self._bases[count] = {row["token"]: self._maker(row) for row in self.backend_rows(count)}
        return self._bases[count]

    def table(self, count: int, extra_tokens: tuple[str, ...] = ()) -> tokentable.TokenTable:
        tokens = dict(self._base(count))
        for token in extra_tokens:
            tokens[token] = self._maker(backend_row(token, 0, self.api_url))
        return tokentable.TokenTable(generated_at=tokentable.utc_now_iso(), source="bench", tokens=tokens)

    def new_token(self, tag: str) -> str:
        """A token no table had before: once a table with it is served, that table is loaded."""
        return f"sk-bench-new-{tag}-{next(self._serial):08d}"

    def write(self, path: Path, count: int, extra_tokens: tuple[str, ...] = ()) -> None:
        tokentable.write_table(str(path), self.table(count, extra_tokens))

    def prepare(self, count: int, extra_tokens: tuple[str, ...] = ()) -> bytes:
        """The file's bytes, made ahead of time so a timed replace is only the write itself."""
        return tokentable.serialize(self.table(count, extra_tokens))


def replace(path: Path, data: bytes) -> None:
    """Replace the table file atomically (temp file, fsync, os.replace), as the syncer does."""
    tokentable.write_atomic(str(path), data)
