"""Temp-LoRA session memory (Wang, Ma, Cai, arXiv 2401.11504): a long context kept in a temporary,
per-session LoRA adapter that is trained at inference time on the session's own text.

After a chunk of text has been read (or generated), the adapter takes a few gradient steps on that chunk
(loss on the chunk's tokens, with the text just before it as context in the same forward); later text is
read and generated with the adapter applied, so the model "remembers" text that has left its window.
The adapter is plain tensors (no peft: serving must not need the optional training extra), so a session
stores it next to its other state and a batch of sessions is served with one adapter per row.

Recipe: the paper's PG19 runs (authors' code, github.com/TemporaryLoRA/Temp-LoRA: scripts/llama2.sh,
trainer/acc_pg19_trainer.py, data_modules/pg19.py) versus our defaults:

  ==================  ============================================  =========================================
  setting             paper (PG19, LLaMA-2-7B-32K)                  here (TempLoRAConfig defaults)
  ==================  ============================================  =========================================
  rank / alpha        64 / 64 (scaling 1), lora dropout 0.05        8 / 16 (scaling 2), no dropout
  target modules      every Linear layer (find_all_linear_names)    ("q_proj", "v_proj")
  steps per chunk     2 ("epochs": 2 steps on the same window)      2
  optimizer           AdamW lr 5e-5, wd 0, 2 warmup chunks, then    Adam lr 1e-3, a fresh one per commit
                      constant; one optimizer for the document
  chunk / context     1024-token chunks read after up to 3072       chunk size is the caller's; 256 tokens
                      tokens of context, loss on the chunk only     of context, loss on the chunk only
  order               score chunk i, then train on it               the same (score_document)
  ==================  ============================================  =========================================

Why ours differ: a session's adapter is serialised between turns and Adam's moments are not (they would
triple the bytes per session), so every commit starts a fresh Adam. Adam's first steps move each parameter
by about `learning_rate` whatever the gradient's size, so at the paper's 5e-5 two steps from a zero B
change next to nothing; 1e-3 is the top of the usual LoRA range (1e-4..1e-3) and lets two steps per
commit matter. Raise it (the tests use 2e-2 on tiny models) to memorise harder, lower it if the model
degrades on text unrelated to the session. Rank 8 on q/v with alpha = 2 * rank is the small, common
LoRA setting (Hu et al.); it keeps an adapter small enough to be session state: about 1.8 MB float32
for SmolLM2-135M (30 layers, q 576->576, v 576->192), 16 MiB for a 7B Llama. The context is short
because the point is a short window, with the adapter carrying what has left it. No dropout: the
training forward runs the backbone in eval mode so that a commit is deterministic.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeGuard, cast

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

__all__ = [
    "Adapter",
    "TempLoRAConfig",
    "adapters_applied",
    "new_adapter",
    "score_document",
    "target_modules",
    "train_adapter",
]

ADAPTER_FORMAT = "hmt-temp-lora"
ADAPTER_FORMAT_VERSION = 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_number(value: object) -> bool:
    """A finite int or float > 0 (bool is not a number here)."""
    return _is_number(value) and math.isfinite(value) and value > 0


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class TempLoRAConfig:
    """How a session's temporary adapter is shaped and trained (module docstring: paper vs defaults)."""

    rank: int = 8
    alpha: float = 16.0
    steps: int = 2  # gradient steps per commit (the paper's "epochs" over one chunk)
    learning_rate: float = 1e-3
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    context_tokens: int = 256  # tokens before the chunk that are attended to, not trained on
    seed: int = 0  # A's initialisation, so two sessions with the same text get the same adapter

    def __post_init__(self) -> None:
        if not _is_int(self.rank) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if not _is_positive_number(self.alpha):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if not _is_int(self.steps) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not _is_positive_number(self.learning_rate):
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate!r}")
        modules = self.target_modules
        if isinstance(modules, str) or not isinstance(modules, Sequence):
            raise ValueError(f"target_modules must be a tuple of module-name suffixes, got {modules!r}")
        if not modules or not all(isinstance(m, str) and m and m.strip() == m for m in modules):
            raise ValueError(f"target_modules must be non-empty names without spaces, got {modules!r}")
        # a list (from JSON) is accepted and stored as a tuple so the config stays hashable
        object.__setattr__(self, "target_modules", tuple(modules))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "learning_rate", float(self.learning_rate))
        if not _is_int(self.context_tokens) or self.context_tokens < 0:
            raise ValueError(f"context_tokens must be an integer >= 0, got {self.context_tokens!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["target_modules"] = list(self.target_modules)  # JSON has no tuples
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TempLoRAConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a TempLoRAConfig is read from a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TempLoRAConfig keys {unknown}; known: {sorted(known)}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------------------
# target modules


def _lora_able(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear-like module, None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):  # GPT-2 style: y = x @ W + b with W [in, out]
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def _candidates(backbone: nn.Module) -> dict[str, tuple[int, int]]:
    """Every Linear-like module except the LM head (adapting the vocabulary projection is not memory)."""
    get_head = getattr(backbone, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    out: dict[str, tuple[int, int]] = {}
    for name, module in backbone.named_modules():
        shape = _lora_able(module)
        if shape is not None and module is not head and name:
            out[name] = shape
    return out


def _matches(name: str, suffixes: Sequence[str]) -> bool:
    # on a dot boundary, as peft does: "q_proj" must not pick up "xq_proj"
    return any(name == s or name.endswith("." + s) for s in suffixes)


def target_modules(backbone: nn.Module, cfg: TempLoRAConfig) -> dict[str, tuple[int, int]]:
    """{qualified module name: (in_features, out_features)}, sorted by name, for the modules cfg adapts.

    Raises ValueError naming the backbone's Linear-like modules when none matches cfg.target_modules.
    """
    candidates = _candidates(backbone)
    chosen = {name: candidates[name] for name in sorted(candidates) if _matches(name, cfg.target_modules)}
    if not chosen:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in candidates})
        examples = sorted(candidates)[:4]
        raise ValueError(
            f"no Linear-like module of {type(backbone).__name__} ends with any of {list(cfg.target_modules)}; "
            f"available module names end with {leaves} (e.g. {examples})")
    return chosen


# ---------------------------------------------------------------------------------------------------------
# adapter state


@dataclass(frozen=True, eq=False)
class Adapter:
    """One session's adapter: per target module, A [rank, in] and B [out, rank] (float32).

    The module's output gains (alpha / rank) * x @ A^T @ B^T. `commits` counts the chunks trained on.
    Treat it as immutable: train_adapter returns a new one.
    """

    a: dict[str, Tensor]
    b: dict[str, Tensor]
    rank: int
    alpha: float
    commits: int = 0
    _shapes: dict[str, tuple[int, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _is_int(self.rank) or self.rank < 1:
            raise ValueError(f"adapter rank must be an integer >= 1, got {self.rank!r}")
        if not _is_positive_number(self.alpha):
            raise ValueError(f"adapter alpha must be a finite number > 0, got {self.alpha!r}")
        if not _is_int(self.commits) or self.commits < 0:
            raise ValueError(f"adapter commits must be an integer >= 0, got {self.commits!r}")
        if set(self.a) != set(self.b) or not self.a:
            raise ValueError(f"adapter needs A and B for the same, non-empty set of modules; "
                             f"A: {sorted(self.a)}, B: {sorted(self.b)}")
        shapes: dict[str, tuple[int, int]] = {}
        for name in sorted(self.a):
            a, b = self.a[name], self.b[name]
            if a.dtype != torch.float32 or b.dtype != torch.float32:
                raise ValueError(f"adapter factors of {name!r} must be float32, got {a.dtype} and {b.dtype}")
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != self.rank or b.shape[1] != self.rank:
                raise ValueError(f"adapter factors of {name!r} must be A [rank={self.rank}, in] and "
                                 f"B [out, rank={self.rank}], got {tuple(a.shape)} and {tuple(b.shape)}")
            shapes[name] = (int(a.shape[1]), int(b.shape[0]))
        object.__setattr__(self, "_shapes", shapes)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def modules(self) -> dict[str, tuple[int, int]]:
        """{module name: (in_features, out_features)}, sorted by name."""
        return dict(self._shapes)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    def to(self, device: torch.device | str) -> Adapter:
        """The same adapter on another device (serving on GPU: move it once, not per forward)."""
        return Adapter({n: t.to(device) for n, t in self.a.items()}, {n: t.to(device) for n, t in self.b.items()},
                       self.rank, self.alpha, self.commits)

    def named_tensors(self, prefix: str = "") -> dict[str, Tensor]:
        """The factors as stored: "<prefix><module>.lora_A" / ".lora_B", on the CPU."""
        tensors: dict[str, Tensor] = {}
        for name in self.a:
            tensors[f"{prefix}{name}.lora_A"] = self.a[name].detach().to("cpu").contiguous()
            tensors[f"{prefix}{name}.lora_B"] = self.b[name].detach().to("cpu").contiguous()
        return tensors

    def header(self) -> dict[str, Any]:
        """What the stored factors need beside them (json writes a float's repr, which reads back exactly)."""
        return {"rank": self.rank, "alpha": float(self.alpha), "commits": self.commits}

    @classmethod
    def from_named_tensors(cls, tensors: dict[str, Tensor], header: dict[str, Any], prefix: str = "") -> Adapter:
        """Inverse of named_tensors + header; ValueError (KeyError for a missing header field) otherwise."""
        rank, alpha, commits = header["rank"], header["alpha"], header["commits"]
        if not _is_number(alpha):
            raise ValueError(f"Temp-LoRA adapter alpha must be a number, got {alpha!r}")
        a: dict[str, Tensor] = {}
        b: dict[str, Tensor] = {}
        for key, tensor in tensors.items():
            name, _, kind = key.removeprefix(prefix).rpartition(".")
            if kind == "lora_A" and name and key.startswith(prefix):
                a[name] = tensor
            elif kind == "lora_B" and name and key.startswith(prefix):
                b[name] = tensor
            else:
                raise ValueError(f"unexpected tensor {key!r} in Temp-LoRA adapter data")
        return cls(a, b, rank, float(alpha), commits)  # __post_init__ checks types, shapes, dtypes, pairing

    def to_bytes(self) -> bytes:
        """safetensors bytes: tensors "<module>.lora_A" / "<module>.lora_B"; rank, alpha and commits in the
        metadata. The same adapter always gives the same bytes (safetensors writes a metadata map in hash
        order, so everything goes in one key, as sorted JSON)."""
        header = {"format_version": ADAPTER_FORMAT_VERSION, **self.header()}
        return save_safetensors(self.named_tensors(), metadata={ADAPTER_FORMAT: json.dumps(header, sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes) -> Adapter:
        """Inverse of to_bytes; ValueError on anything that is not an adapter written by it."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ValueError(f"adapter bytes expected, got {type(data).__name__}")
        data = bytes(data)
        try:
            tensors = load_safetensors(data)
            metadata = _safetensors_metadata(data)
        except Exception as exc:  # whatever the parser trips on, garbage is a ValueError to the caller
            raise ValueError(f"not a Temp-LoRA adapter (unreadable safetensors data: {exc})") from exc
        if ADAPTER_FORMAT not in metadata:
            raise ValueError(f"not a Temp-LoRA adapter (no {ADAPTER_FORMAT!r} metadata; has {sorted(metadata)})")
        try:
            header = json.loads(metadata[ADAPTER_FORMAT])
            version = header["format_version"]
            if not {"rank", "alpha", "commits"} <= set(header):
                raise KeyError("rank, alpha or commits")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"Temp-LoRA adapter metadata is incomplete or malformed: "
                             f"{metadata[ADAPTER_FORMAT]!r}") from exc
        if version != ADAPTER_FORMAT_VERSION:
            raise ValueError(f"unsupported Temp-LoRA adapter format_version {version!r} "
                             f"(this version reads {ADAPTER_FORMAT_VERSION})")
        return cls.from_named_tensors(tensors, header)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    # safetensors.torch.load drops the metadata; the header is 8 bytes of length, then JSON
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size].decode("utf-8"))
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    if not isinstance(meta, dict):
        raise ValueError("safetensors metadata is not a mapping")
    return {str(k): str(v) for k, v in meta.items()}


def new_adapter(backbone: nn.Module, cfg: TempLoRAConfig) -> Adapter:
    """A fresh adapter for cfg's target modules: B = 0 (so it changes nothing yet), A random from cfg.seed.

    A uses peft's / the LoRA paper's init, kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), drawn from a
    CPU generator in sorted module order so the same config and backbone always give the same adapter.
    """
    modules = target_modules(backbone, cfg)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    a: dict[str, Tensor] = {}
    b: dict[str, Tensor] = {}
    for name, (fan_in, fan_out) in modules.items():
        bound = 1.0 / math.sqrt(fan_in)
        a[name] = (torch.rand(cfg.rank, fan_in, generator=gen, dtype=torch.float32) * 2 - 1) * bound
        b[name] = torch.zeros(fan_out, cfg.rank, dtype=torch.float32)
    return Adapter(a, b, cfg.rank, cfg.alpha, 0)


# ---------------------------------------------------------------------------------------------------------
# applying adapters, one per batch row


class _RowFactors:
    """Per-row A/B of one module, stacked (rows padded to the largest rank with zeros, which adds nothing),
    with the per-row scaling folded into B; cast to the input's dtype/device once per context."""

    def __init__(self, a: Tensor, b: Tensor) -> None:
        self.a = a  # [rows, r, in]
        self.b = b  # [rows, out, r]
        self._cast: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def for_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        key = (x.dtype, x.device)
        if key not in self._cast:
            # A^T [rows, in, r] and B^T [rows, r, out], ready for bmm
            self._cast[key] = (self.a.to(device=x.device, dtype=x.dtype).transpose(1, 2),
                               self.b.to(device=x.device, dtype=x.dtype).transpose(1, 2))
        return self._cast[key]


def _stack_rows(adapters: Sequence[Adapter | None], name: str, shape: tuple[int, int],
                scaling: float | None) -> _RowFactors:
    fan_in, fan_out = shape
    present = [ad for ad in adapters if ad is not None]
    rank = max(ad.rank for ad in present)
    device = present[0].a[next(iter(present[0].a))].device
    a_rows: list[Tensor] = []
    b_rows: list[Tensor] = []
    for ad in adapters:
        if ad is None or name not in ad.a:
            a_rows.append(torch.zeros(rank, fan_in, device=device))
            b_rows.append(torch.zeros(fan_out, rank, device=device))
            continue
        a, b = ad.a[name].to(device), ad.b[name].to(device)
        pad = rank - ad.rank
        if pad:
            a = torch.cat([a, a.new_zeros(pad, fan_in)], dim=0)
            b = torch.cat([b, b.new_zeros(fan_out, pad)], dim=1)
        a_rows.append(a)
        b_rows.append(b * (ad.scaling if scaling is None else scaling))
    return _RowFactors(torch.stack(a_rows), torch.stack(b_rows))


def _row_delta_hook(factors: _RowFactors, rows: int, name: str) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> Tensor:
        x = args[0] if args else next(iter(kwargs.values()))
        if x.shape[0] != rows:
            raise ValueError(f"adapters_applied got {rows} adapters but {name!r} saw a batch of {x.shape[0]} rows")
        a_t, b_t = factors.for_input(x)
        flat = x.reshape(rows, -1, x.shape[-1])  # [B, T, in] for any T (prefill or one-token decode)
        delta = torch.bmm(torch.bmm(flat, a_t), b_t)  # [B, T, out]: row b uses its own A_b, B_b
        return output + delta.reshape(output.shape)

    return hook


class StackedAdapters:
    """The adapters of a batch's rows, stacked per module once: what `adapters_applied` installs. Kept
    for as long as the rows and their adapters stay the same, it saves rebuilding the stacks on every
    forward (the decode engine's steps between joins, leaves and commits). Adapters are never modified
    in place (a commit makes a new one), so identity says whether a row's adapter is still the same."""

    def __init__(self, backbone: nn.Module, adapters: Sequence[Adapter | None], scaling: float | None = None) -> None:
        if scaling is not None and not math.isfinite(scaling):
            raise ValueError(f"scaling must be finite, got {scaling!r}")
        self.adapters = tuple(adapters)
        self.scaling = scaling
        present = [ad for ad in adapters if ad is not None]
        available = _candidates(backbone) if present else {}
        shapes: dict[str, tuple[int, int]] = {}
        for ad in present:
            for name, shape in ad.modules.items():
                if name not in available:
                    raise ValueError(f"adapter targets {name!r}, which is not a Linear-like module of "
                                     f"{type(backbone).__name__}")
                if available[name] != shape:
                    raise ValueError(f"adapter factors for {name!r} are for (in, out) = {shape}, "
                                     f"the module is {available[name]}")
                shapes[name] = shape
        modules = dict(backbone.named_modules())
        # module -> its rows' stacked factors
        self.factors = [(name, modules[name], _stack_rows(adapters, name, shapes[name], scaling))
                        for name in sorted(shapes)]

    def holds(self, adapters: Sequence[Adapter | None], scaling: float | None = None) -> bool:
        """Whether these are the same adapters, row for row (so the stacks can be reused)."""
        return scaling == self.scaling and len(adapters) == len(self.adapters) and \
            all(a is b for a, b in zip(adapters, self.adapters, strict=True))


@contextmanager
def adapters_applied(backbone: nn.Module, adapters: Sequence[Adapter | None] | StackedAdapters,
                     scaling: float | None = None) -> Iterator[None]:
    """While active, row b of every forward of `backbone` runs with adapters[b] (None: no delta).

    Every adapted module's output gains scaling * (x_b @ A_b^T) @ B_b^T for its row b: the batched
    multi-adapter matmul of S-LoRA / punica, written as two bmm over per-row stacked factors (None rows
    and modules an adapter lacks get zero factors). `scaling` None uses each adapter's own alpha / rank;
    a number overrides it for all rows. Forwards must have a batch of exactly len(adapters) rows.
    `adapters` may be a `StackedAdapters` built before on this backbone (its own scaling then applies).
    Adapters must not be modified while applied (their cast copies are cached for the context).
    The hooks sit on the shared backbone: no other forward may run on it meanwhile (one model thread).
    The hooks are removed on exit, also when the body raises.
    """
    if not isinstance(adapters, StackedAdapters):
        if not any(ad is not None for ad in adapters):
            yield  # nothing to add: the bare backbone
            return
        adapters = StackedAdapters(backbone, adapters, scaling)
    rows = len(adapters.adapters)
    handles = []
    try:
        for name, module, factors in adapters.factors:
            handles.append(module.register_forward_hook(_row_delta_hook(factors, rows, name), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------------------
# training at commit, and reading a document the Temp-LoRA way


@contextmanager
def _frozen_eval(backbone: nn.Module) -> Iterator[None]:
    """Backbone in eval mode (no dropout: deterministic) with no parameter requiring grad; both restored."""
    modes = [(m, m.training) for m in backbone.modules()]
    flags = [(p, p.requires_grad) for p in backbone.parameters()]
    try:
        backbone.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def _check_tokens(backbone: nn.Module, tokens: Sequence[int], what: str) -> list[int]:
    ids = [int(t) for t in tokens]
    get_emb = getattr(backbone, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    vocab = getattr(emb, "num_embeddings", None)
    if vocab is not None and any(not 0 <= t < vocab for t in ids):
        raise ValueError(f"{what} has token ids outside the vocabulary [0, {vocab})")
    return ids


def _target_nll(backbone: nn.Module, ids: list[int], start: int, prompt: Tensor | None = None) -> Tensor:
    """Per-token NLL [len(ids) - start] (float32) of ids[start:], each predicted from the tokens before it.
    prompt: embeddings [d] or [P, d] read before ids (HMT's memory prompt p, behind a sink token where the model
    has one), so ids[0] is predicted from them."""
    device = next(backbone.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    kwargs: dict[str, Any] = {"use_cache": False}
    lead = 0
    if prompt is None:
        kwargs["input_ids"] = input_ids
    else:
        embeds = cast(Any, backbone).get_input_embeddings()(input_ids)
        prefix = prompt.reshape(1, -1, embeds.shape[-1]).to(embeds)
        kwargs["inputs_embeds"] = torch.cat([prefix, embeds], dim=1)
        lead = prefix.shape[1]
    n_targets = len(ids) - start
    keep = n_targets + 1  # logits at the positions before each target; the last one predicts nothing
    if "logits_to_keep" in inspect.signature(backbone.forward).parameters:
        kwargs["logits_to_keep"] = keep  # skip the vocabulary projection over the context
        logits = backbone(**kwargs).logits[0, :-1]
    else:
        logits = backbone(**kwargs).logits[0, lead + start - 1:-1]
    targets = input_ids[0, start:]
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


def train_adapter(backbone: nn.Module, adapter: Adapter, context: Sequence[int], chunk: Sequence[int],
                  cfg: TempLoRAConfig, prompt: Tensor | None = None) -> tuple[Adapter, list[float]]:
    """Commit `chunk` to the adapter: cfg.steps Adam steps on the loss of chunk's tokens, read after
    context[-cfg.context_tokens:] in the same forward. Returns (new adapter, loss before each step).

    The loss covers the chunk's positions only; with a non-empty context the first chunk token is predicted
    from the last context token, with none it is unpredicted (so the chunk then needs 2+ tokens).
    prompt: HMT's memory prompt p [d], or [P, d] behind a sink token (memory "hmt+temp-lora"), read before the
    context as the segment is read, [p, context, chunk]: the adapter learns what the window costs given the
    memory; it also predicts the first token when there is no context.
    The input adapter is not modified; the new one has commits + 1 and lives on the input's device. Its own
    rank/alpha are used (cfg supplies steps, learning_rate, context_tokens). The optimizer is fresh per
    commit: Adam's moments are not session state (they would triple an adapter's bytes).
    The backbone runs in eval mode with every parameter frozen, both restored afterwards, and its weights
    are never written; gradients reach the LoRA factors only. Works when called under no_grad.
    """
    ctx = _check_tokens(backbone, context, "context")
    ids_chunk = _check_tokens(backbone, chunk, "chunk")
    ctx = ctx[-cfg.context_tokens:] if cfg.context_tokens else []
    ids = ctx + ids_chunk
    start = len(ctx) if prompt is not None else max(len(ctx), 1)
    if not ids_chunk or len(ids) - start < 1:
        raise ValueError(f"nothing to train on: a chunk of {len(ids_chunk)} tokens after {len(ctx)} "
                         "context tokens has no token to predict (give context or 2+ chunk tokens)")
    device = next(backbone.parameters()).device
    with torch.inference_mode(False), torch.enable_grad(), _frozen_eval(backbone):
        # float32 leaves on the backbone's device: the factors are trained in full precision whatever
        # the backbone's dtype (the hooks cast them to it for the forward)
        a = {n: t.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
             for n, t in adapter.a.items()}
        b = {n: t.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
             for n, t in adapter.b.items()}
        optimizer = torch.optim.Adam([*a.values(), *b.values()], lr=cfg.learning_rate)
        working = Adapter(a, b, adapter.rank, adapter.alpha, adapter.commits)
        losses: list[float] = []
        for _ in range(cfg.steps):
            # hooks re-installed each step: the stacked factors they hold are rebuilt from the updated leaves
            with adapters_applied(backbone, [working]):
                loss = _target_nll(backbone, ids, start, None if prompt is None else prompt.detach()).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    out_device = next(iter(adapter.a.values())).device
    return Adapter({n: t.detach().to(out_device) for n, t in a.items()},
                   {n: t.detach().to(out_device) for n, t in b.items()},
                   adapter.rank, adapter.alpha, adapter.commits + 1), losses


def score_document(backbone: nn.Module, tokens: Sequence[int], cfg: TempLoRAConfig, chunk_tokens: int) -> Tensor:
    """Per-token negative log-likelihoods [len(tokens) - 1] of tokens[1:], read the Temp-LoRA way.

    The document is read in chunks of chunk_tokens: chunk i is scored by one forward over the cfg.context_tokens
    tokens before it (the previous chunk's tail when context_tokens <= chunk_tokens) followed by chunk i, with
    the adapter trained on chunks 0..i-1 applied; then the adapter is trained on chunk i with that same context
    (train_adapter). Score-then-train, as in the paper's PG19 evaluation; the window is short, so whatever the
    model knows of earlier chunks it knows through the adapter.
    """
    if not _is_int(chunk_tokens) or chunk_tokens < 2:
        raise ValueError(f"chunk_tokens must be an integer >= 2, got {chunk_tokens!r}")
    ids = _check_tokens(backbone, tokens, "document")
    nll = torch.zeros(max(len(ids) - 1, 0), dtype=torch.float32)
    if len(ids) < 2:
        return nll
    adapter = new_adapter(backbone, cfg)
    for begin in range(0, len(ids), chunk_tokens):
        end = min(begin + chunk_tokens, len(ids))
        ctx = ids[max(0, begin - cfg.context_tokens):begin]
        window = ctx + ids[begin:end]
        start = max(len(ctx), 1)
        if len(window) > start:  # a lone first token has nothing to score
            with torch.no_grad(), _frozen_eval(backbone), adapters_applied(backbone, [adapter]):
                scored = _target_nll(backbone, window, start)
            nll[begin + start - len(ctx) - 1:end - 1] = scored.cpu()
        if end < len(ids):  # training after the last chunk would serve nothing
            adapter, _ = train_adapter(backbone, adapter, ctx, ids[begin:end], cfg)
    return nll
