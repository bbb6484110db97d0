"""Unit tests of common/tokentable.py: the table file contract between the syncer and the workers."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import tokentable
from common.tokentable import TableFormatError, TokenTable


def backend_row(**overrides):
    row = {
        "token_id": 7,
        "token": "sk-client-0001",
        "token_status": 1,
        "ai_model_id": 3,
        "ai_model_name": "DeepSeek",
        "ai_model_api_url": "https://api.deepseek.com",
        "ai_model_api_key": "sk-upstream-key-0001",
        "ai_model_status": 1,
        "token_expire_at": "2099-01-01T00:00:00Z",
    }
    row.update(overrides)
    return row


def table_of(rows: dict, generated_at="2025-01-02T03:04:05Z", source="http://backend/api/tokens/with-model"):
    return TokenTable(
        generated_at=generated_at,
        source=source,
        tokens={token: tokentable.make_row(row) for token, row in rows.items()},
    )


def reference_bytes(table: TokenTable) -> bytes:
    document = {
        "format": 1,
        "generated_at": table.generated_at,
        "source": table.source,
        "tokens": {token: row.to_json() for token, row in table.tokens.items()},
    }
    return (json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def file_text(**members) -> bytes:
    document = {
        "format": 1,
        "generated_at": "2025-01-02T03:04:05Z",
        "source": "http://backend",
        "tokens": {"sk-a": backend_row()},
    }
    document.update(members)
    return json.dumps(document).encode()


SAMPLE_ROWS = {
    "sk-client-0001": backend_row(),
    "tok-β-2": backend_row(
        token_id="id-2",
        ai_model_id=None,
        ai_model_name='模型 "quoted" \\ and\ttab',
        ai_model_api_url="http://10.0.0.1:8080/v1?x=1",
        token_expire_at=1893456000,
    ),
    "tok-3": backend_row(token_id=None, ai_model_name=None, token_expire_at=1893456000.5),
    "tok-4": backend_row(token_expire_at=None, ai_model_api_key="key with spaces inside"),
    "tok-5": backend_row(token_max_concurrency=2, token_rpm=0),
    "tok-6": backend_row(token_rpm=600, token_max_concurrency=None),
}


# ---------------------------------------------------------------------------- serialize / parse


def test_round_trip_keeps_every_field():
    table = table_of(SAMPLE_ROWS)
    parsed = tokentable.parse(tokentable.serialize(table))
    assert parsed.generated_at == table.generated_at
    assert parsed.source == table.source
    assert parsed.tokens == table.tokens
    assert parsed.tokens["tok-3"].ai_model_name == ""  # null name is read as ""


def test_serialize_equals_json_dumps_indent_2_sorted():
    table = table_of(SAMPLE_ROWS)
    assert tokentable.serialize(table) == reference_bytes(table)


def test_serialize_empty_table_equals_json_dumps():
    table = table_of({})
    data = tokentable.serialize(table)
    assert data == reference_bytes(table)
    assert tokentable.parse(data).tokens == {}


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_token = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x2FFF, exclude_categories=("Cs",)), min_size=1
).filter(lambda token: "\x7f" not in token)
_row = st.fixed_dictionaries(
    {
        "token_id": st.one_of(st.none(), st.integers(-(2**63), 2**63), _text),
        "ai_model_id": st.one_of(st.none(), st.integers(0, 10**6), _text),
        "ai_model_name": _text,
        "ai_model_api_url": st.sampled_from(["http://a", "https://b.example:8443/v1", "http://[::1]:9/x"]),
        "ai_model_api_key": st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1).filter(
            str.strip
        ),
        "token_expire_at": st.one_of(
            st.none(),
            st.integers(0, 2**40),
            st.floats(0, 2e10, allow_nan=False),
            st.just("2030-05-06T07:08:09Z"),
        ),
    },
    optional={
        "token_max_concurrency": st.one_of(st.none(), st.integers(0, tokentable.MAX_LIMIT)),
        "token_rpm": st.one_of(st.none(), st.integers(0, tokentable.MAX_LIMIT)),
        "token_tpm": st.one_of(st.none(), st.integers(0, tokentable.MAX_LIMIT)),
    },
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_token, _row, max_size=6), _text)
def test_serialize_matches_json_dumps_for_any_rows(rows, source):
    table = table_of(rows, source=source)
    data = tokentable.serialize(table)
    assert data == reference_bytes(table)
    assert tokentable.parse(data) == table


def test_parse_calls_pause_every_n_rows():
    rows = {f"sk-{i}": backend_row(token_id=i) for i in range(10)}
    pauses = []
    tokentable.parse(tokentable.serialize(table_of(rows)), pause=lambda: pauses.append(1), pause_every=3)
    assert len(pauses) == 3


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b"", "expected a JSON object"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"format": 1, "tokens": {}', "expected ','"),
        (b'{"format": 1 "tokens": {}}', "expected ','"),
        (b'{"format": 1, "generated_at": "x", "source": "y", "tokens": {"a": {]}}', "not JSON"),
        (file_text() + b" {}", "extra data"),
        (file_text(format=2), "unknown format 2"),
        (file_text(format="1"), "unknown format"),
        (b'{"generated_at": "x", "source": "y", "tokens": {}}', "unknown format None"),
        (b'{"format": 1, "generated_at": "x", "source": "y"}', "'tokens' is missing"),
        (file_text(generated_at=None), "'generated_at' and 'source' must be strings"),
        (file_text(source=5), "'generated_at' and 'source' must be strings"),
        (file_text(tokens=[]), "expected a JSON object"),
        (file_text(tokens={"sk-a": [1]}), "row 1: row is not an object"),
        (file_text(tokens={"": backend_row()}), "row 1: token is missing"),
        (file_text(tokens={"sk a": backend_row()}), "spaces or control characters"),
        (file_text(tokens={"x" * 4097: backend_row()}), "too long"),
        (file_text(tokens={"sk-a": backend_row(ai_model_api_url="ftp://host")}), "not http(s) with a host"),
        (file_text(tokens={"sk-a": backend_row(ai_model_api_url="http://")}), "not http(s) with a host"),
        (file_text(tokens={"sk-a": backend_row(ai_model_api_url="http://h:99999")}), "is not a URL"),
        (file_text(tokens={"sk-a": backend_row(ai_model_api_url="http://h/a b")}), "spaces or control"),
        (file_text(tokens={"sk-a": backend_row(ai_model_api_url=None)}), "ai_model_api_url is not a string"),
        (file_text(tokens={"sk-a": backend_row(ai_model_api_key="")}), "not a non-empty string"),
        (file_text(tokens={"sk-a": backend_row(ai_model_api_key="   ")}), "not a non-empty string"),
        (file_text(tokens={"sk-a": backend_row(ai_model_api_key=5)}), "not a non-empty string"),
        (file_text(tokens={"sk-a": backend_row(ai_model_api_key="k\r\nX: y")}), "header cannot carry"),
        (file_text(tokens={"sk-a": backend_row(token_expire_at="soon")}), "not ISO 8601"),
        (file_text(tokens={"sk-a": backend_row(token_expire_at=True)}), "is not a time"),
        (file_text(tokens={"sk-a": backend_row(token_expire_at=[1])}), "is not a time"),
        (file_text(tokens={"sk-a": backend_row(token_id=True)}), "token_id True is not a number or string"),
        (file_text(tokens={"sk-a": backend_row(token_id=1.5)}), "token_id 1.5"),
        (file_text(tokens={"sk-a": backend_row(ai_model_id={})}), "ai_model_id {}"),
        (file_text(tokens={"sk-a": backend_row(ai_model_name=3)}), "ai_model_name is not a string"),
        (file_text(tokens={"sk-a": backend_row(token_max_concurrency=-1)}), "token_max_concurrency -1 is"),
        (file_text(tokens={"sk-a": backend_row(token_max_concurrency=1.0)}), "token_max_concurrency 1.0"),
        (file_text(tokens={"sk-a": backend_row(token_max_concurrency=True)}), "token_max_concurrency True"),
        (file_text(tokens={"sk-a": backend_row(token_rpm="5")}), "token_rpm '5' is not null or a whole"),
        (file_text(tokens={"sk-a": backend_row(token_rpm=10**9 + 1)}), "token_rpm 1000000001"),
        (file_text(tokens={"sk-a": backend_row(token_tpm=-1)}), "token_tpm -1"),
        (file_text(tokens={"sk-a": backend_row(token_rpm=[5])}), "token_rpm [5]"),
    ],
)
def test_bad_files_are_rejected_with_a_reason(data, reason):
    with pytest.raises(TableFormatError) as caught:
        tokentable.parse(data)
    assert reason in str(caught.value)


def test_bad_row_message_names_the_row_number():
    rows = {"sk-a": backend_row(), "sk-b": backend_row(), "sk-c": backend_row(ai_model_api_key="")}
    with pytest.raises(TableFormatError, match=r"^row 3: "):
        tokentable.parse(file_text(tokens=rows))


def test_parse_accepts_whitespace_and_unknown_header_members():
    data = (
        b' \n{ "format" : 1 , "extra": [1, {"a": 2}], "generated_at": "g", '
        b'"source": "s",\n "tokens": { } }\n '
    )
    table = tokentable.parse(data)
    assert table.tokens == {}
    assert (table.generated_at, table.source) == ("g", "s")


# ---------------------------------------------------------------------------- rows and expiry


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        (0, None),
        (0.0, None),
        ("0", None),
        ("0001-01-01T00:00:00Z", None),
        (1700000000, 1700000000.0),
        (1700000000.25, 1700000000.25),
        ("1700000000", 1700000000.0),
        (" 1700000000 ", 1700000000.0),
        ("2023-11-14T22:13:20Z", 1700000000.0),
        ("2023-11-14T22:13:20z", 1700000000.0),
        ("2023-11-14T22:13:20", 1700000000.0),  # naive means UTC
        ("2023-11-14 22:13:20", 1700000000.0),
        ("2023-11-15T06:13:20+08:00", 1700000000.0),
        ("2023-11-14T22:13:20.500Z", 1700000000.5),
        ("2023-11-14", dt.datetime(2023, 11, 14, tzinfo=dt.UTC).timestamp()),
    ],
)
def test_parse_expire_at_forms(value, expected):
    assert tokentable.parse_expire_at(value) == expected


@pytest.mark.parametrize(
    "value", [True, False, "tomorrow", "2023-13-01", float("nan"), float("inf"), [1], {}]
)
def test_parse_expire_at_rejects(value):
    with pytest.raises(TableFormatError):
        tokentable.parse_expire_at(value)


def test_make_row_ignores_unknown_fields_and_derives_expiry():
    row = tokentable.make_row(backend_row(token_usage_limit=5, anything={"x": 1}))
    assert row.expires_at == dt.datetime(2099, 1, 1, tzinfo=dt.UTC).timestamp()
    assert set(row.to_json()) == set(tokentable.ROW_FIELDS)
    assert row.to_json()["token_expire_at"] == "2099-01-01T00:00:00Z"  # written as received


def test_limit_fields_are_read_and_written_only_when_set():
    table = table_of(SAMPLE_ROWS)
    parsed = tokentable.parse(tokentable.serialize(table))
    assert (parsed.tokens["tok-5"].token_max_concurrency, parsed.tokens["tok-5"].token_rpm) == (2, 0)
    assert (parsed.tokens["tok-6"].token_max_concurrency, parsed.tokens["tok-6"].token_rpm) == (None, 600)
    assert (parsed.tokens["tok-4"].token_max_concurrency, parsed.tokens["tok-4"].token_rpm) == (None, None)
    document = json.loads(tokentable.serialize(table))
    assert document["format"] == 1
    assert document["tokens"]["tok-5"]["token_max_concurrency"] == 2
    assert document["tokens"]["tok-5"]["token_rpm"] == 0  # 0 (unlimited for this token) is kept
    assert "token_max_concurrency" not in document["tokens"]["tok-6"]  # null is left out
    assert "token_max_concurrency" not in document["tokens"]["tok-4"]
    assert "token_rpm" not in document["tokens"]["tok-4"]


def test_a_file_written_before_the_limit_fields_loads_unchanged():
    # Byte for byte what the syncer wrote before the fields existed.
    data = (
        b'{\n  "format": 1,\n  "generated_at": "2025-01-02T03:04:05Z",\n  "source": "http://b",\n'
        b'  "tokens": {\n    "sk-old": {\n      "ai_model_api_key": "k",\n'
        b'      "ai_model_api_url": "http://u/v1",\n      "ai_model_id": 1,\n'
        b'      "ai_model_name": "m",\n      "token_expire_at": null,\n      "token_id": 4\n    }\n  }\n}\n'
    )
    table = tokentable.parse(data)
    row = table.tokens["sk-old"]
    assert (row.token_id, row.token_max_concurrency, row.token_rpm) == (4, None, None)
    assert tokentable.serialize(table) == data


def test_row_maker_caches_give_the_same_answers_as_make_row():
    make = tokentable.RowMaker()
    rows = [backend_row(token_id=i, token_expire_at=[None, 0, "2030-01-01"][i % 3]) for i in range(9)]
    assert [make(r) for r in rows] == [tokentable.make_row(r) for r in rows]
    with pytest.raises(TableFormatError):
        make(backend_row(ai_model_api_url="gopher://x"))
    with pytest.raises(TableFormatError):  # a bad value is not cached as good
        make(backend_row(ai_model_api_url="gopher://x"))


@pytest.mark.parametrize("token", [None, 5, "", "a b", "a\tb", "a\x00", "a\x7f", "x" * 4097])
def test_check_token_rejects(token):
    with pytest.raises(TableFormatError):
        tokentable.check_token(token)


def test_check_token_accepts_unicode_and_punctuation():
    assert tokentable.check_token("sk-é.~!@#") == "sk-é.~!@#"


# ---------------------------------------------------------------------------- read and write


def test_write_table_then_read(tmp_path):
    path = str(tmp_path / "tokens.json")
    table = table_of(SAMPLE_ROWS)
    tokentable.write_table(path, table)
    parsed, file_stat = tokentable.read(path)
    assert parsed == table
    assert file_stat.st_size == len(tokentable.serialize(table))
    with open(path, "rb") as handle:
        assert handle.read() == reference_bytes(table)


def test_write_atomic_mode_0600_even_with_open_umask(tmp_path):
    path = str(tmp_path / "tokens.json")
    old = os.umask(0)
    try:
        tokentable.write_atomic(path, b"one")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_write_atomic_replaces_an_existing_file_with_a_new_inode(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    before = os.stat(path)
    tokentable.write_atomic(str(path), b"new")
    after = os.stat(path)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(after.st_mode) == 0o600
    assert (after.st_ino, after.st_dev) != (
        before.st_ino,
        before.st_dev,
    ) or after.st_ctime_ns != before.st_ctime_ns
    assert sorted(os.listdir(tmp_path)) == ["tokens.json"]


def test_write_atomic_creates_the_directory(tmp_path):
    path = tmp_path / "var" / "sub" / "tokens.json"
    tokentable.write_atomic(str(path), b"x")
    assert path.read_bytes() == b"x"


@pytest.mark.parametrize("fail_at", ["replace", "fsync", "write"])
def test_write_atomic_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "tokens.json"
    path.write_bytes(b"old content")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if fail_at == "replace":
        monkeypatch.setattr(tokentable.os, "replace", boom)
    elif fail_at == "fsync":
        monkeypatch.setattr(tokentable.os, "fsync", boom)
    else:
        monkeypatch.setattr(tokentable.os, "fdopen", lambda fd, mode: _FailingFile(fd))
    with pytest.raises(OSError, match="No space left"):
        tokentable.write_atomic(str(path), b"new content")
    assert path.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["tokens.json"]


def test_write_atomic_interrupted_by_keyboard_interrupt_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "tokens.json"
    path.write_bytes(b"old")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokentable.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tokentable.write_atomic(str(path), b"new")
    assert os.listdir(tmp_path) == ["tokens.json"]
    assert path.read_bytes() == b"old"


def test_write_atomic_into_unwritable_place_raises_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    with pytest.raises(OSError):
        tokentable.write_atomic(str(blocker / "tokens.json"), b"x")
    assert os.listdir(tmp_path) == ["not-a-dir"]


class _FailingFile:
    """Stands in for os.fdopen's file object: owns the fd and fails on write."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)

    def write(self, data):
        raise OSError(28, "No space left on device")


def test_read_missing_file_is_a_table_format_error(tmp_path):
    with pytest.raises(TableFormatError, match="cannot read"):
        tokentable.read(str(tmp_path / "missing.json"))


def test_remove_stale_temp_files_removes_only_this_tables_temps(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_bytes(b"keep")
    stale = [tmp_path / ".tokens.json.abc123.tmp", tmp_path / ".tokens.json.x_y.tmp"]
    keep = [
        tmp_path / ".other.json.abc.tmp",
        tmp_path / "tokens.json.tmp",
        tmp_path / ".tokens.json.abc",
        tmp_path / "notes.txt",
    ]
    for file in stale + keep:
        file.write_bytes(b"partial")
    removed = tokentable.remove_stale_temp_files(str(path))
    assert sorted(removed) == sorted(str(f) for f in stale)
    assert sorted(os.listdir(tmp_path)) == sorted(f.name for f in [*keep, path])
    assert tokentable.remove_stale_temp_files(str(path)) == []


def test_remove_stale_temp_files_handles_glob_characters_in_the_name(tmp_path):
    path = tmp_path / "tok[1]*.json"
    stale = tmp_path / ".tok[1]*.json.zz.tmp"
    other = tmp_path / ".tok1x.json.zz.tmp"
    stale.write_bytes(b"")
    other.write_bytes(b"")
    assert tokentable.remove_stale_temp_files(str(path)) == [str(stale)]
    assert other.exists()


def test_a_real_temp_file_name_is_matched_by_remove_stale_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "tokens.json"
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(src)
        os.link(src, src + ".keep")  # keep a copy of the temp file under its own name
        real_replace(src, dst)

    monkeypatch.setattr(tokentable.os, "replace", spy)
    tokentable.write_atomic(str(path), b"x")
    monkeypatch.undo()
    os.rename(seen[0] + ".keep", seen[0])  # as if the writer had been killed before the replace
    assert tokentable.remove_stale_temp_files(str(path)) == [seen[0]]


def test_utc_now_iso_format():
    value = tokentable.utc_now_iso()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", value)
    moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.UTC) - moment).total_seconds()) < 5
