"""``GET /v1/export/{name}``: the merged checkpoint of a task (or ``@stack``, ``@base``) as a tar stream."""
from __future__ import annotations

import asyncio
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from ..bank import BASE, STACK
from ..errors import JumploraError, NotFound
from .deps import Ready, require_admin

router = APIRouter(tags=["export"], dependencies=[Depends(require_admin)])


@router.get("/v1/export/{name}", response_class=FileResponse,
            responses={200: {"content": {"application/x-tar": {}},
                             "description": "a transformers checkpoint folder (config, weights, tokenizer)"}})
async def export(name: str, state: Ready) -> FileResponse:
    """The base model with the named delta merged into its weights. Built in a separate process (a second copy
    of the model, for a few seconds), so that serving goes on undisturbed."""
    bank = state.engine.state
    if name not in (BASE, STACK) and name not in bank.tasks:
        raise NotFound(f"task {name!r} is not served", param="name")
    work = Path(tempfile.mkdtemp(prefix="jumplora-export-"))
    try:
        cmd = [sys.executable, "-m", "server.export", "--store", str(state.store.root), "--model",
               str(state.base.path)]
        if name == STACK:
            cmd += ["--tasks", ",".join(bank.tasks)]
        proc = await asyncio.create_subprocess_exec(*cmd, name, str(work / "model"),
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise JumploraError(f"export failed: {err.decode(errors='replace').strip()[-500:]}")
        archive = work / f"{name.lstrip('@')}.tar"
        await asyncio.to_thread(_tar, work / "model", archive)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return FileResponse(archive, media_type="application/x-tar", filename=archive.name,
                        background=BackgroundTask(shutil.rmtree, work, ignore_errors=True))


def _tar(folder: Path, archive: Path) -> None:
    with tarfile.open(archive, "w") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
