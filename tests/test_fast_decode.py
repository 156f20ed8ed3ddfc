"""The lean decode step (hmt_core.fast_decode) computes what the HF forward computes."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from hmt_core import HMTConfig, HMTModel, SamplingParams, SessionState, apply_precision
from hmt_core.engine import DecodeEngine
from hmt_core.fast_decode import lean_support, lean_weights_for
from hmt_core.precision import Int8Linear, joined_linear
from hmt_core.temp_lora import TempLoRAConfig
from hmt_core.testing import assert_states_equal, tiny_hmt_model

# 64 wide: the int8 kernel's path (input widths that are multiples of 16), 16-wide heads, GQA 4:2
SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}


def _model(precision: str = "fp32", **overrides: Any) -> HMTModel:
    model = tiny_hmt_model("llama", **{**SHAPE, **overrides})
    return apply_precision(model, precision) if precision != "fp32" else model


def _sessions(model: HMTModel, lengths: tuple[int, ...] = (1, 7, 8, 9, 17, 30)) -> list[SessionState]:
    rng = random.Random(0)
    return [model.append(model.new_session(), [rng.randrange(model.vocab_size) for _ in range(n)]) for n in lengths]


Decoded = tuple[DecodeEngine, list[list[int]], list[SessionState], list[torch.Tensor]]


def _decode(model: HMTModel, states: list[SessionState], lean: bool, tokens: int = 20,
            forced: list[int] | None = None) -> Decoded:
    """Every row decodes `tokens` (greedy, or `forced` ones); returns the tokens, the final states
    and each step's next-token logits of all rows."""
    engine = DecodeEngine(model, max_rows=len(states), lean=lean)
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    rows = [engine.add(state, params) for state in states]
    engine.admit()
    logits = []
    step = 0
    while engine.size:
        engine.step({row: forced[step] for row in engine.rows} if forced else None)
        step += 1
        if engine.rows:
            logits.append(engine._logits[:len(engine.rows)].clone())  # type: ignore[index]
    return engine, [row.tokens for row in rows], [row.state for row in rows], logits


def test_lean_greedy_decoding_equals_hf_in_fp32() -> None:
    """Token-identical greedy decoding, windows committing on the way (3 segments of replies), the
    same memories, and next-token logits equal within float rounding."""
    model = _model()
    states = _sessions(model)
    lean, lean_tokens, lean_states, lean_logits = _decode(model, states, lean=True, tokens=26)
    hf, hf_tokens, hf_states, hf_logits = _decode(model, states, lean=False, tokens=26)
    assert lean.lean and not hf.lean
    assert lean_tokens == hf_tokens
    assert all(state.segments_committed >= 3 for state in lean_states)
    for lean_state, hf_state in zip(lean_states, hf_states, strict=True):
        assert_states_equal(lean_state, hf_state)
    for a, b in zip(lean_logits, hf_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "int8", "int4"])
def test_lean_logits_match_hf_in_low_precision(precision: str) -> None:
    """The same forced tokens through both paths: next-token logits close (the same ops and dtypes;
    q/k/v and gate/up joined into one matmul each for bf16 and int8)."""
    model = _model(precision)
    states = _sessions(model)
    rng = random.Random(1)
    forced = [rng.randrange(model.vocab_size) for _ in range(12)]
    _, lean_tokens, _, lean_logits = _decode(model, states, lean=True, tokens=12, forced=forced)
    _, hf_tokens, _, hf_logits = _decode(model, states, lean=False, tokens=12, forced=forced)
    assert lean_tokens == hf_tokens == [forced] * len(states)
    for a, b in zip(lean_logits, hf_logits, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_biases_and_untied_head() -> None:
    """Llama with attention and MLP biases (joined with their layers) and an untied LM head."""
    model = _model(attention_bias=True, mlp_bias=True, tie_word_embeddings=False)
    states = _sessions(model, (5, 12))
    assert _decode(model, states, lean=True)[1] == _decode(model, states, lean=False)[1]


def test_joined_linear_is_the_layers_side_by_side() -> None:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(32, n, bias=True) for n in (48, 16, 16)]
    x = torch.randn(3, 32)
    joined = joined_linear(layers)
    assert joined is not None
    torch.testing.assert_close(joined(x), torch.cat([layer(x) for layer in layers], dim=-1))
    int8 = [Int8Linear(layer.weight, None) for layer in layers]
    joined = joined_linear(int8)
    assert isinstance(joined, Int8Linear) and joined.replaced == {}  # never fingerprinted: not in the model
    xb = x.bfloat16()
    assert torch.equal(joined(xb), torch.cat([layer(xb) for layer in int8], dim=-1))
    assert joined_linear([layers[0], int8[1]]) is None  # different kinds stay separate


def test_other_backbones_and_temp_lora_decode_on_the_hf_path() -> None:
    assert lean_support(tiny_hmt_model("gpt2")) == "gpt2 backbones decode on the HF path"
    assert DecodeEngine(tiny_hmt_model("qwen2")).lean_reason is not None
    config = HMTConfig(segment_tokens=8, num_sensory=3, ltm_context=4, recall_dim=16, memory="temp-lora",
                       temp_lora=TempLoRAConfig())
    engine = DecodeEngine(tiny_hmt_model("llama", config=config))
    assert not engine.lean and "Temp-LoRA" in str(engine.lean_reason)


def test_lean_weights_are_rebuilt_when_the_backbone_changes() -> None:
    model = _model()
    states = _sessions(model, (9,))
    before = _decode(model, states, lean=True)[1]
    weights = lean_weights_for(model, 13)
    assert lean_weights_for(model, 13) is weights  # reused by the next engine
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.backbone.parameters():  # in place, as an optimizer step
            parameter.add_(torch.randn_like(parameter) * 0.5)
    assert lean_weights_for(model, 13) is not weights
    assert _decode(model, states, lean=True)[1] == _decode(model, states, lean=False)[1] != before


def test_compiled_rows_are_bucketed() -> None:
    """Rows joining and leaving within a bucket reuse its compiled graph: one compilation per
    bucket that the batch passes through (a counting backend: no code generation in this test)."""
    model = _model()
    counter = CompileCounter()
    engine = DecodeEngine(model, max_rows=6, compile=True, compile_backend=counter)
    assert engine.lean and engine.buckets() == [1, 2, 4, 6]
    states = _sessions(model)
    params = [SamplingParams(max_tokens=2 + 3 * i, ignore_eos=True) for i in range(6)]  # rows leave one by one
    rows = [engine.add(state, param) for state, param in zip(states, params, strict=True)]
    sizes = []
    while engine.size:
        sizes.append(len(engine.rows) or len(engine.joining))
        engine.step()
    assert sizes.count(6) + sizes.count(5) > 2 and sizes.count(4) + sizes.count(3) > 2  # steps within buckets
    assert counter.frame_count == 4  # 6 (6, 5 rows), 4 (4, 3), 2, 1
    reference = DecodeEngine(model, max_rows=6, lean=False)
    hf_rows = [reference.add(state, param) for state, param in zip(states, params, strict=True)]
    while reference.size:
        reference.step()
    assert [row.tokens for row in rows] == [row.tokens for row in hf_rows]
    assert engine.warm_up() >= 0 and counter.frame_count == 4  # every bucket already compiled


@pytest.mark.slow
def test_compiled_lean_step_equals_eager_with_inductor() -> None:
    """The real compiler (inductor, CPU code generation) on one bucket: warm_up compiles it and
    reports the time; the compiled engine decodes the eager tokens."""
    model = _model()
    states = _sessions(model, (9,))
    engine = DecodeEngine(model, max_rows=1, compile=True)
    assert engine.warm_up() > 0 and engine.compile_seconds > 0
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    row = engine.add(states[0], params)
    while engine.size:
        engine.step()
    assert row.tokens == _decode(model, states, lean=True, tokens=12)[1][0]


def test_the_worker_never_compiles_temp_lora_rows() -> None:
    from service.worker import ModelWorker

    config = HMTConfig(segment_tokens=8, num_sensory=3, ltm_context=4, recall_dim=16, memory="temp-lora",
                       temp_lora=TempLoRAConfig())
    worker = ModelWorker(tiny_hmt_model("llama", config=config), max_batch=2, compile=True)
    assert not worker.compile and not worker.engine.compiled
