"""(c) Decode tokens/s inside an HMT window vs plain transformers generate on the same backbone.

The session has one committed segment (so k sensory tokens) and an open window of
--window-tokens tokens; HMT's context for the first decoded token is [p, E(sensory), E(W)],
i.e. 1 + k + W positions, and the HF baseline gets that many random prompt tokens. The n
decoded tokens stay inside the window (W + n <= L), so no commit happens while decoding.

Only decoding is timed, prefill excluded, the same way on both sides: from the moment the
first token's logits exist to the moment the n-th token is out, i.e. n-1 single-token
forward passes. HMT: model.generate() prefills in its constructor; the clock starts after it.
HF: a streamer timestamps every token; the clock runs from token 1 to token n. Both greedy;
repetitions interleaved, medians compared.

    python bench/decode_speed.py
    python bench/decode_speed.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch
from common import add_common_args, build_hmt, describe, median, print_table, random_tokens, setup, sync
from transformers.generation.streamers import BaseStreamer

from hmt_core import HMTModel, SamplingParams, SessionState

TARGET_RATIO = 0.85


class TokenClock(BaseStreamer):
    """Timestamps each generated token (generate calls put() once with the prompt, then per token)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []
        self.calls = 0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 1:
            return  # the prompt
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def hmt_decode(model: HMTModel, state: SessionState, n: int) -> tuple[float, list[int]]:
    """Seconds for the n-1 decode steps after prefill, and the tokens."""
    generation = model.generate(state, SamplingParams(max_tokens=n, ignore_eos=True))  # prefill happens here
    sync(model.device)
    start = time.perf_counter()
    tokens = [t.token_id for t in generation]
    sync(model.device)
    elapsed = time.perf_counter() - start
    assert len(tokens) == n and generation.finish_reason == "length"
    return elapsed, tokens


@torch.no_grad()
def hf_decode(model: HMTModel, input_ids: torch.Tensor, n: int) -> float:
    clock = TokenClock(model.device)
    backbone = model.backbone
    out = backbone.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                            min_new_tokens=n, do_sample=False, streamer=clock,
                            pad_token_id=backbone.config.eos_token_id)
    assert out.shape[1] == input_ids.shape[1] + n and len(clock.stamps) == n
    return clock.stamps[-1] - clock.stamps[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--window-tokens", type=int, default=64, help="tokens already in the open window")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per run (n)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each (interleaved, median)")
    args = parser.parse_args()
    if args.window_tokens < 1 or args.window_tokens + args.new_tokens > args.segment_tokens:
        parser.error("need 1 <= window-tokens and window-tokens + new-tokens <= segment-tokens "
                     "(the decoded tokens must stay inside one window)")
    device, dtype = setup(args)
    start = time.perf_counter()
    model = build_hmt(args, device, dtype)
    cfg = model.hmt_config
    gen = torch.Generator().manual_seed(args.seed)

    # One committed segment (gives the sensory tokens), then the open window.
    state = model.append(model.new_session(), random_tokens(cfg.segment_tokens + args.window_tokens, gen))
    assert state.segments_committed == 1 and len(state.window) == args.window_tokens
    context = 1 + len(state.sensory) + len(state.window)  # memory prompt + sensory + window positions
    hf_ids = torch.tensor([random_tokens(context, gen)], device=device)
    n = args.new_tokens

    hmt_decode(model, state, 8)  # short warm-up of both paths (allocator, first-call setup)
    hf_decode(model, hf_ids, 8)
    hmt_times: list[float] = []
    hf_times: list[float] = []
    for rep in range(args.reps):
        # Alternate which goes first so a slow patch of the machine does not favour one side.
        order = ("hmt", "hf") if rep % 2 == 0 else ("hf", "hmt")
        for which in order:
            if which == "hmt":
                hmt_times.append(hmt_decode(model, state, n)[0])
            else:
                hf_times.append(hf_decode(model, hf_ids, n))

    steps = n - 1
    hmt_tps, hf_tps = steps / median(hmt_times), steps / median(hf_times)
    ratio = hmt_tps / hf_tps
    rows = [["HMT model.generate (greedy)", context, n, f"{hmt_tps:.1f}", f"{median(hmt_times) / steps * 1e3:.2f}",
             f"{ratio:.3f}"],
            ["transformers backbone.generate (greedy)", context, n, f"{hf_tps:.1f}",
             f"{median(hf_times) / steps * 1e3:.2f}", "1.000"]]
    print(f"\n{describe(args, device, dtype)}")
    print(f"Decode only (prefill excluded): {steps} single-token steps per run, {args.reps} interleaved "
          f"repetitions, median. HMT window {args.window_tokens} tokens + {n} decoded <= L={cfg.segment_tokens}.")
    print_table(["path", "context positions", "new tokens", "tokens/s", "ms/token", "ratio vs HF"], rows,
                title="Decode speed inside a window")
    verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
    print(f"HMT/HF = {ratio:.3f} ({verdict} the >= {TARGET_RATIO} target); "
          f"per-rep tokens/s HMT {[round(steps / t, 1) for t in hmt_times]}, "
          f"HF {[round(steps / t, 1) for t in hf_times]}")
    print(f"total time {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
