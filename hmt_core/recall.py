"""Recall's results: what step 2 (recall) hands to the segment pass, and what a commit reports.

A leaf module (it imports nothing of hmt_core): the memories (`hmt_core.memory`) build a `Recall`
and the model (`hmt_core.model`) computes one, the engine and the service read `SegmentRecall`s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

RECALL_TOP_K = 4  # recall weights reported per segment: the strongest few, so the trace stays small


@dataclass
class Recall:
    prompts: Tensor  # [B, d] memory prompt p_n in the backbone's dtype
    distances: Tensor  # [B] long; 0 where long-term memory was empty
    top_slots: Tensor  # [B, k] long, k <= RECALL_TOP_K: memory positions by weight, strongest first; -1: none
    top_weights: Tensor  # [B, k] float32 softmax weights of those positions (0 where none)

    def traces(self, segments: Sequence[int], lengths: Sequence[int]) -> list[SegmentRecall]:
        """Per row: what recall did for segment `segments[b]` over `lengths[b]` memories, with
        memory positions named by the segment that wrote them. One host copy for the batch."""
        slots, weights = self.top_slots.tolist(), self.top_weights.tolist()
        traces = []
        for row, (segment, length) in enumerate(zip(segments, lengths, strict=True)):
            first = segment - length  # memory position 0 holds the memory written by this segment
            kept = [(first + s, w) for s, w in zip(slots[row], weights[row], strict=True) if s >= 0]
            traces.append(SegmentRecall(segment, tuple(s for s, _ in kept), tuple(w for _, w in kept)))
        return traces


@dataclass(frozen=True)
class SegmentRecall:
    """The recall of one committed segment: which earlier segments' memories it attended to most
    (by the index of the segment that wrote each memory), and the softmax weight of each."""

    segment: int  # this segment's index (0-based: the session's segments_committed before it)
    slots: tuple[int, ...]  # earlier segments, strongest first; empty when memory was empty
    weights: tuple[float, ...]  # their weights: each in [0, 1], descending, summing to at most 1

    @property
    def distance(self) -> int:
        """Segments back to the strongest weight (0: no recall), as the paper's recall figure."""
        return self.segment - self.slots[0] if self.slots else 0
