"""Learning new tasks: ``POST /v1/tasks`` (JSON, or a multipart JSONL upload) queues a training job after
validating everything; ``/v1/jobs`` watches and cancels jobs."""
from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from ..datasets import check_lengths, check_rows, check_task_name, parse_jsonl
from ..errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge, StorageError
from ..model import target_linears
from ..schemas import JobInfo, JobList, LearnAccepted, TrainConfig, learn_openapi
from .deps import Ready, require_admin, require_read

router = APIRouter(tags=["learning"])


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes, over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _config(raw: object) -> TrainConfig:
    if raw is None:
        return TrainConfig()
    if not isinstance(raw, dict):
        raise InvalidRequest("config: must be an object", param="config")
    try:
        return TrainConfig(**raw)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise InvalidRequest(f"config.{field}: {first['msg']}", param=f"config.{field}") from None


async def _parse(request: Request, settings) -> tuple[str, list, TrainConfig]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=8, max_part_size=1 << 20)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise InvalidRequest("file: a JSONL file field is required", param="file")
        data = await upload.read(settings.max_dataset_bytes + 1)
        raw_rows = parse_jsonl(data, max_rows=settings.max_dataset_rows, max_bytes=settings.max_dataset_bytes)
        raw_config = form.get("config")
        try:
            config = json.loads(raw_config) if raw_config else None
        except ValueError:
            raise InvalidRequest("config: not valid JSON", param="config") from None
        name, rows_param = form.get("name"), "file"
    elif kind in ("application/json", ""):
        body = await _body(request, settings.max_dataset_bytes)
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise InvalidRequest(f"body: not valid JSON ({e})", param="body") from None
        if not isinstance(payload, dict):
            raise InvalidRequest("body: must be an object with name, data and config", param="body")
        extra = set(payload) - {"name", "data", "config"}
        if extra:
            raise InvalidRequest(f"{sorted(extra)[0]}: unknown field", param=sorted(extra)[0])
        name, raw_rows, config, rows_param = payload.get("name"), payload.get("data"), payload.get("config"), "data"
    else:
        raise InvalidRequest(f"content type {kind!r}: send application/json or multipart/form-data",
                             param="content-type")
    check_task_name(name)
    cfg = _config(config)
    rows = check_rows(raw_rows, max_rows=settings.max_dataset_rows, param=rows_param)
    return name, rows, cfg


@router.post("/v1/tasks", status_code=202, dependencies=[Depends(require_admin)], response_model=LearnAccepted, openapi_extra=learn_openapi())
async def learn(request: Request, state: Ready) -> LearnAccepted:
    """Queue a training job for a new task: JSON ``{name, data: [{prompt, completion}], config}``, or a multipart
    form with ``name``, ``file`` (JSONL rows) and ``config`` (a JSON string)."""
    name, rows, cfg = await _parse(request, state.settings)
    if state.jobs.task_taken(name):
        raise Conflict(f"task {name!r} already exists or is being trained", param="name")
    served = state.engine.state.tasks
    if cfg.parent not in ("@stack", "@base") and cfg.parent not in served:
        raise NotFound(f"config.parent: task {cfg.parent!r} is not served", param="config.parent")
    pending = state.jobs.pending_count()
    if len(served) + pending >= state.settings.max_tasks:
        raise StorageError(f"the server holds {len(served)} task(s) and {pending} queued or running job(s), "
                           f"max_tasks={state.settings.max_tasks}: delete a task or raise max_tasks",
                           param="name")
    try:
        target_linears(state.base.model, cfg.targets)
    except ValueError as e:
        raise InvalidRequest(f"config.targets: {e}", param="config.targets") from None
    await run_in_threadpool(check_lengths, rows, state.base.tokenizer, cfg.max_seq_len,
                            "file" if request.headers.get("content-type", "").startswith("multipart") else "data")
    job = state.jobs.submit(name, rows, cfg.model_dump())
    return LearnAccepted(job_id=job.id, task=name, status=job.status, status_url=f"/v1/jobs/{job.id}")


@router.get("/v1/jobs", response_model=JobList, dependencies=[Depends(require_read)])
def list_jobs(state: Ready) -> JobList:
    return JobList(jobs=[JobInfo(**j.to_dict()) for j in state.jobs.list()])


@router.get("/v1/jobs/{job_id}", response_model=JobInfo, dependencies=[Depends(require_read)])
def get_job(job_id: str, state: Ready) -> JobInfo:
    return JobInfo(**state.jobs.get(job_id).to_dict())


@router.delete("/v1/jobs/{job_id}", response_model=JobInfo, dependencies=[Depends(require_admin)])
def cancel_job(job_id: str, state: Ready) -> JobInfo:
    """Cancel a queued or running job; nothing is registered."""
    return JobInfo(**state.jobs.cancel(job_id).to_dict())
