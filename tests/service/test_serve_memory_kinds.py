"""Memory kinds over HTTP: a model directory of another kind is served as it reads, and a state of
one kind is refused by a server of another, with a clear 409."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_helpers import Server, error_of

from hmt_core import HMTModel, SamplingParams, SessionState
from hmt_core.memory import MemoryKind
from hmt_core.temp_lora import TempLoRAConfig
from hmt_core.testing import assert_states_equal

SEG = 8  # segment_tokens of the test model


def tokens(n: int, start: int = 5) -> list[int]:
    return [(start + 13 * i) % 250 + 1 for i in range(n)]


def model_of_kind(local_model: HMTModel, directory: Path, kind: MemoryKind,
                  temp_lora: TempLoRAConfig | None = None) -> tuple[HMTModel, Path]:
    """The test model's weights under another kind of memory, saved as a model directory."""
    local_model.with_memory(kind, temp_lora).save_pretrained(directory)
    return HMTModel.from_pretrained(directory), directory


def serve(directory: Path, base: Path) -> Iterator[httpx.Client]:
    server = Server(["--model", str(directory), "--data-dir", str(base / "data")], base / "server.log").start()
    try:
        with server.client() as client:
            yield client
    finally:
        server.stop()


@pytest.fixture(scope="module")
def rmt_model(local_model: HMTModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[HMTModel, Path]:
    return model_of_kind(local_model, tmp_path_factory.mktemp("rmt-model"), "rmt")


@pytest.fixture(scope="module")
def rmt_client(rmt_model: tuple[HMTModel, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    yield from serve(rmt_model[1], tmp_path_factory.mktemp("rmt-server"))


@pytest.mark.parametrize("kind", ["temp-lora", "hmt+temp-lora"])
def test_a_model_with_adapters_is_served_as_it_reads(kind: MemoryKind, local_model: HMTModel,
                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    model, directory = model_of_kind(local_model, tmp_path_factory.mktemp("model"), kind,
                                     TempLoRAConfig(learning_rate=3e-2))
    history = tokens(3 * SEG + 2, start=9)
    expected = model.generate(model.append(model.new_session(), history),
                              SamplingParams(max_tokens=2 * SEG, ignore_eos=True)).run()
    for client in serve(directory, tmp_path_factory.mktemp("temp-lora-server")):
        sid = client.post("/sessions", json={}).json()["id"]
        for start in range(0, len(history), 7):
            assert client.post(f"/sessions/{sid}/append", json={"tokens": history[start:start + 7]}).status_code == 200
        reply = client.post(f"/sessions/{sid}/generate", json={"max_tokens": 2 * SEG, "ignore_eos": True}).json()
        assert reply["tokens"] == expected.tokens
        data = client.get(f"/sessions/{sid}/state").content
        state = SessionState.from_bytes(data)
        assert state.memory == kind and state.adapter is not None
        assert state.adapter.to_bytes() == expected.state.adapter.to_bytes()  # type: ignore[union-attr]
        assert_states_equal(state, expected.state)
        memory = client.get(f"/sessions/{sid}/memory").json()
        capacity = model.hmt_config.memory_rows
        kept = min(capacity, state.segments_committed)
        assert (memory["memory_kind"], memory["memories"], memory["memory_capacity"]) == (kind, kept, capacity)
        assert capacity == (0 if kind == "temp-lora" else model.hmt_config.ltm_context)
        assert state.segments_committed >= 4
        assert memory["state_bytes"] == len(data) > state.adapter.nbytes


def test_an_rmt_model_is_served_as_it_reads(rmt_client: httpx.Client, rmt_model: tuple[HMTModel, Path]) -> None:
    model = rmt_model[0]
    history = tokens(3 * SEG + 2)
    sid = rmt_client.post("/sessions", json={}).json()["id"]
    for start in range(0, len(history), 5):  # appended in pieces that straddle windows
        assert rmt_client.post(f"/sessions/{sid}/append", json={"tokens": history[start:start + 5]}).status_code == 200
    reply = rmt_client.post(f"/sessions/{sid}/generate", json={"max_tokens": 2 * SEG, "ignore_eos": True}).json()
    expected = model.generate(model.append(model.new_session(), history),
                              SamplingParams(max_tokens=2 * SEG, ignore_eos=True)).run()
    assert reply["tokens"] == expected.tokens
    state = SessionState.from_bytes(rmt_client.get(f"/sessions/{sid}/state").content)
    assert state.memory == "rmt" and state.ltm.shape[0] == 1 and state.segments_committed >= 4
    memory = rmt_client.get(f"/sessions/{sid}/memory").json()
    assert (memory["memory_kind"], memory["memories"], memory["memory_capacity"]) == ("rmt", 1, 1)
    # RMT reads the previous segment's memory: every recall after the first is one segment back
    assert [r["distance"] for r in memory["recalls"]] == [0] + [1] * (len(memory["recalls"]) - 1)


def test_a_state_of_another_kind_is_refused(client: httpx.Client, rmt_client: httpx.Client,
                                            local_model: HMTModel) -> None:
    hmt_sid = client.post("/sessions", json={}).json()["id"]
    assert client.post(f"/sessions/{hmt_sid}/append", json={"tokens": tokens(11)}).status_code == 200
    hmt_state = client.get(f"/sessions/{hmt_sid}/state").content
    response = rmt_client.put("/sessions/from-hmt/state", content=hmt_state)
    assert error_of(response, 409) == "model_mismatch"
    assert "keeps hmt memory, and this model keeps rmt memory" in response.json()["error"]["message"]
    assert rmt_client.get("/sessions/from-hmt").status_code == 404  # nothing half-written
    # even under this model's own fingerprint, a state of another kind is not read
    forged = SessionState.empty(local_model.dim, local_model.fingerprint, memory="window").to_bytes()
    response = client.put(f"/sessions/{hmt_sid}/state", content=forged)
    assert error_of(response, 409) == "model_mismatch" and "keeps window memory" in response.json()["error"]["message"]
    assert client.get(f"/sessions/{hmt_sid}/state").content == hmt_state
