"""A session's memory: what it contributes to a window, and what a commit does to it.

The model (`hmt_core.model`) runs the segment loop, one window of L tokens at a time, read as
`[p, E(sensory), E(W), p]`. A `Memory` decides the parts that differ between kinds:
- the memory prompt p of a window (the contribution): HMT recalls it from long-term memory with the
  window's summary query; RMT takes the previous segment's memory; the window-only baseline has
  none (the window is read bare, without sensory tokens either);
- what a commit leaves in the session's state: the new memory m_n (the last hidden state at the
  trailing p), of which HMT keeps the last N, RMT the last one, the window-only baseline nothing;
  Temp-LoRA (arXiv 2401.11504) trains the session's own LoRA adapter on the window instead, and
  every later window is read with that adapter applied (`hmt_core.temp_lora`); HMT+Temp-LoRA keeps
  both, HMT's memories and an adapter trained on each window as HMT reads it, after its memory prompt.

The kind is part of the model's configuration (`HMTConfig.memory`), so the fingerprint covers
it, and every session state names its kind: a state of one kind is refused by a model of another.
This is where other kinds of memory plug in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Literal, get_args

import torch
from torch import Tensor

from hmt_core.recall import Recall

if TYPE_CHECKING:
    from hmt_core.model import HMTModel

MemoryKind = Literal["hmt", "rmt", "window", "temp-lora", "hmt+temp-lora"]
MEMORY_KINDS: tuple[MemoryKind, ...] = get_args(MemoryKind)


class Memory(ABC):
    kind: ClassVar[MemoryKind]
    has_prompt: ClassVar[bool] = True  # the window is read between memory prompts, [p, ..., p]
    has_sensory: ClassVar[bool] = True  # the last k tokens of the previous window are read again
    # p depends on the window's own first tokens (HMT's summary query), so a window's prompt is only
    # known once those tokens are in; otherwise p depends on the committed state alone
    prompt_reads_window: ClassVar[bool] = False
    adapts: ClassVar[bool] = False  # the state holds a LoRA adapter that every reading applies

    @abstractmethod
    def rows_kept(self, ltm_context: int) -> int:
        """How many memories a session keeps (the long-term memory's capacity)."""

    def write(self, ltm: Tensor, memory: Tensor, ltm_context: int) -> Tensor:
        """A commit: the memory m_n [d] written by the window joins the kept memories [n, d]."""
        keep = self.rows_kept(ltm_context)
        if keep == 0:
            return ltm[:0]
        # float32 whatever the backbone's precision: a state moves between replicas of any precision
        return torch.cat([ltm.to(memory.device, torch.float32), memory.reshape(1, -1).float()])[-keep:]

    @abstractmethod
    def prompts(self, model: HMTModel, memories: Tensor, lengths: Tensor, queries: Tensor | None) -> Recall:
        """The memory prompt of each row's window. memories [B, n, d] left-aligned, row b valid up to
        lengths[b]; queries [B, d]: the windows' summary queries (when `prompt_reads_window`)."""


class HMTMemory(Memory):
    """The paper's: cross-attention recall over the last N memories, keyed by the summary query."""

    kind: ClassVar[MemoryKind] = "hmt"
    prompt_reads_window = True

    def rows_kept(self, ltm_context: int) -> int:
        return ltm_context

    def prompts(self, model: HMTModel, memories: Tensor, lengths: Tensor, queries: Tensor | None) -> Recall:
        if queries is None:
            raise ValueError("HMT's recall needs the windows' summary queries")
        return model.recall(queries, memories, lengths)


class RMTMemory(Memory):
    """Recurrent memory without recall (HMT's stage-1 training, the RMT baseline): the prompt is the
    previous segment's memory, or the learned initial memory before the first commit."""

    kind = "rmt"

    def rows_kept(self, ltm_context: int) -> int:
        return 1

    def prompts(self, model: HMTModel, memories: Tensor, lengths: Tensor, queries: Tensor | None) -> Recall:
        batch, device = memories.shape[0], model.device
        lengths = lengths.to(device)
        has_memory = lengths > 0
        initial = model.initial_memory.to(model.dtype).expand(batch, model.dim)
        if memories.shape[1] == 0:
            prompts = initial
        else:
            last = model.injected(
                memories.to(device, model.dtype)[torch.arange(batch, device=device), (lengths - 1).clamp(min=0)])
            prompts = torch.where(has_memory[:, None], last, initial)
        # the trace names the memory read, with all the weight: one segment back
        slots = torch.where(has_memory, lengths - 1, -1)[:, None]
        return Recall(prompts, has_memory.long(), slots, has_memory.float()[:, None])


class WindowMemory(Memory):
    """No memory: each window is read by the bare backbone alone (the baseline HMT is measured against)."""

    kind: ClassVar[MemoryKind] = "window"
    has_prompt = False
    has_sensory = False

    def rows_kept(self, ltm_context: int) -> int:
        return 0

    def prompts(self, model: HMTModel, memories: Tensor, lengths: Tensor, queries: Tensor | None) -> Recall:
        raise TypeError("the window-only memory has no prompt")


class TempLoRAMemory(WindowMemory):
    """Temp-LoRA: the window is read after the previous window's last k tokens, by the backbone with
    the session's adapter applied; a commit takes a few gradient steps of that adapter on the window
    (with those k tokens as context). The adapter is the state; no memory embeddings are kept."""

    kind = "temp-lora"
    has_sensory = True
    adapts = True


class HMTTempLoRAMemory(HMTMemory):
    """Both at once: HMT's recall and memories, and a Temp-LoRA adapter applied to every reading of the
    window and of the generated tokens. A commit writes HMT's memory m_n (read with the adapter as it
    stood) and then trains the adapter on the window read as HMT reads it, [p, E(sensory), E(W)]. The
    summary query is read without the adapter, so recall's keys do not drift as the adapter learns."""

    kind = "hmt+temp-lora"
    adapts = True


_MEMORIES: dict[str, Memory] = {m.kind: m for m in (HMTMemory(), RMTMemory(), WindowMemory(), TempLoRAMemory(),
                                                    HMTTempLoRAMemory())}


def memory_of(kind: str) -> Memory:
    """The memory of a kind; ValueError naming the known kinds otherwise."""
    try:
        return _MEMORIES[kind]
    except KeyError:
        raise ValueError(f"unknown memory kind {kind!r}: one of {', '.join(MEMORY_KINDS)}") from None
