"""The opt-in learned scale for injected memories (HMTConfig.memory_input_scale, #27's gate): every prompt built
from memories is scaled, nothing else changes, and the scale is saved, trained and fingerprinted."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hmt_core import HMTConfig, HMTModel
from hmt_core.errors import InvalidInputError
from hmt_core.testing import tiny_hmt_model
from hmt_lab.episodes import EpisodeConfig, prepare

CONFIG = HMTConfig(segment_tokens=8, num_sensory=2, ltm_context=4, recall_dim=16)


def scaled(scale: float, memory: str = "hmt") -> HMTModel:
    return tiny_hmt_model("llama", replace(CONFIG, memory=memory, memory_input_scale=scale), seed=3)


@pytest.mark.parametrize("memory", ["hmt", "rmt"])
def test_prompts_from_memories_are_scaled_and_the_initial_memory_is_not(memory: str) -> None:
    plain = tiny_hmt_model("llama", replace(CONFIG, memory=memory), seed=3)
    model = scaled(0.25, memory)
    memories = torch.randn(3, 4, model.dim) * 8
    lengths = torch.tensor([0, 2, 4])
    queries = torch.randn(3, model.dim)
    with torch.no_grad():
        want = plain.memory.prompts(plain, memories, lengths, queries).prompts
        got = model.memory.prompts(model, memories, lengths, queries).prompts
    torch.testing.assert_close(got[0], want[0])  # no memory yet: the initial memory, as it is
    torch.testing.assert_close(got[1:], 0.25 * want[1:], rtol=1e-2, atol=1e-3)  # bf16 recall: a rounding


def test_the_scale_is_saved_loaded_and_in_the_fingerprint(tmp_path: Path) -> None:
    model = scaled(0.25)
    with torch.no_grad():
        assert model.memory_log_scale is not None
        model.memory_log_scale.fill_(math.log(0.1))
    model.save_pretrained(tmp_path / "m")
    loaded = HMTModel.from_pretrained(tmp_path / "m")
    assert loaded.hmt_config.memory_input_scale == 0.25
    assert loaded.memory_log_scale is not None
    assert float(loaded.memory_log_scale.detach().exp()) == pytest.approx(0.1)
    assert loaded.fingerprint == model.fingerprint
    assert tiny_hmt_model("llama", CONFIG, seed=3).fingerprint != model.fingerprint
    assert "memory_input_scale" not in CONFIG.to_dict()  # models without it keep their files and fingerprints


def test_a_model_without_the_scale_gets_one_to_train() -> None:
    model = tiny_hmt_model("llama", CONFIG, seed=3)
    before = model.fingerprint
    groups = prepare(model, EpisodeConfig(memory_input_scale=0.05, backbone_training="full"))
    assert model.memory_log_scale is not None and model.memory_log_scale.requires_grad
    assert any(p is model.memory_log_scale for p in groups[0]["params"])  # trained with HMT's own parameters
    assert model.hmt_config.memory_input_scale == 0.05 and model.fingerprint != before
    with pytest.raises(InvalidInputError, match="already scales"):
        model.add_memory_input_scale(0.1)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_a_scale_must_be_positive(bad: float) -> None:
    with pytest.raises(InvalidInputError, match="memory_input_scale"):
        HMTConfig(memory_input_scale=bad)
