"""hmt_core.temp_lora: Temp-LoRA adapters on tiny random backbones (no downloads)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from hmt_core.temp_lora import (
    Adapter,
    TempLoRAConfig,
    adapters_applied,
    new_adapter,
    score_document,
    target_modules,
    train_adapter,
)

VOCAB = 128


def _llama(seed: int = 0, **overrides: float) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    kwargs = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}
    return LlamaForCausalLM(LlamaConfig(**(kwargs | overrides))).eval()


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return _llama()


@pytest.fixture(scope="module")
def llama_wide() -> LlamaForCausalLM:
    """For the learning tests: with the default init (0.02) the final RMSNorm and LM head cap every logit at
    about 32 * 0.02 = 0.6, so nothing before the head can move the loss far from ln(128), whatever it learns.
    A wider init gives the logit range a trained model has."""
    return _llama(initializer_range=0.3)


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=1024)).eval()


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _logits(model: PreTrainedModel, ids: Sequence[Sequence[int]]) -> Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), use_cache=False).logits


def _chunk_loss(model: PreTrainedModel, adapter: Adapter | None, context: list[int], chunk: list[int]) -> float:
    """Mean NLL of chunk's tokens after context (first chunk token unscored when there is no context)."""
    ids = context + chunk
    start = max(len(context), 1)
    with torch.no_grad(), adapters_applied(model, [adapter]):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    return float(torch.nn.functional.cross_entropy(logits[start - 1:-1], torch.tensor(ids[start:])))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def _assert_same_adapter(x: Adapter, y: Adapter) -> None:
    assert (x.rank, x.alpha, x.commits) == (y.rank, y.alpha, y.commits)
    assert x.a.keys() == y.a.keys() == x.b.keys() == y.b.keys()
    for name in x.a:
        assert torch.equal(x.a[name], y.a[name]) and torch.equal(x.b[name], y.b[name]), name


def _trained(model: PreTrainedModel, cfg: TempLoRAConfig, seed: int) -> Adapter:
    adapter, _ = train_adapter(model, new_adapter(model, cfg), [], _tokens(24, seed), cfg)
    return adapter


# -- config --------------------------------------------------------------------------------------------------


def test_config_defaults_round_trip_through_json() -> None:
    cfg = TempLoRAConfig()
    assert (cfg.rank, cfg.alpha, cfg.steps, cfg.target_modules, cfg.context_tokens, cfg.seed) == (
        8, 16.0, 2, ("q_proj", "v_proj"), 256, 0)
    assert cfg.scaling == 2.0
    other = TempLoRAConfig(rank=4, alpha=4, steps=3, learning_rate=5e-5, target_modules=("c_attn",),
                           context_tokens=0, seed=7)
    for c in (cfg, other):
        back = TempLoRAConfig.from_dict(json.loads(json.dumps(c.to_dict())))
        assert back == c and isinstance(back.target_modules, tuple)


@pytest.mark.parametrize("bad", [
    {"rank": 0}, {"rank": 2.5}, {"rank": True}, {"alpha": 0.0}, {"alpha": float("nan")}, {"alpha": "16"},
    {"steps": 0}, {"steps": -1}, {"learning_rate": 0.0}, {"learning_rate": float("inf")},
    {"target_modules": ()}, {"target_modules": "q_proj"}, {"target_modules": ("",)}, {"target_modules": (3,)},
    {"context_tokens": -1}, {"context_tokens": 1.0}, {"seed": -1},
])
def test_bad_config_values_raise(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        TempLoRAConfig(**bad)  # type: ignore[arg-type]


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown TempLoRAConfig keys"):
        TempLoRAConfig.from_dict({"rank": 4, "lora_dropout": 0.05})


# -- target modules ------------------------------------------------------------------------------------------


def test_target_modules_sorted_shapes_never_the_head(llama: LlamaForCausalLM) -> None:
    found = target_modules(llama, TempLoRAConfig())
    assert list(found) == sorted(found) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert found["model.layers.0.self_attn.q_proj"] == (32, 32)
    assert found["model.layers.0.self_attn.v_proj"] == (32, 16)  # 2 KV heads of 8
    with pytest.raises(ValueError, match="no Linear-like module"):
        target_modules(llama, TempLoRAConfig(target_modules=("lm_head",)))


def test_no_matching_module_names_the_available_ones(llama: LlamaForCausalLM) -> None:
    # "proj" matches on a dot boundary only, so it is not a suffix of "q_proj"
    with pytest.raises(ValueError, match="no Linear-like module") as err:
        target_modules(llama, TempLoRAConfig(target_modules=("proj", "c_attn")))
    message = str(err.value)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert f"'{name}'" in message
    assert "lm_head" not in message


# -- applying ------------------------------------------------------------------------------------------------


def test_new_adapter_changes_nothing_and_is_deterministic(llama: LlamaForCausalLM) -> None:
    cfg = TempLoRAConfig()
    adapter = new_adapter(llama, cfg)
    assert adapter.commits == 0 and adapter.rank == 8 and adapter.scaling == 2.0
    assert adapter.modules == target_modules(llama, cfg)
    assert all(not b.any() for b in adapter.b.values()) and all(a.abs().sum() > 0 for a in adapter.a.values())
    assert adapter.nbytes == 4 * 8 * ((32 + 32) * 2 + (32 + 16) * 2)
    _assert_same_adapter(adapter, new_adapter(llama, cfg))
    assert not torch.equal(adapter.a["model.layers.0.self_attn.q_proj"],
                           new_adapter(llama, TempLoRAConfig(seed=1)).a["model.layers.0.self_attn.q_proj"])
    ids = [_tokens(12, 1), _tokens(12, 2)]
    bare = _logits(llama, ids)
    with adapters_applied(llama, [adapter, adapter]):
        assert torch.equal(_logits(llama, ids), bare)


def _run_rows(model: PreTrainedModel, adapters: Sequence[Adapter | None], prompts: list[list[int]],
              step: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Prefill with a KV cache, then a one-token decode; and a one-token input without cache."""
    with torch.no_grad(), adapters_applied(model, adapters):
        prefill = model(input_ids=torch.tensor(prompts), use_cache=True)
        decode = model(input_ids=torch.tensor(step).unsqueeze(1), past_key_values=prefill.past_key_values,
                       use_cache=True)
        single = model(input_ids=torch.tensor(step).unsqueeze(1), use_cache=False)
    return prefill.logits, decode.logits, single.logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_rows_each_get_their_own_adapter(arch: str, request: pytest.FixtureRequest) -> None:
    model: PreTrainedModel = request.getfixturevalue(arch)
    cfg = TempLoRAConfig(steps=5, learning_rate=5e-2,
                         target_modules=("q_proj", "v_proj") if arch == "llama" else ("c_attn",))
    a1, a2 = _trained(model, cfg, seed=11), _trained(model, cfg, seed=12)
    adapters = [a1, None, a2]
    prompts = [_tokens(9, 21), _tokens(9, 22), _tokens(9, 23)]
    step = [5, 6, 7]
    batched = _run_rows(model, adapters, prompts, step)
    for row, adapter in enumerate(adapters):
        alone = _run_rows(model, [adapter], [prompts[row]], [step[row]])
        for got, want in zip(batched, alone, strict=True):
            torch.testing.assert_close(got[row], want[0], atol=1e-5, rtol=0)
    # teeth: the trained adapters really change each row (else equality above proves nothing)
    bare = _run_rows(model, [None, None, None], prompts, step)
    for row in (0, 2):
        for got, want in zip(batched, bare, strict=True):
            assert (got[row] - want[row]).abs().max() > 1e-2
    alone_other = _run_rows(model, [a2], [prompts[0]], [step[0]])
    assert (batched[0][0] - alone_other[0][0]).abs().max() > 1e-2


def test_rows_with_different_ranks_and_scalings(llama: LlamaForCausalLM) -> None:
    small = _trained(llama, TempLoRAConfig(rank=2, alpha=8.0, steps=3, learning_rate=5e-2), seed=31)
    large = _trained(llama, TempLoRAConfig(rank=8, steps=3, learning_rate=5e-2), seed=32)
    prompts = [_tokens(6, 41), _tokens(6, 42)]
    with adapters_applied(llama, [small, large]):
        batched = _logits(llama, prompts)
    for row, adapter in enumerate((small, large)):
        with adapters_applied(llama, [adapter]):
            torch.testing.assert_close(batched[row], _logits(llama, [prompts[row]])[0], atol=1e-5, rtol=0)
    # an explicit scaling overrides the adapters' own: 0 switches them off, and it is linear in the delta
    bare = _logits(llama, prompts)
    with adapters_applied(llama, [small, large], scaling=0.0):
        assert torch.equal(_logits(llama, prompts), bare)
    with adapters_applied(llama, [small], scaling=small.scaling):
        torch.testing.assert_close(_logits(llama, prompts[:1]), batched[:1], atol=1e-5, rtol=0)


def test_hooks_removed_on_exit_and_on_exception(llama: LlamaForCausalLM) -> None:
    adapter = _trained(llama, TempLoRAConfig(steps=3, learning_rate=5e-2), seed=51)
    ids = [_tokens(8, 52)]
    before, bare = _hook_count(llama), _logits(llama, ids)
    with adapters_applied(llama, [adapter]):
        assert _hook_count(llama) == before + 4
        assert not torch.equal(_logits(llama, ids), bare)
    assert _hook_count(llama) == before and torch.equal(_logits(llama, ids), bare)
    with pytest.raises(RuntimeError, match="boom"), adapters_applied(llama, [adapter, None]):
        raise RuntimeError("boom")
    assert _hook_count(llama) == before
    # a batch that does not match the adapters is refused, and the hooks go too
    with pytest.raises(ValueError, match=r"2 adapters but .* batch of 1"), adapters_applied(llama, [adapter, None]):
        _logits(llama, ids)
    assert _hook_count(llama) == before and torch.equal(_logits(llama, ids), bare)


def test_adapter_for_another_backbone_is_refused(llama: LlamaForCausalLM, gpt2: GPT2LMHeadModel) -> None:
    before = _hook_count(llama)
    gpt_adapter = new_adapter(gpt2, TempLoRAConfig(target_modules=("c_attn",)))
    with pytest.raises(ValueError, match="not a Linear-like module"), adapters_applied(llama, [gpt_adapter]):
        pass
    other_shape = new_adapter(_llama(hidden_size=16, intermediate_size=32), TempLoRAConfig())
    with pytest.raises(ValueError, match=r"\(in, out\)"), adapters_applied(llama, [other_shape]):
        pass
    assert _hook_count(llama) == before


def test_adapter_rejects_inconsistent_factors() -> None:
    a = {"m": torch.zeros(4, 8)}
    with pytest.raises(ValueError, match="A \\[rank=4"):
        Adapter(a, {"m": torch.zeros(6, 3)}, rank=4, alpha=8.0)
    with pytest.raises(ValueError, match="same, non-empty set"):
        Adapter(a, {"n": torch.zeros(6, 4)}, rank=4, alpha=8.0)
    with pytest.raises(ValueError, match="float32"):
        Adapter({"m": torch.zeros(4, 8, dtype=torch.float64)}, {"m": torch.zeros(6, 4)}, rank=4, alpha=8.0)


# -- training ------------------------------------------------------------------------------------------------


def test_training_memorises_the_chunk(llama_wide: LlamaForCausalLM) -> None:
    cfg = TempLoRAConfig(steps=20, learning_rate=2e-2)
    chunk = _tokens(64, 61)
    before = _chunk_loss(llama_wide, None, [], chunk)
    adapter, losses = train_adapter(llama_wide, new_adapter(llama_wide, cfg), [], chunk, cfg)
    after = _chunk_loss(llama_wide, adapter, [], chunk)
    assert len(losses) == 20 and adapter.commits == 1
    assert losses[0] == pytest.approx(before, abs=1e-5)  # B = 0: the first step starts from the bare model
    assert after < 0.5 * before, (before, after, losses)
    # it is this chunk that was learned, not a general shift: an unrelated chunk gains far less
    other = _tokens(64, 62)
    assert _chunk_loss(llama_wide, adapter, [], other) > after + 1.0


def test_loss_is_on_the_chunk_after_the_truncated_context(llama: LlamaForCausalLM) -> None:
    cfg = TempLoRAConfig(steps=1, context_tokens=5)
    context, chunk = _tokens(20, 71), _tokens(10, 72)
    _, losses = train_adapter(llama, new_adapter(llama, cfg), context, chunk, cfg)
    # the first chunk token is predicted from the last context token; only the last 5 context tokens are read
    assert losses[0] == pytest.approx(_chunk_loss(llama, None, context[-5:], chunk), abs=1e-5)
    assert losses[0] != pytest.approx(_chunk_loss(llama, None, context[-6:], chunk), abs=1e-5)
    _, no_context = train_adapter(llama, new_adapter(llama, cfg), [], chunk, cfg)
    assert no_context[0] == pytest.approx(_chunk_loss(llama, None, [], chunk), abs=1e-5)
    with pytest.raises(ValueError, match="nothing to train on"):
        train_adapter(llama, new_adapter(llama, cfg), [], chunk[:1], cfg)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        train_adapter(llama, new_adapter(llama, cfg), [], [1, VOCAB], cfg)


def test_a_memory_prompt_is_read_before_the_context_and_predicts_the_first_token(llama: LlamaForCausalLM) -> None:
    """HMT+Temp-LoRA trains on [p, context, chunk]: the loss is the chunk's, every token of it scored
    (the first from p when there is no context), with positions as HMT reads its segment."""
    cfg = TempLoRAConfig(steps=1, context_tokens=5)
    context, chunk = _tokens(20, 73), _tokens(10, 74)
    prompt = torch.randn(llama.config.hidden_size, generator=torch.Generator().manual_seed(75)) * 0.02

    def loss_after_prompt(ctx: list[int], targets: list[int]) -> float:
        embeds = llama.get_input_embeddings()(torch.tensor([ctx + targets]))
        with torch.no_grad():
            logits = llama(inputs_embeds=torch.cat([prompt[None, None], embeds], dim=1), use_cache=False).logits[0]
        return float(torch.nn.functional.cross_entropy(logits[len(ctx):-1], torch.tensor(targets)))

    _, losses = train_adapter(llama, new_adapter(llama, cfg), context, chunk, cfg, prompt)
    assert losses[0] == pytest.approx(loss_after_prompt(context[-5:], chunk), abs=1e-5)
    assert losses[0] != pytest.approx(_chunk_loss(llama, None, context[-5:], chunk), abs=1e-3)  # p is read
    _, whole = train_adapter(llama, new_adapter(llama, cfg), [], chunk, cfg, prompt)
    assert whole[0] == pytest.approx(loss_after_prompt([], chunk), abs=1e-5)
    _, one = train_adapter(llama, new_adapter(llama, cfg), [], chunk[:1], cfg, prompt)  # without p: nothing to train
    assert one[0] == pytest.approx(loss_after_prompt([], chunk[:1]), abs=1e-5)


def test_training_leaves_backbone_and_input_adapter_untouched(llama: LlamaForCausalLM) -> None:
    cfg = TempLoRAConfig(steps=3, learning_rate=5e-2)
    adapter = _trained(llama, cfg, seed=81)
    saved = Adapter.from_bytes(adapter.to_bytes())
    weights = {k: v.clone() for k, v in llama.state_dict().items()}
    # mixed flags and modes, as a caller may have left them: all must come back as they were
    llama.model.embed_tokens.weight.requires_grad_(False)
    llama.model.layers[1].train()
    flags = {n: p.requires_grad for n, p in llama.named_parameters()}
    modes = {n: m.training for n, m in llama.named_modules()}
    try:
        with torch.no_grad():  # as a server calls it
            new, losses = train_adapter(llama, adapter, _tokens(8, 82), _tokens(16, 83), cfg)
        assert all(torch.equal(v, weights[k]) for k, v in llama.state_dict().items())
        assert {n: p.requires_grad for n, p in llama.named_parameters()} == flags
        assert {n: m.training for n, m in llama.named_modules()} == modes
        assert all(p.grad is None for p in llama.parameters())
        with torch.inference_mode():  # also inside inference mode
            again, _ = train_adapter(llama, adapter, _tokens(8, 82), _tokens(16, 83), cfg)
        _assert_same_adapter(again, new)
        assert {n: p.requires_grad for n, p in llama.named_parameters()} == flags
    finally:
        llama.requires_grad_(True)
        llama.eval()
    _assert_same_adapter(adapter, saved)
    assert new.commits == adapter.commits + 1 and len(losses) == 3
    assert not torch.equal(new.b["model.layers.0.self_attn.v_proj"], adapter.b["model.layers.0.self_attn.v_proj"])
    assert all(not t.requires_grad for t in (*new.a.values(), *new.b.values()))


def test_training_is_deterministic_and_ignores_dropout() -> None:
    # dropout on and the model in train mode: a commit must still run in eval mode and repeat exactly
    model = _llama(attention_dropout=0.5).train()
    cfg = TempLoRAConfig(steps=3, learning_rate=1e-2, context_tokens=4)
    context, chunk = _tokens(10, 91), _tokens(12, 92)
    first, first_losses = train_adapter(model, new_adapter(model, cfg), context, chunk, cfg)
    second, second_losses = train_adapter(model, new_adapter(model, cfg), context, chunk, cfg)
    _assert_same_adapter(first, second)
    assert first_losses == second_losses
    assert first.to_bytes() == second.to_bytes()
    assert model.training


def test_gpt2_conv1d_apply_and_train(gpt2: GPT2LMHeadModel) -> None:
    cfg = TempLoRAConfig(steps=10, learning_rate=2e-2, target_modules=("c_attn",))
    found = target_modules(gpt2, cfg)
    assert found == {"transformer.h.0.attn.c_attn": (32, 96), "transformer.h.1.attn.c_attn": (32, 96)}
    adapter = new_adapter(gpt2, cfg)
    ids = [_tokens(10, 101)]
    bare = _logits(gpt2, ids)
    with adapters_applied(gpt2, [adapter]):
        assert torch.equal(_logits(gpt2, ids), bare)
    gpt2.train()  # GPT-2 has dropout 0.1 by default: training must switch it off and restore the mode
    try:
        chunk = _tokens(32, 102)
        trained, losses = train_adapter(gpt2, adapter, [], chunk, cfg)
        again, _ = train_adapter(gpt2, adapter, [], chunk, cfg)
        assert gpt2.training
    finally:
        gpt2.eval()
    _assert_same_adapter(trained, again)
    # GPT-2's 0.02 init caps the logits (see llama_wide), so the loss cannot fall far: it must fall
    assert _chunk_loss(gpt2, trained, [], chunk) < losses[0] - 0.1
    with adapters_applied(gpt2, [trained]):
        assert not torch.allclose(_logits(gpt2, ids), bare, atol=1e-3)


# -- serialisation -------------------------------------------------------------------------------------------


def test_bytes_round_trip_exactly(llama: LlamaForCausalLM) -> None:
    cfg = TempLoRAConfig(alpha=0.1 + 0.2, steps=2, learning_rate=5e-2)  # an alpha with no short decimal form
    adapter, _ = train_adapter(llama, _trained(llama, cfg, seed=111), [], _tokens(12, 112), cfg)
    data = adapter.to_bytes()
    back = Adapter.from_bytes(data)
    _assert_same_adapter(back, adapter)
    assert back.alpha == 0.1 + 0.2 and back.commits == 2
    assert back.to_bytes() == data and Adapter.from_bytes(bytearray(data)).nbytes == adapter.nbytes
    assert adapter.nbytes <= len(data) < adapter.nbytes + 4096


def _adapter_like(b_rank: int = 2, **header: object) -> bytes:
    return save_safetensors({"m.lora_A": torch.zeros(2, 4), "m.lora_B": torch.zeros(3, b_rank)},
                            metadata={"hmt-temp-lora": json.dumps(header)})


@pytest.mark.parametrize("garbage", [
    b"", b"\x00" * 3, b"not a safetensors file at all", bytes(range(256)) * 4,
    save_safetensors({"x": torch.zeros(2)}),  # safetensors, but not an adapter
    _adapter_like(format_version=1, rank=2, commits=0),  # no alpha
    _adapter_like(format_version=2, rank=2, alpha=4.0, commits=0),  # a future format
    _adapter_like(format_version=1, rank="2", alpha=4.0, commits=0),  # rank not an integer
    _adapter_like(format_version=1, rank=2, alpha=4.0, commits=0, b_rank=3),  # B's rank is wrong
    save_safetensors({"m.lora_A": torch.zeros(2, 4)}, metadata={"hmt-temp-lora": "{not json"}),
])
def test_garbage_bytes_raise_value_error(garbage: bytes) -> None:
    with pytest.raises(ValueError):
        Adapter.from_bytes(garbage)


def test_truncated_bytes_raise_value_error(llama: LlamaForCausalLM) -> None:
    data = new_adapter(llama, TempLoRAConfig()).to_bytes()
    for cut in (7, 40, len(data) // 2, len(data) - 1):
        with pytest.raises(ValueError):
            Adapter.from_bytes(data[:cut])


# -- reading a document --------------------------------------------------------------------------------------


def _window_nll(model: PreTrainedModel, ids: list[int], context_tokens: int, chunk_tokens: int) -> Tensor:
    """The bare backbone reading the same windows as score_document: what Temp-LoRA is compared with."""
    out = torch.zeros(len(ids) - 1)
    for begin in range(0, len(ids), chunk_tokens):
        end = min(begin + chunk_tokens, len(ids))
        context = ids[max(0, begin - context_tokens):begin]
        window, start = context + ids[begin:end], max(len(context), 1)
        logits = _logits(model, [window])[0]
        out[begin + start - len(context) - 1:end - 1] = torch.nn.functional.cross_entropy(
            logits[start - 1:-1], torch.tensor(window[start:]), reduction="none")
    return out


def test_score_document_remembers_repeats_beyond_the_window(llama_wide: LlamaForCausalLM) -> None:
    block = _tokens(48, 121)
    document = block * 4  # each repeat is 48 tokens away, the window sees 16
    cfg = TempLoRAConfig(steps=5, learning_rate=2e-2, context_tokens=16)
    nll = score_document(llama_wide, document, cfg, chunk_tokens=48)
    bare = _window_nll(llama_wide, document, 16, 48)
    assert nll.shape == (len(document) - 1,) and nll.dtype == torch.float32 and torch.isfinite(nll).all()
    # the first chunk is read with a fresh adapter: exactly the bare model
    assert torch.equal(nll[:47], bare[:47])
    repeats = [nll[47 + 48 * i:95 + 48 * i].mean().item() for i in range(3)]
    bare_repeats = bare[47:].mean().item()
    assert sum(repeats) / 3 < 0.75 * bare_repeats, (repeats, bare_repeats)
    assert repeats[2] < repeats[0]  # the more often the block was committed, the better it is known


def test_score_document_edges(llama: LlamaForCausalLM) -> None:
    cfg = TempLoRAConfig(steps=1)
    assert score_document(llama, [5], cfg, chunk_tokens=4).shape == (0,)
    # one chunk only: no training happens, the bare model's NLL
    doc = _tokens(7, 131)
    torch.testing.assert_close(score_document(llama, doc, cfg, chunk_tokens=8), _window_nll(llama, doc, 256, 8),
                               atol=1e-6, rtol=0)
    # a last chunk of a single token is still scored
    assert score_document(llama, _tokens(9, 132), cfg, chunk_tokens=4).shape == (8,)
    with pytest.raises(ValueError, match="chunk_tokens"):
        score_document(llama, doc, cfg, chunk_tokens=1)
