"""(g) What each kind of session memory costs: HMT against Temp-LoRA, HMT+Temp-LoRA and the
window-only backbone, on the same backbone, in one run (ratios against HMT).

Per kind: the state's bytes after `--segments` committed windows, the latency of one commit
(HMT: the summary and memory forwards; Temp-LoRA: its gradient steps; HMT+Temp-LoRA: both), and aggregate decode
tokens/s at 1 and `--batch` sessions (Temp-LoRA rows carry different adapters, applied by the
batched multi-adapter matmuls).

    python bench/memory_kinds.py --model models/hmt-smollm2        # HMT as shipped, the others on its backbone
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from common import add_common_args, engine_rate, fmt_bytes, median, print_table, setup

from hmt_core import HMTModel
from hmt_core.checkpoint import load_pretrained
from hmt_core.memory import MemoryKind
from hmt_core.temp_lora import TempLoRAConfig


def kind_model(hmt: HMTModel, bare: HMTModel, kind: MemoryKind, args: argparse.Namespace) -> HMTModel:
    """The HMT model itself or with an adapter besides its memory, or its bare backbone read with
    another kind of memory."""
    if kind == "hmt":
        return hmt
    lora = TempLoRAConfig(rank=args.rank, steps=args.steps)
    return (hmt if kind.startswith("hmt") else bare).with_memory(kind, lora).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, threads=2)
    parser.add_argument("--model", default="models/hmt-smollm2", help="an HMT model directory")
    parser.add_argument("--segments", type=int, default=4, help="windows committed before measuring")
    parser.add_argument("--commits", type=int, default=3, help="commits timed (median)")
    parser.add_argument("--batch", type=int, default=8, help="sessions decoding at once")
    parser.add_argument("--tokens", type=int, default=16, help="tokens each session generates")
    parser.add_argument("--rank", type=int, default=8, help="Temp-LoRA rank")
    parser.add_argument("--steps", type=int, default=2, help="Temp-LoRA gradient steps per commit")
    args = parser.parse_args()
    setup(args)
    hmt = HMTModel.from_pretrained(args.model).eval()
    bare = load_pretrained(HMTModel, args.model, backbone_deltas=False).eval() if hmt.backbone_deltas else hmt
    seg = hmt.hmt_config.segment_tokens
    rng = random.Random(args.seed)
    history = [[rng.randrange(hmt.vocab_size) for _ in range(args.segments * seg + seg // 2)]
               for _ in range(args.batch)]
    rows = []
    kinds: tuple[MemoryKind, ...] = ("hmt", "temp-lora", "hmt+temp-lora", "window")
    for kind in kinds:
        model = kind_model(hmt, bare, kind, args)
        states = [model.append(model.new_session(), h) for h in history]
        full = model.append(states[0], [rng.randrange(model.vocab_size) for _ in range(seg - len(states[0].window))])
        commit_s = []
        for _ in range(args.commits):
            started = time.perf_counter()
            model.commit_windows([full])
            commit_s.append(time.perf_counter() - started)
        engine_rate(model, states[:1], 2, with_prefill=False)  # warm-up
        one, many = (engine_rate(model, s, args.tokens, with_prefill=False) for s in (states[:1], states))
        rows.append([kind, len(states[0].to_bytes()), median(commit_s), one, many])
        print(f"{kind}: state {fmt_bytes(rows[-1][1])}, commit {rows[-1][2] * 1000:.0f} ms, "
              f"decode {one:.1f} / {many:.1f} tok/s", flush=True)
    base = rows[0]
    print(f"\n{args.model}, {str(hmt.dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads; "
          f"L={seg}, k={hmt.hmt_config.num_sensory}; Temp-LoRA rank {args.rank}, {args.steps} steps per commit\n")
    print_table(["memory", "state bytes", "x HMT", "commit ms", "x HMT", "decode tok/s (1)", "x HMT",
                 f"decode tok/s ({args.batch})", "x HMT"],
                [[kind, fmt_bytes(size), f"{size / base[1]:.2f}x", f"{commit * 1000:.0f}", f"{commit / base[2]:.2f}x",
                  f"{one:.1f}", f"{one / base[3]:.2f}x", f"{many:.1f}", f"{many / base[4]:.2f}x"]
                 for kind, size, commit, one, many in rows])


if __name__ == "__main__":
    main()
