"""(a) Serialized HMT session state vs the backbone's KV cache for the same history.

The state is measured from real appends (model.append of random token ids, every full window
committed through the backbone). The KV cache is materialized as a real transformers
DynamicCache at the smallest point and checked against the closed form
2 * layers * kv_heads * head_dim * T * bytes_per_elem (HMTModel.kv_cache_bytes_per_token, which the
service reports too), which gives the larger points (a 100k token KV cache of this model does not
fit a prefill on a small CPU box, and is not needed to know its size).

    python bench/state_vs_kv.py                       # 4k, 32k, 100k tokens
    python bench/state_vs_kv.py --max-tokens 32768    # quicker
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import (
    add_common_args,
    build_hmt,
    describe,
    fmt_bytes,
    print_table,
    random_tokens,
    setup,
    sync,
)

from hmt_core import HMTModel, SessionState

DEFAULT_POINTS = (4096, 32768, 100_000)


@torch.no_grad()
def kv_bytes_measured(model: HMTModel, ids: list[int]) -> int:
    """Prefill the bare backbone on the history and sum the DynamicCache's key/value bytes."""
    input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
    # logits_to_keep=1: the [T, vocab] logits would dwarf the cache we want to measure.
    out = model.backbone(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    total = 0
    for layer in cache.layers:
        total += layer.keys.numel() * layer.keys.element_size()
        total += layer.values.numel() * layer.values.element_size()
    assert cache.get_seq_length() == len(ids), (cache.get_seq_length(), len(ids))
    return total


def grow_state(model: HMTModel, points: list[int], chunk: int, seed: int) -> dict[int, SessionState]:
    """Append random tokens up to each point (committing full windows as append does); keep the states."""
    gen = torch.Generator().manual_seed(seed)
    state = model.new_session()
    states: dict[int, SessionState] = {}
    start = time.perf_counter()
    seen = 0
    for point in points:
        while seen < point:
            step = min(chunk, point - seen)
            state = model.append(state, random_tokens(step, gen, model.vocab_size))
            seen += step
            print(f"  appended {seen:,}/{points[-1]:,} tokens, {state.segments_committed} segments committed, "
                  f"{time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
        assert state.tokens_seen == point
        states[point] = state
    sync(model.device)
    return states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, threads=0)  # throughput only, no timing ratios: use the idle cores
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_POINTS[-1],
                        help="largest history measured (points above it are skipped, it is added as a point)")
    parser.add_argument("--measure-kv-tokens", type=int, default=DEFAULT_POINTS[0],
                        help="history length at which the real DynamicCache is built and checked")
    args = parser.parse_args()
    device, dtype = setup(args)
    start = time.perf_counter()
    model = build_hmt(args, device, dtype)
    cfg = model.hmt_config

    points = sorted({p for p in DEFAULT_POINTS if p <= args.max_tokens} | {args.max_tokens})
    # Commits are lazy (a full window is committed when the next token arrives), so the LTM first
    # holds N memories one token after N*L; from there on the state is bounded.
    full_at = cfg.ltm_context * cfg.segment_tokens + 1
    if full_at < points[-1]:
        points = sorted({*points, full_at})
    states = grow_state(model, points, chunk=4 * cfg.segment_tokens, seed=args.seed)

    kv_tokens = args.measure_kv_tokens
    ids = random_tokens(kv_tokens, torch.Generator().manual_seed(args.seed + 1), model.vocab_size)
    measured = kv_bytes_measured(model, ids)
    closed = model.kv_cache_bytes_per_token * kv_tokens  # the closed form GET /sessions/{id}/memory uses
    if measured != closed:
        raise SystemExit(f"DynamicCache holds {measured} bytes at {kv_tokens} tokens, closed form says {closed}")

    rows = []
    for point in points:
        state_bytes = len(states[point].to_bytes())
        kv = measured if point == kv_tokens else model.kv_cache_bytes_per_token * point
        source = "DynamicCache (= formula)" if point == kv_tokens else "formula"
        note = " (LTM now full)" if point == full_at else ""
        rows.append([f"{point:,}{note}", states[point].segments_committed, states[point].ltm.shape[0],
                     f"{state_bytes:,} ({fmt_bytes(state_bytes)})", f"{kv:,} ({fmt_bytes(kv)})", source,
                     f"{kv / state_bytes:,.1f}x"])
    if kv_tokens not in points:
        rows.append([f"{kv_tokens:,} (KV check only)", "-", "-", "-", f"{measured:,} ({fmt_bytes(measured)})",
                     "DynamicCache (= formula)", "-"])

    print(f"\n{describe(args, device, dtype)}")
    print("State: len(SessionState.to_bytes()) after real model.append of random ids (LTM stored as float32). "
          f"KV: backbone KV cache in {str(dtype).removeprefix('torch.')}, 2*layers*kv_heads*head_dim*T*bytes; "
          f"a real DynamicCache at {kv_tokens:,} tokens matched the formula exactly.")
    print_table(["tokens", "segments", "LTM rows", "state bytes", "KV bytes", "KV source", "KV/state"], rows,
                title="Session state vs KV cache")
    bounded = [len(states[p].to_bytes()) for p in points if p >= full_at]
    if len(bounded) > 1:
        print(f"State from {full_at:,} tokens on (LTM full) varies by {max(bounded) - min(bounded):,} bytes "
              "(only the open window's token ids differ); the KV cache keeps growing linearly.")
    print(f"total time {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
