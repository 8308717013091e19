"""Learning new tasks: ``POST /v1/tasks`` (JSON, or a multipart JSONL upload) queues a training job after
validating everything; ``/v1/jobs`` watches and cancels jobs."""
from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from ..datasets import TaskPayload, check_lengths, check_task_name, parse_jsonl, parse_task_json
from ..errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge, StorageError
from ..model import target_linears
from ..schemas import JobInfo, JobList, LearnAccepted, TrainConfig, learn_openapi
from .deps import Ready, require_admin, require_read

router = APIRouter(tags=["learning"])
FORM_FIELDS = ("name", "file", "config")


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
        raise InvalidRequest(f"config: must be an object, not {type(raw).__name__}", param="config")
    try:
        return TrainConfig(**raw)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise InvalidRequest(f"config.{field}: {first['msg']}", param=f"config.{field}") from None


def _form_payload(name: object, upload: UploadFile, config: object, settings) -> TaskPayload:
    """The multipart form's fields, the JSONL file read line by line from its spooled file (off the loop)."""
    check_task_name(name)
    if config is not None:
        if not isinstance(config, str):
            raise InvalidRequest("config: must be a text field holding a JSON object", param="config")
        try:
            config = json.loads(config)
        except (ValueError, RecursionError):
            raise InvalidRequest("config: not valid JSON", param="config") from None
        if not isinstance(config, dict):
            raise InvalidRequest("config: must be a JSON object", param="config")
    upload.file.seek(0)
    rows = parse_jsonl(upload.file, max_rows=settings.max_dataset_rows, max_bytes=settings.max_dataset_bytes)
    return TaskPayload(name, rows, config)


def _json_payload(body: bytes, settings) -> TaskPayload:
    payload = parse_task_json(body, max_rows=settings.max_dataset_rows)
    check_task_name(payload.name)
    return payload


async def _parse(request: Request, settings) -> tuple[TaskPayload, str]:
    """The posted task and the name of its rows' field. Reading the body stays on the event loop; decoding,
    parsing and checking it run in a worker thread (a large dataset must not stall serving)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        async with request.form(max_files=len(FORM_FIELDS), max_fields=8, max_part_size=1 << 20) as form:
            for key in form:
                if key not in FORM_FIELDS:
                    raise InvalidRequest(f"{key}: unknown field", param=key)
                if len(form.getlist(key)) > 1:
                    raise InvalidRequest(f"{key}: given twice", param=key)
            upload, name = form.get("file"), form.get("name")
            if not isinstance(upload, UploadFile):
                raise InvalidRequest("file: a JSONL file field is required", param="file")
            if not isinstance(name, str):
                raise InvalidRequest("name: a text field is required", param="name")
            return await run_in_threadpool(_form_payload, name, upload, form.get("config"), settings), "file"
    if kind in ("application/json", ""):
        body = await _body(request, settings.max_dataset_bytes)
        return await run_in_threadpool(_json_payload, body, settings), "data"
    raise InvalidRequest(f"content type {kind!r}: send application/json or multipart/form-data",
                         param="content-type")


def _submit(state, task: TaskPayload, cfg: TrainConfig, rows_param: str):
    """Everything after parsing, in a worker thread: the checks against what is served and stored, the rows'
    lengths in tokens, and the job's files (written and fsynced)."""
    name = task.name
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
    check_lengths(task.rows, state.base.tokenizer, cfg.max_seq_len, rows_param)
    return state.jobs.submit(name, task.rows, cfg.model_dump())


@router.post("/v1/tasks", status_code=202, dependencies=[Depends(require_admin)], response_model=LearnAccepted,
             openapi_extra=learn_openapi())
async def learn(request: Request, state: Ready) -> LearnAccepted:
    """Queue a training job for a new task: JSON ``{name, data: [{prompt, completion}], config}``, or a multipart
    form with ``name``, ``file`` (JSONL rows) and ``config`` (a JSON string). A row may also carry a ``label``
    (a string, number, boolean or null; ignored); any other field, or type, is refused naming it."""
    task, rows_param = await _parse(request, state.settings)
    cfg = _config(task.config)
    job = await run_in_threadpool(_submit, state, task, cfg, rows_param)
    return LearnAccepted(job_id=job.id, task=task.name, status=job.status, status_url=f"/v1/jobs/{job.id}")


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
