"""The OpenAI-compatible API: GET /v1/models, POST /v1/chat/completions, POST /v1/completions.

Sessions over a stateless protocol: a request names its session with the `X-Session-Id` header
(or the `user` field); the session is created on first use. A chat request is a turn of a chat
session (service.chat_sessions: what is new in the resent history, which session a request
without an id continues, what is stored); this router parses the request and shapes the reply.
Every chat response names its session in `X-Session-Id` and says how it continued in
`X-HMT-Continuation` (new, continued, branched, restarted). `usage.prompt_tokens` counts the
tokens read for this request: the new part of the conversation, not the history.

/v1/completions appends the prompt to the named session and continues it (no template); without
a session it is stateless.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from hmt_core import InvalidInputError, SamplingParams
from service.chat_sessions import ChatSessions, ChatTurn
from service.constrained import compiler_for
from service.conversation import Message
from service.errors import APIError, error_payload
from service.job import Job, JobResult
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
from service.streaming import sse

SESSION_HEADER = "X-Session-Id"


@dataclass
class Reply:
    """A started request, as a response reports it: its job, its saved result (awaited once the
    job's stream ends), the tokens it read, and the response's headers."""

    job: Job
    result: Callable[[], Awaitable[JobResult]]
    prompt_tokens: int
    headers: dict[str, str]

    @classmethod
    def of_chat(cls, chats: ChatSessions, turn: ChatTurn) -> Reply:
        return cls(turn.job, lambda: chats.finish(turn), turn.prompt_tokens,
                   {SESSION_HEADER: turn.session_id, "X-HMT-Continuation": turn.continuation})


class OpenAIFrontend:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.chats = ChatSessions(service)
        self.model_name = service.settings.model_name()
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
        template = self.chats.template
        if chat and template is not None:  # end the reply where the template ends a turn
            stop, stop_ids = stop + template.stop_strings, template.stop_token_ids
        return self.service.sampling_params(
            max_tokens=body.token_limit or self.service.settings.default_max_tokens, temperature=body.temperature,
            top_p=body.top_p, seed=body.seed, stop=stop, stop_token_ids=stop_ids)

    async def start_completion(self, owner: str, session_id: str | None, tokens: list[int],
                               params: SamplingParams) -> Reply:
        service = self.service
        if session_id is None:  # stateless: a fresh state, nothing stored
            job, task = service.run_unsaved(service.model.new_session(), tokens, params)
            return Reply(job, lambda: task, len(tokens), {})
        job, task = await service.start_job(session_id, owner, tokens, params, create=True)
        return Reply(job, lambda: task, len(tokens), {SESSION_HEADER: session_id})

    # ----- responses ----------------------------------------------------------------------------

    def usage(self, reply: Reply, result: JobResult) -> Usage:
        return Usage(prompt_tokens=reply.prompt_tokens, completion_tokens=len(result.tokens),
                     total_tokens=reply.prompt_tokens + len(result.tokens))

    async def respond(self, reply: Reply, start: float, stream: bool, include_usage: bool,
                      chunk: Any, final: Any) -> Any:
        """Collect or stream a reply: chunk(text, finish_reason) -> one SSE payload model;
        final(result) -> the whole response model."""
        if not stream:
            async for _ in reply.job.stream_tokens(start):
                pass
            result = await reply.result()
            return JSONResponse(final(result).model_dump(), headers=reply.headers)

        async def events() -> AsyncIterator[str]:
            try:
                opening = chunk(None, None)  # chat: the role; completions: nothing
                if opening is not None:
                    yield sse(opening.model_dump())
                async for event in reply.job.stream_tokens(start):
                    if event.text:
                        yield sse(chunk(event.text, None).model_dump())
                try:
                    result = await reply.result()
                    yield sse(chunk("", _finish_reason(result)).model_dump())
                    if include_usage:
                        usage_chunk = chunk("", None)
                        usage_chunk.choices = []
                        usage_chunk.usage = self.usage(reply, result)
                        yield sse(usage_chunk.model_dump())
                except Exception as exc:
                    yield sse(_openai_error(exc))
                yield sse("[DONE]")
            finally:
                reply.job.cancelled = True  # no-op after the end; on disconnect, stops sampling

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **reply.headers})


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
        turn = await frontend.chats.start_turn(owner, frontend.session_of(request, body.user), messages, params,
                                               delta == "new", constraint)
        reply = Reply.of_chat(frontend.chats, turn)
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
                                  usage=frontend.usage(reply, result))

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await frontend.respond(reply, start, body.stream, include_usage, chunk, final)

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
        reply = await frontend.start_completion(owner, session_id, tokens, params)
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
            done.usage = frontend.usage(reply, result)
            return done

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await frontend.respond(reply, start, body.stream, include_usage, chunk, final)

    return router
