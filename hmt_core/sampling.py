"""Sampling for a batch of sessions: per-row parameters, one vectorized draw, reproducible per seed.

A row's random numbers are a counter-based hash of (its seed, the token's index in the reply, the
vocabulary index), not a stream from a shared generator. So a seeded reply is the same whichever
other rows share its batch, on any batch size and any device, and the whole batch samples with
one Gumbel-max argmax instead of one `multinomial` call per row.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from hmt_core.errors import InvalidInputError

FinishReason = Literal["stop", "length"]

_MASK32 = 0xFFFFFFFF
# below this a temperature is greedy: a float32 temperature near 1e-38 is subnormal (flushed to 0 on CPU)
GREEDY_BELOW_TEMPERATURE = 1e-5


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


def seed_key(seed: int | None) -> int:
    """A 64-bit key for a row's random numbers: from any integer seed, or fresh when there is none."""
    if seed is None:
        return secrets.randbits(64)
    return int.from_bytes(hashlib.blake2b(str(int(seed)).encode(), digest_size=8).digest(), "little")


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash on int64 tensors holding values < 2**32 (products stay below 2**63)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(keys: Tensor, steps: Tensor, vocab_size: int) -> Tensor:
    """[n, V] floats in (0, 1): a pure function of (key, step, vocabulary index) per row."""
    low, high = keys & _MASK32, (keys >> 32) & _MASK32
    row_a = _mix32(low ^ _mix32(steps & _MASK32))[:, None]
    row_b = _mix32(high ^ _mix32((steps + 0x9E3779B9) & _MASK32))[:, None]
    index = torch.arange(vocab_size, device=keys.device)[None, :]
    bits = _mix32(_mix32(index ^ row_a) ^ row_b)
    return ((bits >> 8).float() + 0.5) / float(1 << 24)


def sample_tokens(logits: Tensor, params: Sequence[SamplingParams], keys: Sequence[int],
                  steps: Sequence[int]) -> Tensor:
    """Next tokens [n] from logits [n, V]: greedy rows (temperature under 1e-5) take the argmax; the
    others draw from their own top-k / top-p filtered distribution at their own temperature, with
    their own random numbers."""
    tokens = logits.argmax(dim=-1)
    drawn = [i for i, p in enumerate(params) if p.temperature >= GREEDY_BELOW_TEMPERATURE]
    if not drawn:
        return tokens
    device = logits.device
    index = torch.tensor(drawn, device=device)
    chosen = [params[i] for i in drawn]
    scores = logits[index].float()
    # shift by the row maximum first: a tiny temperature then tends to greedy instead of inf - inf
    temperature = torch.tensor([p.temperature for p in chosen], device=device, dtype=torch.float32)
    scores = (scores - scores.max(dim=-1, keepdim=True).values) / temperature[:, None]
    scores = torch.nan_to_num(scores, nan=float("-inf"))
    if any(p.top_k or p.top_p < 1 for p in chosen):
        scores = _filter_top_k_top_p(scores, [p.top_k for p in chosen], [p.top_p for p in chosen])
    # keys are 64-bit unsigned; int64 holds them as their two's-complement bit pattern
    key_tensor = torch.tensor([keys[i] - (1 << 64) if keys[i] >= 1 << 63 else keys[i] for i in drawn],
                              dtype=torch.long, device=device)
    step_tensor = torch.tensor([steps[i] for i in drawn], dtype=torch.long, device=device)
    gumbel = -torch.log(-torch.log(uniform_noise(key_tensor, step_tensor, scores.shape[-1])))
    tokens[index] = (scores + gumbel).argmax(dim=-1)
    return tokens


def _filter_top_k_top_p(scores: Tensor, top_k: list[int], top_p: list[float]) -> Tensor:
    """Per-row top-k, then top-p on what top-k kept; the top token always survives."""
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    ranks = torch.arange(scores.shape[-1], device=scores.device)[None, :]
    k = torch.tensor(top_k, device=scores.device)[:, None]
    sorted_scores = sorted_scores.masked_fill((k > 0) & (ranks >= k), float("-inf"))
    probs = torch.softmax(sorted_scores, dim=-1)
    p = torch.tensor(top_p, device=scores.device, dtype=probs.dtype)[:, None]
    sorted_scores = sorted_scores.masked_fill((torch.cumsum(probs, dim=-1) - probs) > p, float("-inf"))
    return torch.full_like(scores, float("-inf")).scatter(1, order, sorted_scores)


class TextStream:
    """Incremental detokenization with stop strings: text is released only once it can no longer
    turn out to be the start of a stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        # Set lookups instead of a scan per stop string: a token's cost depends on the longest stop
        # string, not on how many there are.
        self._stops = frozenset(stop)
        self._lengths = sorted({len(s) for s in stop})
        self._prefixes = frozenset(s[:n] for s in stop for n in range(1, len(s)))
        self._longest = self._lengths[-1] if self._lengths else 0
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
        if not self._stops:
            return self._take(len(self.pending)), False
        lookback = self.released[max(0, len(self.released) - self._longest):]
        text = lookback + self.pending
        for start in range(len(text)):  # the earliest stop string wins
            if any(text[start:start + n] in self._stops for n in self._lengths):
                return self._take(max(0, start - len(lookback))), True
        for n in range(min(self._longest - 1, len(text)), 0, -1):  # hold back a possible stop's start
            if text[len(text) - n:] in self._prefixes:
                return self._take(max(0, len(self.pending) - n)), False
        return self._take(len(self.pending)), False

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
