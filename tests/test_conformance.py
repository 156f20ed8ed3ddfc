"""The reference fixtures in ../shared/conformance must reproduce (CI also runs the script itself)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1].parent / "shared" / "conformance" / "check_conformance.py"


@pytest.mark.skipif(not SCRIPT.exists(), reason="shared/conformance is not beside this checkout")
def test_reference_conformance() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failed" in result.stdout
