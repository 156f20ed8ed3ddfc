"""`hmt train`: loss goes down, checkpoints load, an interrupted run resumes to the same result."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from hmt_core import CheckpointError, HMTConfig, HMTModel, InvalidInputError, SamplingParams
from hmt_core.testing import SAMPLE_TEXTS as CORPUS
from hmt_core.testing import tiny_hmt_model
from hmt_lab.train import (
    TrainConfig,
    _lr_at,
    language_model_loss,
    load_checkpoint_weights,
    memory_bag_of_words_loss,
    read_texts,
    token_samples,
    train,
)

HMT_CFG = HMTConfig(segment_tokens=8, num_sensory=3, ltm_context=4, recall_dim=16)


def fresh_model(tokenizer: PreTrainedTokenizerFast) -> HMTModel:
    model = tiny_hmt_model("llama", HMT_CFG, vocab_size=len(tokenizer), seed=4)
    model.tokenizer = tokenizer
    return model


def eval_loss(model: HMTModel, samples: torch.Tensor, mode: str) -> float:
    with torch.no_grad():
        return float(language_model_loss(model.forward_segments(samples, memory=mode).logits, samples))  # type: ignore[arg-type]


@pytest.mark.parametrize("stage, backbone_training", [(1, "full"), (2, "lora"), (2, "frozen")])
def test_training_lowers_the_loss_and_saves_a_loadable_model(tmp_path: Path, tokenizer: PreTrainedTokenizerFast,
                                                            stage: int, backbone_training: str) -> None:
    model = fresh_model(tokenizer)
    samples = token_samples(model, iter(CORPUS), 32)
    config = TrainConfig(stage=stage, steps=15, batch_size=4, segments_per_sample=4, learning_rate=3e-3,
                         warmup_steps=2, backbone_training=backbone_training, save_every=100)  # type: ignore[arg-type]
    before = eval_loss(model, samples, config.memory)
    result = train(model, samples, config, tmp_path / "out", progress=False)
    assert eval_loss(model, samples, config.memory) < before
    loaded = HMTModel.from_pretrained(tmp_path / "out")
    assert loaded.fingerprint == model.fingerprint
    expected = eval_loss(model, samples, config.memory)
    assert eval_loss(loaded, samples, config.memory) == pytest.approx(expected, rel=1e-4)
    assert len(result.losses) == 15
    state = loaded.append(loaded.new_session(), tokenizer.encode("hello memory"))
    assert len(loaded.generate(state, SamplingParams(max_tokens=5, ignore_eos=True)).run().tokens) == 5


def test_interrupted_training_resumes_to_the_same_model(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    config = TrainConfig(stage=2, steps=8, batch_size=2, segments_per_sample=4, learning_rate=3e-3,
                         warmup_steps=2, backbone_training="lora", save_every=3)
    samples = token_samples(fresh_model(tokenizer), iter(CORPUS), 32)
    whole = fresh_model(tokenizer)
    uninterrupted = train(whole, samples, config, tmp_path / "whole", progress=False)

    # what an interruption after step 3 leaves behind: only the first checkpoint
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", tmp_path / "cut" / "checkpoint-3")
    resumed_model = fresh_model(tokenizer)
    resumed = train(resumed_model, samples, config, tmp_path / "cut", progress=False)
    assert resumed.losses == pytest.approx(uninterrupted.losses, rel=1e-5)
    assert resumed_model.fingerprint == whole.fingerprint


@pytest.mark.parametrize("backbone_training", ["full", "lora"])
def test_a_checkpoint_loads_as_the_model_of_its_step(tmp_path: Path, tokenizer: PreTrainedTokenizerFast,
                                                     backbone_training: str) -> None:
    config = TrainConfig(stage=2, steps=6, batch_size=2, segments_per_sample=4, learning_rate=3e-3,
                         warmup_steps=2, backbone_training=backbone_training, save_every=3)  # type: ignore[arg-type]
    samples = token_samples(fresh_model(tokenizer), iter(CORPUS), 32)
    train(fresh_model(tokenizer), samples, config, tmp_path / "run", progress=False)
    # the first 3 steps of the same run, stopped there: same batches, same learning rates
    first_half = fresh_model(tokenizer)
    train(first_half, samples, replace(config, steps=3, schedule_steps=6), tmp_path / "half", progress=False)
    at_step_3 = load_checkpoint_weights(fresh_model(tokenizer), tmp_path / "run" / "checkpoint-3")
    assert eval_loss(at_step_3, samples, "hmt") == pytest.approx(eval_loss(first_half, samples, "hmt"), rel=1e-5)
    assert eval_loss(at_step_3, samples, "hmt") != pytest.approx(eval_loss(fresh_model(tokenizer), samples, "hmt"))
    assert not hasattr(at_step_3.backbone, "merge_and_unload")  # an ordinary model: adapters merged

    fresh_model(tokenizer).save_pretrained(tmp_path / "base")
    cli = subprocess.run([sys.executable, "-m", "hmt_lab.cli", "eval", "passkey", "--model", str(tmp_path / "base"),
                          "--checkpoint", str(tmp_path / "run" / "checkpoint-3"), "--distances", "1", "--trials",
                          "1", "--json"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert set(json.loads(cli.stdout)["accuracy"]) == {"window", "hmt"}


def test_a_checkpoint_on_the_wrong_model_or_path_is_refused(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    config = TrainConfig(stage=2, steps=3, batch_size=2, segments_per_sample=4, backbone_training="lora",
                         save_every=2)
    train(fresh_model(tokenizer), token_samples(fresh_model(tokenizer), iter(CORPUS), 32), config, tmp_path,
          progress=False)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_checkpoint_weights(fresh_model(tokenizer), tmp_path)
    other = tiny_hmt_model("llama", replace(HMT_CFG, recall_dim=8), vocab_size=len(tokenizer), seed=4)
    with pytest.raises(CheckpointError, match="cannot load the training checkpoint"):
        load_checkpoint_weights(other, tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-2" / "trainer_state.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="cannot load the training checkpoint"):
        load_checkpoint_weights(fresh_model(tokenizer), tmp_path / "checkpoint-2")


def test_text_and_jsonl_inputs(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    (tmp_path / "a.txt").write_text(CORPUS[0])
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in CORPUS[1:3]) + "\n")
    texts = list(read_texts([tmp_path / "a.txt", tmp_path / "b.jsonl"]))
    assert texts == CORPUS[:3]
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(InvalidInputError, match=r"bad\.jsonl:1"):
        list(read_texts([tmp_path / "bad.jsonl"]))
    with pytest.raises(InvalidInputError, match="not enough text"):
        token_samples(fresh_model(tokenizer), iter(["hi"]), 64)


def test_train_cli_from_scratch_then_stage_two(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    backbone = fresh_model(tokenizer).backbone
    backbone.config.save_pretrained(tmp_path / "scratch")  # a config and a tokenizer, no weights
    tokenizer.save_pretrained(tmp_path / "scratch")
    (tmp_path / "data.txt").write_text(" ".join(CORPUS))
    common = ["--data", str(tmp_path / "data.txt"), "--steps", "4", "--batch-size", "2", "--save-every", "2",
              "--segments-per-sample", "3"]
    stage1 = subprocess.run([sys.executable, "-m", "hmt_lab.cli", "train", "--backbone", str(tmp_path / "scratch"),
                             "--segment-tokens", "8", "--num-sensory", "3", "--ltm-context", "4",
                             "--recall-dim", "16", "--stage", "1", "--backbone-training", "full",
                             "--out", str(tmp_path / "s1"), *common], capture_output=True, text=True, timeout=300)
    assert stage1.returncode == 0, stage1.stderr
    assert (tmp_path / "s1" / "checkpoint-2" / "trainer.json").exists()
    stage2 = subprocess.run([sys.executable, "-m", "hmt_lab.cli", "train", "--model", str(tmp_path / "s1"),
                             "--stage", "2", "--out", str(tmp_path / "s2"), *common],
                            capture_output=True, text=True, timeout=300)
    assert stage2.returncode == 0, stage2.stderr
    report = json.loads(stage2.stdout)
    final = HMTModel.from_pretrained(tmp_path / "s2")
    assert final.fingerprint == report["fingerprint"] != HMTModel.from_pretrained(tmp_path / "s1").fingerprint
    bad = subprocess.run([sys.executable, "-m", "hmt_lab.cli", "train", "--out", str(tmp_path / "x"),
                          "--data", str(tmp_path / "data.txt")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "exactly one of --model" in bad.stderr


def test_loss_weights_reweight_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    logits = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    assert float(language_model_loss(logits, ids)) == pytest.approx(float(per_token.mean()), rel=1e-6)
    assert float(language_model_loss(logits, ids, torch.ones(2, 6))) == pytest.approx(float(per_token.mean()))
    weights = torch.ones(2, 6)
    weights[1, 3] = 20.0  # predicting token 3 of row 1 is per_token[1, 2]
    expected = (per_token.sum() + 19 * per_token[1, 2]) / (per_token.numel() + 19)
    assert float(language_model_loss(logits, ids, weights)) == pytest.approx(float(expected), rel=1e-6)
    model = fresh_model(tokenizer)
    samples = token_samples(model, iter(CORPUS), 32)
    with pytest.raises(InvalidInputError, match="must match samples"):
        train(model, samples, TrainConfig(steps=1), "/nonexistent/never-written", weights=torch.ones(1, 3))


@pytest.mark.parametrize("mode", ["rmt", "hmt"])
def test_bptt_depth_truncates_memory_gradients(mode: str) -> None:
    model = tiny_hmt_model("llama", HMT_CFG)
    ids = torch.randint(0, 128, (1, 8 * 6), generator=torch.Generator().manual_seed(0))

    def grad_into_initial_memory(depth: int | None) -> float:
        model.zero_grad()
        model.forward_segments(ids, memory=mode, bptt_depth=depth).logits[:, -1].sum().backward()  # type: ignore[arg-type]
        return float(model.initial_memory.grad.abs().sum())

    # the initial memory feeds segment 0 only: 6 segments back from the last logits
    assert grad_into_initial_memory(1) == 0.0
    assert grad_into_initial_memory(6) > 0.0
    assert grad_into_initial_memory(None) > 0.0


def test_curriculum_phases_share_one_learning_rate_schedule() -> None:
    whole = TrainConfig(steps=90, warmup_steps=10, learning_rate=1e-3)
    phases = [TrainConfig(steps=30, warmup_steps=10, learning_rate=1e-3, schedule_offset=offset, schedule_steps=90)
              for offset in (0, 30, 60)]
    split = [_lr_at(step, phase) for phase in phases for step in range(phase.steps)]
    assert split == [_lr_at(step, whole) for step in range(90)]
    assert split[0] < split[10] and split[-1] < split[30]  # warmup once, one cosine decay
    with pytest.raises(InvalidInputError, match="schedule"):
        TrainConfig(steps=30, schedule_offset=70, schedule_steps=90)


def test_memory_bag_of_words_loss_is_each_memory_predicting_its_segment(tmp_path: Path,
                                                                        tokenizer: PreTrainedTokenizerFast) -> None:
    model = fresh_model(tokenizer)
    samples = token_samples(model, iter(CORPUS), 32)[:4]
    segment = model.hmt_config.segment_tokens
    with torch.no_grad():
        out = model.forward_segments(samples, memory="hmt")
        log_probs = torch.log_softmax(model.backbone.get_output_embeddings()(out.memories).float(), -1)
        expected = -torch.stack([log_probs[b, s, samples[b, s * segment + j]] for b in range(4)
                                 for s in range(32 // segment) for j in range(segment)]).mean()
        actual = memory_bag_of_words_loss(model, out.memories, samples)
    assert float(actual) == pytest.approx(float(expected), rel=1e-5)

    # training with it makes memories predict their segments' tokens better
    def bow() -> float:
        with torch.no_grad():
            memories = model.forward_segments(samples, memory="hmt").memories
            return float(memory_bag_of_words_loss(model, memories, samples))

    before = bow()
    config = TrainConfig(stage=2, steps=15, batch_size=4, segments_per_sample=4, learning_rate=3e-3, warmup_steps=2,
                         backbone_training="full", save_every=100, memory_bow_weight=1.0)
    train(model, samples, config, tmp_path / "bow", progress=False)
    assert bow() < before - 0.1


def test_lora_model_ships_its_deltas_beside_a_backbone_reference(tmp_path: Path,
                                                                 tokenizer: PreTrainedTokenizerFast) -> None:
    """Two LoRA stages on a backbone saved elsewhere: the model directory holds the HMT weights and
    the low-rank deltas (not a backbone copy), and loads to the trained weights bit for bit."""
    base = fresh_model(tokenizer)
    base.backbone.save_pretrained(tmp_path / "backbone")
    tokenizer.save_pretrained(tmp_path / "backbone")
    model = HMTModel.from_pretrained(_saved_by_reference(base, tmp_path / "start", tmp_path / "backbone"))
    samples = token_samples(model, iter(CORPUS), 32)
    for stage in (1, 2):
        train(model, samples, TrainConfig(stage=stage, steps=2, batch_size=2, segments_per_sample=4,
                                          backbone_training="lora", learning_rate=1e-2), tmp_path / f"s{stage}",
              progress=False)
    assert len(model.backbone_deltas) == 2  # both stages' adapters, applied in order at loading
    model.save_pretrained(tmp_path / "shipped", include_backbone=False)
    shipped = tmp_path / "shipped"
    assert not (shipped / "model.safetensors").exists() and (shipped / "backbone_deltas.safetensors").exists()
    loaded = HMTModel.from_pretrained(shipped)
    for (name, trained), (_, reloaded) in zip(model.backbone.state_dict().items(),
                                              loaded.backbone.state_dict().items(), strict=True):
        assert torch.equal(trained, reloaded), name
    assert loaded.fingerprint == model.fingerprint
    untouched = HMTModel.from_pretrained(tmp_path / "start")
    assert not torch.equal(untouched.backbone.model.layers[0].mlp.up_proj.weight,
                           loaded.backbone.model.layers[0].mlp.up_proj.weight)
    (shipped / "backbone_deltas.safetensors").unlink()
    with pytest.raises(CheckpointError, match="backbone changes"):
        HMTModel.from_pretrained(shipped)


def _saved_by_reference(model: HMTModel, directory: Path, backbone_dir: Path) -> Path:
    from hmt_core.checkpoint import save_pretrained

    save_pretrained(model, directory, include_backbone=False, backbone_ref=str(backbone_dir.resolve()))
    return directory
