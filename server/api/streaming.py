"""Turning an engine request's events into a JSON answer or a server-sent event stream, with metrics, and
with the request's batch row freed as soon as its client goes away."""
from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator, Callable

from fastapi import Request

from ..engine import Failed, Finished, RequestHandle, Token
from ..errors import JumploraError, Overloaded, RequestTimeout

POLL_SECONDS = 0.25


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
