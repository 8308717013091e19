"""What is checked before a body is parsed (ASGI middleware): its size, the number of dataset uploads in
progress, and the route's API key."""
from __future__ import annotations

import json

from .errors import JumploraError, Overloaded, PayloadTooLarge, error_body

DATASET_ROUTE = ("POST", "/v1/tasks")
MULTIPART_SLACK = 1 << 20  # form fields and boundaries around an uploaded dataset
UPLOAD_RETRY_AFTER_S = 5.0


async def send_error(send, exc: JumploraError) -> None:
    """Answer with ``exc`` as the error handlers would."""
    body = json.dumps(error_body(exc.message, exc.type, exc.param)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refusals made here, none of which lets a body be parsed:

    - a declared Content-Length over the limit, 413 before anything else: ``max_dataset_bytes`` (plus slack for
      a multipart form) on the dataset route, ``max_body_bytes`` elsewhere;
    - on the dataset route, more than ``max_concurrent_uploads`` requests at once (each may hold a dataset in
      memory while it is checked), 429 with Retry-After;
    - when the route first reads the body (the router has chosen it by then), the route's API key, 401/403
      (``api.deps.authorize``), so that no body of an unauthenticated caller is read, let alone parsed;
    - a chunked body, counted as it arrives, 413 once over the limit.

    When the route's read is refused, whatever the route answers (FastAPI's 400 "error parsing the body", say) is
    replaced by the refusal.
    """

    def __init__(self, app, settings):
        self.app, self.settings = app, settings
        self.uploads = 0  # dataset requests in progress (event loop thread only)

    def limit(self, scope) -> int:
        if (scope.get("method"), scope.get("path")) == DATASET_ROUTE:
            return self.settings.max_dataset_bytes + MULTIPART_SLACK
        return self.settings.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit(scope)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await send_error(send, PayloadTooLarge(
                f"request body of {int(declared)} bytes, over the limit of {limit}"))
        if (scope.get("method"), scope.get("path")) != DATASET_ROUTE:
            return await self._limited(scope, receive, send, limit)
        if self.uploads >= self.settings.max_concurrent_uploads:
            return await send_error(send, Overloaded(
                f"{self.uploads} dataset upload(s) in progress, max_concurrent_uploads="
                f"{self.settings.max_concurrent_uploads}: retry later", retry_after=UPLOAD_RETRY_AFTER_S))
        self.uploads += 1
        try:
            await self._limited(scope, receive, send, limit)
        finally:
            self.uploads -= 1

    async def _limited(self, scope, receive, send, limit: int) -> None:
        from .api.deps import authorize

        seen, authorized, refused, started, answered = 0, False, None, False, False

        async def checked():
            nonlocal seen, authorized, refused
            if not authorized:  # the route's first read: the router has chosen the route by now
                try:
                    authorize(scope, self.settings)
                except JumploraError as e:
                    refused = e
                    raise
                authorized = True
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused = PayloadTooLarge(f"request body over the limit of {limit} bytes")
                    raise refused
            return message

        async def guarded(message):
            nonlocal started, answered
            if refused is not None and not started:  # the app's answer to a refused body: ours instead
                if not answered:
                    answered = True
                    await send_error(send, refused)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, checked, guarded)
        except Exception:
            if refused is None or started:
                raise
            if not answered:
                await send_error(send, refused)
