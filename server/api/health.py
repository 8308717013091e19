from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from .deps import State

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(state: State):
    if state.ready.is_set():
        return {"status": "ready", "model": state.base.name, "tasks": len(state.engine.state.tasks)}
    detail = f"model failed to load: {state.load_error}" if state.load_error else "the model is loading"
    return JSONResponse({"status": "not ready", "detail": detail}, status_code=503)


@router.get("/metrics")
def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
