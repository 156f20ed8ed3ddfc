"""The demo model shipped in models/hmt-demo, rebuilt from nothing by `hmt demo`.

Text: the King James Version of the Bible (1611; public domain), from Debian's package
bible-kjv-text, read with the `bible` program of package bible-kjv (`apt-get install bible-kjv`).
Recipe: a byte-level BPE trained on that text, a small Llama backbone trained from scratch with
the memory (stage 1, RMT-style), then recall (stage 2: a curriculum of growing samples of KJV
chapters mixed with pass-key exercises (hmt_lab.exercises: random keys, distances and offsets,
training wordings and fillers), plus the auxiliary memory bag-of-words loss). The RMT baseline is stage 1
continued on stage 2's data and steps without recall.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, LlamaConfig

from hmt_core.config import HMTConfig
from hmt_core.errors import HMTError, InvalidInputError
from hmt_core.model import HMTModel
from hmt_core.tokenizer import train_bpe_tokenizer
from hmt_lab.exercises import passkey_exercise
from hmt_lab.train import TrainConfig, token_samples, train

TEXT_SOURCE = ("King James Version of the Bible (1611, public domain), Debian package bible-kjv-text, "
               "extracted with the `bible` program of package bible-kjv")
_CHAPTER = re.compile(r"^(?P<book>\S.*\S) (?P<chapter>\d+)$")
_VERSE = re.compile(r"^\s+\d+ ")


def kjv_chapters() -> list[str]:
    """Every chapter of the KJV as one paragraph of plain text (verse numbers removed)."""
    if shutil.which("bible") is None:
        raise HMTError("the demo corpus needs Debian's bible-kjv: apt-get install -y bible-kjv")
    text = subprocess.run(["bible", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    chapters: list[list[str]] = []
    for line in text.splitlines():
        if _CHAPTER.match(line):
            chapters.append([])
        elif line.strip() and chapters:
            chapters[-1].append(_VERSE.sub("", line).strip())
    return [" ".join(lines) for lines in chapters if lines]


@dataclass
class DemoRecipe:
    vocab_size: int = 2048
    hidden_size: int = 192
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 512
    segment_tokens: int = 32
    num_sensory: int = 8
    ltm_context: int = 16
    recall_dim: int = 64
    segments_per_sample: int = 12
    stage1_steps: int = 500
    stage2_steps: int = 600
    # stage 2 (and the RMT baseline) in phases of growing samples, "segments:steps,...", on one
    # learning-rate schedule; empty: one phase of segments_per_sample x stage2_steps
    stage2_curriculum: str = "5:1500,12:3000"
    # then phases on longer samples (16 segments put keys up to 12 back, where 12 reach 8) on a
    # schedule of their own, at a lower rate; empty: none
    stage2_extension: str = "16:1200"
    extension_lr: float = 3e-4
    extension_seed: int = 11
    batch_size: int = 8
    stage1_lr: float = 2e-3
    stage2_lr: float = 1e-3
    bptt_depth: int = 12
    passkey_fraction: float = 0.5  # share of stage-2 samples that are pass-key exercises
    answer_weight: float = 20.0  # loss weight of a pass key's answer tokens: 5 digits among hundreds
    # loss weight of the key's repeat inside its own line ("... 48213. Remember it. 48213 ..."): an
    # in-window copy the KJV never teaches, and the digit reading the memory path builds on
    repeat_weight: float = 20.0
    # recall in fp32: a key changes its segment's memory by <1% of its norm, about what bf16
    # rounding of the memory adds (the reference's bf16 only matters for its own checkpoints)
    recall_dtype: str = "float32"
    # stage 2 and the RMT baseline: each memory also predicts its segment's tokens (see
    # train.memory_bag_of_words_loss); it is what lets the pass-key reader leave chance
    memory_bow_weight: float = 0.3
    # fresh embeddings before stage 2 for tokens stage 1 never saw (the digits): see reinit_unseen_embeddings
    reinit_unseen: bool = True
    held_out_chapters: int = 60  # the last chapters are kept out of training, for `hmt eval`
    # train on the first N training chapters only (None: all 1,129); a miniature build (the tests) need not
    # tokenize the whole Bible into exercises three times
    train_chapters: int | None = None
    seed: int = 1234

    def __post_init__(self) -> None:
        _ = self.stage2_phases, self.extension_phases  # refuse a malformed curriculum before anything trains

    @property
    def stage2_phases(self) -> list[tuple[int, int]]:
        if not self.stage2_curriculum:
            return [(self.segments_per_sample, self.stage2_steps)]
        return _parse_phases(self.stage2_curriculum, "stage2_curriculum")

    @property
    def extension_phases(self) -> list[tuple[int, int]]:
        return _parse_phases(self.stage2_extension, "stage2_extension") if self.stage2_extension else []


def _parse_phases(text: str, name: str) -> list[tuple[int, int]]:
    """"segments:steps,..." -> [(segments, steps), ...]"""
    try:
        phases = [(int(a), int(b)) for a, b in (phase.split(":") for phase in text.split(","))]
    except ValueError:
        raise InvalidInputError(f"{name} must be 'segments:steps,...', got {text!r}") from None
    if any(segments < 1 or steps < 1 for segments, steps in phases):
        raise InvalidInputError(f"{name} phases need >= 1 segment and step: {text!r}")
    return phases


def reinit_unseen_embeddings(model: HMTModel, seen: torch.Tensor, used: torch.Tensor, seed: int) -> list[int]:
    """Give the tokens in `used` that never occur in `seen` fresh, distinct embedding rows.

    The KJV has no digits. With tied embeddings, Adam moves every unseen token's row by about lr
    per step along the same "predict it less" direction, so after stage 1 the ten digits are
    almost one vector (pairwise cosine ~0.9, vs ~0.05 for seen tokens): no pass key can then be
    copied, stored or recalled (stage 2 stayed at chance, ln 10 per digit). Random directions at
    the seen tokens' mean norm make them tell-apart-able again. Returns the re-initialised ids.
    """
    seen_ids = seen.unique()
    ids = sorted(set(used.unique().tolist()) - set(seen_ids.tolist()))
    weight = cast(torch.nn.Embedding, model.backbone.get_input_embeddings()).weight
    if ids:
        with torch.no_grad():
            rows = torch.randn(len(ids), weight.shape[1], generator=torch.Generator().manual_seed(seed))
            norm = weight[seen_ids].float().norm(dim=-1).mean()
            weight[ids] = (rows / rows.norm(dim=-1, keepdim=True) * norm).to(weight.dtype)
    return ids


def _new_model(recipe: DemoRecipe, texts: list[str]) -> HMTModel:
    tokenizer = train_bpe_tokenizer(texts, recipe.vocab_size)
    torch.manual_seed(recipe.seed)
    backbone = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, num_key_value_heads=recipe.heads,
        max_position_embeddings=4 * recipe.segment_tokens, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    hmt = HMTConfig(segment_tokens=recipe.segment_tokens, num_sensory=recipe.num_sensory,
                    ltm_context=recipe.ltm_context, recall_dim=recipe.recall_dim, recall_dtype=recipe.recall_dtype)
    return HMTModel(backbone, hmt, tokenizer)


Part = Literal["hmt", "rmt"]  # stage 2 (the served model), or the no-recall baseline


def _stage2_data(model: HMTModel, recipe: DemoRecipe, train_chapters: list[str]) -> tuple[Tensor, Tensor, Tensor]:
    """Stage 2's data: KJV samples mixed with pass-key exercises, and per-token loss weights."""
    sample_tokens = recipe.segments_per_sample * recipe.segment_tokens
    text_samples = token_samples(model, iter(train_chapters), sample_tokens)
    stream = text_samples.flatten().tolist()
    rng = random.Random(recipe.seed)
    n_passkey = int(len(text_samples) * recipe.passkey_fraction / (1 - recipe.passkey_fraction))
    exercises = [passkey_exercise(model.tokenizer, rng, sample_tokens, recipe.segment_tokens, stream)
                 for _ in range(n_passkey)]
    mixed = torch.cat([text_samples, torch.tensor([exercise.tokens for exercise in exercises])])
    weights = torch.ones(mixed.shape)
    for row, exercise in enumerate(exercises, start=len(text_samples)):
        weights[row, exercise.answer] = recipe.answer_weight
        weights[row, exercise.extra] = recipe.repeat_weight
    return text_samples, mixed, weights


def build_demo(out_dir: str | Path, recipe: DemoRecipe | None = None, progress: bool = True,
               from_stage1: str | Path | None = None, parts: tuple[Part, ...] = ("hmt", "rmt")) -> dict:
    """Tokenizer, backbone from scratch, stage 1, then from stage 1 with the same data and steps:
    stage 2 (HMT, written to out_dir) and the RMT baseline (no recall, written to out_dir/rmt).

    from_stage1: reuse a stage-1 model (its tokenizer and weights). parts: which of the two to
    train (separate processes can build them side by side; the card collects both)."""
    recipe = recipe or DemoRecipe()
    out_dir = Path(out_dir)
    work = out_dir.parent / (out_dir.name + ".work")
    chapters = kjv_chapters()
    train_chapters, held_out = chapters[:-recipe.held_out_chapters], chapters[-recipe.held_out_chapters:]
    train_chapters = train_chapters[:recipe.train_chapters]
    card_path = out_dir / "demo_card.json"
    card: dict = {"text_source": TEXT_SOURCE, "license": "public domain (text); model weights: same terms as this repo",
                  "recipe": asdict(recipe)}
    common = {"batch_size": recipe.batch_size, "segments_per_sample": recipe.segments_per_sample,
              "bptt_depth": recipe.bptt_depth, "seed": recipe.seed, "save_every": 100}
    stage1_dir = Path(from_stage1) if from_stage1 else work / "stage1"
    if not from_stage1:
        started = time.perf_counter()
        model = _new_model(recipe, train_chapters)
        samples = token_samples(model, iter(train_chapters), recipe.segments_per_sample * recipe.segment_tokens)
        train(model, samples, TrainConfig(stage=1, steps=recipe.stage1_steps, learning_rate=recipe.stage1_lr,
                                          backbone_training="full", warmup_steps=30, **common),
              stage1_dir, progress=progress)
        card["stage1_seconds"] = round(time.perf_counter() - started)
    card["stage1_final_loss"] = json.loads((stage1_dir / "train_log.json").read_text())["losses"][-1]
    phases = recipe.stage2_phases
    extension = recipe.extension_phases
    all_phases = phases + extension
    stage1 = HMTModel.from_pretrained(stage1_dir)
    data = {segments: _stage2_data(stage1, replace(recipe, segments_per_sample=segments), train_chapters)
            for segments in dict.fromkeys(segments for segments, _ in all_phases)}
    seen = torch.cat([text.flatten() for text, _, _ in data.values()])
    used = torch.cat([mixed.flatten() for _, mixed, _ in data.values()])
    total_steps = sum(steps for _, steps in phases)
    extension_steps = sum(steps for _, steps in extension)
    for part in parts:
        started = time.perf_counter()
        model = HMTModel.from_pretrained(stage1_dir)
        model.hmt_config = replace(model.hmt_config, recall_dtype=recipe.recall_dtype)
        reinitialised = reinit_unseen_embeddings(model, seen, used, recipe.seed) if recipe.reinit_unseen else []
        losses: list[float] = []
        name = "stage2" if part == "hmt" else "rmt"
        for index, (segments, steps) in enumerate(all_phases):
            _, mixed, weights = data[segments]
            run_dir = work / (name if len(all_phases) == 1 else f"{name}-phase{index + 1}")
            schedule: dict[str, Any] = {"learning_rate": recipe.stage2_lr, "warmup_steps": 30,
                                        "schedule_offset": len(losses), "schedule_steps": total_steps}
            if index >= len(phases):  # the extension: a schedule of its own
                schedule = {"learning_rate": recipe.extension_lr, "warmup_steps": 10, "seed": recipe.extension_seed,
                            "schedule_offset": len(losses) - total_steps, "schedule_steps": extension_steps}
            # the RMT baseline is stage 1 continued: no recall, same data, steps and learning rates
            config = TrainConfig(stage=2 if part == "hmt" else 1, steps=steps, backbone_training="full",
                                 memory_bow_weight=recipe.memory_bow_weight,
                                 **{**common, "segments_per_sample": segments, **schedule})
            if (run_dir / "train_log.json").exists():  # a finished phase of an interrupted build
                finished = json.loads((run_dir / "train_log.json").read_text())
                if TrainConfig(**finished["config"]).outcome_fields() != config.outcome_fields():
                    raise InvalidInputError(f"{run_dir} was trained with another recipe: remove it to retrain")
                model = HMTModel.from_pretrained(run_dir)
                losses += finished["losses"]
                continue
            losses += train(model, mixed, config, run_dir, progress=progress, weights=weights).losses
        model.save_pretrained(out_dir if part == "hmt" else out_dir / "rmt")
        card[f"{part}_final_loss"] = losses[-1]
        card[f"{part}_seconds"] = round(time.perf_counter() - started)
        assert model.tokenizer is not None  # the demo's models carry the tokenizer it trained
        card["reinitialised_tokens"] = [model.tokenizer.decode([i]) for i in reinitialised]
        if part == "hmt":
            card["fingerprint"] = model.fingerprint
    (out_dir / "held_out.txt").write_text("\n".join(held_out) + "\n")
    if from_stage1 and card_path.exists():  # a part built beside this one may have written its results
        card = {**json.loads(card_path.read_text()), **card}
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return card
