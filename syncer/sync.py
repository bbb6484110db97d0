"""One sync: fetch the rows, keep the active valid ones, guard against an empty result, write."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from common import tokentable
from common.jsonlog import mask_text
from syncer.backend import BackendClient, BackendError
from syncer.config import SyncerConfig

_EXAMPLES = 3  # skipped rows described in the log line; the count covers them all


class SyncFailed(Exception):
    """A sync that must leave the file as it is. str() is safe to log."""


@dataclass
class Selection:
    """The active, valid rows by token, and what was left out."""

    tokens: dict[str, tokentable.TokenRow] = field(default_factory=dict)
    rows_received: int = 0
    active: int = 0
    skipped: int = 0
    duplicates: int = 0
    skipped_examples: list[str] = field(default_factory=list)


@dataclass
class SyncResult:
    outcome: str  # "ok" or "failed"
    duration_ms: float
    file: str
    error: str = ""
    rows_received: int = 0
    active: int = 0
    skipped: int = 0
    duplicates: int = 0
    tokens_written: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def log_fields(self) -> dict[str, Any]:
        fields = {
            "outcome": self.outcome,
            "duration_ms": round(self.duration_ms, 1),
            "rows_received": self.rows_received,
            "active": self.active,
            "skipped": self.skipped,
            "duplicates": self.duplicates,
            "tokens_written": self.tokens_written,
            "file": self.file,
        }
        if self.skipped_examples:
            fields["skipped_examples"] = self.skipped_examples
        if self.error:
            fields["error"] = self.error
        return fields


def _is_one(value: object) -> bool:
    # Exactly the integer 1, as Go's int field would hold it; not True, "1" or 1.5.
    return type(value) is int and value == 1


def _describe_skip(index: int, row: Mapping[str, Any], reason: str) -> str:
    token_id = repr(row.get("token_id"))[:40]
    secrets = [value for value in (row.get("token"), row.get("ai_model_api_key")) if isinstance(value, str)]
    return mask_text(f"row {index} (token_id {token_id}): {reason}", secrets)


def select_active(rows: Iterable[Any]) -> Selection:
    """Keep rows with token_status == 1 and ai_model_status == 1 that pass the table's checks
    (so every row written is one the worker accepts). A later duplicate token wins."""
    selection = Selection()
    make_row = tokentable.RowMaker()
    for index, row in enumerate(rows, start=1):
        selection.rows_received += 1
        if not isinstance(row, Mapping):
            selection.skipped += 1
            if len(selection.skipped_examples) < _EXAMPLES:
                selection.skipped_examples.append(f"row {index}: not an object")
            continue
        if not (_is_one(row.get("token_status")) and _is_one(row.get("ai_model_status"))):
            continue
        selection.active += 1
        try:
            token = tokentable.check_token(row.get("token"))
            entry = make_row(row)
        except tokentable.TableFormatError as exc:
            selection.skipped += 1
            if len(selection.skipped_examples) < _EXAMPLES:
                selection.skipped_examples.append(_describe_skip(index, row, str(exc)))
            continue
        if token in selection.tokens:
            selection.duplicates += 1
        selection.tokens[token] = entry
    return selection


def current_token_count(path: str) -> int:
    """Tokens in the table file now; 0 if it is missing or unreadable (then nothing is lost)."""
    try:
        table, _ = tokentable.read(path)
    except tokentable.TableFormatError:
        return 0
    return len(table.tokens)


def _guard_empty(config: SyncerConfig, selection: Selection) -> None:
    if selection.tokens or config.sync_allow_empty:
        return
    current = current_token_count(config.token_file)
    if current:
        raise SyncFailed(
            f"backend returned no active tokens while the file has {current}; refused "
            "(set SYNC_ALLOW_EMPTY=true to allow an empty table)"
        )


def _write(config: SyncerConfig, client: BackendClient, selection: Selection, write: Writer) -> None:
    table = tokentable.TokenTable(
        generated_at=tokentable.utc_now_iso(), source=client.source, tokens=selection.tokens
    )
    data = tokentable.serialize(table)
    try:
        write(config.token_file, data)
    except OSError as exc:
        raise SyncFailed(f"cannot write {config.token_file}: {exc.strerror or exc}") from None


Writer = Callable[[str, bytes], None]


def sync_once(
    config: SyncerConfig, client: BackendClient, write: Writer = tokentable.write_atomic
) -> SyncResult:
    """Fetch, filter, guard and write. Never raises for a backend or file fault: the result says
    ``failed`` and the file is left byte-for-byte as it was."""
    started = time.monotonic()
    selection = Selection()
    error = ""
    try:
        selection = select_active(client.fetch_rows())
        _guard_empty(config, selection)
        _write(config, client, selection, write)
    except (BackendError, SyncFailed) as exc:
        error = client.mask(str(exc))
    return SyncResult(
        outcome="failed" if error else "ok",
        duration_ms=(time.monotonic() - started) * 1000.0,
        file=config.token_file,
        error=error,
        rows_received=selection.rows_received,
        active=selection.active,
        skipped=selection.skipped,
        duplicates=selection.duplicates,
        tokens_written=0 if error else len(selection.tokens),
        skipped_examples=selection.skipped_examples,
    )
