"""The Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}, GET .../input_items.

A response is one chat turn. Without `previous_response_id` it reads its input (the instructions
as a system message, then the input messages, rendered with the chat template) into a fresh
session; with one, it starts from that response's stored state and reads only the new input:
the history is in the memory, never sent or read again. `usage.input_tokens_details.cached_tokens`
counts the tokens that memory already held. A stored response (`store`, the default) keeps its
state (service.responses_store); `store: false` runs on a state that is never written.

Instructions, as OpenAI defines them, apply to one response; here earlier responses' instructions
stay in the memory (the state has read them), and new ones are read as a system message before
the new input.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from hmt_core import InvalidInputError
from service.conversation import ChatTemplate, Message
from service.errors import error_payload
from service.openai_api import OpenAIFrontend
from service.responses_protocol import (
    ContentPartEvent,
    CreateResponse,
    DeletedResponse,
    IncompleteDetails,
    InputItemList,
    InputText,
    InputTokensDetails,
    MessageItem,
    OutputItemEvent,
    OutputText,
    ResponseError,
    ResponseEvent,
    ResponseObject,
    ResponseUsage,
    TextDeltaEvent,
    TextDoneEvent,
)
from service.responses_store import ResponseStore, new_id
from service.session_service import Service
from service.store import Lease
from service.streaming import sse, token_events
from service.worker import Job, JobResult

INCOMPLETE = {"length": "max_output_tokens"}  # finish reason -> incomplete_details.reason


@dataclass
class Run:
    """A started response: its job and the task that (when stored) saves it."""

    response: ResponseObject  # in progress; `final` once the job is done
    job: Job
    task: Any  # asyncio.Task[JobResult]
    messages: list[Message]
    prompt: str  # the new messages rendered with a generation prompt (closing() needs it)
    read: int  # tokens read for this response
    cached: int  # tokens the base state held
    final: ResponseObject | None = None
    pending: str = ""
    items: list[MessageItem] = field(default_factory=list)


class ResponsesFrontend:
    def __init__(self, service: Service, store: ResponseStore) -> None:
        self.service, self.store = service, store
        self.chat = OpenAIFrontend(service)  # the model's name and chat template, as /v1/chat uses them

    @property
    def template(self) -> ChatTemplate:
        if self.chat.template is None:
            raise InvalidInputError("the Responses API needs a model with a tokenizer")
        return self.chat.template

    async def start(self, owner: str, body: CreateResponse) -> Run:
        service, template = self.service, self.template
        self.chat.check_model(body.model)
        inputs = body.messages
        messages = ([Message("system", body.instructions)] if body.instructions else []) + [
            Message("system" if m.role == "developer" else m.role, m.text) for m in inputs]
        items = [MessageItem(id=new_id("msg"), role=m.role,  # type: ignore[arg-type]  # checked by parse_input
                             content=[OutputText(text=m.text) if m.part == "output_text" else InputText(text=m.text)])
                 for m in inputs]
        prompt = template.render(messages, generation_prompt=True)
        if body.previous_response_id is not None:
            base = await self.store.base(body.previous_response_id, owner)
            state = service.state_from(base.state)
            text = base.pending + template.continuation(messages)
        else:
            state, text = service.model.new_session(), prompt
        tokens = await service.tokens_of(text, None)
        params = service.sampling_params(
            max_tokens=body.max_output_tokens or service.settings.default_max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            stop=template.stop_strings, stop_token_ids=template.stop_token_ids)
        response = ResponseObject(
            id=new_id("resp"), created_at=int(time.time()), status="in_progress", model=self.chat.model_name,
            previous_response_id=body.previous_response_id, instructions=body.instructions,
            truncation=body.truncation or "disabled", top_p=params.top_p, temperature=params.temperature,
            tool_choice="none" if body.tool_choice == "none" else "auto", max_output_tokens=body.max_output_tokens,
            store=body.store, metadata=body.metadata or {}, safety_identifier=body.safety_identifier,
            prompt_cache_key=body.prompt_cache_key, user=body.user,
            service_tier="default" if body.service_tier in (None, "auto") else body.service_tier)
        run = Run(response, None, None, messages, prompt, len(tokens), state.tokens_seen,  # type: ignore[arg-type]
                  items=items)
        if body.store:
            def side(result: JobResult) -> Any:  # the response is saved with the state, atomically
                final = self.finish(run, result)
                return self.store.writes(final, run.items, run.pending)

            def launch(lease: Lease) -> tuple[Job, Any]:
                return self.store.writer.launch(lease, owner, state, tokens, params, side)

            run.job, run.task = await self.store.launch(response.id, owner, launch)
        else:
            run.job, run.task = service.run_unsaved(state, tokens, params)
        return run

    def finish(self, run: Run, result: JobResult) -> ResponseObject:
        """The response once its job is done (and the template text its state still owes)."""
        if run.final is not None:
            return run.final
        template = self.template
        ended = template.ended_turn(result.tokens, result.finish_reason)
        run.pending = template.closing(run.messages, run.prompt, result.text, ended)
        status: Literal["completed", "incomplete", "cancelled"] = "completed"
        if result.finish_reason in INCOMPLETE:
            status = "incomplete"
        elif result.finish_reason == "cancelled":  # the client went away mid-stream
            status = "cancelled"
        message = MessageItem(id=self.message_id(run), status="incomplete" if status != "completed" else "completed",
                              role="assistant", content=[OutputText(text=result.text)])
        usage = ResponseUsage(input_tokens=run.cached + run.read,
                              input_tokens_details=InputTokensDetails(cached_tokens=run.cached),
                              output_tokens=len(result.tokens), total_tokens=run.cached + run.read + len(result.tokens))
        run.final = run.response.model_copy(update={
            "status": status, "completed_at": int(time.time()) if status == "completed" else None,
            "incomplete_details": IncompleteDetails(reason=INCOMPLETE[result.finish_reason or ""])
            if status == "incomplete" else None, "output": [message], "usage": usage})
        return run.final

    @staticmethod
    def message_id(run: Run) -> str:
        return "msg_" + run.response.id.removeprefix("resp_")  # one output message per response

    # ----- streaming ------------------------------------------------------------------------

    def events(self, run: Run, start: float, owner: str) -> AsyncIterator[str]:
        counter = iter(range(1 << 62))

        def event(model: type[BaseModel], **fields: Any) -> str:
            data = model(sequence_number=next(counter), **fields).model_dump(mode="json")
            return sse(data, data["type"])

        item_id = self.message_id(run)
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}

        def message(status: Literal["in_progress", "completed", "incomplete"], text: str | None) -> MessageItem:
            return MessageItem(id=item_id, status=status, role="assistant",
                               content=[] if text is None else [OutputText(text=text)])

        async def stream() -> AsyncIterator[str]:
            try:
                yield event(ResponseEvent, type="response.created", response=run.response)
                yield event(ResponseEvent, type="response.in_progress", response=run.response)
                yield event(OutputItemEvent, type="response.output_item.added", output_index=0,
                            item=message("in_progress", None))
                yield event(ContentPartEvent, type="response.content_part.added", part=OutputText(text=""), **where)
                async for token in token_events(run.job, start):
                    if token.text:
                        yield event(TextDeltaEvent, delta=token.text, **where)
                try:
                    final = await self.completed(run, owner)
                except Exception as exc:  # the job or its save failed: the response failed
                    _, body = error_payload(exc)
                    error = ResponseError(code=body["error"]["type"], message=body["error"]["message"])
                    failed = run.response.model_copy(update={"status": "failed", "error": error})
                    yield event(ResponseEvent, type="response.failed", response=failed)
                    return
                done = final.output[0]
                text = done.content[0].text
                yield event(TextDoneEvent, text=text, **where)
                yield event(ContentPartEvent, type="response.content_part.done", part=done.content[0], **where)
                yield event(OutputItemEvent, type="response.output_item.done", output_index=0, item=done)
                kind = "response.completed" if final.status == "completed" else "response.incomplete"
                yield event(ResponseEvent, type=kind, response=final)
            finally:
                run.job.cancelled = True  # no-op after the end; on disconnect, stops sampling

        return stream()

    async def completed(self, run: Run, owner: str) -> ResponseObject:
        """The finished response, once saved (so the next request can name it)."""
        result: JobResult = await run.task
        final = self.finish(run, result)
        if run.response.store:
            await self.store.saved(owner)
        return final


def _page(items: list[MessageItem], after: str | None, limit: int, order: str) -> InputItemList:
    ordered = items if order == "asc" else items[::-1]
    start = 0
    if after is not None:
        ids = [item.id for item in ordered]
        if after not in ids:
            raise InvalidInputError(f"after: no input item {after!r} in this response")
        start = ids.index(after) + 1
    page = ordered[start:start + limit]
    return InputItemList(data=page, first_id=page[0].id if page else None, last_id=page[-1].id if page else None,
                         has_more=start + limit < len(ordered))


def create_router(service: Service) -> APIRouter:
    store = ResponseStore(service)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await store.close()

    frontend = ResponsesFrontend(service, store)
    router = APIRouter(prefix="/v1", tags=["responses"], lifespan=lifespan)
    owner_dep = Depends(service.owner)

    @router.post("/responses", response_model=ResponseObject, responses={200: {"content": {"text/event-stream": {}}}})
    async def create_response(body: CreateResponse, owner: str = owner_dep) -> Any:
        start = time.perf_counter()
        run = await frontend.start(owner, body)
        if body.stream:
            return StreamingResponse(frontend.events(run, start, owner), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        async for _ in token_events(run.job, start):  # the job's tokens, for the time-to-first-token metric
            pass
        final = await frontend.completed(run, owner)
        return JSONResponse(final.model_dump(mode="json"))

    @router.get("/responses/{response_id}", response_model=ResponseObject)
    async def get_response(response_id: str, stream: bool = False, owner: str = owner_dep) -> ResponseObject:
        if stream:
            raise InvalidInputError("stream: replaying a stored response's events is not supported")
        return await store.get(response_id, owner)

    @router.delete("/responses/{response_id}", response_model=DeletedResponse)
    async def delete_response(response_id: str, owner: str = owner_dep) -> DeletedResponse:
        await store.delete(response_id, owner)
        return DeletedResponse(id=response_id)

    @router.get("/responses/{response_id}/input_items", response_model=InputItemList)
    async def input_items(response_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                          order: Literal["asc", "desc"] = "desc", owner: str = owner_dep) -> InputItemList:
        return _page(await store.input_items(response_id, owner), after, limit, order)

    return router

