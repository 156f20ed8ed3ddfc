"""The compose stack, run natively: redis-server, hmt-serve and prometheus started with the
commands, environment and config docker-compose.yml gives them, with only the container
addresses turned into loopback ones. After a little traffic Prometheus must scrape the service,
load and evaluate the alert rules, run every dashboard query, and every metric the dashboard and
the alerts name must be one the live service exports."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis
import yaml
from deploy_helpers import (
    DASHBOARD_FILES,
    DOCKERFILES,
    ROOT,
    alert_rules,
    compose,
    dashboard_queries,
    grafana_to_promql,
    load_yaml,
    queried_metric_names,
    repository_path,
    require_tool,
)
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import Server, free_port, redis_binary

pytestmark = pytest.mark.slow

T = TypeVar("T")
WAIT_S = 60  # for Prometheus' first scrape (10 s interval) and first rule evaluation


def image_path(container_path: str) -> Path:
    """The repository path an image bakes in at `container_path` (the served model, the health check)."""
    for dockerfile in DOCKERFILES:
        found = repository_path(dockerfile, container_path)
        if found is not None:
            return found
    raise AssertionError(f"no image copies anything to {container_path}")


def poll(what: str, probe: Callable[[], T | None], timeout: float = WAIT_S) -> T:
    """probe() until it returns something, for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = probe()
        except (httpx.TransportError, redis.ConnectionError) as exc:
            result, last = None, exc
        if result is not None:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what} (last error: {last})")


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Stack:
    server: Server
    prometheus_url: str
    metrics_text: str  # a scrape of /metrics after the traffic
    target: dict[str, Any]  # Prometheus' hmt target, once it was up


    def query(self, promql: str) -> list[dict[str, Any]]:
        body = httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": promql}, timeout=10).json()
        assert body["status"] == "success", f"{promql}: {body}"
        return body["data"]["result"]


def start_redis(command: list[str], data_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Compose's redis command, plus a loopback port and a data directory instead of the volume."""
    assert command[0] == "redis-server"
    port = free_port()
    process = subprocess.Popen([redis_binary(), *command[1:], "--port", str(port), "--bind", "127.0.0.1",
                                "--dir", str(data_dir), "--daemonize", "no"], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    poll("redis-server", lambda: client.ping() or None, timeout=15)
    client.close()
    return process, port


def traffic(server: Server, model_dir: Path) -> str:
    """A session's life in a few requests: create, append, generate (plain and streamed), a 404."""
    text = (model_dir / "held_out.txt").read_text()[:1500]
    with server.client() as client:
        assert client.post("/sessions", json={"id": "smoke"}).status_code == 201
        assert client.post("/sessions/smoke/append", json={"text": text}).status_code == 200
        generated = client.post("/sessions/smoke/generate", json={"max_tokens": 4, "ignore_eos": True})
        assert generated.status_code == 200, generated.text
        with client.stream("POST", "/sessions/smoke/generate",
                           json={"prompt": " And", "max_tokens": 4, "ignore_eos": True, "stream": True}) as stream:
            assert stream.status_code == 200 and "[DONE]" in stream.read().decode()
        assert client.get("/sessions/no-such-session").status_code == 404
        return client.get("/metrics").text


def prometheus_command(spec: dict[str, Any], etc: Path, data: Path, port: int) -> list[str]:
    """Compose's prometheus command, its container paths mapped to local copies."""
    mounts = {}
    for volume in spec["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = etc if source == "./deploy/prometheus" else data
    args = []
    for arg in spec["command"]:
        flag, _, value = arg.partition("=")
        for target, local in mounts.items():
            if value.startswith(target):
                value = str(local) + value[len(target):]
        args.append(f"{flag}={value}" if value else flag)
    binary = require_tool("prometheus", "apt-get install prometheus")
    return [binary, *args, f"--web.listen-address=127.0.0.1:{port}"]


def loopback_config(config_file: Path, addresses: dict[tuple[str, int], str]) -> None:
    """Turn each DNS-discovered name (a compose service) into the loopback address it runs on;
    nothing else of the config changes."""
    config = load_yaml(config_file)
    for job in config["scrape_configs"]:
        targets = []
        for discovery in job.pop("dns_sd_configs", []):
            targets += [addresses[(name, discovery["port"])] for name in discovery["names"]]
        if targets:
            job.setdefault("static_configs", []).append({"targets": targets})
    config_file.write_text(yaml.safe_dump(config))


def hmt_target(prometheus_url: str) -> dict[str, Any] | None:
    """The hmt job's one target once its last scrape succeeded."""
    targets = httpx.get(f"{prometheus_url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    found = [t for t in targets if t["labels"]["job"] == "hmt"]
    assert len(found) <= 1, found
    return found[0] if found and found[0]["health"] == "up" else None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    services = compose()["services"]
    base = tmp_path_factory.mktemp("stack")
    processes: list[subprocess.Popen[bytes]] = []
    server: Server | None = None
    try:
        (base / "redis").mkdir()
        redis_process, redis_port = start_redis(services["redis"]["command"], base / "redis")
        processes.append(redis_process)

        env = dict(services["hmt"]["environment"])
        env["HMT_REDIS_URL"] = env["HMT_REDIS_URL"].replace("redis:6379", f"127.0.0.1:{redis_port}")
        env["HMT_HOST"] = "127.0.0.1"  # loopback only, where the container listens on all interfaces
        env["HMT_MODEL"] = str(image_path(env["HMT_MODEL"]))
        server = Server([], base / "hmt.log")  # adds --port (a free one), --threads 1, --log-level warning
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            server.launch()
        server.wait_ready()
        metrics_text = traffic(server, Path(env["HMT_MODEL"]))

        etc = base / "etc-prometheus"  # what compose mounts at /etc/prometheus
        shutil.copytree(ROOT / "deploy" / "prometheus", etc)
        loopback_config(etc / "prometheus.yml", {("hmt", int(env["HMT_PORT"])): f"127.0.0.1:{server.port}"})
        port = free_port()
        with open(base / "prometheus.log", "wb") as log:
            processes.append(subprocess.Popen(prometheus_command(services["prometheus"], etc, base / "tsdb", port),
                                              stdout=log, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        poll("prometheus to start", lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200 or None)
        target = poll("the hmt target to be scraped", lambda: hmt_target(url))
        yield Stack(server, url, metrics_text, target)
    finally:
        if server is not None:
            server.stop()
        for process in reversed(processes):
            stop(process)


def test_compose_healthchecks_pass(stack: Stack) -> None:
    """The compose health check (/readyz) and the image's (/healthz), run as the image runs them."""
    checks = [compose()["services"]["hmt"]["healthcheck"]["test"], ["CMD", "hmt-healthcheck", "/healthz"]]
    for check in checks:
        assert check[0] == "CMD"
        script = image_path(f"/usr/local/bin/{check[1]}")
        result = subprocess.run([sys.executable, str(script), *check[2:]], env={"HMT_PORT": str(stack.server.port)},
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr


def test_prometheus_scrapes_the_service(stack: Stack) -> None:
    target = stack.target
    assert target["health"] == "up" and target["scrapeUrl"] == f"{stack.server.url}/metrics"
    assert target["labels"]["instance"] == f"127.0.0.1:{stack.server.port}"
    requests = poll("hmt_requests_total in Prometheus", lambda: stack.query("hmt_requests_total") or None)
    assert sum(float(r["value"][1]) for r in requests) >= 5
    # the traffic reached every part of the pipeline the dashboard shows
    for series in ("hmt_tokens_in_total", "hmt_tokens_out_total", "hmt_segments_committed_total",
                   "hmt_recall_distance_count", "hmt_time_to_first_token_seconds_count", "hmt_state_bytes_count",
                   "hmt_model_memory_bytes"):
        (sample,) = stack.query(f"sum({series})")
        assert float(sample["value"][1]) > 0, series
    # the dashboard's replica variable (label_values(up{job="hmt"}, instance)) finds the replica
    assert [r["metric"]["instance"] for r in stack.query('up{job="hmt"}')] == [target["labels"]["instance"]]


def test_prometheus_evaluates_the_alert_rules(stack: Stack) -> None:
    expected = {rule["alert"] for rule in alert_rules()}

    def evaluated() -> list[dict[str, Any]] | None:
        groups = httpx.get(f"{stack.prometheus_url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(rule["health"] != "unknown" for rule in rules) else None

    rules = poll("a first evaluation of every rule", evaluated)
    assert {rule["name"] for rule in rules} == expected
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    # a healthy replica with a little traffic: nothing fires yet
    assert [r["name"] for r in rules if r["state"] == "firing"] == []


def test_every_dashboard_query_runs(stack: Stack) -> None:
    import json

    for path in DASHBOARD_FILES:
        for title, expr in dashboard_queries(json.loads(path.read_text())):
            try:
                stack.query(grafana_to_promql(expr))
            except AssertionError as exc:
                raise AssertionError(f"{path.name}, panel {title!r}: {exc}") from None


def test_every_queried_metric_is_exported(stack: Stack) -> None:
    """Names of the dashboard and the alerts against a live scrape after traffic. A labelled
    family no request has touched yet (hmt_store_errors with Redis healthy) has HELP and TYPE
    lines but no sample: its series names follow from its type."""
    sampled: set[str] = set()
    typed: set[str] = set()
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_count", "_sum", "_created"],
                "gauge": [""], "summary": ["", "_count", "_sum", "_created"]}
    for family in text_string_to_metric_families(stack.metrics_text):
        sampled |= {sample.name for sample in family.samples}
        typed |= {family.name + suffix for suffix in suffixes.get(family.type, [""])}
    ingested = {r["metric"]["__name__"] for r in stack.query('count by (__name__) ({job="hmt"})')}

    queried = queried_metric_names()
    assert "up" in ingested
    unknown = {name: sorted(where) for name, where in queried.items() if name not in sampled | typed | {"up"}}
    assert unknown == {}, "queried but not exported"
    # what the service exports with samples, Prometheus has stored under the same names
    assert {n for n in queried if n in sampled} <= ingested
    # the only names without a sample yet are families whose labels no request used
    assert {n for n in queried if n not in sampled and n != "up"} <= {"hmt_store_errors_total"}

