"""Constrained decoding: a reply that must match a JSON schema (Responses API `text.format`
json_schema / json_object), with llguidance.

llguidance compiles the schema to a grammar lazily (a JSON schema costs microseconds to compile;
each token's mask is computed on demand from the tokenizer's trie) and bounds the work of both
with parser limits, so a hostile schema (deep nesting, huge enums, recursion) fails or stays
cheap instead of stalling the worker. Compiling runs off the event loop with a time limit.
(Chosen over xgrammar and outlines-core by bench/constrained_decode.py: see the README.)

In the batched engine a constrained row is one more row: before each decode step the worker
asks the row's constraint for the tokens its grammar allows (a bool mask) and the engine samples
the row once, under that mask, in the same batched draw as the free rows (with the row's own
temperature, top-p and seed). Once the grammar is complete only the end of turn is allowed, so
the reply ends there.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from typing import Any

import torch
from torch import Tensor

from hmt_core import HMTModel, InvalidInputError

COMPILE_TIMEOUT_S = 2.0  # a schema whose grammar is not built by then is refused
MAX_SCHEMA_BYTES = 64 * 1024
# tighter than llguidance's defaults: a mask step costs at most a few milliseconds of the worker's time
LIMITS = {"step_lexer_fuel": 50_000, "step_max_items": 20_000, "max_items_in_row": 1_000,
          "max_grammar_size": 100_000, "max_lexer_states": 50_000}
_SHIFTS = torch.arange(32, dtype=torch.int32)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A grammar engine's int32 token bitmask [W] (bit i of word j: token 32 j + i; llguidance,
    xgrammar and outlines-core all write this form) as the bool [V] mask the engine takes."""
    return ((bitmask[:, None] >> _SHIFTS) & 1).bool().flatten()[:vocab_size]


class JsonConstraint:
    """One reply's grammar state. `choose` and `consume` run on the model worker's thread."""

    def __init__(self, matcher: Any, end_token: int, vocab_size: int) -> None:
        self.matcher, self.end_token, self.vocab_size = matcher, end_token, vocab_size
        self.bitmask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)

    def allowed(self) -> Tensor | int:
        """The tokens the grammar allows next (bool [V]), which the engine samples the row under in
        the batch; the end of the reply once the grammar is complete, broken or over its limits."""
        matcher = self.matcher
        if matcher.is_stopped() or matcher.is_error():  # complete, or over its limits: end the reply
            return self.end_token
        try:
            matcher.unsafe_compute_mask_ptr(self.bitmask.data_ptr(), self.bitmask.numel() * 4)  # in place, no copy
        except Exception:  # misuse at the API level; never let one row fail the worker's round
            return self.end_token
        allowed = unpack_bitmask(self.bitmask, self.vocab_size)
        if not bool(allowed.any()):
            return self.end_token
        return allowed

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)


class SchemaCompiler:
    """Builds a JsonConstraint per request; the tokenizer's llguidance form is made once (~1 s)."""

    def __init__(self, model: HMTModel, end_tokens: tuple[int, ...]) -> None:
        self.model = model
        tokenizer = model.tokenizer
        self.end_token = end_tokens[0] if end_tokens else int(getattr(tokenizer, "eos_token_id", None) or 0)
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _llg_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(
                    self.model.tokenizer, n_vocab=self.model.vocab_size,  # type: ignore[arg-type]  # a fast one
                    eos_token=self.end_token)
            return self._tokenizer

    def _build(self, schema: dict[str, Any], tokenizer: Any, where: str) -> JsonConstraint:
        from llguidance import LLMatcher, LLParserLimits

        try:
            grammar = LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False})
        except (ValueError, TypeError, RuntimeError) as exc:  # not a JSON object, or not serializable
            raise InvalidInputError(f"{where}: {exc}") from None
        limits = LLParserLimits(**LIMITS)  # type: ignore[arg-type]
        error = LLMatcher.validate_grammar(grammar, tokenizer, limits=limits)
        if error and not error.startswith("WARNING"):
            raise InvalidInputError(f"{where}: the schema cannot be compiled: {error[:500]}")
        matcher = LLMatcher(tokenizer, grammar, log_level=0, limits=limits)
        if matcher.is_error():
            raise InvalidInputError(f"{where}: the schema cannot be compiled: {matcher.get_error()[:500]}")
        return JsonConstraint(matcher, self.end_token, self.model.vocab_size)

    async def compile(self, schema: dict[str, Any], where: str = "text.format.schema") -> JsonConstraint:
        """`where`: the request field the schema came from, for the error messages."""
        if self.model.tokenizer is None:
            raise InvalidInputError("structured output needs a model with a tokenizer")
        if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
            raise InvalidInputError(f"{where}: over {MAX_SCHEMA_BYTES} bytes")
        tokenizer = await asyncio.to_thread(self._llg_tokenizer)  # once, outside the schema's time limit
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._build, schema, tokenizer, where), COMPILE_TIMEOUT_S)
        except TimeoutError:
            raise InvalidInputError(f"{where}: not compiled within {COMPILE_TIMEOUT_S} s; "
                                    "simplify the schema") from None


@functools.cache
def compiler_for(model: HMTModel, end_tokens: tuple[int, ...]) -> SchemaCompiler:
    """One compiler per model and end of turn (both APIs share its llguidance tokenizer)."""
    return SchemaCompiler(model, end_tokens)
