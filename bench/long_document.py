"""A 100k-token document into one session, against the dense backbone's own full-context prefill.

MInference speeds up the prefill of million-token prompts with dynamic sparse attention; the
Routing Transformer routes attention by content. Both attack the cost a dense model pays to read a
long context at once. HMT pays a different cost: it reads the document segment by segment into a
state of fixed size. This bench measures both sides on the same weights, each in its own process
(so each peak memory is its own):

1. HMT: `HMTModel.append` of `--tokens` tokens (100k) to a new session, as `POST
   /sessions/{id}/append` does: tokens/s, peak resident memory above the loaded model (the peak is
   reset after loading, Linux's clear_refs), the state's
   bytes at the end, and the KV cache the same history would need.
2. Dense: one forward of the backbone over its longest context (`max_position_embeddings`, 8192 for
   SmolLM2) with a KV cache and only the last position's logits, as a server's prefill does:
   tokens/s, peak memory above the loaded model, the KV cache it holds. A dense model cannot read
   100k tokens at all; its cost grows with the square of the context beyond that.

Printed: HMT's rate and memory as ratios of the dense prefill's in the same run. The tokens are
random ids (the cost of a forward does not depend on them).

    python bench/long_document.py                           # models/hmt-smollm2, 100k tokens, 2 threads
    python bench/long_document.py --model models/hmt-demo --tokens 20000
    python bench/long_document.py --precisions fp32,bf16,int8 --threads 1   # #29: the append rate per precision
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import fmt_bytes, print_table, random_tokens, setup

from hmt_core import HMTModel


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def start_peak() -> int:
    """Reset the peak resident size to the current one (Linux: clear_refs 5), so the peak read
    afterwards is the work's own and not the model load's; returns the resident bytes now."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def peak_above(start: int) -> int:
    return max(0, _status_bytes("VmHWM") - start)


def load(args: argparse.Namespace) -> HMTModel:
    setup(argparse.Namespace(threads=args.threads, device="cpu", dtype="float32", seed=args.seed))
    return HMTModel.from_pretrained(args.model, device="cpu", precision=args.precision).eval()


def measure_hmt(model: HMTModel, tokens: int, seed: int) -> dict[str, Any]:
    ids = random_tokens(tokens, torch.Generator().manual_seed(seed), model.vocab_size)
    loaded = start_peak()
    start = time.perf_counter()
    state = model.append(model.new_session(), ids)
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_above_model": peak_above(loaded), "state_bytes": len(state.to_bytes()),
            "kv_cache_bytes": model.kv_cache_bytes_per_token * tokens, "segments": state.segments_committed}


@torch.no_grad()
def measure_dense(model: HMTModel, seed: int) -> dict[str, Any]:
    context = int(model.backbone.config.get_text_config().max_position_embeddings)
    ids = torch.randint(0, model.vocab_size, (1, context), generator=torch.Generator().manual_seed(seed))
    loaded = start_peak()
    start = time.perf_counter()
    model.backbone(input_ids=ids, use_cache=True, logits_to_keep=1)
    seconds = time.perf_counter() - start
    return {"tokens": context, "seconds": seconds, "tokens_per_s": context / seconds,
            "peak_above_model": peak_above(loaded),
            "kv_cache_bytes": model.kv_cache_bytes_per_token * context}


def run_part(part: str, args: argparse.Namespace, precision: str = "fp32") -> dict[str, Any]:
    """One measurement in a fresh process: its peak memory is that part's alone."""
    command = [sys.executable, __file__, "--part", part, "--model", args.model, "--tokens", str(args.tokens),
               "--threads", str(args.threads), "--seed", str(args.seed), "--precision", precision]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/hmt-smollm2")
    parser.add_argument("--tokens", type=int, default=100_000, help="document length for HMT")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", default="fp32", help="comma-separated: HMT appends in each precision "
                        "(fp32 first: the others' baseline); the dense prefill stays fp32")
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)  # a part's own
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--part", choices=["hmt", "dense"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.part:
        model = load(args)
        result = measure_hmt(model, args.tokens, args.seed) if args.part == "hmt" else measure_dense(model, args.seed)
        print(json.dumps(result))
        return

    precisions = args.precisions.split(",")
    if precisions[0] != "fp32":
        parser.error("--precisions must start with fp32 (the baseline)")
    dense = run_part("dense", args)
    appends = {precision: run_part("hmt", args, precision) for precision in precisions}
    hmt = appends["fp32"]
    print(f"{args.model}, CPU, {args.threads} threads; each part in its own process")
    print_table(
        ["", "tokens read", "seconds", "tokens/s", "peak memory above the model", "state", "KV cache of that history"],
        [["dense prefill, full context (fp32)", dense["tokens"], f"{dense['seconds']:.1f}",
          f"{dense['tokens_per_s']:.0f}", fmt_bytes(dense["peak_above_model"]), "-",
          fmt_bytes(dense["kv_cache_bytes"])],
         *([f"HMT append ({run['segments']} segments, {precision})", run["tokens"], f"{run['seconds']:.1f}",
            f"{run['tokens_per_s']:.0f} ({run['tokens_per_s'] / hmt['tokens_per_s']:.2f}x fp32)",
            fmt_bytes(run["peak_above_model"]), fmt_bytes(run["state_bytes"]), fmt_bytes(run["kv_cache_bytes"])]
           for precision, run in appends.items())])
    print(f"HMT (fp32) / dense: {hmt['tokens_per_s'] / dense['tokens_per_s']:.2f}x the tokens/s, "
          f"{hmt['tokens'] / dense['tokens']:.1f}x the tokens, "
          f"{hmt['peak_above_model'] / max(dense['peak_above_model'], 1):.2f}x the working memory; "
          f"state {hmt['state_bytes'] / hmt['kv_cache_bytes']:.5f}x the KV cache of its history")

if __name__ == "__main__":
    main()
