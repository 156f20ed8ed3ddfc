"""What constrained decoding (the Responses API's text.format json_schema) costs, with each of the
three maintained grammar engines: llguidance (what hmt-serve uses, service.constrained), xgrammar
and outlines-core, on the same JSON schemas and SmolLM2's real tokenizer (49,152 tokens; from the
backbone cache hmt-serve fills on first start, or --tokenizer DIR).

1. Per engine: its tokenizer set-up (once per process), each schema's compile time, and the time
   to compute the allowed-token mask per token (unpacked to the bool [V] mask the engine takes)
   along a valid compact JSON document of that schema, tokenized as the tokenizer does.
2. In the batched engine: n rows of a SmolLM2-135M-shaped model (random weights) decode
   `--tokens` tokens each in one DecodeEngine, as the model worker runs it: each constrained row's
   grammar gives its mask and the engine samples it under the mask in the same batched draw as
   the free rows (`DecodeEngine.step(masks=...)`). Decode tokens/s with half and all of the rows
   constrained, as ratios to the free batch measured in the same run (best of interleaved runs),
   and the worker's time per constrained token outside the step (mask, consume), also as a share
   of a free step's time; and, for reference, the way hmt-serve did it before (llguidance, the row
   sampled a second time on its own from its masked logits and forced into the step).

An engine that is not installed is reported as missing (only llguidance is a dependency of
hmt-serve; `pip install xgrammar outlines-core` for the others).

    python bench/constrained_decode.py                  # 8 rows, 32 tokens each
    python bench/constrained_decode.py --rows 1,8,32 --engines llguidance,xgrammar
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from common import add_common_args, build_hmt, print_table, random_tokens, setup, time_call
from transformers import AutoTokenizer

from hmt_core import HMTModel, SamplingParams, SessionState
from hmt_core.engine import DecodeEngine, DecodeRow, advance_appends, begin_append
from hmt_core.sampling import sample_tokens
from service.constrained import SchemaCompiler, unpack_bitmask

CACHE = Path.home() / ".cache" / "hmt-serve" / "backbones" / "smollm2-135m-instruct"
ENGINES = ("llguidance", "xgrammar", "outlines-core")
# an array of objects can go on for ever, so no row ends early in the decode measurement
ARRAY = {"type": "array", "items": {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
    "required": ["name", "age", "tags"], "additionalProperties": False}}
PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}, "email": {"type": "string"},
    "active": {"type": "boolean"}, "score": {"type": "number"}},
    "required": ["name", "age", "email", "active", "score"], "additionalProperties": False}
CITIES = [f"city{i:02d}" for i in range(60)]
ORDER = {"type": "object", "properties": {
    "id": {"type": "integer"}, "city": {"enum": CITIES},
    "customer": {"type": "object", "properties": {"name": {"type": "string"}, "vip": {"type": "boolean"}},
                 "required": ["name", "vip"], "additionalProperties": False},
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "sku": {"type": "string"}, "qty": {"type": "integer"}}, "required": ["sku", "qty"],
        "additionalProperties": False}}},
    "required": ["id", "city", "customer", "items"], "additionalProperties": False}
# (name, schema, a valid instance: its compact JSON is what the masks are timed along)
SCHEMAS: list[tuple[str, dict[str, Any], Any]] = [
    ("array of objects", ARRAY, [{"name": f"person {i}", "age": 20 + i, "tags": ["a", "b"]} for i in range(6)]),
    ("flat object, 5 fields", PERSON, {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org",
                                       "active": True, "score": 9.75}),
    ("nested, enum of 60", ORDER, {"id": 1042, "city": "city17", "customer": {"name": "Grace Hopper", "vip": False},
                                   "items": [{"sku": f"SKU-{i}", "qty": i} for i in range(1, 5)]}),
]


def _nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"], "additionalProperties": False}
    return schema


# what a hostile client sends: each compiled (then its first mask computed) in a child process
# that is killed after --hostile-timeout seconds
HOSTILE: list[tuple[str, dict[str, Any]]] = [
    ("enum of 5,000 strings", {"enum": [f"value number {i}" for i in range(5000)]}),
    ("objects nested 40 deep", _nested(40)),
    ("recursive $ref", {"$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "integer"}, "next": {"$ref": "#/$defs/node"}}, "required": ["value"],
        "additionalProperties": False}}, "$ref": "#/$defs/node"}),
]


class Matcher(Protocol):
    def allowed(self) -> torch.Tensor | int: ...

    def consume(self, token: int) -> None: ...


class Engine(Protocol):
    """One grammar engine: `compile` a schema once, then a fresh `Matcher` per reply."""

    def compile(self, schema: dict[str, Any]) -> Any: ...

    def matcher(self, grammar: Any) -> Matcher: ...


class Llguidance:
    """hmt-serve's own path (service.constrained), compile included."""

    def __init__(self, model: HMTModel, end: int) -> None:
        self.compiler = SchemaCompiler(model, (end,))
        self.compiler._llg_tokenizer()

    def compile(self, schema: dict[str, Any]) -> Any:
        return schema  # llguidance compiles lazily, per matcher: the time is in matcher()

    def matcher(self, grammar: Any) -> Matcher:
        return asyncio.run(self.compiler.compile(grammar))


class XgrammarMatcher:
    def __init__(self, matcher: Any, vocab: int, end: int) -> None:
        import xgrammar

        self.matcher, self.vocab, self.end = matcher, vocab, end
        self.bitmask = xgrammar.allocate_token_bitmask(1, vocab)

    def allowed(self) -> torch.Tensor | int:
        if self.matcher.is_terminated():
            return self.end
        self.matcher.fill_next_token_bitmask(self.bitmask)
        return unpack_bitmask(self.bitmask[0], self.vocab)

    def consume(self, token: int) -> None:
        self.matcher.accept_token(token)


class Xgrammar:
    def __init__(self, tokenizer: Any, vocab: int, end: int) -> None:
        import xgrammar

        self.vocab, self.end = vocab, end
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[end])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, schema: dict[str, Any]) -> Any:
        # compact, as hmt-serve constrains (llguidance's whitespace_flexible false)
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    def matcher(self, grammar: Any) -> Matcher:
        import xgrammar

        return XgrammarMatcher(xgrammar.GrammarMatcher(grammar), self.vocab, self.end)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (SmolLM2's tokenizer uses it): character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return {c: b for b, c in chars.items()}


class OutlinesMatcher:
    def __init__(self, guide: Any, vocab: int, end: int) -> None:
        self.guide, self.vocab, self.end = guide, vocab, end
        self.bitmask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor | int:
        if self.guide.is_finished():
            return self.end
        self.bitmask.zero_()
        self.guide.write_mask_into(self.bitmask.data_ptr(), self.bitmask.numel(), self.bitmask.element_size())
        return unpack_bitmask(self.bitmask[0], self.vocab)

    def consume(self, token: int) -> None:
        self.guide.advance(token, return_tokens=False)


class OutlinesCore:
    def __init__(self, tokenizer: Any, vocab: int, end: int) -> None:
        from outlines_core import Vocabulary

        self.vocab, self.end = vocab, end
        decoder, special = _byte_decoder(), set(tokenizer.all_special_ids) | {end}
        tokens: dict[bytes, list[int]] = {}
        for text, token in tokenizer.get_vocab().items():
            if token not in special and all(c in decoder for c in text):
                tokens.setdefault(bytes(decoder[c] for c in text), []).append(token)
        self.vocabulary = Vocabulary(end, tokens)

    def compile(self, schema: dict[str, Any]) -> Any:
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        return Index(build_regex_from_schema(json.dumps(schema), ""), self.vocabulary)  # "": compact

    def matcher(self, grammar: Any) -> Matcher:
        from outlines_core import Guide

        return OutlinesMatcher(Guide(grammar), self.vocab, self.end)


def load(name: str, model: HMTModel, end: int) -> Engine:
    tokenizer, vocab = model.tokenizer, model.vocab_size
    if name == "llguidance":
        return Llguidance(model, end)
    if name == "xgrammar":
        return Xgrammar(tokenizer, vocab, end)
    if name == "outlines-core":
        return OutlinesCore(tokenizer, vocab, end)
    raise SystemExit(f"unknown engine {name!r}; one of {', '.join(ENGINES)}")


def mask_times(engine: Engine, grammar: Any, tokens: list[int], passes: int = 5) -> tuple[float, float, float]:
    """(ms to make a matcher, mean us per mask, mean us per consume) along `tokens`: the best of
    `passes` passes, each with a fresh matcher (a loaded machine only ever adds time)."""
    best = (float("inf"), float("inf"), float("inf"))
    for _ in range(passes):
        start = time.perf_counter()
        matcher = engine.matcher(grammar)
        made = time.perf_counter() - start
        masking = consuming = 0.0
        for token in tokens:
            start = time.perf_counter()
            allowed = matcher.allowed()
            masking += time.perf_counter() - start
            if isinstance(allowed, int) or not bool(allowed[token]):
                raise RuntimeError(f"token {token} of a valid document was not allowed")
            start = time.perf_counter()
            matcher.consume(token)
            consuming += time.perf_counter() - start
        best = (min(best[0], made * 1e3), min(best[1], masking / len(tokens) * 1e6),
                min(best[2], consuming / len(tokens) * 1e6))
    return best


def _compile_first_mask(engine: Engine, schema: dict[str, Any], results: Any) -> None:
    start = time.perf_counter()
    try:
        engine.matcher(engine.compile(schema)).allowed()
        results.put(f"{(time.perf_counter() - start) * 1e3:.0f} ms")
    except Exception as exc:  # what the engine says: hmt-serve answers it with a 400
        results.put(f"refused in {(time.perf_counter() - start) * 1e3:.0f} ms ({type(exc).__name__})")


def hostile(engine: Engine, schema: dict[str, Any], timeout: float) -> str:
    """Compile time (and first mask) of a hostile schema, in a child process killed at `timeout`."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_compile_first_mask, args=(engine, schema, results))
    child.start()
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join()
        return f"> {timeout:.0f} s (killed)"
    return str(results.get()) if not results.empty() else f"crashed (exit {child.exitcode})"


def prompted(model: HMTModel, generator: torch.Generator) -> SessionState:
    """A session that has read 64 random tokens."""
    task = begin_append(model, model.new_session(), random_tokens(64, generator))
    while not task.done:
        advance_appends(model, [task])
    return task.state


def decode(model: HMTModel, rows: int, constrained: int, tokens: int,
           matcher: Callable[[], Matcher] | None, twice: bool = False) -> tuple[float, float]:
    """(decode tokens/s of `rows` rows, the first `constrained` of them under a fresh `matcher()`
    each; microseconds of the worker's time outside the step per constrained token: its mask, its
    consume and, `twice`, the old way's second sampling of the row alone, forced into the step)."""
    engine = DecodeEngine(model, max_rows=rows)
    params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=0, ignore_eos=True)
    generator = torch.Generator().manual_seed(0)
    matchers: dict[DecodeRow, Matcher] = {}
    for i in range(rows):
        row = engine.add(prompted(model, generator), params)
        if i < constrained and matcher is not None:
            matchers[row] = matcher()
    engine.admit()
    seconds = outside = 0.0
    produced = chosen = 0
    while engine.size:
        start = time.perf_counter()
        forced: dict[DecodeRow, int] = {}
        masks: dict[DecodeRow, torch.Tensor] = {}
        for row, m in matchers.items():
            if row.slot < 0:
                continue
            allowed = m.allowed()
            if isinstance(allowed, int):
                forced[row] = allowed
            elif twice:
                masked = engine.logits_of(row).masked_fill(~allowed, float("-inf"))
                forced[row] = int(sample_tokens(masked[None], [row.params], [row.key], [len(row.tokens)])[0])
            else:
                masks[row] = allowed
        choosing = time.perf_counter() - start
        elapsed, out = time_call(lambda f=forced, k=masks: engine.step(f or None, k or None),  # type: ignore[misc]
                                 model.device)
        start = time.perf_counter()
        for row, token in out.tokens:
            if row in matchers:
                matchers[row].consume(token.token_id)
                chosen += 1
        consuming = time.perf_counter() - start
        seconds += choosing + elapsed + consuming
        outside += choosing + consuming
        produced += len(out.tokens)
    return produced / seconds, outside / max(chosen, 1) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, segment_tokens=256, threads=1)
    parser.add_argument("--rows", default="8")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--tokenizer", type=Path, default=CACHE)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each batch (the median ratio is shown)")
    parser.add_argument("--hostile-timeout", type=float, default=20.0, help="seconds a hostile compile may take")
    args = parser.parse_args()
    device, dtype = setup(args)
    if not (args.tokenizer / "tokenizer.json").is_file():
        raise SystemExit(f"no tokenizer in {args.tokenizer}: start hmt-serve once (it caches SmolLM2) or pass "
                         "--tokenizer DIR")
    model = build_hmt(args, device, dtype)
    model.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    end = int(model.tokenizer.convert_tokens_to_ids("<|im_end|>"))  # type: ignore[arg-type]
    documents = [model.tokenizer.encode(json.dumps(instance, separators=(",", ":")), add_special_tokens=False)
                 for _, _, instance in SCHEMAS]

    engines: dict[str, Engine] = {}
    grammar_rows, arrays = [], {}
    for name in args.engines.split(","):
        start = time.perf_counter()
        try:
            engine = load(name, model, end)
        except ImportError as exc:
            grammar_rows.append([name, "missing", "", "", "", f"({exc.name} not installed)"])
            continue
        setup_s = time.perf_counter() - start
        engines[name] = engine
        for (title, schema, _), tokens in zip(SCHEMAS, documents, strict=True):
            start = time.perf_counter()
            grammar = engine.compile(schema)
            compiled = (time.perf_counter() - start) * 1e3
            made, per_mask, per_consume = mask_times(engine, grammar, tokens)
            grammar_rows.append([name, f"{setup_s:.2f}", title, f"{compiled + made:.1f}", f"{per_mask:.0f}",
                                 f"{per_consume:.0f}"])
            if schema is ARRAY:
                arrays[name] = grammar
    print_table(["engine", "tokenizer set-up s", "schema", "compile ms", "mask us/token", "consume us/token"],
                grammar_rows, title=f"grammar engines, SmolLM2's tokenizer ({model.vocab_size:,} tokens), "
                                    f"{min(map(len, documents))}-{max(map(len, documents))}-token documents")

    hostile_rows = [[name, *(hostile(engine, schema, args.hostile_timeout) for _, schema in HOSTILE)]
                    for name, engine in engines.items()]
    print_table(["engine", *(title for title, _ in HOSTILE)], hostile_rows,
                title="hostile schemas: compile and first mask (hmt-serve refuses what takes over 2 s)")

    table = []
    for rows in [int(r) for r in args.rows.split(",")]:
        variants: list[tuple[str, str, bool]] = [(name, name, False) for name in engines]
        if "llguidance" in engines:
            variants.append(("llguidance, sampled twice (before)", "llguidance", True))
        levels = sorted({rows // 2, rows} - {0})
        frees: list[float] = []
        rates: dict[tuple[int, str], list[float]] = {}
        costs: dict[tuple[int, str], list[float]] = {}
        for _ in range(args.repeats):  # interleaved: a loaded machine drifts; the best run of each is kept
            frees.append(decode(model, rows, 0, args.tokens, None)[0])
            for constrained in levels:
                for label, name, twice in variants:
                    engine, grammar = engines[name], arrays[name]
                    rate, cost = decode(model, rows, constrained, args.tokens,
                                        lambda e=engine, g=grammar: e.matcher(g), twice)  # type: ignore[misc]
                    rates.setdefault((constrained, label), []).append(rate)
                    costs.setdefault((constrained, label), []).append(cost)
        for key, rate_list in rates.items():
            constrained, label = key
            cost = min(costs[key])
            step_us = rows / max(frees) * 1e6  # a free step: one token for every row
            table.append([rows, constrained, label, f"{max(frees):.1f}", f"{max(rate_list):.1f}",
                          f"{max(rate_list) / max(frees):.2f}x", f"{cost:.0f}", f"{constrained * cost / step_us:.2%}"])
    print_table(["rows", "constrained", "engine", "free tok/s", "tok/s", "ratio", "worker us/constrained token",
                 "of a free step"],
                table, title=f"constrained rows in the batched engine: decode tokens/s against the free batch, "
                             f"best of {args.repeats} interleaved runs (array-of-objects schema, temperature 1)")


if __name__ == "__main__":
    main()
