"""The request body limit, enforced before any route reads the body (ASGI middleware)."""
from __future__ import annotations

import json

from .errors import PayloadTooLarge, error_body

DATASET_ROUTE = ("POST", "/v1/tasks")
MULTIPART_SLACK = 1 << 20  # form fields and boundaries around an uploaded dataset


class BodyLimit:
    """413 for a body over the limit: ``max_dataset_bytes`` (plus slack for a multipart form) on the dataset
    route, ``max_body_bytes`` elsewhere. A declared Content-Length is refused before reading; a chunked body is
    counted as it arrives."""

    def __init__(self, app, settings):
        self.app, self.settings = app, settings

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
            body = json.dumps(error_body(f"request body of {int(declared)} bytes, over the limit of {limit}",
                                         "payload_too_large_error")).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"request body over the limit of {limit} bytes")
            return message
        await self.app(scope, counted, send)
