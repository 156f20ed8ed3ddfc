"""`hmt eval precision`: the quality of each serving precision against fp32, in one run.

One model loaded once, converted to each precision (`hmt_core.precision.apply_precision`, the
same conversion hmt-serve's `--precision` applies at load), and three measures, each against
fp32 on the same inputs:

- held-out perplexity by position: teacher-forced scoring of held-out text segment by segment
  (memory included), the mean loss of every segment, and how often each position's top token
  equals fp32's;
- pass-key digit loss (`hmt_lab.evaluate.key_digit_loss`, nats per digit, ln 10 is chance) at
  the given distances in segments, the same keys and prompts for every precision, so the
  comparison is paired: the mean change against fp32 next to the noise of fp32's own mean (its
  standard error over the keys);
- greedy agreement of short held-out chats (a fact stated, acknowledged, asked back: the
  held-out facts of `hmt_lab.exercises`): the share of reply tokens identical to fp32's at the
  same position, how many replies are identical, and where the first one parts.

bench/precision.py takes its quality columns from `precision_quality` too.
"""

from __future__ import annotations

import copy
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hmt_core.engine import DecodeEngine, advance_appends, begin_append
from hmt_core.errors import InvalidInputError
from hmt_core.generation import SamplingParams
from hmt_core.model import HMTModel
from hmt_core.precision import PRECISIONS, Precision, apply_precision, check_precision
from hmt_core.session import SessionState
from hmt_lab.evaluate import key_digit_loss, passkey_trials
from hmt_lab.exercises import chat_fact, encoder

BASELINE: Precision = "fp32"


def precision_models(model: HMTModel, precisions: Sequence[str]) -> dict[str, HMTModel]:
    """The fp32 `model` itself and a converted copy for each other precision (fp32 first)."""
    chosen = [check_precision(p) for p in precisions]
    if not chosen or chosen[0] != BASELINE:
        raise InvalidInputError(f"the precisions must start with {BASELINE}, the baseline; got {list(precisions)}")
    return {p: model if p == BASELINE else apply_precision(copy.deepcopy(model), p).eval() for p in chosen}


def held_out_ids(model: HMTModel, text: str, tokens: int) -> torch.Tensor:
    """The first `tokens` tokens of held-out text, [1, T]."""
    if model.tokenizer is None:
        raise InvalidInputError("scoring held-out text needs a model with a tokenizer")
    ids = model.tokenizer(text, return_tensors="pt").input_ids[:, :tokens]  # type: ignore[operator]
    if ids.shape[1] < 2:
        raise InvalidInputError("the held-out text has fewer than two tokens")
    return ids


@torch.no_grad()
def held_out_scores(model: HMTModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token losses over ids [1, T] (teacher-forced, with memory) and the top token, per position."""
    logits = model.score(ids).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none"), logits.argmax(dim=-1)


def read_prompts(model: HMTModel, prompts: Sequence[Sequence[int]]) -> list[SessionState]:
    """Sessions that read these prompts, their windows committed in batched forwards (as hmt-serve does)."""
    tasks = [begin_append(model, model.new_session(), list(prompt)) for prompt in prompts]
    while advance_appends(model, tasks):
        pass
    for task in tasks:
        if task.error is not None:
            raise task.error
    return [task.state for task in tasks]


def short_chats(tokenizer: object, count: int, seed: int = 0) -> list[list[int]]:
    """`count` short held-out chats in the tokenizer's chat template, up to the assistant's turn."""
    rng = random.Random(seed)
    encode = encoder(tokenizer)
    chats = []
    for _ in range(count):
        messages = chat_fact(rng, [], filler_turns=0, held_out=True).messages
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # type: ignore[attr-defined]
        chats.append(encode(str(text)))
    return chats


def greedy_replies(model: HMTModel, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
    """Each prompt's greedy reply (ending at the end of turn or after max_tokens), all decoded in
    one engine batch as hmt-serve decodes concurrent chats."""
    engine = DecodeEngine(model, max_rows=max(1, len(prompts)))
    params = SamplingParams(max_tokens=max_tokens)
    rows = [engine.add(state, params) for state in read_prompts(model, prompts)]
    while engine.size:
        out = engine.step()
        if out.failed:
            raise out.failed[0].error  # type: ignore[misc]
    return [list(row.tokens) for row in rows]


def first_divergence(reference: Sequence[int], reply: Sequence[int]) -> int | None:
    """Index of the first token where the replies part (one ending earlier parts there); None: identical."""
    for i, (a, b) in enumerate(zip(reference, reply, strict=False)):
        if a != b:
            return i
    return None if len(reference) == len(reply) else min(len(reference), len(reply))


def token_agreement(reference: Sequence[Sequence[int]], replies: Sequence[Sequence[int]]) -> float:
    """Share of reply positions (the longer reply of each pair counts) holding the same token."""
    same = sum(a == b for ref, got in zip(reference, replies, strict=True) for a, b in zip(ref, got, strict=False))
    total = sum(max(len(ref), len(got)) for ref, got in zip(reference, replies, strict=True))
    return same / total if total else 1.0


@dataclass
class PrecisionQuality:
    """One precision's measures (the comparisons with fp32 live on the report)."""

    loss_by_position: list[float]  # mean held-out loss of each segment (nats/token)
    loss: float  # over all held-out positions
    top: torch.Tensor  # the top token at each held-out position
    digit_loss: dict[int, list[float]]  # distance in segments -> digit loss of each key
    replies: list[list[int]]  # greedy replies to the short chats
    seconds: float


@dataclass
class PrecisionReport:
    segment_tokens: int
    held_out_tokens: int
    trials: int
    chat_tokens: int
    results: dict[str, PrecisionQuality] = field(default_factory=dict)

    @property
    def base(self) -> PrecisionQuality:
        return self.results[BASELINE]

    @property
    def distances(self) -> list[int]:
        return sorted(self.base.digit_loss)

    def perplexity(self, precision: str) -> float:
        return math.exp(self.results[precision].loss)

    def perplexity_change(self, precision: str) -> float:
        """Relative change of the held-out perplexity against fp32 (0.01: 1% higher)."""
        return self.perplexity(precision) / self.perplexity(BASELINE) - 1

    def top1_agreement(self, precision: str) -> float:
        return float((self.results[precision].top == self.base.top).float().mean())

    def digit_loss(self, precision: str, distance: int) -> float:
        return statistics.fmean(self.results[precision].digit_loss[distance])

    def digit_loss_change(self, precision: str, distance: int) -> float:
        """Mean change of the digit loss against fp32, key by key (paired: the same prompts)."""
        pairs = zip(self.results[precision].digit_loss[distance], self.base.digit_loss[distance], strict=True)
        return statistics.fmean(a - b for a, b in pairs)

    def digit_loss_noise(self, distance: int) -> float:
        """fp32's own noise: the standard error of its mean digit loss over the keys (0 for one key)."""
        losses = self.base.digit_loss[distance]
        return statistics.stdev(losses) / math.sqrt(len(losses)) if len(losses) > 1 else 0.0

    def chat_agreement(self, precision: str) -> float:
        return token_agreement(self.base.replies, self.results[precision].replies)

    def divergences(self, precision: str) -> list[int | None]:
        return [first_divergence(a, b) for a, b in zip(self.base.replies, self.results[precision].replies, strict=True)]

    def headers(self) -> list[str]:
        chats = [f"chat tokens = fp32 ({self.chat_tokens} greedy)", "identical chats", "first divergence (median)"]
        return ["held-out ppl", "ppl vs fp32", "top-1 = fp32",
                *(f"digit loss {d} seg (vs fp32)" for d in self.distances), *(chats if self.base.replies else [])]

    def cells(self, precision: str) -> list[str]:
        """This precision's quality columns (`headers`), as the CLI and bench/precision.py print them."""
        parted = [d for d in self.divergences(precision) if d is not None]
        chats = len(self.base.replies)
        chat_cells = [f"{self.chat_agreement(precision):.1%}", f"{chats - len(parted)}/{chats}",
                      f"{statistics.median(parted):.0f}" if parted else "-"]
        return [f"{self.perplexity(precision):.3f}", f"{self.perplexity_change(precision) * 100:+.2f}%",
                f"{self.top1_agreement(precision):.1%}",
                *(f"{self.digit_loss(precision, d):.3f} ({self.digit_loss_change(precision, d):+.3f})"
                  for d in self.distances), *(chat_cells if chats else [])]

    def table(self) -> str:
        headers = ["precision", *self.headers()]
        rows = ["| " + " | ".join(headers) + " |", "| --- |" + " ---: |" * (len(headers) - 1)]
        rows += [f"| {p} | " + " | ".join(self.cells(p)) + " |" for p in self.results]
        noise = ", ".join(f"{d} seg {self.digit_loss_noise(d):.3f}" for d in self.distances)
        keys = (f"; pass keys: {self.trials} keys per distance, the same for every precision (digit loss in nats per "
                f"digit, chance ln 10 = {math.log(10):.2f}); fp32's standard error over the keys: {noise}"
                if self.distances else "")
        by_position = [f"{p}: " + " ".join(f"{x:.2f}" for x in q.loss_by_position) for p, q in self.results.items()]
        return "\n".join([*rows, "", f"held-out: {self.held_out_tokens} tokens, teacher-forced with memory{keys}",
                          "held-out loss by segment (nats):", *(f"  {line}" for line in by_position)])

    def to_json(self) -> dict:
        return {"segment_tokens": self.segment_tokens, "held_out_tokens": self.held_out_tokens,
                "trials": self.trials, "chat_tokens": self.chat_tokens,
                "digit_loss_noise": {d: self.digit_loss_noise(d) for d in self.distances},
                "precisions": {p: {"perplexity": self.perplexity(p), "perplexity_change": self.perplexity_change(p),
                                   "top1_agreement": self.top1_agreement(p), "loss_by_position": q.loss_by_position,
                                   "digit_loss": q.digit_loss,
                                   "digit_loss_change": {d: self.digit_loss_change(p, d) for d in self.distances},
                                   "chat_agreement": self.chat_agreement(p), "first_divergence": self.divergences(p),
                                   "seconds": q.seconds}
                               for p, q in self.results.items()}}


@torch.no_grad()
def precision_quality(models: dict[str, HMTModel], held_out: torch.Tensor, distances: Sequence[int] = (1, 8, 32),
                      trials: int = 4, chats: int = 8, chat_tokens: int = 32, seed: int = 0,
                      filler: Sequence[int] | None = None) -> PrecisionReport:
    """Every measure for every precision (`precision_models`), fp32 first. held_out: [1, T] token ids."""
    if next(iter(models), None) != BASELINE:
        raise InvalidInputError(f"the first precision must be {BASELINE}, the baseline")
    if held_out.dim() != 2 or held_out.shape[0] != 1 or held_out.shape[1] < 2:
        raise InvalidInputError("held-out text must be [1, tokens] with at least two tokens")
    if trials < 1 or chats < 0 or chat_tokens < 1 or any(d < 0 for d in distances):
        raise InvalidInputError("trials and chat tokens must be >= 1, chats and distances >= 0")
    base = models[BASELINE]
    tokenizer = base.tokenizer
    if tokenizer is None and (distances or chats):
        raise InvalidInputError("pass keys and chats need a model with a tokenizer")
    seg = base.hmt_config.segment_tokens
    keys = passkey_trials(tokenizer, distances, trials, seg, seed, filler=filler) if distances else {}
    prompts = [prompt for distance in keys for prompt in keys[distance]]
    chat_prompts = short_chats(tokenizer, chats, seed) if chats else []
    report = PrecisionReport(seg, held_out.shape[1], trials, chat_tokens)
    segment_of = torch.arange(1, held_out.shape[1]) // seg  # position t predicts token t + 1
    for precision, model in models.items():
        started = time.perf_counter()
        losses, top = held_out_scores(model, held_out)
        by_position = [float(losses[segment_of == s].mean()) for s in range(int(segment_of.max()) + 1)]
        states = iter(read_prompts(model, [p.tokens for p in prompts]))
        digit_loss = {d: [float(key_digit_loss(model, p.tokens, p.key, "hmt", next(states)))  # type: ignore[arg-type]
                          for p in keys[d]] for d in keys}
        replies = greedy_replies(model, chat_prompts, chat_tokens) if chat_prompts else []
        report.results[precision] = PrecisionQuality(by_position, float(losses.mean()), top, digit_loss, replies,
                                                     time.perf_counter() - started)
    return report


__all__ = ["BASELINE", "PRECISIONS", "PrecisionQuality", "PrecisionReport", "first_divergence", "greedy_replies",
           "held_out_ids", "held_out_scores", "precision_models", "precision_quality", "read_prompts", "short_chats",
           "token_agreement"]
