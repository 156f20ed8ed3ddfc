"""Tiny random-weight models of each supported family, for tests and examples (no downloads)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from hmt_core.config import HMTConfig
from hmt_core.model import HMTModel
from hmt_core.session import SessionState

FAMILIES = ("llama", "qwen2", "gpt2", "opt", "gpt_neox")

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog. A memory transformer reads the text segment by segment.",
    "It keeps the last few tokens, a summary of the segment, and a cache of past memories.",
    "Long conversations resume on any replica because the state is small. Hello world, hello memory!",
] * 4

_TINY: dict[str, dict[str, Any]] = {
    "llama": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 512},
    "qwen2": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 512},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 512},
    # word_embed_proj_dim != hidden_size exercises OPT's project_in/project_out
    "opt": {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "word_embed_proj_dim": 16, "max_position_embeddings": 512},
    "gpt_neox": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "max_position_embeddings": 512, "rotary_pct": 0.5},
}


def tiny_backbone_config(family: str = "llama", vocab_size: int = 128, **overrides: Any) -> PretrainedConfig:
    extra = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    return AutoConfig.for_model(family, vocab_size=vocab_size, **{**_TINY[family], **extra, **overrides})


def tiny_hmt_model(family: str = "llama", config: HMTConfig | None = None, seed: int = 0,
                   vocab_size: int = 128, **overrides: Any) -> HMTModel:
    """A random tiny HMT model; same seed, same weights."""
    torch.manual_seed(seed)
    backbone = AutoModelForCausalLM.from_config(tiny_backbone_config(family, vocab_size, **overrides))
    config = config or HMTConfig(segment_tokens=8, num_sensory=3, ltm_context=4, recall_dim=16)
    return HMTModel(backbone, config).eval()


def assert_states_equal(a: SessionState, b: SessionState, atol: float = 1e-5) -> None:
    """Same session: tokens and counters exactly, long-term memory within float tolerance."""
    assert a.window == b.window
    assert a.sensory == b.sensory
    assert (a.segments_committed, a.tokens_seen) == (b.segments_committed, b.tokens_seen)
    assert a.ltm.shape == b.ltm.shape
    torch.testing.assert_close(a.ltm.float().cpu(), b.ltm.float().cpu(), atol=atol, rtol=1e-4)
