from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request

from ..sampling import SamplingParams
from ..schemas import GenerateRequest, GenerateResponse, Usage, stop_list
from . import streaming
from .deps import Ready, require_read

router = APIRouter(tags=["generate"], dependencies=[Depends(require_read)])


@router.post("/v1/generate", response_model=GenerateResponse,
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream"}})
async def generate(req: GenerateRequest, state: Ready, request: Request):
    params = SamplingParams(max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_p=req.top_p,
                            top_k=req.top_k, seed=req.seed, stop=stop_list(req.stop),
                            ignore_eos=req.ignore_eos)
    handle = state.engine.submit(req.task, req.prompt, params, "generate", asyncio.get_running_loop(),
                                 stream=req.stream)
    if not req.stream:
        done = await streaming.final(state, handle, request)
        return GenerateResponse(task=req.task, text=done.text, finish_reason=done.finish_reason,
                                usage=Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens))

    def on_token(t):
        return {"type": "token", "text": t.text, "token_id": t.token_id}

    def on_final(f):
        return [{"type": "done", "task": req.task, "delta": f.tail, "text": f.text, "finish_reason": f.finish_reason,
                 "usage": {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens}}]

    streaming.reserve_stream(state, handle)
    return streaming.response(state, handle, request, on_token, on_final)
