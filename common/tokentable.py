"""The token table file: the one contract between the syncer (writer) and the proxy workers (readers).

Format (UTF-8 JSON, indent 2, sorted keys, so operators can read it and ``jq`` it)::

    {"format": 1, "generated_at": "...Z", "source": "<backend URL>",
     "tokens": {"<client token>": {"token_id", "token_expire_at", "ai_model_id", "ai_model_name",
                                   "ai_model_api_url", "ai_model_api_key",
                                   ["token_max_concurrency"], ["token_rpm"], ["token_tpm"]}}}

The three per-token limits are optional (null or absent = the deployment's default; 0 = unlimited
for this token) and written only when set, so a file without them is the same format 1.

The file holds only active rows. It is always replaced whole (temp file in the same directory,
fsync, mode 0600, ``os.replace``, fsync of the directory), so a reader never sees a torn file.
Standard library only.
"""

from __future__ import annotations

import datetime as _dt
import glob
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from json.decoder import scanstring
from typing import Any
from urllib.parse import urlsplit

FORMAT_VERSION = 1
ROW_FIELDS = (
    "ai_model_api_key",
    "ai_model_api_url",
    "ai_model_id",
    "ai_model_name",
    "token_expire_at",
    "token_id",
)
LIMIT_FIELDS = ("token_max_concurrency", "token_rpm", "token_tpm")  # optional; written only when not null
MAX_LIMIT = 1_000_000_000
_TEMP_SUFFIX = ".tmp"
_SPACE_OR_CONTROL = re.compile(r"[\x00-\x20\x7f]").search
_HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f]").search


class TableFormatError(ValueError):
    """The file, or one row of it, does not follow the format. The message says why."""


@dataclass(frozen=True, slots=True)
class TokenRow:
    """One active client token and the upstream model it routes to."""

    token_id: int | str | None
    token_expire_at: str | int | float | None
    ai_model_id: int | str | None
    ai_model_name: str
    ai_model_api_url: str
    ai_model_api_key: str
    expires_at: float | None  # token_expire_at as epoch seconds; derived, not written
    token_max_concurrency: int | None = None  # None = the default (TOKEN_MAX_CONCURRENCY)
    token_rpm: int | None = None  # None = the default (TOKEN_RPM)
    token_tpm: int | None = None  # None = the default (TOKEN_TPM)

    def to_json(self) -> dict[str, Any]:
        document = {name: getattr(self, name) for name in ROW_FIELDS}
        if self.token_max_concurrency is not None:
            document["token_max_concurrency"] = self.token_max_concurrency
        if self.token_rpm is not None:
            document["token_rpm"] = self.token_rpm
        if self.token_tpm is not None:
            document["token_tpm"] = self.token_tpm
        return document


@dataclass(frozen=True, slots=True)
class TokenTable:
    """A whole table file: when and from where it was made, and the rows by client token."""

    generated_at: str
    source: str
    tokens: Mapping[str, TokenRow]


# ---------------------------------------------------------------------------- row validation


def parse_expire_at(value: object) -> float | None:
    """``token_expire_at`` as epoch seconds. None means never expires.

    Accepts null, "" , epoch seconds (0 = never), or ISO 8601 (naive means UTC; Go's zero time
    "0001-01-01T00:00:00Z" means never, since a Go backend marshals an unset time that way).
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise TableFormatError(f"token_expire_at {value!r} is not a time")
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            raise TableFormatError(f"token_expire_at {value!r} is not a time")
        return None if value == 0 else float(value)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return parse_expire_at(int(text))
        try:
            moment = _dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise TableFormatError(f"token_expire_at {value!r} is not ISO 8601") from None
        if moment.year <= 1:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=_dt.UTC)
        return moment.timestamp()
    raise TableFormatError(f"token_expire_at {value!r} is not a time")


def check_token(token: object) -> str:
    if not isinstance(token, str) or not token:
        raise TableFormatError("token is missing or not a string")
    if _SPACE_OR_CONTROL(token) or len(token) > 4096:
        raise TableFormatError("token has spaces or control characters, or is too long")
    return token


def check_api_url(url: object) -> str:
    if not isinstance(url, str):
        raise TableFormatError("ai_model_api_url is not a string")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise TableFormatError(f"ai_model_api_url {url!r} is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TableFormatError(f"ai_model_api_url {url!r} is not http(s) with a host")
    if _SPACE_OR_CONTROL(url):
        raise TableFormatError(f"ai_model_api_url {url!r} has spaces or control characters")
    return url


def check_api_key(key: object) -> str:
    if not isinstance(key, str) or not key.strip():
        raise TableFormatError("ai_model_api_key is not a non-empty string")
    if _HEADER_UNSAFE(key):
        raise TableFormatError("ai_model_api_key has characters a header cannot carry")
    return key


def _check_id(name: str, value: object) -> int | str | None:
    if value is None or (isinstance(value, (int, str)) and not isinstance(value, bool)):
        return value
    raise TableFormatError(f"{name} {value!r} is not a number or string")


def check_limit(name: str, value: object) -> int | None:
    """An optional per-token limit: null, or a whole number from 0 (unlimited) to MAX_LIMIT."""
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= MAX_LIMIT:
        raise TableFormatError(f"{name} {value!r} is not null or a whole number from 0 to {MAX_LIMIT}")
    return value


class RowMaker:
    """Validates rows into TokenRows. Models repeat across tokens, so the checks of a URL, a key
    and an expiry value are done once per distinct value (a 100,000-row table has few models)."""

    def __init__(self) -> None:
        self._urls: dict[str, str] = {}
        self._keys: dict[str, str] = {}
        self._expiries: dict[object, float | None] = {}

    def __call__(self, row: Mapping[str, Any]) -> TokenRow:
        if not isinstance(row, Mapping):
            raise TableFormatError("row is not an object")
        name = row.get("ai_model_name")
        if name is None:
            name = ""
        if not isinstance(name, str):
            raise TableFormatError("ai_model_name is not a string")
        url = row.get("ai_model_api_url")
        if not isinstance(url, str) or url not in self._urls:
            self._urls[url] = check_api_url(url)
        key = row.get("ai_model_api_key")
        if not isinstance(key, str) or key not in self._keys:
            self._keys[key] = check_api_key(key)
        expire_raw = row.get("token_expire_at")
        if not isinstance(expire_raw, (str, int, float, type(None))):
            raise TableFormatError(f"token_expire_at {expire_raw!r} is not a time")
        cache_key = (type(expire_raw), expire_raw)
        expires_at = self._expiries.get(cache_key, _MISSING)
        if expires_at is _MISSING:
            expires_at = self._expiries[cache_key] = parse_expire_at(expire_raw)
        return TokenRow(
            token_id=_check_id("token_id", row.get("token_id")),
            token_expire_at=expire_raw,
            ai_model_id=_check_id("ai_model_id", row.get("ai_model_id")),
            ai_model_name=name,
            ai_model_api_url=url,
            ai_model_api_key=key,
            expires_at=expires_at,
            token_max_concurrency=check_limit("token_max_concurrency", row.get("token_max_concurrency")),
            token_rpm=check_limit("token_rpm", row.get("token_rpm")),
            token_tpm=check_limit("token_tpm", row.get("token_tpm")),
        )


_MISSING: Any = object()


def make_row(row: Mapping[str, Any]) -> TokenRow:
    """Validate one row (the backend's field names) into a TokenRow; unknown fields are ignored."""
    return RowMaker()(row)


# ---------------------------------------------------------------------------- parsing


def _skip_ws(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\n\r":
        index += 1
    return index


def _walk_object(text: str, index: int, on_member: Callable[[str, int], int]) -> int:
    """Walk the JSON object at text[index], calling on_member(name, value_index) for each member;
    on_member decodes the value and returns the index after it. Returns the index after the '}'.

    Decoding member by member lets a reader pause between rows (a gevent worker stays responsive
    while it loads 100,000 tokens), which one json.loads call over the whole file cannot.
    """
    if index >= len(text) or text[index] != "{":
        raise TableFormatError("expected a JSON object")
    index = _skip_ws(text, index + 1)
    if index < len(text) and text[index] == "}":
        return index + 1
    while True:
        if index >= len(text) or text[index] != '"':
            raise TableFormatError(f"expected a member name at offset {index}")
        name, index = scanstring(text, index + 1)
        index = _skip_ws(text, index)
        if index >= len(text) or text[index] != ":":
            raise TableFormatError(f"expected ':' at offset {index}")
        index = _skip_ws(text, on_member(name, _skip_ws(text, index + 1)))
        if index < len(text) and text[index] == ",":
            index = _skip_ws(text, index + 1)
        elif index < len(text) and text[index] == "}":
            return index + 1
        else:
            raise TableFormatError(f"expected ',' or '}}' at offset {index}")


def parse(data: bytes, *, pause: Callable[[], None] | None = None, pause_every: int = 2000) -> TokenTable:
    """Parse and validate a whole table file. Any fault raises TableFormatError.

    ``pause`` (if given) is called every ``pause_every`` rows, so a cooperative reader can yield.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TableFormatError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    raw_decode = json.JSONDecoder().raw_decode
    header: dict[str, Any] = {}
    tokens: dict[str, TokenRow] = {}
    make = RowMaker()

    def on_row(token: str, index: int) -> int:
        row, index = raw_decode(text, index)
        try:
            check_token(token)
            tokens[token] = make(row)
        except TableFormatError as exc:
            raise TableFormatError(f"row {len(tokens) + 1}: {exc}") from None
        if pause is not None and len(tokens) % pause_every == 0:
            pause()
        return index

    def on_member(name: str, index: int) -> int:
        if name == "tokens":
            header["tokens"] = True
            return _walk_object(text, index, on_row)
        header[name], index = raw_decode(text, index)
        return index

    try:
        end = _walk_object(text, _skip_ws(text, 0), on_member)
    except json.JSONDecodeError as exc:
        raise TableFormatError(f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except TableFormatError:
        raise
    except (ValueError, IndexError) as exc:
        raise TableFormatError(f"not JSON ({exc})") from None
    if _skip_ws(text, end) != len(text):
        raise TableFormatError("extra data after the JSON object")
    if header.get("format") != FORMAT_VERSION:
        raise TableFormatError(f"unknown format {header.get('format')!r} (expected {FORMAT_VERSION})")
    if "tokens" not in header:
        raise TableFormatError("'tokens' is missing")
    generated_at = header.get("generated_at")
    source = header.get("source")
    if not isinstance(generated_at, str) or not isinstance(source, str):
        raise TableFormatError("'generated_at' and 'source' must be strings")
    return TokenTable(generated_at=generated_at, source=source, tokens=tokens)


def read(path: str, *, pause: Callable[[], None] | None = None) -> tuple[TokenTable, os.stat_result]:
    """Read and parse the file; also return the stat of the very file descriptor that was read."""
    try:
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            data = handle.read()
    except OSError as exc:
        raise TableFormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse(data, pause=pause), stat


# ---------------------------------------------------------------------------- writing


_encode_string = json.encoder.encode_basestring  # C implementation; ensure_ascii=False form


def _json_value(value: object) -> str:
    kind = type(value)
    if kind is str:
        return _encode_string(value)
    if value is None:
        return "null"
    if kind is int:
        return int.__repr__(value)
    return json.dumps(value, ensure_ascii=False)


def _dump_row(row: TokenRow) -> str:
    # Hand-rolled pretty printing of the fixed, flat row shape: json.dumps with indent falls back
    # to the pure-Python encoder, several times slower on a 100,000-row table.
    return (
        "{\n"
        f'      "ai_model_api_key": {_json_value(row.ai_model_api_key)},\n'
        f'      "ai_model_api_url": {_json_value(row.ai_model_api_url)},\n'
        f'      "ai_model_id": {_json_value(row.ai_model_id)},\n'
        f'      "ai_model_name": {_json_value(row.ai_model_name)},\n'
        f'      "token_expire_at": {_json_value(row.token_expire_at)},\n'
        f'      "token_id": {_json_value(row.token_id)}' + _dump_limits(row) + "\n    }"
    )


def _dump_limits(row: TokenRow) -> str:
    # Sorted after token_id ("token_i" < "token_m" < "token_r" < "token_t"); absent when null.
    text = ""
    if row.token_max_concurrency is not None:
        text += f',\n      "token_max_concurrency": {int.__repr__(row.token_max_concurrency)}'
    if row.token_rpm is not None:
        text += f',\n      "token_rpm": {int.__repr__(row.token_rpm)}'
    if row.token_tpm is not None:
        text += f',\n      "token_tpm": {int.__repr__(row.token_tpm)}'
    return text


def serialize(table: TokenTable) -> bytes:
    """The file's bytes: indent 2, sorted keys, trailing newline. Equal to json.dumps(indent=2)."""
    head = json.dumps(
        {"format": FORMAT_VERSION, "generated_at": table.generated_at, "source": table.source},
        indent=2,
        sort_keys=True,
        ensure_ascii=False,
    )
    if not table.tokens:
        body = "{}"
    else:
        members = ",\n".join(
            f"    {_encode_string(token)}: {_dump_row(table.tokens[token])}" for token in sorted(table.tokens)
        )
        body = "{\n" + members + "\n  }"
    # "tokens" sorts after "source", so it is the last member of the object.
    text = head[:-2] + ',\n  "tokens": ' + body + "\n}\n"
    return text.encode("utf-8")


def _temp_prefix(path: str) -> str:
    return "." + os.path.basename(path) + "."


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old file or the new one, never a mix.

    Temp file in the same directory (same filesystem), mode 0600, fsync, os.replace, fsync of
    the directory. On any failure the temp file is removed and the old file is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, temp_path = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=_TEMP_SUFFIX, dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            fd = -1
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(temp_path)
        except OSError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_table(path: str, table: TokenTable) -> None:
    write_atomic(path, serialize(table))


def remove_stale_temp_files(path: str) -> list[str]:
    """Delete temp files a killed writer left beside ``path``; return their names."""
    directory = os.path.dirname(os.path.abspath(path))
    pattern = os.path.join(glob.escape(directory), glob.escape(_temp_prefix(path)) + "*" + _TEMP_SUFFIX)
    removed = []
    for stale in glob.glob(pattern):
        try:
            os.unlink(stale)
            removed.append(stale)
        except FileNotFoundError:
            pass
    return removed


def utc_now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
