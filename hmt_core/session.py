"""A session's whole state (serving-semantics.md) and its safe, versioned byte format.

Bytes are a safetensors file (no pickle): tensors `ltm` float32 [n, d], `sensory` and `window`
int64 (and a Temp-LoRA session's adapter factors, `adapter.<module>.lora_A/B`), and a metadata
header with the format version, memory kind, model fingerprint, counters and a SHA-256 checksum
over everything else, so truncation or damage is detected, not loaded. With a key, an HMAC of
that checksum too: then a state edited by anyone without the key is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from hmt_core.errors import CorruptStateError, ModelMismatchError
from hmt_core.memory import MEMORY_KINDS, memory_of
from hmt_core.temp_lora import Adapter

if TYPE_CHECKING:
    from hmt_core.config import HMTConfig

STATE_FORMAT = "hmt-session"
STATE_FORMAT_VERSION = 1
_COUNTERS = ("segments_committed", "tokens_seen", "version")
_ADAPTER = "adapter."  # prefix of a Temp-LoRA adapter's tensors in the state's bytes
MAX_COUNTER = 2**53  # counters stay exact as Lua numbers (the store compares versions in Lua)


@dataclass(frozen=True)
class SessionState:
    ltm: Tensor  # [n, d] long-term memory, n <= ltm_context
    sensory: tuple[int, ...]  # last num_sensory tokens of the last committed segment
    window: tuple[int, ...]  # received, not yet committed (0..L tokens)
    segments_committed: int
    tokens_seen: int
    version: int  # bumped on every change; the store's compare-and-set fence
    fingerprint: str  # the model that made it
    memory: str = "hmt"  # the kind of memory it keeps (hmt_core.memory)
    adapter: Adapter | None = None  # a Temp-LoRA session's adapter (memory "temp-lora"), else None

    @classmethod
    def empty(cls, dim: int, fingerprint: str, memory: str = "hmt", adapter: Adapter | None = None) -> SessionState:
        return cls(torch.zeros(0, dim), (), (), 0, 0, 0, fingerprint, memory, adapter)

    @property
    def dim(self) -> int:
        return int(self.ltm.shape[1])

    def bumped(self) -> SessionState:
        return replace(self, version=self.version + 1)

    def after_commit(self, memory: Tensor | None, config: HMTConfig) -> SessionState:
        """Step 4: the window is committed and memory m_n was written (None: a kind that keeps none)."""
        ltm = self.ltm if memory is None else memory_of(config.memory).write(self.ltm, memory, config.ltm_context)
        keep = config.sensory_tokens
        sensory = self.window[len(self.window) - keep:] if keep else ()
        return replace(self, ltm=ltm, sensory=tuple(sensory), window=(), segments_committed=self.segments_committed + 1)

    def check_model(self, fingerprint: str, config: HMTConfig, dim: int, vocab_size: int | None = None) -> None:
        """Refuse a state this model could not have made: another model's, one that does not fit its
        configuration, inconsistent counters, token ids outside the vocabulary, non-finite memory.
        States arrive from clients (import), so each of these is checked, not assumed."""
        if self.memory != config.memory:
            raise ModelMismatchError(f"session state keeps {self.memory} memory, and this model keeps "
                                     f"{config.memory} memory: a state is read only by a model of its kind")
        if self.fingerprint != fingerprint:
            raise ModelMismatchError(
                f"session state belongs to model {self.fingerprint}, this model is {fingerprint}")
        if self.dim != dim or self.ltm.shape[0] > config.memory_rows or \
                len(self.window) > config.segment_tokens or len(self.sensory) > config.sensory_tokens:
            raise CorruptStateError("session state does not fit this model's HMT configuration")
        segments = self.segments_committed
        if not 0 <= segments < MAX_COUNTER or not 0 <= self.version < MAX_COUNTER:
            raise CorruptStateError("session state counters are out of range")
        if self.tokens_seen != segments * config.segment_tokens + len(self.window):
            raise CorruptStateError("session state counters disagree with its window and segments")
        if self.ltm.shape[0] != min(segments, config.memory_rows) or \
                len(self.sensory) != (config.sensory_tokens if segments else 0):
            raise CorruptStateError("session state memory disagrees with its segment count")
        if vocab_size is not None:
            for tokens in (self.window, self.sensory):
                if tokens and not 0 <= min(tokens) <= max(tokens) < vocab_size:
                    raise CorruptStateError(f"session state holds token ids outside the vocabulary [0, {vocab_size})")
        if not bool(torch.isfinite(self.ltm).all()):
            raise CorruptStateError("session state memory holds non-finite values")
        if (self.adapter is not None) != memory_of(config.memory).adapts:
            raise CorruptStateError(f"session state {'has' if self.adapter else 'lacks'} an adapter, "
                                    f"which {config.memory} memory does not expect")
        if self.adapter is not None:
            lora = config.temp_lora
            assert lora is not None  # HMTConfig sets it for an adapting memory
            if self.adapter.commits != segments or self.adapter.rank != lora.rank or \
                    self.adapter.alpha != lora.alpha:
                raise CorruptStateError("session state adapter disagrees with its segments or this model's "
                                        "Temp-LoRA settings")
            if not all(bool(torch.isfinite(t).all()) for t in (*self.adapter.a.values(), *self.adapter.b.values())):
                raise CorruptStateError("session state adapter holds non-finite values")

    # ----- bytes ----------------------------------------------------------------------

    def to_bytes(self, key: bytes | None = None) -> bytes:
        """The state's bytes; with `key`, signed with HMAC-SHA256 so that `from_bytes(..., key=key)`
        refuses any other bytes (edited, or made under another key)."""
        tensors = {
            "ltm": self.ltm.detach().to("cpu", torch.float32).contiguous(),
            "sensory": torch.tensor(self.sensory, dtype=torch.int64),
            "window": torch.tensor(self.window, dtype=torch.int64),
        }
        meta = {"format": STATE_FORMAT, "format_version": str(STATE_FORMAT_VERSION), "memory": self.memory,
                "fingerprint": self.fingerprint, **{k: str(getattr(self, k)) for k in _COUNTERS}}
        if self.adapter is not None:
            tensors.update(self.adapter.named_tensors(_ADAPTER))
            meta["adapter"] = json.dumps(self.adapter.header(), sort_keys=True)
        meta["checksum"] = _checksum(meta, tensors)
        if key is not None:
            meta["mac"] = _mac(key, meta["checksum"])
        return save_tensors(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes, fingerprint: str | None = None, key: bytes | None = None) -> SessionState:
        """Parse and verify; with `fingerprint`, also refuse a state of another model; with `key`,
        refuse a state not signed with it (a plain checksum anyone can recompute; a MAC they cannot)."""
        meta = _read_metadata(data)
        if meta.get("format") != STATE_FORMAT:
            raise CorruptStateError("not an HMT session state")
        if meta.get("format_version") != str(STATE_FORMAT_VERSION):
            raise CorruptStateError(f"unsupported session format version {meta.get('format_version')!r}")
        try:
            tensors = load_tensors(bytes(data))
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise CorruptStateError(f"session state is unreadable: {exc}") from None
        adapter_tensors = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(_ADAPTER)]}
        if set(tensors) != {"ltm", "sensory", "window"}:
            raise CorruptStateError("session state has the wrong tensors")
        mac = meta.pop("mac", None)
        expected = meta.pop("checksum", None)
        if expected != _checksum(meta, {**tensors, **adapter_tensors}):
            raise CorruptStateError("session state failed its integrity check")
        if key is not None:
            if mac is None:
                raise CorruptStateError("session state is not signed, and this deployment accepts only states "
                                        "signed with its secret")
            if not hmac.compare_digest(mac, _mac(key, expected)):
                raise CorruptStateError("session state signature does not match this deployment's secret: it was "
                                        "edited, or exported by another deployment")
        adapter = _adapter_from(meta.get("adapter"), adapter_tensors)
        ltm, sensory, window = tensors["ltm"], tensors["sensory"], tensors["window"]
        if ltm.dim() != 2 or sensory.dim() != 1 or window.dim() != 1 or ltm.dtype != torch.float32:
            raise CorruptStateError("session state tensors have the wrong shapes")
        try:
            counters = {k: int(meta[k]) for k in _COUNTERS}
        except (KeyError, ValueError):
            raise CorruptStateError("session state counters are missing or malformed") from None
        memory = meta.get("memory", "hmt")  # states written before memory kinds existed are HMT's
        if memory not in MEMORY_KINDS:
            raise CorruptStateError(f"session state names an unknown memory kind {memory!r}")
        state = cls(ltm, tuple(sensory.tolist()), tuple(window.tolist()), fingerprint=meta["fingerprint"],
                    memory=memory, adapter=adapter, **counters)
        if fingerprint is not None and state.fingerprint != fingerprint:
            raise ModelMismatchError(
                f"session state belongs to model {state.fingerprint}, this model is {fingerprint}")
        return state


def _adapter_from(header: str | None, tensors: dict[str, Tensor]) -> Adapter | None:
    if header is None and not tensors:
        return None
    try:
        return Adapter.from_named_tensors(tensors, json.loads(header or ""), _ADAPTER)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptStateError(f"session state adapter is malformed: {exc}") from None


def fill_window(state: SessionState, tokens: Sequence[int], config: HMTConfig) -> tuple[SessionState, list[int]]:
    """Move tokens into the window until it holds L; return the rest (a commit must come first)."""
    room = config.segment_tokens - len(state.window)
    taken, rest = list(tokens[:room]), list(tokens[room:])
    if not taken:
        return state, rest
    return replace(state, window=state.window + tuple(taken), tokens_seen=state.tokens_seen + len(taken)), rest


def _checksum(meta: dict[str, str], tensors: dict[str, Tensor]) -> str:
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _mac(key: bytes, checksum: str) -> str:
    return hmac.new(key, checksum.encode(), hashlib.sha256).hexdigest()


def _read_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise CorruptStateError("session state is truncated")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise CorruptStateError("session state is truncated")
    try:
        header = json.loads(bytes(data[8:8 + header_len]))
        meta = header["__metadata__"]
    except (ValueError, KeyError, TypeError):
        raise CorruptStateError("session state header is unreadable") from None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptStateError("session state header is malformed")
    return dict(meta)
