"""A lean decode step for Llama-family backbones: the backbone's per-token forward as a few plain
functions over the engine's static slot cache, in the gpt-fast style.

Why: the HuggingFace forward costs about 240 aten op calls per layer for one decode token
(SmolLM2-135M: 7,149 per step), and on a CPU the Python and dispatch around them took 20-27 ms of
each step, as much as the int8 matmuls themselves (README, "The decode step"). Here one layer is
RMSNorm, one q/k/v matmul (the three joined, `precision.joined_linear`), rotary embedding from
cos/sin tables indexed by position, the new k/v written into the slot cache, attention over the
slot's columns in use (the engine's `decode_attention` arithmetic), the output projection,
RMSNorm, one gate/up matmul, the down projection: about 40 calls from Python, half the HF
forward's. The numbers are the HF path's: the same operations in the same dtypes (fp32 greedy
decoding is token-identical; tested). `torch.compile` of `decode_step` (the engine's
`compile=True`) removes the rest of the per-op overhead.

Only the backbone's decode forward is replaced: prefills and commits (hundreds of positions,
matmul-bound) keep the HF forward, and the memory (embeddings, recall, the state) is untouched.
Backbones other than Llama's, and Temp-LoRA sessions (adapters are forward hooks on the HF
modules), decode on the HF path (`lean_support` says why).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional

from hmt_core.model import HMTModel
from hmt_core.precision import joined_linear

SUPPORTED_MODEL_TYPES = ("llama",)  # SmolLM2, Llama 2/3, TinyLlama, ...
# rope types whose tables depend on the position only (not on how long the sequence has grown)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class LeanLayer:
    input_norm: Tensor  # RMSNorm weights
    post_norm: Tensor
    qkv: Sequence[nn.Module]  # one joined layer, or q, k, v separately
    o: nn.Module
    gate_up: Sequence[nn.Module]  # one joined layer, or gate, up
    down: nn.Module


@dataclass
class LeanWeights:
    layers: list[LeanLayer]
    norm: Tensor  # the final RMSNorm's weights
    cos: Tensor  # [columns, head_dim], the backbone's rotary tables at positions 0..columns-1
    sin: Tensor  # rotate_half's sign folded in: x * cos + roll(x, d/2) * sin equals HF's rotation
    eps: float
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    act: Callable[[Tensor], Tensor]


def lean_support(model: HMTModel) -> str | None:
    """Why the model's backbone cannot decode on the lean path, or None when it can."""
    if model.memory.adapts:
        return "Temp-LoRA adapters are forward hooks on the HF modules"
    backbone = model.backbone
    if hasattr(backbone, "get_base_model"):
        return "the backbone is wrapped (peft) for training"
    config = backbone.config  # the model's own type: a multimodal wrapper of a Llama is not one
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"{config.model_type} backbones decode on the HF path"
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    rope = rope_parameters.get("rope_type", "default")
    if rope not in STATIC_ROPE_TYPES:
        return f"{rope} rotary embeddings change with the sequence length"
    if rope_parameters.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) != 1.0:
        return "partial rotary embeddings"
    if getattr(config, "pretraining_tp", 1) > 1:
        return "pretraining_tp > 1 splits the matmuls"
    return None


def lean_weights(model: HMTModel, columns: int, join: bool = True) -> LeanWeights:
    """The backbone's decode weights, in the lean step's layout. `join`: q/k/v and gate/up as one
    matmul each where the layers allow (a copy of those weights: about two thirds of the layers'
    linear weights again; see README)."""
    base: Any = model.base_model  # a LlamaModel (lean_support checked)
    heads, kv_heads, head_dim = model.attention_shape

    def joined(layers: list[nn.Module]) -> Sequence[nn.Module]:
        fused = joined_linear(layers) if join else None
        return layers if fused is None else [fused]

    layers = []
    for layer in base.layers:
        attention, mlp = layer.self_attn, layer.mlp
        layers.append(LeanLayer(layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                                joined([attention.q_proj, attention.k_proj, attention.v_proj]), attention.o_proj,
                                joined([mlp.gate_proj, mlp.up_proj]), mlp.down_proj))
    dtype = base.norm.weight.dtype
    positions = torch.arange(columns, device=model.device)[None]
    cos, sin = base.rotary_emb(torch.zeros(1, dtype=dtype, device=model.device), positions)  # HF's own tables
    half = head_dim // 2
    sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)  # rotate_half(x) = roll(x, half) * sign
    return LeanWeights(layers, base.norm.weight.detach(), cos[0].contiguous(), sin.contiguous(),
                       float(base.norm.variance_epsilon), heads, kv_heads, head_dim, head_dim ** -0.5,
                       base.layers[0].mlp.act_fn)


_built: weakref.WeakKeyDictionary[HMTModel, tuple[tuple[object, ...], LeanWeights]] = weakref.WeakKeyDictionary()


def _weights_key(model: HMTModel, columns: int, join: bool) -> tuple[object, ...]:
    """What the lean weights were made from: every backbone tensor's address and in-place version
    (training bumps it), the dtype, the table length."""
    tensors = (*model.backbone.parameters(), *model.backbone.buffers())
    return (columns, join, model.dtype, *((t.data_ptr(), t._version) for t in tensors))


def lean_weights_for(model: HMTModel, columns: int, join: bool = True) -> LeanWeights:
    """`lean_weights`, made once per model and reused by its engines (a `generate` call makes one)
    until the backbone's weights change."""
    key = _weights_key(model, columns, join)
    found = _built.get(model)
    if found is not None and found[0] == key:
        return found[1]
    weights = lean_weights(model, columns, join)
    _built[model] = (key, weights)
    return weights


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """LlamaRMSNorm's arithmetic (float32 statistics, rounded to the input's dtype, times the weight)
    in one or four op calls instead of eight: torch's rms_norm is the same float32 arithmetic."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return functional.rms_norm(x, x.shape[-1:], weight, eps)
    return weight * functional.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype)


def _project(layers: Sequence[nn.Module], x: Tensor) -> Tensor:
    if len(layers) == 1:
        return cast(Tensor, layers[0](x))
    return torch.cat([layer(x) for layer in layers], dim=-1)


def decode_step(weights: LeanWeights, x: Tensor, mask: Tensor, positions: Tensor,
                keys: Sequence[Tensor], values: Sequence[Tensor], width: int | None = None) -> Tensor:
    """One token for each of rows 0..n-1 of the slot cache: x [n, d] embeddings, mask [n, 1, 1, C]
    (additive, the engine's), positions [n] (where each row writes its k/v); keys/values per layer
    [slots, kv_heads, C, head_dim]. Returns the final hidden states [n, d] (after the final norm).

    `width`: attend to the first `width` columns only (the engine passes one more than the largest
    position a row whose output it reads writes: the columns past it are masked for those rows).
    Attention costs time in proportion; None (static shapes, for the compiler): all C."""
    rows, w = x.shape[0], weights
    if width is not None:
        mask = mask[..., :width]
    heads, kv_heads, dim = w.heads, w.kv_heads, w.head_dim
    group, rotated = heads // kv_heads, heads + kv_heads
    cos, sin = w.cos[positions][:, None], w.sin[positions][:, None]  # [n, 1, d]
    slots = torch.arange(rows, device=x.device)
    for layer, layer_keys, layer_values in zip(w.layers, keys, values, strict=True):
        h = rms_norm(x, layer.input_norm, w.eps)
        qkv = _project(layer.qkv, h).view(rows, heads + 2 * kv_heads, dim)
        qk = qkv[:, :rotated]
        qk = qk * cos + qk.roll(dim // 2, -1) * sin  # HF's rotation, same products and sum
        layer_keys.transpose(1, 2).index_put_((slots, positions), qk[:, heads:])
        layer_values.transpose(1, 2).index_put_((slots, positions), qkv[:, rotated:])
        # engine.decode_attention: query heads grouped per KV head, float32 softmax
        grouped = (qk[:, :heads] * w.scale).view(rows, kv_heads, group, dim)
        visible = layer_keys[:rows, :, :width]
        if width is not None and grouped.dtype != torch.float32:
            # bf16 bmm reads a narrowed slot's keys transposed slowly (2x at 32 rows, measured): K q^T instead
            scores = torch.matmul(visible, grouped.transpose(-1, -2)).transpose(-1, -2)  # [n, kv, group, C]
        else:
            scores = torch.matmul(grouped, visible.transpose(-1, -2))
        scores = (scores if scores.dtype == torch.float32 else scores.float()).add_(mask)
        probs = torch.softmax(scores, dim=-1)
        probs = probs if probs.dtype == layer_values.dtype else probs.to(layer_values.dtype)
        attended = torch.matmul(probs, layer_values[:rows, :, :width]).view(rows, heads * dim)
        x = x + layer.o(attended)
        h = rms_norm(x, layer.post_norm, w.eps)
        if len(layer.gate_up) == 1:
            gate, up = layer.gate_up[0](h).chunk(2, dim=-1)
        else:
            gate, up = layer.gate_up[0](h), layer.gate_up[1](h)
        x = x + layer.down(w.act(gate) * up)
    return rms_norm(x, w.norm, w.eps)
