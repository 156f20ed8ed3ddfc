"""HTTP routes, error mapping and API-key auth.

Data path of a write: handler -> store.acquire (lock + read) -> worker job -> store.save
(version compare-and-set) -> release -> response/stream. The store-to-store part runs in its
own task, not in the response: a client that disconnects mid-stream cannot leave a session
half-written. Disconnect rule: accepted input (the append, the generate prompt) is always
applied in full, and a generation's reply so far is all recorded (every token sent, plus any
the worker produced before it saw the disconnect); the session stays consistent either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hmt_core import (
    CorruptStateError,
    HMTModel,
    InvalidInputError,
    ModelMismatchError,
    SamplingParams,
    SessionState,
)
from service import metrics
from service.openai_protocol import openai_error_body
from service.protocol import (
    AppendRequest,
    AppendResponse,
    CreateSession,
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    SessionInfo,
    Usage,
    check_session_id,
)
from service.settings import Settings
from service.store import (
    ChatRecord,
    Lease,
    SessionBusyError,
    SessionConflictError,
    SessionNotFoundError,
    SessionStore,
    StoreUnavailableError,
)
from service.worker import Job, JobResult, ModelWorker, SegmentEvent, TokenEvent

log = logging.getLogger(__name__)

_END = object()  # marks the end of a job's event queue, after the state was saved (or not)


class APIError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


_ERRORS: list[tuple[type[Exception], int, str]] = [
    (SessionNotFoundError, 404, "not_found"),
    (SessionBusyError, 409, "session_busy"),
    (SessionConflictError, 409, "conflict"),
    (StoreUnavailableError, 503, "store_unavailable"),
    (ModelMismatchError, 409, "model_mismatch"),
    (CorruptStateError, 422, "corrupt_state"),
    (InvalidInputError, 422, "invalid_input"),
]


def error_response(status: int, kind: str, message: str, request: Request | None = None,
                   param: str | None = None) -> JSONResponse:
    """Our error body, or OpenAI's shape under /v1 (where a bad request is 400, not 422)."""
    if request is not None and request.url.path.startswith("/v1/"):
        status = 400 if status == 422 else status
        return JSONResponse(openai_error_body(status, kind, message, param), status_code=status)
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def error_payload(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The status and JSON body for any exception; unknown ones never leak details."""
    if isinstance(exc, APIError):
        return exc.status, {"error": {"message": exc.message, "type": exc.kind}}
    for cls, status, kind in _ERRORS:
        if isinstance(exc, cls):
            return status, {"error": {"message": str(exc), "type": kind}}
    log.error("internal error", exc_info=exc)
    return 500, {"error": {"message": "internal server error", "type": "internal_error"}}


class BodyLimit:
    """ASGI middleware: a body without Content-Length (chunked) is counted while it streams in and
    refused with 413 once over `max_bytes`, so it is never read whole, let alone tokenized. (A
    declared Content-Length over the limit is refused before reading, in `_observe`.) Raised as an
    HTTPException: FastAPI's body parsing passes those on to our handlers, our JSON body."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0

        async def counted() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise StarletteHTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, counted, send)


def sse(data: Any, event: str | None = None) -> str:
    body = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {event}\n" if event else "") + f"data: {body}\n\n"


async def token_events(job: Job, start: float) -> AsyncIterator[TokenEvent]:
    """A job's tokens as they come, until it is saved; records time to first token."""
    first = True
    while (event := await job.events.get()) is not _END:
        if isinstance(event, TokenEvent):
            if first:
                metrics.TTFT_SECONDS.observe(time.perf_counter() - start)
                first = False
            yield event


class Service:
    """Everything a request needs: the model, its worker, the store, the settings."""

    def __init__(self, settings: Settings, model: HMTModel, store: SessionStore) -> None:
        self.settings = settings
        self.model = model
        self.store = store
        self.worker = ModelWorker(model, settings.max_batch, settings.round_token_budget)
        self.fingerprint = model.fingerprint
        self._tasks: set[asyncio.Task[Any]] = set()  # strong references to session tasks
        self._keys = {hashlib.sha256(k.encode()).hexdigest()[:32]: k for k in settings.keys}
        self._state_key = settings.state_secret.encode() if settings.state_secret else None

    # ----- auth ------------------------------------------------------------------------------

    def owner(self, request: Request) -> str:
        """The owner tag sessions are stored under: '' without keys, else a hash of the key."""
        if not self._keys:
            return ""
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and key:
            for tag, known in self._keys.items():
                if hmac.compare_digest(key.encode(), known.encode()):
                    return tag
        raise APIError(401, "unauthorized", "missing or invalid API key (Authorization: Bearer <key>)")

    # ----- helpers -----------------------------------------------------------------------------

    def encode(self, state: SessionState) -> bytes:
        """A state's stored (and exported) bytes: signed when the operator set a secret."""
        return state.to_bytes(self._state_key)

    def imported(self, data: bytes) -> SessionState:
        """A state a client sent: verified whole (signature when there is a secret, then every
        invariant) before anything is written."""
        state = SessionState.from_bytes(data, self.fingerprint, key=self._state_key)
        self.model.check_session(state)
        return state

    def state_from(self, data: bytes) -> SessionState:
        """A stored state, checked against this model (409 if another model made it)."""
        try:
            state = SessionState.from_bytes(data, self.fingerprint)
            self.model.check_session(state)
        except CorruptStateError as exc:
            raise APIError(409, "corrupt_state", f"the stored session state is unusable: {exc}") from None
        return state

    async def tokens_of(self, text: str | None, tokens: list[int] | None) -> list[int]:
        if text is not None:
            if self.model.tokenizer is None:
                raise InvalidInputError("this model has no tokenizer: send token ids")
            # off the event loop: a long text takes a while to tokenize
            tokens = await asyncio.to_thread(self.model.tokenizer.encode, text, add_special_tokens=False)
        tokens = list(tokens or [])
        if len(tokens) > self.settings.max_append_tokens:
            raise APIError(413, "too_large", f"{len(tokens)} tokens exceed the limit of "
                                             f"{self.settings.max_append_tokens} per request")
        if tokens:
            self.model.check_tokens(tokens)
        return tokens

    def sampling_params(self, *, max_tokens: int, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                        **sampling: Any) -> SamplingParams:
        """Both APIs build their sampling parameters here: one set of limits and checks."""
        limit = self.settings.max_generate_tokens
        if max_tokens > limit:
            raise InvalidInputError(f"max_tokens {max_tokens} is over this server's limit of {limit}")
        if stop and self.model.tokenizer is None:
            raise InvalidInputError("stop strings need a model with a tokenizer")
        return SamplingParams(max_tokens=max_tokens, stop=tuple(stop), stop_token_ids=tuple(stop_token_ids),
                              **sampling)

    def info(self, session_id: str, state: SessionState, size: int) -> SessionInfo:
        return SessionInfo(id=session_id, tokens_seen=state.tokens_seen, segments_total=state.segments_committed,
                           window_tokens=len(state.window), state_bytes=size, version=state.version,
                           fingerprint=state.fingerprint)

    async def start_job(self, session_id: str, owner: str, tokens: list[int],
                        params: SamplingParams | None) -> tuple[Job, asyncio.Task[JobResult]]:
        lease = await self.store.acquire(session_id, owner)
        try:
            state = self.state_from(lease.data)
        except BaseException:
            await self.store.release(lease)
            raise
        return self.launch(lease, owner, state, tokens, params)

    def launch(self, lease: Lease, owner: str, state: SessionState, tokens: list[int], params: SamplingParams | None,
               chat: Callable[[JobResult], ChatRecord] | None = None) -> tuple[Job, asyncio.Task[JobResult]]:
        """Run a job on a state read under `lease`; the lease is released when it is saved (or failed).
        `chat` makes the conversation record saved atomically with the state."""
        try:
            if params is not None and not tokens and not state.window:
                raise InvalidInputError("the session has no tokens yet: give a prompt")
        except BaseException:
            self.spawn(self.store.release(lease))
            raise
        metrics.TOKENS_IN.inc(len(tokens))
        job = self.worker.submit(state, tokens, params)
        task = self.spawn(self._complete(lease, owner, job, chat))
        return job, task

    def run_unsaved(self, state: SessionState, tokens: list[int],
                    params: SamplingParams) -> tuple[Job, asyncio.Task[JobResult]]:
        """A job on a state that is not stored (a stateless request)."""
        metrics.TOKENS_IN.inc(len(tokens))
        job = self.worker.submit(state, tokens, params)

        async def complete() -> JobResult:
            try:
                return await job.done
            finally:
                job.events.put_nowait(_END)

        return job, self.spawn(complete())

    def spawn(self, coroutine: Awaitable[Any]) -> asyncio.Task[Any]:
        """A task that outlives the request (kept referenced so it is not collected)."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _complete(self, lease: Lease, owner: str, job: Job,
                        chat: Callable[[JobResult], ChatRecord] | None) -> JobResult:
        """Wait for the worker, save with compare-and-set, release; runs even if the client left."""
        metrics.ACTIVE_SESSIONS.inc()
        renewer = asyncio.create_task(self._renew(lease))
        try:
            result: JobResult = await job.done
            await self.store.save(lease, self.encode(result.state), result.state.version,
                                  chat(result) if chat else None)
            return result
        finally:
            renewer.cancel()
            await self.store.release(lease)
            metrics.ACTIVE_SESSIONS.dec()
            job.events.put_nowait(_END)

    async def _renew(self, lease: Lease) -> None:
        """Keep the lock while a long job runs; if renewal fails the version fence still protects."""
        while True:
            await asyncio.sleep(self.store.lock_ttl_ms / 3000)
            with contextlib.suppress(StoreUnavailableError):
                await self.store.renew(lease)


def create_app(service: Service) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.worker.start()
        yield
        service.worker.stop()
        await service.store.close()

    settings = service.settings
    # With API keys the schema is served to key holders only, and the browsable docs (a browser
    # cannot send the bearer key) are off: only health, readiness and metrics stay open.
    open_docs = not settings.keys
    app = FastAPI(title="hmt-serve", version="0.1.0", lifespan=lifespan,
                  description="Long conversations with Hierarchical Memory Transformer sessions stored in Redis.",
                  responses={code: {"model": ErrorBody} for code in (401, 404, 409, 413, 422, 503)},
                  openapi_url="/openapi.json" if open_docs else None,
                  docs_url="/docs" if open_docs else None, redoc_url="/redoc" if open_docs else None)
    app.state.service = service

    @app.exception_handler(Exception)
    async def _any_error(request: Request, exc: Exception) -> JSONResponse:
        status, body = error_payload(exc)
        return error_response(status, body["error"]["type"], body["error"]["message"], request)

    for cls in (APIError, *(c for c, _, _ in _ERRORS)):
        app.add_exception_handler(cls, _any_error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        parts = ["{}: {}".format(".".join(str(p) for p in e.get("loc", ())), e.get("msg")) for e in errors]
        fields = [str(e["loc"][-1]) for e in errors if len(e.get("loc", ())) > 1]
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request", request,
                              fields[0] if fields else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, kind, str(exc.detail), request)

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # added first: inside _observe

    @app.middleware("http")
    async def _observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_body_bytes:  # our JSON 413, unread
            response: Response = error_response(413, "too_large", f"request body over {settings.max_body_bytes} bytes",
                                                request)
        else:  # a chunked body over the limit: BodyLimit stops it while it streams in
            try:
                response = await call_next(request)
            except Exception as exc:  # errors raised past the handlers (middleware order)
                status, body = error_payload(exc)
                response = error_response(status, body["error"]["type"], body["error"]["message"], request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        labels = (path, request.method, str(response.status_code))
        metrics.REQUESTS.labels(*labels).inc()
        metrics.REQUEST_SECONDS.labels(*labels).observe(time.perf_counter() - start)
        return response

    owner_dep = Depends(service.owner)

    if not open_docs:
        @app.get("/openapi.json", include_in_schema=False)
        async def openapi_schema(owner: str = owner_dep) -> JSONResponse:
            return JSONResponse(app.openapi())

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        if not await service.store.ping():
            return error_response(503, "store_unavailable", "Redis is not reachable")
        return JSONResponse({"status": "ready", "fingerprint": service.fingerprint})

    @app.get("/metrics", tags=["ops"])
    async def metrics_route() -> Response:
        model = service.model
        if model.device.type == "cuda":
            metrics.MODEL_MEMORY_BYTES.set(torch.cuda.memory_allocated(model.device))
        else:
            metrics.MODEL_MEMORY_BYTES.set(sum(p.numel() * p.element_size() for p in model.parameters()))
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/sessions", status_code=201, response_model=SessionInfo, tags=["sessions"])
    async def create_session(body: CreateSession | None = None, owner: str = owner_dep) -> SessionInfo:
        session_id = (body.id if body else None) or uuid.uuid4().hex
        state = service.model.new_session()
        data = service.encode(state)
        await service.store.create(session_id, owner, data, state.version)
        return service.info(session_id, state, len(data))

    @app.get("/sessions/{session_id}", response_model=SessionInfo, tags=["sessions"])
    async def get_session(session_id: str, owner: str = owner_dep) -> SessionInfo:
        data, _ = await service.store.get(session_id, owner)
        return service.info(session_id, service.state_from(data), len(data))

    @app.delete("/sessions/{session_id}", tags=["sessions"])
    async def delete_session(session_id: str, owner: str = owner_dep) -> dict[str, Any]:
        await service.store.delete(session_id, owner)
        return {"id": session_id, "deleted": True}

    @app.get("/sessions/{session_id}/state", tags=["sessions"],
             response_class=Response, responses={200: {"content": {"application/octet-stream": {}}}})
    async def export_state(session_id: str, owner: str = owner_dep) -> Response:
        data, version = await service.store.get(session_id, owner)
        return Response(data, media_type="application/octet-stream", headers={"X-HMT-Version": str(version)})

    @app.put("/sessions/{session_id}/state", response_model=SessionInfo, tags=["sessions"])
    async def import_state(session_id: str, request: Request, owner: str = owner_dep) -> SessionInfo:
        """Replace (or create) a session from exported bytes; an invalid body changes nothing."""
        check_session_id(session_id)
        data = await request.body()  # bounded by BodyLimit
        state = service.imported(data)
        lease = await service.store.acquire(session_id, owner, must_exist=False)
        try:
            # The version only grows, so writers fenced on an older version stay fenced off.
            state = replace(state, version=max(state.version, lease.version + 1))
            data = service.encode(state)
            # the imported state is not the conversation the chat record describes: forget it
            await service.store.save(lease, data, state.version, ChatRecord(b""))
        finally:
            await service.store.release(lease)
        return service.info(session_id, state, len(data))

    @app.post("/sessions/{session_id}/append", response_model=AppendResponse, tags=["sessions"],
              responses={200: {"content": {"text/event-stream": {}}}})
    async def append(session_id: str, body: AppendRequest, request: Request, owner: str = owner_dep) -> Any:
        """Append text or token ids. With `Accept: text/event-stream`: a `segment` event per
        committed segment, then a `summary` event with the response body."""
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

        async def stream() -> AsyncIterator[str]:
            while (event := await job.events.get()) is not _END:
                if isinstance(event, SegmentEvent):
                    yield sse(asdict(event), "segment")
            try:
                yield sse(summary(await task).model_dump(), "summary")
            except Exception as exc:
                yield sse(error_payload(exc)[1], "error")

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/sessions/{session_id}/generate", response_model=GenerateResponse, tags=["sessions"],
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
            async for _ in token_events(job, start):
                pass
            return final(await task)

        async def stream() -> AsyncIterator[str]:
            try:
                async for event in token_events(job, start):
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

    from service.openai_api import create_router  # it builds on this module's Service

    app.include_router(create_router(service))
    return app
