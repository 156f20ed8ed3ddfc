"""Continuous batching: the engine's unit of work is a batch of sessions, not one session.

Two kinds of work, each one batched forward per step:
- appends (`AppendTask`, `advance_appends`): every session with input to read commits one full
  window, all of them in one `HMTModel.commit_windows` call;
- decoding (`DecodeEngine`): every generating session is a row with its own window, cache slot,
  sampling parameters, seed, stop strings and detokenizer; one `step()` samples a token for every
  row at once and advances them all with one backbone forward. Rows join and leave between steps.

HMT bounds a session's open window to `[p, E(sensory), E(W)]` (`[E(sink), p, ...]` with a sink token), at
most 1 + k + L positions (2 + k + L), so the KV cache is static: one preallocated slot per row (`SlotCache`),
no paging. A row whose window is full commits and re-prefills its slot (batched with the others that filled on
the same step).
When the slot's memory prompt is the commit's own (the request began with the summary's tokens in
its window), the commit is one more position of the step's decode forward, not two long forwards.
Rows stay packed in slots 0..n-1, so a decode forward reads contiguous views.
Per token there is one host synchronisation for the whole batch: reading the sampled ids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor
from transformers import AttentionInterface, PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hmt_core.errors import InvalidInputError
from hmt_core.fast_decode import LeanWeights, decode_step, lean_support, lean_weights_for
from hmt_core.model import HMTModel
from hmt_core.recall import SegmentRecall
from hmt_core.sampling import FinishReason, GeneratedToken, SamplingParams, TextStream, sample_tokens, seed_key
from hmt_core.session import SessionState, fill_window
from hmt_core.temp_lora import Adapter, StackedAdapters, adapters_applied

log = logging.getLogger(__name__)

# ----- appends -------------------------------------------------------------------------------


@dataclass(eq=False)  # identity matters: tasks are kept in lists by the scheduler
class AppendTask:
    """A session reading its input: the window is filled, `rest` waits for the next commits."""

    state: SessionState
    rest: list[int]
    segments: int = 0  # committed by this task so far
    recalls: list[SegmentRecall] = field(default_factory=list)  # the recall of each of those commits
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return not self.rest or self.error is not None

    @property
    def distances(self) -> list[int]:
        return [recall.distance for recall in self.recalls]


def begin_append(model: HMTModel, state: SessionState, tokens: Sequence[int] | Tensor,
                 checked: bool = False) -> AppendTask:
    """Validate, bump the version and fill the open window; commits come with `advance_appends`.
    The state enters the engine here: it is checked (`HMTModel.check_session`) unless the caller
    already did (`checked`), and never again while the engine works on it."""
    if not checked:
        model.check_session(state)
    ids = model.check_tokens(tokens).reshape(-1).tolist() if len(tokens) else []
    state, rest = fill_window(state.bumped(), ids, model.hmt_config)
    return AppendTask(state, rest)


def advance_appends(model: HMTModel, tasks: Sequence[AppendTask]) -> list[AppendTask]:
    """Commit one window for each task with input left, in one batched forward, and refill.

    If the batch fails, each task is retried alone, so one bad session fails only itself.
    Returns the tasks that advanced (a failed one has `.error` set instead)."""
    pending = [t for t in tasks if not t.done]
    if not pending:
        return []
    try:
        results = list(zip(pending, *model.commit_windows([t.state for t in pending]), strict=True))
    except Exception as exc:
        if len(pending) == 1:
            pending[0].error = exc
            return []
        return [t for task in pending for t in advance_appends(model, [task])]
    for task, state, recall in results:
        task.state, task.rest = fill_window(state, task.rest, model.hmt_config)
        task.segments += 1
        task.recalls.append(recall)
    return pending


# ----- the static slot cache ----------------------------------------------------------------------


class _SlotLayer(CacheLayerMixin):
    """One layer's keys and values for every slot: [slots, heads, columns, head_dim], allocated once."""

    is_compileable = True
    is_sliding = False
    # narrower than the base's Tensor | None: allocated by lazy_initialization before any use
    keys: Tensor
    values: Tensor

    def __init__(self, owner: SlotCache) -> None:
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        shape = (self.owner.capacity, key_states.shape[1], self.owner.columns)
        self.keys = key_states.new_zeros(*shape, key_states.shape[-1])
        self.values = value_states.new_zeros(*shape, value_states.shape[-1])
        torch._dynamo.mark_static_address(self.keys)  # fixed addresses: CUDA graphs can replay over them
        torch._dynamo.mark_static_address(self.values)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: object,
               **kwargs: object) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self.owner
        if owner.prefill_slots is not None:  # rows start from empty: attend to the new positions only
            length = key_states.shape[2]
            self.keys[owner.prefill_slots, :, :length] = key_states
            self.values[owner.prefill_slots, :, :length] = value_states
            return key_states, value_states
        rows = owner.decode_rows
        self.keys[rows, :, owner.decode_positions] = key_states[:, :, 0]
        self.values[rows, :, owner.decode_positions] = value_states[:, :, 0]
        return self.keys[:len(rows)], self.values[:len(rows)]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0  # prefill only: decode passes its own 4D mask

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return self.owner.columns

    def move(self, source: int, target: int) -> None:
        if self.is_initialized:
            self.keys[target] = self.keys[source]
            self.values[target] = self.values[source]


class SlotCache(Cache):
    """A transformers Cache with one slot per row, written at each row's own position.

    Prefill (`prefill_slots` set): the rows' sequences start at position 0 of their slots.
    Decode (`decode_positions` set): row i writes its one new token at its own position; the
    caller's 4D mask says which columns each row sees."""

    def __init__(self, num_layers: int, capacity: int, columns: int) -> None:
        self.capacity, self.columns = capacity, columns
        self.prefill_slots: Tensor | None = None
        self.decode_rows = torch.zeros(0, dtype=torch.long)
        self.decode_positions = torch.zeros(0, dtype=torch.long)
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])

    def move(self, source: int, target: int) -> None:
        for layer in cast("list[_SlotLayer]", self.layers):  # __init__ gives it _SlotLayers only
            layer.move(source, target)


# ----- decode attention ---------------------------------------------------------------------------

DECODE_ATTENTION = "hmt_decode"


def decode_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                     attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' sdpa, except for one-token queries on the CPU: plain matmul attention with
    the query heads grouped per KV head ([rows, kv, group, d] @ keys), KV never repeated.

    Why: for q_len 1 transformers (5.x) packs the group into SDPA's query-length axis, and the CPU
    flash kernel is slow on such tiny queries (SmolLM shape, 32 rows x 290 columns: 0.67 vs 0.53 ms
    a layer on 2 threads; 4.9 vs 3.6 ms for a 12-head MHA model on 1). Anything else, literally sdpa."""
    if (query.shape[2] != 1 or query.device.type != "cpu" or dropout or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, _, dim = query.shape
    kv_heads, columns = key.shape[1], key.shape[2]
    scale = dim ** -0.5 if scaling is None else scaling
    grouped = (query * scale).reshape(rows, kv_heads, heads // kv_heads, dim)  # head h reads KV head h // group
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float()  # [rows, kv, group, columns]
    if attention_mask is not None:
        mask = attention_mask[..., :columns]
        if mask.shape[1] != 1:  # per-head mask: the same grouping as the query
            mask = mask.reshape(mask.shape[0], kv_heads, heads // kv_heads, columns)
        bool_mask = mask.dtype == torch.bool  # scores is a fresh tensor: masked in place
        scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min) if bool_mask else scores.add_(mask)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)  # float32 softmax, as eager attention does
    return torch.matmul(probs, value).reshape(rows, 1, heads, dim), None  # sdpa's layout: [rows, q, heads, d]


AttentionInterface.register(DECODE_ATTENTION, decode_attention)


@contextmanager
def decode_attention_for(backbone: torch.nn.Module) -> Iterator[None]:
    """Run the backbone's sdpa attention as `decode_attention` inside the block (other
    implementations, and architectures that do not go through AttentionInterface, are untouched)."""
    config = cast(PretrainedConfig, backbone.config)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    config._attn_implementation = DECODE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


# ----- decoding ---------------------------------------------------------------------------------


@dataclass(eq=False)
class DecodeRow:
    """One generating session. `state` always equals the session with `tokens` appended."""

    state: SessionState
    params: SamplingParams
    key: int  # the row's random-number key (from its seed)
    text: TextStream
    stop_ids: frozenset[int]
    query: tuple[int, ...] = ()  # tokens whose summary recalled the current window's memory prompt
    prompt: Tensor | None = None  # that prompt p (at position 0 of the slot), and its recall
    prompt_recall: SegmentRecall | None = None
    tokens: list[int] = field(default_factory=list)
    commit_recalls: list[SegmentRecall] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    slot: int = -1
    length: int = 0  # cache positions in use: [p, sensory, window]
    log_prob: float | None = None  # of the last forced token

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    @property
    def commit_distances(self) -> list[int]:
        return [recall.distance for recall in self.commit_recalls]


@dataclass
class StepOutput:
    tokens: list[tuple[DecodeRow, GeneratedToken]]  # one per row that took part
    failed: list[DecodeRow]  # rows that left with `.error` set
    commits: int = 0  # windows committed during the step


class DecodeEngine:
    """A decode batch of up to `max_rows` sessions over one static slot cache.

    `lean` (the default): a Llama-family backbone decodes with `hmt_core.fast_decode`'s plain
    functions instead of its HuggingFace forward (same numbers, a fraction of the op calls); other
    backbones, and Temp-LoRA sessions, decode on the HF path (`lean_reason` says why).

    `compile=True` pads every decode forward to a power-of-two number of rows (capped at
    `max_rows`), so its shapes take a handful of values and rows joining or leaving within a bucket
    do not recompile, and runs the decode forward through `torch.compile`: on a CPU the lean step
    where it applies, on CUDA the HF forward under CUDA graphs (the GPU path). `warm_up()` compiles
    every bucket up front and reports how long it took (`compile_seconds`)."""

    def __init__(self, model: HMTModel, max_rows: int = 16, compile: bool = False, lean: bool = True,
                 compile_backend: str | Callable[..., Any] = "inductor") -> None:
        if max_rows < 1:
            raise InvalidInputError(f"max_rows must be >= 1, got {max_rows}")
        self.model = model
        self.max_rows = max_rows
        if compile and model.memory.adapts:
            raise InvalidInputError("Temp-LoRA sessions decode uncompiled: their adapters are forward hooks")
        self.compiled = compile
        self.recoveries = 0  # decode forwards that failed and were redone as prefills
        self.lean_reason = lean_support(model) if lean else "lean=False"  # None: the lean step decodes
        if compile and model.device.type == "cuda" and self.lean_reason is None:
            # the GPU path as it was (CUDA graphs over the HF forward); a compiled lean step is unmeasured there
            self.lean_reason = "compile on CUDA: the HF forward under CUDA graphs"
        self.compile_seconds = 0.0  # spent compiling in warm_up()
        self._lean_step: Callable[..., Tensor] = decode_step
        self._decode_forward = self._backbone_decode if self.lean_reason else self._lean_decode
        if compile:
            # each model, precision and bucket compiles once: more than dynamo's default 8 per function
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            mode = "reduce-overhead" if model.device.type == "cuda" else None
            if self.lean_reason:
                self._decode_forward = torch.compile(self._backbone_decode, mode=mode, dynamic=False,
                                                     backend=compile_backend)
            else:
                self._lean_step = torch.compile(decode_step, dynamic=False, backend=compile_backend)
        cfg = model.hmt_config
        self.columns = cfg.prompt_positions + cfg.num_sensory + cfg.segment_tokens + 1  # last: scratch for idle rows
        self.scratch = self.columns - 1
        self.rows: list[DecodeRow] = []  # rows[i].slot == i, logits ready
        self.joining: list[DecodeRow] = []  # added, prefilled at the next step
        self._cache: SlotCache | None = None
        self._logits: Tensor | None = None  # [max_rows, V] float32, next-token logits per slot
        self._stacked: StackedAdapters | None = None  # the last decode forward's adapters, stacked
        self._lean_weights: LeanWeights | None = None

    # ----- membership ---------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self.rows) + len(self.joining)

    @property
    def has_room(self) -> bool:
        return self.size < self.max_rows

    def add(self, state: SessionState, params: SamplingParams, checked: bool = False) -> DecodeRow:
        """A session joins (prefilled at the next step). Raises InvalidInputError for a bad request.
        The state is checked (`HMTModel.check_session`) unless the caller already did (`checked`)."""
        model = self.model
        if not checked:
            model.check_session(state)
        if not state.window:
            raise InvalidInputError("the session has no tokens yet: append a prompt before generating")
        if params.stop and model.tokenizer is None:
            raise InvalidInputError("stop strings need a model with a tokenizer")
        for token in params.stop_token_ids:
            model.check_tokens([token])
        if not self.has_room:
            raise RuntimeError(f"the decode batch is full ({self.max_rows} rows)")
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else model.eos_token_ids)
        row = DecodeRow(state.bumped(), params, seed_key(params.seed), TextStream(model.tokenizer, params.stop),
                        frozenset(stop_ids), query=state.window)
        self.joining.append(row)
        return row

    def remove(self, row: DecodeRow) -> None:
        """A row leaves between steps (cancelled, or finished by its owner)."""
        if row in self.joining:
            self.joining.remove(row)
        elif row.slot >= 0:
            self._release(row)

    def logits_of(self, row: DecodeRow) -> Tensor:
        """The row's next-token logits [V] (after it was prefilled)."""
        if row.slot < 0 or self._logits is None:
            raise InvalidInputError("the row has no logits: it has not been prefilled or has left")
        return self._logits[row.slot]

    # ----- one step ---------------------------------------------------------------------------

    @torch.no_grad()
    def admit(self) -> list[DecodeRow]:
        """Prefill the joining rows (one batched forward); returns those that failed."""
        joining, self.joining = self.joining, []
        for row in joining:
            row.slot = len(self.rows)
            self.rows.append(row)
        return self._prefill(joining)

    @torch.no_grad()
    def step(self, forced: dict[DecodeRow, int] | None = None,
             masks: dict[DecodeRow, Tensor] | None = None) -> StepOutput:
        """One token for every row: sample (or take `forced`), append, commit full windows, and
        compute every row's next logits with one decode forward. Finished rows leave. `masks`: a
        row's allowed tokens (bool [V], at least one True), e.g. a grammar's: the row samples from
        its logits restricted to them, with its own parameters, in the same batched draw as the rest
        (masked in place: every row's logits are recomputed by this step's forward)."""
        failed = self.admit()
        if not self.rows:
            return StepOutput([], failed)
        rows, cfg = list(self.rows), self.model.hmt_config
        logits = self._logits[:len(rows)]  # type: ignore[index]
        for row, allowed in (masks or {}).items():
            if row.slot >= 0 and row not in (forced or {}):
                logits[row.slot].masked_fill_(~allowed.to(logits.device), float("-inf"))
        ids = sample_tokens(logits, [r.params for r in rows], [r.key for r in rows], [len(r.tokens) for r in rows])
        for row, token in (forced or {}).items():
            self.model.check_tokens([token])
            row.log_prob = float(torch.log_softmax(logits[row.slot].float(), dim=-1)[token])
            ids[row.slot] = token
        emitted = []
        full: list[DecodeRow] = []
        decoding: list[DecodeRow] = []
        for row, token in zip(rows, ids.tolist(), strict=True):  # the step's one host synchronisation
            emitted.append((row, self._emit(row, token)))
            if len(row.state.window) == cfg.segment_tokens:
                full.append(row)
            else:
                row.state, _ = fill_window(row.state, [token], cfg)
                if not row.finished:
                    decoding.append(row)
        cached = [r for r in full if self._slot_holds_commit(r)]
        committed, failed_commits = self._commit([r for r in full if r not in cached])
        failed += failed_commits
        from_cache, failed_decode = self._decode(decoding, cached)
        committed += from_cache
        failed += failed_decode
        refill = [r for r in committed if not r.finished]
        for row in refill:
            row.query = row.state.sensory or row.state.window  # the newest text there is
        failed += self._prefill(refill)
        for row in rows:
            if row.finished and row.slot >= 0:
                self._release(row)
        return StepOutput(emitted, failed, len(committed))

    def _emit(self, row: DecodeRow, token: int) -> GeneratedToken:
        row.tokens.append(token)
        text, hit_stop = row.text.push(token)
        if hit_stop or token in row.stop_ids:
            row.finish_reason = "stop"
        elif len(row.tokens) >= row.params.max_tokens:
            row.finish_reason = "length"
        if row.finish_reason is not None and not hit_stop:
            text += row.text.flush()
        return GeneratedToken(token, text)

    def _slot_holds_commit(self, row: DecodeRow) -> bool:
        """Whether the row's slot already holds the commit's forward but for its last position.

        The canonical commit runs the backbone on [p_n, E(sensory), E(W), p_n], p_n recalled by
        the summary of W[:s]. The slot holds [p, E(sensory), E(W)] at the same positions, so when
        p was recalled from those same s tokens (the generate request began with at least s tokens
        in W, as a chat reply crossing a segment boundary does), p == p_n and the commit needs only
        the trailing p_n: one more position in the decode forward instead of two long forwards.
        A memory whose prompt does not read the window (RMT) always has p == p_n. HMT+Temp-LoRA commits
        canonically: its adapter trains on the window in forwards of its own."""
        if row.prompt is None:  # no prompt read: the canonical commit (which has no forward then)
            return False
        if self.model.memory.adapts:  # the adapter's training needs the canonical commit's forwards anyway
            return False
        if not self.model.memory.prompt_reads_window:  # p depends on the committed state, unchanged since
            return True
        summary = self.model.hmt_config.summary_tokens
        return len(row.query) >= summary and row.query[:summary] == row.state.window[:summary]

    def _commit(self, rows: list[DecodeRow]) -> tuple[list[DecodeRow], list[DecodeRow]]:
        """Rows whose window was full before their new token: commit (batched), then take the token.
        Returns (committed rows, failed rows)."""
        tasks = [AppendTask(row.state, [row.tokens[-1]]) for row in rows]
        advance_appends(self.model, tasks)
        committed, failed = [], []
        for row, task in zip(rows, tasks, strict=True):
            if task.error is not None:
                row.error = task.error
                failed.append(row)
                continue
            row.state = task.state
            row.commit_recalls += task.recalls
            committed.append(row)
        return committed, failed

    # ----- forwards --------------------------------------------------------------------------------

    def _ensure_buffers(self) -> SlotCache:
        if self._cache is None:
            model = self.model
            layers = model.backbone.config.get_text_config().num_hidden_layers
            self._cache = SlotCache(layers, self.max_rows, self.columns)
            self._logits = torch.zeros(self.max_rows, model.vocab_size, dtype=torch.float32, device=model.device)
        return self._cache

    def _prefill(self, rows: list[DecodeRow]) -> list[DecodeRow]:
        """[p, E(sensory), E(W)] into each row's slot from position 0, right-padded into one forward
        (causal attention: padding after a row's end never reaches its positions). On failure each
        row is retried alone, so a bad row fails only itself."""
        if not rows:
            return []
        try:
            self._prefill_batch(rows)
            return []
        except Exception as exc:
            if len(rows) == 1:
                rows[0].error = exc
                self._release(rows[0])
                return rows
            return [r for row in rows for r in self._prefill([row])]

    def _prefill_batch(self, rows: list[DecodeRow]) -> None:
        model, cache = self.model, self._ensure_buffers()
        sequences = [list(r.state.sensory) + list(r.state.window) for r in rows]
        width = max(len(s) for s in sequences)
        ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences], dtype=torch.long, device=model.device)
        embeds = model.embed(ids)
        recalled = None
        if model.memory.has_prompt:
            recalled = model.recall_for([r.state.ltm for r in rows], [r.query for r in rows])
            embeds = torch.cat([model.prompt_prefix(recalled.prompts), embeds], dim=1)
        lead = embeds.shape[1] - width  # the prompt's positions (HMTConfig.prompt_positions), else 0
        positions = torch.arange(embeds.shape[1], device=model.device).expand(len(rows), -1)
        slots = torch.tensor([r.slot for r in rows], device=model.device)
        cache.prefill_slots = slots
        try:
            with adapters_applied(model.backbone, self._adapters(rows)):
                hidden = model.base_model(inputs_embeds=embeds, position_ids=positions, past_key_values=cache,
                                          use_cache=True).last_hidden_state
        finally:
            cache.prefill_slots = None
        ends = torch.tensor([lead + len(s) - 1 for s in sequences], device=model.device)  # each row's last position
        last = hidden[torch.arange(len(rows), device=model.device), ends]
        self._logits[slots] = model.lm_logits(last).float()  # type: ignore[index]
        if recalled is not None:
            traces = recalled.traces([r.state.segments_committed for r in rows], [r.state.ltm.shape[0] for r in rows])
        for i, (row, sequence) in enumerate(zip(rows, sequences, strict=True)):
            row.length = lead + len(sequence)
            if recalled is not None:
                row.prompt, row.prompt_recall = recalled.prompts[i], traces[i]

    def _decode(self, rows: list[DecodeRow],
                committing: list[DecodeRow]) -> tuple[list[DecodeRow], list[DecodeRow]]:
        """One forward over slots 0..n-1: every row in `rows` reads its newest token, every row in
        `committing` (see `_slot_holds_commit`) reads its prompt p_n, whose output is its new
        memory m_n. The other rows ride along on the scratch column and their outputs are dropped.
        Returns (committed rows, failed rows). If the forward fails, the rows re-prefill from their
        states (the same function of the state) and the committing rows commit canonically."""
        if not rows and not committing:
            return [], []
        try:
            self._decode_batch(rows, committing)
            return committing, []
        except Exception:
            log.exception("decode forward failed for %d rows: prefilling them again", len(rows) + len(committing))
            self.recoveries += 1
            for row in committing:
                row.prompt = None
            committed, failed = self._commit(committing)
            return committed, failed + self._prefill(rows)

    def _decode_batch(self, rows: list[DecodeRow], committing: list[DecodeRow]) -> None:
        model, cache = self.model, self._ensure_buffers()
        device, count = model.device, len(self.rows)
        if self.compiled:  # static shapes (`buckets`): the free slots past the last row ride along as idle rows
            count = self._bucket(count)
        tokens = [0] * count
        positions = [self.scratch] * count
        for row in rows:
            tokens[row.slot], positions[row.slot] = row.tokens[-1], row.length
        for row in committing:
            positions[row.slot] = row.length
        position_ids = torch.tensor(positions, device=device)
        mask = self._decode_mask(position_ids)
        cache.decode_rows = torch.arange(count, device=device)
        cache.decode_positions = position_ids
        embeds = model.embed(torch.tensor(tokens, device=device)[:, None])
        if committing:
            prompts = torch.stack([row.prompt for row in committing])  # type: ignore[misc]
            embeds[[row.slot for row in committing], 0] = prompts.to(embeds.dtype)
        if not self.lean_reason and not self.compiled:  # eager: attend to the columns in use only
            width = max(row.length for row in (*rows, *committing)) + 1
            hidden = self._lean_decode(embeds, mask, position_ids[:, None], width)
        elif self.compiled:  # the compiled step (lean on a CPU, HF with sdpa on CUDA) over the whole slot
            hidden = self._decode_forward(embeds, mask, position_ids[:, None])
        else:
            with decode_attention_for(model.base_model), adapters_applied(model.backbone, self._decode_adapters(count)):
                hidden = self._decode_forward(embeds, mask, position_ids[:, None])
        if rows:
            slots = torch.tensor([row.slot for row in rows], device=device)
            self._logits[slots] = model.lm_logits(hidden[slots]).float()  # type: ignore[index]
        for row in rows:
            row.length += 1
        cfg = model.hmt_config
        for row in committing:
            state = row.state.after_commit(hidden[row.slot], cfg)
            row.state, _ = fill_window(state, [row.tokens[-1]], cfg)
            assert row.prompt_recall is not None  # set with row.prompt, which this commit read
            row.commit_recalls.append(row.prompt_recall)

    def _decode_mask(self, position_ids: Tensor) -> Tensor:
        """[rows, 1, 1, columns] additive: row i sees the columns up to its own position."""
        dtype = self.model.dtype
        visible = torch.arange(self.columns, device=position_ids.device)[None, :] <= position_ids[:, None]
        mask = torch.zeros(visible.shape, dtype=dtype, device=position_ids.device)
        return mask.masked_fill(~visible, torch.finfo(dtype).min)[:, None, None, :]

    def _bucket(self, rows: int) -> int:
        return min(self.max_rows, 1 << (rows - 1).bit_length())

    def buckets(self) -> list[int]:
        """The row counts a compiled decode forward runs at: powers of two, and max_rows."""
        return sorted({self._bucket(n) for n in range(1, self.max_rows + 1)})

    @torch.no_grad()
    def warm_up(self) -> float:
        """Compile the decode forward for every bucket now, not at the first step that needs it (a
        server does this at start); returns the seconds it took, also kept in `compile_seconds`.
        Idle rows on the scratch column: no slot's contents change. Nothing to do uncompiled."""
        if not self.compiled:
            return 0.0
        model, cache = self.model, self._ensure_buffers()
        _, kv_heads, head_dim = model.attention_shape
        for layer in cast("list[_SlotLayer]", cache.layers):
            if not layer.is_initialized:
                empty = torch.zeros(1, kv_heads, 1, head_dim, dtype=model.dtype, device=model.device)
                layer.lazy_initialization(empty, empty)
        start = time.perf_counter()
        for rows in self.buckets():
            position_ids = torch.full((rows,), self.scratch, device=model.device)
            cache.decode_rows = torch.arange(rows, device=model.device)
            cache.decode_positions = position_ids
            embeds = torch.zeros(rows, 1, model.dim, dtype=model.dtype, device=model.device)
            self._decode_forward(embeds, self._decode_mask(position_ids), position_ids[:, None])
        self.compile_seconds += time.perf_counter() - start
        log.info("decode step compiled for %s rows in %.1f s (%s forward)", self.buckets(), self.compile_seconds,
                 "lean" if self.lean else "HF")
        return self.compile_seconds

    def _adapters(self, rows: Sequence[DecodeRow]) -> list[Adapter | None]:
        """Each row's Temp-LoRA adapter (read with it applied: batched multi-adapter matmuls), or none."""
        return [row.state.adapter for row in rows] if self.model.memory.adapts else []

    def _decode_adapters(self, count: int) -> list[Adapter | None] | StackedAdapters:
        """The decode forward's adapters, slot by slot: stacked once and reused across steps until a
        row joins, leaves or commits (which gives it a new adapter)."""
        adapters = self._adapters(self.rows)
        if not adapters:
            return []
        adapters += [None] * (count - len(adapters))
        if self._stacked is None or not self._stacked.holds(adapters):
            self._stacked = StackedAdapters(self.model.backbone, adapters)
        return self._stacked

    def _backbone_decode(self, inputs_embeds: Tensor, mask: Tensor, position_ids: Tensor) -> Tensor:
        """The decode forward proper: [rows, 1, d] embeddings -> final hidden states [rows, d]."""
        return self.model.base_model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                                     past_key_values=self._cache, use_cache=True).last_hidden_state[:, -1]

    @property
    def lean(self) -> bool:
        """Whether decode forwards run the lean step (`hmt_core.fast_decode`)."""
        return self.lean_reason is None

    def _lean_decode(self, inputs_embeds: Tensor, mask: Tensor, position_ids: Tensor,
                     width: int | None = None) -> Tensor:
        """The decode forward on the lean path: same arguments and result as `_backbone_decode`
        (`width`: see `fast_decode.decode_step`)."""
        layers = cast("list[_SlotLayer]", self._ensure_buffers().layers)
        if self._lean_weights is None:  # once per engine: checking the backbone for changes costs a walk of it
            self._lean_weights = lean_weights_for(self.model, self.columns)
        return self._lean_step(self._lean_weights, inputs_embeds[:, 0], mask, position_ids[:, 0],
                               [layer.keys for layer in layers], [layer.values for layer in layers], width)

    def _release(self, row: DecodeRow) -> None:
        """Free the row's slot; the last row moves into it so slots stay packed."""
        slot, last = row.slot, self.rows[-1]
        if last is not row:
            if self._cache is not None:
                self._cache.move(last.slot, slot)
                self._logits[slot] = self._logits[last.slot]  # type: ignore[index]
            last.slot = slot
            self.rows[slot] = last
        self.rows.pop()
        row.slot = -1
