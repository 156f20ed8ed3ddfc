"""Streaming generation from one session, across segment boundaries (serving-semantics.md).

`Generation` is a one-row use of the batch engine (`hmt_core.engine.DecodeEngine`), so every
single-session test checks the path the server batches. The open window W is the local
context: `[p, E(sensory), E(W)]` with p recalled by the query from W[:s] taken when the request
starts. Each token sampled from the logits at W's end is appended to the session; when W is
already full, W is first committed (canonically, or from the slot's cache when its prompt
is the commit's: equal within float rounding), a new window opens with its query from the
sensory tokens (the newest text there is) and the backbone is prefilled on
`[p', E(sensory), E(token)]`. So the first logits equal the reference's logits for the last
token of the stream, and the state after a reply equals appending prompt + reply tokens
(memories within float tolerance).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hmt_core.engine import DecodeEngine
from hmt_core.errors import InvalidInputError
from hmt_core.sampling import FinishReason, GeneratedToken, SamplingParams, TextStream
from hmt_core.session import SessionState

if TYPE_CHECKING:
    from hmt_core.model import HMTModel
    from hmt_core.recall import SegmentRecall

__all__ = ["FinishReason", "GeneratedToken", "Generation", "SamplingParams", "TextStream",
           "continuation_log_probs", "decode_one_token"]


class Generation(Iterator[GeneratedToken]):
    """Iterate to get tokens; afterwards `.state` is the session with the reply appended,
    `.finish_reason` is "stop" or "length", `.text` the reply text (stop string excluded).
    Stopping the iteration early leaves `.state` consistent with the tokens yielded so far."""

    def __init__(self, model: HMTModel, state: SessionState, params: SamplingParams) -> None:
        self.model = model
        self.params = params
        self._engine = DecodeEngine(model, max_rows=1)
        self._row = self._engine.add(state, params)
        failed = self._engine.admit()
        if failed:
            raise failed[0].error  # type: ignore[misc]

    @property
    def state(self) -> SessionState:
        return self._row.state

    @property
    def tokens(self) -> list[int]:
        return self._row.tokens

    @property
    def commit_distances(self) -> list[int]:
        """Recall distance of each segment committed while generating."""
        return self._row.commit_distances

    @property
    def commit_recalls(self) -> list[SegmentRecall]:
        """The recall (top slots and weights) of each segment committed while generating."""
        return self._row.commit_recalls

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._row.finish_reason

    @property
    def text(self) -> str:
        return self._row.text.released

    @property
    def finished(self) -> bool:
        return self._row.finished

    @property
    def _logits(self) -> Tensor:
        return self._engine.logits_of(self._row)

    def __next__(self) -> GeneratedToken:
        if self.finished:
            raise StopIteration
        return self._advance(None)

    def force(self, token: int) -> float:
        """Advance with the given token instead of a sampled one (teacher forcing): its log-probability."""
        if self.finished:
            raise InvalidInputError(f"the generation has finished ({self.finish_reason})")
        self.model.check_tokens([token])
        self._advance(token)
        return float(self._row.log_prob)  # type: ignore[arg-type]

    def _advance(self, forced: int | None) -> GeneratedToken:
        out = self._engine.step({self._row: forced} if forced is not None else None)
        if self._row.error is not None:
            raise self._row.error
        return out.tokens[0][1]

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


def decode_one_token(model: HMTModel, token: int, cache: Any) -> Tensor:
    """The bare backbone's next logits [V] after one more token (the windowed baseline's decode)."""
    out = model.backbone(input_ids=torch.tensor([[token]], device=model.device), past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
    return out.logits[0, -1]
