"""(e) Continuous batching: aggregate decode throughput as concurrent sessions grow, in the engine
and through HTTP/SSE, and time to first token early and late in 32 concurrent chats.

1. Engine: n sessions (histories of varied length) in one `DecodeEngine`; each generates
   `--tokens` tokens (greedy, EOS ignored; rows whose window fills commit and re-prefill, as in
   real use). Aggregate tokens/s over the decode steps (prefill excluded) against n = 1 in the
   same run (n = 1: each of the first --solo-sessions sessions decoded alone, aggregated).
2. HTTP: a live hmt-serve (`--max-batch 64`, embedded Redis) on the same model; n clients stream
   `POST /sessions/{id}/generate` at once. Steady-state decode tokens/s as received over SSE
   (tokens arriving while all n streams decode), against the engine's decode rate measured just
   before it (`--repeats` such pairs; the median ratio): HTTP / engine is what the HTTP,
   scheduler and SSE layers cost. The engine's rate with the prefill of the open windows
   included is printed too.
3. Chats: 32 concurrent chats of turns (a 24-token user message, a 16-token streamed reply),
   started at turn 2 and at turn 200 (a 199-turn history appended first: the same state as having
   had the turns, by the chunking invariance); p50/p99 time to first token of the next turns.

    python bench/batch_decode.py                         # SmolLM2-135M-shaped model, random weights
    python bench/batch_decode.py --model models/hmt-demo --sessions 1,8,32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from common import add_common_args, build_hmt, describe, engine_rate, print_table, setup, start_server
from httpx_sse import aconnect_sse

from hmt_core import HMTModel, SessionState

USER_TOKENS, REPLY_TOKENS = 24, 16


def histories(model: HMTModel, count: int, rng: random.Random) -> list[list[int]]:
    """Varied history lengths: 1 to 3 windows, so rows sit at different positions of their windows."""
    seg = model.hmt_config.segment_tokens
    return [[rng.randrange(model.vocab_size) for _ in range(rng.randrange(seg // 2, 3 * seg))] for _ in range(count)]


def solo_rate(model: HMTModel, states: list[SessionState], tokens: int, with_prefill: bool) -> float:
    """One stream's tokens/s: each session decoded alone in turn, aggregated. Averaging over
    sessions matters: a session whose window fills during the run pays a commit."""
    seconds = [tokens / engine_rate(model, [state], tokens, with_prefill) for state in states]
    return tokens * len(states) / sum(seconds)


async def stream_generate(http: httpx.AsyncClient, session: str, prompt: list[int],
                          tokens: int) -> tuple[float, list[float]]:
    """(seconds to the first token, arrival time of every token) of one streamed generate."""
    body = {"prompt_tokens": prompt or None, "max_tokens": tokens, "ignore_eos": True, "stream": True}
    start, arrivals = time.perf_counter(), []
    async with aconnect_sse(http, "POST", f"/sessions/{session}/generate", json=body) as source:
        source.response.raise_for_status()
        async for event in source.aiter_sse():
            if event.data == "[DONE]":
                break
            if "token" in json.loads(event.data):
                arrivals.append(time.perf_counter())
    return arrivals[0] - start, arrivals


async def create_sessions(http: httpx.AsyncClient, histories_: list[list[int]]) -> list[str]:
    ids = []
    for history in histories_:
        session = (await http.post("/sessions", json={})).json()["id"]
        (await http.post(f"/sessions/{session}/append", json={"tokens": history})).raise_for_status()
        ids.append(session)
    return ids


async def http_rate(http: httpx.AsyncClient, sessions: list[str], tokens: int) -> float:
    """Steady-state decode tokens/s received over SSE: tokens arriving while every stream is
    decoding (after the last stream's first token, before the first stream's last one)."""
    results = await asyncio.gather(*(stream_generate(http, s, [], tokens) for s in sessions))
    begin, end = max(a[0] for _, a in results), min(a[-1] for _, a in results)
    inside = sum(begin < t <= end for _, arrivals in results for t in arrivals)
    return inside / (end - begin)


async def chat_ttft(http: httpx.AsyncClient, sessions: list[str], turns: int, rng: random.Random,
                    vocab: int) -> list[float]:
    """Every chat runs `turns` turns at once with the others; the time to first token of each."""
    async def chat(session: str) -> list[float]:
        firsts = []
        for _ in range(turns):
            message = [rng.randrange(vocab) for _ in range(USER_TOKENS)]
            first, _ = await stream_generate(http, session, message, REPLY_TOKENS)
            firsts.append(first)
        return firsts

    return [t for firsts in await asyncio.gather(*(chat(s) for s in sessions)) for t in firsts]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def http_part(url: str, model: HMTModel, counts: list[int], args: argparse.Namespace, rng: random.Random,
                    history_lists: list[list[int]], states: list[SessionState],
                    ) -> tuple[dict[int, list[tuple[float, float]]], dict[str, list[float]]]:
    """Per session count, `--repeats` pairs of (engine decode rate, HTTP rate), measured one right
    after the other so that both sides of each ratio see the same machine (run-to-run noise on
    this shared box is as large as the HTTP layer's cost); then the chats' first tokens."""
    pairs: dict[int, list[tuple[float, float]]] = {}
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        for n in counts:
            sessions = await create_sessions(http, history_lists[:n])  # the engine's sessions
            await http_rate(http, sessions[:1], 2)  # warm the path
            pairs[n] = []
            for _ in range(args.repeats):
                engine = decode_rate(model, states, n, args, with_prefill=False)
                pairs[n].append((engine, await http_rate(http, sessions, args.tokens)))
                print(f"http   {n:3d} sessions: {pairs[n][-1][1]:8.1f} tokens/s, engine {engine:8.1f}: "
                      f"{pairs[n][-1][1] / engine:.0%}", flush=True)
        ttft: dict[str, list[float]] = {}
        chats = args.chats
        per_turn = USER_TOKENS + REPLY_TOKENS
        for label, history_turns in (("turn 2", 1), ("turn 200", 199)) if chats else ():
            sessions = await create_sessions(http, [[rng.randrange(model.vocab_size)
                                                     for _ in range(history_turns * per_turn)]
                                                    for _ in range(chats)])
            ttft[label] = await chat_ttft(http, sessions, args.chat_turns, rng, model.vocab_size)
            print(f"chats  {label}: p50 {percentile(ttft[label], 50) * 1000:.0f} ms, "
                  f"p99 {percentile(ttft[label], 99) * 1000:.0f} ms", flush=True)
    return pairs, ttft


def decode_rate(model: HMTModel, states: list[SessionState], n: int, args: argparse.Namespace,
                with_prefill: bool) -> float:
    """The engine's aggregate rate at n sessions (n = 1: the first --solo-sessions decoded alone)."""
    if n == 1:
        return solo_rate(model, states[:args.solo_sessions], args.tokens, with_prefill)
    return engine_rate(model, states[:n], args.tokens, with_prefill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, threads=2)
    parser.add_argument("--model", default=None, help="a model directory (default: SmolLM2-135M-shaped, random)")
    parser.add_argument("--sessions", default="1,2,4,8,16,32,64", help="concurrent session counts")
    parser.add_argument("--tokens", type=int, default=48, help="tokens each session generates")
    parser.add_argument("--chats", type=int, default=32, help="concurrent chats for the first-token part (0: skip it)")
    parser.add_argument("--chat-turns", type=int, default=4, help="measured turns per chat")
    parser.add_argument("--solo-sessions", type=int, default=8,
                        help="the 1-session engine rate averages this many sessions decoded alone")
    parser.add_argument("--repeats", type=int, default=3,
                        help="engine/HTTP pairs per session count, each pair measured back to back")
    parser.add_argument("--no-http", action="store_true", help="engine only")
    args = parser.parse_args()
    device, dtype = setup(args)
    counts = [int(n) for n in args.sessions.split(",")]
    rng = random.Random(args.seed)
    if args.model:
        model = HMTModel.from_pretrained(args.model, dtype=dtype, device=device).eval()
        title = f"{Path(args.model).name} ({str(dtype).removeprefix('torch.')} on {device}, " \
                f"{torch.get_num_threads()} threads; L={model.hmt_config.segment_tokens})"
    else:
        model = build_hmt(args, device, dtype)
        title = describe(args, device, dtype)
    print(title, flush=True)

    history_lists = histories(model, max(counts), rng)
    all_states = [model.append(model.new_session(), h) for h in history_lists]
    decode, end_to_end = {}, {}
    engine_rate(model, all_states[:1], 4, with_prefill=False)  # warm-up
    for n in counts:
        decode[n] = decode_rate(model, all_states, n, args, with_prefill=False)
        end_to_end[n] = decode_rate(model, all_states, n, args, with_prefill=True)
        print(f"engine {n:3d} sessions: {decode[n]:8.1f} tokens/s decode, {end_to_end[n]:8.1f} with prefill",
              flush=True)

    pairs: dict[int, list[tuple[float, float]]] = {}
    ttft: dict[str, list[float]] = {}
    if not args.no_http:
        with tempfile.TemporaryDirectory() as work:
            model_dir = str(Path(args.model).resolve()) if args.model else None
            if model_dir is None:
                model_dir = str(Path(work) / "model")
                model.save_pretrained(model_dir)
            process, url = start_server(model_dir, str(Path(work) / "redis"), args.threads, "--max-batch",
                                        str(max(64, max(counts))), "--device", str(device), "--dtype", args.dtype)
            try:
                pairs, ttft = asyncio.run(http_part(url, model, counts, args, rng, history_lists, all_states))
            finally:
                process.terminate()
                process.wait(timeout=30)

    print(f"\n{title}; {args.tokens} tokens per session, greedy\n")
    headers = ["sessions", "engine decode tok/s", "x 1 session", "engine incl. prefill tok/s"]
    if pairs:
        headers += ["HTTP/SSE tok/s", "x 1 session", f"HTTP / engine (median of {args.repeats} pairs)",
                    "pairs' range"]
    rows = []
    for n in counts:
        row = [n, f"{decode[n]:.1f}", f"{decode[n] / decode[counts[0]]:.2f}x", f"{end_to_end[n]:.1f}"]
        if pairs:
            ratios = [h / e for e, h in pairs[n]]
            http_n, http_1 = (statistics.median(h for _, h in pairs[k]) for k in (n, counts[0]))
            row += [f"{http_n:.1f}", f"{http_n / http_1:.2f}x", f"{statistics.median(ratios):.0%}",
                    f"{min(ratios):.0%}-{max(ratios):.0%}"]
        rows.append(row)
    print_table(headers, rows)
    if ttft:
        print_table(["chat turn", "p50 first token ms", "p99 first token ms", "samples"],
                    [[label, f"{percentile(v, 50) * 1000:.0f}", f"{percentile(v, 99) * 1000:.0f}", len(v)]
                     for label, v in ttft.items()],
                    title=f"{args.chats} concurrent chats: time to first token")
        late, early = percentile(ttft["turn 200"], 99), percentile(ttft["turn 2"], 99)
        print(f"p99 turn 200 / turn 2: {late / early:.2f}x")


if __name__ == "__main__":
    main()
