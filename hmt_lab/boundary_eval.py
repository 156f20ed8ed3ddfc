"""`hmt eval boundary`: issue #27's standing milestone, "no damage at boundaries".

Two measures, each against the bare backbone (the memory must not hurt until it helps):

- sampled replies across a boundary: a reply sampled by HMT (temperature 0.7, top-p 0.95) long
  enough to cross a window boundary with `window` tokens (64) on each side; the bare backbone reads
  prompt + reply as one plain full-context sequence and its perplexity of the `window` reply tokens
  after the boundary is compared with that of the `window` before. Holds when the median ratio
  after/before is <= 1.2. (The shipped chat model went from fluent to garbage at the first boundary.)
- teacher-forced held-out text, the first `head` positions (32) of every window after the first:
  HMT's loss there (scoring the whole document, memory included) against the bare backbone reading
  the same window after the same sensory tokens. Holds when HMT's mean loss is no higher.

The core functions take token ids; only `chat_prompts` needs a tokenizer (and a chat template).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hmt_core.errors import InvalidInputError
from hmt_core.generation import SamplingParams
from hmt_core.model import HMTModel

RATIO_LIMIT = 1.2  # #27: after-boundary perplexity within 1.2x of before

# held-out chat prompts asking for long replies (a reply that ends its turn early is continued anyway,
# ignore_eos, but prose is what the measure is about)
BOUNDARY_PROMPTS: tuple[str, ...] = (
    "Tell me about the sea, please.",
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain, step by step, how bread is baked at home.",
    "Describe a walk through an old forest in autumn.",
    "What should a first-time visitor know about living in a big city?",
    "Tell me the history of the bicycle in as much detail as you can.",
    "Write a letter from a sailor to his sister back home.",
    "How do bees make honey? Please explain it thoroughly.",
    "Describe your ideal garden, plant by plant.",
    "Write a long fairy tale about a fox who wanted to fly.",
    "Explain why the seasons change, as if to a curious child.",
    "Tell me about the life of a farmer through one whole year.",
    "Describe a busy train station early in the morning.",
    "What makes a good teacher? Give many examples.",
    "Write a diary entry of an explorer crossing a desert.",
    "Tell me about mountains: how they form and who lives on them.",
)


def chat_prompts(tokenizer: object, count: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of BOUNDARY_PROMPTS (a seeded draw) in the tokenizer's chat template, up to the
    assistant's turn; a tokenizer without a template reads "User: ...\\nAssistant:"."""
    if count < 1:
        raise InvalidInputError(f"the boundary test needs at least one prompt, got {count}")
    rng = random.Random(seed)
    chosen = rng.sample(BOUNDARY_PROMPTS, min(count, len(BOUNDARY_PROMPTS)))
    chosen += [rng.choice(BOUNDARY_PROMPTS) for _ in range(count - len(chosen))]  # repeats sample new replies
    prompts = []
    for text in chosen:
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],  # type: ignore[attr-defined]
                                                     tokenize=False, add_generation_prompt=True)
        else:
            rendered = f"User: {text}\nAssistant:"
        prompts.append(list(tokenizer.encode(str(rendered), add_special_tokens=False)))  # type: ignore[attr-defined]
    return prompts


def planned_boundary(prompt_tokens: int, segment_tokens: int, window: int) -> int:
    """Index in the reply of the first token read in a new window, at least `window` tokens in.

    Windows commit lazily: the token at stream position j*L (j >= 1) finds window j-1 full, which
    commits before the token opens window j. So reply token r opens a window when (P + r) % L == 0."""
    first = (-prompt_tokens) % segment_tokens
    while first < window:
        first += segment_tokens
    return first


@dataclass
class ReplyBoundary:
    """One sampled reply across a boundary, scored by the bare backbone."""

    prompt_tokens: int
    reply: list[int]
    boundary: int  # reply index of the first token read in the new window (where the commit happened)
    loss_before: float  # the bare backbone's mean loss of reply[boundary - window:boundary] (nats/token)
    loss_after: float  # ... of reply[boundary:boundary + window]
    end_of_turn: int | None  # reply index of the first end-of-turn token sampled (ignored), None if none

    @property
    def ratio(self) -> float:
        """Perplexity after / perplexity before."""
        return math.exp(self.loss_after - self.loss_before)


@dataclass
class BoundaryReport:
    segment_tokens: int
    sensory_tokens: int  # what the backbone reads before each scored window (HMT's k)
    window: int  # reply tokens scored on each side of the boundary
    head: int  # first positions of a window scored teacher-forced
    replies: list[ReplyBoundary] = field(default_factory=list)
    documents: int = 0
    windows_scored: int = 0  # windows 2..n of every document
    hmt_head_loss: float = math.nan  # mean loss at the first `head` positions of those windows (nats/token)
    backbone_head_loss: float = math.nan
    ratio_limit: float = RATIO_LIMIT

    @property
    def ratios(self) -> list[float]:
        return [r.ratio for r in self.replies]

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios) if self.replies else math.nan

    @property
    def share_within(self) -> float:
        """Share of replies whose perplexity after the boundary is within `ratio_limit` of before."""
        return sum(r <= self.ratio_limit for r in self.ratios) / len(self.replies) if self.replies else math.nan

    @property
    def sampled_holds(self) -> bool:
        return bool(self.replies) and self.median_ratio <= self.ratio_limit

    @property
    def head_loss_difference(self) -> float:
        """HMT's mean loss minus the backbone's (nats/token): <= 0 holds."""
        return self.hmt_head_loss - self.backbone_head_loss

    @property
    def teacher_forced_holds(self) -> bool:
        return self.windows_scored > 0 and self.hmt_head_loss <= self.backbone_head_loss

    def table(self) -> str:
        def verdict(holds: bool) -> str:
            return "holds" if holds else "does not hold"

        rows = ["| reply | boundary at | ppl before | ppl after | after / before |",
                "| ---: | ---: | ---: | ---: | ---: |"]
        rows += [f"| {i} | {r.boundary} | {math.exp(r.loss_before):.2f} | {math.exp(r.loss_after):.2f} | "
                 f"{r.ratio:.2f} |" for i, r in enumerate(self.replies)]
        ended = sum(r.end_of_turn is not None and r.end_of_turn < r.boundary + self.window for r in self.replies)
        return "\n".join([
            f"sampled replies (0.7 / 0.95) across a boundary, the bare backbone's perplexity of the {self.window} "
            f"reply tokens before and after it (full context):", *rows,
            f"median after / before {self.median_ratio:.3f} (limit {self.ratio_limit}); within "
            f"{self.ratio_limit}x: {self.share_within:.0%} of {len(self.replies)}; "
            f"{ended} sampled an end of turn before the scored tokens ended (ignored): "
            f"{verdict(self.sampled_holds)}",
            "",
            f"teacher-forced held-out text, first {self.head} positions of windows 2..n "
            f"({self.windows_scored} windows of {self.documents} documents, L={self.segment_tokens}):",
            "| reader | loss (nats/token) | perplexity |", "| --- | ---: | ---: |",
            f"| HMT (with memory) | {self.hmt_head_loss:.4f} | {math.exp(self.hmt_head_loss):.2f} |",
            f"| bare backbone after the {self.sensory_tokens} sensory tokens | {self.backbone_head_loss:.4f} | "
            f"{math.exp(self.backbone_head_loss):.2f} |",
            f"HMT - backbone: {self.head_loss_difference:+.4f} nats/token: {verdict(self.teacher_forced_holds)}",
        ])

    def to_json(self) -> dict:
        return {"segment_tokens": self.segment_tokens, "sensory_tokens": self.sensory_tokens, "window": self.window,
                "head": self.head, "ratio_limit": self.ratio_limit,
                "sampled": {"holds": self.sampled_holds, "median_ratio": self.median_ratio,
                            "share_within": self.share_within,
                            "replies": [{"prompt_tokens": r.prompt_tokens, "reply_tokens": len(r.reply),
                                         "boundary": r.boundary, "loss_before": r.loss_before,
                                         "loss_after": r.loss_after, "ratio": r.ratio,
                                         "end_of_turn": r.end_of_turn} for r in self.replies]},
                "teacher_forced": {"holds": self.teacher_forced_holds, "documents": self.documents,
                                   "windows": self.windows_scored, "hmt_loss": self.hmt_head_loss,
                                   "backbone_loss": self.backbone_head_loss,
                                   "difference": self.head_loss_difference}}


def _check_spans(window: int, head: int, segment_tokens: int) -> None:
    if window < 1 or head < 1:
        raise InvalidInputError(f"window and head must be >= 1, got window={window}, head={head}")
    if head > segment_tokens:
        raise InvalidInputError(f"head={head} is longer than a window (L={segment_tokens})")


@torch.no_grad()
def backbone_token_losses(baseline: HMTModel, ids: Sequence[int]) -> torch.Tensor:
    """The bare backbone's loss of every token after the first [T-1] (index i: token i + 1), full context."""
    limit = getattr(baseline.backbone.config, "max_position_embeddings", None)
    if limit is not None and len(ids) > limit:
        raise InvalidInputError(f"prompt + reply ({len(ids)} tokens) do not fit the backbone's {limit} positions")
    tokens = torch.tensor([list(ids)], device=baseline.device)
    logits = baseline.backbone(input_ids=tokens, use_cache=False).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, tokens[0, 1:], reduction="none").cpu()


@torch.no_grad()
def sample_across_boundary(model: HMTModel, prompt: Sequence[int], window: int = 64, seed: int = 0,
                           temperature: float = 0.7, top_p: float = 0.95) -> tuple[list[int], int]:
    """HMT's sampled reply to `prompt`, long enough to hold `window` tokens on each side of a boundary
    (`planned_boundary`). Returns (reply, boundary): the reply index where segments_committed changed,
    observed token by token, so the measure rests on the commit the session made, not on arithmetic."""
    if not prompt:
        raise InvalidInputError("a boundary prompt must have at least one token")
    state = model.append(model.new_session(), prompt)
    boundary = planned_boundary(len(prompt), model.hmt_config.segment_tokens, window)
    params = SamplingParams(max_tokens=boundary + window, temperature=temperature, top_p=top_p, seed=seed,
                            ignore_eos=True)
    generation = model.generate(state, params)
    committed, commits = state.segments_committed, []
    for index, _ in enumerate(generation):
        if generation.state.segments_committed != committed:
            commits.append(index)
            committed = generation.state.segments_committed
    observed = next((c for c in commits if c >= window), None)
    if observed != boundary:  # the engine's commit rule changed: the spans would straddle the wrong place
        raise RuntimeError(f"expected the commit at reply token {boundary}, the session committed at {commits}")
    return list(generation.tokens), boundary


def measure_reply(baseline: HMTModel, prompt: Sequence[int], reply: Sequence[int], boundary: int,
                  window: int = 64, eos: set[int] | None = None) -> ReplyBoundary:
    """The bare backbone's loss of reply[boundary - window:boundary] and reply[boundary:boundary + window],
    reading prompt + reply as one plain sequence."""
    if window < 1:
        raise InvalidInputError(f"window must be >= 1, got {window}")
    if not prompt:
        raise InvalidInputError("a boundary prompt must have at least one token")
    if boundary < window or boundary + window > len(reply):
        raise InvalidInputError(f"a reply of {len(reply)} tokens with its boundary at token {boundary} does not "
                                f"hold {window} tokens on each side: it needs at least {boundary + window} tokens "
                                f"and the boundary at token >= {window}")
    losses = backbone_token_losses(baseline, [*prompt, *reply])
    start = len(prompt) + boundary - 1  # loss index i scores stream token i + 1
    end_of_turn = next((i for i, t in enumerate(reply) if t in (eos or set())), None)
    return ReplyBoundary(len(prompt), list(reply), boundary, float(losses[start - window:start].mean()),
                         float(losses[start:start + window].mean()), end_of_turn)


@torch.no_grad()
def window_head_losses(model: HMTModel, documents: torch.Tensor, baseline: HMTModel | None = None,
                       head: int = 32, batch_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses [n_windows, head] at the first `head` positions of windows 2..n of every document
    [D, T]: HMT's (scoring each document whole, memory included), and the bare backbone's reading the
    window after the same sensory tokens HMT reads before it (its k; none for the window-only kind).
    Position i of window j predicts stream token j*L + i + 1, as in HMT's reading."""
    baseline = baseline or model
    seg, keep = model.hmt_config.segment_tokens, model.hmt_config.sensory_tokens
    _check_spans(1, head, seg)
    if documents.dim() != 2:
        raise InvalidInputError(f"documents must be [n, tokens], got shape {tuple(documents.shape)}")
    starts = list(range(seg, documents.shape[1] - head, seg))  # each needs head targets inside the document
    if not starts:
        raise InvalidInputError(f"documents of {documents.shape[1]} tokens have no second window with {head} "
                                f"positions to score: they need more than {seg + head} tokens (L={seg})")
    hmt, bare = [], []
    for i in range(0, documents.shape[0], batch_size):
        docs = documents[i:i + batch_size]
        logits = model.score(docs).logits.float().cpu()
        for start in starts:
            targets = docs[:, start + 1:start + head + 1]
            hmt.append(torch.nn.functional.cross_entropy(logits[:, start:start + head].transpose(1, 2), targets,
                                                         reduction="none"))
        # every window of the batch in one backbone forward: the k sensory tokens, then the window's head
        # (a causal model's logits at the head do not depend on the rest of the window)
        reads = torch.cat([docs[:, start - keep:start + head] for start in starts])
        bare_logits = baseline.backbone(input_ids=reads.to(baseline.device), use_cache=False).logits.float().cpu()
        targets = torch.cat([docs[:, start + 1:start + head + 1] for start in starts])
        bare.append(torch.nn.functional.cross_entropy(bare_logits[:, keep:].transpose(1, 2), targets,
                                                      reduction="none"))
    # HMT's rows are window-major per batch as the backbone's are: same order, so rows pair up
    return torch.cat(hmt), torch.cat(bare)


def boundary_eval(model: HMTModel, prompts: Sequence[Sequence[int]], documents: torch.Tensor,
                  baseline: HMTModel | None = None, window: int = 64, head: int = 32, seed: int = 0,
                  batch_size: int = 4, temperature: float = 0.7, top_p: float = 0.95) -> BoundaryReport:
    """Both measures of #27's milestone. prompts: token ids (`chat_prompts`); documents [D, T] token ids;
    baseline: the model whose bare backbone is the reference (default `model`'s own backbone; for a
    LoRA-trained model, pass it loaded without its deltas)."""
    baseline = baseline or model
    cfg = model.hmt_config
    _check_spans(window, head, cfg.segment_tokens)
    if not prompts:
        raise InvalidInputError("the boundary test needs at least one prompt")
    report = BoundaryReport(cfg.segment_tokens, cfg.sensory_tokens, window, head)
    eos = model.eos_token_ids
    for index, prompt in enumerate(prompts):
        reply, boundary = sample_across_boundary(model, prompt, window, seed + index, temperature, top_p)
        report.replies.append(measure_reply(baseline, prompt, reply, boundary, window, eos))
    hmt, bare = window_head_losses(model, documents, baseline, head, batch_size)
    report.documents, report.windows_scored = documents.shape[0], hmt.shape[0]
    report.hmt_head_loss, report.backbone_head_loss = float(hmt.mean()), float(bare.mean())
    return report


__all__ = ["BOUNDARY_PROMPTS", "RATIO_LIMIT", "BoundaryReport", "ReplyBoundary", "backbone_token_losses",
           "boundary_eval", "chat_prompts", "measure_reply", "planned_boundary", "sample_across_boundary",
           "window_head_losses"]
