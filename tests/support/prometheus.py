"""A real Prometheus (Debian's ``prometheus`` binary) for one test: on 127.0.0.1, with its own
config and storage in a temp dir, stopped by PID; and the queries of the files in deploy/."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import requests

from tests.support.procs import REPO, Process, free_port, wait_for

DASHBOARD = REPO / "deploy" / "grafana" / "llm-token-proxy.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
# What Grafana substitutes before a query reaches Prometheus: every instance, and a rate window
# that holds several samples at the test's 1 s scrape interval.
GRAFANA_VARIABLES = {"$instance": ".*", "$__rate_interval": "30s"}
_LABEL_VALUES = re.compile(r"^label_values\((.+),\s*\w+\)$")


def dashboard_queries(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and template variable, Grafana's variables filled in."""
    dashboard = json.loads(path.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            queries.append((f"panel {panel['title']!r} {target['refId']}", grafana_expr(target["expr"])))
    for variable in dashboard["templating"]["list"]:
        match = _LABEL_VALUES.match(variable["query"]["query"])
        assert match, variable  # label_values(metric, label): Grafana asks for the metric's series
        queries.append((f"variable {variable['name']}", match.group(1)))
    return queries


def grafana_expr(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


class Prometheus:
    """``prometheus`` scraping ``target`` (host:port) at ``metrics_path`` every second, as job
    llm-token-proxy, with deploy/prometheus/alerts.yml loaded."""

    def __init__(self, tmp: Path, target: str, metrics_path: str = "/_proxy/metrics") -> None:
        binary = shutil.which("prometheus")
        assert binary, "Debian's prometheus package is needed (.ci/run installs it)"
        self.dir = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        rules = tmp / "alerts.yml"
        shutil.copyfile(ALERTS, rules)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {
                    "job_name": "llm-token-proxy",
                    "metrics_path": metrics_path,
                    "static_configs": [{"targets": [target]}],
                }
            ],
        }
        (tmp / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.process = Process(
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            env={},
            log_path=tmp / "prometheus.log",
            cwd=tmp,
        )
        try:
            wait_for(self._ready, timeout=30, interval=0.1, what="prometheus ready")
        except AssertionError:
            self.stop()
            raise

    def _ready(self) -> bool:
        assert self.process.alive(), self.process.output()[-3000:]
        try:
            return requests.get(self.url + "/-/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def api(self, path: str, **params) -> dict:
        response = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query now; its result (a vector) or AssertionError with Prometheus's error."""
        data = self.api("query", query=expr)
        assert data["resultType"] in ("vector", "scalar"), data
        return data["result"] if data["resultType"] == "vector" else [{"metric": {}, "value": data["result"]}]

    def alert_rules(self) -> list[dict]:
        """The alerting rules Prometheus loaded (name, query, health...): read back from the server,
        so the expressions evaluated are the ones it parsed from alerts.yml."""
        groups = self.api("rules", type="alert")["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def scrapes_up(self) -> bool:
        targets = self.api("targets")["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)

    def stop(self) -> None:
        self.process.stop(timeout=15)
