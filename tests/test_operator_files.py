"""The operator's files in deploy/ checked by the real tools: the alert rules by promtool (check
and unit tests), the Grafana dashboard's shape. Debian's prometheus package provides promtool
(.ci/run installs it when missing). What they do against a running deployment is in
test_operator_kit.py.
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
