"""hmt_core: the Hierarchical Memory Transformer (arXiv 2405.06067) over any transformers causal LM."""

from hmt_core.config import HMTConfig
from hmt_core.errors import CheckpointError, CorruptStateError, HMTError, InvalidInputError, ModelMismatchError
from hmt_core.generation import GeneratedToken, Generation, SamplingParams
from hmt_core.memory import Memory, MemoryKind, memory_of
from hmt_core.model import HMTModel, ScoreOutput
from hmt_core.precision import PRECISIONS, Precision, apply_precision
from hmt_core.recall import SegmentRecall
from hmt_core.session import SessionState

__all__ = [
    "PRECISIONS",
    "CheckpointError",
    "CorruptStateError",
    "GeneratedToken",
    "Generation",
    "HMTConfig",
    "HMTError",
    "HMTModel",
    "InvalidInputError",
    "Memory",
    "MemoryKind",
    "ModelMismatchError",
    "Precision",
    "SamplingParams",
    "ScoreOutput",
    "SegmentRecall",
    "SessionState",
    "apply_precision",
    "memory_of",
]
