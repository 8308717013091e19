"""Typed errors of the client. A server error ``{"error": {message, type, param}}`` becomes the subclass of
``JumploraError`` that matches its HTTP code, carrying ``message``, ``type``, ``param`` and ``status``."""
from __future__ import annotations

import json


class JumploraError(Exception):
    """Base class of every error the client raises on purpose."""

    status: int | None = None

    def __init__(self, message: str, *, type: str | None = None, param: str | None = None,
                 status: int | None = None):
        super().__init__(message)
        self.message = message
        self.type = type
        self.param = param
        if status is not None:
            self.status = status


class APIError(JumploraError):
    """An error answer from the server (an HTTP code of 400 or more)."""


class BadRequestError(APIError):
    status = 400


class AuthenticationError(APIError):
    status = 401


class PermissionDeniedError(APIError):
    status = 403


class NotFoundError(APIError):
    status = 404


class ConflictError(APIError):
    status = 409


class PayloadTooLargeError(APIError):
    status = 413


class InvalidRequestError(APIError):
    status = 422


class RateLimitError(APIError):
    """429: the server's queue is full; ``retry_after`` is its Retry-After header in seconds (or None)."""

    status = 429

    def __init__(self, message: str, *, retry_after: float | None = None, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServerError(APIError):
    status = 500


class NotReadyError(ServerError):
    """503: the model is still loading (or failed to load)."""

    status = 503


class RequestTimeoutError(ServerError, TimeoutError):
    """504: the server gave up on the request."""

    status = 504


class JumploraConnectionError(JumploraError, ConnectionError):
    """The server could not be reached, or the connection broke mid-answer."""


class JumploraTimeoutError(JumploraError, TimeoutError):
    """No answer within the client's timeout (or a job did not finish within ``Job.wait``'s timeout)."""


class JobFailed(JumploraError):
    """``Job.wait`` found the job failed; ``job`` is its final record and ``message`` its error."""

    def __init__(self, job):
        super().__init__(f"job {job.id} ({job.task}) failed: {job.error or 'no error given'}", type="job_failed")
        self.job = job


class UnsafeArchiveError(JumploraError):
    """An exported archive holds a member that would land outside the output folder (or is not a plain file)."""


_BY_STATUS = {c.status: c for c in (BadRequestError, AuthenticationError, PermissionDeniedError, NotFoundError,
                                     ConflictError, PayloadTooLargeError, InvalidRequestError, RateLimitError,
                                     NotReadyError, RequestTimeoutError)}


def error_class(status: int) -> type[APIError]:
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return ServerError if status >= 500 else APIError


def from_payload(payload: dict, status: int, retry_after: float | None = None) -> APIError:
    """The typed error of an ``{"error": {...}}`` payload (from a response body or an SSE event)."""
    err = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(err, dict):
        err = {"message": str(err if err is not None else payload)}
    cls = error_class(status)
    kw = {"type": err.get("type"), "param": err.get("param"), "status": status}
    if cls is RateLimitError:
        kw["retry_after"] = retry_after
    return cls(str(err.get("message") or f"HTTP {status}"), **kw)


def from_response(status: int, body: bytes, headers, where: str | None = None) -> APIError:
    """The typed error of an HTTP answer with ``status`` >= 400, whatever its body. ``where`` (``"GET /path"``)
    is added to messages that do not come from the server's own typed errors (an unknown route's "Not Found")."""
    retry_after = None
    raw_retry = headers.get("retry-after")
    if raw_retry:
        try:
            retry_after = float(raw_retry)
        except ValueError:
            pass
    try:
        payload = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()[:300]
        payload = {"error": {"message": f"HTTP {status}" + (f": {text}" if text else "")}}
    if isinstance(payload, dict) and "error" not in payload and "detail" in payload:  # e.g. /readyz
        payload = {"error": {"message": str(payload["detail"])}}
    error = from_payload(payload, status, retry_after)
    if where and error.type in (None, "http_error"):
        error.message = f"{error.message} ({where})"
        error.args = (error.message,)
    return error
