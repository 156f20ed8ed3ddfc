"""HMT over any transformers causal LM: the reference's four steps as batched tensor functions.

One segment n with tokens x_n (see shared/conformance/README.md):
  1. summary query  q_n = last hidden of backbone([mem, x_n[:s], mem])
  2. recall         p_n = softmax(q_n Wq (M Wk)^T / scale) M, or the initial memory when M is empty
  3. segment pass   backbone([p_n, E(sensory), E(x_n), p_n]); logits at x_n, m_n = last hidden
  4. update         M := (M + [m_n])[-N:], sensory := x_n[-k:]
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from hmt_core.config import HMTConfig
from hmt_core.errors import CorruptStateError, InvalidInputError
from hmt_core.memory import Memory, MemoryKind, memory_of
from hmt_core.recall import RECALL_TOP_K, Recall, SegmentRecall
from hmt_core.session import SessionState
from hmt_core.temp_lora import Adapter, TempLoRAConfig, adapters_applied, new_adapter, train_adapter

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from hmt_core.generation import Generation, SamplingParams


@dataclass
class ScoreOutput:
    logits: Tensor  # [B, T, V]
    memories: Tensor  # [B, S, d]
    recall_distances: Tensor  # [B, S]: segments back to the strongest recall weight (0: no recall)


def fingerprint_sample(tensor: Tensor) -> Tensor:
    """The values of a tensor the model fingerprint hashes: an evenly strided sample, as bf16 bits."""
    flat = tensor.detach().reshape(-1)
    return flat[::max(1, flat.numel() // 4096)].to("cpu", torch.bfloat16).view(torch.int16)


def _config_digest(config: PretrainedConfig) -> dict[str, Any]:
    drop = {"transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype",
            "_attn_implementation_autoset", "_commit_hash"}
    return {k: v for k, v in sorted(config.to_dict().items()) if k not in drop}


class HMTModel(nn.Module):
    """A causal LM made segment-recurrent. Device- and dtype-agnostic: use .to() as usual."""

    def __init__(self, backbone: PreTrainedModel, config: HMTConfig,
                 tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.hmt_config = config
        self.tokenizer = tokenizer
        embeddings = cast(nn.Embedding, backbone.get_input_embeddings())
        dim = embeddings.embedding_dim
        weight = getattr(embeddings, "weight", None)  # None: a quantized lookup (with_memory of an int8 model)
        std = float(weight.detach().float().std()) if weight is not None else 0.02
        self.summary_prompt = nn.Parameter(torch.randn(1, dim) * std)  # reference key "mem"
        self.initial_memory = nn.Parameter(torch.randn(1, dim) * std)  # "memory_cell.memory"
        self.recall_wq = nn.Linear(dim, config.recall_dim, bias=False)  # "cross_attn.wq"
        self.recall_wk = nn.Linear(dim, config.recall_dim, bias=False)  # "cross_attn.wk"
        self.memory_log_scale: nn.Parameter | None = None
        if config.memory_input_scale is not None:
            self.memory_log_scale = nn.Parameter(torch.tensor(math.log(config.memory_input_scale)))
        self._check_sink_token(config, embeddings.num_embeddings)
        self._fingerprint: str | None = None
        self._fresh_adapter: Adapter | None = None
        # low-rank changes made to the backbone since it was loaded, one dict per LoRA training run:
        # module name -> (A [r, in], B [out, r] with the scaling folded in). A model directory that
        # refers to its backbone ships these (megabytes) instead of a copy of the changed backbone.
        self.backbone_deltas: list[dict[str, tuple[Tensor, Tensor]]] = []
        backbone.eval()

    # ----- basic properties -------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.initial_memory.shape[1]

    @property
    def memory(self) -> Memory:
        """The kind of memory this model's sessions keep (its configuration's)."""
        return memory_of(self.hmt_config.memory)

    @property
    def vocab_size(self) -> int:
        return cast(nn.Embedding, self.backbone.get_input_embeddings()).num_embeddings

    @property
    def device(self) -> torch.device:
        return self.initial_memory.device

    @property
    def dtype(self) -> torch.dtype:
        """The backbone's activations' dtype (its weights' own, or bf16 for quantized weights)."""
        embeddings = self.backbone.get_input_embeddings()
        return cast(torch.dtype, getattr(embeddings, "compute_dtype", None) or embeddings.weight.dtype)

    @property
    def attention_shape(self) -> tuple[int, int, int]:
        """The backbone's attention: (query heads, key/value heads, head dim)."""
        config = self.backbone.config.get_text_config()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return heads, kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads

    @property
    def kv_cache_bytes_per_token(self) -> int:
        """What a KV cache of the backbone holds per token of history: keys and values, every layer."""
        _, kv_heads, head_dim = self.attention_shape
        layers = self.backbone.config.get_text_config().num_hidden_layers
        return 2 * layers * kv_heads * head_dim * self.dtype.itemsize

    @property
    def recall_divisor(self) -> float:
        scale = self.hmt_config.recall_scale
        if scale == "auto":
            scale = "linear" if self.dim >= 4096 and self.hmt_config.recall_dim >= 4096 else "sqrt"
        return float(self.hmt_config.recall_dim) if scale == "linear" else math.sqrt(self.hmt_config.recall_dim)

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.backbone.config, getattr(self.backbone, "generation_config", None), self.tokenizer):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    @property
    def fingerprint(self) -> str:
        """Identity of backbone + HMT weights + HMTConfig, stable across fp32/bf16 and devices.

        Hashes configs, every tensor's name and shape, and an evenly strided sample of its values
        rounded to bf16 (so loading the same weights in another dtype keeps the identity).
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            digest.update(json.dumps(self.hmt_config.to_dict(), sort_keys=True).encode())
            digest.update(json.dumps(_config_digest(self.backbone.config), sort_keys=True, default=str).encode())
            with torch.no_grad():
                for name, (shape, sample) in sorted(self._weight_samples().items()):
                    digest.update(f"{name}:{shape}".encode())
                    digest.update(sample.numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:32]
        return self._fingerprint

    def _weight_samples(self) -> dict[str, tuple[tuple[int, ...], Tensor]]:
        """What the fingerprint hashes of each tensor: its shape and an evenly strided sample of its
        values as bf16 bits. A layer quantized at load (hmt_core.precision) reports those of the
        weight it replaced, so every precision of the same weights keeps one identity."""
        samples = {name: (tuple(t.shape), fingerprint_sample(t)) for name, t in self.state_dict().items()}
        for prefix, module in self.named_modules():
            replaced = getattr(module, "replaced", None)
            if replaced is not None:
                samples = {k: v for k, v in samples.items() if not k.startswith(prefix + ".")}
                samples.update({f"{prefix}.{k}": v for k, v in replaced.items()})
        return samples

    def refresh_fingerprint(self) -> str:
        """Recompute the identity after the weights changed (training); states made before won't load."""
        self._fingerprint = None
        return self.fingerprint

    # ----- the four steps, batched --------------------------------------------------------

    def embed(self, ids: Tensor) -> Tensor:
        return self.backbone.get_input_embeddings()(ids.to(self.device))

    @property
    def base_model(self) -> nn.Module:
        """The backbone without its LM head (inside a peft wrapper during LoRA training)."""
        backbone: Any = self.backbone  # a PreTrainedModel, or peft's wrapper of one during LoRA training
        if hasattr(backbone, "get_base_model"):
            backbone = backbone.get_base_model()
        return backbone.base_model

    def lm_logits(self, hidden: Tensor) -> Tensor:
        """The backbone's LM head on final hidden states [..., d], as its own forward computes logits."""
        logits = self.backbone.get_output_embeddings()(hidden)
        softcap = getattr(self.backbone.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def _last_hidden(self, inputs_embeds: Tensor) -> Tensor:
        """Final (post-norm) hidden state at the last position, without computing logits."""
        return self.base_model(inputs_embeds=inputs_embeds, use_cache=False).last_hidden_state[:, -1]

    def summary_queries(self, tokens: Tensor) -> Tensor:
        """Step 1 for a batch of token rows [B, t] (already cut to at most summary_tokens)."""
        batch = tokens.shape[0]
        prompt = self.summary_prompt.to(self.dtype).expand(batch, 1, self.dim)
        return self._last_hidden(torch.cat([prompt, self.embed(tokens), prompt], dim=1))

    def recall(self, queries: Tensor, memories: Tensor, lengths: Tensor) -> Recall:
        """Step 2. queries [B, d]; memories [B, n, d] left-aligned, row b valid up to lengths[b]."""
        batch = queries.shape[0]
        if memories.shape[1] == 0:
            initial = self.initial_memory.to(self.dtype).expand(batch, self.dim)
            none = torch.zeros(batch, 0, device=self.device)
            return Recall(initial, torch.zeros(batch, dtype=torch.long, device=self.device), none.long(), none)
        rdtype = getattr(torch, self.hmt_config.recall_dtype)
        mem = memories.to(self.device, rdtype)
        lengths = lengths.to(self.device)
        probs = self.recall_weights(queries, mem, lengths)
        prompts = self.recalled_prompts(probs, mem, lengths, self.dtype)
        has_memory = lengths > 0
        # the float32 softmax, strongest first; a stable sort, not topk: ties keep memory order
        # (oldest first, as argmax), whatever the batch's padding
        top_weights, top_slots = probs.sort(dim=-1, descending=True, stable=True)
        top_weights, top_slots = top_weights[:, :RECALL_TOP_K], top_slots[:, :RECALL_TOP_K]
        top_slots = top_slots.masked_fill(top_slots >= lengths[:, None], -1)  # past a row's memory: no slot
        distances = torch.where(has_memory, lengths - top_slots[:, 0], 0)
        return Recall(prompts, distances, top_slots, top_weights.masked_fill(top_slots < 0, 0.0))

    def recalled_prompts(self, weights: Tensor, memories: Tensor, lengths: Tensor, dtype: torch.dtype) -> Tensor:
        """Step 2's prompts [B, d] in `dtype`: the memories [B, n, d] averaged by recall's weights [B, n] (in
        the memories' dtype), as the backbone reads them; the initial memory where a row has none."""
        mixed = self.injected(torch.einsum("bn,bnd->bd", weights.to(memories.dtype), memories).to(dtype))
        initial = self.initial_memory.to(dtype).expand_as(mixed)
        return torch.where((lengths.to(self.device) > 0)[:, None], mixed, initial)

    def injected(self, memories: Tensor) -> Tensor:
        """Memories as the backbone reads them at a window's prompt positions: as they are, or times the learned
        scale (HMTConfig.memory_input_scale)."""
        if self.memory_log_scale is None:
            return memories
        return memories * self.memory_log_scale.exp().to(memories.dtype)

    def add_memory_input_scale(self, initial: float) -> None:
        """Give a model without one the learned memory input scale, starting at `initial`."""
        if self.memory_log_scale is not None:
            raise InvalidInputError("this model already scales the memories it reads")
        self.hmt_config = replace(self.hmt_config, memory_input_scale=initial)
        self.memory_log_scale = nn.Parameter(torch.tensor(math.log(initial), device=self.device))
        self._fingerprint = None

    def add_sink_token(self, token: int) -> None:
        """Read this model's windows behind an attention-sink token from now on (HMTConfig.sink_token)."""
        if self.hmt_config.sink_token is not None:
            raise InvalidInputError(f"this model already reads its windows behind a sink token "
                                    f"({self.hmt_config.sink_token})")
        config = replace(self.hmt_config, sink_token=token)
        self._check_sink_token(config, self.vocab_size)
        self.hmt_config = config
        self._fingerprint = None

    @staticmethod
    def _check_sink_token(config: HMTConfig, vocab_size: int) -> None:
        if config.sink_token is not None and config.sink_token >= vocab_size:
            raise InvalidInputError(f"sink_token {config.sink_token} is outside the vocabulary [0, {vocab_size})")

    def own_parameters(self) -> list[Tensor]:
        """HMT's parameters beside the backbone's: what its training always updates."""
        own: list[Tensor] = [self.initial_memory, self.summary_prompt, self.recall_wq.weight, self.recall_wk.weight]
        return own + ([self.memory_log_scale] if self.memory_log_scale is not None else [])

    def recall_weights(self, queries: Tensor, memories: Tensor, lengths: Tensor) -> Tensor:
        """Recall's float32 softmax over the memories [B, n] (0 past each row's length): what step 2
        averages the memories by, and what a recall loss trains against the slot that should win."""
        rdtype = getattr(torch, self.hmt_config.recall_dtype)
        xq = queries.to(rdtype) @ self.recall_wq.weight.to(rdtype).t()  # [B, h]
        mk = memories.to(self.device, rdtype) @ self.recall_wk.weight.to(rdtype).t()  # [B, n, h]
        scores = torch.einsum("bh,bnh->bn", xq, mk) / self.recall_divisor
        valid = torch.arange(memories.shape[1], device=self.device)[None, :] < lengths.to(self.device)[:, None]
        probs = torch.softmax(scores.float().masked_fill(~valid, float("-inf")), dim=-1)
        return torch.nan_to_num(probs)  # rows with no memory are all -inf

    def prompt_prefix(self, prompts: Tensor) -> Tensor:
        """What a window is read after, [B, prompt_positions, d]: the memory prompts [B, d], behind the
        sink token where the configuration has one (HMTConfig.sink_token)."""
        p = prompts[:, None, :].to(self.dtype)
        sink = self.hmt_config.sink_token
        if sink is None:
            return p
        sink_embed = self.embed(torch.tensor([[sink]], device=self.device)).to(self.dtype)
        return torch.cat([sink_embed.expand(p.shape[0], 1, -1), p], dim=1)

    def _segment_embeds(self, prompts: Tensor, sensory: Tensor | None, tokens: Tensor) -> Tensor:
        parts = [self.prompt_prefix(prompts)]
        if sensory is not None and sensory.shape[1] > 0:
            parts.append(self.embed(sensory))
        parts += [self.embed(tokens), prompts[:, None, :].to(self.dtype)]
        return torch.cat(parts, dim=1)

    def window_logits(self, tokens: Tensor) -> Tensor:
        """A window read by the backbone alone (window-only; Temp-LoRA with its adapters applied)."""
        return self.backbone(input_ids=tokens.to(self.device), use_cache=False).logits

    # ----- Temp-LoRA sessions (memory "temp-lora") ---------------------------------------------

    def fresh_adapter(self) -> Adapter:
        """A new session's adapter: B = 0, so it changes nothing until the first commit."""
        fresh = self._fresh_adapter
        if fresh is None or next(iter(fresh.a.values())).device != self.device:  # made once per device
            assert self.hmt_config.temp_lora is not None, "only a model whose memory adapts has adapters"
            fresh = self._fresh_adapter = new_adapter(self.backbone, self.hmt_config.temp_lora).to(self.device)
        return fresh

    def with_memory(self, kind: MemoryKind, temp_lora: TempLoRAConfig | None = None) -> HMTModel:
        """This model read with another kind of memory: the same backbone and HMT weights (shared, not
        copied), a configuration that differs only in its memory and Temp-LoRA settings. How a trained
        HMT model becomes an HMT+Temp-LoRA one, and how `hmt eval` reads one model several ways."""
        lora = (temp_lora or self.hmt_config.temp_lora or TempLoRAConfig()) if memory_of(kind).adapts else None
        other = HMTModel(self.backbone, replace(self.hmt_config, memory=kind, temp_lora=lora), self.tokenizer)
        for name, child in self.named_children():
            setattr(other, name, child)
        for name, parameter in self.named_parameters(recurse=False):
            setattr(other, name, parameter)
        other.backbone_deltas = self.backbone_deltas
        other.training = self.training  # the flag only: train() would recurse into the shared backbone
        return other

    def trained_adapters(self, adapters: Sequence[Adapter], contexts: Tensor | Sequence[Sequence[int]] | None,
                         windows: Tensor | Sequence[Sequence[int]], prompts: Tensor | None = None) -> list[Adapter]:
        """A commit of each row's window into its adapter: a few gradient steps each, one session at a
        time (each row trains its own weights, so there is no shared forward to batch). prompts [B, d]:
        each window's memory prompt, read before it as the window is (HMT+Temp-LoRA; `prompt_prefix`)."""
        lora = self.hmt_config.temp_lora
        assert lora is not None
        rows = [list(map(int, w)) for w in windows]
        contexts_ = [[] for _ in rows] if contexts is None else [list(map(int, c)) for c in contexts]
        prompts_ = [None] * len(rows) if prompts is None else list(self.prompt_prefix(prompts))
        return [train_adapter(self.backbone, adapter, context, window, lora, prompt)[0]
                for adapter, context, window, prompt in zip(adapters, contexts_, rows, prompts_, strict=True)]

    def segment_memories(self, prompts: Tensor, sensory: Tensor | None, tokens: Tensor) -> Tensor:
        """Step 3 when only the new memory m_n is wanted (commits): no logits computed."""
        return self._last_hidden(self._segment_embeds(prompts, sensory, tokens))

    def segment_logits(self, prompts: Tensor, sensory: Tensor | None,
                       tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Step 3 with logits at the token positions: returns (logits [B, t, V], memory [B, d])."""
        t = tokens.shape[1]
        hidden = self.base_model(inputs_embeds=self._segment_embeds(prompts, sensory, tokens),
                                 use_cache=False).last_hidden_state
        return self.lm_logits(hidden[:, -t - 1:-1]), hidden[:, -1]

    def recall_for(self, ltms: Sequence[Tensor], query_tokens: Sequence[Sequence[int]]) -> Recall:
        """Steps 1-2 for several sessions: the memory prompts of their windows, by this model's
        memory. For HMT: summary queries from query_tokens[:s] (rows of equal length share a
        forward, never padded), then recall over each session's long-term memory."""
        queries = None
        if self.memory.prompt_reads_window:
            summary = self.hmt_config.summary_tokens
            heads = [list(tokens)[:summary] for tokens in query_tokens]
            queries = torch.empty(len(heads), self.dim, dtype=self.dtype, device=self.device)
            for length in sorted({len(head) for head in heads}):
                rows = [i for i, head in enumerate(heads) if len(head) == length]
                ids = torch.tensor([heads[i] for i in rows], dtype=torch.long, device=self.device)
                queries[torch.tensor(rows, device=self.device)] = self.summary_queries(ids)
        lengths = torch.tensor([ltm.shape[0] for ltm in ltms], device=self.device)
        # float32 as the states keep them: recall reads them at full precision whatever the backbone's
        memories = torch.zeros(len(ltms), int(lengths.max()), self.dim, device=self.device)
        for row, ltm in enumerate(ltms):
            memories[row, :ltm.shape[0]] = ltm.to(self.device, torch.float32)
        return self.memory.prompts(self, memories, lengths, queries)

    # ----- whole-sequence scoring (teacher-forced, as the reference evaluates) ------------

    def check_tokens(self, tokens: Sequence[int] | Tensor) -> Tensor:
        try:
            ids = torch.as_tensor(tokens) if not isinstance(tokens, Tensor) else tokens
        except (RuntimeError, OverflowError, ValueError):  # an int beyond int64: out of any vocabulary
            bad = next((t for t in tokens if isinstance(t, int) and not 0 <= t < self.vocab_size), None)
            if bad is None:
                raise
            raise InvalidInputError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})") from None
        if ids.numel() == 0:
            raise InvalidInputError("no tokens given")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise InvalidInputError(f"token ids must be integers, got {ids.dtype}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise InvalidInputError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return ids.long()

    @torch.no_grad()
    def score(self, input_ids: Tensor) -> ScoreOutput:
        """Logits at every position and the memory written by every segment, as the reference."""
        return self.forward_segments(self.check_tokens(input_ids))

    def forward_segments(self, input_ids: Tensor, memory: Memory | MemoryKind | None = None,
                         bptt_depth: int | None = None) -> ScoreOutput:
        """Teacher-forced pass over [B, T] tokens, segment by segment (differentiable).

        memory: how segments are linked (`hmt_core.memory`); default this model's own. "hmt": the
        reference's four steps; "rmt": each segment's memory prompt is the previous segment's memory
        (HMT's stage-1 training); "window": the backbone alone on each L-token segment (the baseline).
        bptt_depth: memories written before the last bptt_depth segments are detached, so gradients
        flow back through at most that many segments of memory (the reference's truncation).
        """
        if input_ids.dim() != 2:
            raise InvalidInputError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        reader = self.memory if memory is None else memory if isinstance(memory, Memory) else memory_of(memory)
        ids = input_ids.to(self.device)
        cfg = self.hmt_config
        batch = ids.shape[0]
        memories: list[Tensor] = []
        logits: list[Tensor] = []
        distances: list[Tensor] = []
        sensory: Tensor | None = None
        starts = range(0, ids.shape[1], cfg.segment_tokens)
        queries = self._all_summary_queries(ids, starts) if reader.prompt_reads_window else []
        kept = reader.rows_kept(cfg.ltm_context)
        keep = cfg.num_sensory if reader.has_sensory else 0  # the reader's kind, not the model's
        adapters = [self.fresh_adapter()] * batch if reader.adapts else []
        for index, start in enumerate(starts):
            segment = ids[:, start:start + cfg.segment_tokens]
            if not reader.has_prompt:
                read = segment if sensory is None else torch.cat([sensory, segment], dim=1)
                with adapters_applied(self.backbone, adapters):
                    logits.append(self.window_logits(read)[:, read.shape[1] - segment.shape[1]:])
                if adapters and index < len(starts) - 1:  # commit: each row's adapter learns its window
                    adapters = self.trained_adapters(adapters, sensory, segment)
                sensory = segment[:, segment.shape[1] - keep:] if keep else None
                continue
            ltm = torch.stack(memories[-kept:], dim=1) if memories else \
                torch.zeros(batch, 0, self.dim, dtype=self.dtype, device=self.device)
            recalled = reader.prompts(self, ltm, torch.full((batch,), ltm.shape[1], device=self.device),
                                      queries[index] if queries else None)
            with adapters_applied(self.backbone, adapters):
                segment_logits, new_memory = self.segment_logits(recalled.prompts, sensory, segment)
            if adapters and index < len(starts) - 1:  # then the adapters learn the window as it was read
                adapters = self.trained_adapters(adapters, sensory, segment, recalled.prompts)
            if bptt_depth is not None and index < len(starts) - bptt_depth:
                new_memory = new_memory.detach()  # only the last bptt_depth segments' memory writes get gradients
            logits.append(segment_logits)
            memories.append(new_memory)
            distances.append(recalled.distances)
            sensory = segment[:, segment.shape[1] - keep:] if keep else None
        empty = torch.zeros(batch, 0, device=self.device)
        return ScoreOutput(torch.cat(logits, dim=1),
                           torch.stack(memories, dim=1) if memories else empty[..., None],
                           torch.stack(distances, dim=1) if distances else empty.long())

    def _all_summary_queries(self, ids: Tensor, starts: range) -> list[Tensor]:
        """Step 1 for every segment at once: a query needs only its own segment's tokens."""
        cfg = self.hmt_config
        heads = [ids[:, start:start + cfg.segment_tokens][:, :cfg.summary_tokens] for start in starts]
        same = [i for i, head in enumerate(heads) if head.shape[1] == heads[0].shape[1]]
        stacked = self.summary_queries(torch.cat([heads[i] for i in same])).split(ids.shape[0])
        queries = dict(zip(same, stacked, strict=True))
        # only a short trailing segment can have a shorter head
        return [queries[i] if i in queries else self.summary_queries(heads[i]) for i in range(len(heads))]

    # ----- sessions ----------------------------------------------------------------------

    def new_session(self) -> SessionState:
        adapter = self.fresh_adapter() if self.memory.adapts else None
        return SessionState.empty(self.dim, self.fingerprint, self.hmt_config.memory, adapter)

    def check_session(self, state: SessionState) -> None:
        """Raises ModelMismatchError or CorruptStateError for a state this model could not have made."""
        state.check_model(self.fingerprint, self.hmt_config, self.dim, self.vocab_size)
        if state.adapter is not None and state.adapter.modules != self.fresh_adapter().modules:
            raise CorruptStateError("session state adapter does not fit this model's backbone")

    @torch.no_grad()
    def commit_windows(self, states: Sequence[SessionState]) -> tuple[list[SessionState], list[SegmentRecall]]:
        """Commit the full windows of several sessions in one backbone pass per step.

        Returns the new states and each commit's recall (top slots, weights, distance). The result
        equals committing them one at a time (rows only differ in sensory length 0 vs k, grouped, never padded).
        The states are the engine's: checked where they entered it (`begin_append`, `DecodeEngine.add`,
        or `check_session`), so a commit, which runs once per window, does not check them again.
        """
        cfg = self.hmt_config
        if not states:
            return [], []
        for state in states:
            if len(state.window) != cfg.segment_tokens:
                raise InvalidInputError(
                    f"only a full window can be committed ({len(state.window)} of {cfg.segment_tokens} tokens)")
        if not self.memory.has_prompt:  # no memory embedding is read or written
            committed = [state.after_commit(None, cfg) for state in states]
            if self.memory.adapts:  # the adapter learns the window, read after the sensory tokens
                adapters = self.trained_adapters([s.adapter for s in states],  # type: ignore[misc]
                                                 [s.sensory for s in states], [s.window for s in states])
                committed = [replace(c, adapter=a) for c, a in zip(committed, adapters, strict=True)]
            return committed, [SegmentRecall(state.segments_committed, (), ()) for state in states]
        windows = torch.tensor([s.window for s in states], dtype=torch.long, device=self.device)
        recalled = self.recall_for([s.ltm for s in states], [s.window for s in states])
        new_memories = torch.empty(len(states), self.dim, dtype=self.dtype, device=self.device)
        for sensory_len in sorted({len(s.sensory) for s in states}):
            rows = [i for i, s in enumerate(states) if len(s.sensory) == sensory_len]
            index = torch.tensor(rows, device=self.device)
            sensory = torch.tensor([states[i].sensory for i in rows], dtype=torch.long, device=self.device) \
                if sensory_len else None
            with adapters_applied(self.backbone, [states[i].adapter for i in rows] if self.memory.adapts else []):
                new_memories[index] = self.segment_memories(recalled.prompts[index], sensory, windows[index])
        committed = [state.after_commit(new_memories[row], cfg) for row, state in enumerate(states)]
        if self.memory.adapts:  # HMT+Temp-LoRA: the adapter learns the window read after its prompt
            adapters = self.trained_adapters([s.adapter for s in states], [s.sensory for s in states],  # type: ignore[misc]
                                             [s.window for s in states], recalled.prompts)
            committed = [replace(c, adapter=a) for c, a in zip(committed, adapters, strict=True)]
        return committed, recalled.traces([s.segments_committed for s in states], [s.ltm.shape[0] for s in states])

    # ----- the facade ----------------------------------------------------------------------
    # append, generate, from_hmt_pytorch, from_pretrained and save_pretrained are conveniences over
    # hmt_core.engine, hmt_core.generation and hmt_core.checkpoint, which build on this module: they
    # import those inside the method, so that importing this module never imports them (the only
    # imports inside functions in hmt_core; tests/test_layering.py keeps it so).

    def append(self, state: SessionState, tokens: Sequence[int] | Tensor) -> SessionState:
        """Append tokens to a session, committing full windows lazily. Returns a new state."""
        from hmt_core.engine import advance_appends, begin_append

        task = begin_append(self, state, self.check_tokens(tokens))
        while not task.done:
            advance_appends(self, [task])
        if task.error is not None:
            raise task.error
        return task.state

    def generate(self, state: SessionState, params: SamplingParams | None = None) -> Generation:
        """Stream tokens from a session's open window; see hmt_core.generation."""
        from hmt_core.generation import Generation, SamplingParams

        return Generation(self, state, params or SamplingParams())

    # ----- loading and saving (implemented in hmt_core.checkpoint) --------------------------

    @classmethod
    def from_hmt_pytorch(cls, path: str | Path, backbone: PretrainedConfig | str | Path,
                         config: HMTConfig, lora_alpha: float = 32.0,
                         dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> HMTModel:
        from hmt_core.checkpoint import load_hmt_pytorch

        return load_hmt_pytorch(cls, path, backbone=backbone, config=config, lora_alpha=lora_alpha,
                                dtype=dtype, device=device)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, precision: str | None = None) -> HMTModel:
        """precision: "fp32", "bf16", "int8" or "int4" weights for the backbone (hmt_core.precision)."""
        from hmt_core.checkpoint import load_pretrained

        return load_pretrained(cls, name_or_path, dtype=dtype, device=device, precision=precision)

    def save_pretrained(self, directory: str | Path, include_backbone: bool = True) -> None:
        from hmt_core.checkpoint import save_pretrained

        save_pretrained(self, directory, include_backbone=include_backbone)
