"""The episode trainer: gradients only where memory is written or read (#27; shared/docs/training-on-cpu.md).

HMT's recall has no positional encoding: a memory 32 segments back differs from one 2 back only by the memories
competing with it. So distance is trained without backpropagating through 32 segments. One optimizer step reads:
- a **chain** of filler segments (book text) as a real HMT chain with the current weights, forward-only, no logits
  (bf16 where enabled): its memories are the distractors every episode of the step shares;
- per episode, a **write segment** holding a key line at a uniform random offset, read with gradients after the
  chain's first `history` memories (no logits: its memory m_w is what matters);
- per episode, one to three **question segments** at increasing distances d: read after a memory bank of the
  history, m_w and d - 1 later distractors; the question at a uniform random offset, the segment cut after the
  answer, logits only at the answer's value tokens. Its summary query reads only tokens before the answer, as
  serving computes it from the window as it stands when a reply starts;
- one plain **book segment** read after all the distractors, its LM loss on a random quarter of positions: a
  regularizer so that reading recalled memories does not damage ordinary text (the boundary milestone).

A share of steps (stage C: half) are **chat steps**: a fact stated in a user turn and acknowledged (the session's
first turn when the write has no history, else at a random offset after earlier exchanges), asked back in a
question turn followed by the reply that recalls it; chain, filler and plain row are one chat conversation about
book passages, cut into segments as a session reads it. The other steps replay pass keys over book text.

Losses, logged apart: `answer` (the value tokens), `recall` (cross-entropy of the recall softmax against m_w's
slot, HMT-pytorch's ret_loss), `bow` (m_w predicts its segment's tokens as a bag), `value_bow` (m_w predicts the
key's digits as a bag) and `lm`. Backbone matmuls under bf16 autocast, recall in float32, evaluation in float32.

Every step's data is a pure function of (seed, step), so a run resumed from a checkpoint (trainable weights and
optimizer state) continues exactly as if it had not stopped.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor

from hmt_core.errors import CheckpointError, InvalidInputError
from hmt_core.model import HMTModel
from hmt_core.tokenizer import render_chat, render_continuation
from hmt_lab.exercises import (
    HELD_OUT_FACTS,
    STANDARD_WORDING,
    TRAINING_FACTS,
    TRAINING_FILLERS,
    TRAINING_WORDINGS,
    ChatFiller,
    FillerStream,
    PasskeyWording,
    chat_fact,
    encoder,
    fact_reply,
    sentence_filler,
    value_token_indices,
)
from hmt_lab.train import TRAINER_META, TRAINER_STATE, finish_backbone, latest_checkpoint

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

BackboneTraining = Literal["lora", "full"]
STATE_FILE = TRAINER_STATE  # the checkpoint-<step>/ layout of `hmt train`, so latest_checkpoint serves both
META_FILE = TRAINER_META
LOG_FILE = "episodes_log.jsonl"

# stage -> the distances it trains (question segments after the write segment)
STAGES: dict[str, tuple[int, int]] = {"A": (1, 2), "B1": (1, 8), "B2": (1, 32), "C": (1, 16)}
# the share of steps on chat facts where a run does not say (the rest: pass keys over book text)
STAGE_FACT_SHARE: dict[str, float] = {"C": 0.5}


@dataclass(frozen=True)
class EpisodeConfig:
    stage: str = "A"
    key_digits: int = 5
    steps: int = 1000  # optimizer steps in this stage's schedule
    episodes_per_step: int = 2
    questions: int = 2  # question segments per episode (distinct distances, increasing)
    min_distance: int | None = None  # None: the stage's
    max_distance: int | None = None
    # distractor memories before the write segment: uniform in [min_history, max_history]. 0 is the key in a
    # session's first segment (the initial memory as its prompt, no sensory tokens), as often in serving
    min_history: int = 0
    max_history: int = 3
    # shorter rows than a segment (None: a full segment): a write segment of write_tokens, question rows of at
    # most question_tokens. A stage on short rows reads ~10x the episodes per CPU-second, for the reader to see
    # enough keys to generalize (on 96 keys it learned a lookup of those keys and nothing else, campaign/README)
    write_tokens: int | None = None
    question_tokens: int | None = None
    # HMT's own parameters (recall projections, summary prompt, initial memory). Recall reads final hidden states
    # (norm ~50), so one Adam step of 1e-3 on its projections moves recall scores by ~20: keep it small
    lr_hmt: float = 1e-4
    lr_backbone: float = 3e-4  # the LoRA (or the whole backbone with backbone_training "full")
    warmup_steps: int = 20
    weight_decay: float = 0.0
    backbone_training: BackboneTraining = "lora"
    lora_r: int = 8
    lora_alpha: float = 16.0
    answer_weight: float = 1.0
    # the first steps on the chat model: with recall at 0.1 and the segment's bag of words at 0.3, recall's mass
    # on the key's memory fell from 0.80 to ~0 within 4 steps as the bag-of-words gradients (norm up to 176)
    # reshaped the write memory; recall is what the answer needs, so it weighs as much as the answer
    recall_weight: float = 1.0
    bow_weight: float = 0.1
    value_bow_weight: float = 0.3
    lm_weight: float = 0.5
    # attention the answer positions pay to the memory prompt, pushed up to attention_target (a share of their
    # attention, over layers and heads) with this weight: on the chat model the reader gave p 0.2-0.3% and
    # never learned to read it (campaign/README, stage A5). 0: logged, not trained
    attention_weight: float = 0.0
    attention_target: float = 0.1
    # the share of steps whose episodes are facts stated in a chat, over a chat conversation about book passages
    # (distractors, filler and the LM row alike); the other steps are pass keys over book text. None: the
    # stage's (STAGE_FACT_SHARE, else 0)
    fact_share: float | None = None
    # a model without the learned memory input scale (HMTConfig.memory_input_scale) gets one starting here
    memory_input_scale: float | None = None
    # a model without a sink token (HMTConfig.sink_token) reads its windows behind this one: at position 0 the
    # memory prompt is the backbone's attention sink and cannot be read (#27, campaign/README.md)
    sink_token: int | None = None
    bf16: bool = True
    eval_every: int = 100  # optimizer steps between held-out evaluations (0: none)
    eval_distances: tuple[int, ...] = (2, 8, 32)
    eval_keys: int = 4
    save_every_seconds: float = 1500.0
    seed: int = 2705

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise InvalidInputError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if min(self.steps, self.episodes_per_step, self.questions, self.max_history) < 1:
            raise InvalidInputError("steps, episodes_per_step, questions and max_history must be >= 1")
        if not 0 <= self.min_history <= self.max_history:
            raise InvalidInputError(f"min_history must be in 0..max_history, got {self.min_history}")
        if not 1 <= self.key_digits <= 18:
            raise InvalidInputError(f"key_digits must be in 1..18, got {self.key_digits}")
        if self.backbone_training not in ("lora", "full"):
            raise InvalidInputError(f"backbone_training must be lora or full, got {self.backbone_training!r}")
        low, high = self.distances
        if not 1 <= low <= high:
            raise InvalidInputError(f"distances must satisfy 1 <= min <= max, got {low}..{high}")
        for name in ("write_tokens", "question_tokens"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {value}")
        if not 0.0 < self.attention_target < 1.0:
            raise InvalidInputError(f"attention_target must be in (0, 1), got {self.attention_target}")
        if not 0.0 <= self.facts <= 1.0:
            raise InvalidInputError(f"fact_share must be in [0, 1], got {self.fact_share}")
        if self.questions > high - low + 1:
            raise InvalidInputError(f"{self.questions} distinct question distances do not fit in {low}..{high}")
        if isinstance(self.eval_distances, list):  # from JSON
            object.__setattr__(self, "eval_distances", tuple(self.eval_distances))

    @property
    def distances(self) -> tuple[int, int]:
        low, high = STAGES[self.stage]
        return (self.min_distance or low, self.max_distance or high)

    @property
    def facts(self) -> float:
        """The share of steps on chat facts."""
        return STAGE_FACT_SHARE.get(self.stage, 0.0) if self.fact_share is None else self.fact_share

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpisodeConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ----- episodes: token rows, built from (seed, step) ---------------------------------------------------


@dataclass(frozen=True)
class Question:
    distance: int  # segments after the write segment: 1 is the next one
    tokens: list[int]  # the question segment, cut after the answer
    answer_start: int  # index of the answer's first token in `tokens`
    value_positions: list[int]  # indices in `tokens` of the value (digit) tokens the answer loss scores
    query_end: int  # tokens the summary query reads: min(summary_tokens, answer_start)


@dataclass(frozen=True)
class Episode:
    key: int | str  # the pass key, or the fact's value
    write: list[int]  # one full segment holding the key line (or the fact's exchange)
    key_start: int  # where the key line (the fact's exchange) starts in `write`
    values: list[int]  # the key's value (digit) token ids, or the fact value's tokens in the reply
    questions: tuple[Question, ...]


@dataclass(frozen=True)
class StepData:
    history: int  # distractor memories before the write segment
    chain: list[list[int]]  # filler segments read as an HMT chain (the distractors)
    episodes: list[Episode]
    plain: list[int]  # a book (chat) segment for the LM regularizer, read after the whole chain
    lm_positions: list[int]  # its positions whose next token is scored
    facts: bool = False  # chat facts over a chat conversation (else pass keys over book text)


def build_episode(tokenizer: Any, rng: random.Random, segment_tokens: int, summary_tokens: int,
                  distances: Sequence[int], text_stream: Sequence[int],
                  wordings: Sequence[PasskeyWording] = TRAINING_WORDINGS,
                  fillers: Sequence[str] = TRAINING_FILLERS, key_digits: int = 5, write_tokens: int | None = None,
                  question_tokens: int | None = None) -> Episode:
    """A key line at a uniform random offset of a full write segment (or of write_tokens); a question segment
    per distance (or a row of at most question_tokens), the question at a uniform random offset, cut after the
    answer. Filler is book text or a repeated sentence."""
    for name, value in (("write_tokens", write_tokens), ("question_tokens", question_tokens)):
        if value is not None and not 1 <= value <= segment_tokens:
            raise InvalidInputError(f"{name} must be in 1..{segment_tokens} (a segment), got {value}")
    write_length = write_tokens or segment_tokens
    question_length = question_tokens or segment_tokens
    encode = encoder(tokenizer)
    wording = rng.choice(wordings)
    key = rng.randrange(10 ** (key_digits - 1), 10 ** key_digits)
    filler = text_stream if rng.random() < 0.5 or not fillers else sentence_filler(tokenizer, rng.choice(fillers))
    stream = FillerStream(filler, rng)
    intro = encode(wording.intro) if wording.intro and rng.random() < 0.5 else []
    line = encode(" " + wording.line(key))
    room = write_length - len(intro) - len(line)
    if room < 0:
        raise InvalidInputError(f"a key line needs {len(intro) + len(line)} tokens, write segments have "
                                f"{write_length}")
    before = stream.take(rng.randint(0, room))
    write = intro + before + line
    write += stream.take(write_length - len(write))
    question = encode(" " + wording.question)
    answer = encode(f" {key}.")
    value_indices = value_token_indices(tokenizer, answer)
    questions = question_rows(rng, distances, stream.take, question, answer, value_indices, question_length,
                              summary_tokens)
    return Episode(key, write, len(intro) + len(before), [answer[i] for i in value_indices], questions)


def question_rows(rng: random.Random, distances: Sequence[int], filler: Callable[[int], list[int]],
                  question: list[int], answer: list[int], value_indices: Sequence[int], question_length: int,
                  summary_tokens: int) -> tuple[Question, ...]:
    """Per distance, a row of at most question_length: `filler` tokens of uniform random length, the question,
    the answer; the answer's value tokens scored, the summary query cut before the answer."""
    rows = []
    for distance in sorted(distances):
        room = question_length - len(question) - len(answer)
        if room < 0:
            raise InvalidInputError(f"a question and answer need {question_length - room} tokens, "
                                    f"question rows have {question_length}")
        tokens = filler(rng.randint(0, room)) + question
        start = len(tokens)
        tokens += answer
        rows.append(Question(distance, tokens, start, [start + i for i in value_indices],
                             min(summary_tokens, start)))
    return tuple(rows)


def build_fact_episode(tokenizer: Any, rng: random.Random, segment_tokens: int, summary_tokens: int,
                       distances: Sequence[int], filler: ChatFiller, session_start: bool, held_out: bool = False,
                       write_tokens: int | None = None, question_tokens: int | None = None) -> Episode:
    """A fact stated in a user turn and acknowledged, inside a write row of a chat conversation: the session's
    first turn (system prompt and all, no filler before it) when session_start, else after the tail of an
    earlier exchange at a uniform random offset. Per distance, a question row: the tail of an exchange, the
    question turn with the generation prompt at a uniform random offset, then the reply that recalls the fact,
    its value's tokens scored."""
    write_length = write_tokens or segment_tokens
    question_length = question_tokens or segment_tokens
    encode = encoder(tokenizer)
    template = rng.choice(HELD_OUT_FACTS if held_out else TRAINING_FACTS)
    fact = chat_fact(rng, (), 0, held_out, template)
    turn = fact.messages[:2]
    exchange = encode(render_chat(tokenizer, turn) if session_start else render_continuation(tokenizer, turn))
    room = write_length - len(exchange)
    if room < 0:
        raise InvalidInputError(f"a fact's exchange needs {len(exchange)} tokens, write rows have {write_length}")
    before = [] if session_start else filler.tail(rng.randint(0, room))
    write = before + exchange + filler.take(room - len(before))
    reply, value_indices = fact_reply(tokenizer, fact, template)
    question = encode(render_continuation(tokenizer, fact.messages[2:], generation_prompt=True))
    questions = question_rows(rng, distances, filler.tail, question, reply, value_indices, question_length,
                              summary_tokens)
    return Episode(fact.value, write, len(before), [reply[i] for i in value_indices], questions)


def step_data(model: HMTModel, config: EpisodeConfig, step: int, text_stream: Sequence[int],
              wordings: Sequence[PasskeyWording] = TRAINING_WORDINGS,
              fillers: Sequence[str] = TRAINING_FILLERS, passages: Sequence[str] = ()) -> StepData:
    """Everything step `step` reads: a pure function of (config.seed, step). passages: book passages the chat
    steps' conversations quote (needed when config.facts > 0)."""
    rng = random.Random(config.seed * 1_000_003 + step)
    cfg = model.hmt_config
    low, high = config.distances
    history = rng.randint(config.min_history, config.max_history)
    facts = config.facts > 0 and rng.random() < config.facts  # no draw otherwise: earlier runs resume exactly
    if facts:
        chat = ChatFiller(model.tokenizer, passages, rng)
        episodes = [build_fact_episode(model.tokenizer, rng, cfg.segment_tokens, cfg.summary_tokens,
                                       rng.sample(range(low, high + 1), config.questions), chat, history == 0,
                                       write_tokens=config.write_tokens, question_tokens=config.question_tokens)
                    for _ in range(config.episodes_per_step)]
    else:
        episodes = [build_episode(model.tokenizer, rng, cfg.segment_tokens, cfg.summary_tokens,
                                  rng.sample(range(low, high + 1), config.questions), text_stream, wordings,
                                  fillers, config.key_digits, config.write_tokens, config.question_tokens)
                    for _ in range(config.episodes_per_step)]
    longest = max(q.distance for e in episodes for q in e.questions)
    segments = max(1, history + longest - 1) + 1  # the chain, then the plain row
    if facts:  # one conversation, cut into segments as a session reads it
        conversation = chat.take(segments * cfg.segment_tokens)
        rows = [conversation[i * cfg.segment_tokens:(i + 1) * cfg.segment_tokens] for i in range(segments)]
    else:
        books = FillerStream(text_stream, rng)
        rows = [books.take(cfg.segment_tokens) for _ in range(segments)]
    positions = sorted(rng.sample(range(cfg.segment_tokens - 1), max(1, (cfg.segment_tokens - 1) // 4)))
    return StepData(history, rows[:-1], episodes, rows[-1], positions, facts)


# ----- the reads ---------------------------------------------------------------------------------------


def _autocast(model: HMTModel, enabled: bool) -> AbstractContextManager[Any]:
    return torch.autocast(model.device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def _no_autocast(model: HMTModel) -> AbstractContextManager[Any]:
    return torch.autocast(model.device.type, enabled=False)


def recall_over(model: HMTModel, queries: Tensor, banks: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Recall in float32 (never autocast) for rows of different bank lengths: (prompts [R, d], weights [R, n])."""
    lengths = torch.tensor([bank.shape[0] for bank in banks], device=model.device)
    memories = torch.zeros(len(banks), int(lengths.max()), model.dim, device=model.device)
    for row, bank in enumerate(banks):
        memories[row, :bank.shape[0]] = bank.float()
    with _no_autocast(model):
        weights = model.recall_weights(queries.float(), memories, lengths)
        return model.recalled_prompts(weights, memories, lengths, torch.float32), weights


def chain_states(model: HMTModel, segments: Sequence[Sequence[int]]) -> Iterator[Tensor]:
    """Full segments read in order as one HMT session (no logits): the kept memories [n, d] after each segment,
    as `score` writes them."""
    cfg = model.hmt_config
    ltm = torch.zeros(0, model.dim, device=model.device)
    sensory: Tensor | None = None
    for segment in segments:
        tokens = torch.tensor([list(segment)], device=model.device)
        query = model.summary_queries(tokens[:, :cfg.summary_tokens])
        prompts, _ = recall_over(model, query, [ltm])
        memory = model.segment_memories(prompts.to(model.dtype), sensory, tokens)
        ltm = model.memory.write(ltm, memory[0].float(), cfg.ltm_context)
        sensory = tokens[:, -cfg.num_sensory:] if cfg.num_sensory else None
        yield ltm


def chain_memories(model: HMTModel, segments: Sequence[Sequence[int]]) -> Tensor:
    """The kept memories [n, d] after reading the segments as one HMT chain."""
    last = torch.zeros(0, model.dim, device=model.device)
    for last in chain_states(model, segments):  # noqa: B007 (only the last state is wanted)
        pass
    return last


def _queries(model: HMTModel, rows: Sequence[Sequence[int]]) -> Tensor:
    """Summary queries of rows of any length (rows of one length share a forward)."""
    out: list[Tensor | None] = [None] * len(rows)
    for length in sorted({len(r) for r in rows}):
        index = [i for i, r in enumerate(rows) if len(r) == length]
        batch = model.summary_queries(torch.tensor([list(rows[i]) for i in index], device=model.device))
        for i, query in zip(index, batch, strict=True):
            out[i] = query
    return torch.stack(cast(list[Tensor], out))


def read_hidden(model: HMTModel, prompts: Tensor, sensory: Sequence[Sequence[int]], rows: Sequence[Sequence[int]]
                ) -> tuple[Tensor, int]:
    """Rows read as [p, E(sensory), E(tokens)] (p behind the sink token where the model has one), right-padded
    (causal: padding never reaches earlier positions). Returns final hidden states [R, T, d] and the offset of
    token 0 (the prompt's positions + k)."""
    out, prefix = read_outputs(model, prompts, sensory, rows)
    return out.last_hidden_state, prefix + len(sensory[0])


def read_attending(model: HMTModel, prompts: Tensor, sensory: Sequence[Sequence[int]],
                   rows: Sequence[Sequence[int]]) -> tuple[Tensor, int, Tensor]:
    """read_hidden, and every layer's attention from each position to the memory prompt p: [R, layers, heads, T]
    (eager attention for this read: the fused kernels do not return their weights)."""
    out, prefix = read_outputs(model, prompts, sensory, rows, attentions=True)
    return out.last_hidden_state, prefix + len(sensory[0]), prompt_attention(out.attentions, prefix - 1)


def prompt_attention(attentions: Sequence[Tensor], position: int) -> Tensor:
    """Every layer's attention to one position (the memory prompt's): [R, layers, heads, T]."""
    return torch.stack([weights[:, :, :, position] for weights in attentions], dim=1)


@contextmanager
def _eager_attention(model: HMTModel) -> Iterator[None]:
    config = cast("PretrainedConfig", model.base_model.config)
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


def read_outputs(model: HMTModel, prompts: Tensor, sensory: Sequence[Sequence[int]], rows: Sequence[Sequence[int]],
                 attentions: bool = False, hidden_states: bool = False) -> tuple[Any, int]:
    """The backbone's output for rows read as read_hidden reads them (with every layer's attention weights, read
    with eager attention, and hidden states when asked), and the length of the prompt prefix (p is its last
    position)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(s) + list(r) + [0] * (width - len(r)) for s, r in zip(sensory, rows, strict=True)],
                       device=model.device)
    prefix = model.prompt_prefix(prompts)
    with _eager_attention(model) if attentions else nullcontext():
        out = model.base_model(inputs_embeds=torch.cat([prefix, model.embed(ids)], dim=1), use_cache=False,
                               output_attentions=attentions, output_hidden_states=hidden_states)
    return out, prefix.shape[1]


def length_groups(lengths: Sequence[int], slack: float = 1.25) -> list[list[int]]:
    """Row indices grouped for right-padded batches: sorted by length, a group's longest row at most `slack`
    times its shortest (question rows are cut after their answers, so their lengths spread over a segment)."""
    groups: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups and lengths[index] <= slack * lengths[groups[-1][0]]:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def _token_loss(model: HMTModel, hidden: Tensor, offset: int, rows: Sequence[Sequence[int]],
                positions: Sequence[Sequence[int]]) -> Tensor:
    """Mean cross-entropy of token rows[r][t] at each t in positions[r], predicted from the position before."""
    row_index = [r for r, ps in enumerate(positions) for _ in ps]
    at = [offset + t - 1 for ps in positions for t in ps]
    targets = torch.tensor([rows[r][t] for r, ps in enumerate(positions) for t in ps], device=model.device)
    logits = model.lm_logits(hidden[row_index, at]).float()
    return torch.nn.functional.cross_entropy(logits, targets)


def question_bank(distractors: Tensor, written: Tensor, history: int, distance: int) -> Tensor:
    """The memories a question `distance` segments after the write reads: the history, the write's memory (at
    slot `history`: the recall loss's target), then the distance - 1 distractors written after it."""
    return torch.cat([distractors[:history], written[None], distractors[history:history + distance - 1]])


@dataclass
class StepLosses:
    total: Tensor
    parts: dict[str, float]


def episode_losses(model: HMTModel, data: StepData, config: EpisodeConfig) -> StepLosses:
    cfg = model.hmt_config
    k, s = cfg.num_sensory, cfg.summary_tokens
    with torch.no_grad(), _autocast(model, config.bf16):
        distractors = chain_memories(model, data.chain)
    history, chain = data.history, data.chain
    episodes = data.episodes
    with _autocast(model, config.bf16):
        # the write segments: after the history, with gradients, no logits
        writes = torch.tensor([e.write for e in episodes], device=model.device)
        with torch.no_grad():  # the write's own prompt matters little to m_w: spare its backward
            queries = model.summary_queries(writes[:, :s])
        prompts, _ = recall_over(model, queries, [distractors[:history]] * len(episodes))
        sensory = torch.tensor([chain[history - 1][-k:]] * len(episodes), device=model.device) \
            if k and history else None  # a session's first segment has no sensory tokens
        written = model.segment_memories(prompts.to(model.dtype), sensory, writes).float()  # [E, d]
        log_probs = torch.log_softmax(model.lm_logits(written).float(), dim=-1)
        bow = -log_probs.gather(1, writes).mean()
        value_bow = torch.stack([-log_probs[i, e.values].mean() for i, e in enumerate(episodes)]).mean()
        # the questions: bank = history, m_w, then d - 1 distractors
        rows, banks, heads, senses, values = [], [], [], [], []
        for i, episode in enumerate(episodes):
            for q in episode.questions:
                rows.append(q.tokens)
                values.append(q.value_positions)
                heads.append(q.tokens[:q.query_end])
                banks.append(question_bank(distractors, written[i], history, q.distance))
                senses.append(episode.write[-k:] if q.distance == 1 else chain[history + q.distance - 2][-k:])
        queries = _queries(model, heads)
        q_prompts, weights = recall_over(model, queries, banks)
        # recall CE trains the query and key projections, not the memories: through m_w it pushed the writer to
        # make m_w easy to find rather than to hold the key (value_bow stayed at chance, tiny model and chat model)
        _, target_weights = recall_over(model, queries, [bank.detach() for bank in banks])
        recall = -torch.log(target_weights[:, history].clamp_min(1e-9)).mean()
        scored, attended = [], []
        for group in length_groups([len(r) for r in rows]):
            hidden, offset, to_prompt = read_attending(model, q_prompts[group], [senses[r] if k else [] for r in group],
                                                       [rows[r] for r in group])
            scored.append(_token_loss(model, hidden, offset, [rows[r] for r in group], [values[r] for r in group])
                          * sum(len(values[r]) for r in group))
            # attention to p from the positions that predict the value tokens, over layers and heads
            attended += [to_prompt[g, :, :, [offset + t - 1 for t in values[r]]].float().mean()
                         for g, r in enumerate(group)]
        answer = torch.stack(scored).sum() / sum(len(v) for v in values)
        attention = torch.stack(attended).mean()
        # the reader's way in: below the target share, -log of the attention the answer positions pay to p (a
        # reader that ignores p gets no answer gradient through it, and a writer no signal to fill it)
        attention_loss = torch.relu(math.log(config.attention_target) - torch.log(attention.clamp_min(1e-9)))
        # the regularizer: a plain segment after every distractor
        plain_prompt, _ = recall_over(model, _queries(model, [data.plain[:s]]), [distractors])
        hidden, offset = read_hidden(model, plain_prompt, [chain[-1][-k:] if k else []], [data.plain])
        lm = _token_loss(model, hidden, offset, [data.plain], [[t + 1 for t in data.lm_positions]])
    total = (config.answer_weight * answer + config.recall_weight * recall + config.bow_weight * bow
             + config.value_bow_weight * value_bow + config.lm_weight * lm + config.attention_weight * attention_loss)
    parts = {"answer": answer, "recall": recall, "bow": bow, "value_bow": value_bow, "lm": lm,
             "attention": attention, "total": total}
    recalled = float(weights[:, history].detach().mean())
    return StepLosses(total, {**{name: float(v.detach()) for name, v in parts.items()}, "recall_weight": recalled})


# ----- the held-out evaluation: one chain per key, questions branching off it -----------------------


@dataclass(frozen=True)
class EvalKey:
    key: int | str  # a pass key, or a fact's value
    segments: list[list[int]]  # intro + filler + the key line + filler, then filler: read as one chain
    key_segment: int  # the segment holding the key line's end
    questions: dict[int, tuple[list[int], list[int]]]  # distance -> (question segment head, answer tokens)
    value_indices: tuple[int, ...] = ()  # which answer tokens are scored (empty: its digits)


def eval_keys(tokenizer: Any, segment_tokens: int, distances: Sequence[int], keys: int, filler: Sequence[int],
              seed: int = 0, wording: PasskeyWording = STANDARD_WORDING, key_digits: int = 5) -> list[EvalKey]:
    """Fixed held-out prompts: the standard (held-out) wording, filler from held-out text, key line and
    question at random offsets; one chain per key long enough for the farthest distance."""
    rng = random.Random(seed)
    encode = encoder(tokenizer)
    out = []
    for _ in range(keys):
        key = rng.randrange(10 ** (key_digits - 1), 10 ** key_digits)
        stream = FillerStream(filler, rng)
        tokens = (encode(wording.intro) if wording.intro else []) + stream.take(rng.randrange(segment_tokens))
        tokens += encode(" " + wording.line(key))
        key_segment = (len(tokens) - 1) // segment_tokens
        total = (key_segment + max(distances)) * segment_tokens
        tokens += stream.take(total - len(tokens))
        segments = [tokens[i:i + segment_tokens] for i in range(0, total, segment_tokens)]
        question = encode(" " + wording.question)
        answer = encode(f" {key}")
        questions = {d: (stream.take(rng.randrange(segment_tokens - len(question) - len(answer))) + question, answer)
                     for d in distances}
        out.append(EvalKey(key, segments, key_segment, questions))
    return out


def eval_facts(tokenizer: Any, segment_tokens: int, distances: Sequence[int], count: int, passages: Sequence[str],
               seed: int = 0) -> list[EvalKey]:
    """Fixed held-out facts (templates and values never trained) in chat conversations about held-out passages:
    half stated in the session's first turn, as a new chat states them, half after a random stretch of earlier
    exchanges; the question turn at a random offset of its segment, `distance` segments after the fact's."""
    rng = random.Random(seed)
    encode = encoder(tokenizer)
    filler = ChatFiller(tokenizer, passages, rng)
    out = []
    for _ in range(count):
        template = rng.choice(HELD_OUT_FACTS)
        fact = chat_fact(rng, (), 0, True, template)
        turn = fact.messages[:2]
        lead = rng.randrange(segment_tokens) if rng.random() < 0.5 else 0
        tokens = filler.tail(lead) + encode(render_continuation(tokenizer, turn)) if lead \
            else encode(render_chat(tokenizer, turn))
        key_segment = (len(tokens) - 1) // segment_tokens
        total = (key_segment + max(distances)) * segment_tokens
        tokens += filler.take(total - len(tokens))
        segments = [tokens[i:i + segment_tokens] for i in range(0, total, segment_tokens)]
        question = encode(render_continuation(tokenizer, fact.messages[2:], generation_prompt=True))
        reply, value_indices = fact_reply(tokenizer, fact, template)
        questions = {d: (filler.tail(rng.randrange(segment_tokens - len(question) - len(reply))) + question, reply)
                     for d in distances}
        out.append(EvalKey(fact.value, segments, key_segment, questions, tuple(value_indices)))
    return out


@torch.no_grad()
def evaluate_keys(model: HMTModel, keys: Sequence[EvalKey], bf16: bool = False) -> dict[str, dict[int, float]]:
    """Per distance: the mean teacher-forced loss of the key's digits (nats per digit; ln 10 is chance) and the
    share of keys whose every digit is the argmax (what greedy decoding would write after the digits before it).
    For facts (eval_facts) the same of the value's tokens in the reply."""
    cfg = model.hmt_config
    k, s = cfg.num_sensory, cfg.summary_tokens
    losses: dict[int, list[float]] = {}
    hits: dict[int, list[bool]] = {}
    with _autocast(model, bf16):
        for item in keys:
            states = list(chain_states(model, item.segments))
            for distance, (head, answer) in item.questions.items():
                before = item.key_segment + distance  # segments read before the question's
                row = head + answer
                query = _queries(model, [row[:min(s, len(head))]])
                prompt, _ = recall_over(model, query, [states[before - 1]])
                hidden, offset = read_hidden(model, prompt, [item.segments[before - 1][-k:] if k else []], [row])
                logits = model.lm_logits(hidden[0, offset + len(head) - 1:offset + len(row) - 1]).float()
                log_probs = torch.log_softmax(logits, dim=-1)
                digits = list(item.value_indices) or value_token_indices(model.tokenizer, answer)
                wanted = [answer[i] for i in digits]
                losses.setdefault(distance, []).append(float(-log_probs[digits, wanted].mean()))
                hits.setdefault(distance, []).append(logits[digits].argmax(-1).tolist() == wanted)
    return {"digit_loss": {d: sum(v) / len(v) for d, v in sorted(losses.items())},
            "accuracy": {d: sum(v) / len(v) for d, v in sorted(hits.items())}}


# ----- parameters, schedule, checkpoints --------------------------------------------------------------


def prepare(model: HMTModel, config: EpisodeConfig) -> list[dict[str, Any]]:
    """Marks what trains (a LoRA on every linear layer, or the whole backbone) and returns optimizer groups with
    separate learning rates for HMT's own parameters and the backbone's."""
    model.requires_grad_(False)
    if config.memory_input_scale is not None and model.memory_log_scale is None:
        model.add_memory_input_scale(config.memory_input_scale)
    if config.sink_token is not None and model.hmt_config.sink_token is None:
        model.add_sink_token(config.sink_token)
    torch.manual_seed(config.seed)  # the LoRA's initialization
    if config.backbone_training == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,  # type: ignore[arg-type]
                          target_modules="all-linear", lora_dropout=0.0)
        model.backbone = cast("PreTrainedModel", get_peft_model(model.backbone, lora))
    else:
        model.backbone.requires_grad_(True)
    own = model.own_parameters()
    for param in own:
        param.requires_grad_(True)
    ids = {id(p) for p in own}
    backbone = [p for p in model.backbone.parameters() if p.requires_grad and id(p) not in ids]
    return [{"params": own, "lr": config.lr_hmt, "name": "hmt"},
            {"params": backbone, "lr": config.lr_backbone, "name": "backbone"}]


def lr_scale(step: int, config: EpisodeConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))  # cosine to a tenth


def trainable_state(model: HMTModel) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: HMTModel, trainable: dict[str, Tensor], source: Path) -> None:
    own = dict(model.named_parameters())
    missing = [name for name, p in own.items() if p.requires_grad and name not in trainable]
    unexpected = [name for name in trainable if name not in own or own[name].shape != trainable[name].shape]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not fit this model and configuration "
                              f"(missing {missing[:2]}, unexpected {unexpected[:2]}): give the run's starting model")
    with torch.no_grad():
        for name, value in trainable.items():
            own[name].copy_(value.to(own[name].dtype))


def save_checkpoint(model: HMTModel, optimizer: torch.optim.Optimizer, config: EpisodeConfig, out_dir: Path,
                    step: int, keep: int = 2) -> Path:
    path = out_dir / f"checkpoint-{step}"
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (STATE_FILE + ".tmp")
    torch.save({"trainable": trainable_state(model), "optimizer": optimizer.state_dict()}, tmp)
    tmp.replace(path / STATE_FILE)  # a crash mid-write never leaves a checkpoint that looks complete
    (path / META_FILE).write_text(json.dumps({"step": step, "config": asdict(config)}, indent=1))
    for old in sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
        for file in old.iterdir():
            file.unlink()
        old.rmdir()
    return path


def save_carry(model: HMTModel, optimizer: torch.optim.Optimizer, config: EpisodeConfig, path: Path,
               step: int) -> None:
    """What git carries between sessions, about half a checkpoint: HMT's parameters in float32, the LoRA factors
    and Adam's second moments in bfloat16; Adam's first moments are left out (they rebuild within ~10 steps,
    the second moments take ~1,000). A resume from it is close to exact; from a checkpoint directory, exact."""
    state = optimizer.state_dict()
    moments = {index: {name: (value.to(torch.bfloat16) if name == "exp_avg_sq" else value)
                       for name, value in entry.items() if name != "exp_avg"}
               for index, entry in state["state"].items()}
    trainable = {name: value.to(torch.bfloat16) if "lora_" in name else value
                 for name, value in trainable_state(model).items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"trainable": trainable, "optimizer": {**state, "state": moments}, "step": step,
                "config": asdict(config)}, tmp)
    tmp.replace(path)


def _restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    for entry in saved["state"].values():  # a carry file has no first moments: they start again from zero
        if "exp_avg" not in entry and "exp_avg_sq" in entry:
            entry["exp_avg"] = torch.zeros_like(entry["exp_avg_sq"])
    optimizer.load_state_dict(saved)  # casts every moment to its parameter's dtype


# ----- the loop -----------------------------------------------------------------------------------------


@dataclass
class EpisodeRun:
    steps_done: int
    log: list[dict[str, Any]] = field(default_factory=list)
    output: Path | None = None


def _append_log(out_dir: Path, entry: dict[str, Any]) -> None:
    with (out_dir / LOG_FILE).open("a") as log:
        log.write(json.dumps(entry) + "\n")


def _truncate_log(out_dir: Path, step: int) -> list[dict[str, Any]]:
    """On resume: drop log lines of steps past the checkpoint (they are about to be redone)."""
    path = out_dir / LOG_FILE
    if not path.is_file():
        return []
    kept = [entry for entry in map(json.loads, path.read_text().splitlines()) if entry.get("step", 0) <= step]
    path.write_text("".join(json.dumps(entry) + "\n" for entry in kept))
    return kept


def train_episodes(model: HMTModel, text_stream: Sequence[int], config: EpisodeConfig, out_dir: str | Path,
                   eval_filler: Sequence[int] | None = None, stop_after: int | None = None,
                   carry: Path | None = None, progress: Callable[[dict[str, Any]], None] | None = None,
                   wordings: Sequence[PasskeyWording] = TRAINING_WORDINGS, fillers: Sequence[str] = TRAINING_FILLERS,
                   eval_wording: PasskeyWording = STANDARD_WORDING, passages: Sequence[str] = (),
                   eval_passages: Sequence[str] = ()) -> EpisodeRun:
    """Trains `model` in place (its backbone wrapped by a LoRA when config says so) and returns the log.

    Resumes from the newest checkpoint-<step>/ in out_dir (exact), else from `carry` when given (a file written
    by save_carry: weights exact, Adam's moments rounded to bfloat16). Checkpoints every
    config.save_every_seconds and at the end. stop_after: leave after this many steps of this call (the run
    resumes later), without finishing the model. eval_filler: held-out text for the periodic evaluation.
    passages, eval_passages: book passages the chat steps' conversations quote (config.facts > 0), and held-out
    ones for the periodic evaluation of held-out facts (none: no fact evaluation)."""
    if model.tokenizer is None:
        raise InvalidInputError("the episode trainer needs a model with a tokenizer")
    if config.facts > 0 and not passages:
        raise InvalidInputError(f"a run with chat facts (fact share {config.facts}) needs book passages")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = prepare(model, config)
    lrs = [g["lr"] for g in groups]
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    start = 0
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is not None:
        saved = torch.load(checkpoint / STATE_FILE, map_location=model.device, weights_only=True)
        load_trainable(model, saved["trainable"], checkpoint)
        _restore_optimizer(optimizer, saved["optimizer"])
        start = json.loads((checkpoint / META_FILE).read_text())["step"]
    elif carry is not None and carry.is_file():
        saved = torch.load(carry, map_location=model.device, weights_only=True)
        load_trainable(model, saved["trainable"], carry)
        _restore_optimizer(optimizer, saved["optimizer"])
        start = int(saved["step"])
    log = _truncate_log(out_dir, start)
    evaluation = eval_keys(model.tokenizer, model.hmt_config.segment_tokens, config.eval_distances,
                           config.eval_keys, eval_filler if eval_filler is not None else text_stream, seed=1,
                           wording=eval_wording, key_digits=config.key_digits) \
        if config.eval_every else []
    facts = eval_facts(model.tokenizer, model.hmt_config.segment_tokens, config.eval_distances, config.eval_keys,
                       eval_passages, seed=1) if config.eval_every and config.facts > 0 and eval_passages else []
    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    stop = _StopRequest()
    with stop.on_sigterm():
        end = _run_steps(model, text_stream, config, out_dir, optimizer, lrs, start, end, log, evaluation + facts,
                         carry, progress, wordings, fillers, passages, stop)
    model.eval()
    if end > start:
        save_checkpoint(model, optimizer, config, out_dir, end)
        if carry is not None:
            save_carry(model, optimizer, config, carry, end)
    return EpisodeRun(end, log)


class _StopRequest:
    """SIGTERM asks the run to leave after the step in progress, with a checkpoint (and carry) written."""

    def __init__(self) -> None:
        self.requested = False

    def _request(self, signum: int, frame: object) -> None:
        self.requested = True

    @contextmanager
    def on_sigterm(self) -> Iterator[None]:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = signal.signal(signal.SIGTERM, self._request)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


def _run_steps(model: HMTModel, text_stream: Sequence[int], config: EpisodeConfig, out_dir: Path,
               optimizer: torch.optim.Optimizer, lrs: list[float], start: int, end: int, log: list[dict[str, Any]],
               evaluation: list[EvalKey], carry: Path | None, progress: Callable[[dict[str, Any]], None] | None,
               wordings: Sequence[PasskeyWording], fillers: Sequence[str], passages: Sequence[str],
               stop: _StopRequest) -> int:
    """Steps start..end-1; returns the step reached (earlier than end when a stop was requested)."""
    keys = [item for item in evaluation if isinstance(item.key, int)]
    facts = [item for item in evaluation if isinstance(item.key, str)]
    last_save = time.monotonic()
    for step in range(start, end):
        if stop.requested:
            return step
        began = time.perf_counter()
        model.train()
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr * lr_scale(step, config)
        data = step_data(model, config, step, text_stream, wordings, fillers, passages)
        losses = episode_losses(model, data, config)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        optimizer.step()
        entry: dict[str, Any] = {"step": step + 1, **{k: round(v, 4) for k, v in losses.parts.items()},
                 "grad_norm": round(grad_norm, 3), "seconds": round(time.perf_counter() - began, 2)}
        if config.facts > 0:
            entry["kind"] = "facts" if data.facts else "passkey"
        if evaluation and (step + 1) % config.eval_every == 0:
            model.eval()
            if keys:
                entry["eval_fp32"] = evaluate_keys(model, keys)
                if config.bf16:
                    entry["eval_bf16"] = evaluate_keys(model, keys, bf16=True)
            if facts:  # held-out facts, fp32: the loss of the value's tokens in the reply
                result = evaluate_keys(model, facts)
                entry["eval_facts_fp32"] = {"value_loss": result["digit_loss"], "accuracy": result["accuracy"]}
        entry = json.loads(json.dumps(entry))  # as the log file holds it (distances as strings), resumed or not
        log.append(entry)
        _append_log(out_dir, entry)
        if progress is not None:
            progress(entry)
        if time.monotonic() - last_save >= config.save_every_seconds and step + 1 < end:
            save_checkpoint(model, optimizer, config, out_dir, step + 1)
            if carry is not None:
                save_carry(model, optimizer, config, carry, step + 1)
            last_save = time.monotonic()
    return end


def finish(model: HMTModel, out_dir: str | Path) -> Path:
    """Fold the LoRA into the backbone's deltas and write a servable model directory (backbone by reference)."""
    finish_backbone(model)
    out = Path(out_dir)
    model.save_pretrained(out, include_backbone=False)
    return out


__all__ = ["STAGES", "EpisodeConfig", "build_episode", "build_fact_episode", "episode_losses", "eval_facts",
           "evaluate_keys", "finish", "step_data", "train_episodes"]
