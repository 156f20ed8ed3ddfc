"""Precision as a serving choice: speed and quality of fp32, bf16, int8 and int4 weights, in one run.

For each precision (`HMTModel.from_pretrained(..., precision=...)`, the same states for all of
them, since a state moves between precisions):
- engine decode tokens/s at 1, 8 and 32 streams (`--streams`; prefill excluded, windows with room
  so no commit happens), and append tokens/s (one session reading `--append-tokens` tokens: its
  window commits), each as a ratio against fp32 measured in the same run;
- llama.cpp (bench/llamacpp_peer.py's `PeerRates`: SmolLM2-135M's Q4_1 GGUF, one batched
  llama_decode per step, 256-token prompts, as many threads as torch here) decoding the same
  number of tokens at the same stream counts in the same run, and each precision's rate as a
  ratio of it (skipped, saying so, when llama-cpp-python is not installed; `--no-llamacpp`);
- with `--compiled`, each precision again through the engine's compiled decode step
  (`DecodeEngine(model, compile=True)`), its compile time (the first call) reported: opt-in,
  compiling takes minutes on this CPU;
- weight bytes one decode step reads, and at one stream the GB/s of those reads against the
  machine's memory bandwidth measured in the same run (a large tensor copy: read + write);
- quality, from `hmt eval precision`'s own function (hmt_lab.precision_eval.precision_quality):
  held-out perplexity by position over the first `--eval-tokens` tokens of the model's
  held_out.txt and top-1 agreement with fp32, pass-key digit loss at `--distances` segments
  (`--trials` keys each, the same for every precision), and greedy agreement of `--chats` short
  held-out chats with fp32's replies.
Repetitions are interleaved across precisions and llama.cpp (`--reps`, the best of them), so a
slow patch of the shared machine does not favour one of them.

    python bench/precision.py                         # the shipped chat model
    python bench/precision.py --streams 1,8,32 --reps 2
    python bench/precision.py --precisions fp32,int8 --compiled
    python bench/precision.py --profile int8           # where one stream's decode step goes, by op
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from common import ROOT, engine_rate, fmt_bytes, print_table, setup
from llamacpp_peer import PeerRates, llama_cpp

from hmt_core import PRECISIONS, HMTModel, SamplingParams, SessionState
from hmt_core.engine import DecodeEngine, advance_appends, begin_append
from hmt_core.precision import precision_of, weight_bytes
from hmt_lab.precision_eval import held_out_ids, precision_models, precision_quality


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


def compiled_engines(model: HMTModel, states: list[SessionState],
                     streams: list[int]) -> tuple[dict[int, DecodeEngine], float]:
    """One compiled engine per stream count (each compiles once, on its first forward), and the
    seconds those first calls took (compiling, mostly)."""
    engines, started = {}, time.perf_counter()
    for n in streams:
        engines[n] = DecodeEngine(model, max_rows=n, compile=True)
        engine_rate(model, states[:n], 2, False, engines[n])
    return engines, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "hmt-smollm2"), help="model directory")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated; fp32 is the baseline")
    parser.add_argument("--streams", default="1,8,32", help="comma-separated decode batch sizes")
    parser.add_argument("--tokens", type=int, default=16, help="tokens decoded per stream")
    parser.add_argument("--append-tokens", type=int, default=1024, help="tokens one session appends")
    parser.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens scored")
    parser.add_argument("--distances", default="1,8,32", help="pass-key distances in segments ('' to skip)")
    parser.add_argument("--trials", type=int, default=2, help="pass keys per distance")
    parser.add_argument("--chats", type=int, default=6, help="short held-out chats answered greedily")
    parser.add_argument("--chat-tokens", type=int, default=32, help="greedy tokens per chat reply")
    parser.add_argument("--reps", type=int, default=1, help="interleaved repetitions of the speed measures")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0: cores left idle")
    parser.add_argument("--llamacpp", action=argparse.BooleanOptionalAction, default=llama_cpp is not None,
                        help="llama.cpp at the same stream counts in the same run (default: when installed)")
    parser.add_argument("--llamacpp-threads", type=int, default=None, help="llama.cpp threads (default: --threads)")
    parser.add_argument("--compiled", action="store_true", help="add each precision's compiled decode step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", choices=PRECISIONS, help="only profile one stream decoding in this precision")
    args = parser.parse_args()
    args.device, args.dtype = "cpu", "float32"
    precisions = args.precisions.split(",")
    if precisions[0] != "fp32":
        parser.error("--precisions must start with fp32, the baseline")
    streams = [int(s) for s in args.streams.split(",")]
    distances = [int(d) for d in args.distances.split(",") if d]
    setup(args)
    started = time.perf_counter()

    if args.profile:
        model = HMTModel.from_pretrained(args.model, precision=args.profile)
        generator = torch.Generator().manual_seed(args.seed)
        profile_step(model, histories(model, [model.hmt_config.segment_tokens + 40], generator)[0])
        return
    base = HMTModel.from_pretrained(args.model).eval()
    models = precision_models(base, precisions)
    assert len({m.fingerprint for m in models.values()}) == 1, "every precision keeps the model's identity"
    ids = held_out_ids(base, (Path(args.model) / "held_out.txt").read_text(), args.eval_tokens)
    cfg = base.hmt_config
    if args.append_tokens <= cfg.segment_tokens:  # a window that never fills never commits: nothing timed
        parser.error(f"--append-tokens must exceed the model's {cfg.segment_tokens}-token segments")
    generator = torch.Generator().manual_seed(args.seed)
    vocab = base.vocab_size

    # one committed segment and a window with room for the decoded tokens, made once for every precision
    # (states move between them) by the fastest to append
    room = cfg.segment_tokens - args.tokens
    maker = models.get("bf16", base)
    states = histories(maker, [cfg.segment_tokens + 8 + (i * 7) % (room - 8) for i in range(max(streams))], generator)
    document = torch.randint(0, vocab, (args.append_tokens,), generator=generator).tolist()

    peer = None
    if args.llamacpp:
        peer = PeerRates(streams, context=256, new_tokens=args.tokens,
                         threads=args.llamacpp_threads or torch.get_num_threads(), seed=args.seed)
    elif llama_cpp is None:
        print("llama.cpp: not in this run (llama-cpp-python is not installed; see bench/llamacpp_peer.py)")
    compiled: dict[str, dict[int, DecodeEngine]] = {}
    compile_seconds: dict[str, float] = {}
    for p, model in models.items() if args.compiled else ():
        compiled[p], compile_seconds[p] = compiled_engines(model, states, streams)
        print(f"{p} compiled: {compile_seconds[p]:.0f}s to compile ({len(streams)} engines)", flush=True)

    bandwidth = copy_bandwidth()
    decode: dict[tuple[str, int], float] = {}
    append: dict[str, float] = {}
    peer_decode: dict[int, float] = {}
    for _ in range(args.reps):
        for p, model in models.items():
            engine_rate(model, states[:1], 4, with_prefill=False)  # warm-up
            for n in streams:
                decode[p, n] = max(decode.get((p, n), 0.0), engine_rate(model, states[:n], args.tokens, False))
            append[p] = max(append.get(p, 0.0), append_rate(model, document))
            print(f"{p}: " + ", ".join(f"{n} streams {decode[p, n]:.1f}" for n in streams) +
                  f" tokens/s; append {append[p]:.0f} tokens/s", flush=True)
            if p in compiled:
                label = f"{p} compiled"
                for n in streams:
                    rate = engine_rate(model, states[:n], args.tokens, False, compiled[p][n])
                    decode[label, n] = max(decode.get((label, n), 0.0), rate)
                print(f"{label}: " + ", ".join(f"{n} streams {decode[label, n]:.1f}" for n in streams) + " tokens/s",
                      flush=True)
        if peer is not None:
            peer_decode = {n: max(peer_decode.get(n, 0.0), r) for n, r in peer.decode_rates().items()}
            print("llama.cpp: " + ", ".join(f"{n} streams {r:.1f}" for n, r in peer_decode.items()) + " tokens/s",
                  flush=True)
    bandwidth = max(bandwidth, copy_bandwidth())
    if peer is not None:
        peer.close()
    speed_seconds = time.perf_counter() - started

    quality = precision_quality(models, ids, distances, args.trials, args.chats, args.chat_tokens, args.seed)
    rows = []
    for p, model in models.items():
        read = weight_bytes(model)
        achieved = read * decode[p, streams[0]]
        rows.append([p, *(f"{decode[p, n]:.1f} ({decode[p, n] / decode['fp32', n]:.2f}x)" for n in streams),
                     f"{append[p]:.0f} ({append[p] / append['fp32']:.2f}x)", fmt_bytes(read),
                     f"{achieved / 1e9:.1f} ({achieved / bandwidth:.0%})"])
        if p in compiled:
            label = f"{p} compiled"
            rows.append([label, *(f"{decode[label, n]:.1f} ({decode[label, n] / decode['fp32', n]:.2f}x)"
                                  for n in streams), f"- (compile {compile_seconds[p]:.0f}s)", "", ""])
    print(f"\n{args.model}, {torch.get_num_threads()} threads; decode {args.tokens} tokens per stream (best of "
          f"{args.reps}); append {args.append_tokens} tokens; memory bandwidth (copy) {bandwidth / 1e9:.1f} GB/s; "
          f"speed part {speed_seconds:.0f}s")
    print_table(["precision", *(f"decode {n} stream{'s' if n > 1 else ''} tok/s (vs fp32)" for n in streams),
                 "append tok/s", "weights read / token", f"GB/s at {streams[0]} (of copy)"], rows,
                title="Speed against fp32")
    if peer_decode:
        labels = [label for label in dict.fromkeys(label for label, _ in decode)]
        peer_rows = [["llama.cpp (Q4_1)", *(f"{peer_decode[n]:.1f}" for n in streams)]]
        peer_rows += [[label, *(f"{decode[label, n] / peer_decode[n]:.2f}x" for n in streams)] for label in labels]
        print(peer.describe() if peer else "")
        print_table(["", *(f"{n} stream{'s' if n > 1 else ''}" for n in streams)], peer_rows,
                    title="Against llama.cpp in the same run (tokens/s, then HMT / llama.cpp)")
    print(f"### Quality against fp32\n\n{quality.table()}")
    print(f"total time {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
