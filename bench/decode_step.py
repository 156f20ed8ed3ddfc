"""The decode step three ways, in one run: the HF forward, the lean step (hmt_core.fast_decode), and
the lean step compiled (`--compile`), for each precision at 1, 8 and 32 streams.

For each precision (the shipped chat model, `--precisions`) and stream count: one engine per way
over the same sessions (windows with room: no commit during the measure). Repetitions (`--reps`
of `--tokens` steps) are interleaved across the ways, each step timed and the fastest kept (the
step least disturbed by other jobs on a shared machine; every step does the same work), by the
CPU time of the stepping thread when torch runs one thread (`--wall`, or more threads: the wall
clock). Reported: tokens/s (streams / fastest step) and the ratio against the HF forward in the
same run; the aten op calls of one step at one stream (torch.profiler: all, nested ones included
as `bench/precision.py --profile` counts them, and those called from Python); for the compiled
step, the seconds its first step took (its compilation: the engine has exactly that many rows,
one bucket).

    python bench/decode_step.py                                  # fp32, bf16, int8: eager ways only
    python bench/decode_step.py --precisions int8 --compile      # + compiled (about a minute per bucket)
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from common import add_cpu_timing_args, cpu_timing_setup, print_table
from torch.profiler import ProfilerActivity, profile

from hmt_core import HMTModel, SamplingParams, SessionState, apply_precision
from hmt_core.engine import DecodeEngine, advance_appends, begin_append

WAYS = {"HF forward": {"lean": False}, "lean": {"lean": True}, "lean compiled": {"lean": True, "compile": True}}


def sessions(model: HMTModel, count: int, seed: int) -> list[SessionState]:
    """Sessions with a committed segment and 40 tokens in the window (room to decode without a commit)."""
    generator = torch.Generator().manual_seed(seed)
    length = model.hmt_config.segment_tokens + 40
    tasks = [begin_append(model, model.new_session(), torch.randint(0, model.vocab_size, (length,),
                                                                    generator=generator)) for _ in range(count)]
    while advance_appends(model, tasks):
        pass
    return [task.state for task in tasks]


def engine_for(model: HMTModel, states: list[SessionState], steps: int, **way: bool) -> tuple[DecodeEngine, float]:
    """An engine with every state admitted and one step taken (the compiled one compiles there);
    returns it and the seconds that first step took."""
    engine = DecodeEngine(model, max_rows=len(states), lean=way["lean"], compile=way.get("compile", False))
    for state in states:
        engine.add(state, SamplingParams(max_tokens=steps + 2, ignore_eos=True))
    engine.admit()
    start = time.perf_counter()
    engine.step()
    return engine, time.perf_counter() - start


def step_ops(engine: DecodeEngine, steps: int = 3) -> tuple[float, float]:
    """aten op calls per step: all of them (nested ones included, as `bench/precision.py --profile`
    counts) and those called from Python (each one a trip through the dispatcher from Python)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(events) / steps, len(top) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cpu_timing_args(parser, "steps")
    parser.add_argument("--streams", default="1,8,32", help="comma-separated decode batch sizes")
    parser.add_argument("--tokens", type=int, default=4, help="steps per way per repetition")
    parser.add_argument("--reps", type=int, default=4, help="interleaved repetitions")
    parser.add_argument("--compile", action="store_true", help="also the compiled lean step (slow to compile)")
    args = parser.parse_args()
    clock = cpu_timing_setup(args)
    streams = [int(s) for s in args.streams.split(",")]
    ways = {name: way for name, way in WAYS.items() if args.compile or not way.get("compile")}
    # one compiled graph per precision and bucket: more than dynamo's default of 8 recompilations
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    started = time.perf_counter()
    table = []
    loaded = HMTModel.from_pretrained(Path(args.model))
    for precision in args.precisions.split(","):
        model = apply_precision(HMTModel.from_pretrained(Path(args.model)), precision) if precision != "fp32" \
            else loaded
        rates: dict[str, list[str]] = {name: [] for name in ways}
        ops: dict[str, tuple[float, float]] = {}
        compile_s: dict[str, list[float]] = {name: [] for name in ways}
        for count in streams:
            states = sessions(model, count, args.seed)
            steps = args.tokens * args.reps + (3 if count == 1 else 0)
            engines = {}
            for name, way in ways.items():
                engines[name], first = engine_for(model, states, steps, **way)
                compile_s[name].append(first)
            if count == 1:
                ops = {name: step_ops(engine) for name, engine in engines.items()}
            best = {name: math.inf for name in ways}  # the fastest step: the least disturbed by other jobs
            for _ in range(args.reps):
                for name, engine in engines.items():
                    for _ in range(args.tokens):
                        start = clock()
                        engine.step()
                        best[name] = min(best[name], clock() - start)
            base = count / best["HF forward"]
            for name in ways:
                rate = count / best[name]
                rates[name].append(f"{rate:.1f} ({rate / base:.2f}x)")
            print(f"{precision} {count} streams: " + ", ".join(f"{n} {r[-1]}" for n, r in rates.items()), flush=True)
        for name in ways:
            compiled = " / ".join(f"{s:.0f}" for s in compile_s[name]) if ways[name].get("compile") else "-"
            calls = ops.get(name, (0.0, 0.0))
            table.append([f"{precision}, {name}", *rates[name], f"{calls[0]:,.0f} / {calls[1]:,.0f}", compiled])
    headers = ["precision, decode step", *(f"{n} stream{'s' * (n > 1)} tok/s (vs HF)" for n in streams),
               "aten calls / step at 1 stream (all / from Python)", "compile s (per bucket)"]
    timing = "wall clock" if clock is time.perf_counter else "thread CPU time"
    print_table(headers, table, title=f"Decode step, {torch.get_num_threads()} thread(s), the fastest of "
                                      f"{args.reps} x {args.tokens} steps by {timing}")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
