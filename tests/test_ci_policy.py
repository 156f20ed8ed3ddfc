"""The CI skip policy itself: with a tool hidden from PATH, a test that needs it fails under CI=true with the
tool's name in the message, and skips as before without CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ci_policy import accepted

ROOT = Path(__file__).resolve().parents[1]
KJV_TEST = "tests/test_corpus.py::test_the_kjv_is_one_book"


def _run_without_bible(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(Path(sys.executable).parent)  # this venv's python and nothing else: no `bible`
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", KJV_TEST],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_a_missing_tool_fails_under_ci(tmp_path: Path, ci: str) -> None:
    result = _run_without_bible(tmp_path, ci)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 error" in result.stdout  # a setup-phase skip turned into a failure reports as an error
    assert "CI=true does not accept this skip" in result.stdout and "`bible`" in result.stdout


def test_a_missing_tool_skips_outside_ci(tmp_path: Path) -> None:
    result = _run_without_bible(tmp_path, None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert "1 x no `bible` command" in result.stdout  # the closing summary names the reason


def test_only_listed_skips_are_accepted() -> None:
    assert accepted("docker compose is not installed here")
    assert not accepted("no Chromium at /usr/bin/chromium (apt-get install -y chromium chromium-driver)")
    assert not accepted("no `bible` command (apt-get install bible-kjv)")
