"""Publish a folder of files atomically, and sweep temp folders left by crashed writers.

A writer fills `<root>/.tmp-<task>-<host>-<pid>-<hex>`, fsyncs the files and the folder, then
renames the folder to `<root>/<task>` and fsyncs root: readers see the whole adapter or nothing.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Mapping
from pathlib import Path

from .errors import AdapterExists, StoreWriteError

TEMP_PREFIX = ".tmp-"
STALE_AFTER_S = 24 * 3600

log = logging.getLogger(__name__)


def _hostname() -> str:
    """This host's name without "-", so that temp folder names parse unambiguously from the right."""
    return re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname())[:64] or "host"


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # works for folders too (POSIX)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o444)  # stored adapters are never modified


def publish(root: Path, task: str, files: Mapping[str, bytes]) -> None:
    """Create `root/task` holding `files` (name -> bytes) in one rename, or leave no trace.

    Raises AdapterExists if `root/task` appeared meanwhile, StoreWriteError on an OSError.
    """
    tmp = root / f"{TEMP_PREFIX}{task}-{_hostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    target = root / task
    try:
        os.mkdir(tmp)
        for name, data in files.items():
            _write_file(tmp / name, data)
        fsync(tmp)
        try:
            os.rename(tmp, target)  # fails on a non-empty target folder
        except OSError:
            if os.path.lexists(target):
                raise AdapterExists(task, "already stored (written by another writer meanwhile)") from None
            raise
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise StoreWriteError(task, f"write failed: {exc}") from exc
        raise
    try:
        fsync(root)
    except OSError as e:  # the adapter is complete and visible; only its durability is in doubt
        log.warning("adapter %r stored but fsync of %s failed: %s", task, root, e)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def cleanup_temp(root: Path) -> int:
    """Remove temp folders whose writer is gone (same host, dead pid) or that are over 24 h old."""
    host, removed = _hostname(), 0
    for entry in os.scandir(root):
        if not entry.name.startswith(TEMP_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        # ".tmp-<task>-<host>-<pid>-<hex>": only the task may hold "-", so parse from the right.
        parts = entry.name.rsplit("-", 3)
        ours = len(parts) == 4 and parts[1] == host and parts[2].isdigit()
        dead = ours and not _pid_alive(int(parts[2]))
        try:
            stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
        except FileNotFoundError:  # removed by another sweeper meanwhile
            continue
        if dead or stale:
            shutil.rmtree(entry.path, ignore_errors=True)
            if not os.path.lexists(entry.path):
                removed += 1
    return removed
