"""Real-browser tests of the playground: Debian's Chromium (`apt-get install -y chromium`) driven by
Playwright for Python, pointed at the system browser (Playwright's own browser download is not
used), against a live hmt-serve on loopback with a tiny model and API keys on.

HMT_BROWSER_MODEL=DIR runs them on another model (the README's screenshots: the chat model);
HMT_SCREENSHOT_DIR=DIR keeps the screenshots there (default: the test's temporary directory).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))  # serve_helpers: one Server, one tiny model
from serve_helpers import Server, build_model

CHROMIUM = os.environ.get("HMT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
KEY = "browser-key"  # tests/browser/test_playground.py enters it in the page


def _missing() -> str | None:
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium chromium-driver)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install playwright)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _missing()
    if reason is None:
        return
    print(f"\ntests/browser skipped: {reason}")
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=reason))


# Module scope, not session: Playwright's sync API keeps an event loop running in this thread
# while it is open, and every later test that calls asyncio.run() would fail.
@pytest.fixture(scope="module")
def playground_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("playground")
    model = os.environ.get("HMT_BROWSER_MODEL")
    if model is None:
        model = str(base / "model")
        build_model(Path(model), seed=0)
    server = Server(["--model", model, "--data-dir", str(base / "data"), "--api-keys", KEY],
                    base / "server.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def screenshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = Path(os.environ.get("HMT_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    directory.mkdir(parents=True, exist_ok=True)
    return directory
