"""deploy/prometheus: configs and alert rules checked by promtool (Debian's prometheus package),
the rules' unit tests run, and every alert carries what an operator needs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import PROMETHEUS_DIR, RULE_FILES, alert_rules, load_yaml, require_tool

RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.test.yml"))


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = require_tool("promtool", "apt-get install prometheus")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)


def test_compose_config() -> None:
    result = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_kubernetes_config(tmp_path: Path) -> None:
    """Debian builds Prometheus without Kubernetes discovery, so its promtool rejects
    kubernetes_sd_configs: check the file with that one block swapped for a static target
    (relabelling, rules and the rest stay), and the block itself by hand."""
    config: dict[str, Any] = load_yaml(PROMETHEUS_DIR / "prometheus-k8s.yml")
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "hmt" and job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
    job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
    shutil.copytree(PROMETHEUS_DIR / "rules", tmp_path / "rules")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    # the relabelling reads the annotations deploy/k8s puts on the pods
    relabels = {tuple(r.get("source_labels", [])): r for r in job["relabel_configs"]}
    assert relabels[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)]["action"] == "keep"
    assert relabels[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)]["regex"] == "hmt-serve"


@pytest.mark.parametrize("rules", RULE_FILES, ids=lambda p: p.name)
def test_rules(rules: Path) -> None:
    result = promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests() -> None:
    assert RULE_TESTS
    result = promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing() -> None:
    fired = {case["alertname"] for path in RULE_TESTS for test in load_yaml(path)["tests"]
             for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    alerts = {rule["alert"] for rule in alert_rules() if "alert" in rule}
    assert alerts - fired == set(), "alerts no unit test sees firing"


def test_alerts_are_actionable() -> None:
    rules = [rule for rule in alert_rules() if "alert" in rule]
    assert len({r["alert"] for r in rules}) == len(rules), "alert names must be unique"
    for rule in rules:
        assert rule.get("for"), f"{rule['alert']}: no `for`, a single bad scrape would page"
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_the_issue_asks_for_these_alerts() -> None:
    """Error rate, Redis unreachable, latency objectives, queue saturation (issue #6)."""
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules() if "alert" in rule}
    assert 'status=~"5.."' in exprs["HMTHighErrorRate"]
    assert "hmt_store_errors_total" in exprs["HMTRedisUnreachable"]
    assert "hmt_time_to_first_token_seconds_bucket" in exprs["HMTTimeToFirstTokenSLO"]
    assert "hmt_request_seconds_bucket" in exprs["HMTRequestLatencySLO"]
    assert "hmt_queue_depth" in exprs["HMTQueueSaturated"]
