"""The model library stands alone: nothing in hmt_core (or the httpx client) imports the server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_core_and_the_client_never_import_the_service() -> None:
    code = """
import importlib, pkgutil, sys
import hmt_core, hmt_client
for package in (hmt_core, hmt_client):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)
from hmt_core.cli import build_parser
build_parser()  # `hmt chat` included
leaked = sorted(name for name in sys.modules if name == "service" or name.startswith("service."))
print(leaked)
assert not leaked, leaked
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
