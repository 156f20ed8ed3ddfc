"""Helpers of the deployment tests: finding the external tools, reading the compose file and the
Dockerfiles as their engines would, and pulling metric names out of PromQL.

A module with a unique name (not conftest) so the test files can import it; tests/deploy has no
__init__.py, like tests/service.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
PROMETHEUS_DIR = DEPLOY / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
DASHBOARD_FILES = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
DATASOURCE_FILE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"

# ----- tools -----------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    """A console script of this interpreter's environment first (CI's venv), then PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def require_tool(name: str, provider: str) -> str:
    found = find_tool(name)
    if found is None:
        pytest.skip(f"{name} is not installed here ({provider}); .ci/run installs it, so CI runs this test")
    return found


# ----- YAML and the compose file ---------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default} interpolation, recursively; with no
    environment given every variable takes its default, as on a machine with no .env file."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"] or ""
        if op in (":-", "-"):
            unset = name not in env or (op == ":-" and not env[name])
            return arg if unset else env[name]
        if op is None:
            return env.get(name, "")
        raise AssertionError(f"unsupported interpolation {match[0]!r}")

    return _VARIABLE.sub(one, value)


def compose() -> dict[str, Any]:
    """docker-compose.yml after YAML merge keys and default interpolation."""
    return interpolate(load_yaml(COMPOSE_FILE))


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path (relative to the compose file) of a service's bind mounts."""
    mounts: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (COMPOSE_FILE.parent / source).resolve()
    return mounts


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """Where a container path of a service lies in this repository, through its bind mounts."""
    for target, source in sorted(bind_mounts(service).items(), key=lambda kv: -len(kv[0])):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source / container_path[len(target):].lstrip("/")
    raise AssertionError(f"{container_path} is not inside any bind mount of the service")


# ----- Dockerfiles -----------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def arg_defaults(steps: list[tuple[str, str]]) -> dict[str, str]:
    """ARG name -> default value, of the ARGs that have one."""
    return dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)


def copies(path: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context (not --from another stage)."""
    found = []
    for keyword, args in dockerfile_instructions(path):
        if keyword != "COPY":
            continue
        words = args.split()
        if any(w.startswith("--from=") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        found.append((words[:-1], words[-1]))
    return found


def stages(path: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    """(stage name, its instructions after FROM) of each stage; a stage with no AS is named by its index."""
    out: list[tuple[str, list[tuple[str, str]]]] = []
    for keyword, args in dockerfile_instructions(path):
        if keyword == "FROM":
            words = args.split()
            name = words[words.index("AS") + 1] if "AS" in words else str(len(out))
            out.append((name, []))
        elif out:
            out[-1][1].append((keyword, args))
    return out


def _under(path: str, directory: str) -> str | None:
    """path relative to directory ("" for directory itself), or None when it is not inside."""
    directory = directory.rstrip("/")
    if path == directory:
        return ""
    return path[len(directory) + 1:] if path.startswith(directory + "/") else None


def baked(path: Path) -> dict[str, str]:
    """Image path -> the repository path (relative to the root) it holds, for everything the final
    stage gets from the build context, directly or through a COPY --from=<stage> of an earlier
    stage's context copies. Relative destinations resolve against WORKDIR."""
    by_stage: dict[str, dict[str, str]] = {}
    for name, steps in stages(path):
        mapping: dict[str, str] = {}
        workdir = "/"
        for keyword, args in steps:
            if keyword == "WORKDIR":
                workdir = args if args.startswith("/") else f"{workdir.rstrip('/')}/{args}"
            if keyword != "COPY":
                continue
            words = args.split()
            origin = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
            *sources, destination = [w for w in words if not w.startswith("--")]
            if not destination.startswith("/"):
                destination = f"{workdir.rstrip('/')}/{destination.removeprefix('./')}"
            into = destination.endswith("/") or len(sources) > 1  # sources go into the directory
            for source in sources:
                target = f"{destination.rstrip('/')}/{Path(source).name}" if into else destination.rstrip("/")
                if origin is None:
                    mapping[target] = source.rstrip("/")
                    continue
                for image_path, repo_path in by_stage.get(origin, {}).items():
                    rest = _under(image_path, source)
                    if rest is not None:
                        mapping[f"{target}/{rest}".rstrip("/")] = repo_path
        by_stage[name] = mapping
    return by_stage[stages(path)[-1][0]]


def repository_path(dockerfile: Path, image_path: str) -> Path | None:
    """Where an image path of `dockerfile`'s final stage comes from in this repository, if it does."""
    for target, source in sorted(baked(dockerfile).items(), key=lambda kv: -len(kv[0])):
        rest = _under(image_path.rstrip("/"), target)
        if rest is not None:
            return ROOT / source / rest if rest else ROOT / source
    return None


def dockerignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps a path out of the context: the last matching pattern wins,
    and a pattern matching a parent directory matches everything below it."""
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        regex = fnmatch.translate(body.replace("**/", "\0")).replace("\0", "(?:.*/)?")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


# ----- PromQL ----------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
# whole identifiers only (no backtracking into a function name's prefix), not followed by "("
_IDENTIFIER = re.compile(r"(?<![\w$.:])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
             "unless", "inf", "nan", "Inf", "NaN"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers left once strings, label
    matchers, ranges and grouping clauses are gone, that are not functions or keywords."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    names = {m for m in _IDENTIFIER.findall(text) if m not in _KEYWORDS}
    # a cruder net: nothing that looks like one of ours may have been dropped on the way
    assert set(re.findall(r"\bhmt_[a-z0-9_]+", _STRING.sub("", expr))) <= names, expr
    return names


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as Grafana would send it, for a Prometheus without Grafana."""
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*")


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel, rows' nested panels included."""
    out = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            out += [(inner["title"], t["expr"]) for t in inner.get("targets", [])]
    return out


def alert_rules() -> list[dict[str, Any]]:
    return [rule for path in RULE_FILES for group in load_yaml(path)["groups"] for rule in group["rules"]]


def queried_metric_names() -> dict[str, set[str]]:
    """metric name -> where it is queried, across the dashboards and the alert rules."""
    import json

    where: dict[str, set[str]] = {}
    for path in DASHBOARD_FILES:
        dashboard = json.loads(path.read_text())
        for title, expr in dashboard_queries(dashboard):
            for name in metric_names(expr):
                where.setdefault(name, set()).add(f"{path.name}: {title}")
        for variable in dashboard.get("templating", {}).get("list", []):
            for name in metric_names(re.sub(r"^label_values\((.*),[^,]*\)$", r"\1", variable["definition"])):
                where.setdefault(name, set()).add(f"{path.name}: variable {variable['name']}")
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            where.setdefault(name, set()).add(f"alert {rule.get('alert') or rule.get('record')}")
    return where
