"""Shared fixtures: tiny random models (no downloads) and an offline tokenizer."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from hmt_core import HMTConfig, HMTModel
from hmt_core.testing import tiny_hmt_model
from hmt_core.tokenizer import train_bpe_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. A memory transformer reads the text segment by segment.",
    "It keeps the last few tokens, a summary of the segment, and a cache of past memories.",
    "Long conversations resume on any replica because the state is small. Hello world, hello memory!",
] * 4


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="session")
def model() -> HMTModel:
    """Llama-family, L=8, k=3, N=4: small enough that hypothesis can run many examples."""
    return tiny_hmt_model("llama", HMTConfig(segment_tokens=8, num_sensory=3, ltm_context=4, recall_dim=16))


@pytest.fixture(scope="session")
def text_model(tokenizer: PreTrainedTokenizerFast) -> HMTModel:
    model = tiny_hmt_model("llama", HMTConfig(segment_tokens=8, num_sensory=3, ltm_context=4, recall_dim=16),
                           vocab_size=len(tokenizer), seed=1)
    model.tokenizer = tokenizer
    return model
