"""The OpenAI-compatible routes: ``model`` is a task name, ``@stack`` or ``@base``."""
from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Depends, Request

from ..bank import BASE, STACK
from ..sampling import SamplingParams
from ..schemas import Completion, CompletionRequest, ModelList, stop_list
from . import streaming
from .deps import Ready, require_read

router = APIRouter(tags=["openai"], dependencies=[Depends(require_read)])
PARAM_NAMES = {"task": "model", "max_new_tokens": "max_tokens", "prompt": "prompt"}


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"  # OpenAI has no "eos": end of sequence is a stop


@router.get("/v1/models", response_model=ModelList)
def models(state: Ready) -> dict:
    bank = state.engine.state
    created = int(state.started_at)
    names = [BASE, STACK] + [t.name for t in bank.tasks.values()]
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "jumplora"}
                                       for n in names]}


@router.post("/v1/completions", response_model=Completion,
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream"}})
async def completions(req: CompletionRequest, state: Ready, request: Request):
    params = SamplingParams(max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                            top_k=req.top_k, seed=req.seed, stop=stop_list(req.stop))
    handle = state.engine.submit(req.model, req.prompt_text, params, "completions", asyncio.get_running_loop(),
                                 PARAM_NAMES, stream=req.stream)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text: str, reason: str | None, usage: dict | None = None) -> dict:
        body = {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}]}
        if usage is not None:
            body["usage"] = usage
        return body

    def usage(f) -> dict:
        return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                "total_tokens": f.prompt_tokens + f.completion_tokens}

    if not req.stream:
        done = await streaming.final(state, handle, request)
        return chunk(done.text, _finish_reason(done.finish_reason), usage(done))

    def on_final(f):
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return [chunk(f.tail, _finish_reason(f.finish_reason), usage(f) if include_usage else None), "[DONE]"]

    streaming.reserve_stream(state, handle)
    return streaming.response(state, handle, request, lambda t: chunk(t.text, None), on_final)
