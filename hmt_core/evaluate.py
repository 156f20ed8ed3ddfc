"""`hmt eval`: long-document perplexity by position, and pass-key retrieval by distance.

Perplexity is measured the way the paper does: teacher-forced, segment by segment over documents
many segments long, for three readers of the same backbone and data: the backbone alone on
L-token windows, RMT-style memory without recall (stage 1), and HMT.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from hmt_core.errors import InvalidInputError
from hmt_core.generation import SamplingParams, continuation_log_probs, decode_one_token
from hmt_core.model import HMTModel, MemoryMode
from hmt_core.session import SessionState

READERS: tuple[MemoryMode, ...] = ("window", "rmt", "hmt")
PasskeyReader = Literal["window", "hmt"]
READER_LABELS = {"window": "backbone (L-token window)", "rmt": "RMT (memory, no recall)", "hmt": "HMT"}


@dataclass
class PerplexityReport:
    segment_tokens: int
    documents: int
    tokens: int
    # reader -> mean loss per segment position (nats/token), and overall
    loss_by_segment: dict[str, list[float]] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)

    @property
    def perplexity(self) -> dict[str, float]:
        return {reader: math.exp(loss) for reader, loss in self.loss.items()}

    def table(self) -> str:
        rows = ["| reader | loss (nats/token) | perplexity |", "| --- | --- | --- |"]
        rows += [f"| {READER_LABELS.get(r, r)} | {self.loss[r]:.4f} | {self.perplexity[r]:.2f} |" for r in self.loss]
        return "\n".join(rows)

    def to_json(self) -> dict:
        return {"segment_tokens": self.segment_tokens, "documents": self.documents, "tokens": self.tokens,
                "loss": self.loss, "perplexity": self.perplexity, "loss_by_segment": self.loss_by_segment}


@torch.no_grad()
def segment_losses(model: HMTModel, documents: torch.Tensor, mode: MemoryMode) -> torch.Tensor:
    """Per-token next-token loss [B, T-1] reshaped by segment: returns [S] mean loss per segment."""
    logits = model.forward_segments(documents, mode=mode).logits.float()
    targets = documents[:, 1:].to(logits.device)
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
    seg = model.hmt_config.segment_tokens
    # position t predicts token t+1: credit the loss to the segment of the predicted token
    positions = torch.arange(1, documents.shape[1], device=losses.device) // seg
    per_segment = torch.zeros(int(positions.max()) + 1, device=losses.device)
    per_segment.index_add_(0, positions, losses.mean(dim=0))
    counts = torch.bincount(positions).float()
    return (per_segment / counts).cpu()


def perplexity(readers: dict[str, HMTModel], documents: torch.Tensor, batch_size: int = 4) -> PerplexityReport:
    """readers: mode -> model ("window" and "rmt" may be the HMT model itself, read differently)."""
    if documents.dim() != 2 or documents.shape[1] < 2:
        raise InvalidInputError("documents must be [n, tokens] with at least two tokens")
    any_model = next(iter(readers.values()))
    report = PerplexityReport(any_model.hmt_config.segment_tokens, documents.shape[0], documents.numel())
    # overall loss weights each segment by its number of predicted tokens
    weights = torch.bincount(torch.arange(1, documents.shape[1]) // report.segment_tokens).float()
    for mode, model in readers.items():
        per_batch = [segment_losses(model, documents[i:i + batch_size], mode) * len(documents[i:i + batch_size])
                     for i in range(0, len(documents), batch_size)]
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

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def passkey_line(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


@dataclass
class PasskeyPrompt:
    key: int
    tokens: list[int]
    key_position: int  # token index where the key line starts
    key_end: int  # token index just after the key line
    question_position: int  # token index where the question starts

    def distance_segments(self, segment_tokens: int) -> int:
        """Segments from the one holding the end of the key line to the one opening the question."""
        return self.question_position // segment_tokens - (self.key_end - 1) // segment_tokens


def build_passkey_prompt(tokenizer: object, key: int, distance_segments: int, segment_tokens: int,
                         prefix_filler: int = 1) -> PasskeyPrompt:
    """intro, filler, key line, then filler cut so the question opens `distance_segments` segments
    after the one where the key line ends (right after the key line when the distance is 0)."""
    encode = tokenizer.encode  # type: ignore[attr-defined]
    filler = encode(" " + PASSKEY_FILLER)
    tokens = encode(PASSKEY_INTRO) + filler * prefix_filler
    key_position = len(tokens)
    tokens += encode(" " + passkey_line(key))
    key_end = len(tokens)
    need = ((key_end - 1) // segment_tokens + distance_segments) * segment_tokens - len(tokens)
    if need > 0:
        tokens += (filler * (need // len(filler) + 1))[:need]
    return PasskeyPrompt(key, tokens + encode(" " + PASSKEY_QUESTION), key_position, key_end, len(tokens))


def passkey_answer_correct(key: int, answer: str) -> bool:
    """The reply must start with the key's digits (surrounding spaces and a trailing dot allowed)."""
    digits = answer.strip().split(" ")[0].rstrip(".,")
    return digits == str(key)


def _window_context(model: HMTModel, tokens: Sequence[int]) -> list[int]:
    """What the windowed baseline reads of a prompt: its last L tokens."""
    return list(tokens)[-model.hmt_config.segment_tokens:]


@torch.no_grad()
def key_digit_loss(model: HMTModel, prompt: Sequence[int], key: int, reader: PasskeyReader,
                   state: SessionState | None = None) -> float:
    """Teacher-forced loss of the key's digits after the prompt, nats per digit (ln 10 is chance).

    Accuracy stays 0% until every digit is right; this shows a reader learning one digit at a time.
    "hmt" scores the answer after the session that read the prompt (`state`, read here when not
    given); "window" reads what the greedy baseline does: the prompt's last L tokens, then the answer."""
    tokenizer = model.tokenizer
    answer = tokenizer.encode(f" {key}")  # type: ignore[union-attr]
    digits = [i for i, token in enumerate(answer) if tokenizer.decode([token]).strip().isdigit()]  # type: ignore[union-attr]
    if reader == "hmt":
        state = state if state is not None else model.append(model.new_session(), prompt)
        log_probs = continuation_log_probs(model, state, answer)
        return -sum(log_probs[i] for i in digits) / len(digits)
    context = _window_context(model, prompt)
    logits = model.backbone(input_ids=torch.tensor([context + answer], device=model.device), use_cache=False).logits
    log_probs = torch.log_softmax(logits[0].float(), dim=-1)
    positions = [len(context) + i - 1 for i in digits]  # logits at position t predict token t + 1
    return float(-log_probs[positions, [answer[i] for i in digits]].mean())


def _greedy_window_reply(model: HMTModel, tokens: Sequence[int], max_tokens: int) -> list[int]:
    """The baseline: the backbone alone on the last L tokens (its window), greedy."""
    window = torch.tensor([_window_context(model, tokens)], device=model.device)
    out = model.backbone(input_ids=window, use_cache=True, logits_to_keep=1)
    logits, cache, reply = out.logits[0, -1], out.past_key_values, []
    for _ in range(max_tokens):
        reply.append(int(logits.argmax()))
        logits = decode_one_token(model, reply[-1], cache)
    return reply


@dataclass
class PasskeyReport:
    segment_tokens: int
    trials: int
    accuracy: dict[str, dict[int, float]] = field(default_factory=dict)  # reader -> distance -> accuracy
    # reader -> distance -> mean teacher-forced loss of the key's digits (nats per digit; ln 10 is chance)
    digit_loss: dict[str, dict[int, float]] = field(default_factory=dict)

    def table(self) -> str:
        distances = sorted(next(iter(self.accuracy.values())))
        head = "| reader | " + " | ".join(f"{d} seg" for d in distances) + " |"
        rows = [head, "| --- |" + " --- |" * len(distances)]
        for reader, by_distance in self.accuracy.items():
            cells = " | ".join(f"{by_distance[d]:.0%} ({self.digit_loss[reader][d]:.2f})" for d in distances)
            rows.append(f"| {READER_LABELS.get(reader, reader)} | {cells} |")
        note = f"accuracy over {self.trials} keys (key-digit loss in nats, chance ln 10 = {math.log(10):.2f})"
        return "\n".join([*rows, "", note])

    def to_json(self) -> dict:
        return {"segment_tokens": self.segment_tokens, "trials": self.trials, "accuracy": self.accuracy,
                "digit_loss": self.digit_loss}


@torch.no_grad()
def passkey(model: HMTModel, distances: Sequence[int], trials: int = 50, seed: int = 0,
            digits: int = 5) -> PasskeyReport:
    """Accuracy of HMT and of the windowed backbone at retrieving a random key `d` segments back."""
    if model.tokenizer is None:
        raise InvalidInputError("the pass-key test needs a model with a tokenizer")
    rng = random.Random(seed)
    seg = model.hmt_config.segment_tokens
    report = PasskeyReport(seg, trials, {"window": {}, "hmt": {}}, {"window": {}, "hmt": {}})
    answer_tokens = len(model.tokenizer.encode(" " + "9" * digits)) + 1
    for distance in distances:
        hits = {"window": 0, "hmt": 0}
        losses = {"window": 0.0, "hmt": 0.0}
        for _ in range(trials):
            key = rng.randrange(10 ** (digits - 1), 10 ** digits)
            prompt = build_passkey_prompt(model.tokenizer, key, distance, seg)
            state = model.append(model.new_session(), prompt.tokens)
            hmt_reply = model.generate(state, SamplingParams(max_tokens=answer_tokens, ignore_eos=True)).run()
            hits["hmt"] += passkey_answer_correct(key, model.tokenizer.decode(hmt_reply.tokens))
            window_reply = _greedy_window_reply(model, prompt.tokens, answer_tokens)
            hits["window"] += passkey_answer_correct(key, model.tokenizer.decode(window_reply))
            losses["hmt"] += key_digit_loss(model, prompt.tokens, key, "hmt", state)  # the same read
            losses["window"] += key_digit_loss(model, prompt.tokens, key, "window")
        for reader, count in hits.items():
            report.accuracy[reader][distance] = count / trials
            report.digit_loss[reader][distance] = losses[reader] / trials
    return report
