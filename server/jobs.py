"""Training jobs: records on disk (``<store>/.jobs``), one job at a time in FIFO order, each in a worker process
of its own (``python -m server.worker``), progress read from the worker's output, and the new adapter
registered with the engine when the worker has stored it."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from .errors import Conflict, NotFound, StorageError
from .threads import run_isolated

log = logging.getLogger(__name__)

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = {"succeeded", "failed", "cancelled"}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Job:
    id: str
    task: str
    status: str
    created_at: str
    config: dict
    n_rows: int
    started_at: str | None = None
    finished_at: str | None = None
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    density: float | None = None
    threshold: float | None = None
    eta_s: float | None = None
    tokens_per_s: float | None = None
    error: str | None = None
    metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class JobFiles:
    """``<root>/<id>.json`` (the record, replaced atomically), ``<root>/<id>.jsonl`` (the dataset),
    ``<root>/<id>.cancel`` (a cancel request, from any replica) and ``<root>/trainer.lock``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def save(self, job: Job) -> None:
        self._atomic_write(self.root / f"{job.id}.json", json.dumps(job.to_dict(), indent=1).encode())

    def save_data(self, job_id: str, rows: list) -> Path:
        path = self.data_path(job_id)
        lines = "".join(json.dumps({"prompt": r.prompt, "completion": r.completion}) + "\n" for r in rows)
        self._atomic_write(path, lines.encode())
        return path

    def data_path(self, job_id: str) -> Path:
        return self.root / f"{job_id}.jsonl"

    def cancel_path(self, job_id: str) -> Path:
        return self.root / f"{job_id}.cancel"

    def load(self, job_id: str) -> Job | None:
        try:
            return Job.from_dict(json.loads((self.root / f"{job_id}.json").read_text()))
        except FileNotFoundError:
            return None

    def load_all(self) -> list[Job]:
        jobs = []
        for path in sorted(self.root.glob("job-*.json")):
            try:
                jobs.append(Job.from_dict(json.loads(path.read_text())))
            except (OSError, ValueError, TypeError) as e:
                log.error("skipping unreadable job record %s: %s", path, e)
        return jobs


class JobManager:
    """The job queue of a store. Records on disk are the truth, so that several server processes can share a
    store: any of them accepts jobs and cancels; exactly one, the holder of ``trainer.lock`` (an flock, freed
    by the kernel when its holder dies), runs them, one at a time in FIFO order, each in a worker process.
    ``register`` is called after a worker stored its adapter; it must make the engine serve it."""

    def __init__(self, files: JobFiles, worker_args: list[str], store_exists: Callable[[str], bool],
                 store_manifest: Callable[[str], dict], register: Callable[[], None], metrics,
                 worker_env: dict[str, str] | None = None, poll_seconds: float = 1.0,
                 on_training: Callable[[bool], None] | None = None):
        self.files = files
        self.worker_args = worker_args  # the command line of a worker, without --job/--data
        self.store_exists, self.store_manifest = store_exists, store_manifest
        self.register = register
        self.metrics = metrics
        self.worker_env = worker_env or {}
        self.poll_seconds = poll_seconds
        self.on_training = on_training or (lambda running: None)  # told when a worker starts and ends
        self._lock = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._proc: subprocess.Popen | None = None
        self._running: str | None = None
        self._lock_fd: int | None = None
        self._dirty: set[str] = set()  # jobs whose last record write failed
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="jobs", daemon=True)

    @property
    def is_trainer(self) -> bool:
        return self._lock_fd is not None

    # -- records -----------------------------------------------------------------------------------------------

    def _reload(self) -> None:
        """Refresh the cache from disk (the running job's record is this process's own and newer in memory)."""
        with self._lock:
            for job in self.files.load_all():
                if job.id != self._running and job.id not in self._dirty:
                    self._jobs[job.id] = job
            self._publish()

    def _become_trainer(self) -> bool:
        """Take ``trainer.lock`` if nobody holds it; then fail the jobs an earlier trainer left running."""
        if self._lock_fd is not None:
            return True
        import fcntl

        fd = os.open(self.files.root / "trainer.lock", os.O_RDONLY | os.O_CREAT, 0o644)  # no write handle: the store may be remounted read-only
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        log.info("this process trains the jobs of %s", self.files.root)
        self._recover()
        return True

    def _recover(self) -> None:
        """A job recorded as running while no trainer holds the lock was interrupted: mark it failed
        (``interrupted``), unless its adapter made it into the store."""
        for job in self.files.load_all():
            if job.status == "running":
                if self._stored_by(job):
                    job.status, job.error = "succeeded", None
                    threading.Thread(target=run_isolated, args=(self.register,), daemon=True).start()
                else:
                    job.status, job.error = "failed", "interrupted"
                job.finished_at = job.finished_at or _now()
                self._save(job)
        self._reload()

    def _stored_by(self, job: Job) -> bool:
        try:
            return self.store_exists(job.task) and self.store_manifest(job.task).get("job_id") == job.id
        except Exception:
            return False

    def _save(self, job: Job) -> None:
        """Write the record; if the store cannot be written (full, read-only), keep the state in memory, where
        the API still reports it, and say so in the log."""
        try:
            self.files.save(job)
            self._dirty.discard(job.id)
        except OSError as e:
            log.error("cannot write the record of job %s: %s", job.id, e)
            self._dirty.add(job.id)  # the memory copy is newer than the disk's: keep it
        self._publish()

    def _publish(self) -> None:
        counts = {s: 0 for s in STATES}
        for job in self._jobs.values():
            counts[job.status] += 1
        for state, n in counts.items():
            self.metrics.jobs.labels(state).set(n)

    # -- API -----------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._become_trainer()
        self._reload()
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()

    def task_taken(self, task: str) -> bool:
        self._reload()
        return self.store_exists(task) or any(
            j.task == task and j.status in ("queued", "running") for j in self._jobs.values())

    def submit(self, task: str, rows: list, config: dict) -> Job:
        with self._lock:
            if self.task_taken(task):
                raise Conflict(f"task {task!r} already exists or is being trained", param="name")
            job = Job(id=f"job-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}",
                      task=task, status="queued", created_at=_now(), config=config, n_rows=len(rows))
            try:
                self.files.save_data(job.id, rows)
                self.files.save(job)
            except OSError as e:
                raise StorageError(f"the job cannot be recorded in the store: {e.strerror or e}") from None
            self._jobs[job.id] = job
            self._publish()
            self._lock.notify_all()
        return job

    def list(self) -> list[Job]:
        self._reload()
        return sorted(self._jobs.values(), key=lambda j: (j.created_at, j.id))

    def get(self, job_id: str) -> Job:
        self._reload()
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} not found", param="job_id")
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once; ask the trainer (this process or another) to stop a running one."""
        with self._lock:
            job = self.get(job_id)
            if job.status in FINAL:
                raise Conflict(f"job {job_id!r} is already {job.status}", param="job_id")
            self.files.cancel_path(job_id).touch()
            if job.status == "queued":
                job.status, job.finished_at = "cancelled", _now()
                self._save(job)
                return job
            proc = self._proc if self._running == job_id else None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return job

    # -- the worker loop (trainer only) --------------------------------------------------------------------------

    def _next(self) -> Job | None:
        queued = [j for j in self._jobs.values() if j.status == "queued"]
        return min(queued, key=lambda j: (j.created_at, j.id)) if queued else None

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                job = self._next() if self.is_trainer else None
                if job is None:
                    self._lock.wait(timeout=self.poll_seconds)
            if job is None:
                if self._become_trainer():
                    self._reload()
                continue
            current = self.files.load(job.id)  # another replica may have cancelled it meanwhile
            if current is None or current.status != "queued" or self.files.cancel_path(job.id).exists():
                if current is not None and current.status == "queued":
                    current.status, current.finished_at = "cancelled", _now()
                    self._save(current)
                self._reload()
                continue
            with self._lock:
                job.status, job.started_at = "running", _now()
                self._running = job.id
                self._save(job)
            self.on_training(True)
            try:
                self._run(job)
            except Exception as e:  # the manager survives whatever happens to one job
                log.exception("job %s failed", job.id)
                self._finish(job, "failed", f"internal error: {e}")
            finally:
                self._running = None
                self.on_training(False)

    def _watch_cancel(self, job: Job, proc: subprocess.Popen, done: threading.Event) -> None:
        """Stop the worker when a cancel request for its job appears (from any replica)."""
        while not done.wait(0.5):
            if self.files.cancel_path(job.id).exists() and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                return

    def _run(self, job: Job) -> None:
        cmd = [*self.worker_args, "--job", str(self.files.root / f"{job.id}.json"),
               "--data", str(self.files.data_path(job.id))]
        env = {**os.environ, **self.worker_env}
        with self._lock:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
            proc = self._proc
        stderr_tail: list[str] = []
        drain = threading.Thread(target=lambda: stderr_tail.extend(proc.stderr), daemon=True)
        drain.start()
        done = threading.Event()
        threading.Thread(target=self._watch_cancel, args=(job, proc, done), daemon=True).start()
        started = time.monotonic()
        result: dict | None = None
        error: str | None = None
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = event.get("event")
            if kind == "progress":
                self._progress(job, event, started)
            elif kind == "done":
                result = event
            elif kind == "error":
                error = event.get("message")
        proc.wait()
        done.set()
        drain.join(timeout=5)
        with self._lock:
            self._proc = None
        cancelled = self.files.cancel_path(job.id).exists()
        if self._stored_by(job):  # the adapter is in the store: the job succeeded (even if a cancel came late)
            self._register(job, result or {})
            return
        if cancelled:
            self._finish(job, "cancelled", None)
        else:
            detail = error or ("".join(stderr_tail[-20:]).strip()[-2000:] or f"worker exited with {proc.returncode}")
            self._finish(job, "failed", detail)
    def _progress(self, job: Job, e: dict, started: float) -> None:
        job.step, job.total_steps = e["step"], e["total_steps"]
        job.loss, job.density, job.threshold = e["loss"], e["density"], e.get("threshold")
        elapsed = time.monotonic() - started
        job.tokens_per_s = e.get("tokens", 0) / max(e.get("seconds", elapsed), 1e-9)
        rate = e.get("seconds", elapsed) / max(job.step, 1)
        job.eta_s = rate * (job.total_steps - job.step)
        m = self.metrics
        m.train_step.set(job.step)
        m.train_loss.set(job.loss)
        m.train_density.set(job.density)
        m.train_tokens_per_s.set(job.tokens_per_s)
        if job.step % 5 == 0 or job.step == job.total_steps:
            self._save(job)

    def _register(self, job: Job, result: dict) -> None:
        """Make the engine serve the new adapter (the registry build runs torch ops: ``run_isolated``)."""
        try:
            run_isolated(self.register, "register")
        except Exception as e:
            log.error("registering %s failed: %s", job.task, e)
            self._finish(job, "failed", f"the adapter was stored but could not be served: {e}")
            return
        job.metrics = result.get("metrics", {})
        job.step = job.total_steps or job.step
        job.eta_s = 0.0
        self._finish(job, "succeeded", None)

    def _finish(self, job: Job, status: str, error: str | None) -> None:
        with self._lock:
            job.status, job.error, job.finished_at = status, error, _now()
            self._save(job)
        log.info("job %s (%s): %s%s", job.id, job.task, status, f": {error}" if error else "")
