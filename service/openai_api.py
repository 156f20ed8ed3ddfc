"""The OpenAI-compatible API: GET /v1/models, POST /v1/chat/completions, POST /v1/completions.

Sessions over a stateless protocol: a request names its session with the `X-Session-Id` header
(or the `user` field); the session is created on first use. Standard clients resend the whole
history each turn; service.conversation decides what is new, so only that is read. A chat
request without a session id continues the session whose last turn ended exactly where its
messages' prefix does (or forks a new session from a snapshot of it, never rewinding another
client's conversation). Every chat response names its session in `X-Session-Id` and says how it
continued in `X-HMT-Continuation` (new, continued, branched, restarted). `usage.prompt_tokens`
counts the tokens read for this request: the new part of the conversation, not the history.

/v1/completions appends the prompt to the named session and continues it (no template); without
a session it is stateless.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from hmt_core import CorruptStateError, InvalidInputError, SamplingParams
from service import metrics
from service.constrained import compiler_for
from service.conversation import (
    CONVERSATION_FIELD,
    EMPTY,
    ROOT_HASH,
    TRANSCRIPT_FIELD,
    ChatTemplate,
    Conversation,
    Message,
    Plan,
    Transcript,
    after_turn,
    chain_hashes,
    plan_turn,
    restart_plan,
)
from service.errors import APIError, error_payload
from service.openai_protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ModelCard,
    ModelList,
    Usage,
    openai_error_body,
)
from service.protocol import check_session_id
from service.session_service import Service
from service.store import SideWrites
from service.streaming import sse, token_events
from service.worker import Constraint, Job, JobResult

SESSION_HEADER = "X-Session-Id"


@dataclass
class Turn:
    """A started request: its job, the task that saves it, and what the response reports."""

    session_id: str | None
    job: Job
    task: asyncio.Task[JobResult]
    prompt_tokens: int
    continuation: str = ""
    end_hash: str = ""  # the chain hash after the reply, once saved
    owner: str = ""

    def headers(self) -> dict[str, str]:
        headers = {SESSION_HEADER: self.session_id} if self.session_id else {}
        if self.continuation:
            headers["X-HMT-Continuation"] = self.continuation
        return headers


@dataclass
class Fork:
    """A new session started from another session's snapshot (a request without a session id)."""

    state: bytes
    record: Conversation
    messages: int


class OpenAIFrontend:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.model_name = service.settings.model_name()
        tokenizer = service.model.tokenizer
        self.template = ChatTemplate(tokenizer) if tokenizer is not None else None
        self.created = int(time.time())

    @property
    def fingerprint(self) -> str:
        return "fp_" + self.service.fingerprint[:12]

    # ----- requests -----------------------------------------------------------------------------

    def session_of(self, request: Request, user: str | None) -> str | None:
        session_id = request.headers.get(SESSION_HEADER) or user
        return None if session_id is None else check_session_id(session_id, "session id (X-Session-Id or user)")

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, "model_not_found", f"the model {name!r} does not exist; this server serves "
                                                   f"{self.model_name!r}")

    def sampling(self, body: ChatCompletionRequest | CompletionRequest, chat: bool) -> SamplingParams:
        stop: tuple[str, ...] = tuple(body.stop_list)
        stop_ids: tuple[int, ...] = ()
        if chat and self.template is not None:  # end the reply where the template ends a turn
            stop, stop_ids = stop + self.template.stop_strings, self.template.stop_token_ids
        return self.service.sampling_params(
            max_tokens=body.token_limit or self.service.settings.default_max_tokens, temperature=body.temperature,
            top_p=body.top_p, seed=body.seed, stop=stop, stop_token_ids=stop_ids)

    # ----- chat turns ---------------------------------------------------------------------------

    async def start_chat(self, owner: str, session_id: str | None, messages: list[Message],
                         params: SamplingParams, delta: bool = False, constraint: Constraint | None = None) -> Turn:
        """delta: the messages are only the new ones (X-HMT-Messages: new), not the whole history.
        constraint: the reply's tokens are chosen under it (response_format, service.constrained)."""
        if self.template is None:
            raise InvalidInputError("chat needs a model with a tokenizer")
        if delta:
            if session_id is None:
                raise InvalidInputError("X-HMT-Messages: new needs a session id (X-Session-Id)")
            turn = await self._start_chat(owner, session_id, messages, [], params, None, False, True, constraint)
            assert turn is not None
            return turn
        chain = chain_hashes(messages)
        fork: Fork | None = None
        if session_id is None:
            found, fork = await self._find(owner, chain)
            if found is not None and fork is None:
                turn = await self._start_chat(owner, found, messages, chain, params, None, True,
                                              constraint=constraint)
                if turn is not None:
                    return turn
                # the found session moved on meanwhile: start anew, leaving it alone
            session_id = uuid.uuid4().hex
        turn = await self._start_chat(owner, session_id, messages, chain, params, fork, False, constraint=constraint)
        assert turn is not None
        return turn

    async def _find(self, owner: str, chain: list[str]) -> tuple[str | None, Fork | None]:
        """The session to continue (its id, no fork), a fork of one, or nothing."""
        store = self.service.store
        hit = await store.find_chat(owner, chain)
        if hit is not None:
            n, source = hit
            raw = await store.field(source, owner, CONVERSATION_FIELD)
            record = _record(raw) if raw else None
            if record is not None and record.chain[n - 1:n] == chain[n - 1:n]:
                if len(record.chain) == n:
                    return source, None
                k = max((m for m in record.snapshots if m <= n), default=None)
                data = await store.labelled_state(source, owner, str(k)) if k is not None else None
                if k is not None and data is not None:
                    pending = record.snapshots[k]
                    return None, Fork(data, Conversation(chain[:k], pending, {k: pending}), k)
        return None, None

    async def _start_chat(self, owner: str, session_id: str, messages: list[Message], chain: list[str],
                          params: SamplingParams, fork: Fork | None, implicit: bool,
                          delta: bool = False, constraint: Constraint | None = None) -> Turn | None:
        """Plan and launch a turn under the session's lock; None if an implicitly found session
        no longer ends where the request continues (it is left alone)."""
        service, store, template = self.service, self.service.store, self.template
        assert template is not None
        prompt = template.render(messages, generation_prompt=True)  # once: O(history) for full resends
        async with store.leased(session_id, owner, must_exist=False) as lease:
            keep: dict[int, bytes] = {}  # snapshots this turn stores besides its result
            record: Conversation | None = None
            if lease.version < 0:
                state = service.state_from(fork.state) if fork else service.model.new_session()
                if fork:
                    record, keep[fork.messages] = fork.record, fork.state
            else:
                state = service.state_from(lease.data)
                raw = await store.field(session_id, owner, CONVERSATION_FIELD)
                record = _record(raw) if raw else None
            history = Transcript(list(messages))  # the whole conversation, for the transcript
            if delta:
                if lease.version >= 0:
                    history = Transcript.from_bytes(await store.field(session_id, owner, TRANSCRIPT_FIELD))
                    history.complete &= len(history.messages) == len(record.chain if record else [])
                    history.messages += messages
                prior = record.chain if record else []
                chain = prior + chain_hashes(messages, prior[-1] if prior else ROOT_HASH)
                plan = Plan("continued" if record else "new", None, len(prior), record.pending if record else "")
                text: str | None = template.continuation(messages) if prior or state.tokens_seen else prompt
            else:
                plan = plan_turn(record, chain)
                if implicit and plan.continuation != "continued":
                    return None
                text = template.suffix(messages, prompt, plan.absorbed)
            if text is None:  # the template does not render this conversation incrementally
                plan = restart_plan(record)
                text = prompt
            if plan.continuation == "new":
                keep[0] = lease.data or service.encode(state)
            if plan.base == EMPTY:
                state = service.model.new_session()
                keep[0] = service.encode(state)
            elif plan.base is not None:
                data = await store.labelled_state(session_id, owner, str(plan.base))
                if data is None:
                    raise CorruptStateError(f"snapshot {plan.base} of session {session_id!r} is missing")
                state = service.state_from(data)
            state = replace(state, version=max(state.version, lease.version))  # the version only grows
            tokens = await service.tokens_of(plan.pending + text, None)
            continuation = "branched" if fork else plan.continuation
            turn = Turn(session_id, None, None, len(tokens), continuation)  # type: ignore[arg-type]
            max_snapshots = service.settings.chat_snapshots

            def chat_record(result: JobResult) -> SideWrites:
                ended = template.ended_turn(result.tokens, result.finish_reason)
                pending = template.closing(messages, prompt, result.text, ended)
                full_chain = chain + chain_hashes([Message("assistant", result.text)], chain[-1])
                new_record, drop = after_turn(record, plan, full_chain, pending, max_snapshots)
                turn.end_hash = full_chain[-1]
                snapshots = {n: s for n, s in keep.items() if n in new_record.snapshots}
                transcript = Transcript([*history.messages, Message("assistant", result.text)], history.complete)
                return SideWrites(fields={CONVERSATION_FIELD: new_record.to_bytes(),
                                          TRANSCRIPT_FIELD: transcript.to_bytes()}, state_as=str(len(full_chain)),
                                  states={str(n): s for n, s in snapshots.items()}, drop_states=[str(n) for n in drop])

            turn.job, turn.task = service.launch(lease, owner, state, tokens, params, chat_record, constraint)
            metrics.CHAT_TURNS.labels(continuation).inc()
            turn.owner = owner
            return turn

    async def finish(self, turn: Turn) -> JobResult:
        """The saved result; then let a client without a session id find this session by its
        history next turn (before the response ends, so that next turn cannot come first)."""
        result: JobResult = await turn.task
        if turn.end_hash and turn.session_id:
            await self.service.store.remember_chat(turn.owner, turn.end_hash, turn.session_id)
        return result

    # ----- completions --------------------------------------------------------------------------

    async def start_completion(self, owner: str, session_id: str | None, tokens: list[int],
                               params: SamplingParams) -> Turn:
        service = self.service
        if session_id is None:  # stateless: a fresh state, nothing stored
            job, task = service.run_unsaved(service.model.new_session(), tokens, params)
            return Turn(None, job, task, len(tokens))
        async with service.store.leased(session_id, owner, must_exist=False) as lease:
            state = service.state_from(lease.data) if lease.version >= 0 else service.model.new_session()
            job, task = service.launch(lease, owner, state, tokens, params)
        return Turn(session_id, job, task, len(tokens))

    # ----- responses ----------------------------------------------------------------------------

    def usage(self, turn: Turn, result: JobResult) -> Usage:
        return Usage(prompt_tokens=turn.prompt_tokens, completion_tokens=len(result.tokens),
                     total_tokens=turn.prompt_tokens + len(result.tokens))

    async def respond(self, turn: Turn, start: float, stream: bool, include_usage: bool,
                      chunk: Any, final: Any) -> Any:
        """Collect or stream a turn: chunk(text, finish_reason) -> one SSE payload model;
        final(result) -> the whole response model."""
        if not stream:
            async for _ in token_events(turn.job, start):
                pass
            result = await self.finish(turn)
            return JSONResponse(final(result).model_dump(), headers=turn.headers())

        async def events() -> AsyncIterator[str]:
            try:
                opening = chunk(None, None)  # chat: the role; completions: nothing
                if opening is not None:
                    yield sse(opening.model_dump())
                async for event in token_events(turn.job, start):
                    if event.text:
                        yield sse(chunk(event.text, None).model_dump())
                try:
                    result = await self.finish(turn)
                    yield sse(chunk("", _finish_reason(result)).model_dump())
                    if include_usage:
                        usage_chunk = chunk("", None)
                        usage_chunk.choices = []
                        usage_chunk.usage = self.usage(turn, result)
                        yield sse(usage_chunk.model_dump())
                except Exception as exc:
                    yield sse(_openai_error(exc))
                yield sse("[DONE]")
            finally:
                turn.job.cancelled = True  # no-op after the end; on disconnect, stops sampling

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **turn.headers()})


def _record(raw: bytes) -> Conversation:
    try:
        return Conversation.from_bytes(raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptStateError(f"the stored conversation record is unusable: {exc}") from None


def _finish_reason(result: JobResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _openai_error(exc: BaseException) -> dict[str, Any]:
    status, body = error_payload(exc)
    return openai_error_body(status, body["error"]["type"], body["error"]["message"])


def create_router(service: Service) -> APIRouter:
    frontend = OpenAIFrontend(service)
    router = APIRouter(prefix="/v1", tags=["openai"])
    owner_dep = Depends(service.owner)

    @router.get("/models", response_model=ModelList)
    async def list_models(owner: str = owner_dep) -> ModelList:
        return ModelList(data=[ModelCard(id=frontend.model_name, created=frontend.created)])

    @router.get("/models/{model_id}", response_model=ModelCard)
    async def get_model(model_id: str, owner: str = owner_dep) -> ModelCard:
        frontend.check_model(model_id)
        return ModelCard(id=frontend.model_name, created=frontend.created)

    @router.post("/chat/completions", response_model=ChatCompletion,
                 responses={200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(body: ChatCompletionRequest, request: Request, owner: str = owner_dep) -> Any:
        start = time.perf_counter()
        frontend.check_model(body.model)
        params = frontend.sampling(body, chat=True)
        messages = [Message("system" if m.role == "developer" else m.role, m.text, m.name) for m in body.messages]
        delta = request.headers.get("x-hmt-messages", "full").lower()
        if delta not in ("full", "new"):
            raise InvalidInputError("X-HMT-Messages must be 'full' (the whole history) or 'new' (only new messages)")
        schema, constraint = body.response_schema, None
        if schema is not None:  # response_format: the reply's tokens are constrained to the schema
            constraint = await compiler_for(service.model, params.stop_token_ids).compile(
                schema, "response_format.json_schema.schema")
        turn = await frontend.start_chat(owner, frontend.session_of(request, body.user), messages, params,
                                         delta == "new", constraint)
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, finish: str | None) -> ChatCompletionChunk:
            delta = Delta(role="assistant", content="") if text is None else Delta(content=text or None)
            return ChatCompletionChunk(id=response_id, created=created, model=frontend.model_name,
                                       system_fingerprint=frontend.fingerprint,
                                       choices=[ChunkChoice(delta=delta, finish_reason=finish)])

        def final(result: JobResult) -> ChatCompletion:
            choice = ChatChoice(message=ChatCompletionMessage(content=result.text),
                                finish_reason=_finish_reason(result))
            return ChatCompletion(id=response_id, created=created, model=frontend.model_name,
                                  system_fingerprint=frontend.fingerprint, choices=[choice],
                                  usage=frontend.usage(turn, result))

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await frontend.respond(turn, start, body.stream, include_usage, chunk, final)

    @router.post("/completions", response_model=Completion, responses={200: {"content": {"text/event-stream": {}}}})
    async def completions(body: CompletionRequest, request: Request, owner: str = owner_dep) -> Any:
        start = time.perf_counter()
        frontend.check_model(body.model)
        params = frontend.sampling(body, chat=False)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            tokens = await service.tokens_of(prompt, None)
        else:
            tokens = await service.tokens_of(None, list(prompt))  # type: ignore[arg-type]
        session_id = frontend.session_of(request, body.user)
        if not tokens and session_id is None:
            raise InvalidInputError("prompt: empty prompt without a session to continue")
        turn = await frontend.start_completion(owner, session_id, tokens, params)
        response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, finish: str | None) -> Completion | None:
            if text is None:
                return None
            return Completion(id=response_id, created=created, model=frontend.model_name,
                              system_fingerprint=frontend.fingerprint,
                              choices=[CompletionChoice(text=text or "", finish_reason=finish)])

        def final(result: JobResult) -> Completion:
            done = chunk(result.text, _finish_reason(result))
            assert done is not None  # result.text is a str, never None
            done.usage = frontend.usage(turn, result)
            return done

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await frontend.respond(turn, start, body.stream, include_usage, chunk, final)

    return router
