"""The commit forward eager and compiled, in one run: `HMTModel.commit_windows` on full windows,
as the backbone runs it and with that backbone forward under `torch.compile` (static shapes).

A commit reads one full window per session in two backbone forwards, rows batched: the summary
query (step 1, [mem, x[:128], mem]: 130 positions) and the segment pass (step 3, [p, E(sensory
32), E(window 256), p]: 290 positions), each keeping only the last position's hidden state
(`HMTModel._last_hidden`). The compiled way replaces that one function on the model with
`torch.compile(..., dynamic=False)` of it, so the rest of the commit (recall, the state update)
is the same code both ways: one graph per precision, batch and forward length.

For each precision (the shipped chat model, `--precisions`) and batch (`--sessions`): that many
sessions with a committed segment and a full window (the next token commits it), committed both
ways (commit_windows is pure: the same states commit again). The compiled commit's new memories
must be about as close to the fp32 model's eager ones as the eager commit's of that precision
are (asserted, `accurate_enough`). Repetitions (`--reps`) are interleaved between the ways and
the fastest kept (the commit least disturbed by other jobs on a shared machine), timed by the
CPU time of the calling thread when torch runs one thread (`--wall`, or more threads: the wall
clock). Reported: tokens committed per second (sessions x 256 / fastest commit), the
compiled/eager ratio of the same run, the seconds the first compiled commit took (wall clock:
the compilation of its two forwards), and the new memories' relative differences (compiled
against eager; each against fp32 eager). The compile seconds are a cold start's only with
inductor's on-disk cache empty or off: a second run of the same shapes reads its graphs from the
cache (`TORCHINDUCTOR_FORCE_DISABLE_CACHES=1` measures the cold compilation every time).

    python bench/commit_step.py                                     # fp32, bf16, int8 at 1 and 8 sessions
    python bench/commit_step.py --precisions int8,bf16 --sessions 1,8
    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 python bench/commit_step.py  # compile seconds of a cold start
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from common import add_cpu_timing_args, cpu_timing_setup, print_table
from torch import Tensor

from hmt_core import HMTModel, SessionState, apply_precision
from hmt_core.engine import advance_appends, begin_append

FP32_TOLERANCE = 1e-4  # fp32 compiled against eager: reductions reordered, nothing rounded differently


def relative(got: Tensor, expected: Tensor) -> float:
    """|got - expected| / |expected| over all the memories."""
    return ((got - expected).norm() / expected.norm()).item()


def accurate_enough(compiled: Tensor, eager: Tensor, reference: Tensor) -> bool:
    """The compiled commit's memories within fp32's tolerance of the fp32 eager ones (`reference`), or
    within half as much again as the eager commit's of the same precision. Not a fixed tolerance
    against the eager ones: inductor reorders reductions and fuses bf16 ops without rounding between
    them, and over 30 layers bf16 activations (int8 computes in bf16) drift apart by as much as the
    precision's own error (measured, int8, 8 sessions: one row 8.3% from eager; that row's eager
    memory 8.8% from fp32, its compiled one 2.3%)."""
    return relative(compiled, reference) <= 1.5 * relative(eager, reference) + FP32_TOLERANCE


def full_windows(model: HMTModel, count: int, seed: int) -> list[SessionState]:
    """Sessions with one segment committed and a full window: what a commit reads (k sensory tokens,
    the window), every row the same shapes, so each forward is one batch."""
    generator = torch.Generator().manual_seed(seed)
    length = 2 * model.hmt_config.segment_tokens  # the first window commits, the second waits full
    tasks = [begin_append(model, model.new_session(), torch.randint(0, model.vocab_size, (length,),
                                                                    generator=generator)) for _ in range(count)]
    while advance_appends(model, tasks):
        pass
    states = [task.state for task in tasks]
    assert all(len(s.window) == model.hmt_config.segment_tokens for s in states), "windows must be full"
    return states


def new_memories(model: HMTModel, states: list[SessionState]) -> Tensor:
    """One commit of every state; the memories it wrote (the last row of each long-term memory)."""
    committed, _ = model.commit_windows(states)
    return torch.stack([s.ltm[-1] for s in committed])


def compiled_last_hidden(model: HMTModel) -> Callable[[Tensor], Tensor]:
    """The backbone forward both commit steps run, compiled with static shapes (a graph per batch and length)."""
    return torch.compile(model._last_hidden, dynamic=False)


@contextmanager
def last_hidden_by(model: HMTModel, forward: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """The model's commits run `forward` for the backbone: an instance attribute shadows the method
    (nothing in hmt_core changes; both ways run the same commit code around it)."""
    vars(model)["_last_hidden"] = forward
    try:
        yield
    finally:
        del vars(model)["_last_hidden"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cpu_timing_args(parser, "commits")
    parser.add_argument("--sessions", default="1,8", help="comma-separated commit batch sizes")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    args = parser.parse_args()
    clock = cpu_timing_setup(args)
    batches = [int(s) for s in args.sessions.split(",")]
    # two graphs (summary, segment) per precision and batch: more than dynamo's default of 8 recompilations
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    started = time.perf_counter()
    table = []
    fp32 = HMTModel.from_pretrained(Path(args.model))  # the reference memories
    for precision in args.precisions.split(","):
        model = apply_precision(HMTModel.from_pretrained(Path(args.model)), precision) if precision != "fp32" \
            else fp32
        segment = model.hmt_config.segment_tokens
        eager = model._last_hidden
        compiled = compiled_last_hidden(model)
        for count in batches:
            states = full_windows(model, count, args.seed)
            expected = new_memories(model, states)  # also the eager way's warm-up
            reference = expected if model is fp32 else new_memories(fp32, states)
            with last_hidden_by(model, compiled):
                start = time.perf_counter()
                got = new_memories(model, states)  # compiles this batch's two forwards
                compile_s = time.perf_counter() - start
            difference = relative(got, expected)
            errors = f"{relative(expected, reference):.1e} / {relative(got, reference):.1e}"
            assert accurate_enough(got, expected, reference), \
                f"{precision}, {count} sessions: compiled commit {difference:.1e} from eager; vs fp32 " \
                f"(eager / compiled) {errors}"
            best = {"eager": math.inf, "compiled": math.inf}  # the fastest commit: the least disturbed
            for _ in range(args.reps):
                for name, forward in (("eager", eager), ("compiled", compiled)):
                    with last_hidden_by(model, forward):
                        start = clock()
                        model.commit_windows(states)
                        best[name] = min(best[name], clock() - start)
            rate = {name: count * segment / seconds for name, seconds in best.items()}
            ratio = rate["compiled"] / rate["eager"]
            table.append([f"{precision}, {count} session{'s' * (count > 1)}", f"{rate['eager']:.0f}",
                          f"{rate['compiled']:.0f}", f"{ratio:.2f}x", f"{compile_s:.0f}", f"{difference:.1e}", errors])
            print(f"{precision} {count} sessions: eager {rate['eager']:.0f} tok/s, compiled {rate['compiled']:.0f} "
                  f"tok/s ({ratio:.2f}x), compiled in {compile_s:.0f} s, {difference:.1e} from eager, vs fp32 {errors}",
                  flush=True)
    timing = "wall clock" if clock is time.perf_counter else "thread CPU time"
    print_table(["precision, batch", "eager tok/s", "compiled tok/s", "compiled / eager", "compile s",
                 "compiled vs eager", "vs fp32 eager (eager / compiled)"], table,
                title=f"Commit forward, {torch.get_num_threads()} thread(s), the fastest of {args.reps} "
                      f"commits by {timing}")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
