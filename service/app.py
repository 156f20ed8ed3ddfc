"""The app's assembly: error handlers, middleware (metrics, body limit), the ops routes, and the
API routers (/sessions in service.sessions_api, /v1 in service.openai_api and
service.responses_api)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from hmt_core.precision import precision_of, stored_bytes
from service import metrics, openai_api, responses_api, sessions_api
from service.errors import ERRORS, APIError, error_payload, error_response
from service.protocol import ErrorBody, SegmentProgress
from service.session_service import Service

__all__ = ["Service", "create_app"]

STATIC_DIR = Path(__file__).resolve().parent / "static"  # the playground, shipped as package data
# the playground loads nothing from elsewhere; this makes the browser hold it to that
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


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
    generate_openapi = app.openapi

    def openapi_with_events() -> dict[str, Any]:
        """The schema, plus the models of server-sent event data (no route returns them as JSON)."""
        schema = app.openapi_schema
        if schema is None:
            schema = generate_openapi()  # cached by FastAPI: the additions below are made once
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            event = SegmentProgress.model_json_schema(ref_template="#/components/schemas/{model}",
                                                      mode="serialization")
            for name, model in event.pop("$defs", {}).items():
                schemas.setdefault(name, model)  # RecallEntry: already there, from GET .../memory
            schemas[SegmentProgress.__name__] = event
        return schema

    app.openapi = openapi_with_events  # type: ignore[method-assign]  # FastAPI's documented override

    @app.exception_handler(Exception)
    async def _any_error(request: Request, exc: Exception) -> JSONResponse:
        status, body = error_payload(exc)
        return error_response(status, body["error"]["type"], body["error"]["message"], request)

    handled: tuple[type[Exception], ...] = (APIError, *(c for c, _, _ in ERRORS))
    for cls in handled:
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
        return JSONResponse({"status": "ready", "fingerprint": service.fingerprint,
                             "precision": precision_of(service.model)})

    @app.get("/metrics", tags=["ops"])
    async def metrics_route() -> Response:
        model = service.model
        if model.device.type == "cuda":
            metrics.MODEL_MEMORY_BYTES.set(torch.cuda.memory_allocated(model.device))
        else:
            metrics.MODEL_MEMORY_BYTES.set(stored_bytes(model))  # packed int8/int4 weights are buffers
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        """The web playground (static; it asks for the API key itself when keys are on)."""
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    @app.get("/playground.json", include_in_schema=False)
    async def playground_config() -> dict[str, bool]:
        """What the playground must know before it has a key: whether it needs one."""
        return {"keys": bool(settings.keys)}

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(sessions_api.create_router(service))
    app.include_router(openai_api.create_router(service))
    app.include_router(responses_api.create_router(service))
    return app
