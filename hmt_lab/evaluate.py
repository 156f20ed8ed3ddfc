"""`hmt eval`: long-document perplexity by position, and pass-key retrieval by distance.

Perplexity is measured the way the paper does: teacher-forced, segment by segment over documents
many segments long, for three readers of the same backbone and data: the backbone alone on
L-token windows, RMT-style memory without recall (stage 1), and HMT.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast, get_args

import torch

from hmt_core.errors import InvalidInputError
from hmt_core.generation import SamplingParams, continuation_log_probs, decode_one_token
from hmt_core.memory import MemoryKind, memory_of
from hmt_core.model import HMTModel
from hmt_core.session import SessionState
from hmt_core.temp_lora import TempLoRAConfig, score_document
from hmt_lab.exercises import (
    HELD_OUT_WORDINGS,
    STANDARD_WORDING,
    PasskeyPrompt,
    build_passkey_prompt,
    passkey_answer_correct,
    value_token_indices,
)

READERS: tuple[MemoryKind, ...] = ("window", "rmt", "hmt")
PasskeyReader = Literal["window", "full", "hmt", "temp-lora", "hmt+temp-lora"]
PASSKEY_READERS: tuple[PasskeyReader, ...] = get_args(PasskeyReader)
SESSION_READERS = ("hmt", "temp-lora", "hmt+temp-lora")  # readers that read the prompt as a session
PasskeyWordingChoice = Literal["standard", "held-out"]
READER_LABELS = {"window": "backbone (L-token window)", "full": "backbone (full context)",
                 "rmt": "RMT (memory, no recall)", "hmt": "HMT", "temp-lora": "Temp-LoRA (L-token window + adapter)",
                 "hmt+temp-lora": "HMT + Temp-LoRA"}


@dataclass
class PerplexityReport:
    segment_tokens: int
    documents: int
    tokens: int
    # reader -> mean loss per segment position (nats/token), and overall
    loss_by_segment: dict[str, list[float]] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)
    seconds_per_segment: dict[str, float] = field(default_factory=dict)  # reading (and committing) one segment

    @property
    def perplexity(self) -> dict[str, float]:
        return {reader: math.exp(loss) for reader, loss in self.loss.items()}

    def table(self) -> str:
        rows = ["| reader | loss (nats/token) | perplexity | seconds per segment |", "| --- | --- | --- | --- |"]
        rows += [f"| {READER_LABELS.get(r, r)} | {self.loss[r]:.4f} | {self.perplexity[r]:.2f} | "
                 f"{self.seconds_per_segment.get(r, float('nan')):.3f} |" for r in self.loss]
        return "\n".join(rows)

    def to_json(self) -> dict:
        return {"segment_tokens": self.segment_tokens, "documents": self.documents, "tokens": self.tokens,
                "loss": self.loss, "perplexity": self.perplexity, "loss_by_segment": self.loss_by_segment,
                "seconds_per_segment": self.seconds_per_segment}


Reading = MemoryKind | Literal["full", "temp-lora"]


@torch.no_grad()
def segment_losses(model: HMTModel, documents: torch.Tensor, mode: Reading,
                   temp_lora: TempLoRAConfig | None = None) -> torch.Tensor:
    """Per-token next-token loss [B, T-1] reshaped by segment: returns [S] mean loss per segment.
    mode "full": the bare backbone reading each whole document (its upper bound where it fits);
    "temp-lora": the backbone reading L-token chunks with a per-document adapter trained on each
    chunk after it is scored (hmt_core.temp_lora.score_document), `temp_lora` its settings (also those
    of an "hmt+temp-lora" reading of an HMT model)."""
    seg = model.hmt_config.segment_tokens
    if mode == "temp-lora":
        cfg = temp_lora or TempLoRAConfig(context_tokens=model.hmt_config.num_sensory)
        losses = torch.stack([score_document(model.backbone, doc.tolist(), cfg, seg) for doc in documents])
    else:
        if mode == "full":
            limit = getattr(model.backbone.config, "max_position_embeddings", None)
            if limit is not None and documents.shape[1] > limit:
                raise InvalidInputError(f"documents of {documents.shape[1]} tokens do not fit the backbone's "
                                        f"{limit} positions: no full-context reading")
            logits = model.backbone(input_ids=documents.to(model.device), use_cache=False).logits.float()
        else:
            if memory_of(mode).adapts and model.hmt_config.memory != mode:  # HMT's weights, with an adapter
                model = model.with_memory(mode, temp_lora)
            logits = model.forward_segments(documents, memory=mode).logits.float()
        targets = documents[:, 1:].to(logits.device)
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
    # position t predicts token t+1: credit the loss to the segment of the predicted token
    positions = torch.arange(1, documents.shape[1], device=losses.device) // seg
    per_segment = torch.zeros(int(positions.max()) + 1, device=losses.device)
    per_segment.index_add_(0, positions, losses.mean(dim=0))
    counts = torch.bincount(positions).float()
    return (per_segment / counts).cpu()


def perplexity(readers: dict[str, HMTModel], documents: torch.Tensor, batch_size: int = 4,
               temp_lora: TempLoRAConfig | None = None) -> PerplexityReport:
    """readers: mode -> model ("window", "rmt" and "temp-lora" may be the HMT model itself, read differently)."""
    if documents.dim() != 2 or documents.shape[1] < 2:
        raise InvalidInputError("documents must be [n, tokens] with at least two tokens")
    any_model = next(iter(readers.values()))
    report = PerplexityReport(any_model.hmt_config.segment_tokens, documents.shape[0], documents.numel())
    # overall loss weights each segment by its number of predicted tokens
    weights = torch.bincount(torch.arange(1, documents.shape[1]) // report.segment_tokens).float()
    segments = documents.shape[0] * len(weights)
    for mode, model in readers.items():
        reading = cast(Reading, mode)  # the keys name readings
        started = time.perf_counter()
        per_batch = [segment_losses(model, documents[i:i + batch_size], reading, temp_lora)
                     * len(documents[i:i + batch_size]) for i in range(0, len(documents), batch_size)]
        report.seconds_per_segment[mode] = (time.perf_counter() - started) / segments
        by_segment = torch.stack(per_batch).sum(0) / len(documents)
        report.loss_by_segment[mode] = by_segment.tolist()
        report.loss[mode] = float((by_segment * weights).sum() / weights.sum())
    return report


def plot_loss_by_position(report: PerplexityReport, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, losses in report.loss_by_segment.items():
        x = [(i + 0.5) * report.segment_tokens for i in range(len(losses))]
        ax.plot(x, losses, marker="o", markersize=3, label=READER_LABELS.get(mode, mode))
    ax.set_xlabel("position in document (tokens)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or f"loss by position, L={report.segment_tokens}, {report.documents} documents")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# ----- pass-key retrieval --------------------------------------------------------------------

def passkey_line(key: int) -> str:
    return STANDARD_WORDING.line(key)


def passkey_trials(tokenizer: object, distances: Sequence[int], trials: int, segment_tokens: int, seed: int = 0,
                   wording: PasskeyWordingChoice = "standard",
                   filler: Sequence[int] | None = None) -> dict[int, list[PasskeyPrompt]]:
    """The prompts `passkey` asks: per distance, `trials` random keys with the key line and the
    question at random offsets of their segments (never a fixed layout a model could learn).
    wording "held-out" draws each prompt's wording from the held-out set; filler: token stream to
    cut filler from (held-out book text), default the standard sentence."""
    rng = random.Random(seed)
    prompts: dict[int, list[PasskeyPrompt]] = {}
    for distance in distances:
        prompts[distance] = []
        for _ in range(trials):
            choice = STANDARD_WORDING if wording == "standard" else rng.choice(HELD_OUT_WORDINGS)
            key = rng.randrange(10_000, 100_000)
            prompts[distance].append(build_passkey_prompt(tokenizer, key, distance, segment_tokens, rng, choice,
                                                          filler))
    return prompts


def backbone_context(model: HMTModel, tokens: Sequence[int], reader: PasskeyReader) -> list[int] | None:
    """What a bare-backbone reader reads of a prompt: the windowed baseline its last L tokens, the
    full-context one all of it (None when it is longer than the backbone's position range)."""
    if reader == "window":
        return list(tokens)[-model.hmt_config.segment_tokens:]
    limit = getattr(model.backbone.config, "max_position_embeddings", None)
    return list(tokens) if limit is None or len(tokens) <= limit else None


@torch.no_grad()
def key_digit_loss(model: HMTModel, prompt: Sequence[int], key: int, reader: PasskeyReader,
                   state: SessionState | None = None) -> float | None:
    """Teacher-forced loss of the key's digits after the prompt, nats per digit (ln 10 is chance).

    Accuracy stays 0% until every digit is right; this shows a reader learning one digit at a time.
    "hmt" scores the answer after the session that read the prompt (`state`, read here when not
    given); "window" and "full" read what their greedy reply does (`backbone_context`), then the
    answer. None: the prompt does not fit the full-context reader."""
    tokenizer = model.tokenizer
    answer = tokenizer.encode(f" {key}", add_special_tokens=False)  # type: ignore[union-attr]
    digits = value_token_indices(tokenizer, answer)
    if reader in SESSION_READERS:
        state = state if state is not None else model.append(model.new_session(), prompt)
        hmt_log_probs = continuation_log_probs(model, state, answer)
        return -sum(hmt_log_probs[i] for i in digits) / len(digits)
    context = backbone_context(model, list(prompt) + answer, reader)
    if context is None:
        return None
    context = context[:len(context) - len(answer)]
    logits = model.backbone(input_ids=torch.tensor([context + answer], device=model.device), use_cache=False).logits
    log_probs = torch.log_softmax(logits[0].float(), dim=-1)
    positions = [len(context) + i - 1 for i in digits]  # logits at position t predict token t + 1
    return float(-log_probs[positions, [answer[i] for i in digits]].mean())


def greedy_backbone_reply(model: HMTModel, context: Sequence[int], max_tokens: int) -> list[int]:
    """The bare backbone reading `context`, greedy (the baselines of the HMT rows)."""
    out = model.backbone(input_ids=torch.tensor([list(context)], device=model.device), use_cache=True,
                         logits_to_keep=1)
    logits, cache, reply = out.logits[0, -1], out.past_key_values, []
    for _ in range(max_tokens):
        reply.append(int(logits.argmax()))
        logits = decode_one_token(model, reply[-1], cache)
    return reply


@dataclass
class PasskeyReport:
    segment_tokens: int
    trials: int
    # reader -> distance -> accuracy (None: no prompt fit the reader, the full-context backbone)
    accuracy: dict[str, dict[int, float | None]] = field(default_factory=dict)
    # reader -> distance -> mean teacher-forced loss of the key's digits (nats per digit; ln 10 is chance)
    digit_loss: dict[str, dict[int, float | None]] = field(default_factory=dict)

    def table(self) -> str:
        distances = sorted(next(iter(self.accuracy.values())))
        head = "| reader | " + " | ".join(f"{d} seg" for d in distances) + " |"
        rows = [head, "| --- |" + " --- |" * len(distances)]
        for reader, by_distance in self.accuracy.items():
            cells = " | ".join("beyond context" if by_distance[d] is None else
                               f"{by_distance[d]:.0%} ({self.digit_loss[reader][d]:.2f})" for d in distances)
            rows.append(f"| {READER_LABELS.get(reader, reader)} | {cells} |")
        note = f"accuracy over {self.trials} keys (key-digit loss in nats, chance ln 10 = {math.log(10):.2f})"
        return "\n".join([*rows, "", note])

    def to_json(self) -> dict:
        return {"segment_tokens": self.segment_tokens, "trials": self.trials, "accuracy": self.accuracy,
                "digit_loss": self.digit_loss}


@torch.no_grad()
def passkey(model: HMTModel, distances: Sequence[int], trials: int = 50, seed: int = 0,
            readers: Sequence[PasskeyReader] = ("window", "hmt"), wording: PasskeyWordingChoice = "standard",
            filler: Sequence[int] | None = None, baseline: HMTModel | None = None,
            temp_lora: TempLoRAConfig | None = None) -> PasskeyReport:
    """Accuracy of HMT and of bare-backbone readers at retrieving a random key `d` segments back,
    key and question at random offsets (`passkey_trials`). The full-context reader scores only
    prompts that fit its positions (a distance where none fit is reported as None). baseline: the
    model whose backbone the bare readers use (default: `model`'s own). "temp-lora": sessions of
    that bare backbone with Temp-LoRA memory (`temp_lora` its settings); "hmt+temp-lora": sessions of
    `model` with such an adapter besides its memory."""
    baseline = baseline or model
    sessions = {"hmt": model}
    if "temp-lora" in readers:
        sessions["temp-lora"] = baseline.with_memory("temp-lora", temp_lora).eval()
    if "hmt+temp-lora" in readers:
        sessions["hmt+temp-lora"] = model.with_memory("hmt+temp-lora", temp_lora).eval()
    if model.tokenizer is None:
        raise InvalidInputError("the pass-key test needs a model with a tokenizer")
    seg = model.hmt_config.segment_tokens
    report = PasskeyReport(seg, trials, {r: {} for r in readers}, {r: {} for r in readers})
    answer_tokens = len(model.tokenizer.encode(" 99999.", add_special_tokens=False)) + 1
    for distance, prompts in passkey_trials(model.tokenizer, distances, trials, seg, seed, wording, filler).items():
        hits = dict.fromkeys(readers, 0)
        losses: dict[str, list[float]] = {r: [] for r in readers}
        for prompt in prompts:
            for reader in readers:
                if reader in sessions:
                    reading = sessions[reader]
                    state = reading.append(reading.new_session(), prompt.tokens)
                    reply = reading.generate(state, SamplingParams(max_tokens=answer_tokens, ignore_eos=True)).run()
                    hits[reader] += passkey_answer_correct(prompt.key, reply.text)
                    loss = key_digit_loss(reading, prompt.tokens, prompt.key, reader, state)
                    assert loss is not None  # sessions always score; None is for prompts "full" cannot fit
                    losses[reader].append(float(loss))
                    continue
                context = backbone_context(baseline, prompt.tokens, reader)
                if context is None:
                    continue
                reply_tokens = greedy_backbone_reply(baseline, context, answer_tokens)
                reply_text = cast(str, model.tokenizer.decode(reply_tokens))  # a str for one sequence of ids
                hits[reader] += passkey_answer_correct(prompt.key, reply_text)
                losses[reader].append(float(key_digit_loss(baseline, prompt.tokens, prompt.key, reader)))  # type: ignore[arg-type]
        for reader in readers:
            scored = len(losses[reader])
            report.accuracy[reader][distance] = hits[reader] / scored if scored else None
            report.digit_loss[reader][distance] = sum(losses[reader]) / scored if scored else None
    return report
