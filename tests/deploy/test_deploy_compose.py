"""docker-compose.yml: valid against the Compose Specification's JSON schema (the copy
check-jsonschema vendors from github.com/compose-spec/compose-spec, Apache-2.0), and wired
right: what Docker Compose itself would only find out at `up` time is checked here."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import (
    COMPOSE_FILE,
    DOCKERFILES,
    ROOT,
    arg_defaults,
    bind_mounts,
    compose,
    dockerfile_instructions,
    host_path,
    interpolate,
    load_yaml,
    repository_path,
    require_tool,
)

from service.settings import Settings


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return compose()


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    tool = require_tool("check-jsonschema", "pip install check-jsonschema")
    return subprocess.run([tool, "--builtin-schema", "vendor.compose-spec", str(path)], capture_output=True,
                          text=True, timeout=120)


def test_valid_against_the_compose_specification(tmp_path: Path) -> None:
    result = _check_jsonschema(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    # once more after interpolation with the defaults, as Compose validates what it will run
    interpolated = tmp_path / "compose.json"
    interpolated.write_text(json.dumps(compose()))
    result = _check_jsonschema(interpolated)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    """The schema check has teeth: an unknown key in the shared service block is caught."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("  init: true", "  init: true\n  gpus_please: 1", 1))
    result = _check_jsonschema(broken)
    assert result.returncode != 0 and "gpus_please" in result.stdout


def test_references_resolve(spec: dict[str, Any]) -> None:
    services = spec["services"]
    volumes = set(spec.get("volumes") or {})
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if service["depends_on"][dependency].get("condition") == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no health check"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in volumes, f"{name}: volume {source} is not declared"
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
        if "build" in service:
            assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()


def test_service_wiring(spec: dict[str, Any]) -> None:
    services = spec["services"]
    fields = {f"HMT_{name.upper()}" for name in Settings.model_fields}
    for name in ("hmt", "hmt-gpu"):
        service = services[name]
        env = service["environment"]
        assert set(env) <= fields, f"{name}: unknown settings {set(env) - fields}"
        assert env["HMT_REDIS_URL"] == "redis://redis:6379/0"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["healthcheck"]["test"] == ["CMD", "hmt-healthcheck", "/readyz"]
        published = service["ports"][0].split(":")
        assert published[0] == "127.0.0.1" and published[-1] == env["HMT_PORT"] == "8000"
    # the default model path is the served model, which both images bake in (with its backbone)
    for dockerfile in DOCKERFILES:
        for name in ("hmt", "hmt-gpu"):
            assert repository_path(dockerfile, services[name]["environment"]["HMT_MODEL"]) == \
                ROOT / "models" / "hmt-smollm2"
        # the ./models mount does not hide what the image bakes in
        assert not any(target.startswith(("/app", "/opt")) for target in bind_mounts(services["hmt"]))

    assert "profiles" not in services["hmt"], "plain `docker compose up` must start the CPU service"
    gpu = services["hmt-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["environment"]["HMT_DEVICE"] == "cuda"
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    # Prometheus discovers the replicas by the DNS name hmt: the GPU service answers to it too
    assert "hmt" in gpu["networks"]["default"]["aliases"]


def test_build_arguments_reach_the_dockerfiles() -> None:
    """TORCH_VERSION, TORCH_INDEX_URL, PIP_TRUSTED_HOST and UID are settable from the environment or
    .env for `up --build`, and unset they mean what the Dockerfile's own defaults mean."""
    raw = load_yaml(COMPOSE_FILE)["services"]
    for name in ("hmt", "hmt-gpu"):
        build = raw[name]["build"]
        declared = arg_defaults(dockerfile_instructions(ROOT / build["dockerfile"]))  # all stages' ARGs
        args = build["args"]
        assert set(args) == {"TORCH_VERSION", "TORCH_INDEX_URL", "PIP_TRUSTED_HOST", "UID"} <= set(declared)
        for arg, value in args.items():
            assert value == f"${{{arg}:-{declared[arg]}}}", f"{name}: {arg} must default to the Dockerfile's value"
            assert interpolate(value, {arg: "from-env"}) == "from-env"
    assert arg_defaults(dockerfile_instructions(ROOT / "docker" / "Dockerfile.cpu"))["TORCH_INDEX_URL"] \
        .endswith("/whl/cpu")


def test_prometheus_stays_on_loopback(spec: dict[str, Any]) -> None:
    """Prometheus has no authentication: never published beyond 127.0.0.1, even when the API is
    (HMT_BIND_ADDRESS=0.0.0.0), and no lifecycle API (POST /-/quit) to reach."""
    exposed = interpolate(load_yaml(COMPOSE_FILE), {"HMT_BIND_ADDRESS": "0.0.0.0"})["services"]
    assert exposed["hmt"]["ports"][0].startswith("0.0.0.0:")  # the switch works for the API
    for port in exposed["prometheus"]["ports"]:
        assert port.startswith("127.0.0.1:"), port
    assert not any("enable-lifecycle" in flag for flag in spec["services"]["prometheus"]["command"])


@pytest.mark.parametrize("command", [["docker", "compose"], ["docker-compose"]], ids=["v2", "v1"])
def test_compose_reads_the_file(command: list[str], tmp_path: Path) -> None:
    """Both Compose implementations accept the file (Debian ships v1 as docker-compose)."""
    tool = require_tool(command[0], "apt-get install docker.io docker-compose")
    probe = subprocess.run([tool, *command[1:], "version"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"{' '.join(command)} is not installed here")
    result = subprocess.run([tool, *command[1:], "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_redis_persists(spec: dict[str, Any]) -> None:
    redis = spec["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    (data,) = [v for v in redis["volumes"] if v.endswith(":/data")]
    assert data.split(":")[0] in spec["volumes"], "AOF on a named volume"
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_prometheus_reads_the_repository_config(spec: dict[str, Any]) -> None:
    prometheus = spec["services"]["prometheus"]
    flags = dict(arg.split("=", 1) for arg in prometheus["command"] if "=" in arg)
    config = host_path(prometheus, flags["--config.file"])
    assert config == ROOT / "deploy" / "prometheus" / "prometheus.yml"
    rules = load_yaml(config)["rule_files"]
    assert all(list(config.parent.glob(pattern)) for pattern in rules)
    (job,) = [j for j in load_yaml(config)["scrape_configs"] if j["job_name"] == "hmt"]
    (discovery,) = job["dns_sd_configs"]
    assert discovery["names"] == ["hmt"] and "hmt" in spec["services"]
    assert discovery["port"] == int(spec["services"]["hmt"]["environment"]["HMT_PORT"])


def test_grafana_opens_the_dashboard_with_no_clicks(spec: dict[str, Any]) -> None:
    grafana = spec["services"]["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = host_path(grafana, env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.is_file()

    datasources = host_path(grafana, "/etc/grafana/provisioning/datasources")
    (datasource,) = [d for f in datasources.glob("*.yml") for d in load_yaml(f)["datasources"]]
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", datasource["url"]).groups()
    assert host in spec["services"] and port == "9090"
    used = {p["datasource"]["uid"] for p in json.loads(home.read_text())["panels"] if "datasource" in p}
    assert used == {datasource["uid"]}

    providers = host_path(grafana, "/etc/grafana/provisioning/dashboards")
    (provider,) = [p for f in providers.glob("*.yml") for p in load_yaml(f)["providers"]]
    assert host_path(grafana, provider["options"]["path"]) == home.parent
