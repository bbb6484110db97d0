"""The operator's files in deploy/ checked by the real tools: the alert rules by promtool (check
and unit tests), the systemd unit by systemd-analyze, the Grafana dashboard's shape. Debian's
prometheus and systemd packages provide the tools (.ci/run installs them when missing).

What they do against a running deployment is in test_operator_kit.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from tests.support.procs import REPO
from tests.support.prometheus import DASHBOARD, dashboard_queries

RULES_DIR = REPO / "deploy" / "prometheus"
UNIT = REPO / "deploy" / "systemd" / "llm-token-proxy.service"
INSTALL_DIR = "/opt/llm-token-proxy"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: .ci/run installs it (Debian's prometheus / systemd package)"
    return path


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_alert_rules_pass_promtool_check():
    result = _run([_tool("promtool"), "check", "rules", "alerts.yml"], RULES_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout, result.stdout


def test_alert_rules_unit_tests_pass():
    tests = sorted(path.name for path in RULES_DIR.glob("*_test.yml"))
    assert tests, "no promtool unit tests beside the rules"
    result = _run([_tool("promtool"), "test", "rules", *tests], RULES_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_quiet():
    rules = (RULES_DIR / "alerts.yml").read_text()
    alerts = re.findall(r"^\s+- alert: (\w+)$", rules, re.MULTILINE)
    assert len(alerts) == 9, alerts
    text = "\n".join(path.read_text() for path in RULES_DIR.glob("*_test.yml"))
    for alert in alerts:
        # Each alert_rule_test entry: "alertname: X" then "exp_alerts: []" (quiet) or a list (fires).
        cases = re.findall(rf"alertname: {alert}\n\s+exp_alerts:( \[\])?", text)
        assert any(case == " []" for case in cases), f"{alert}: no quiet case"
        assert any(case == "" for case in cases), f"{alert}: no firing case"
    for alert in alerts:  # every alert tells the operator what is wrong and what to do
        block = rules.split(f"- alert: {alert}\n", 1)[1].split("- alert:", 1)[0]
        assert "summary:" in block and "description:" in block, alert


def test_a_broken_rule_test_fails(tmp_path):
    """The unit tests can fail: the same tests against rules with one threshold changed."""
    shutil.copyfile(RULES_DIR / "alerts_test.yml", tmp_path / "alerts_test.yml")
    rules = (RULES_DIR / "alerts.yml").read_text()
    broken = rules.replace("llmproxy_workers < llmproxy_workers_configured", "llmproxy_workers < 0")
    assert broken != rules
    (tmp_path / "alerts.yml").write_text(broken)
    result = _run([_tool("promtool"), "test", "rules", "alerts_test.yml"], tmp_path)
    assert result.returncode != 0
    assert "LLMProxyWorkersMissing" in result.stdout + result.stderr


# ---------------------------------------------------------------------------- Grafana


def test_dashboard_shape():
    dashboard = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"] == datasource, panel["title"]
        assert panel["targets"], panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == datasource and target["expr"], panel["title"]
    titles = " | ".join(panel["title"] for panel in dashboard["panels"])
    for wanted in (
        "status class",
        "end reason",
        "Time to first byte",
        "duration",
        "In flight",
        "Usage tokens/min",
        "Upstream errors",
        "Rate-limited",
        "table age",
        "Tokens in the table",
        "Syncer",
        "Log lines dropped",
    ):
        assert wanted in titles, wanted
    queries = dashboard_queries()
    assert len(queries) == sum(len(p["targets"]) for p in dashboard["panels"]) + 1


# ---------------------------------------------------------------------------- systemd


def _unit_values(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def test_systemd_unit_verifies_when_pointed_at_this_checkout(tmp_path):
    text = UNIT.read_text()
    assert text.count(INSTALL_DIR) == 1  # one line to edit for another path
    assert re.search(rf"^WorkingDirectory={re.escape(INSTALL_DIR)}$", text, re.MULTILINE)
    copy = tmp_path / "llm-token-proxy.service"
    # Only the checkout's path changes. The unit's user (llm-proxy) need not exist here:
    # systemd-analyze verify does not resolve users (it only warns about special ones, e.g. nobody).
    copy.write_text(text.replace(f"WorkingDirectory={INSTALL_DIR}", f"WorkingDirectory={REPO}"))
    result = _run([_tool("systemd-analyze"), "verify", str(copy)], tmp_path)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    assert output == "", output  # any warning about the unit fails


def test_systemd_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a wrong ExecStart and a bad option are both reported."""
    text = UNIT.read_text().replace(f"WorkingDirectory={INSTALL_DIR}", f"WorkingDirectory={REPO}")
    copy = tmp_path / "llm-token-proxy.service"
    copy.write_text(text.replace("ExecStart=/bin/bash", "ExecStart=/bin/no-such-bash") + "KillMode=bogus\n")
    result = _run([_tool("systemd-analyze"), "verify", str(copy)], tmp_path)
    assert result.returncode != 0 or (result.stdout + result.stderr).strip()


def test_systemd_unit_settings_match_the_deployment():
    values = _unit_values(UNIT.read_text())
    assert values["ExecStart"] == "/bin/bash scripts/run"  # foreground, from WorkingDirectory
    assert values["KillSignal"] == "SIGTERM"
    assert values["KillMode"] == "mixed"  # SIGTERM to scripts/run only; it stops the rest in order
    assert values["Restart"] == "on-failure"
    assert values["NoNewPrivileges"] == "yes" and values["ProtectSystem"] == "full"
    assert values["EnvironmentFile"].startswith("-")  # optional
    assert values["User"] == "llm-proxy"
    # LimitNOFILE = the launcher's default PROXY_MINFDS (supervisord's minfds needs that hard limit).
    run = (REPO / "scripts" / "run").read_text()
    minfds = re.search(r"PROXY_MINFDS:-(\d+)", run).group(1)
    assert values["LimitNOFILE"] == minfds
    # TimeoutStopSec above the longest orderly stop with the defaults: the workers' drain and
    # supervisord's wait for them (PROXY_STOPWAITSECS = GRACEFUL_TIMEOUT + 10), then the syncer's
    # and Redis's stopwaitsecs, one after the other.
    graceful = int(re.search(r"GRACEFUL_TIMEOUT:-(\d+)", run).group(1))
    margin = int(re.search(r"GRACEFUL_TIMEOUT%\.\*\} \+ (\d+)", run).group(1))
    conf = (REPO / "supervisord.conf").read_text()
    syncer_wait = int(re.search(r"\[program:syncer\][^\[]*?stopwaitsecs=(\d+)", conf).group(1))
    redis_wait = int(re.search(r"stopwaitsecs=(\d+)", (REPO / "deploy" / "redis.conf").read_text()).group(1))
    assert int(values["TimeoutStopSec"]) > graceful + margin + syncer_wait + redis_wait
