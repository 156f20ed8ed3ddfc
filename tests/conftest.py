"""Shared fixtures: tiny random models (no downloads) and an offline tokenizer."""

from __future__ import annotations

from collections.abc import Generator

import ci_policy
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from hmt_core import HMTConfig, HMTModel
from hmt_core.testing import SAMPLE_TEXTS, tiny_hmt_model
from hmt_core.tokenizer import train_bpe_tokenizer

# as hmt-serve does: tiny random models produce subnormal activations that make CPU matmuls ~10x slower
torch.set_flush_denormal(True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    ci_policy.enforce(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, None, None]:
    outcome = yield
    ci_policy.enforce(outcome.get_result())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    ci_policy.summarize(terminalreporter)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer(SAMPLE_TEXTS, vocab_size=300)


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
