"""Streaming generation from a session, across segment boundaries (serving-semantics.md).

gpt-fast style: `prefill` and `decode_one_token` over an explicit KV cache, `sample` on logits.
The open window W is the local context: `[p, E(sensory), E(W)]` with p recalled by the query
from W[:s] taken when the request starts. Each token sampled from the logits at W's end is
appended to the session; when W is already full, W is first committed canonically, a new
window opens with its query from the sensory tokens (the newest text there is) and the
backbone is prefilled on `[p', E(sensory), E(token)]`. So the first logits equal the
reference's logits for the last token of the stream, and the state after a reply equals
appending prompt + reply tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from hmt_core.errors import InvalidInputError
from hmt_core.session import SessionState, fill_window

if TYPE_CHECKING:
    from hmt_core.model import HMTModel

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: the text ends before them
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidInputError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise InvalidInputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidInputError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise InvalidInputError("stop strings must not be empty")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))


@dataclass(frozen=True)
class GeneratedToken:
    token_id: int
    text: str  # text released with this token: "" while it may still be part of a stop string


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from next-token logits [V]: greedy at temperature 0, else top-k/top-p sampling."""
    if params.temperature == 0:
        return int(logits.argmax())
    scores = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        beyond = (torch.cumsum(probs, dim=-1) - probs) > params.top_p  # keeps at least the top token
        scores = scores.index_fill(0, order[beyond], float("-inf"))
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))


def window_prompt(model: HMTModel, state: SessionState, query_tokens: Sequence[int]) -> Tensor:
    """Recall for an open window: summary query over query_tokens[:s], then cross-attention [1, d]."""
    ids = torch.tensor([list(query_tokens)[:model.hmt_config.summary_tokens]], dtype=torch.long)
    queries = model.summary_queries(ids)
    ltm = state.ltm.to(model.device, model.dtype)[None]
    return model.recall(queries, ltm, torch.tensor([ltm.shape[1]])).prompts


def prefill(model: HMTModel, prompt: Tensor, sensory: Sequence[int], window: Sequence[int]) -> tuple[Tensor, Any]:
    """Run [p, E(sensory), E(W)] with a fresh KV cache: (next-token logits [V], cache)."""
    ids = torch.tensor([list(sensory) + list(window)], dtype=torch.long)
    embeds = torch.cat([prompt[:, None, :].to(model.dtype), model.embed(ids)], dim=1)
    out = model.backbone(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1], out.past_key_values


def decode_one_token(model: HMTModel, token: int, cache: Any) -> Tensor:
    out = model.backbone(input_ids=torch.tensor([[token]], device=model.device), past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
    return out.logits[0, -1]


class TextStream:
    """Incremental detokenization with stop strings: text is released only once it can no longer
    turn out to be the start of a stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.released = ""
        self.pending = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (text released now, whether a stop string was hit)."""
        if self.tokenizer is None:
            return "", False
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.pending += after[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release()

    def _release(self) -> tuple[str, bool]:
        text = self.released + self.pending
        start = max(0, len(self.released) - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            return self._take(min(hits) - len(self.released)), True
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        return self._take(len(self.pending) - hold), False

    def _take(self, n: int) -> str:
        out, self.pending = self.pending[:n], self.pending[n:]
        self.released += out
        return out

    def flush(self) -> str:
        """At the end without a stop string: release what was held back (and undecoded bytes)."""
        if self.tokenizer is None:
            return ""
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        self.pending += self._decode(self.ids[self.prefix_offset:])[len(before):]
        self.prefix_offset = self.read_offset = len(self.ids)
        return self._take(len(self.pending))


class Generation(Iterator[GeneratedToken]):
    """Iterate to get tokens; afterwards `.state` is the session with the reply appended,
    `.finish_reason` is "stop" or "length", `.text` the reply text (stop string excluded).
    Stopping the iteration early leaves `.state` consistent with the tokens yielded so far."""

    def __init__(self, model: HMTModel, state: SessionState, params: SamplingParams) -> None:
        model.check_session(state)
        if not state.window:
            raise InvalidInputError("the session has no tokens yet: append a prompt before generating")
        if params.stop and model.tokenizer is None:
            raise InvalidInputError("stop strings need a model with a tokenizer")
        for token in params.stop_token_ids:
            model.check_tokens([token])
        self.model = model
        self.params = params
        self.state = state.bumped()
        self.tokens: list[int] = []
        self.commit_distances: list[int] = []  # recall distance of each segment committed while generating
        self.finish_reason: FinishReason | None = None
        self._stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else model.eos_token_ids)
        self._text = TextStream(model.tokenizer, params.stop)
        self._generator: torch.Generator | None = None
        if params.temperature > 0:
            self._generator = torch.Generator(device=model.device)
            self._generator.manual_seed(params.seed if params.seed is not None else
                                        int(torch.randint(0, 2**62, (1,))))
        with torch.no_grad():
            prompt = window_prompt(model, self.state, self.state.window)
            self._logits, self._cache = prefill(model, prompt, self.state.sensory, self.state.window)

    @property
    def text(self) -> str:
        return self._text.released

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __next__(self) -> GeneratedToken:
        if self.finished:
            raise StopIteration
        return self._emit(sample(self._logits, self.params, self._generator))

    def force(self, token: int) -> float:
        """Advance with the given token instead of a sampled one (teacher forcing): its log-probability."""
        if self.finished:
            raise InvalidInputError(f"the generation has finished ({self.finish_reason})")
        self.model.check_tokens([token])
        log_prob = float(torch.log_softmax(self._logits.float(), dim=-1)[token])
        self._emit(token)
        return log_prob

    def _emit(self, token: int) -> GeneratedToken:
        self.tokens.append(token)
        text, hit_stop = self._text.push(token)
        if hit_stop or token in self._stop_ids:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.params.max_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None and not hit_stop:
            text += self._text.flush()
        with torch.no_grad():
            self._append(token, need_logits=not self.finished)
        return GeneratedToken(token, text)

    def _append(self, token: int, need_logits: bool) -> None:
        model, config = self.model, self.model.hmt_config
        window_was_full = len(self.state.window) == config.segment_tokens
        if window_was_full:
            (self.state,), distances = model.commit_windows([self.state])
            self.commit_distances.append(int(distances[0]))
        self.state, _ = fill_window(self.state, [token], config)
        if not need_logits:
            return
        if window_was_full:
            prompt = window_prompt(model, self.state, self.state.sensory or self.state.window)
            self._logits, self._cache = prefill(model, prompt, self.state.sensory, self.state.window)
        else:
            self._logits = decode_one_token(model, token, self._cache)

    def run(self) -> Generation:
        """Drain the stream (non-streaming use)."""
        for _ in self:
            pass
        return self


def continuation_log_probs(model: HMTModel, state: SessionState, tokens: Sequence[int]) -> list[float]:
    """Log-probability of each token read after a session, as generation would see it (the open
    window commits when it fills). The session is unchanged: score several continuations of one read."""
    if not tokens:
        return []
    generation = Generation(model, state, SamplingParams(max_tokens=len(tokens), ignore_eos=True))
    return [generation.force(token) for token in tokens]
