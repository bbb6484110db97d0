"""The README's first command, ``make run``: scripts/run in the foreground with no SERVER_API_URL
starts the embedded demo, prints a curl and an openai-SDK snippet that stream through the proxy,
and Ctrl-C stops everything.

The launcher runs on free ports in a short temp dir; the banner's commands are taken from its
output and run as printed (the curl as an equivalent ``requests`` call).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest
import requests
from openai import OpenAI

from demo.__main__ import ANSWER
from tests.support.procs import free_port, port_open, wait_for
from tests.support.tables import register_secret
from tests.test_deploy import Deployment, parse_sse, pid_alive

pytestmark = pytest.mark.deploy

DEMO_UPSTREAM_KEY = register_secret("sk-demo-upstream-000000000000000a")  # from demo/tokens.example.json
DEMO_PROGRAMS = ["demo_backend", "demo_upstream", "syncer", "proxy:proxy_00"]
CURL = re.compile(
    r"curl -N (?P<url>http://\S+) \\\s*"
    r"-H 'Authorization: Bearer (?P<token>sk-demo-client-[0-9A-Za-z-]+)' \\\s*"
    r"-H 'Content-Type: application/json' \\\s*"
    r"-d '(?P<body>[^']*)'"
)
SDK = re.compile(r'OpenAI\(base_url="(?P<base_url>[^"]+)", api_key="(?P<api_key>[^"]+)"\)')


def test_make_run_demo_streams_and_ctrl_c_stops_everything(tmp_path):
    backend_port, upstream_port = free_port(), free_port()
    deployment = Deployment(
        tmp_path,
        {
            "DEMO_BACKEND_PORT": str(backend_port),
            "DEMO_UPSTREAM_PORT": str(upstream_port),
            "PROXY_WORKERS": "1",
        },
        test_defaults=False,
    )
    try:
        assert "SERVER_API_URL" not in deployment.env
        launcher = deployment.process

        def banner():
            assert launcher.alive(), f"launcher exited:\n{deployment.tail()}"
            return "Demo is up" in launcher.output()

        wait_for(banner, timeout=60, interval=0.1, what="the demo banner")
        output = launcher.output()
        curl = CURL.search(output)
        assert curl, output[-3000:]
        sdk = SDK.search(output)
        assert sdk, output[-3000:]
        assert curl["url"] == f"http://127.0.0.1:{deployment.port}/chat/completions"
        assert sdk["base_url"] == f"http://127.0.0.1:{deployment.port}/"
        assert sdk["api_key"] == curl["token"]

        states = deployment.wait_running(DEMO_PROGRAMS, timeout=15)
        assert sorted(states) == sorted(DEMO_PROGRAMS), states
        pids = {name: pid for name, (_, pid) in states.items()}
        supervisord_pid = int((deployment.run_dir / "supervisord.pid").read_text().strip())
        assert pid_alive(supervisord_pid) and all(pid_alive(pid) for pid in pids.values())

        # The curl command of the banner: a stream of SSE events, ending with [DONE].
        with requests.post(
            curl["url"],
            data=curl["body"].encode(),
            headers={"Authorization": f"Bearer {curl['token']}", "Content-Type": "application/json"},
            stream=True,
            timeout=30,
        ) as response:
            assert response.status_code == 200, response.text
            assert response.headers["Content-Type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines(decode_unicode=True) if line]
        events = parse_sse(lines)
        assert len(events) >= 5, lines
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        content = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
        assert content == ANSWER

        # The openai-SDK snippet of the banner, streaming as printed, then a plain completion.
        client = OpenAI(base_url=sdk["base_url"], api_key=sdk["api_key"], max_retries=0, timeout=30)
        try:
            messages = [{"role": "user", "content": "hi"}]
            streamed = "".join(
                chunk.choices[0].delta.content or ""
                for chunk in client.chat.completions.create(
                    model="demo-model", stream=True, messages=messages
                )
                if chunk.choices
            )
            assert streamed == ANSWER
            completion = client.chat.completions.create(model="demo-model", messages=messages)
            assert completion.choices[0].message.content == ANSWER
        finally:
            client.close()

        # Ctrl-C: everything stops cleanly.
        launcher.signal(signal.SIGINT)
        interrupted = time.monotonic()
        try:
            rc = launcher.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher did not exit within 15 s of SIGINT:\n{deployment.tail()}")
        assert rc == 0, deployment.tail()
        started = (supervisord_pid, *pids.values())
        remaining = max(0.5, 15 - (time.monotonic() - interrupted))
        wait_for(lambda: not any(map(pid_alive, started)), timeout=remaining, what="every process gone")
        stopped_s = time.monotonic() - interrupted
        print(f"everything stopped {stopped_s:.2f}s after SIGINT")
        for port in (deployment.port, backend_port, upstream_port):
            assert not port_open(port), f"port {port} still open"

        output = launcher.output()
        assert DEMO_UPSTREAM_KEY not in output
    finally:
        deployment.stop()
