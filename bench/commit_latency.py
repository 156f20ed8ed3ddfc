"""(b) Commit latency per segment vs history length, and batched commits across sessions.

One session's history is built with real commits (model.append of random ids). At 10, 100 and
1000 committed segments a snapshot with a full window is kept; then model.commit_windows on
each snapshot is timed in interleaved repetitions (commit_windows is pure: it returns new
states, so the same snapshot can be committed again). The cost must not grow with history:
the long-term memory is capped at N=ltm_context memories and the backbone only ever sees one
segment.

The default segment is 32 tokens (not 256; k stays 32 sensory tokens) so that 1000 real commits
fit in about 7 minutes on one core of a shared 2-core CPU; a smaller segment also makes any
history-dependent cost (recall over the LTM, copying the state) a larger share of a commit,
so flatness is tested more strictly. --segment-tokens 256 measures the serving shape.

    python bench/commit_latency.py
    python bench/commit_latency.py --segment-tokens 256 --points 10 100 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
from common import add_common_args, build_hmt, describe, median, print_table, random_tokens, setup, time_call

from hmt_core import HMTModel, SessionState


def build_history(model: HMTModel, points: list[int], seed: int) -> dict[int, SessionState]:
    """Real commits up to each point; each kept snapshot has `point` segments committed and a full window."""
    seg = model.hmt_config.segment_tokens
    gen = torch.Generator().manual_seed(seed)
    state = model.new_session()
    snapshots: dict[int, SessionState] = {}
    start = time.perf_counter()
    for point in points:
        while state.segments_committed < point or len(state.window) < seg:
            # Filling the open window, then one token more commits it: append's lazy commit.
            state = model.append(state, random_tokens(seg - len(state.window) or seg, gen, model.vocab_size))
            if state.segments_committed % 50 == 0 and len(state.window) == seg:
                print(f"  {state.segments_committed}/{points[-1]} segments committed, "
                      f"{time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
        snapshots[point] = state
    print(f"  history built: {points[-1]} real commits in {time.perf_counter() - start:.0f}s",
          file=sys.stderr, flush=True)
    return snapshots


def with_new_window(state: SessionState, gen: torch.Generator, vocab: int) -> SessionState:
    """Another session with the same history and a different full window."""
    return dataclasses.replace(state, window=tuple(random_tokens(len(state.window), gen, vocab)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, segment_tokens=32)
    parser.add_argument("--points", type=int, nargs="+", default=[10, 100, 1000],
                        help="committed segments of history at which commit latency is measured")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8], help="sessions per commit_windows call")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per point (median)")
    args = parser.parse_args()
    device, dtype = setup(args)
    start = time.perf_counter()
    model = build_hmt(args, device, dtype)
    points = sorted(args.points)
    snapshots = build_history(model, points, args.seed)

    # Warm-up (allocator, kernels), then interleave the points so machine noise hits them alike.
    for _ in range(2):
        model.commit_windows([snapshots[points[0]]])
    times: dict[int, list[float]] = {p: [] for p in points}
    for _ in range(args.reps):
        for point in points:
            elapsed, _ = time_call(lambda s=snapshots[point]: model.commit_windows([s]), device)
            times[point].append(elapsed)
    base = median(times[points[0]])
    rows = [[point, snapshots[point].ltm.shape[0], f"{median(times[point]) * 1e3:.1f}",
             f"{min(times[point]) * 1e3:.1f}", f"{median(times[point]) / base:.2f}"] for point in points]

    # Batched: B sessions with the longest history (full LTM), each its own window.
    gen = torch.Generator().manual_seed(args.seed + 1)
    longest = snapshots[points[-1]]
    sessions = {b: [with_new_window(longest, gen, model.vocab_size) for _ in range(b)] for b in args.batches}
    for b in args.batches:
        model.commit_windows(sessions[b])
    batch_times: dict[int, list[float]] = {b: [] for b in args.batches}
    for _ in range(args.reps):
        for b in args.batches:
            elapsed, _ = time_call(lambda s=sessions[b]: model.commit_windows(s), device)
            batch_times[b].append(elapsed)
    base_b = median(batch_times[args.batches[0]]) / args.batches[0]
    batch_rows = []
    for b in args.batches:
        per_session = median(batch_times[b]) / b
        batch_rows.append([b, f"{median(batch_times[b]) * 1e3:.1f}", f"{per_session * 1e3:.1f}",
                           f"{base_b / per_session:.2f}x"])

    print(f"\n{describe(args, device, dtype)}")
    print(f"History built with {points[-1]} real commits (model.append of random ids); "
          f"{args.reps} interleaved repetitions, median.")
    print_table(["segments of history", "LTM rows", "median ms / commit", "min ms", f"ratio vs {points[0]}"], rows,
                title="Commit latency vs history (one session, full window)")
    print_table(["sessions B", "median ms / call", "ms / session", f"speedup vs B={args.batches[0]}"], batch_rows,
                title=f"Batched commit_windows ({points[-1]} segments of history each)")
    print(f"total time {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
