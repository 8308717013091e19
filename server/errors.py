"""Typed errors and the one place that maps them to HTTP responses ``{"error": {message, type, param}}``."""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class JumploraError(Exception):
    """Base class: every error the server raises on purpose. ``status`` is its HTTP code."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class ModelLoadError(JumploraError):
    status, type = 500, "model_load_error"


class NotReady(JumploraError):
    status, type = 503, "not_ready_error"


class InvalidRequest(JumploraError):
    status, type = 422, "invalid_request_error"


class BadRequest(JumploraError):
    status, type = 400, "invalid_request_error"


class Unauthorized(JumploraError):
    status, type = 401, "authentication_error"

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(JumploraError):
    status, type = 403, "permission_error"


class NotFound(JumploraError):
    status, type = 404, "not_found_error"


class Conflict(JumploraError):
    status, type = 409, "conflict_error"


class PayloadTooLarge(JumploraError):
    status, type = 413, "payload_too_large_error"


class StorageError(JumploraError):
    status, type = 507, "storage_error"


class Overloaded(JumploraError):
    status, type = 429, "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float = 1.0):
        super().__init__(message, headers={"Retry-After": str(max(1, round(retry_after)))})


class RequestTimeout(JumploraError):
    status, type = 504, "timeout_error"


class EngineError(JumploraError):
    """A request that failed inside the engine (the other requests of its batch go on)."""
    status, type = 500, "engine_error"


def error_body(message: str, type_: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param}}


def from_store_error(exc) -> JumploraError:
    """The HTTP error of an ``adapters_store.StoreError``: a bad name 422, a missing adapter 404, an existing one
    409; a store that cannot be written, or holds an adapter that does not verify (corrupt, foreign, malformed,
    an unknown format), 507."""
    from adapters_store import AdapterExists, AdapterNotFound, InvalidTaskName

    for store_type, error, param in ((InvalidTaskName, InvalidRequest, "name"), (AdapterNotFound, NotFound, "name"),
                                     (AdapterExists, Conflict, "name")):
        if isinstance(exc, store_type):
            return error(str(exc), param=param)
    return StorageError(str(exc))


_LOCATIONS = {"body", "query", "path", "header", "cookie"}


def _is_type_tag(part) -> bool:
    """Parts of a pydantic error location that name a request location or a union member, not a field."""
    if isinstance(part, int):
        return False
    return part in _LOCATIONS or any(c in part for c in "[(") or part in {
        "str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}


def install_error_handlers(app) -> None:
    """Map every error to JSON in one place: our typed errors, request validation (422 naming the field),
    framework HTTP errors (404 for unknown routes, 405, ...) and anything unexpected (500, logged once)."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from adapters_store import StoreError

    @app.exception_handler(JumploraError)
    async def _typed(_: Request, exc: JumploraError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StoreError)
    async def _store(request: Request, exc: StoreError):  # e.g. deleting a task on a read-only store: 507
        return await _typed(request, from_store_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if not _is_type_tag(p)]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            message, kind = f"no route {request.method} {request.url.path}", "not_found_error"
        elif exc.status_code == 405:
            message, kind = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed_error"
        else:
            message, kind = str(exc.detail), "http_error"
        return JSONResponse(error_body(message, kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "internal_error"), status_code=500)
