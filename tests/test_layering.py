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


def _assert_acyclic(graph: dict[str, set[str]]) -> None:
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        assert module not in visiting, "import cycle: " + " -> ".join([*visiting[visiting.index(module):], module])
        if module in done:
            return
        visiting.append(module)
        for target in sorted(graph.get(module, ())):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_service_has_no_import_cycles() -> None:
    graph = _service_imports()
    importers = {module for module, targets in graph.items() if "service.app" in targets}
    assert importers == {"service.main"}  # the assembly is imported by the entry point only
    _assert_acyclic(graph)


def test_a_jobs_events_are_read_through_its_channel_only() -> None:
    """service.job owns a job's event queue: the worker hands events over with deliver/emit, every
    API reads them with Job.stream (or Job.stream_tokens), and no other module touches the queue."""
    import ast

    touching = sorted(path.name for path in (ROOT / "service").glob("*.py") if path.name != "job.py"
                      for node in ast.walk(ast.parse(path.read_text()))
                      if isinstance(node, ast.Attribute) and node.attr == "events")
    assert touching == []


# HMTModel's conveniences over the modules built on hmt_core.model (documented there as the facade): the
# only functions in hmt_core that import hmt_core modules, the back edges an import graph leaves out.
CORE_FACADE = {f"hmt_core.model:HMTModel.{name}"
               for name in ("append", "generate", "from_hmt_pytorch", "from_pretrained", "save_pretrained")}


def _core_imports() -> tuple[dict[str, set[str]], dict[str, set[str]], set[str]]:
    """hmt_core's imports of its own modules, `if TYPE_CHECKING:` blocks left out (they never run):
    (module -> modules it imports at import time, i.e. outside functions; module -> modules it imports
    anywhere but in the facade; every function that imports an hmt_core module, as module:qualified name).
    `from hmt_core import name` is an import of that submodule, or of the package (its __init__)."""
    import ast

    core = ROOT / "hmt_core"
    module_level: dict[str, set[str]] = {}
    anywhere: dict[str, set[str]] = {}
    importing_functions: set[str] = set()

    def submodule(name: str) -> bool:
        path = core.joinpath(*name.split(".")[1:])
        return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()

    def targets(node: ast.Import | ast.ImportFrom, package: str) -> set[str]:
        if isinstance(node, ast.Import):
            return {a.name for a in node.names if a.name.split(".")[0] == "hmt_core"}
        base = node.module or ""
        if node.level:  # relative: from the module's package, one level up per extra dot
            parts = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join([*parts, *([node.module] if node.module else [])])
        if base.split(".")[0] != "hmt_core":
            return set()
        return {f"{base}.{a.name}" if submodule(f"{base}.{a.name}") else base for a in node.names}

    def walk(node: ast.AST, module: str, package: str, scope: tuple[str, ...], in_function: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                walk(child, module, package, scope, in_function)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found = targets(node, package) - {module}
            function = f"{module}:{'.'.join(scope)}"
            if found and in_function:
                importing_functions.add(function)
            if function not in CORE_FACADE:
                anywhere[module] |= found
            if not in_function:
                module_level[module] |= found
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = (*scope, node.name)
            in_function = in_function or not isinstance(node, ast.ClassDef)
        for child in ast.iter_child_nodes(node):
            walk(child, module, package, scope, in_function)

    for path in sorted(core.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        module_level[name], anywhere[name] = set(), set()
        walk(ast.parse(path.read_text()), name, name if parts[-1] == "__init__" else name.rpartition(".")[0],
             (), False)
    return module_level, anywhere, importing_functions


def test_the_core_has_no_import_cycle_at_import_time() -> None:
    module_level, _, _ = _core_imports()
    assert module_level["hmt_core.memory"] == {"hmt_core.recall"}  # Recall's module is a leaf below memory and model
    assert module_level["hmt_core.recall"] == set()
    assert "hmt_core.model" not in module_level["hmt_core.checkpoint"]  # the loaders build the class handed to them
    _assert_acyclic(module_level)


def test_the_core_has_no_import_cycle_at_runtime_but_the_documented_facade() -> None:
    """Imports inside functions count too (they run when the function does): the only ones are the
    facade's, and without those back edges the graph has no cycle either."""
    _, anywhere, importing_functions = _core_imports()
    assert importing_functions == CORE_FACADE
    _assert_acyclic(anywhere)


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
