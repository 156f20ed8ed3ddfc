"""deploy/grafana: the dashboard is what its generator writes, is well formed for Grafana, uses the
provisioned datasource everywhere and has a panel for everything issue #6 lists. (Whether its
queries run and name real metrics is checked against a live stack in test_deploy_stack.py.)"""

from __future__ import annotations

import importlib.util
import json
from types import ModuleType
from typing import Any

import pytest
from deploy_helpers import DASHBOARD_FILES, DATASOURCE_FILE, DEPLOY, dashboard_queries, load_yaml, metric_names


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_dashboard", DEPLOY / "grafana" / "build_dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    (path,) = DASHBOARD_FILES
    return json.loads(path.read_text())


def test_dashboard_json_is_up_to_date() -> None:
    build = generator()
    assert build.OUTPUT in DASHBOARD_FILES
    assert build.main(["--check"]) == 0, "run python deploy/grafana/build_dashboard.py"


def test_every_query_uses_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    (datasource,) = load_yaml(DATASOURCE_FILE)["datasources"]
    expected = {"type": datasource["type"], "uid": datasource["uid"]}
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected and target["expr"].strip(), panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"] == expected


def test_layout(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36


def test_panels_for_everything_the_issue_lists(dashboard: dict[str, Any]) -> None:
    """Request rate and errors, latency percentiles, TTFT, inter-token latency, tokens/s in and
    out, segments/s, batch sizes, queue depth, active sessions, state bytes, Redis latency and
    errors, recall-distance heatmap, device memory."""
    queried: set[str] = set()
    for _, expr in dashboard_queries(dashboard):
        queried |= metric_names(expr)
    assert {"hmt_requests_total", "hmt_request_seconds_bucket", "hmt_time_to_first_token_seconds_bucket",
            "hmt_inter_token_seconds_bucket", "hmt_tokens_in_total", "hmt_tokens_out_total",
            "hmt_segments_committed_total", "hmt_batch_size_bucket", "hmt_queue_depth", "hmt_active_sessions",
            "hmt_state_bytes_bucket", "hmt_store_seconds_bucket", "hmt_store_errors_total",
            "hmt_recall_distance_bucket", "hmt_model_memory_bytes"} <= queried
    percentiles = [expr for _, expr in dashboard_queries(dashboard) if "histogram_quantile" in expr]
    assert any("hmt_request_seconds_bucket" in e for e in percentiles)
    (heatmap,) = [p for p in dashboard["panels"] if p["type"] == "heatmap"]
    assert "hmt_recall_distance_bucket" in heatmap["targets"][0]["expr"]
    assert heatmap["targets"][0]["format"] == "heatmap" and heatmap["options"]["calculate"] is False


def test_metric_name_extraction() -> None:
    """The crude PromQL reader the live comparison relies on."""
    assert metric_names('histogram_quantile(0.95, sum by (le, op) (rate(hmt_store_seconds_bucket'
                        '{instance=~"$instance", op!="x"}[$__rate_interval])))') == {"hmt_store_seconds_bucket"}
    assert metric_names('absent(up{job="hmt"})') == {"up"}
    assert metric_names("sum(rate(a_total[5m])) / on(instance) group_left sum(b) > 0.5 and c offset 5m") == \
        {"a_total", "b", "c"}
    assert metric_names("max by (instance) (avg_over_time(hmt_queue_depth[5m])) > 1e-9") == {"hmt_queue_depth"}
