from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from ..errors import Conflict, NotFound
from ..schemas import TaskDeleted, TaskDetail, TaskList, TaskSummary
from .deps import Ready, require_admin, require_read

router = APIRouter(tags=["tasks"])


def _summary(info, cls=TaskSummary, served=()):
    m = info.manifest
    missing = [p.get("task") for p in m.get("parents", []) if isinstance(p, dict) and p.get("task") not in served]
    extra = {}
    if cls is TaskDetail:
        extra = {"parents": m.get("parents", []), "config": m.get("config", {}), "route": list(info.route),
                 "memory_bytes": info.nbytes,
                 "base_fingerprint": m.get("base_fingerprint"), "tensors_sha256": m.get("tensors_sha256")}
    return cls(name=info.name, created_at=m.get("created_at"), method=m.get("method"),
               regularizer=m.get("regularizer"), order=info.order, nonzero_params=info.nonzero,
               density=info.density, overlap_ratio=info.overlap, targets=m.get("targets", []),
               rank=m.get("rank"), alpha=m.get("alpha"), metrics=m.get("metrics", {}),
               trained_on_deleted=missing, **extra)


@router.get("/v1/tasks", response_model=TaskList, dependencies=[Depends(require_read)])
def list_tasks(state: Ready) -> TaskList:
    tasks = state.engine.state.tasks
    return TaskList(tasks=[_summary(info, served=tasks) for info in tasks.values()])


@router.get("/v1/tasks/{name}", response_model=TaskDetail, dependencies=[Depends(require_read)])
def get_task(name: str, state: Ready) -> TaskDetail:
    tasks = state.engine.state.tasks
    info = tasks.get(name)
    if info is None:
        raise NotFound(f"task {name!r} is not served", param="name")
    return _summary(info, TaskDetail, served=tasks)


@router.delete("/v1/tasks/{name}", response_model=TaskDeleted, dependencies=[Depends(require_admin)])
async def delete_task(name: str, state: Ready) -> TaskDeleted:
    """Stop serving a task and move its folder to the store's trash (recoverable by hand); ``@stack`` is
    recomputed. Requests already running on it finish. Refused (409) while another served task's route holds
    it or a running job trains on top of it: deleting it would change what those answer."""
    tasks = state.engine.state.tasks
    if name not in tasks:
        raise NotFound(f"task {name!r} is not served", param="name")
    children = [t.name for t in tasks.values() if name in t.route[:-1]]
    if children:
        raise Conflict(f"task {name!r} is part of the route of {len(children)} served task(s) "
                       f"({', '.join(children[:5])}); delete those first", param="name")
    for job in state.jobs.running():
        parent = job.config.get("parent", "@stack")
        if parent == "@stack" or parent == name or (parent in tasks and name in tasks[parent].route):
            raise Conflict(f"job {job.id} is training task {job.task!r} on top of {name!r}; wait for it or "
                           "cancel it", param="name")
    trashed = await run_in_threadpool(state.delete_task, name)
    return TaskDeleted(name=name, trash=str(trashed))
