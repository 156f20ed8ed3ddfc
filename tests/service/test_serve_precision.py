"""--precision / HMT_PRECISION reach a real hmt-serve, and a session moves between replicas of
different precision on one Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_helpers import RedisServer, Server

from service.main import load_model
from service.settings import parse_args


@pytest.fixture(scope="module")
def replicas(model_dir: Path, redis_server: RedisServer,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """Replicas of one model on one Redis: by flag, by environment variable, and by default."""
    base = tmp_path_factory.mktemp("precision")
    shared = ["--model", str(model_dir), "--redis-url", redis_server.url]
    servers = {
        "flag": Server([*shared, "--precision", "bf16"], base / "flag.log"),
        "env": Server(shared, base / "env.log", env={"HMT_PRECISION": "int8"}),
        "default": Server(shared, base / "default.log", env={"HMT_PRECISION": None}),
        "fp32": Server(shared, base / "fp32.log"),  # the tests' own default (serve_helpers)
    }
    for server in servers.values():
        server.launch()
    try:
        yield {name: server.wait_ready() for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()


def test_the_precision_reaches_the_server(replicas: dict[str, Server]) -> None:
    ready = {name: server.client().get("/readyz").json() for name, server in replicas.items()}
    assert {name: r["precision"] for name, r in ready.items()} == \
        {"flag": "bf16", "env": "int8", "default": "int8", "fp32": "fp32"}  # the CPU default is int8
    assert len({r["fingerprint"] for r in ready.values()}) == 1  # one model whatever its precision
    memory = {}
    for name in ("fp32", "env"):
        metrics = replicas[name].client().get("/metrics").text
        memory[name] = float(next(line.split()[1] for line in metrics.splitlines()
                                  if line.startswith("hmt_model_memory_bytes ")))
    assert memory["env"] < memory["fp32"] / 2.5  # the packed int8 weights are counted, and smaller


def test_a_session_moves_between_precisions(replicas: dict[str, Server]) -> None:
    text = "the quick brown fox jumps over the lazy dog. hello world, this is a tiny tokenizer for tests."
    with replicas["env"].client() as int8, replicas["fp32"].client() as fp32, replicas["flag"].client() as bf16:
        session = int8.post("/sessions", json={}).json()["id"]
        assert int8.post(f"/sessions/{session}/append", json={"text": text}).status_code == 200
        appended = fp32.post(f"/sessions/{session}/append", json={"text": " hello memory"})  # fp32 continues it
        assert appended.status_code == 200, appended.text
        reply = bf16.post(f"/sessions/{session}/generate", json={"max_tokens": 4, "ignore_eos": True})
        assert reply.status_code == 200 and len(reply.json()["tokens"]) == 4  # and bf16 generates from it
        info = int8.get(f"/sessions/{session}").json()
        assert info["segments_total"] >= 2 and info["tokens_seen"] == appended.json()["tokens_seen"] + 4
        exported = fp32.get(f"/sessions/{session}/state").content  # state bytes: fp32 whatever made them
        assert int8.put(f"/sessions/{session}-copy/state", content=exported).status_code in (200, 201)


def test_bad_precision_settings_are_refused(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="precision"):
        parse_args(["--precision", "int3"])
    monkeypatch.setenv("HMT_PRECISION", "int4")
    assert parse_args([]).precision == "int4"
    with pytest.raises(SystemExit, match="not both"):
        load_model(parse_args(["--model", str(model_dir), "--dtype", "bfloat16", "--precision", "int8"]))
