from __future__ import annotations

from fastapi import APIRouter

from ..errors import NotFound
from ..schemas import TaskDetail, TaskList, TaskSummary
from .deps import Ready

router = APIRouter(tags=["tasks"])


def _summary(info, cls=TaskSummary):
    m = info.manifest
    extra = {}
    if cls is TaskDetail:
        extra = {"parents": m.get("parents", []), "config": m.get("config", {}),
                 "base_fingerprint": m.get("base_fingerprint"), "tensors_sha256": m.get("tensors_sha256")}
    return cls(name=info.name, created_at=m.get("created_at"), method=m.get("method"),
               regularizer=m.get("regularizer"), order=info.order, nonzero_params=info.nonzero,
               density=info.density, overlap_ratio=info.overlap, targets=m.get("targets", []),
               rank=m.get("rank"), alpha=m.get("alpha"), metrics=m.get("metrics", {}), **extra)


@router.get("/v1/tasks", response_model=TaskList)
def list_tasks(state: Ready) -> TaskList:
    return TaskList(tasks=[_summary(info) for info in state.engine.state.tasks.values()])


@router.get("/v1/tasks/{name}", response_model=TaskDetail)
def get_task(name: str, state: Ready) -> TaskDetail:
    info = state.engine.state.tasks.get(name)
    if info is None:
        raise NotFound(f"task {name!r} is not served", param="name")
    return _summary(info, TaskDetail)
