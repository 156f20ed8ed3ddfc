"""The Responses API's routes: POST /v1/responses, GET and DELETE /v1/responses/{id},
GET /v1/responses/{id}/input_items, and /v1/conversations (create, retrieve, update, delete; items
list, add, retrieve, delete). The turns are in service.responses_turns, the storage in
service.responses_store."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from hmt_core import InvalidInputError
from service.errors import APIError
from service.memory import RECALL_HISTORY
from service.protocol import SessionMemory
from service.responses_protocol import (
    AddItems,
    ConversationObject,
    CreateConversation,
    CreateResponse,
    DeletedConversation,
    DeletedResponse,
    InputItemList,
    Item,
    ResponseObject,
    UpdateConversation,
    parse_input,
)
from service.responses_store import ConversationRecord, ResponseStore
from service.responses_turns import ResponsesFrontend, input_item
from service.session_service import Service


def _page(items: list[Item], after: str | None, limit: int, order: str) -> InputItemList:
    ordered = items if order == "asc" else items[::-1]
    start = 0
    if after is not None:
        ids = [item.id for item in ordered]
        if after not in ids:
            raise InvalidInputError(f"after: no item {after!r} in this list")
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
    async def create_response(body: CreateResponse, request: Request, owner: str = owner_dep) -> Any:
        """An HMT extension: with `X-HMT-Progress: segments` a stream also says how far the reading
        of a long input is, in `hmt.segment` events (what /sessions/{id}/append streams as `segment`)."""
        start = time.perf_counter()
        run = await frontend.start(owner, body)
        frontend.track(owner, run)
        run.progress = request.headers.get("x-hmt-progress", "").lower() == "segments"
        if body.stream:
            return StreamingResponse(frontend.event_stream(run, start, owner), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        async for _ in run.job.stream_tokens(start):  # the job's tokens, for the time-to-first-token metric
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

    @router.post("/responses/{response_id}/cancel", response_model=ResponseObject)
    async def cancel_response(response_id: str, owner: str = owner_dep) -> ResponseObject:
        """Stop a response while it runs (on the replica that runs it: another replica answers as
        for a finished one) and return it once stored: status `cancelled`, the reply so far, which
        its state holds and a continuation starts from; its stream ends with it. A finished
        response is returned as it is; an unknown one (or not stored) is a 404."""
        return await frontend.cancel(response_id, owner)

    @router.get("/responses/{response_id}/input_items", response_model=InputItemList)
    async def input_items(response_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                          order: Literal["asc", "desc"] = "desc", owner: str = owner_dep) -> InputItemList:
        return _page(await store.input_items(response_id, owner), after, limit, order)

    last_dep = Query(RECALL_HISTORY, ge=1, le=RECALL_HISTORY,
                     description="recall entries of at most this many last segments")

    @router.get("/responses/{response_id}/memory", response_model=SessionMemory, tags=["hmt"])
    async def response_memory(response_id: str, last: int = last_dep, owner: str = owner_dep) -> SessionMemory:
        """An HMT extension: the memory of the stored response's state, as GET /sessions/{id}/memory."""
        return await store.memory(service, "Response", response_id, owner, last)

    @router.get("/conversations/{conversation_id}/memory", response_model=SessionMemory, tags=["hmt"])
    async def conversation_memory(conversation_id: str, last: int = last_dep, owner: str = owner_dep) -> SessionMemory:
        """An HMT extension: the memory of the conversation's state, as GET /sessions/{id}/memory."""
        return await store.memory(service, "Conversation", conversation_id, owner, last)

    # ----- conversations -----------------------------------------------------------------------

    def conversation_object(conversation_id: str, record: ConversationRecord) -> ConversationObject:
        return ConversationObject(id=conversation_id, created_at=record.created_at, metadata=record.metadata)

    @router.post("/conversations", response_model=ConversationObject, tags=["conversations"])
    async def create_conversation(body: CreateConversation, owner: str = owner_dep) -> ConversationObject:
        record = ConversationRecord(int(time.time()), body.metadata or {},
                                    [input_item(m) for m in parse_input(body.items)] if body.items else [])
        state = service.model.new_session()
        conversation_id = await store.create_conversation(owner, service.encode(state), state.version, record)
        return conversation_object(conversation_id, record)

    @router.get("/conversations/{conversation_id}", response_model=ConversationObject, tags=["conversations"])
    async def get_conversation(conversation_id: str, owner: str = owner_dep) -> ConversationObject:
        return conversation_object(conversation_id, await store.read_conversation(conversation_id, owner))

    @router.post("/conversations/{conversation_id}", response_model=ConversationObject, tags=["conversations"])
    async def update_conversation(conversation_id: str, body: UpdateConversation,
                                  owner: str = owner_dep) -> ConversationObject:
        async with store.conversation(conversation_id, owner) as (lease, record):
            record.metadata = body.metadata
            await store.update_conversation(lease, record)
        return conversation_object(conversation_id, record)

    @router.delete("/conversations/{conversation_id}", response_model=DeletedConversation, tags=["conversations"])
    async def delete_conversation(conversation_id: str, owner: str = owner_dep) -> DeletedConversation:
        await store.delete_conversation(conversation_id, owner)
        return DeletedConversation(id=conversation_id)

    @router.get("/conversations/{conversation_id}/items", response_model=InputItemList, tags=["conversations"])
    async def list_items(conversation_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                         order: Literal["asc", "desc"] = "desc", owner: str = owner_dep) -> InputItemList:
        return _page((await store.read_conversation(conversation_id, owner)).items, after, limit, order)

    @router.post("/conversations/{conversation_id}/items", response_model=InputItemList, tags=["conversations"])
    async def add_items(conversation_id: str, body: AddItems, owner: str = owner_dep) -> InputItemList:
        """Added items are read by the conversation's next response."""
        added = [input_item(m) for m in parse_input(body.items)]
        async with store.conversation(conversation_id, owner) as (lease, record):
            record.items += added
            await store.update_conversation(lease, record)
        return _page(added, None, len(added), "asc")

    def find(record: ConversationRecord, item_id: str) -> int:
        for index, item in enumerate(record.items):
            if item.id == item_id:
                return index
        raise APIError(404, "not_found", f"Item with id {item_id!r} not found in this conversation.")

    @router.get("/conversations/{conversation_id}/items/{item_id}", response_model=Item, tags=["conversations"])
    async def get_item(conversation_id: str, item_id: str, owner: str = owner_dep) -> Item:
        record = await store.read_conversation(conversation_id, owner)
        return record.items[find(record, item_id)]

    @router.delete("/conversations/{conversation_id}/items/{item_id}", response_model=ConversationObject,
                   tags=["conversations"])
    async def delete_item(conversation_id: str, item_id: str, owner: str = owner_dep) -> ConversationObject:
        """An item the memory has read cannot be forgotten: the next response reads the remaining
        items again, from a fresh state."""
        async with store.conversation(conversation_id, owner) as (lease, record):
            index = find(record, item_id)
            del record.items[index]
            if index < record.read:  # the state has read it
                record.stale, record.read = True, record.read - 1
            await store.update_conversation(lease, record)
        return conversation_object(conversation_id, record)

    return router
