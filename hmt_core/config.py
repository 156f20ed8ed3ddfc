"""HMT hyper-parameters: the five numbers of the paper plus how recall is computed."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from hmt_core.errors import CheckpointError, InvalidInputError
from hmt_core.memory import MEMORY_KINDS, memory_of
from hmt_core.temp_lora import TempLoRAConfig

RecallScale = Literal["auto", "sqrt", "linear"]
RECALL_DTYPES = ("bfloat16", "float16", "float32", "float64")  # torch dtypes recall may run in


@dataclass(frozen=True)
class HMTConfig:
    """segment_tokens (L), num_sensory (k), ltm_context (N), recall_dim, sum_fraction.

    recall_dtype: the reference computes recall in bfloat16 and its weights were trained so.
    recall_scale: "auto" reproduces the reference's training/eval path, which divides scores by
    recall_dim instead of sqrt(recall_dim) when hidden size and recall_dim are both >= 4096.
    memory: the kind of memory sessions keep (`hmt_core.memory`): "hmt" (the paper's), "rmt" (the
    previous segment's memory, no recall), "window" (none: each window read alone), "temp-lora"
    (a per-session LoRA trained on each committed window; `temp_lora` its settings, whose context
    is always the k sensory tokens) or "hmt+temp-lora" (both HMT's memory and such an adapter).
    memory_input_scale: None (the paper's) reads recalled memories as they are; a number makes the
    backbone read them times a learned scale that starts there. Memories are final hidden states,
    ~15x an embedding's norm on SmolLM2, and some of them, read raw, derail a window's summary.
    sink_token: None (the paper's) reads a window as [p, E(sensory), E(x), p]; a token id reads it as
    [E(sink), p, E(sensory), E(x), p]. A pretrained LM makes whatever sits at position 0 its attention sink
    (SmolLM2: from layer 12 its hidden state grows to ~200x the others' norm and takes most of every head's
    attention), so p there cannot be read; behind a sink token it is an ordinary position (#27).
    """

    segment_tokens: int = 256
    num_sensory: int = 32
    ltm_context: int = 300
    recall_dim: int = 4096
    sum_fraction: float = 0.5
    recall_dtype: str = "bfloat16"
    recall_scale: RecallScale = "auto"
    memory: str = "hmt"
    temp_lora: TempLoRAConfig | None = None
    memory_input_scale: float | None = None
    sink_token: int | None = None

    def __post_init__(self) -> None:
        if self.segment_tokens < 1:
            raise InvalidInputError(f"segment_tokens must be >= 1, got {self.segment_tokens}")
        if not 0 <= self.num_sensory <= self.segment_tokens:
            raise InvalidInputError(
                f"num_sensory must be in [0, segment_tokens={self.segment_tokens}], got {self.num_sensory}")
        if self.ltm_context < 1:
            raise InvalidInputError(f"ltm_context must be >= 1, got {self.ltm_context}")
        if self.recall_dim < 1:
            raise InvalidInputError(f"recall_dim must be >= 1, got {self.recall_dim}")
        if not 0.0 < self.sum_fraction <= 1.0:
            raise InvalidInputError(f"sum_fraction must be in (0, 1], got {self.sum_fraction}")
        if self.summary_tokens < 1:
            raise InvalidInputError("segment_tokens * sum_fraction rounds to 0 summary tokens")
        if self.recall_dtype not in RECALL_DTYPES:
            raise InvalidInputError(
                f"recall_dtype must be one of {', '.join(RECALL_DTYPES)}, got {self.recall_dtype!r}")
        if self.recall_scale not in ("auto", "sqrt", "linear"):
            raise InvalidInputError(f"recall_scale must be auto, sqrt or linear, got {self.recall_scale!r}")
        if self.memory_input_scale is not None and not self.memory_input_scale > 0:
            raise InvalidInputError(f"memory_input_scale must be > 0, got {self.memory_input_scale}")
        if self.memory not in MEMORY_KINDS:
            raise InvalidInputError(f"memory must be one of {', '.join(MEMORY_KINDS)}, got {self.memory!r}")
        if self.sink_token is not None:
            if isinstance(self.sink_token, bool) or not isinstance(self.sink_token, int) or self.sink_token < 0:
                raise InvalidInputError(f"sink_token must be a token id (an int >= 0), got {self.sink_token!r}")
            if not memory_of(self.memory).has_prompt:
                raise InvalidInputError(f"sink_token goes before a memory prompt; memory {self.memory!r} reads none")
        if isinstance(self.temp_lora, dict):  # from JSON
            try:
                object.__setattr__(self, "temp_lora", TempLoRAConfig.from_dict(self.temp_lora))
            except (ValueError, TypeError) as exc:
                raise InvalidInputError(f"temp_lora: {exc}") from None
        if memory_of(self.memory).adapts:
            lora = self.temp_lora or TempLoRAConfig()
            # the context a commit trains with is what the next window is read after: the sensory tokens
            object.__setattr__(self, "temp_lora", replace(lora, context_tokens=self.num_sensory))
        elif self.temp_lora is not None:
            adapting = [kind for kind in MEMORY_KINDS if memory_of(kind).adapts]
            raise InvalidInputError(f"temp_lora settings need a memory with an adapter ({', '.join(adapting)}), "
                                    f"not {self.memory!r}")

    @property
    def memory_rows(self) -> int:
        """Memories a session keeps: N for HMT, the last one for RMT, none for the window."""
        return memory_of(self.memory).rows_kept(self.ltm_context)

    @property
    def sensory_tokens(self) -> int:
        """Tokens of the previous window read again before the next (k; none for the window-only kind)."""
        return self.num_sensory if memory_of(self.memory).has_sensory else 0

    @property
    def summary_tokens(self) -> int:
        """Tokens of a segment that feed the summary query; Python's round, as the reference."""
        return round(self.segment_tokens * self.sum_fraction)

    @property
    def prompt_positions(self) -> int:
        """Positions a window read with a memory prompt starts with: p, or the sink token and p."""
        return 1 if self.sink_token is None else 2

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["memory"] == "hmt":  # the default is left out: HMT models' files and fingerprints stay as they were
            del data["memory"]
        if self.temp_lora is None:
            del data["temp_lora"]
        else:
            data["temp_lora"] = self.temp_lora.to_dict()
        if self.memory_input_scale is None:  # as above: files and fingerprints without it stay as they were
            del data["memory_input_scale"]
        if self.sink_token is None:
            del data["sink_token"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HMTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise CheckpointError(f"unknown HMTConfig fields: {sorted(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
