"""The syncer against an HTTPS backend with a private CA (issue 10): SERVER_API_CA_BUNDLE.

``python -m syncer --once`` runs for real against the fake backend serving TLS on 127.0.0.1 with a
certificate from the session's test CA. Without the setting the syncer trusts certifi's bundle only,
so the sync fails, and the table file stays as it was.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import certifi
import pytest

from common import tokentable
from tests.fakes.backend import FakeBackendControl
from tests.support.procs import PYTHON, Process, free_port, port_open, wait_for

BACKEND_ROWS = [
    {
        "token_id": i,
        "token": f"sk-tls-sync-client-{i:04d}-abcdefgh",
        "token_status": 1,
        "token_expire_at": None,
        "token_usage_limit": 0,
        "ai_model_id": 3,
        "ai_model_name": "TlsSyncModel",
        "ai_model_api_url": "https://upstream.example/v1",
        "ai_model_api_key": f"sk-tls-sync-upstream-{i:04d}-qrstuvwx",
        "ai_model_status": 1,
        "created_at": "2025-01-01T00:00:00Z",
    }
    for i in (1, 2)
]


@pytest.fixture(scope="module")
def https_backend(tmp_path_factory, tls_ca):
    """The fake backend over HTTPS (certificate for 127.0.0.1 from the test CA), serving two rows."""
    tmp = tmp_path_factory.mktemp("https-backend")
    cert = tls_ca.server_cert(name="backend")
    port = free_port()
    command = [PYTHON, "-m", "tests.fakes.backend", "--port", str(port)]
    command += ["--tls-cert", str(cert.cert_file), "--tls-key", str(cert.key_file)]
    proc = Process(command, {}, tmp / f"backend-tls-{port}.log")
    try:
        wait_for(lambda: port_open(port), timeout=15, what="the HTTPS fake backend to listen")
        control = FakeBackendControl(port, ca_file=str(tls_ca.ca_file))
        assert control.url == f"https://127.0.0.1:{port}"
        control.set(rows=BACKEND_ROWS)
        yield control
    finally:
        proc.stop()


def run_once(
    tmp_path: Path, backend: FakeBackendControl, name: str, **env: str
) -> tuple[int, list[dict], str]:
    """``python -m syncer --once``: (exit code, JSON log records, whole output)."""
    full_env = {
        "ENABLE_TOKEN_ROUTING": "true",
        "SERVER_API_URL": backend.url,
        "SERVER_API_TOKEN": "",
        "SERVER_API_USERNAME": "",
        "SERVER_API_PASSWORD": "",
        "SYNC_TIMEOUT": "10",
        "TOKEN_FILE": str(tmp_path / "var" / "tokens.json"),
        "LOG_LEVEL": "info",
        "HOME": str(tmp_path),
        **env,
    }
    proc = Process([PYTHON, "-m", "syncer", "--once"], full_env, tmp_path / f"syncer-{name}.log")
    try:
        rc = proc.wait(30)
        records, output = proc.json_lines(), proc.output()
    finally:
        proc.stop()
    return rc, records, output


def sync_line(records: list[dict]) -> dict:
    lines = [r for r in records if r.get("message") == "sync"]
    assert len(lines) == 1, records
    return lines[0]


# ------------------------------------------------------------------------------ the fake itself


def test_fake_backend_serves_https_only_to_clients_trusting_the_ca(https_backend, tls_ca):
    assert https_backend.state()["rows"] == 2  # the control API, verified against ca.pem
    before = len(https_backend.tls_failures())
    port = int(https_backend.url.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=certifi.where())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(sock, server_hostname="127.0.0.1")
    failures = wait_for(lambda: https_backend.tls_failures()[before:], timeout=5)
    assert "unknown ca" in failures[0]["error"].lower(), failures


# ------------------------------------------------------------------------------ the syncer


def test_sync_with_server_api_ca_bundle_writes_the_table(tmp_path, https_backend, tls_ca):
    https_backend.clear_calls()
    rc, records, output = run_once(tmp_path, https_backend, "ca", SERVER_API_CA_BUNDLE=str(tls_ca.ca_file))
    assert rc == 0, output
    line = sync_line(records)
    assert line["outcome"] == "ok", line
    assert line["tokens_written"] == 2
    table, _ = tokentable.read(str(tmp_path / "var" / "tokens.json"))
    assert sorted(table.tokens) == sorted(r["token"] for r in BACKEND_ROWS)
    assert table.source == https_backend.url + "/api/tokens/with-model"
    assert [c["status"] for c in https_backend.calls()] == [200]


def test_sync_with_a_hashed_ca_directory(tmp_path, https_backend, tls_ca):
    directory = str(tls_ca.hashed_dir())
    rc, records, output = run_once(tmp_path, https_backend, "dir", SERVER_API_CA_BUNDLE=directory)
    assert rc == 0, output
    assert sync_line(records)["outcome"] == "ok"


def test_sync_without_the_ca_fails_and_leaves_the_file_untouched(tmp_path, https_backend, tls_ca):
    rc, _, output = run_once(tmp_path, https_backend, "first", SERVER_API_CA_BUNDLE=str(tls_ca.ca_file))
    assert rc == 0, output
    token_file = tmp_path / "var" / "tokens.json"
    before_bytes, before_stat = token_file.read_bytes(), token_file.stat()
    https_backend.clear_calls()
    failures_before = len(https_backend.tls_failures())
    time.sleep(0.01)  # a rewrite would show in st_mtime_ns

    # Without SERVER_API_CA_BUNDLE: certifi only, whatever the generic variables say.
    ca = str(tls_ca.ca_file)
    generic = {"REQUESTS_CA_BUNDLE": ca, "CURL_CA_BUNDLE": ca, "SSL_CERT_FILE": ca, "SSL_CERT_DIR": ""}
    rc, records, output = run_once(tmp_path, https_backend, "no-ca", **generic)
    assert rc != 0, output
    line = sync_line(records)
    print(f"sync without the CA: {line.get('error')}")
    assert line["outcome"] != "ok", line
    assert "certificate" in line["error"].lower(), line
    assert token_file.read_bytes() == before_bytes
    after = token_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before_stat.st_ino, before_stat.st_mtime_ns)
    assert [n for n in token_file.parent.iterdir() if n.name.startswith(".")] == []  # no temp file left
    # Nothing reached the backend, though the syncer did try: its handshake ended in an alert.
    assert https_backend.calls(None) == []
    failures = wait_for(lambda: https_backend.tls_failures()[failures_before:], timeout=5)
    assert "unknown ca" in failures[0]["error"].lower(), failures


def test_missing_server_api_ca_bundle_is_a_config_error(tmp_path, https_backend):
    missing = tmp_path / "no-such-ca.pem"
    https_backend.clear_calls()
    rc, records, output = run_once(tmp_path, https_backend, "missing", SERVER_API_CA_BUNDLE=str(missing))
    assert rc == 2, output
    assert [r for r in records if r.get("message") == "sync"] == []
    assert "SERVER_API_CA_BUNDLE" in output and str(missing) in output, output
    assert "Traceback" not in output
    assert https_backend.calls(None) == []
    assert not (tmp_path / "var" / "tokens.json").exists()
