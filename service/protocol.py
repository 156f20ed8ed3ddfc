"""Request and response bodies of the HTTP API (pydantic); the OpenAPI docs at /docs come from these."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, model_validator

from hmt_core import InvalidInputError

SESSION_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
MAX_STOP_STRINGS = 16  # per request; /v1 allows 4, as OpenAI does
MAX_STOP_CHARS = 256


def check_unicode(text: str) -> str:
    """JSON can carry lone UTF-16 surrogates ("\\ud800"); no tokenizer can read them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode: a lone surrogate at character {exc.start}") from None
    return text


Text = Annotated[str, AfterValidator(check_unicode)]
StopString = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]


def check_session_id(session_id: str, source: str = "session id") -> str:
    """For ids that arrive outside a validated body (path, header, OpenAI's `user`)."""
    if re.fullmatch(SESSION_ID_PATTERN, session_id) is None:
        raise InvalidInputError(f"{source} must match {SESSION_ID_PATTERN}")
    return session_id


class _Strict(BaseModel):
    # strict: "10" is not a number nor "yes" a boolean; Infinity and NaN are no temperature
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class CreateSession(_Strict):
    id: str | None = Field(None, pattern=SESSION_ID_PATTERN, description="Chosen id; a random one if omitted")


class AppendRequest(_Strict):
    text: Text | None = Field(None, description="Text, tokenized with the model's tokenizer")
    tokens: list[StrictInt] | None = Field(None, description="Token ids, as an alternative to text")

    @model_validator(mode="after")
    def _one_input(self) -> AppendRequest:
        if (self.text is None) == (self.tokens is None):
            raise ValueError("give exactly one of text or tokens")
        return self


class GenerateRequest(_Strict):
    prompt: Text | None = Field(None, description="Appended to the session before generating")
    prompt_tokens: list[StrictInt] | None = Field(None, description="Token-id alternative to prompt")
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: off")
    seed: int | None = None
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP_STRINGS,
                                   description=f"Stop strings (at most {MAX_STOP_STRINGS}, each 1 to {MAX_STOP_CHARS} "
                                               "characters): the reply ends before the first one")
    ignore_eos: bool = False
    stream: bool = False

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if self.prompt is not None and self.prompt_tokens is not None:
            raise ValueError("give at most one of prompt or prompt_tokens")
        return self


class Totals(BaseModel):
    tokens_seen: int
    segments_total: int
    window_tokens: int


class SessionInfo(Totals):
    id: str
    state_bytes: int
    version: int
    fingerprint: str


class AppendResponse(Totals):
    id: str
    tokens_appended: int
    segments_committed: int


class RecallEntry(BaseModel):
    """The recall of one committed segment: the earlier segments whose memories it attended to
    most, strongest first, and the softmax weight of each (the top few of the whole distribution)."""

    segment: int = Field(description="this segment's index (0-based)")
    slots: list[int] = Field(description="earlier segments (by index) whose memories the recall weighted most, "
                                         "strongest first; at most recall_top_k, each < segment; empty when "
                                         "long-term memory was empty")
    weights: list[float] = Field(description="their softmax weights: each in [0, 1], descending, summing to <= 1")
    distance: int = Field(description="segments back to the strongest weight (segment - slots[0]); 0: no recall")


class SegmentProgress(BaseModel):
    """The data of an append stream's `segment` event: one per committed segment."""

    segments_committed: int = Field(description="by this request so far")
    segments_total: int
    tokens_seen: int
    segments_expected: int = Field(description="segments this request commits in all (progress: "
                                               "segments_committed / segments_expected)")
    recall_distance: int
    recall: RecallEntry


class SessionMemory(Totals):
    """What a session holds, next to what a KV cache of the same history would need."""

    id: str
    state_bytes: int = Field(description="the stored state's size: constant once long-term memory is full")
    memory_kind: str = Field(description="the kind of memory the model keeps: hmt, rmt (the previous segment's "
                                         "memory, no recall) or window (none)")
    memories: int = Field(description="memories in long-term memory now")
    memory_capacity: int = Field(description="long-term memory's capacity (ltm_context for hmt, 1 for rmt, 0 for "
                                             "window)")
    segment_tokens: int
    kv_cache_bytes_per_token: int = Field(description="2 x layers x KV heads x head dim x dtype bytes of the "
                                                      "backbone")
    kv_cache_bytes: int = Field(description="what a KV cache of tokens_seen tokens would need")
    recall_top_k: int = Field(description="the most slots reported per segment")
    recalls: list[RecallEntry] = Field(description="the recall of each of the last committed segments, oldest "
                                                   "first (bounded: see the last parameter)")


class ListedSession(BaseModel):
    id: str
    last_used: float = Field(description="unix time of the session's last write")


class SessionList(BaseModel):
    sessions: list[ListedSession] = Field(description="this API key's sessions, most recently used first")


class TranscriptMessage(BaseModel):
    role: str
    content: str
    name: str | None = None


class SessionMessages(BaseModel):
    """The text of the messages a session read through the chat API (/v1/chat/completions), and
    its replies: what a client shows and resends after a reload."""

    id: str
    messages: list[TranscriptMessage]
    complete: bool = Field(description="false when older messages were dropped (a bounded transcript) or were "
                                       "never recorded: then only continue with X-HMT-Messages: new")


class Usage(BaseModel):
    """Both APIs' usage: prompt_tokens are the tokens the model read for this request (in a
    conversation only its new part), completion_tokens those it generated."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    id: str
    text: str
    tokens: list[int]
    finish_reason: str
    usage: Usage
    tokens_seen: int
    segments_total: int
    window_tokens: int


class ErrorDetail(BaseModel):
    message: str
    type: str


class ErrorBody(BaseModel):
    error: ErrorDetail
