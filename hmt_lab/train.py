"""`hmt train`: the paper's two-stage training of HMT on a backbone, in plain torch.

Stage 1 trains the memory without recall (each segment's memory prompt is the previous
segment's memory, RMT-style) over `bptt_depth` unrolled segments; stage 2 adds recall over the
cached memories. The backbone is frozen, LoRA-tuned (peft) or fully trained. Plain torch, one
code path for CPU and GPU: the model is small enough for one device, and a loop we own is easier
to make resumable bit-for-bit than a framework's (accelerate adds nothing for one device).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor

from hmt_core.errors import CheckpointError, InvalidInputError
from hmt_core.memory import MemoryKind
from hmt_core.model import HMTModel

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

BackboneTraining = Literal["frozen", "lora", "full"]
TRAINER_STATE = "trainer_state.pt"
TRAINER_META = "trainer.json"


@dataclass
class TrainConfig:
    stage: int = 1  # 1: memory without recall; 2: with recall
    steps: int = 100
    batch_size: int = 4
    segments_per_sample: int = 4
    bptt_depth: int = 2
    learning_rate: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    backbone_training: BackboneTraining = "frozen"
    lora_r: int = 8
    lora_alpha: float = 32.0
    save_every: int = 50
    seed: int = 3407
    # weight of memory_bag_of_words_loss: 0 is the paper's recipe
    memory_bow_weight: float = 0.0
    # a curriculum runs one train() per phase on one learning-rate schedule: this run is steps
    # [schedule_offset, schedule_offset + steps) of a schedule schedule_steps long (None: steps)
    schedule_offset: int = 0
    schedule_steps: int | None = None

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise InvalidInputError(f"stage must be 1 or 2, got {self.stage}")
        if self.backbone_training not in ("frozen", "lora", "full"):
            raise InvalidInputError(f"backbone_training must be frozen, lora or full, got {self.backbone_training}")
        if min(self.steps, self.batch_size, self.segments_per_sample, self.bptt_depth) < 1:
            raise InvalidInputError("steps, batch_size, segments_per_sample and bptt_depth must be >= 1")
        if self.schedule_offset < 0 or (self.schedule_steps is not None
                                        and self.schedule_steps < self.schedule_offset + self.steps):
            raise InvalidInputError("the schedule must cover this run's steps: "
                                    "0 <= schedule_offset and schedule_offset + steps <= schedule_steps")

    @property
    def memory(self) -> MemoryKind:
        """How segments are linked while training: stage 1 without recall, stage 2 with it."""
        return "rmt" if self.stage == 1 else "hmt"

    def outcome_fields(self) -> dict[str, Any]:
        """The settings that decide the trained weights (not how often checkpoints are written)."""
        fields = asdict(self)
        del fields["save_every"]
        fields["schedule_steps"] = self.schedule_steps or self.steps
        return fields


def read_texts(paths: Sequence[str | Path], text_field: str = "text") -> Iterator[str]:
    """Plain text files (one document each) or jsonl (one document per line, in `text_field`)."""
    for path in map(Path, paths):
        if not path.exists():
            raise InvalidInputError(f"training data {path} does not exist")
        if path.suffix in (".jsonl", ".json"):
            with path.open(encoding="utf-8") as lines:
                for number, line in enumerate(lines, 1):
                    if line.strip():
                        try:
                            yield str(json.loads(line)[text_field])
                        except (ValueError, KeyError, TypeError):
                            raise InvalidInputError(f"{path}:{number}: not a JSON object with {text_field!r}") \
                                from None
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def token_samples(model: HMTModel, texts: Iterator[str], sample_tokens: int) -> Tensor:
    """Tokenize documents (EOS between them) and cut the stream into [n, sample_tokens] rows."""
    if model.tokenizer is None:
        raise InvalidInputError("training on text needs a model with a tokenizer")
    eos = model.tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream += model.tokenizer.encode(text) + ([eos] if eos is not None else [])
    rows = len(stream) // sample_tokens
    if rows == 0:
        raise InvalidInputError(f"not enough text: {len(stream)} tokens, one sample needs {sample_tokens}")
    return torch.tensor(stream[:rows * sample_tokens]).view(rows, sample_tokens)


def language_model_loss(logits: Tensor, ids: Tensor, weights: Tensor | None = None) -> Tensor:
    """Next-token cross-entropy over the whole stream (segment boundaries included).

    weights [B, T]: per-token weight of predicting that token (e.g. up-weight a pass key's digits);
    the loss is their weighted mean. None: a plain mean.
    """
    targets = ids[:, 1:].to(logits.device)
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, reduction="none")
    if weights is None:
        return losses.mean()
    w = weights[:, 1:].to(losses.device, losses.dtype)
    return (losses * w).sum() / w.sum()


def memory_bag_of_words_loss(model: HMTModel, memories: Tensor, ids: Tensor) -> Tensor:
    """Each full segment's memory predicts the tokens of its segment as a bag, through the LM head.

    An auxiliary training loss (ours, not the paper's). A memory is a final hidden state, so the
    LM head reads it as it reads any position. Without this signal, the memory of a pass key's
    segment held the key at under 1% of its norm, and the reader gave it 0-5% of its attention.
    Neither side then sends the other a gradient worth following, and the pass-key loss stayed
    at chance for thousands of steps (README, #4).
    """
    segment = model.hmt_config.segment_tokens
    full = min(memories.shape[1], ids.shape[1] // segment)
    head = model.backbone.get_output_embeddings()
    log_probs = torch.log_softmax(head(memories[:, :full]).float(), dim=-1)  # [B, S, V]
    tokens = ids[:, :full * segment].reshape(ids.shape[0], full, segment).to(log_probs.device)
    return -log_probs.gather(-1, tokens).mean()


def _prepare_parameters(model: HMTModel, config: TrainConfig) -> list[torch.nn.Parameter]:
    model.requires_grad_(False)
    if config.backbone_training == "lora":
        from peft import LoraConfig, get_peft_model

        # peft annotates lora_alpha as int, but uses it as a float (scaling = alpha / r)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,  # type: ignore[arg-type]
                          target_modules="all-linear", lora_dropout=0.0)
        # marks only the adapters trainable; the wrapper stands in for the backbone (it forwards attributes)
        model.backbone = cast("PreTrainedModel", get_peft_model(model.backbone, lora))
    elif config.backbone_training == "full":
        model.backbone.requires_grad_(True)
    scale = [model.memory_log_scale] if model.memory_log_scale is not None else []
    hmt_params = [model.initial_memory, *scale] if config.stage == 1 else model.own_parameters()
    for param in hmt_params:
        param.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def finish_backbone(model: HMTModel) -> None:
    """Fold LoRA adapters into plain weights so the saved model is an ordinary native directory."""
    if hasattr(model.backbone, "unload"):
        from hmt_core.checkpoint import apply_deltas, lora_factors

        factors = lora_factors(model.backbone)
        model.backbone = cast("PeftModel", model.backbone).unload()
        apply_deltas(model.backbone, factors)  # the merge loading does too: same weights, bit for bit
        model.backbone_deltas = [*model.backbone_deltas, factors]
    model.requires_grad_(False)
    model.refresh_fingerprint()


def _lr_at(step: int, config: TrainConfig) -> float:
    step += config.schedule_offset
    total = config.schedule_steps or config.steps
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _batch_order(rows: int, config: TrainConfig) -> Iterator[Tensor]:
    """Deterministic epoch permutations from the seed; resuming skips to the same position."""
    epoch = 0
    while True:
        generator = torch.Generator().manual_seed(config.seed + epoch)
        order = torch.randperm(rows, generator=generator)
        for start in range(0, rows - config.batch_size + 1, config.batch_size):
            yield order[start:start + config.batch_size]
        if rows < config.batch_size:
            yield order
        epoch += 1


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = sorted((p for p in out_dir.glob("checkpoint-*") if (p / TRAINER_META).exists()),
                   key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    tokens_per_second: float
    output: Path


def train(model: HMTModel, samples: Tensor, config: TrainConfig, out_dir: str | Path,
          resume: bool = True, progress: bool = True, weights: Tensor | None = None) -> TrainResult:
    """Train in place; write checkpoint-<step>/ every save_every steps and the final model to out_dir.

    weights: optional per-token loss weights, same shape as samples."""
    if weights is not None and weights.shape != samples.shape:
        raise InvalidInputError(f"weights {tuple(weights.shape)} must match samples {tuple(samples.shape)}")
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    params = _prepare_parameters(model, config)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    start_step, losses = 0, []
    checkpoint = latest_checkpoint(out_dir) if resume else None
    if checkpoint is not None:
        saved = _load_trainable(model, checkpoint)
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"].cpu())
        meta = json.loads((checkpoint / TRAINER_META).read_text())
        start_step, losses = meta["step"], meta["losses"]
    order = _batch_order(samples.shape[0], config)
    for _ in range(start_step):
        next(order)
    model.train()
    tokens_done, started = 0, time.perf_counter()
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, disable=not progress,
               desc=f"stage {config.stage}")
    for step in bar:
        rows = next(order)
        batch = samples[rows].to(model.device)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        out = model.forward_segments(batch, memory=config.memory, bptt_depth=config.bptt_depth)
        loss = language_model_loss(out.logits, batch, None if weights is None else weights[rows])
        if config.memory_bow_weight:
            loss = loss + config.memory_bow_weight * memory_bag_of_words_loss(model, out.memories, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        tokens_done += batch.numel()
        rate = tokens_done / max(1e-9, time.perf_counter() - started)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:.0f}")
        if (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            _save_checkpoint(model, optimizer, config, out_dir / f"checkpoint-{step + 1}", step + 1, losses)
    model.eval()
    finish_backbone(model)
    model.save_pretrained(out_dir)
    (out_dir / "train_log.json").write_text(json.dumps({"config": asdict(config), "losses": losses}, indent=1))
    return TrainResult(config.steps, losses, tokens_done / max(1e-9, time.perf_counter() - started), out_dir)


def _load_trainable(model: HMTModel, checkpoint: Path) -> dict[str, Any]:
    """Put a checkpoint's trained parameters into the model; returns the whole trainer state."""
    try:
        saved = torch.load(checkpoint / TRAINER_STATE, map_location=model.device, weights_only=True)
    except Exception as error:  # a damaged file fails in many ways inside the unpickler
        raise CheckpointError(f"cannot load the training checkpoint {checkpoint}: {error!r}") from None
    try:
        unexpected = model.load_state_dict(saved["trainable"], strict=False).unexpected_keys
    except (RuntimeError, KeyError, TypeError) as error:  # misshapen tensors, or not our trainer state
        raise CheckpointError(f"cannot load the training checkpoint {checkpoint}: {error}") from None
    if unexpected:
        raise CheckpointError(f"the training checkpoint {checkpoint} has parameters this model lacks "
                              f"({', '.join(unexpected[:3])}, ...): give the model its run started from")
    return saved


def load_checkpoint_weights(model: HMTModel, checkpoint: str | Path) -> HMTModel:
    """A training checkpoint (checkpoint-<step>/) as an ordinary model, to evaluate a run midway.

    A checkpoint holds only what its run trained, so `model` must be the model the run started
    from (for `hmt demo`'s phases: the previous phase's directory). LoRA adapters are merged."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / TRAINER_META).is_file():
        raise CheckpointError(f"{checkpoint} is not a training checkpoint: it has no {TRAINER_META}")
    config = TrainConfig(**json.loads((checkpoint / TRAINER_META).read_text())["config"])
    _prepare_parameters(model, config)
    _load_trainable(model, checkpoint)
    model.eval()
    finish_backbone(model)
    return model


def _save_checkpoint(model: HMTModel, optimizer: torch.optim.Optimizer, config: TrainConfig, path: Path,
                     step: int, losses: list[float]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    trainable = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    state: dict[str, Any] = {"trainable": trainable, "optimizer": optimizer.state_dict(),
                             "rng": torch.get_rng_state()}
    tmp = path / (TRAINER_STATE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path / TRAINER_STATE)  # a crash mid-write never leaves a checkpoint that looks complete
    (path / TRAINER_META).write_text(json.dumps({"step": step, "losses": losses, "config": asdict(config)}))
