"""Which int8/int4 matmuls to serve with: the linear layers of one SmolLM2-135M decode step (30
layers x q, k, v, o, gate, up, down, and the 49152 x 576 LM head), timed alone, per implementation.

- fp32 and bf16: `F.linear` (oneDNN);
- aten int8 / int4: hmt_core.precision's layers (PyTorch's packed CPU kernels
  `_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`; bf16 activations);
- torchao int8 / int4 weight-only (`quantize_`), when torchao is installed: `pip install torchao`.
Rows are the decode batch (1, 8, 32 streams); best of --reps interleaved runs, ratio against fp32.

    python bench/precision_kernels.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from common import print_table
from torch import nn

from hmt_core.precision import Int4Linear, Int8Linear

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (out, in)


def layers(layer_count: int) -> nn.ModuleList:
    stack = [nn.Linear(k, n, bias=False) for _ in range(layer_count) for n, k in SHAPES]
    return nn.ModuleList([*stack, nn.Linear(576, 49152, bias=False)])


def torchao_variants(base: nn.ModuleList) -> dict[str, nn.ModuleList]:
    try:
        import torchao.quantization as quantization
    except ImportError:
        return {}
    found = {}
    for name, config in (("torchao int8", lambda: quantization.Int8WeightOnlyConfig()),
                         ("torchao int4", lambda: quantization.Int4WeightOnlyConfig(group_size=32))):
        stack = layers(len(base) // len(SHAPES)).bfloat16()
        stack.load_state_dict(base.state_dict())
        try:
            quantization.quantize_(stack, config())
            stack[0](torch.randn(1, 576, dtype=torch.bfloat16))
            found[name] = stack
        except Exception as exc:  # a format without a CPU kernel in this torchao
            print(f"{name}: not available on this CPU ({str(exc).splitlines()[0][:100]})")
    return found


def run_once(stack: nn.ModuleList, rows: int, dtype: torch.dtype) -> float:
    inputs = {k: torch.randn(rows, k, dtype=dtype) for k in (576, 1536)}
    call: Callable[[nn.Module], torch.Tensor] = lambda m: m(inputs[m.in_features])  # noqa: E731
    for module in stack:
        call(module)
    start = time.perf_counter()
    for module in stack:
        call(module)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,32", help="comma-separated rows (decode streams)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = layers(30)
    bf16 = layers(30).bfloat16()
    bf16.load_state_dict(base.state_dict())
    variants = {"fp32": base, "bf16": bf16,
                "aten int8": nn.ModuleList([Int8Linear(m.weight, None) for m in base]),
                "aten int4": nn.ModuleList([Int4Linear(m.weight, None, 32) for m in base]),
                **torchao_variants(base)}
    table = []
    with torch.no_grad():
        best = {(name, rows): float("inf") for name in variants for rows in map(int, args.rows.split(","))}
        for _ in range(args.reps):
            for name, stack in variants.items():
                for rows in map(int, args.rows.split(",")):
                    dtype = torch.float32 if name == "fp32" else torch.bfloat16
                    best[name, rows] = min(best[name, rows], run_once(stack, rows, dtype))
    counts = list(map(int, args.rows.split(",")))
    for name in variants:
        table.append([name, *(f"{best[name, n] * 1e3:.1f} ({best['fp32', n] / best[name, n]:.2f}x)" for n in counts)])
    print_table(["matmuls", *(f"{n} row{'s' if n > 1 else ''}: ms (vs fp32)" for n in counts)], table,
                title=f"The linear layers of one SmolLM2-135M decode step, {args.threads} thread(s), "
                      f"best of {args.reps}")


if __name__ == "__main__":
    main()
