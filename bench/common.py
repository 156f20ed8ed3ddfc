"""Shared pieces of the benchmarks: the SmolLM-135M-shaped model, timing and markdown tables.

Weights are random (built from a config, never downloaded): speed and sizes depend on shapes
only. Every benchmark reports ratios against a baseline measured in the same run, because
absolute numbers on a shared, noisy machine mean little.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hmt_core import HMTConfig, HMTModel, SamplingParams, SessionState
from hmt_core.engine import DecodeEngine

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def smollm_config(max_positions: int = 8192) -> LlamaConfig:
    """SmolLM-135M's shape: 30 layers, d=576, 9 query / 3 KV heads (head_dim 64), tied embeddings."""
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=max_positions,
                       tie_word_embeddings=True, rope_theta=10000.0)


def add_common_args(parser: argparse.ArgumentParser, segment_tokens: int = 256, threads: int = 1) -> None:
    """Flags every benchmark shares, so the same script runs on CPU or GPU unchanged."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="backbone dtype")
    parser.add_argument("--segment-tokens", type=int, default=segment_tokens, help="HMT segment length L")
    parser.add_argument("--num-sensory", type=int, default=32, help="HMT sensory tokens k")
    parser.add_argument("--ltm-context", type=int, default=300, help="HMT long-term memory size N")
    parser.add_argument("--seed", type=int, default=0)
    # One thread by default for timing comparisons: on a shared 2-core box, 2 OpenMP threads competing
    # with other processes stall at every barrier (measured: ~0.5 s commits turning into 8-10 s),
    # while 1 thread degrades gently. 0 ("auto") uses the cores the load average leaves idle.
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"torch CPU threads; 0: cores left idle by the 1-minute load average (default {threads})")


def add_cpu_timing_args(parser: argparse.ArgumentParser, what: str) -> None:
    """Flags of the scripts that time the shipped chat model's steps on this CPU, one precision after another."""
    parser.add_argument("--model", default=str(ROOT / "models" / "hmt-smollm2"), help="model directory")
    parser.add_argument("--precisions", default="fp32,bf16,int8", help="comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0: cores left idle")
    parser.add_argument("--wall", action="store_true", help=f"time {what} by the wall clock, not the thread's CPU time")
    parser.add_argument("--seed", type=int, default=0)


def cpu_timing_setup(args: argparse.Namespace) -> Callable[[], float]:
    """`setup` on the CPU; returns the clock to time with. With one torch thread all of a step's work runs in
    the calling thread, so its CPU time leaves out the time slices other jobs on a shared machine take (the
    wall clock counts them)."""
    args.device, args.dtype = "cpu", "float32"
    setup(args)
    return time.perf_counter if args.wall or torch.get_num_threads() > 1 else time.thread_time


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    threads = args.threads
    if threads == 0:
        cores = os.cpu_count() or 1
        threads = max(1, min(cores, cores - round(os.getloadavg()[0])))
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # as hmt-serve does: subnormal floats slow CPU matmuls
    torch.manual_seed(args.seed)
    return torch.device(args.device), DTYPES[args.dtype]


def build_backbone(device: torch.device, dtype: torch.dtype, max_positions: int = 8192) -> Any:
    model = AutoModelForCausalLM.from_config(smollm_config(max_positions))
    return model.to(device=device, dtype=dtype).eval()


def hmt_config(args: argparse.Namespace) -> HMTConfig:
    # recall_dim = d (576): the reference sizes its recall projections to the hidden size.
    return HMTConfig(segment_tokens=args.segment_tokens, num_sensory=args.num_sensory,
                     ltm_context=args.ltm_context, recall_dim=576, sum_fraction=0.5)


def build_hmt(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
              backbone: Any | None = None) -> HMTModel:
    """HMT over a (new or given) random SmolLM-shaped backbone. Positions only need to cover one segment pass."""
    if backbone is None:
        backbone = build_backbone(device, dtype, max(8192, args.segment_tokens + args.num_sensory + 2))
    return HMTModel(backbone, hmt_config(args)).to(device=device, dtype=dtype).eval()


def random_tokens(count: int, generator: torch.Generator, vocab_size: int = 49152) -> list[int]:
    return torch.randint(0, vocab_size, (count,), generator=generator).tolist()


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock times cover it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds one call takes (device work included) and its result."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def engine_rate(model: HMTModel, states: list[SessionState], tokens: int, with_prefill: bool,
                engine: DecodeEngine | None = None) -> float:
    """Aggregate tokens/s of len(states) rows generating `tokens` each in one engine (window
    commits included: a row whose window fills commits and re-prefills, as in real use).
    engine: an idle one to reuse (a compiled engine keeps its compiled forward), else a new one."""
    engine = engine or DecodeEngine(model, max_rows=len(states))
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    for state in states:
        engine.add(state, params)
    seconds = 0.0
    if with_prefill:
        seconds, _ = time_call(engine.admit, model.device)
    else:
        engine.admit()
    produced = 0
    while engine.size:
        elapsed, out = time_call(engine.step, model.device)
        seconds += elapsed
        produced += len(out.tokens)
    return produced / seconds


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    """A GitHub-flavoured markdown table: first column (labels) left-aligned, the rest (numbers) right."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) if i == 0 else v.rjust(w)
                                 for i, (v, w) in enumerate(zip(values, widths, strict=True))) + " |"

    if title:
        print(f"\n### {title}\n")
    print(line(headers))
    print("|" + "|".join(":" + "-" * (w + 1) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    for row in cells:
        print(line(row))
    print(flush=True)


def describe(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> str:
    return (f"SmolLM-135M-shaped Llama (random weights), {str(dtype).removeprefix('torch.')} on {device}, "
            f"{torch.get_num_threads()} threads; HMT L={args.segment_tokens}, k={args.num_sensory}, "
            f"N={args.ltm_context}, recall_dim=576, sum_fraction=0.5")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: str, data_dir: str, threads: int, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """hmt-serve in a subprocess on a free loopback port (embedded Redis in data_dir), once ready."""
    port = free_port()
    command = [sys.executable, "-m", "service.main", "--model", model, "--port", str(port), "--threads", str(threads),
               "--data-dir", data_dir, "--log-level", "warning", "--max-append-tokens", "1000000", *extra]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("hmt-serve did not become ready")
