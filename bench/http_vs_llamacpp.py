"""Through HTTP as a user measures it, against llama.cpp on the same machine in the same run (#29).

1. hmt-serve (`--precision`, default `auto`: the server's own choice) on loopback, embedded Redis.
   For each N in --sessions, N clients at once each create a session (`POST /sessions`) and stream
   `POST /sessions/{id}/generate` over SSE with a --prompt-tokens-token prompt (appended: its
   window commits along the way) and --tokens greedy tokens. Aggregate tokens/s = N x tokens /
   (first request sent -> last token received): prefill, commits, scheduling and SSE included.
2. llama.cpp (bench/llamacpp_peer.py's `PeerRates`, SmolLM2-135M's Q4_1 GGUF): for each N, the
   same prompt length prefilled for N sequences in one batched context, then the same number of
   tokens decoded, one llama_decode per step (prompt + reply, as above); and its decode-only rate.
   Repetitions (--reps, best of) alternate between the two.
3. What the HTTP/SSE layer keeps of the engine at the largest N: steady-state tokens/s received
   over SSE while every stream decodes (bench/batch_decode.py's `http_rate`) against this
   process's engine decoding the same sessions in the same precision, measured back to back
   (--share-reps pairs; #29's target: >= 90%).

    python bench/http_vs_llamacpp.py                       # the chat model, its CPU default precision
    python bench/http_vs_llamacpp.py --precision bf16 --sessions 1,8,32 --reps 2
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from batch_decode import create_sessions, histories, http_rate, stream_generate
from common import ROOT, engine_rate, print_table, setup, start_server
from llamacpp_peer import PeerRates

from hmt_core import PRECISIONS, HMTModel, apply_precision
from hmt_core.precision import default_precision

LIMITS = httpx.Limits(max_connections=200, max_keepalive_connections=200)


async def user_rate(url: str, count: int, prompt_tokens: int, tokens: int, rng: random.Random, vocab: int) -> float:
    """N users at once, each: a new session, then one streamed generate with a prompt. Tokens/s of all."""
    prompts = [[rng.randrange(256, vocab) for _ in range(prompt_tokens)] for _ in range(count)]

    async def user(http: httpx.AsyncClient, prompt: list[int]) -> int:
        session = (await http.post("/sessions", json={})).raise_for_status().json()["id"]
        _, arrivals = await stream_generate(http, session, prompt, tokens)
        return len(arrivals)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=LIMITS) as http:
        start = time.perf_counter()
        received = await asyncio.gather(*(user(http, prompt) for prompt in prompts))
        seconds = time.perf_counter() - start
    if received != [tokens] * count:
        raise SystemExit(f"expected {tokens} tokens per session, got {received}")
    return count * tokens / seconds


async def layer_share(url: str, model: HMTModel, count: int, tokens: int, pairs: int,
                      rng: random.Random) -> list[tuple[float, float]]:
    """(engine decode tokens/s, HTTP/SSE steady-state tokens/s) pairs at `count` sessions, back to back."""
    lists = histories(model, count, rng)
    states = [model.append(model.new_session(), h) for h in lists]
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=LIMITS) as http:
        sessions = await create_sessions(http, lists)
        await http_rate(http, sessions[:1], 2)  # warm the path
        engine_rate(model, states[:1], 2, with_prefill=False)
        for _ in range(pairs):
            engine = engine_rate(model, states, tokens, with_prefill=False)
            out.append((engine, await http_rate(http, sessions, tokens)))
            print(f"share at {count}: engine {engine:.1f}, HTTP/SSE {out[-1][1]:.1f} tokens/s "
                  f"({out[-1][1] / engine:.0%})", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "hmt-smollm2"), help="model directory")
    parser.add_argument("--precision", default="auto", choices=("auto", *PRECISIONS), help="hmt-serve --precision")
    parser.add_argument("--sessions", default="1,8,32", help="concurrent users")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="prompt tokens each user sends")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens each user receives")
    parser.add_argument("--reps", type=int, default=1, help="repetitions, alternating with llama.cpp (best of)")
    parser.add_argument("--share-reps", type=int, default=2, help="engine/HTTP pairs for the layer's share (0: skip)")
    parser.add_argument("--threads", type=int, default=1, help="threads of hmt-serve, this process and llama.cpp")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.device, args.dtype = "cpu", "float32"
    setup(args)
    counts = [int(n) for n in args.sessions.split(",")]
    rng = random.Random(args.seed)
    started = time.perf_counter()
    model = HMTModel.from_pretrained(args.model).eval()
    precision = default_precision(model) if args.precision == "auto" else args.precision
    apply_precision(model, precision)

    peer = PeerRates(counts, context=args.prompt_tokens, new_tokens=args.tokens, threads=args.threads,
                     seed=args.seed)
    http: dict[int, float] = {}
    llama: dict[int, float] = {}
    llama_decode: dict[int, float] = {}
    pairs: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as work:
        process, url = start_server(str(Path(args.model).resolve()), str(Path(work) / "redis"), args.threads,
                                    "--precision", precision, "--max-batch", str(max(32, *counts)))
        try:
            asyncio.run(user_rate(url, 1, args.prompt_tokens, 4, rng, model.vocab_size))  # warm-up
            for _ in range(args.reps):
                for n in counts:
                    rate = asyncio.run(user_rate(url, n, args.prompt_tokens, args.tokens, rng, model.vocab_size))
                    http[n] = max(http.get(n, 0.0), rate)
                    print(f"hmt-serve ({precision}) {n} users: {rate:.1f} tokens/s", flush=True)
                for n, rate in peer.end_to_end_rates().items():
                    llama[n] = max(llama.get(n, 0.0), rate)
                for n, rate in peer.decode_rates().items():
                    llama_decode[n] = max(llama_decode.get(n, 0.0), rate)
                print("llama.cpp: " + ", ".join(f"{n}: {llama[n]:.1f} (decode only {llama_decode[n]:.1f})"
                                                for n in counts) + " tokens/s", flush=True)
            if args.share_reps:
                pairs = asyncio.run(layer_share(url, model, max(counts), args.tokens, args.share_reps, rng))
        finally:
            process.terminate()
            process.wait(timeout=30)
    description = peer.describe()
    peer.close()

    print(f"\n{Path(args.model).name}, hmt-serve --precision {precision} --threads {args.threads}; {description}; "
          f"each user: {args.prompt_tokens}-token prompt, {args.tokens} greedy tokens (best of {args.reps})")
    print_table(["users", "hmt-serve over HTTP tok/s", "llama.cpp prompt + reply tok/s", "HMT / llama.cpp",
                 "llama.cpp decode only tok/s", "HMT / llama.cpp decode only"],
                [[n, f"{http[n]:.1f}", f"{llama[n]:.1f}", f"{http[n] / llama[n]:.2f}x", f"{llama_decode[n]:.1f}",
                  f"{http[n] / llama_decode[n]:.2f}x"] for n in counts],
                title="Users over HTTP against llama.cpp, same machine, same run")
    if pairs:
        shares = [h / e for e, h in pairs]
        print(f"HTTP/SSE keeps {statistics.median(shares):.0%} of the engine's decode rate at {max(counts)} sessions "
              f"(median of {len(pairs)} back-to-back pairs, range {min(shares):.0%}-{max(shares):.0%}; engine "
              f"{statistics.median(e for e, _ in pairs):.1f}, HTTP/SSE {statistics.median(h for _, h in pairs):.1f} "
              f"tokens/s)")
    print(f"total time {time.perf_counter() - started:.0f}s; torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
