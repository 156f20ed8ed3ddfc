"""Checkpoint layouts: HMT-pytorch (safetensors, pickles, DP prefixes, PEFT LoRA), native, `hmt convert`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from hmt_core import CheckpointError, HMTConfig, HMTModel
from hmt_core.errors import InvalidInputError
from hmt_core.testing import tiny_backbone_config, tiny_hmt_model

HMT_CFG = HMTConfig(segment_tokens=8, num_sensory=3, ltm_context=4, recall_dim=16)


def reference_layout(model: HMTModel, backbone_state: dict[str, torch.Tensor], prefix: str = "") -> dict:
    """Keys as HMT-pytorch's RecurrentWrapper.state_dict() names them (recall weights in bf16)."""
    state = {
        "mem": model.summary_prompt.detach().clone(),
        "memory_cell.memory": model.initial_memory.detach().clone(),
        "cross_attn.wq.weight": model.recall_wq.weight.detach().to(torch.bfloat16),
        "cross_attn.wk.weight": model.recall_wk.weight.detach().to(torch.bfloat16),
        "memory_cell.mem_map.linear.weight": torch.eye(model.dim),
    }
    state.update({f"memory_cell.model.{k}": v.detach().clone() for k, v in backbone_state.items()})
    return {prefix + k: v for k, v in state.items()}


def peft_backbone(family: str, targets: list[str], tied: bool, rank: int = 4, alpha: float = 16.0):
    torch.manual_seed(5)
    base = AutoModelForCausalLM.from_config(tiny_backbone_config(family, tie_word_embeddings=tied))
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                      fan_in_fan_out=family == "gpt2")
    return get_peft_model(base, lora).eval()


@pytest.mark.parametrize("family, targets, tied", [
    ("llama", ["embed_tokens", "q_proj", "v_proj", "down_proj"], True),
    ("llama", ["embed_tokens", "q_proj", "o_proj", "lm_head"], False),
    ("gpt2", ["wte", "c_attn", "c_fc"], True),  # Conv1D weights are stored transposed
])
def test_peft_lora_checkpoints_merge_like_peft(tmp_path: Path, family: str, targets: list[str],
                                                tied: bool) -> None:
    peft_model = peft_backbone(family, targets, tied)
    hmt_source = tiny_hmt_model(family, HMT_CFG)
    checkpoint = tmp_path / "ckpt.pt"
    torch.save(reference_layout(hmt_source, peft_model.state_dict(), prefix="module."), checkpoint)
    backbone_config = tiny_backbone_config(family, tie_word_embeddings=tied)
    loaded = HMTModel.from_hmt_pytorch(checkpoint, backbone=backbone_config, config=HMT_CFG, lora_alpha=16)

    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        got = loaded.backbone(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # the HMT parameters came across too (recall weights exactly, through bf16)
    torch.testing.assert_close(loaded.summary_prompt, hmt_source.summary_prompt)
    torch.testing.assert_close(loaded.recall_wq.weight, hmt_source.recall_wq.weight.to(torch.bfloat16).float())

    wrong_alpha = HMTModel.from_hmt_pytorch(checkpoint, backbone=backbone_config, config=HMT_CFG, lora_alpha=32)
    with torch.no_grad():
        assert not torch.allclose(wrong_alpha.backbone(input_ids=ids).logits, expected, atol=1e-4)


def test_plain_safetensors_checkpoint_round_trips(tmp_path: Path) -> None:
    source = tiny_hmt_model("qwen2", HMT_CFG, seed=3)
    checkpoint = tmp_path / "model.safetensors"
    save_file(reference_layout(source, source.backbone.state_dict()), str(checkpoint))
    loaded = HMTModel.from_hmt_pytorch(checkpoint, backbone=source.backbone.config, config=HMT_CFG)
    ids = torch.randint(0, 128, (1, 30))
    # recall weights went through bf16 in the checkpoint, as the reference stores them
    source.recall_wq.weight.data = source.recall_wq.weight.data.to(torch.bfloat16).float()
    source.recall_wk.weight.data = source.recall_wk.weight.data.to(torch.bfloat16).float()
    torch.testing.assert_close(loaded.score(ids).logits, source.score(ids).logits)
    # a directory holding model.safetensors (what accelerate's save_state writes) loads too
    assert HMTModel.from_hmt_pytorch(tmp_path, backbone=source.backbone.config, config=HMT_CFG).fingerprint == \
        loaded.fingerprint


def test_native_format_round_trip_with_tokenizer(tmp_path: Path, text_model: HMTModel) -> None:
    text_model.save_pretrained(tmp_path / "native")
    for name in ("hmt_config.json", "hmt.safetensors", "config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "native" / name).exists(), name
    loaded = HMTModel.from_pretrained(tmp_path / "native")
    assert loaded.fingerprint == text_model.fingerprint
    assert loaded.hmt_config == text_model.hmt_config
    assert loaded.tokenizer is not None and loaded.tokenizer.encode("hello memory") == \
        text_model.tokenizer.encode("hello memory")
    ids = torch.randint(0, text_model.vocab_size, (1, 25))
    torch.testing.assert_close(loaded.score(ids).logits, text_model.score(ids).logits)
    bf16 = HMTModel.from_pretrained(tmp_path / "native", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.fingerprint == text_model.fingerprint


def _backbone_dir(path: Path, tokenizer: PreTrainedTokenizerFast, with_weights: bool) -> HMTModel:
    model = tiny_hmt_model("llama", HMT_CFG, vocab_size=len(tokenizer), seed=11)
    if with_weights:
        model.backbone.save_pretrained(path)
    else:
        model.backbone.config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hmt_lab.cli", "convert", *args],
                          capture_output=True, text=True, timeout=300)


def test_convert_cli_makes_a_servable_directory(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    source = _backbone_dir(tmp_path / "backbone", tokenizer, with_weights=False)
    torch.save(reference_layout(source, source.backbone.state_dict(), prefix="module."), tmp_path / "ckpt.pt")
    result = _convert("--from-hmt-pytorch", str(tmp_path / "ckpt.pt"), "--backbone", str(tmp_path / "backbone"),
                      "--out", str(tmp_path / "out"), "--segment-tokens", "8", "--num-sensory", "3",
                      "--ltm-context", "4")
    assert result.returncode == 0, result.stderr
    served = HMTModel.from_pretrained(tmp_path / "out")
    assert served.hmt_config.recall_dim == 16  # read off the checkpoint
    assert served.tokenizer is not None
    direct = HMTModel.from_hmt_pytorch(tmp_path / "ckpt.pt", backbone=tmp_path / "backbone", config=HMT_CFG)
    ids = torch.tensor([served.tokenizer.encode("the memory transformer reads the text segment by segment")])
    torch.testing.assert_close(served.score(ids).logits, direct.score(ids).logits)


def test_convert_takes_backbone_weights_when_the_checkpoint_has_none(tmp_path: Path,
                                                                      tokenizer: PreTrainedTokenizerFast) -> None:
    source = _backbone_dir(tmp_path / "backbone", tokenizer, with_weights=True)
    save_file(reference_layout(source, {}), str(tmp_path / "hmt_only.safetensors"))
    result = _convert("--from-hmt-pytorch", str(tmp_path / "hmt_only.safetensors"), "--backbone",
                      str(tmp_path / "backbone"), "--out", str(tmp_path / "out"), "--segment-tokens", "8",
                      "--num-sensory", "3", "--ltm-context", "4", "--recall-dim", "16")
    assert result.returncode == 0, result.stderr
    served = HMTModel.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, served.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(served.backbone(input_ids=ids).logits, source.backbone(input_ids=ids).logits)


def test_bad_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    source = tiny_hmt_model("llama", HMT_CFG)
    full = reference_layout(source, source.backbone.state_dict())
    cfg = source.backbone.config

    no_recall = {k: v for k, v in full.items() if not k.startswith("cross_attn")}
    save_file(no_recall, str(tmp_path / "a.safetensors"))
    with pytest.raises(CheckpointError, match="not an HMT checkpoint"):
        HMTModel.from_hmt_pytorch(tmp_path / "a.safetensors", backbone=cfg, config=HMT_CFG)

    save_file(full, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match="recall_dim"):
        HMTModel.from_hmt_pytorch(tmp_path / "b.safetensors", backbone=cfg,
                                  config=HMTConfig(segment_tokens=8, num_sensory=3, ltm_context=4, recall_dim=32))

    missing_layer = {k: v for k, v in full.items() if "layers.1.mlp" not in k}
    save_file(missing_layer, str(tmp_path / "c.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        HMTModel.from_hmt_pytorch(tmp_path / "c.safetensors", backbone=cfg, config=HMT_CFG)

    torch.save({"mem": full["mem"], "evil": object()}, tmp_path / "d.pt")  # needs a real unpickle: refused
    with pytest.raises(CheckpointError, match="cannot read"):
        HMTModel.from_hmt_pytorch(tmp_path / "d.pt", backbone=cfg, config=HMT_CFG)

    (tmp_path / "e.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        HMTModel.from_hmt_pytorch(tmp_path / "e.safetensors", backbone=cfg, config=HMT_CFG)
    with pytest.raises(CheckpointError, match="does not exist"):
        HMTModel.from_hmt_pytorch(tmp_path / "nope.pt", backbone=cfg, config=HMT_CFG)

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"hmt_config\.json"):
        HMTModel.from_pretrained(tmp_path / "empty")
    result = _convert("--from-hmt-pytorch", str(tmp_path / "a.safetensors"), "--backbone", str(tmp_path / "empty"),
                      "--out", str(tmp_path / "out"), "--segment-tokens", "8", "--num-sensory", "3",
                      "--ltm-context", "4")
    assert result.returncode == 2 and "error" in result.stderr and "Traceback" not in result.stderr


def _rounds_of_changes(model: HMTModel, count: int, rank: int) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """`count` rounds of random rank-`rank` changes on every linear layer, factors in bf16 as training ships them."""
    generator = torch.Generator().manual_seed(7)
    linears = {name: m for name, m in model.backbone.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not model.backbone.get_output_embeddings()}
    return [{name: ((torch.randn(rank, m.in_features, generator=generator) * 0.1).to(torch.bfloat16),
                    (torch.randn(m.out_features, rank, generator=generator) * 0.1).to(torch.bfloat16))
             for name, m in linears.items()} for _ in range(count)]


def test_compact_merges_rounds_into_one_and_keeps_the_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                               ) -> None:
    """A model trained in stages ships a round of low-rank changes per stage; `hmt compact` ships one round: at
    the rounds' summed rank the same weights (up to bf16 factors), below it the best approximation of that rank."""
    import json

    from hmt_core.checkpoint import apply_deltas, compact_deltas, save_pretrained
    from hmt_lab import cli

    base = tiny_hmt_model("llama", HMT_CFG)
    base.backbone.save_pretrained(tmp_path / "backbone")
    model = tiny_hmt_model("llama", HMT_CFG)
    model.backbone.load_state_dict(base.backbone.state_dict())
    rounds = _rounds_of_changes(model, count=3, rank=2)
    for deltas in rounds:
        apply_deltas(model.backbone, deltas)
    model.backbone_deltas = rounds
    save_pretrained(model, tmp_path / "staged", include_backbone=False, backbone_ref=str(tmp_path / "backbone"))
    staged = HMTModel.from_pretrained(tmp_path / "staged")
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    want = staged.score(ids).logits

    assert cli.main(["compact", "--model", str(tmp_path / "staged"), "--out", str(tmp_path / "exact"),
                     "--rank", "6"]) == 0
    report = json.loads(capsys.readouterr().out)
    exact = HMTModel.from_pretrained(tmp_path / "exact")
    assert report["fingerprint"] == exact.fingerprint != staged.fingerprint and len(exact.backbone_deltas) == 1
    assert report["rounds"] == 3 and report["largest_relative_error"] < 0.01  # bf16 factors only
    torch.testing.assert_close(exact.score(ids).logits, want, atol=2e-3, rtol=1e-2)
    assert exact.hmt_config == staged.hmt_config
    torch.testing.assert_close(exact.summary_prompt, staged.summary_prompt)

    # below the summed rank: the truncated SVD of the sum, and a third of the bytes
    name = next(iter(rounds[0]))
    total = sum(b.float() @ a.float() for a, b in (deltas[name] for deltas in rounds))
    singular = torch.linalg.svdvals(total)
    compacted, _ = compact_deltas(rounds, 2)
    a, b = compacted[name]
    lost = float((total - b.float() @ a.float()).norm() / total.norm())
    assert a.shape[0] == 2 and lost == pytest.approx(float(singular[2:].norm() / singular.norm()), rel=0.05)
    assert cli.main(["compact", "--model", str(tmp_path / "staged"), "--out", str(tmp_path / "small"),
                     "--rank", "2"]) == 0
    size = {d: (tmp_path / d / "backbone_deltas.safetensors").stat().st_size for d in ("staged", "small")}
    assert size["small"] < size["staged"] / 2.5
    capsys.readouterr()
    assert cli.main(["compact", "--model", str(tmp_path / "staged"), "--out", str(tmp_path / "staged")]) == 2
    assert "another directory" in capsys.readouterr().err
    assert cli.main(["compact", "--model", str(tmp_path / "backbone-less"), "--out", str(tmp_path / "x")]) == 2
    with pytest.raises(InvalidInputError, match="rank must be >= 1"):
        compact_deltas(rounds, 0)
