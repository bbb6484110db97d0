"""The syncer, run for real: ``python -m syncer`` subprocesses against the fake backend on 127.0.0.1.

A few pure functions (config parsing, backoff, URL handling, row selection) are also tested
in-process; everything that touches a socket or a signal runs the real process.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import signal
import stat
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from common import tokentable
from common.envparse import DEFAULT_TOKEN_FILE, REPO_DIR, ConfigError
from syncer.__main__ import next_delay
from syncer.backend import endpoint, safe_url
from syncer.config import SyncerConfig
from syncer.sync import select_active
from tests.fakes.backend import FakeBackendControl, generated_token
from tests.support.procs import PYTHON, REPO, Process, free_port, wait_for

LIST_PATH = "/api/tokens/with-model"
LOGIN_PATH = "/api/auth/login"
BEARER = "admin-bearer-7f3c9a1e5d2b8c4f"
USERNAME = "sync-admin"
PASSWORD = "pa55word-s3cret-Zq9"
# Full-length forms of every credential the fakes hand out: none may appear in a syncer log.
# (A masked secret keeps a few characters at each end, so only whole ones are matched.)
SECRET_SHAPES = re.compile(
    r"sk-fakeclient-\w+-\d{6}-[0-9a-f]{16}"
    r"|sk-fakeupstream-\w+-\d+-[0-9a-f]{16}"
    r"|eyJ[\w-]+\.[\w-]+\.[0-9a-f]{16}"
    r"|sk-test-(?:client|upstream)-\d{4}-[a-z]{8}"
)


def row(i: int, **overrides) -> dict:
    """A backend row with a token and key shaped like SECRET_SHAPES."""
    value = {
        "token_id": i,
        "token": f"sk-test-client-{i:04d}-abcdefgh",
        "token_status": 1,
        "token_expire_at": None,
        "token_usage_limit": 100,
        "ai_model_id": 10 + i % 2,
        "ai_model_name": f"model-{i % 2}",
        "ai_model_api_url": f"https://upstream-{i % 2}.example/v1",
        "ai_model_api_key": f"sk-test-upstream-{i % 2:04d}-qrstuvwx",
        "ai_model_status": 1,
        "created_at": "2025-01-01T00:00:00Z",
    }
    value.update(overrides)
    return value


# ---------------------------------------------------------------------------- harness


@dataclass
class Finished:
    """A syncer run that has exited."""

    rc: int
    elapsed: float
    records: list[dict]
    stderr: list[str]  # lines that are not JSON: what the syncer printed to stderr

    def sync_line(self) -> dict:
        lines = [r for r in self.records if r.get("message") == "sync"]
        assert len(lines) == 1, self.records
        return lines[0]


class Harness:
    """Starts syncer processes with TOKEN_FILE in tmp_path and SERVER_API_URL at the fake."""

    def __init__(self, tmp_path: Path, backend: FakeBackendControl) -> None:
        self.tmp_path = tmp_path
        self.backend = backend
        self.token_file = tmp_path / "var" / "tokens.json"
        self.procs: list[Process] = []
        self._serial = itertools.count(1)

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "ENABLE_TOKEN_ROUTING": "true",
            "SERVER_API_URL": self.backend.url,
            "SERVER_API_TOKEN": "",
            "SERVER_API_USERNAME": "",
            "SERVER_API_PASSWORD": "",
            "SYNC_INTERVAL": "10",
            "SYNC_TIMEOUT": "10",
            "SYNC_RETRY_BASE": "5",
            "SYNC_ALLOW_EMPTY": "false",
            "TOKEN_FILE": str(self.token_file),
            "LOG_LEVEL": "info",
        }
        env.update(extra)
        return env

    def start(self, *args: str, **env: str) -> Process:
        log = self.tmp_path / f"syncer-{next(self._serial)}.log"
        proc = Process([PYTHON, "-m", "syncer", *args], self.env(**env), log)
        self.procs.append(proc)
        return proc

    def once(self, timeout: float = 60, **env: str) -> Finished:
        started = time.monotonic()
        proc = self.start("--once", **env)
        rc = proc.wait(timeout)
        elapsed = time.monotonic() - started
        result = finished(proc, rc, elapsed)  # before stop(): Process.output() needs the open log
        proc.stop()
        return result

    def temp_files(self) -> list[str]:
        directory = self.token_file.parent
        return sorted(n for n in os.listdir(directory) if n.startswith(".")) if directory.exists() else []

    def file_bytes(self) -> bytes:
        return self.token_file.read_bytes()

    def table(self) -> tokentable.TokenTable:
        table, _ = tokentable.read(str(self.token_file))
        return table

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()


def finished(proc: Process, rc: int, elapsed: float) -> Finished:
    lines = [line for line in proc.output().splitlines() if line.strip()]
    stderr = [line for line in lines if not line.startswith("{")]
    return Finished(rc=rc, elapsed=elapsed, records=proc.json_lines(), stderr=stderr)


def sync_lines(proc: Process) -> list[dict]:
    return [r for r in proc.json_lines() if r.get("message") == "sync"]


def stop_timed(proc: Process, signum: int = signal.SIGTERM) -> tuple[int, float]:
    started = time.monotonic()
    proc.signal(signum)
    rc = proc.wait(10)
    return rc, time.monotonic() - started


@pytest.fixture
def harness(tmp_path, backend):
    harness = Harness(tmp_path, backend)
    yield harness
    harness.close()
    # No credential in clear in anything any syncer process printed during the test.
    jwts = [c["authorization"].split()[-1] for c in backend.calls(None) if c.get("authorization")]
    for log in sorted(tmp_path.glob("syncer-*.log")):
        text = log.read_text(errors="replace")
        for secret in [BEARER, PASSWORD, *jwts]:
            assert secret not in text, f"{secret[:6]}... in {log.name}"
        found = SECRET_SHAPES.search(text)
        assert found is None, f"credential {found.group()[:12]}... in {log.name}"


def write_initial_table(harness: Harness, rows: list[dict]) -> bytes:
    """Make the file through a successful sync; return its bytes."""
    harness.backend.set(rows=rows, mode="ok")
    result = harness.once()
    assert result.rc == 0, result
    return harness.file_bytes()


# ---------------------------------------------------------------------------- success


def test_success_writes_only_active_rows_with_mode_0600(harness):
    rows = [
        row(1),
        row(2, token_status=0),
        row(3, ai_model_status=0),
        row(4, token_status="1"),  # not the integer 1: not active
        row(5, token_expire_at="2099-12-31T23:59:59Z", extra_field={"nested": True}),
        row(6, token_expire_at=1893456000),
    ]
    harness.backend.set(rows=rows)
    started = time.time()
    result = harness.once()
    assert result.rc == 0, result
    assert result.stderr == []
    mode = stat.S_IMODE(os.stat(harness.token_file).st_mode)
    assert mode == 0o600
    table = harness.table()
    assert sorted(table.tokens) == [row(i)["token"] for i in (1, 5, 6)]
    assert table.tokens[row(5)["token"]].to_json() == {
        "ai_model_api_key": "sk-test-upstream-0001-qrstuvwx",
        "ai_model_api_url": "https://upstream-1.example/v1",
        "ai_model_id": 11,
        "ai_model_name": "model-1",
        "token_expire_at": "2099-12-31T23:59:59Z",
        "token_id": 5,
    }
    assert table.tokens[row(6)["token"]].token_expire_at == 1893456000
    assert table.source == harness.backend.url + LIST_PATH
    generated = time.mktime(time.strptime(table.generated_at, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert started - 2 <= generated <= time.time() + 1
    assert harness.file_bytes() == tokentable.serialize(table)  # the canonical format, byte for byte
    assert harness.temp_files() == []
    line = result.sync_line()
    assert line["level"] == "INFO"
    assert line["service"] == "syncer"
    assert line["outcome"] == "ok"
    assert (line["rows_received"], line["active"], line["skipped"], line["duplicates"]) == (6, 3, 0, 0)
    assert line["tokens_written"] == 3
    assert line["file"] == str(harness.token_file)
    assert isinstance(line["duration_ms"], float)
    assert "error" not in line


def test_the_per_token_limit_fields_are_carried_into_the_file(harness):
    rows = [
        row(1, token_max_concurrency=1, token_rpm=60, token_tpm=5000),
        row(2, token_max_concurrency=None),  # null: the deployment's default
        row(3),  # absent: the default too
        row(4, token_rpm=0),  # 0: unlimited for this token
        row(5, token_max_concurrency=-2),  # invalid: the row is skipped like any bad field
        row(6, token_rpm="10"),
        row(7, token_tpm=1.5),
    ]
    harness.backend.set(rows=rows)
    result = harness.once()
    assert result.rc == 0, result
    table = harness.table()
    assert sorted(table.tokens) == [row(i)["token"] for i in (1, 2, 3, 4)]
    limits = {t: (r.token_max_concurrency, r.token_rpm, r.token_tpm) for t, r in table.tokens.items()}
    assert limits[row(1)["token"]] == (1, 60, 5000)
    assert limits[row(2)["token"]] == (None, None, None)
    assert limits[row(3)["token"]] == (None, None, None)
    assert limits[row(4)["token"]] == (None, 0, None)
    document = json.loads(harness.file_bytes())
    assert document["format"] == 1
    assert document["tokens"][row(1)["token"]]["token_max_concurrency"] == 1
    assert "token_max_concurrency" not in document["tokens"][row(2)["token"]]
    assert "token_rpm" not in document["tokens"][row(3)["token"]]
    assert document["tokens"][row(1)["token"]]["token_tpm"] == 5000
    assert "token_tpm" not in document["tokens"][row(3)["token"]]
    line = result.sync_line()
    assert (line["active"], line["skipped"], line["tokens_written"]) == (7, 3, 4)
    assert any("token_max_concurrency -2" in example for example in line["skipped_examples"])


def test_each_success_rewrites_the_file(harness):
    harness.backend.set(rows=[row(1)])
    assert harness.once().rc == 0
    first = os.stat(harness.token_file)
    assert harness.once().rc == 0
    second = os.stat(harness.token_file)
    assert (second.st_ino, second.st_mtime_ns) != (first.st_ino, first.st_mtime_ns)


def test_skipped_and_duplicate_rows_are_counted_in_the_log_line(harness):
    rows = [
        row(1),
        row(2, token=None),
        row(3, ai_model_api_url="ftp://files.example/x"),
        row(4, ai_model_api_url="https://"),
        row(5, ai_model_api_key=""),
        row(6, ai_model_api_key=None),
        row(7, token_expire_at="next tuesday"),
        row(8, token="has space-abcdefghijkl"),
        "not an object",
        row(9, token_status=0, ai_model_api_url="bad"),  # inactive: neither kept nor counted
        row(10),
        row(10, ai_model_name="second"),
        row(10, ai_model_name="last wins"),
        row(11),
        row(11, ai_model_api_key=""),  # a bad duplicate does not replace the good row
    ]
    harness.backend.set(rows=rows)
    result = harness.once()
    assert result.rc == 0, result
    line = result.sync_line()
    assert line["rows_received"] == 15
    assert line["active"] == 13
    assert line["skipped"] == 9
    assert line["duplicates"] == 2
    assert line["tokens_written"] == 3
    assert len(line["skipped_examples"]) == 3
    assert "token is missing" in line["skipped_examples"][0]
    table = harness.table()
    assert sorted(table.tokens) == [row(i)["token"] for i in (1, 10, 11)]
    assert table.tokens[row(10)["token"]].ai_model_name == "last wins"
    assert table.tokens[row(11)["token"]].ai_model_api_key == row(11)["ai_model_api_key"]


def test_gzip_encoded_reply_is_decoded(harness):
    harness.backend.set(rows=[row(1), row(2)], gzip=True)
    result = harness.once()
    assert result.rc == 0, result
    assert sorted(harness.table().tokens) == [row(1)["token"], row(2)["token"]]


def test_stale_temp_files_are_removed_at_start(harness):
    harness.token_file.parent.mkdir(parents=True)
    for name in (".tokens.json.k1ll3d.tmp", ".tokens.json.0ther.tmp"):
        (harness.token_file.parent / name).write_bytes(b'{"format": 1, "tok')
    (harness.token_file.parent / "unrelated.txt").write_bytes(b"keep")
    harness.backend.set(rows=[row(1)])
    result = harness.once()
    assert result.rc == 0
    assert harness.temp_files() == []
    assert (harness.token_file.parent / "unrelated.txt").exists()
    removed = [r for r in result.records if r["message"] == "removed stale temp files"]
    assert removed and removed[0]["count"] == 2


# ---------------------------------------------------------------------------- failures


FAILURES = {
    # name: (state for the fake, extra env, expected fragment of the reason)
    "http500": ({"mode": "http500"}, {}, "HTTP 500"),
    "garbage": ({"mode": "garbage"}, {}, "not a JSON object"),
    "truncated": ({"mode": "truncated"}, {}, "IncompleteRead"),
    "code_nonzero": ({"mode": "code_nonzero"}, {"SERVER_API_TOKEN": BEARER}, "code 500"),
    "code_nonzero_login": (
        {"mode": "code_nonzero", "username": USERNAME, "password": PASSWORD},
        {"SERVER_API_USERNAME": USERNAME, "SERVER_API_PASSWORD": PASSWORD},
        "code 500",
    ),
    "data_not_list": ({"mode": "data_not_list"}, {}, "not a list"),
    "empty_guard": ({"mode": "empty"}, {}, "no active tokens"),
    "all_inactive_guard": (
        {"rows": [row(1, token_status=0), row(2, ai_model_status=2)]},
        {},
        "no active tokens",
    ),
    "hang_timeout": ({"mode": "hang", "hang_seconds": 30}, {"SYNC_TIMEOUT": "1"}, "timed out after 1s"),
    # Bytes keep coming, each read is quick: only a total deadline stops this one.
    "drip_timeout": ({"mode": "drip", "drip_interval": 0.1}, {"SYNC_TIMEOUT": "1"}, "timed out after 1s"),
    "connection_refused": ({}, {"SERVER_API_URL": "closed-port"}, "Connection refused"),
    "unauthorized": ({"bearer": BEARER}, {}, "HTTP 401"),
    "wrong_bearer": ({"bearer": BEARER}, {"SERVER_API_TOKEN": "wrong-bearer-value-123"}, "HTTP 401"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_failed_sync_leaves_the_file_byte_identical(harness, case):
    state, env, reason = FAILURES[case]
    before = write_initial_table(harness, [row(1), row(2), row(3)])
    stat_before = os.stat(harness.token_file)
    harness.backend.set(**state)
    if env.get("SERVER_API_URL") == "closed-port":
        env = {**env, "SERVER_API_URL": f"http://127.0.0.1:{free_port()}"}
    result = harness.once(**env)
    assert result.rc == 1
    assert len(result.stderr) == 1, result.stderr
    assert result.stderr[0].startswith("syncer: sync failed: ")
    assert reason in result.stderr[0]
    assert harness.file_bytes() == before
    stat_after = os.stat(harness.token_file)
    assert (stat_after.st_ino, stat_after.st_mtime_ns) == (stat_before.st_ino, stat_before.st_mtime_ns)
    assert harness.temp_files() == []
    line = result.sync_line()
    assert line["outcome"] == "failed"
    assert line["level"] == "ERROR"
    assert reason in line["error"]
    assert line["tokens_written"] == 0
    if case in ("hang_timeout", "drip_timeout"):
        assert 1.0 <= result.elapsed < 4.0
    if case.startswith("code_nonzero"):  # the backend echoed the bearer; the syncer masked it
        assert "permission denied for Bearer" in line["error"]


def test_empty_result_allowed_with_sync_allow_empty(harness):
    write_initial_table(harness, [row(1), row(2)])
    harness.backend.set(mode="empty")
    result = harness.once(SYNC_ALLOW_EMPTY="true")
    assert result.rc == 0, result
    assert harness.table().tokens == {}
    assert result.sync_line()["tokens_written"] == 0


def test_empty_result_is_written_when_there_is_no_file_yet(harness):
    harness.backend.set(mode="empty")
    result = harness.once()
    assert result.rc == 0, result
    assert harness.table().tokens == {}


def test_empty_result_replaces_a_corrupt_file(harness):
    harness.token_file.parent.mkdir(parents=True)
    harness.token_file.write_bytes(b"{not json")
    harness.backend.set(mode="empty")
    assert harness.once().rc == 0
    assert harness.table().tokens == {}


# ---------------------------------------------------------------------------- authentication


def test_bearer_token_and_accept_header_are_sent(harness):
    harness.backend.set(bearer=BEARER, rows=[row(1)])
    result = harness.once(SERVER_API_TOKEN=BEARER)
    assert result.rc == 0, result
    calls = harness.backend.calls(None)
    assert [(c["method"], c["path"]) for c in calls] == [("GET", LIST_PATH)]
    assert calls[0]["authorization"] == f"Bearer {BEARER}"
    assert calls[0]["accept"] == "application/json"


def test_no_authorization_header_without_a_token(harness):
    harness.backend.set(rows=[row(1)])
    assert harness.once().rc == 0
    assert harness.backend.calls()[0]["authorization"] is None


def test_login_flow_uses_the_jwt_as_bearer(harness):
    harness.backend.set(username=USERNAME, password=PASSWORD, rows=[row(1)])
    result = harness.once(SERVER_API_USERNAME=USERNAME, SERVER_API_PASSWORD=PASSWORD)
    assert result.rc == 0, result
    calls = harness.backend.calls(None)
    assert [(c["method"], c["path"], c["status"]) for c in calls] == [
        ("POST", LOGIN_PATH, 200),
        ("GET", LIST_PATH, 200),
    ]
    assert calls[1]["authorization"].startswith("Bearer eyJ")
    assert harness.table().tokens.keys() == {row(1)["token"]}


def test_wrong_password_fails_the_sync(harness):
    before = write_initial_table(harness, [row(1)])
    harness.backend.set(username=USERNAME, password=PASSWORD)
    result = harness.once(SERVER_API_USERNAME=USERNAME, SERVER_API_PASSWORD="not-the-pa55word-0")
    assert result.rc == 1
    assert "login: HTTP 401" in result.stderr[0]
    assert harness.file_bytes() == before
    assert [c["path"] for c in harness.backend.calls(None)][-1] == LOGIN_PATH


def test_expired_jwt_logs_in_again_once_and_retries(harness):
    harness.backend.set(username=USERNAME, password=PASSWORD, jwt_uses=1, rows=[row(1)])
    proc = harness.start(SERVER_API_USERNAME=USERNAME, SERVER_API_PASSWORD=PASSWORD)
    proc.wait_for_log(lambda r: r.get("message") == "sync", what="the first sync")
    proc.signal(signal.SIGHUP)  # the JWT is used up: this sync gets a 401 first
    wait_for(lambda: len(sync_lines(proc)) >= 2, what="the second sync")
    assert [line["outcome"] for line in sync_lines(proc)] == ["ok", "ok"]
    calls = harness.backend.calls(None)
    assert [(c["path"], c["status"]) for c in calls] == [
        (LOGIN_PATH, 200),
        (LIST_PATH, 200),
        (LIST_PATH, 401),
        (LOGIN_PATH, 200),
        (LIST_PATH, 200),
    ]
    assert calls[1]["authorization"] == calls[2]["authorization"]
    assert calls[4]["authorization"] != calls[2]["authorization"]
    rc, _ = stop_timed(proc)
    assert rc == 0


def test_relogin_is_tried_only_once(harness):
    before = write_initial_table(harness, [row(1)])
    harness.backend.clear_calls()
    harness.backend.set(username=USERNAME, password=PASSWORD, jwt_uses=-1)  # every JWT refused
    result = harness.once(SERVER_API_USERNAME=USERNAME, SERVER_API_PASSWORD=PASSWORD)
    assert result.rc == 1
    assert "HTTP 401" in result.stderr[0]
    assert [(c["path"], c["status"]) for c in harness.backend.calls(None)] == [
        (LOGIN_PATH, 200),
        (LIST_PATH, 401),
        (LOGIN_PATH, 200),
        (LIST_PATH, 401),
    ]
    assert harness.file_bytes() == before


# ---------------------------------------------------------------------------- schedule and signals


def test_sighup_triggers_a_sync(harness):
    harness.backend.set(rows=[row(1)])
    proc = harness.start()  # interval 10 minutes: no sync but the first without a signal
    proc.wait_for_log(lambda r: r.get("message") == "sync", what="the first sync")
    time.sleep(0.3)
    assert len(harness.backend.calls()) == 1
    for expected in (2, 3):
        proc.signal(signal.SIGHUP)
        wait_for(lambda n=expected: len(sync_lines(proc)) >= n, what=f"sync {expected}")
        assert len(harness.backend.calls()) == expected
    assert [line["trigger"] for line in sync_lines(proc)] == ["start", "signal", "signal"]
    assert proc.alive()
    rc, elapsed = stop_timed(proc)
    assert rc == 0
    assert elapsed < 1.0


def test_backoff_after_failures_then_interval_after_success(harness):
    harness.backend.set(rows=[row(1)], mode="http500")
    # Interval 0.02 min = 1.2 s; retries after 0.2, 0.4, 0.8 s, then capped at the interval.
    proc = harness.start(SYNC_INTERVAL="0.02", SYNC_RETRY_BASE="0.2")
    wait_for(lambda: len(harness.backend.calls()) >= 5, timeout=15, what="five failed calls")
    harness.backend.set(mode="ok")
    wait_for(lambda: len(harness.backend.calls()) >= 7, timeout=15, what="two good calls")
    harness.backend.set(mode="http500")
    wait_for(lambda: len(sync_lines(proc)) >= 9, timeout=15, what="nine syncs")
    lines = sync_lines(proc)[:9]
    assert [line["outcome"] for line in lines] == ["failed"] * 5 + ["ok"] * 2 + ["failed"] * 2
    assert [line["next_sync_s"] for line in lines] == [0.2, 0.4, 0.8, 1.2, 1.2, 1.2, 1.2, 0.2, 0.4]
    assert [line["trigger"] for line in lines] == ["start"] + ["retry"] * 5 + ["interval"] * 2 + ["retry"]
    times = [call["time"] for call in harness.backend.calls()[:9]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for gap, expected in zip(gaps, [0.2, 0.4, 0.8, 1.2, 1.2, 1.2, 1.2, 0.2], strict=True):
        assert expected - 0.02 <= gap <= expected + 0.6, (gaps, expected)


def test_interval_accepts_decimal_minutes(harness):
    harness.backend.set(rows=[row(1)])
    proc = harness.start(SYNC_INTERVAL="0.005")  # 0.3 s
    wait_for(lambda: len(sync_lines(proc)) >= 4, timeout=10, what="four syncs")
    assert {line["outcome"] for line in sync_lines(proc)} == {"ok"}
    assert stop_timed(proc)[0] == 0


def test_sigterm_when_idle_exits_0_within_a_second(harness):
    harness.backend.set(rows=[row(1)])
    proc = harness.start()
    proc.wait_for_log(lambda r: r.get("message") == "sync", what="the first sync")
    rc, elapsed = stop_timed(proc)
    assert rc == 0
    assert elapsed < 1.0
    assert harness.temp_files() == []
    assert any(r["message"] == "stopping" and r["signal"] == "SIGTERM" for r in proc.json_lines())


def test_sigint_exits_0_too(harness):
    harness.backend.set(rows=[row(1)])
    proc = harness.start()
    proc.wait_for_log(lambda r: r.get("message") == "sync", what="the first sync")
    rc, elapsed = stop_timed(proc, signal.SIGINT)
    assert (rc, elapsed < 1.0) == (0, True)


def test_sigterm_during_a_hung_fetch_exits_0_within_a_second(harness):
    before = write_initial_table(harness, [row(1)])
    harness.backend.set(mode="hang", hang_seconds=30)
    proc = harness.start(SYNC_TIMEOUT="30")
    wait_for(lambda: any(c["status"] == 0 for c in harness.backend.calls()), what="the hung call")
    rc, elapsed = stop_timed(proc)
    assert rc == 0
    assert elapsed < 1.0
    assert harness.file_bytes() == before
    assert harness.temp_files() == []


def test_sigterm_during_once_exits_1_within_a_second(harness):
    before = write_initial_table(harness, [row(1)])
    harness.backend.set(mode="hang", hang_seconds=30)
    proc = harness.start("--once", SYNC_TIMEOUT="30")
    wait_for(lambda: any(c["status"] == 0 for c in harness.backend.calls()), what="the hung call")
    rc, elapsed = stop_timed(proc)
    assert (rc, elapsed < 1.0) == (1, True)
    assert finished(proc, rc, elapsed).stderr == ["syncer: interrupted by SIGTERM"]
    assert harness.file_bytes() == before
    assert harness.temp_files() == []


def test_sigterm_during_big_writes_exits_0_within_a_second_without_temp_files(harness):
    harness.backend.set(generate={"count": 50_000, "version": "term"})
    expected = {generated_token("term", i) for i in range(50_000)}
    rng = random.Random(7)
    for attempt in range(6):
        proc = harness.start(SYNC_INTERVAL="0.0001")  # back-to-back syncs of the 50,000 rows
        if attempt % 2:
            # Aim at the write itself: signal as soon as a temp file exists.
            wait_for(harness.temp_files, timeout=30, interval=0.001, what="a temp file")
        else:
            proc.wait_for_log(lambda r: r.get("message") == "sync", timeout=30, what="a sync")
            time.sleep(rng.uniform(0, 0.8))
        rc, elapsed = stop_timed(proc)
        assert rc == 0
        assert elapsed < 1.0, elapsed
        assert harness.temp_files() == []
        assert set(harness.table().tokens) == expected


def test_disabled_routing_idles_and_logs_once(harness):
    harness.backend.set(rows=[row(1)])
    proc = harness.start(ENABLE_TOKEN_ROUTING="false", SYNC_INTERVAL="0.001")
    proc.wait_for_log(lambda r: "disabled" in r.get("message", ""), what="the disabled line")
    proc.signal(signal.SIGHUP)
    time.sleep(0.5)
    assert proc.alive()
    assert harness.backend.calls(None) == []
    assert not harness.token_file.exists()
    assert [r["message"] for r in proc.json_lines()].count(
        "token routing disabled (ENABLE_TOKEN_ROUTING=false): nothing to sync"
    ) == 1
    assert not any(r.get("message") == "sync" for r in proc.json_lines())
    rc, elapsed = stop_timed(proc)
    assert rc == 0
    assert elapsed < 1.0


def test_disabled_routing_once_exits_0_without_calls(harness):
    result = harness.once(ENABLE_TOKEN_ROUTING="false")
    assert result.rc == 0
    assert harness.backend.calls(None) == []


# ---------------------------------------------------------------------------- kill -9


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill_9_while_writing_never_leaves_a_partial_or_missing_file(harness):
    count = 50_000
    versions = ("kill-a", "kill-b")
    expected = {v: {generated_token(v, i) for i in range(count)} for v in versions}
    for version in versions:  # let the fake build and cache both bodies before the timing starts
        harness.backend.set(generate={"count": count, "version": version})
        assert harness.once().rc == 0

    # Calibrate: how long a run takes, and when its temp file exists.
    harness.backend.set(generate={"count": count, "version": versions[0]})
    started = time.monotonic()
    proc = harness.start("--once")
    seen_at = []
    while proc.alive():
        if harness.temp_files():
            seen_at.append(time.monotonic() - started)
        time.sleep(0.001)
    run_time = time.monotonic() - started
    proc.stop()
    assert seen_at, "the calibration run never showed a temp file"
    write_window = max(seen_at[-1] - seen_at[0], 0.005)
    current = harness.file_bytes()
    assert set(harness.table().tokens) == expected[versions[0]]

    rng = random.Random(20240611)
    outcomes = {"old": 0, "new": 0}
    killed_mid_write = 0
    for attempt in range(50):
        version = versions[(attempt + 1) % 2]
        harness.backend.set(generate={"count": count, "version": version})
        temps_before = set(harness.temp_files())
        proc = harness.start("--once")
        if attempt % 2:
            # Spread over the whole run (fetch, validation, serialization, the write) and past
            # its end, so some runs finish and the next kill has a new table to replace.
            time.sleep(rng.uniform(0.2 * run_time, 1.25 * run_time))
        else:
            # Aim at the write: once the temp file appears, somewhere inside its lifetime.
            # (A temp file left by the previous kill does not count: this run's own must appear.)
            # Polling starts late, so it does not take the CPU the syncer needs on 2 cores.
            time.sleep(0.4 * run_time)
            wait_for(
                lambda p=proc, old=temps_before: set(harness.temp_files()) - old or not p.alive(),
                timeout=30,
                interval=0.001,
            )
            time.sleep(rng.uniform(0, write_window))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stop()
        if set(harness.temp_files()) - temps_before:
            killed_mid_write += 1
        data = harness.file_bytes()
        if data == current:  # the old table, byte for byte (it was read and checked before)
            outcomes["old"] += 1
        else:
            table, _ = tokentable.read(str(harness.token_file))  # never torn: a whole, valid table
            assert set(table.tokens) == expected[version]
            outcomes["new"] += 1
            current = data

    print(f"kill -9: {outcomes}, {killed_mid_write} mid-write, run {run_time:.2f}s, temp {write_window:.3f}s")
    assert outcomes["old"] > 0 and outcomes["new"] > 0, outcomes
    assert killed_mid_write >= 5, f"only {killed_mid_write} kills landed while a temp file existed"
    # The next start removes what the killed runs left behind.
    stale_before = len(harness.temp_files())
    result = harness.once()
    assert result.rc == 0
    assert harness.temp_files() == []
    if stale_before:
        removed = [r for r in result.records if r["message"] == "removed stale temp files"]
        assert removed and removed[0]["count"] == stale_before


# ---------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SYNC_INTERVAL", "abc"),
        ("SYNC_INTERVAL", "0"),
        ("SYNC_INTERVAL", "-1"),
        ("SYNC_INTERVAL", "nan"),
        ("SYNC_TIMEOUT", "0"),
        ("SYNC_RETRY_BASE", "soon"),
        ("SERVER_API_URL", "ftp://backend"),
        ("ENABLE_TOKEN_ROUTING", "maybe"),
        ("SYNC_ALLOW_EMPTY", "2"),
        ("LOG_LEVEL", "loud"),
    ],
)
def test_bad_config_exits_2_naming_the_variable(harness, name, value):
    result = harness.once(**{name: value})
    assert result.rc == 2
    assert result.records == []
    assert len(result.stderr) == 1, result.stderr
    assert name in result.stderr[0]
    assert repr(value) in result.stderr[0]
    assert harness.backend.calls(None) == []


def test_username_without_password_is_a_config_error(harness):
    result = harness.once(SERVER_API_USERNAME=USERNAME)
    assert result.rc == 2
    assert "SERVER_API_USERNAME" in result.stderr[0]


def test_password_without_username_is_a_config_error_that_hides_the_password(harness):
    result = harness.once(SERVER_API_PASSWORD=PASSWORD)
    assert result.rc == 2
    assert "SERVER_API_PASSWORD" in result.stderr[0]
    assert PASSWORD not in result.stderr[0]


def test_config_defaults():
    config = SyncerConfig.from_env({})
    assert config.enable_token_routing is True
    assert config.server_api_url == "http://localhost:6808"
    assert (config.server_api_token, config.server_api_username, config.server_api_password) == ("", "", "")
    assert config.sync_interval_minutes == 10
    assert config.interval_seconds == 600
    assert (config.sync_timeout, config.sync_retry_base) == (30, 5)
    assert config.sync_allow_empty is False
    assert config.token_file == DEFAULT_TOKEN_FILE == os.path.join(REPO_DIR, "var", "tokens.json")
    assert str(REPO) == REPO_DIR
    assert config.log_level == "info"
    assert config.login_mode is False


def test_config_values_and_relative_token_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = SyncerConfig.from_env(
        {
            "ENABLE_TOKEN_ROUTING": "false",
            "SERVER_API_URL": "https://user:urlpass@backend.example:8443/base/",
            "SERVER_API_TOKEN": " tok ",
            "SERVER_API_USERNAME": "admin",
            "SERVER_API_PASSWORD": " spaced pass ",
            "SYNC_INTERVAL": "0.05",
            "SYNC_TIMEOUT": "2.5",
            "SYNC_RETRY_BASE": "0.2",
            "SYNC_ALLOW_EMPTY": "yes",
            "TOKEN_FILE": "data/t.json",
            "LOG_LEVEL": "WARNING",
        }
    )
    assert config.enable_token_routing is False
    assert config.server_api_url == "https://user:urlpass@backend.example:8443/base"
    assert config.server_api_token == "tok"
    assert config.server_api_password == " spaced pass "  # a password is taken verbatim
    assert config.interval_seconds == pytest.approx(3.0)
    assert (config.sync_timeout, config.sync_retry_base, config.sync_allow_empty) == (2.5, 0.2, True)
    assert config.token_file == str(tmp_path / "data" / "t.json")
    assert config.log_level == "warn"
    assert config.login_mode is True
    assert set(config.secrets()) == {"tok", " spaced pass ", "urlpass"}
    with pytest.raises(AttributeError):
        config.sync_timeout = 1  # frozen


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"SYNC_INTERVAL": "abc"}, "SYNC_INTERVAL"),
        ({"SYNC_INTERVAL": "inf"}, "SYNC_INTERVAL"),
        ({"SYNC_TIMEOUT": "-3"}, "SYNC_TIMEOUT"),
        ({"SYNC_RETRY_BASE": "0"}, "SYNC_RETRY_BASE"),
        ({"SERVER_API_URL": "localhost:6808"}, "SERVER_API_URL"),
        ({"SERVER_API_URL": "http://host:notaport"}, "SERVER_API_URL"),
        ({"SERVER_API_USERNAME": "a"}, "SERVER_API_USERNAME"),
        ({"SERVER_API_PASSWORD": "b"}, "SERVER_API_PASSWORD"),
        ({"LOG_LEVEL": "trace"}, "LOG_LEVEL"),
    ],
)
def test_config_errors_name_the_variable(env, name):
    with pytest.raises(ConfigError) as caught:
        SyncerConfig.from_env(env)
    assert caught.value.name == name
    assert str(caught.value).startswith(f"{name}=")


def test_backoff_doubles_from_the_base_and_is_capped_at_the_interval():
    config = SyncerConfig.from_env({"SYNC_INTERVAL": "1", "SYNC_RETRY_BASE": "5"})
    assert [next_delay(config, n) for n in range(7)] == [60, 5, 10, 20, 40, 60, 60]
    assert next_delay(config, 10_000) == 60  # no overflow after a long outage


def test_endpoint_and_safe_url():
    assert endpoint("http://b:1/base", LIST_PATH) == "http://b:1/base/api/tokens/with-model"
    assert endpoint("http://b:1/?k=v#f", LOGIN_PATH) == "http://b:1/api/auth/login?k=v"
    assert (
        safe_url("https://user:pw@b.example:8443/api/x?token=secret#frag") == "https://b.example:8443/api/x"
    )
    assert safe_url("http://[::1]:9/p") == "http://[::1]:9/p"


def test_select_active_rules():
    rows = [row(1), row(2, token_status=True), row(3, ai_model_status=1.0), row(4, token="")]
    selection = select_active(rows)
    assert list(selection.tokens) == [row(1)["token"]]
    assert (selection.rows_received, selection.active, selection.skipped) == (4, 2, 1)


def test_fake_backend_control_api_round_trip(backend):
    state = backend.set(rows=[row(1), row(2)], mode="garbage", delay=0)
    assert (state["rows"], state["mode"]) == (2, "garbage")
    backend.reset()
    assert backend.state()["rows"] == 0
    assert backend.calls() == []
    with urllib.request.urlopen(backend.url + LIST_PATH, timeout=5) as response:
        body = json.loads(response.read())
    assert body == {"code": 0, "message": "success", "data": []}
