"""wsgi.application under another WSGI server: the app works without our pywsgi handler (headers,
path and body come from the plain WSGI environ)."""

import json
import subprocess
import sys

from tests.support.procs import LOG_FILES, REPO
from tests.support.tables import CLIENT_TOKEN, UPSTREAM_KEY

SCRIPT = r"""
import json, sys
import wsgi
from werkzeug.test import Client
client = Client(wsgi.application)
health = client.get("/_proxy/healthz")
echo = client.post(
    "/chat/completions?a=1",
    data=b'{"model": "m"}',
    headers={"Authorization": "Bearer " + sys.argv[1], "X-Fake": "echo", "Content-Type": "application/json"},
)
denied = client.get("/models")
print(json.dumps({
    "health": health.status_code,
    "echo_status": echo.status_code,
    "echo": json.loads(echo.get_data()),
    "denied": denied.status_code,
}))
"""


def test_application_serves_under_a_plain_wsgi_server(tmp_path, upstream, default_rows):
    from tests.support.tables import write_table

    token_file = tmp_path / "tokens.json"
    write_table(token_file, default_rows)
    env = {"TOKEN_FILE": str(token_file), "METRICS_DIR": str(tmp_path / "m"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, CLIENT_TOKEN],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    log = tmp_path / "wsgi-application.log"
    log.write_text("\n".join(done.stdout.splitlines()[:-1]) + done.stderr)  # not our echo line
    LOG_FILES.append(log)  # covered by the run-wide secrets grep
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["health"] == 200
    assert result["echo_status"] == 200 and result["denied"] == 401
    received = result["echo"]
    assert received["target"] == "/v1/chat/completions?a=1"
    headers = {name.lower(): value for name, value in received["headers"]}
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert CLIENT_TOKEN not in json.dumps(received)
