"""Errors and their HTTP mapping: one JSON shape on /sessions, OpenAI's on /v1, never a traceback."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from hmt_core import CorruptStateError, InvalidInputError, ModelMismatchError
from service.openai_protocol import openai_error_body
from service.store import (
    SessionBusyError,
    SessionConflictError,
    SessionNotFoundError,
    StoreUnavailableError,
)

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


ERRORS: list[tuple[type[Exception], int, str]] = [
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
    for cls, status, kind in ERRORS:
        if isinstance(exc, cls):
            return status, {"error": {"message": str(exc), "type": kind}}
    log.error("internal error", exc_info=exc)
    return 500, {"error": {"message": "internal server error", "type": "internal_error"}}
