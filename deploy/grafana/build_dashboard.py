"""Writes deploy/grafana/dashboards/hmt-serve.json, the operators' dashboard of hmt-serve.

The JSON is generated so every panel shares one datasource, one replica filter and one style;
edit this file, then run `python deploy/grafana/build_dashboard.py` (`--check` only compares,
as the tests do). Every query uses only series that service/metrics.py exports.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "hmt-serve.json"
DATASOURCE = {"type": "prometheus", "uid": "hmt-prometheus"}  # provisioning/datasources/prometheus.yml
UID = "hmt-serve"

SEL = 'instance=~"$instance"'  # the replica filter of the dashboard's variable
OPS = 'route!~"/metrics|/healthz|/readyz"'  # scrapes and probes are not user traffic
RATE = "$__rate_interval"

Panel = dict[str, Any]


class Layout:
    """Places panels left to right in rows of 24 grid units, with sequential ids."""

    def __init__(self) -> None:
        self.panels: list[Panel] = []
        self.x = self.y = self.row_height = 0
        self.next_id = 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": False, "panels": [],
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}})
        self.y += 1

    def add(self, panel: Panel, width: int, height: int = 8) -> None:
        if self.x + width > 24:
            self._newline()
        panel["id"] = self._id()
        panel["gridPos"] = {"h": height, "w": width, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += width
        self.row_height = max(self.row_height, height)

    def _newline(self) -> None:
        self.y += self.row_height
        self.x = self.row_height = 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def target(expr: str, legend: str = "", ref: str = "A", **extra: Any) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "refId": ref, "expr": expr, "legendFormat": legend, "range": True, **extra}


def targets(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    """(expr, legend) pairs with refIds A, B, C…"""
    return [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(pairs)]


def quantiles(metric: str, selector: str = SEL, by: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99),
              legend: str = "") -> list[dict[str, Any]]:
    """histogram_quantile over the summed buckets of `metric` (a histogram's base name)."""
    group = ", ".join(["le", *([by] if by else [])])
    pairs = [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
              f"p{round(q * 100)}" + (f" {legend}" if legend else "")) for q in qs]
    return targets(*pairs)


def timeseries(title: str, description: str, query: list[dict[str, Any]], unit: str,
               stack: bool = False) -> Panel:
    return {
        "type": "timeseries", "title": title, "description": description, "datasource": DATASOURCE,
        "targets": [dict(t, refId=chr(ord("A") + i)) for i, t in enumerate(query)],  # unique refIds
        "fieldConfig": {
            "defaults": {
                "unit": unit, "min": 0, "color": {"mode": "palette-classic"},
                "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 20 if stack else 10,
                           "showPoints": "never", "spanNulls": False,
                           "stacking": {"mode": "normal" if stack else "none", "group": "A"}},
            },
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def stat(title: str, description: str, expr: str, unit: str, warn: float | None = None,
         bad: float | None = None) -> Panel:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    if warn is not None:
        steps.append({"color": "orange", "value": warn})
    if bad is not None:
        steps.append({"color": "red", "value": bad})
    return {
        "type": "stat", "title": title, "description": description, "datasource": DATASOURCE,
        "targets": [target(expr)],
        "fieldConfig": {"defaults": {"unit": unit, "color": {"mode": "thresholds"},
                                     "thresholds": {"mode": "absolute", "steps": steps}},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto", "justifyMode": "auto",
                    "orientation": "auto"},
    }


def heatmap(title: str, description: str, expr: str, unit: str) -> Panel:
    """A heatmap of a histogram's buckets as Prometheus stores them (no re-bucketing in Grafana)."""
    return {
        "type": "heatmap", "title": title, "description": description, "datasource": DATASOURCE,
        "targets": [target(expr, "{{le}}", format="heatmap")],
        "options": {
            "calculate": False, "cellGap": 1, "rowsFrame": {"layout": "le"},
            "yAxis": {"axisPlacement": "left", "unit": unit},
            "color": {"mode": "scheme", "scheme": "Oranges", "fill": "dark-orange", "scale": "exponential",
                      "exponent": 0.5, "steps": 64, "reverse": False},
            "filterValues": {"le": 1e-9}, "tooltip": {"mode": "single", "yHistogram": True},
            "legend": {"show": True}, "exemplars": {"color": "rgba(255,0,255,0.7)"},
        },
        "fieldConfig": {"defaults": {}, "overrides": []},
    }


def panels() -> list[Panel]:
    layout = Layout()
    requests = f"hmt_requests_total{{{OPS}, {SEL}}}"
    errors = f'hmt_requests_total{{status=~"5..", {OPS}, {SEL}}}'
    client_errors = f'hmt_requests_total{{status=~"4..", {OPS}, {SEL}}}'

    layout.row("Overview")
    layout.add(stat("Request rate", "Session requests per second (scrapes and probes left out).",
                    f"sum(rate({requests}[{RATE}]))", "reqps"), 4, 4)
    layout.add(stat("5xx ratio", "Share of session requests answered with a server error.",
                    f"sum(rate({errors}[{RATE}])) / sum(rate({requests}[{RATE}]))", "percentunit", 0.01, 0.05),
               4, 4)
    layout.add(stat("p95 time to first token", "95th percentile from a generate request to its first token.",
                    "histogram_quantile(0.95, sum by (le) "
                    f"(rate(hmt_time_to_first_token_seconds_bucket{{{SEL}}}[{RATE}])))", "s", 1, 2), 4, 4)
    layout.add(stat("Queue depth", "Jobs waiting for or running in the model workers, all replicas.",
                    f"sum(hmt_queue_depth{{{SEL}}})", "short", 16, 32), 4, 4)
    layout.add(stat("Active sessions", "Sessions with a request in progress, all replicas.",
                    f"sum(hmt_active_sessions{{{SEL}}})", "short"), 4, 4)
    layout.add(stat("Replicas up", "Replicas Prometheus scraped successfully at the last scrape.",
                    f'sum(up{{job="hmt", {SEL}}})', "short"), 4, 4)

    layout.row("Traffic and errors")
    layout.add(timeseries("Requests by route", "Requests per second by route, ops routes included.",
                          targets((f"sum by (route) (rate(hmt_requests_total{{{SEL}}}[{RATE}]))", "{{route}}")),
                          "reqps", stack=True), 8)
    layout.add(timeseries("Responses by status", "Session requests per second by HTTP status.",
                          targets((f"sum by (status) (rate({requests}[{RATE}]))", "{{status}}")),
                          "reqps", stack=True), 8)
    layout.add(timeseries("Error ratio", "Share of session requests with a 5xx (alert at 5%) and a 4xx answer.",
                          targets((f"sum(rate({errors}[{RATE}])) / sum(rate({requests}[{RATE}]))", "5xx"),
                                  (f"sum(rate({client_errors}[{RATE}])) / sum(rate({requests}[{RATE}]))", "4xx")),
                          "percentunit"), 8)

    layout.row("Latency")
    layout.add(timeseries("Request latency", "Session requests, until the response starts for streams.",
                          quantiles("hmt_request_seconds", f'route=~"/sessions.*", {SEL}'), "s"), 6)
    layout.add(timeseries("p95 latency by route", "95th percentile request latency of each route.",
                          quantiles("hmt_request_seconds", f"{OPS}, {SEL}", by="route", qs=(0.95,),
                                    legend="{{route}}"), "s"), 6)
    layout.add(timeseries("Time to first token", "From a generate request's arrival to its first token.",
                          quantiles("hmt_time_to_first_token_seconds"), "s"), 6)
    layout.add(timeseries("Inter-token latency", "Time between consecutive tokens of one generation.",
                          quantiles("hmt_inter_token_seconds"), "s"), 6)

    layout.row("Throughput")
    layout.add(timeseries("Tokens per second", "Tokens appended by clients (prompts included) and generated.",
                          targets((f"sum(rate(hmt_tokens_in_total{{{SEL}}}[{RATE}]))", "in"),
                                  (f"sum(rate(hmt_tokens_out_total{{{SEL}}}[{RATE}]))", "out")), "short"), 8)
    layout.add(timeseries("Segments per second", "Memory segments committed (batched appends and generation).",
                          targets((f"sum(rate(hmt_segments_committed_total{{{SEL}}}[{RATE}]))", "segments/s")),
                          "short"), 8)
    layout.add(timeseries("Batch size", "Sessions per batched segment commit: mean and percentiles.",
                          [*targets((f"sum(rate(hmt_batch_size_sum{{{SEL}}}[{RATE}])) / "
                                     f"sum(rate(hmt_batch_size_count{{{SEL}}}[{RATE}]))", "mean")),
                           *quantiles("hmt_batch_size", qs=(0.5, 0.95))], "short"), 8)

    layout.row("Model worker")
    layout.add(timeseries("Queue depth", "Jobs waiting for or running in each replica's model worker.",
                          targets((f"sum by (instance) (hmt_queue_depth{{{SEL}}})", "{{instance}}")), "short"), 8)
    layout.add(timeseries("Active sessions", "Sessions with a request in progress on each replica.",
                          targets((f"sum by (instance) (hmt_active_sessions{{{SEL}}})", "{{instance}}")),
                          "short"), 8)
    layout.add(timeseries("Segment forward latency", "Latency of one batched segment-commit forward pass.",
                          quantiles("hmt_segment_seconds"), "s"), 8)

    layout.row("Redis and session state")
    layout.add(timeseries("Redis latency", "Redis operation latency by operation: median and 99th percentile.",
                          [*quantiles("hmt_store_seconds", by="op", qs=(0.5,), legend="{{op}}"),
                           *quantiles("hmt_store_seconds", by="op", qs=(0.99,), legend="{{op}}")], "s"), 8)
    layout.add(timeseries("Redis errors", "Failed Redis operations per second by operation (alert: most fail).",
                          targets((f"sum by (op) (rate(hmt_store_errors_total{{{SEL}}}[{RATE}]))", "{{op}}")),
                          "ops", stack=True), 8)
    layout.add(timeseries("Session state size", "Serialized session state written to Redis: mean and p95.",
                          [*targets((f"sum(rate(hmt_state_bytes_sum{{{SEL}}}[{RATE}])) / "
                                     f"sum(rate(hmt_state_bytes_count{{{SEL}}}[{RATE}]))", "mean")),
                           *quantiles("hmt_state_bytes", qs=(0.95,))], "bytes"), 8)

    layout.row("Model")
    layout.add(heatmap("Recall distance", "Segments back to the strongest memory recall weight, per committed "
                       "segment (0: no memory yet). Mass far up means sessions use old memories.",
                       f"sum by (le) (increase(hmt_recall_distance_bucket{{{SEL}}}[{RATE}]))", "short"), 12)
    layout.add(timeseries("Device memory", "Model weights (CPU) or allocated device memory (GPU) per replica.",
                          targets((f"sum by (instance) (hmt_model_memory_bytes{{{SEL}}})", "{{instance}}")),
                          "bytes"), 12)

    layout.row("Chat sessions (OpenAI API)")
    layout.add(timeseries("Chat turns by continuation", "Chat turns per second: continued (only new messages "
                          "read), branched (edit or regenerate, from a snapshot), new, restarted (history re-read).",
                          targets((f"sum by (continuation) (rate(hmt_chat_turns_total{{{SEL}}}[{RATE}]))",
                                   "{{continuation}}")), "reqps", stack=True), 24)
    return layout.panels


def dashboard() -> dict[str, Any]:
    instance_query = 'label_values(up{job="hmt"}, instance)'
    return {
        "uid": UID,
        "title": "hmt-serve",
        "description": "Traffic, latency, throughput, worker load, Redis and memory of hmt-serve replicas.",
        "tags": ["hmt-serve"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "links": [],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
            "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
        }]},
        "templating": {"list": [{
            "name": "instance", "label": "Replica", "type": "query", "datasource": DATASOURCE,
            # the plain-string query form: every Grafana version reads it (newer ones migrate it on load)
            "definition": instance_query, "query": instance_query,
            "refresh": 2, "includeAll": True, "allValue": ".*", "multi": True, "sort": 1, "hide": 0,
            "regex": "", "options": [], "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        }]},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the JSON on disk is not up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
