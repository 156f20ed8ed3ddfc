"""A JavaScript client against a live server: the Vercel AI SDK's Open Responses provider
(@ai-sdk/open-responses, from npm, pinned in tests/js/package-lock.json) drives generate, stream
and a continuation through /v1/responses (tests/js/open_responses.mjs)."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import httpx
import pytest
from serve_helpers import ROOT, Server

CLIENTS = ROOT / "tests" / "js"


@pytest.fixture(scope="module")
def node_clients() -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed here (apt-get install nodejs npm)")
    if not (CLIENTS / "node_modules" / "@ai-sdk" / "open-responses").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel", "error"], cwd=CLIENTS, check=True,
                       timeout=600)


@pytest.mark.usefixtures("node_clients")
def test_vercel_ai_sdk_open_responses_provider(server: Server) -> None:
    model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
    done = subprocess.run(["node", "open_responses.mjs", server.url, model], cwd=CLIENTS, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["generated"] and out["streamed"] == out["generated"]  # greedy: the same reply either way
    assert out["deltas"] >= 1 and out["finishReason"] in ("stop", "length")
    usage = out["generatedUsage"]
    assert usage["inputTokens"] > 0 and 1 <= usage["outputTokens"] <= 6
    assert out["continuedUsage"]["inputTokens"] > usage["inputTokens"]  # the replayed history was read
