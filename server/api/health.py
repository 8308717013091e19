from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..schemas import Health, Readiness
from .deps import State, require_metrics

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": Readiness, "description": "not ready yet"}},
            response_model=Readiness)
def readyz(state: State):
    """200 once the model serves; 503 before (or if it failed to load). ``jobs`` says whether the jobs thread
    works ("ok", or "failing: <why>" while it retries): a replica whose jobs fail still serves generation, so
    it stays ready; alert on ``jobs`` or on ``jumplora_jobs_loop_errors``."""
    if state.ready.is_set():
        return Readiness(status="ready", model=state.base.name, tasks=len(state.engine.state.tasks),
                         jobs=state.jobs.health())
    detail = f"model failed to load: {state.load_error}" if state.load_error else "the model is loading"
    return JSONResponse({"status": "not ready", "detail": detail}, status_code=503)


@router.get("/metrics", dependencies=[Depends(require_metrics)], response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"}})
def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
