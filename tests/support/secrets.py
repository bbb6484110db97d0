"""The run-wide secrets grep: no canary (tests.support.tables.SECRETS) in any log a process of the
test session wrote (tests.support.procs.LOG_FILES). Run by the conftest hook when the session ends,
whichever tests ran and in whatever order; a leak fails the run."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tests.support.procs import LOG_FILES
from tests.support.tables import SECRETS


def _is_fake_log(path: Path) -> bool:
    """The fakes' own logs are not proxy logs: they see the keys by design."""
    return path.name.startswith(("upstream-", "backend"))


def log_leaks(paths: Iterable[Path] | None = None) -> list[str]:
    """One line per (file, canary) found: the file, the count and the first line holding it."""
    leaks = []
    for path in LOG_FILES if paths is None else paths:
        if _is_fake_log(path) or not path.exists():
            continue
        text = path.read_text(errors="replace")
        for secret in SECRETS:
            count = text.count(secret)
            if count:
                line = next(x for x in text.splitlines() if secret in x)
                leaks.append(f"{path.name}: {count} x {secret!r}, e.g. {line[:600]}")
    return leaks
