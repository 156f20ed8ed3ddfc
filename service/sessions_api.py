"""The session API (/sessions): create, read, delete, export and import, append, generate."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse

from hmt_core import InvalidInputError
from service.chat_sessions import CONVERSATION_FIELD, TRANSCRIPT_FIELD, read_transcript
from service.errors import error_payload
from service.job import JobResult, SegmentEvent
from service.memory import RECALL_FIELD, RECALL_HISTORY, entry
from service.protocol import (
    AppendRequest,
    AppendResponse,
    CreateSession,
    GenerateRequest,
    GenerateResponse,
    ListedSession,
    SegmentProgress,
    SessionInfo,
    SessionList,
    SessionMemory,
    SessionMessages,
    TranscriptMessage,
    Usage,
    check_session_id,
)
from service.session_service import Service
from service.store import SideWrites
from service.streaming import sse


def create_router(service: Service) -> APIRouter:
    router = APIRouter(prefix="", tags=["sessions"])
    owner_dep = Depends(service.owner)

    @router.post("/sessions", status_code=201, response_model=SessionInfo)
    async def create_session(body: CreateSession | None = None, owner: str = owner_dep) -> SessionInfo:
        session_id = (body.id if body else None) or uuid.uuid4().hex
        state = service.model.new_session()
        data = service.encode(state)
        await service.store.create(session_id, owner, data, state.version)
        return service.info(session_id, state, len(data))

    @router.get("/sessions", response_model=SessionList)
    async def list_sessions(owner: str = owner_dep,
                            limit: int = Query(100, ge=1, le=1000, description="at most this many")) -> SessionList:
        """The sessions of the caller's API key (all sessions without keys), most recently used first."""
        listed = await service.store.list_sessions(owner, limit)
        return SessionList(sessions=[ListedSession(id=sid, last_used=used) for sid, used in listed])

    @router.get("/sessions/{session_id}", response_model=SessionInfo)
    async def get_session(session_id: str, owner: str = owner_dep) -> SessionInfo:
        data, _ = await service.store.get(session_id, owner)
        return service.info(session_id, service.state_from(data), len(data))

    @router.get("/sessions/{session_id}/memory", response_model=SessionMemory)
    async def get_memory(session_id: str, owner: str = owner_dep,
                         last: int = Query(RECALL_HISTORY, ge=1, le=RECALL_HISTORY,
                                           description="recall entries of at most this many last segments")
                         ) -> SessionMemory:
        """Tokens seen, segments committed, the state's size next to a KV cache's for the same
        history, and the top recall weights of the last committed segments."""
        return await service.memory(service.store, session_id, owner, last)

    @router.get("/sessions/{session_id}/messages", response_model=SessionMessages)
    async def get_messages(session_id: str, owner: str = owner_dep) -> SessionMessages:
        """The chat transcript (empty for a session that never chatted)."""
        transcript = await read_transcript(service.store, session_id, owner)
        return SessionMessages(id=session_id, complete=transcript.complete, messages=[
            TranscriptMessage(role=m.role, content=m.content, name=m.name) for m in transcript.messages])

    @router.delete("/sessions/{session_id}")
    async def delete_session(session_id: str, owner: str = owner_dep) -> dict[str, Any]:
        await service.store.delete(session_id, owner)
        return {"id": session_id, "deleted": True}

    @router.get("/sessions/{session_id}/state",
             response_class=Response, responses={200: {"content": {"application/octet-stream": {}}}})
    async def export_state(session_id: str, owner: str = owner_dep) -> Response:
        data, version = await service.store.get(session_id, owner)
        return Response(data, media_type="application/octet-stream", headers={"X-HMT-Version": str(version)})

    @router.put("/sessions/{session_id}/state", response_model=SessionInfo)
    async def import_state(session_id: str, request: Request, owner: str = owner_dep) -> SessionInfo:
        """Replace (or create) a session from exported bytes; an invalid body changes nothing."""
        check_session_id(session_id)
        data = await request.body()  # bounded by BodyLimit
        state = service.imported(data)
        async with service.store.leased(session_id, owner, must_exist=False) as lease:
            # The version only grows, so writers fenced on an older version stay fenced off.
            state = replace(state, version=max(state.version, lease.version + 1))
            data = service.encode(state)
            # the imported state is not the conversation the chat record (and transcript, and recall
            # history) describe: forget them
            forget = {CONVERSATION_FIELD: b"", TRANSCRIPT_FIELD: b"", RECALL_FIELD: b""}
            await service.store.save(lease, data, state.version, SideWrites(fields=forget, clear_states=True))
        return service.info(session_id, state, len(data))

    @router.post("/sessions/{session_id}/append", response_model=AppendResponse,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def append(session_id: str, body: AppendRequest, request: Request, owner: str = owner_dep) -> Any:
        """Append text or token ids. With `Accept: text/event-stream`: a `segment` event per
        committed segment (data: a SegmentProgress, with the segment's recall as a RecallEntry),
        then a `summary` event with the response body."""
        tokens = await service.tokens_of(body.text, body.tokens)
        if not tokens:
            raise InvalidInputError("nothing to append: the input is empty")
        job, task = await service.start_job(session_id, owner, tokens, None)

        def summary(result: JobResult) -> AppendResponse:
            return AppendResponse(id=session_id, tokens_appended=len(tokens),
                                  segments_committed=result.segments_committed,
                                  tokens_seen=result.state.tokens_seen,
                                  segments_total=result.state.segments_committed,
                                  window_tokens=len(result.state.window))

        if "text/event-stream" not in request.headers.get("accept", ""):
            return summary(await task)

        # lazy commit: the window's tokens and the new ones, less the last, fill whole segments
        expected = (len(job.state.window) + len(tokens) - 1) // service.model.hmt_config.segment_tokens

        async def stream() -> AsyncIterator[str]:
            async for event in job.stream():
                if isinstance(event, SegmentEvent):
                    progress = SegmentProgress(segments_committed=event.segments_committed,
                                               segments_total=event.segments_total, tokens_seen=event.tokens_seen,
                                               segments_expected=expected, recall_distance=event.recall.distance,
                                               recall=entry(event.recall))
                    yield sse(progress.model_dump(), "segment")
            try:
                yield sse(summary(await task).model_dump(), "summary")
            except Exception as exc:
                yield sse(error_payload(exc)[1], "error")

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @router.post("/sessions/{session_id}/generate", response_model=GenerateResponse,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def generate(session_id: str, body: GenerateRequest, owner: str = owner_dep) -> Any:
        """Append the prompt, then generate a reply that is appended to the session too.
        `stream: true`: one `data: {"token", "text"}` event per token, a final event with
        finish_reason and usage, then `data: [DONE]`."""
        start = time.perf_counter()
        params = service.sampling_params(max_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k,
                                         top_p=body.top_p, seed=body.seed, stop=body.stop, ignore_eos=body.ignore_eos)
        prompt = await service.tokens_of(body.prompt, body.prompt_tokens) if \
            (body.prompt or body.prompt_tokens) else []
        job, task = await service.start_job(session_id, owner, prompt, params)

        def final(result: JobResult) -> GenerateResponse:
            usage = Usage(prompt_tokens=len(prompt), completion_tokens=len(result.tokens),
                          total_tokens=len(prompt) + len(result.tokens))
            return GenerateResponse(id=session_id, text=result.text, tokens=result.tokens,
                                    finish_reason=result.finish_reason or "stop", usage=usage,
                                    tokens_seen=result.state.tokens_seen,
                                    segments_total=result.state.segments_committed,
                                    window_tokens=len(result.state.window))

        if not body.stream:
            async for _ in job.stream_tokens(start):
                pass
            return final(await task)

        async def stream() -> AsyncIterator[str]:
            try:
                async for event in job.stream_tokens(start):
                    yield sse({"token": event.token, "text": event.text})
                try:
                    done = final(await task).model_dump(exclude={"tokens", "text"})
                    yield sse(done)
                except Exception as exc:
                    yield sse(error_payload(exc)[1], "error")
                yield sse("[DONE]")
            finally:
                job.cancelled = True  # no-op after the end; on disconnect, stops sampling

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return router
