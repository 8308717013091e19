"""HTTP routes (thin: validate, hand over, shape the answer)."""
from __future__ import annotations

from typing import Annotated

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from .errors import NotFound, NotReady
from .schemas import GenerateRequest, GenerateResponse

router = APIRouter()


def server_state(request: Request):
    return request.app.state.server


State = Annotated[object, Depends(server_state)]


def ready_state(state: State):
    if not state.ready.is_set():
        raise NotReady(state.load_error and f"model failed to load: {state.load_error}" or "model is loading")
    return state


Ready = Annotated[object, Depends(ready_state)]


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(state: State):
    if state.ready.is_set():
        return {"status": "ready", "model": state.base.name}
    detail = f"model failed to load: {state.load_error}" if state.load_error else "model is loading"
    return JSONResponse({"status": "not ready", "detail": detail}, status_code=503)


@router.post("/v1/generate", response_model=GenerateResponse)
async def generate(req: GenerateRequest, state: Ready) -> GenerateResponse:
    if req.task != "@base":
        raise NotFound(f"task {req.task!r} is not served", param="task")
    text = await run_in_threadpool(_greedy, state, req.prompt, req.max_new_tokens)
    return GenerateResponse(task=req.task, text=text)


def _greedy(state, prompt: str, max_new_tokens: int) -> str:
    base = state.base
    ids = base.tokenizer(prompt, return_tensors="pt")["input_ids"].to(base.device)
    with state.generate_lock, torch.inference_mode():
        out = base.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=base.tokenizer.eos_token_id)
    return base.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
