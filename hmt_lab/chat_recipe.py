"""The served chat model: HMT on a pretrained chat backbone (SmolLM2-135M-Instruct by default).

`hmt build-chat --out models/hmt-smollm2` runs the paper's two stages with LoRA on the backbone:
stage 1 (memory without recall) on whole public-domain books (hmt_lab.corpus), then stage 2
(recall) on a mix of book text, pass-key exercises and conversations in the backbone's own chat
template where a fact stated early is asked about later (hmt_lab.exercises: random offsets,
training wording, fillers and facts only). Held-out books are never read. The output directory
holds the HMT weights and the LoRA deltas and refers to the backbone by source, so it is a few
megabytes; the backbone is fetched with pip on first use. Every phase is a resumable `train` run
in `<out>.work/`: stop it and rerun the same command to continue.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM

from hmt_core import backbones
from hmt_core.checkpoint import load_tokenizer
from hmt_core.config import HMTConfig
from hmt_core.errors import InvalidInputError
from hmt_core.model import HMTModel
from hmt_lab.exercises import Exercise, chat_fact_exercise, passkey_exercise
from hmt_lab.train import TrainConfig, train

CARD_FILE = "model_card.json"


@dataclass
class ChatRecipe:
    backbone: str = "smollm2-135m-instruct"  # a backbone source, a directory or a hub name
    served_name: str = "hmt-smollm2-135m"  # the name /v1/models gives it
    segment_tokens: int = 256
    num_sensory: int = 32
    ltm_context: int = 300
    recall_dim: int = 576  # d: the reference sizes its recall projections to the hidden size
    lora_r: int = 8
    lora_alpha: float = 16.0
    stage1_segments: int = 4
    stage1_steps: int = 40
    stage1_lr: float = 5e-4
    stage2_segments: int = 6
    stage2_steps: int = 100
    stage2_lr: float = 5e-4
    bptt_depth: int = 6
    batch_size: int = 1
    passkey_fraction: float = 0.25  # of stage-2 rows
    chat_fraction: float = 0.35
    answer_weight: float = 5.0
    repeat_weight: float = 2.0
    # stage 2: each memory also predicts its segment's tokens (train.memory_bag_of_words_loss); on the
    # demo, the pass-key loss stayed at chance without it
    memory_bow_weight: float = 0.3
    max_book_tokens: int = 400_000  # per book: the State of the Union addresses alone are half the corpus
    seed: int = 2405

    def hmt_config(self) -> HMTConfig:
        return HMTConfig(segment_tokens=self.segment_tokens, num_sensory=self.num_sensory,
                         ltm_context=self.ltm_context, recall_dim=self.recall_dim, recall_dtype="float32")


def paragraphs(texts: list[str], low: int = 200, high: int = 700) -> list[str]:
    """Paragraph-sized passages for the filler turns of chat exercises."""
    out = []
    for text in texts:
        out += [p.strip()[:high] for p in text.split("\n\n") if len(p.strip()) >= low]
    return out


def book_stream(model: HMTModel, texts: list[str], max_tokens: int) -> list[int]:
    """The books as one token stream (each cut to max_tokens, EOS between them)."""
    eos = model.tokenizer.eos_token_id  # type: ignore[union-attr]
    stream: list[int] = []
    for text in texts:
        stream += model.tokenizer.encode(text[:max_tokens * 6], add_special_tokens=False)[:max_tokens]  # type: ignore[union-attr]
        stream += [eos] if eos is not None else []
    return stream


def stage2_data(model: HMTModel, recipe: ChatRecipe, stream: list[int], passages: list[str],
                rows: int) -> tuple[Tensor, Tensor]:
    """`rows` samples: book text, pass-key exercises and chat-fact exercises, with loss weights."""
    rng = random.Random(recipe.seed)
    sample_tokens = recipe.stage2_segments * recipe.segment_tokens
    samples, weights = torch.empty(rows, sample_tokens, dtype=torch.long), torch.ones(rows, sample_tokens)
    for row in range(rows):
        draw = rng.random()
        exercise: Exercise | None = None
        if draw < recipe.passkey_fraction:
            exercise = passkey_exercise(model.tokenizer, rng, sample_tokens, recipe.segment_tokens, stream)
        elif draw < recipe.passkey_fraction + recipe.chat_fraction:
            exercise = chat_fact_exercise(model.tokenizer, rng, sample_tokens, passages, stream)
        if exercise is None:
            start = rng.randrange(len(stream) - sample_tokens)
            samples[row] = torch.tensor(stream[start:start + sample_tokens])
            continue
        samples[row] = torch.tensor(exercise.tokens)
        weights[row, exercise.answer] = recipe.answer_weight
        weights[row, exercise.extra] = recipe.repeat_weight
    return samples, weights


def new_model(recipe: ChatRecipe) -> HMTModel:
    source, origin = backbones.resolve_backbone_arg(recipe.backbone)
    backbone = AutoModelForCausalLM.from_pretrained(source)
    if origin:
        backbones.set_origin(backbone, origin)
    torch.manual_seed(recipe.seed)
    model = HMTModel(backbone, recipe.hmt_config(), load_tokenizer(source))
    if model.tokenizer is None or not getattr(model.tokenizer, "chat_template", None):
        raise InvalidInputError(f"{recipe.backbone} has no tokenizer with a chat template: not a chat backbone")
    return model


def _run(model: HMTModel, samples: Tensor, config: TrainConfig, run_dir: Path, weights: Tensor | None,
         progress: bool) -> tuple[HMTModel, list[float]]:
    """One resumable phase; a finished one (same settings) is reloaded instead of retrained."""
    log = run_dir / "train_log.json"
    if log.exists():
        finished = json.loads(log.read_text())
        if TrainConfig(**finished["config"]).outcome_fields() != config.outcome_fields():
            raise InvalidInputError(f"{run_dir} was trained with other settings: remove it to retrain")
        return HMTModel.from_pretrained(run_dir), finished["losses"]
    result = train(model, samples, config, run_dir, progress=progress, weights=weights)
    return model, result.losses


def build_chat_model(out_dir: str | Path, recipe: ChatRecipe | None = None, progress: bool = True,
                     texts: tuple[list[str], list[str]] | None = None,
                     sources: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train and write the model. texts: (training, held-out) texts instead of hmt_lab.corpus."""
    recipe = recipe or ChatRecipe()
    out_dir = Path(out_dir)
    work = out_dir.parent / (out_dir.name + ".work")
    if texts is None:
        from hmt_lab import corpus

        train_books, held_out_books = corpus.split_books(corpus.books(), corpus.HELD_OUT_TITLES)
        texts = ([b.text for b in train_books], [b.text for b in held_out_books])
        sources = corpus.describe_sources()
        held_out_titles = list(corpus.HELD_OUT_TITLES)
    else:
        held_out_titles = []
    train_texts, held_out_texts = texts
    started = time.perf_counter()
    model = new_model(recipe)
    stream = book_stream(model, train_texts, recipe.max_book_tokens)
    common: dict[str, Any] = {
        "batch_size": recipe.batch_size, "bptt_depth": recipe.bptt_depth, "backbone_training": "lora",
        "lora_r": recipe.lora_r, "lora_alpha": recipe.lora_alpha, "seed": recipe.seed, "save_every": 10,
        "warmup_steps": 5}
    stage1_samples = torch.tensor(stream[:len(stream) // (recipe.stage1_segments * recipe.segment_tokens)
                                         * recipe.stage1_segments * recipe.segment_tokens])
    stage1_samples = stage1_samples.view(-1, recipe.stage1_segments * recipe.segment_tokens)
    model, losses1 = _run(model, stage1_samples, TrainConfig(
        stage=1, steps=recipe.stage1_steps, segments_per_sample=recipe.stage1_segments,
        learning_rate=recipe.stage1_lr, **common), work / "stage1", None, progress)
    samples, weights = stage2_data(model, recipe, stream, paragraphs(train_texts),
                                   rows=max(recipe.stage2_steps * recipe.batch_size, 64))
    model, losses2 = _run(model, samples, TrainConfig(
        stage=2, steps=recipe.stage2_steps, segments_per_sample=recipe.stage2_segments,
        learning_rate=recipe.stage2_lr, memory_bow_weight=recipe.memory_bow_weight, **common),
        work / "stage2", weights, progress)
    model.save_pretrained(out_dir, include_backbone=False)
    card = {"name": recipe.served_name, "backbone": recipe.backbone, "recipe": asdict(recipe),
            "fingerprint": model.fingerprint, "stage1_losses": [losses1[0], losses1[-1]],
            "stage2_losses": [losses2[0], losses2[-1]], "seconds": round(time.perf_counter() - started),
            "device": str(model.device), "threads": torch.get_num_threads(),
            "held_out_books": held_out_titles, "text_sources": sources or [],
            "training_tokens": recipe.batch_size * (recipe.stage1_steps * recipe.stage1_segments
                                                    + recipe.stage2_steps * recipe.stage2_segments)
            * recipe.segment_tokens}
    (out_dir / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    write_held_out(out_dir, held_out_texts)
    return card


def write_held_out(out_dir: Path, texts: Sequence[str]) -> None:
    """The held-out books' text beside a model, where `hmt eval` looks for it when no --data is given."""
    (out_dir / "held_out.txt").write_text("\n\n".join(t[:100_000] for t in texts) + "\n")
