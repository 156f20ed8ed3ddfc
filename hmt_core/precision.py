"""Precision as a serving choice: the backbone's weights in fp32, bf16, int8 or int4, applied at load.

What changes is the backbone only: its linear layers and the (tied) embedding / LM head. The HMT
weights (summary prompt, initial memory, recall projections), the recall arithmetic and the
session state stay float32, and `HMTModel.fingerprint` is that of the unconverted weights, so a
state made on an fp32 replica resumes on an int8 one and back.

- bf16: the whole backbone in bfloat16 (oneDNN's AVX512-BF16 matmuls on CPUs that have them).
- int8: weight-only, symmetric per output channel; matmuls by PyTorch's packed CPU kernel
  `aten._weight_int8pack_mm` (bf16 activations) for few rows, and for many rows (prefills,
  commits) the weight dequantized to bf16 and oneDNN's matmul, which is faster there.
- int4: weight-only, asymmetric per group of 32 input channels (as llama.cpp's Q4_1); matmuls
  by `aten._weight_int4pack_mm_for_cpu` at every row count. Layers the kernel cannot take
  (output channels not a multiple of 16, input channels not a multiple of 32) stay int8, and so
  does the LM head, as llama.cpp keeps its output matrix above 4 bits (an int4 head cost the
  chat model 6 more points of top-1 agreement with fp32 on held-out text). A model's trained
  low-rank changes to its backbone (`backbone_deltas`) are kept beside the 4-bit weights in bf16,
  not rounded with them: they are smaller than a 4-bit step, and rounding them away turned the
  chat model back into, roughly, its untrained backbone (README, "Precision against fp32").
- The quantized embedding lookup reads per-row int8 weights (the int8 LM head's own, when tied).

Why these kernels and not torchao: measured on this machine's CPU (README, "Precision"):
torchao 0.18's int8 weight-only runs eager at 0.45x fp32 for one row, and its int4 formats need
CUDA; PyTorch's own kernels run the same layers at 3.8x (int8) and 6.3x (int4) fp32 for one row.
The quantized kernels run on the CPU only; on a GPU use bf16.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, cast, get_args

import torch
from torch import Tensor, nn
from torch.nn import functional

from hmt_core.errors import InvalidInputError
from hmt_core.model import HMTModel, fingerprint_sample

Precision = Literal["fp32", "bf16", "int8", "int4"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
COMPUTE_DTYPE = torch.bfloat16  # activations of a quantized backbone: the packed kernels' fast path
INT8_KERNEL_MAX_ROWS = 32  # decode batches up to hmt-serve's default --max-batch; above it (prefills,
# commits: hundreds of rows) dequantizing + oneDNN's bf16 matmul beats the kernel (2-5x at 64-290 rows)
INT4_GROUP_SIZE = 32  # the CPU kernel takes 32..256; with 64 the chat model's top-1 agreement with fp32 fell 71% -> 60%


CPU_DEFAULT: Precision = "int8"  # the fastest whose quality holds on this project's CPU (README, "Precision")


def default_precision(model: HMTModel) -> Precision:
    """What `hmt-serve --precision auto` serves the model in: int8 on a CPU (fp32 for memory whose
    adapters train through the backbone), bf16 on a GPU."""
    if model.device.type != "cpu":
        return "bf16"
    return "fp32" if model.memory.adapts else CPU_DEFAULT


def check_precision(precision: str) -> Precision:
    if precision not in PRECISIONS:
        raise InvalidInputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return cast(Precision, precision)


def precision_of(model: HMTModel) -> Precision:
    """The precision the model's backbone runs in (as `apply_precision` left it)."""
    found = getattr(model.backbone, "hmt_precision", None)
    if found is not None:
        return cast(Precision, found)
    return "bf16" if model.dtype == torch.bfloat16 else "fp32"


# ----- quantized modules ---------------------------------------------------------------------------


class QuantizedModule(nn.Module):
    """A layer whose weight was replaced by a packed form; keeps what the fingerprint hashed of it."""

    def __init__(self, weight: Tensor | None) -> None:
        """weight: the one replaced; None for a layer made from others (`joined_linear`), never in a model."""
        super().__init__()
        # {parameter name: (shape, fingerprint sample)} of the weight this module replaced
        self.replaced = {} if weight is None else {"weight": (tuple(weight.shape), fingerprint_sample(weight))}


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: (q [N, K] int8, scales [N] float32) with weight ~ q * scales[:, None]."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


class Int8Linear(QuantizedModule):
    qweight: Tensor  # [N, K] int8
    scales: Tensor  # [N]
    bias: Tensor | None

    def __init__(self, weight: Tensor | None, bias: Tensor | None,
                 quantized: tuple[Tensor, Tensor] | None = None) -> None:
        super().__init__(weight)
        if quantized is None:
            assert weight is not None, "an int8 layer is made from a weight or from its quantized form"
            quantized = quantize_int8(weight)
        q, scales = quantized
        self.out_features, self.in_features = q.shape
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE))
        self.register_buffer("bias", None if bias is None else bias.detach().to(COMPUTE_DTYPE))
        # the bf16 kernel gives wrong sums unless K is a multiple of 16 (torch 2.13, measured)
        self.kernel = self.in_features % 16 == 0

    def forward(self, x: Tensor) -> Tensor:
        # no op that changes nothing (the lean decode step calls this with [rows, K] bf16 rows)
        x = x if x.dtype == COMPUTE_DTYPE else x.to(COMPUTE_DTYPE)
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self.kernel and rows.shape[0] <= INT8_KERNEL_MAX_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(rows if rows.is_contiguous() else rows.contiguous(),
                                                     self.qweight, self.scales)
            out = out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias
        return functional.linear(x, self.qweight.to(COMPUTE_DTYPE) * self.scales[:, None], self.bias)


def int4_group_size(out_features: int, in_features: int) -> int | None:
    """The group size the CPU int4 kernel takes for this shape, or None if it takes none."""
    return INT4_GROUP_SIZE if out_features % 16 == 0 and in_features % INT4_GROUP_SIZE == 0 else None


class Int4Linear(QuantizedModule):
    """Asymmetric int4 per group: w ~ (q - 8) * scale + zero, q in 0..15 (the kernel's convention)."""

    packed: Tensor  # the CPU kernel's layout of the [N, K] 4-bit values
    scales_and_zeros: Tensor  # [K / group, N, 2]
    bias: Tensor | None
    lora_a: Tensor | None  # [r, K]: low-rank changes kept beside the 4-bit weights (see _quantize)
    lora_b: Tensor | None  # [N, r]

    def __init__(self, weight: Tensor, bias: Tensor | None, group_size: int,
                 low_rank: tuple[Tensor, Tensor] | None = None) -> None:
        """low_rank (A [r, K], B [N, r]): weight = base + B @ A; base is quantized, B @ A kept in bf16."""
        super().__init__(weight)
        w = weight.detach().float()
        if low_rank is not None:
            w = w - low_rank[1].float() @ low_rank[0].float()
        self.out_features, self.in_features = w.shape
        self.group_size = group_size
        groups = w.reshape(self.out_features, -1, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scales = ((high - low) / 15).clamp(min=1e-12)
        q = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(w.shape), 2)
        scales_and_zeros = torch.stack([scales, low + 8 * scales], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(COMPUTE_DTYPE))  # [K / g, N, 2]
        self.register_buffer("bias", None if bias is None else bias.detach().to(COMPUTE_DTYPE))
        self.register_buffer("lora_a", None if low_rank is None else low_rank[0].detach().to(COMPUTE_DTYPE))
        self.register_buffer("lora_b", None if low_rank is None else low_rank[1].detach().to(COMPUTE_DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(COMPUTE_DTYPE)
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size, self.scales_and_zeros)
        if self.lora_a is not None and self.lora_b is not None:
            out = out + (rows @ self.lora_a.t()) @ self.lora_b.t()
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


class Int8Embedding(QuantizedModule):
    """A lookup of per-row int8 weights (shared with the int8 LM head when the two are tied)."""

    qweight: Tensor  # [V, d] int8
    scales: Tensor  # [V]

    def __init__(self, embedding: nn.Embedding, quantized: tuple[Tensor, Tensor] | None = None) -> None:
        super().__init__(embedding.weight)
        q, scales = quantized if quantized is not None else quantize_int8(embedding.weight)
        self.num_embeddings, self.embedding_dim = q.shape
        self.padding_idx = embedding.padding_idx
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE))
        # what the embedding's own forward multiplies in (Gemma-style scaled embeddings), else 1
        self.embed_scale = getattr(embedding, "embed_scale", None)

    @property
    def compute_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPE

    def forward(self, ids: Tensor) -> Tensor:
        rows = functional.embedding(ids, self.qweight).to(COMPUTE_DTYPE)
        out = rows * functional.embedding(ids, self.scales[:, None])
        return out if self.embed_scale is None else out * self.embed_scale.to(COMPUTE_DTYPE)


def joined_linear(layers: Sequence[nn.Module]) -> nn.Module | None:
    """One layer computing several that read the same input (q, k and v; gate and up), their outputs
    side by side: one matmul instead of several. A copy of their weights (so a step reads each once,
    from one place); None when they cannot be joined (int4's packed layout is blocked, not by row;
    layers of different kinds)."""
    def cat(tensors: Sequence[Tensor | None]) -> Tensor | None:  # None: the layers have no biases
        return None if tensors[0] is None else torch.cat([cast(Tensor, t).detach() for t in tensors])

    if all(type(layer) is nn.Linear for layer in layers):
        linears = cast("list[nn.Linear]", list(layers))
        if any((layer.bias is None) != (linears[0].bias is None) for layer in linears):
            return None
        weight = cast(Tensor, cat([layer.weight for layer in linears]))
        joined = nn.Linear(weight.shape[1], weight.shape[0], bias=linears[0].bias is not None, device="meta")
        joined.weight = nn.Parameter(weight, requires_grad=False)
        bias = cat([layer.bias for layer in linears])
        if bias is not None:
            joined.bias = nn.Parameter(bias, requires_grad=False)
        return joined
    if all(type(layer) is Int8Linear for layer in layers):
        int8 = cast("list[Int8Linear]", list(layers))
        if any(layer.kernel != int8[0].kernel or (layer.bias is None) != (int8[0].bias is None) for layer in int8):
            return None
        q = cast(Tensor, cat([layer.qweight for layer in int8]))
        scales = cast(Tensor, cat([layer.scales for layer in int8]))
        return Int8Linear(None, cat([layer.bias for layer in int8]), (q, scales))  # scales stay bf16: exact
    return None


# ----- conversion ----------------------------------------------------------------------------------


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _quantized_linear(linear: nn.Linear, precision: Precision,
                      low_rank: tuple[Tensor, Tensor] | None) -> QuantizedModule:
    group = int4_group_size(linear.out_features, linear.in_features) if precision == "int4" else None
    if group is not None:
        return Int4Linear(linear.weight, linear.bias, group, low_rank)
    return Int8Linear(linear.weight, linear.bias)


def _low_rank_changes(model: HMTModel) -> dict[str, tuple[Tensor, Tensor]]:
    """The model's trained changes to its backbone (model.backbone_deltas: every round's A and B per
    module, already in the weights), joined per module: A [sum r, K], B [N, sum r]."""
    joined: dict[str, tuple[Tensor, Tensor]] = {}
    for deltas in model.backbone_deltas:
        for name, (a, b) in deltas.items():
            if name in joined:
                a, b = torch.cat([joined[name][0], a.float()]), torch.cat([joined[name][1], b.float()], dim=1)
            joined[name] = (a.float(), b.float())
    return joined


def apply_precision(model: HMTModel, precision: str) -> HMTModel:
    """Convert the model's backbone to `precision` in place (see the module's doc); returns the model.

    fp32 and bf16 can be applied again either way; int8 and int4 replace the backbone's layers,
    so a quantized model is converted no further (load it again for another precision)."""
    chosen = check_precision(precision)
    current = precision_of(model)
    if current == chosen:
        return model
    if current in ("int8", "int4"):
        raise InvalidInputError(f"the model is already {current}: load it again to serve it in {chosen}")
    if chosen in ("int8", "int4"):
        if model.device.type != "cpu":
            raise InvalidInputError(f"{chosen} weights run on the CPU only (PyTorch's packed CPU kernels); "
                                    f"on {model.device.type} use bf16")
        if model.memory.adapts:
            raise InvalidInputError(f"{model.hmt_config.memory} memory trains its adapters through the backbone: "
                                    f"serve it in fp32 or bf16, not {chosen}")
    model.fingerprint  # noqa: B018 -- computed (and kept) from the weights before they change
    backbone = cast(nn.Module, model.backbone)
    if chosen == "fp32":
        backbone.float()
        return model
    if chosen in ("int8", "int4"):
        # int4 keeps the model's trained low-rank changes beside the 4-bit weights: they are smaller
        # than a 4-bit step, and rounding them with the rest undid most of them (README, "Precision")
        changes = _low_rank_changes(model) if chosen == "int4" else {}
        _quantize(backbone, chosen, changes)  # from the weights as loaded, not from a bf16 rounding of them
    backbone.to(torch.bfloat16)  # int8/int4: the norms and anything not quantized run in bf16
    if chosen == "bf16":
        return model
    setattr(backbone, "hmt_precision", chosen)  # noqa: B010 -- a plain attribute on a transformers model
    return model


def _quantize(backbone: nn.Module, precision: Precision, low_rank: dict[str, tuple[Tensor, Tensor]]) -> None:
    embedding = cast(Callable[[], nn.Module], backbone.get_input_embeddings)()
    head = cast(Callable[[], nn.Module | None], backbone.get_output_embeddings)()
    if not isinstance(embedding, nn.Embedding):
        raise InvalidInputError(f"{type(embedding).__name__} input embeddings cannot be quantized")
    embedding_name = next(n for n, m in backbone.named_modules() if m is embedding)
    head_name = next((n for n, m in backbone.named_modules() if m is head), None)
    tied = isinstance(head, nn.Linear) and head.weight is embedding.weight
    with torch.no_grad():
        for name, module in list(backbone.named_modules()):
            if isinstance(module, nn.Linear) and module is not head:
                _replace(backbone, name, _quantized_linear(module, precision, low_rank.get(name)))
        shared = quantize_int8(embedding.weight)
        if isinstance(head, nn.Linear) and head_name is not None:  # a head of another kind stays bf16
            _replace(backbone, head_name, Int8Linear(head.weight, head.bias, shared if tied else None))
        _replace(backbone, embedding_name, Int8Embedding(embedding, shared))


def stored_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer (packed weights and scales included), shared ones once."""
    tensors = {t.data_ptr(): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def weight_bytes(model: HMTModel) -> int:
    """Bytes of backbone weights one decode step reads: all of them but the input embedding table, of
    which a step reads one row (a tied LM head is counted as the head)."""
    embedding = model.backbone.get_input_embeddings()
    seen: set[int] = set()
    total = 0
    for module in model.backbone.modules():
        if module is embedding:
            continue
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            if tensor.dtype == torch.int64 or tensor.data_ptr() in seen:  # int64: position ids, not weights
                continue
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total
