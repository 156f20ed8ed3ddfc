"""What constrained decoding (the Responses API's text.format json_schema) costs the batched engine.

n rows of a SmolLM2-135M-shaped model (random weights) with SmolLM2's real tokenizer (49,152
tokens; from the backbone cache hmt-serve fills on first start, or --tokenizer DIR) decode
`--tokens` tokens each, in one DecodeEngine, as the model worker runs it: a constrained row's
token is chosen from its logits masked by llguidance (service.constrained) and forced in the
same step as the free rows. Decode tokens/s with none, half and all of the rows constrained, as
ratios to the free batch measured in the same run, and the mask's own time per token.

    python bench/constrained_decode.py                  # 8 rows, 32 tokens each
    python bench/constrained_decode.py --rows 1,8,32
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import torch
from common import add_common_args, build_hmt, print_table, random_tokens, setup, time_call
from transformers import AutoTokenizer

from hmt_core import HMTModel, SamplingParams, SessionState
from hmt_core.engine import DecodeEngine, DecodeRow, advance_appends, begin_append
from service.constrained import JsonConstraint, SchemaCompiler

CACHE = Path.home() / ".cache" / "hmt-serve" / "backbones" / "smollm2-135m-instruct"
# an array of objects can go on for ever, so no row ends early
SCHEMA = {"type": "array", "items": {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
    "required": ["name", "age", "tags"], "additionalProperties": False}}


def prompted(model: HMTModel, generator: torch.Generator) -> SessionState:
    """A session that has read 64 random tokens."""
    task = begin_append(model, model.new_session(), random_tokens(64, generator))
    while not task.done:
        advance_appends(model, [task])
    return task.state


def decode(model: HMTModel, rows: int, constrained: int, tokens: int,
           compiler: SchemaCompiler) -> tuple[float, float]:
    """(decode tokens/s, microseconds spent choosing each constrained token)."""
    engine = DecodeEngine(model, max_rows=rows)
    params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=0, ignore_eos=True)
    generator = torch.Generator().manual_seed(0)
    constraints: dict[DecodeRow, JsonConstraint] = {}
    for i in range(rows):
        row = engine.add(prompted(model, generator), params)
        if i < constrained:
            constraints[row] = asyncio.run(compiler.compile(SCHEMA))
    engine.admit()
    seconds = choosing = 0.0
    produced = chosen = 0
    while engine.size:
        start = time.perf_counter()
        forced = {row: c.choose(engine.logits_of(row), row) for row, c in constraints.items() if row.slot >= 0}
        choosing += time.perf_counter() - start
        chosen += len(forced)
        elapsed, out = time_call(lambda f=forced: engine.step(f) if f else engine.step(),  # type: ignore[misc]
                                 model.device)
        seconds += elapsed
        start = time.perf_counter()
        for row, token in out.tokens:
            if row in constraints:
                constraints[row].consume(token.token_id)
        choosing += time.perf_counter() - start
        produced += len(out.tokens)
    return produced / (seconds + choosing), choosing / max(chosen, 1) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, segment_tokens=256, threads=1)
    parser.add_argument("--rows", default="8")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--tokenizer", type=Path, default=CACHE)
    args = parser.parse_args()
    device, dtype = setup(args)
    if not (args.tokenizer / "tokenizer.json").is_file():
        raise SystemExit(f"no tokenizer in {args.tokenizer}: start hmt-serve once (it caches SmolLM2) or pass "
                         "--tokenizer DIR")
    model = build_hmt(args, device, dtype)
    model.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    compiler = SchemaCompiler(model, (int(model.tokenizer.convert_tokens_to_ids("<|im_end|>")),))
    table = []
    for rows in [int(r) for r in args.rows.split(",")]:
        free, _ = decode(model, rows, 0, args.tokens, compiler)
        for constrained in sorted({rows // 2, rows} - {0}):
            rate, per_token = decode(model, rows, constrained, args.tokens, compiler)
            table.append([rows, constrained, f"{free:.1f}", f"{rate:.1f}", f"{rate / free:.2f}x", f"{per_token:.0f}"])
    print_table(["rows", "constrained", "free tok/s", "tok/s", "ratio", "mask us/token"], table,
                title="constrained decoding in the batched engine")


if __name__ == "__main__":
    main()
