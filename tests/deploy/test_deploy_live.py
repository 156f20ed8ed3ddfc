"""`docker compose up` for real: the images built, redis + hmt + prometheus started by Compose on a
Docker engine, and the service used over HTTP as a client would. Sessions survive `restart hmt`,
`restart redis` and `down`/`up` byte for byte, two replicas serve one session, Prometheus scrapes both and
evaluates every rule; `down -v` at the end.

Base images come from standin_images (Debian stand-ins tagged with the official names) when the
real ones are not there, and torch from this machine's pip configuration, served to the build.
Skipped, with the reason printed, where no Docker engine answers or debootstrap is missing; CI
starts dockerd first, so it runs there.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from deploy_helpers import COMPOSE_FILE, ROOT, arg_defaults, dockerfile_instructions, load_yaml
from httpx_sse import connect_sse
from serve_helpers import free_port
from standin_images import (
    bridge_gateway,
    classic_builder_env,
    docker,
    ensure_standin,
    serve_directory,
    write_torch_mirror,
)

SERVICES = ["redis", "hmt", "prometheus"]  # Grafana has no Debian package to stand in for it
HEALTHY_WITHIN_S = 300
DOCKERFILE = ROOT / "docker" / "Dockerfile.cpu"


def _engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no docker CLI (apt-get install docker.io)"
    probe = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                           timeout=60)
    if probe.returncode != 0:
        return f"no Docker engine answers ({probe.stderr.strip()[:200]}); start dockerd"
    return None


def _compose_command() -> list[str] | None:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60).returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def _free_port_pair() -> int:
    """A port p with p and p + 1 free on loopback (the two replicas' published range)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket() as second:
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


@dataclass
class Stack:
    command: list[str]
    env: dict[str, str]
    prometheus_port: int
    timings: dict[str, float] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 900) -> str:
        result = subprocess.run([*self.command, "-f", str(COMPOSE_FILE), *args], cwd=ROOT, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"compose {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
        return result.stdout

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).split()

    def wait_healthy(self, services: list[str], replicas: int = 1) -> float:
        """Seconds until every container of these services reports healthy."""
        start = time.monotonic()
        while True:
            states = {}
            for service in services:
                ids = self.containers(service)
                states[service] = [docker("inspect", "-f", "{{.State.Health.Status}}", i).strip() for i in ids]
            wanted = {s: (replicas if s == "hmt" else 1) for s in services}
            if all(len(states[s]) == wanted[s] and set(states[s]) == {"healthy"} for s in services) \
                    and all(self._ready(replica) for replica in range(wanted.get("hmt", 0))):
                return time.monotonic() - start
            if time.monotonic() - start > HEALTHY_WITHIN_S:
                logs = self.compose("logs", "--tail", "60")
                raise AssertionError(f"not healthy within {HEALTHY_WITHIN_S} s: {states}\n{logs[-6000:]}")
            time.sleep(2)

    def _ready(self, replica: int) -> bool:
        with contextlib.suppress(httpx.TransportError, RuntimeError), self.api(replica) as api:
            return api.get("/readyz").status_code == 200
        return False

    def api(self, replica: int = 0) -> httpx.Client:
        """A client of one replica, on the host port it has now (a restart may take another of the range)."""
        published = self.compose("port", "--index", str(replica + 1), "hmt", "8000").strip()
        return httpx.Client(base_url=f"http://{published}", timeout=120)

    def prometheus(self, path: str, params: dict[str, str] | None = None) -> Any:
        response = httpx.get(f"http://127.0.0.1:{self.prometheus_port}{path}", params=params, timeout=30)
        response.raise_for_status()
        return response.json()["data"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    problem = _engine_problem()
    command = _compose_command()
    if problem is None and command is None:
        problem = "neither `docker compose` nor docker-compose is installed (apt-get install docker-compose)"
    if problem is None and shutil.which("debootstrap") is None:
        problem = "debootstrap is missing, so the stand-in base images cannot be built (apt-get install debootstrap)"
    if problem is not None:
        print(f"\nlive deployment test skipped: {problem}")
        pytest.skip(problem)
    assert command is not None

    timings: dict[str, float] = {}
    start = time.monotonic()
    spec = load_yaml(COMPOSE_FILE)["services"]
    build_args = arg_defaults(dockerfile_instructions(DOCKERFILE))
    python_image = build_args["PYTHON_IMAGE"]
    used = {
        python_image: ensure_standin(python_image, "python"),
        spec["redis"]["image"]: ensure_standin(spec["redis"]["image"], "redis"),
        spec["prometheus"]["image"]: ensure_standin(spec["prometheus"]["image"], "prometheus"),
    }
    timings["base_images_s"] = time.monotonic() - start
    print(f"\nbase images: {used}")

    gateway = bridge_gateway()
    mirror = tmp_path_factory.mktemp("torch-mirror")
    write_torch_mirror(mirror, build_args["TORCH_VERSION"])
    first_port, prometheus_port = _free_port_pair(), free_port()
    env = {**classic_builder_env(),
           "COMPOSE_PROJECT_NAME": f"hmtlive{uuid.uuid4().hex[:6]}",
           "HMT_PUBLISH_PORT": f"{first_port}-{first_port + 1}",
           "PROMETHEUS_PUBLISH_PORT": str(prometheus_port),
           "HMT_LOG_LEVEL": "warning"}
    with serve_directory(mirror, gateway) as mirror_port:
        env |= {"TORCH_INDEX_URL": f"http://{gateway}:{mirror_port}/simple", "PIP_TRUSTED_HOST": gateway}
        live = Stack(command, env, prometheus_port, timings)
        try:
            start = time.monotonic()
            live.compose("build", "hmt", timeout=1800)
            timings["build_s"] = time.monotonic() - start
            start = time.monotonic()
            live.compose("up", "-d", *SERVICES)
            live.wait_healthy(SERVICES)
            timings["up_to_healthy_s"] = time.monotonic() - start
            yield live
        finally:
            with contextlib.suppress(Exception):
                print(live.compose("logs", "--tail", "30", "hmt")[-3000:])
            live.compose("down", "-v", "--remove-orphans")


@pytest.fixture(scope="module")
def session(stack: Stack) -> str:
    """A session created, appended to (streamed: a segment event per committed segment) and
    answered over SSE, all through the published port."""
    session_id = f"live-{uuid.uuid4().hex[:8]}"
    with stack.api() as api:
        assert api.post("/sessions", json={"id": session_id}).status_code == 201
        text = " ".join(f"Note {i}: the lighthouse keeper counts {i * 7} gulls before dawn." for i in range(60))
        segments = []
        with connect_sse(api, "POST", f"/sessions/{session_id}/append", json={"text": text}) as events:
            for event in events.iter_sse():
                if event.event == "segment":
                    segments.append(json.loads(event.data))
                elif event.event == "summary":
                    summary = json.loads(event.data)
        assert segments and summary["segments_committed"] == len(segments) >= 2
        tokens = []
        with connect_sse(api, "POST", f"/sessions/{session_id}/generate",
                         json={"prompt": " How many gulls?", "max_tokens": 8, "stream": True}) as events:
            for event in events.iter_sse():
                assert event.event != "error", event.data
                if event.data != "[DONE]" and "token" in (payload := json.loads(event.data)):
                    tokens.append(payload["text"])
        assert tokens, "no token streamed"
    return session_id


def _state(stack: Stack, session_id: str, replica: int = 0) -> bytes:
    with stack.api(replica) as api:
        response = api.get(f"/sessions/{session_id}/state")
    assert response.status_code == 200, response.text
    return response.content


def test_image_layers(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    """A source edit changes only the small project layer: the venv is its own layer below it."""
    size = int(docker("image", "inspect", "-f", "{{.Size}}", "hmt-serve:cpu"))
    layers = [line.split("\t", 1) for line in
              docker("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", "hmt-serve:cpu").splitlines()]
    (project,) = [s for s, created in layers if "/opt/wheels/*.whl" in created and "pip install" in created]
    assert project.endswith(("kB", "B")) and not project.endswith(("MB", "GB")), f"project layer of {project}"
    with capsys.disabled():
        print(f"\nhmt-serve:cpu {size / 1e9:.2f} GB, project layer {project}; timings {stack.timings}")


def test_session_round_trip(stack: Stack, session: str) -> None:
    with stack.api() as api:
        info = api.get(f"/sessions/{session}").json()
    assert info["tokens_seen"] > 0


def test_restart_hmt_keeps_state(stack: Stack, session: str) -> None:
    before = _state(stack, session)
    stack.compose("restart", "hmt")
    stack.wait_healthy(["hmt"])
    assert _state(stack, session) == before


def test_restart_redis_keeps_state(stack: Stack, session: str) -> None:
    before = _state(stack, session)
    stack.compose("restart", "redis")
    stack.wait_healthy(["redis", "hmt"])  # the service reconnects by itself: /readyz answers again
    assert _state(stack, session) == before


def test_down_and_up_keep_state(stack: Stack, session: str) -> None:
    """`down` removes the containers, not the volumes: Redis's AOF brings every session back."""
    before = _state(stack, session)
    stack.compose("down")
    stack.compose("up", "-d", *SERVICES)
    stack.wait_healthy(SERVICES)
    assert _state(stack, session) == before


def test_two_replicas_serve_one_session(stack: Stack, session: str) -> None:
    stack.compose("up", "-d", "--no-recreate", "--scale", "hmt=2", "hmt")
    stack.wait_healthy(["hmt"], replicas=2)
    with stack.api(0) as first, stack.api(1) as second:
        appended = first.post(f"/sessions/{session}/append", json={"text": " The keeper sleeps at noon."})
        assert appended.status_code == 200, appended.text
        after_first = _state(stack, session, replica=1)
        assert after_first == _state(stack, session, replica=0)
        reply = second.post(f"/sessions/{session}/generate", json={"prompt": " When?", "max_tokens": 4})
        assert reply.status_code == 200, reply.text
    assert _state(stack, session, replica=0) != after_first  # the second replica's turn is saved for both


def test_prometheus_scrapes_both_replicas_and_evaluates_every_rule(stack: Stack, session: str) -> None:
    if len(stack.containers("hmt")) < 2:
        stack.compose("up", "-d", "--no-recreate", "--scale", "hmt=2", "hmt")
        stack.wait_healthy(["hmt"], replicas=2)
    deadline = time.monotonic() + 120
    while True:
        targets = [t for t in stack.prometheus("/api/v1/targets")["activeTargets"] if t["labels"]["job"] == "hmt"]
        if len(targets) == 2 and all(t["health"] == "up" for t in targets):
            break
        assert time.monotonic() < deadline, f"hmt targets: {[(t['scrapeUrl'], t['health']) for t in targets]}"
        time.sleep(3)
    deadline = time.monotonic() + 120
    while True:
        groups = stack.prometheus("/api/v1/rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(rule["health"] == "ok" for rule in rules) and all("lastEvaluation" in r for r in rules):
            break
        bad = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert time.monotonic() < deadline, f"rules not healthy: {bad}"
        time.sleep(3)
    expected = sum(len(group["rules"]) for path in sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
                   for group in load_yaml(path)["groups"])
    assert len(rules) == expected
    # the current replicas only: series of containers gone with `down` linger in the kept TSDB
    instances = "|".join(t["labels"]["instance"] for t in targets)
    series = stack.prometheus("/api/v1/query", {"query": f'up{{job="hmt",instance=~"{instances}"}}'})["result"]
    assert len(series) == 2 and all(s["value"][1] == "1" for s in series)

