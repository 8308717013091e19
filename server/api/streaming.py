"""Turning an engine request's events into a JSON answer or a server-sent event stream, with metrics, and
with the request's batch row freed as soon as its client goes away."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine import Failed, Finished, RequestHandle, Token
from ..errors import JumploraError, Overloaded, RequestTimeout

POLL_SECONDS = 0.25
log = logging.getLogger(__name__)


class ClientGone(Exception):
    pass


async def events(handle: RequestHandle, request: Request, timeout: float) -> AsyncIterator[Token | Finished]:
    """The request's events until it finishes; raises the engine's error, ClientGone when the client
    disconnects, RequestTimeout after ``timeout`` seconds (the request is cancelled in both cases)."""
    deadline = handle.created + timeout
    while True:
        try:
            wait = max(0.0, min(POLL_SECONDS, deadline - time.monotonic()))
            event = await asyncio.wait_for(handle.queue.get(), timeout=wait)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                handle.cancel()
                raise ClientGone()
            if time.monotonic() > deadline:
                handle.cancel()
                raise RequestTimeout(f"the request took longer than {timeout:g} s and was stopped")
            continue
        if isinstance(event, Failed):
            raise event.error
        yield event
        if isinstance(event, Finished):
            return


def record(state, handle: RequestHandle, status: int) -> None:
    m = state.metrics
    m.requests.labels(handle.task, handle.endpoint, str(status)).inc()
    m.request_latency.labels(handle.task, handle.endpoint).observe(time.monotonic() - handle.created)


def reserve_stream(state, handle: RequestHandle) -> None:
    """Count a streaming response against ``max_streams`` (429 beyond it); ``stream`` gives it back."""
    if state.streams >= state.settings.max_streams:
        handle.cancel()
        raise Overloaded(f"too many concurrent streams ({state.settings.max_streams})", retry_after=1.0)
    state.streams += 1


async def final(state, handle: RequestHandle, request: Request) -> Finished:
    try:
        async for event in events(handle, request, state.settings.request_timeout_s):
            if isinstance(event, Finished):
                record(state, handle, 200)
                return event
    except JumploraError as e:
        record(state, handle, e.status)
        raise
    raise RuntimeError("engine stream ended without a final event")


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def stream(state, handle: RequestHandle, request: Request,
                 on_token: Callable[[Token], dict], on_final: Callable[[Finished], list[dict | str]]):
    """Server-sent events: one per token, then the final ones. An error after the stream started is sent as an
    event (the status line is already out)."""
    try:
        async for event in events(handle, request, state.settings.request_timeout_s):
            if isinstance(event, Token):
                yield sse(on_token(event))
            else:
                for payload in on_final(event):
                    yield sse(payload)
                record(state, handle, 200)
    except ClientGone:
        return
    except JumploraError as e:
        record(state, handle, e.status)
        yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "status": e.status}})
    finally:  # also on disconnect (the generator is closed or cancelled); a no-op once the request finished
        handle.cancel()
        state.streams -= 1


class SlowClient(Exception):
    pass


class DeadlineStreamingResponse(StreamingResponse):
    """A streaming response whose every write must be taken by the client within ``write_timeout`` seconds.
    A client that stops reading (while staying connected) would otherwise hold its stream slot, and its
    events would pile up, for as long as the connection lives: past the deadline the stream is closed (its
    ``finally`` frees the slot and the batch row) and the connection dropped."""

    def __init__(self, content, write_timeout: float, **kw):
        super().__init__(content, **kw)
        self.write_timeout = write_timeout

    async def stream_response(self, send) -> None:
        async def send_by_deadline(message) -> None:
            try:
                await asyncio.wait_for(send(message), self.write_timeout)
            except asyncio.TimeoutError:
                raise SlowClient() from None
        try:
            await super().stream_response(send_by_deadline)
        except SlowClient:
            log.warning("a streaming client took no data for %g s: disconnected", self.write_timeout)
            await self.body_iterator.aclose()
            # returning without finishing the response makes the server close the connection


def response(state, handle: RequestHandle, request: Request, on_token: Callable[[Token], dict],
             on_final: Callable[[Finished], list[dict | str]]) -> DeadlineStreamingResponse:
    """The server-sent event response of a request whose stream slot is reserved (``reserve_stream``)."""
    return DeadlineStreamingResponse(stream(state, handle, request, on_token, on_final),
                                     write_timeout=state.settings.stream_write_timeout_s,
                                     media_type="text/event-stream")
