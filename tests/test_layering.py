"""The layers: hmt_core (the model library) imports nothing of ours; service imports hmt_core; hmt_lab (training,
evaluation, the `hmt` command) imports hmt_core and hmt_client; hmt_client imports none of them; nothing imports
service."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_core_and_the_client_never_import_the_service() -> None:
    code = """
import importlib, pkgutil, sys
import hmt_core, hmt_client, hmt_lab
for package in (hmt_core, hmt_client, hmt_lab):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)
from hmt_lab.cli import build_parser
build_parser()  # `hmt chat` included
leaked = sorted(name for name in sys.modules if name == "service" or name.startswith("service."))
print(leaked)
assert not leaked, leaked
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def _service_imports() -> dict[str, set[str]]:
    """service module -> the service modules it imports (anywhere in the file, functions included)."""
    import ast

    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "service").glob("*.py")):
        name = f"service.{path.stem}"
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("service"):
                targets = [node.module] if node.module != "service" else [f"service.{a.name}" for a in node.names]
                graph[name].update(t for t in targets if t != "service")
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name.startswith("service."))
    return graph


def test_the_service_has_no_import_cycles() -> None:
    graph = _service_imports()
    importers = {module for module, targets in graph.items() if "service.app" in targets}
    assert importers == {"service.main"}  # the assembly is imported by the entry point only
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        assert module not in visiting, "import cycle: " + " -> ".join([*visiting[visiting.index(module):], module])
        if module in done:
            return
        visiting.append(module)
        for target in graph.get(module, ()):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_serving_needs_no_training_extra() -> None:
    """The service images install the runtime dependencies only: peft and matplotlib are the
    [train] extra. Serve a model and generate with those imports made impossible."""
    code = """
import sys
for name in ("peft", "matplotlib"):
    sys.modules[name] = None  # any import of them now fails
import service.app, service.main
from hmt_core import SamplingParams
from hmt_core.testing import tiny_hmt_model
model = tiny_hmt_model()
state = model.append(model.new_session(), list(range(1, 20)))
assert len(model.generate(state, SamplingParams(max_tokens=3, ignore_eos=True)).run().tokens) == 3
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_training_command_without_the_extra_says_how_to_install_it(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from hmt_lab import cli

    def needs_peft(args: object) -> int:
        raise ModuleNotFoundError("No module named 'peft'", name="peft")

    monkeypatch.setattr(cli, "_train", needs_peft)  # build_parser binds the command at call time
    assert cli.main(["train", "--out", "unused"]) == 2
    assert "pip install 'hmt-serve[train]'" in capsys.readouterr().err


# package -> the packages of ours it may import (anywhere in a file, imports inside functions included)
ALLOWED = {
    "hmt_core": set(),
    "hmt_client": set(),
    "hmt_lab": {"hmt_core", "hmt_client"},
    "service": {"hmt_core"},
}


def _package_imports(package: str) -> dict[str, set[str]]:
    """module path -> the other packages of ours it imports."""
    import ast

    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            targets.update(name.split(".")[0] for name in names)
        found[str(path.relative_to(ROOT))] = (targets & set(ALLOWED)) - {package}
    return found


def test_each_package_imports_only_the_layers_below_it() -> None:
    for package, allowed in ALLOWED.items():
        modules = _package_imports(package)
        assert modules, package
        for module, imported in modules.items():
            assert imported <= allowed, f"{module} imports {sorted(imported - allowed)}"
