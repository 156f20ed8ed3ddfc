"""Precision as a serving choice: speed and quality of fp32, bf16, int8 and int4 weights, in one run.

For each precision (`HMTModel.from_pretrained(..., precision=...)`, the same states for all of
them, since a state moves between precisions):
- engine decode tokens/s at 1 and 8 streams (`--streams`; prefill excluded, windows with room so
  no commit happens), and append tokens/s (one session reading `--append-tokens` tokens: its
  window commits), each as a ratio against fp32 measured in the same run;
- weight bytes one decode step reads, and at one stream the GB/s of those reads against the
  machine's memory bandwidth measured in the same run (a large tensor copy: read + write);
- quality on the model's held_out.txt: the loss and perplexity of teacher-forced scoring over the
  first `--eval-tokens` tokens (segment by segment, memory included), their change against
  fp32, and how often the top token agrees with fp32's.
Repetitions are interleaved across precisions (`--reps`, the best of them), so a slow patch of the
shared machine does not favour one precision.

    python bench/precision.py                         # the shipped chat model, about 2 minutes
    python bench/precision.py --streams 1,8,32 --reps 2
    python bench/precision.py --profile int8           # where one stream's decode step goes, by op
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from common import ROOT, engine_rate, fmt_bytes, print_table, setup

from hmt_core import PRECISIONS, HMTModel, SamplingParams, SessionState, apply_precision
from hmt_core.engine import DecodeEngine, advance_appends, begin_append
from hmt_core.precision import precision_of, weight_bytes


def copy_bandwidth(megabytes: int = 256, reps: int = 5) -> float:
    """Bytes/s of a large tensor copy (each byte read once and written once), best of `reps`."""
    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    target.copy_(source)  # pages touched before timing
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 4 / best


@torch.no_grad()
def held_out_quality(model: HMTModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token losses over ids [1, T] (teacher-forced, with memory) and the top token, per position."""
    logits = model.score(ids).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none"), logits.argmax(dim=-1)


def histories(model: HMTModel, lengths: list[int], generator: torch.Generator) -> list[SessionState]:
    """Sessions that read random histories of these lengths, committing in batched forwards."""
    tasks = [begin_append(model, model.new_session(), torch.randint(0, model.vocab_size, (n,), generator=generator))
             for n in lengths]
    while advance_appends(model, tasks):
        pass
    assert all(task.error is None for task in tasks)
    return [task.state for task in tasks]


def append_rate(model: HMTModel, tokens: list[int]) -> float:
    start = time.perf_counter()
    state = model.append(model.new_session(), tokens)
    assert state.tokens_seen == len(tokens)
    return len(tokens) / (time.perf_counter() - start)


def profile_step(model: HMTModel, state: SessionState, steps: int = 10) -> None:
    """torch.profiler over `steps` one-stream engine decode steps: wall time, op calls, top ops."""
    from torch.profiler import ProfilerActivity, profile

    engine = DecodeEngine(model, max_rows=1)
    engine.add(state, SamplingParams(max_tokens=steps + 8, ignore_eos=True))
    for _ in range(4):  # prefill and warm-up
        engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = (time.perf_counter() - start) / steps
    averages = prof.key_averages()
    calls = sum(e.count for e in averages if e.key.startswith("aten::")) / steps
    busy = sum(e.self_cpu_time_total for e in averages) / steps / 1e3
    print(f"{precision_of(model)}: {wall * 1e3:.1f} ms per step (profiled), {calls:.0f} aten op calls per step, "
          f"{busy:.1f} ms of it inside ops")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "hmt-smollm2"), help="model directory")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated; fp32 is the baseline")
    parser.add_argument("--streams", default="1,8", help="comma-separated decode batch sizes")
    parser.add_argument("--tokens", type=int, default=24, help="tokens decoded per stream")
    parser.add_argument("--append-tokens", type=int, default=1024, help="tokens one session appends")
    parser.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens scored")
    parser.add_argument("--reps", type=int, default=1, help="interleaved repetitions of the speed measures")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0: cores left idle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", choices=PRECISIONS, help="only profile one stream decoding in this precision")
    args = parser.parse_args()
    args.device, args.dtype = "cpu", "float32"
    precisions = args.precisions.split(",")
    if precisions[0] != "fp32":
        parser.error("--precisions must start with fp32, the baseline")
    streams = [int(s) for s in args.streams.split(",")]
    setup(args)
    started = time.perf_counter()

    if args.profile:
        model = HMTModel.from_pretrained(args.model, precision=args.profile)
        generator = torch.Generator().manual_seed(args.seed)
        profile_step(model, histories(model, [model.hmt_config.segment_tokens + 40], generator)[0])
        return
    base = HMTModel.from_pretrained(args.model).eval()
    models = {p: base if p == "fp32" else apply_precision(copy.deepcopy(base), p) for p in precisions}
    assert len({m.fingerprint for m in models.values()}) == 1, "every precision keeps the model's identity"
    tokenizer = base.tokenizer
    assert tokenizer is not None, "the model needs a tokenizer to read held_out.txt"
    text = (Path(args.model) / "held_out.txt").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :args.eval_tokens]
    cfg = base.hmt_config
    generator = torch.Generator().manual_seed(args.seed)
    vocab = base.vocab_size

    # one committed segment and a window with room for the decoded tokens, made once for every precision
    # (states move between them) by the fastest to append
    room = cfg.segment_tokens - args.tokens
    maker = models.get("bf16", base)
    states = histories(maker, [cfg.segment_tokens + 8 + (i * 7) % (room - 8) for i in range(max(streams))], generator)
    document = torch.randint(0, vocab, (args.append_tokens,), generator=generator).tolist()

    bandwidth = copy_bandwidth()
    decode: dict[tuple[str, int], float] = {}
    append: dict[str, float] = {}
    for _ in range(args.reps):
        for p, model in models.items():
            engine_rate(model, states[:1], 4, with_prefill=False)  # warm-up
            for n in streams:
                decode[p, n] = max(decode.get((p, n), 0.0), engine_rate(model, states[:n], args.tokens, False))
            append[p] = max(append.get(p, 0.0), append_rate(model, document))
            print(f"{p}: " + ", ".join(f"{n} streams {decode[p, n]:.1f}" for n in streams) +
                  f" tokens/s; append {append[p]:.0f} tokens/s", flush=True)
    bandwidth = max(bandwidth, copy_bandwidth())

    quality = {p: held_out_quality(model, ids) for p, model in models.items()}
    base_losses, base_top = quality["fp32"]
    base_loss = float(base_losses.mean())
    rows = []
    for p, model in models.items():
        losses, top = quality[p]
        loss = float(losses.mean())
        read = weight_bytes(model)
        achieved = read * decode[p, streams[0]]
        rows.append([p, *(f"{decode[p, n]:.1f} ({decode[p, n] / decode['fp32', n]:.2f}x)" for n in streams),
                     f"{append[p]:.0f} ({append[p] / append['fp32']:.2f}x)", fmt_bytes(read),
                     f"{achieved / 1e9:.1f} ({achieved / bandwidth:.0%})", f"{math.exp(loss):.3f}",
                     f"{(math.exp(loss) / math.exp(base_loss) - 1) * 100:+.2f}%",
                     f"{float((top == base_top).float().mean()):.1%}"])
    print(f"\n{args.model}, {torch.get_num_threads()} threads; decode {args.tokens} tokens per stream (best of "
          f"{args.reps}); append {args.append_tokens} tokens; held-out: first {ids.shape[1]} tokens of "
          f"held_out.txt; memory bandwidth (copy) {bandwidth / 1e9:.1f} GB/s")
    print_table(["precision", *(f"decode {n} stream{'s' if n > 1 else ''} tok/s" for n in streams),
                 "append tok/s", "weights read / token", f"GB/s at {streams[0]} (of copy)", "held-out ppl",
                 "ppl vs fp32", "top-1 = fp32"], rows, title="Precision: speed and quality against fp32")
    segments = [f"{p}: " + " ".join(f"{float(s.mean()):.2f}" for s in quality[p][0].split(cfg.segment_tokens))
                for p in models]
    print("held-out loss by segment (nats):\n  " + "\n  ".join(segments))
    print(f"total time {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
