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

from .errors import Conflict, NotFound

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
    """``<root>/<id>.json`` (the record, replaced atomically) and ``<root>/<id>.jsonl`` (the dataset)."""

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

    def load_all(self) -> list[Job]:
        jobs = []
        for path in sorted(self.root.glob("job-*.json")):
            try:
                jobs.append(Job.from_dict(json.loads(path.read_text())))
            except (OSError, ValueError, TypeError) as e:
                log.error("skipping unreadable job record %s: %s", path, e)
        return jobs


class JobManager:
    """Owns the job queue and the worker process. ``register`` is called (in a short-lived thread, see
    ``_register``) after a worker stored its adapter; it must make the engine serve it."""

    def __init__(self, files: JobFiles, worker_args: list[str], store_exists: Callable[[str], bool],
                 store_manifest: Callable[[str], dict], register: Callable[[], None], metrics,
                 worker_env: dict[str, str] | None = None):
        self.files = files
        self.worker_args = worker_args  # the command line of a worker, without --job/--data
        self.store_exists, self.store_manifest = store_exists, store_manifest
        self.register = register
        self.metrics = metrics
        self.worker_env = worker_env or {}
        self._lock = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._proc: subprocess.Popen | None = None
        self._running: str | None = None
        self._cancel_requested: set[str] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="jobs", daemon=True)

    # -- records -----------------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Load records after a (re)start: a job that was running when the server stopped is marked failed
        (``interrupted``), unless its adapter made it into the store."""
        for job in self.files.load_all():
            if job.status == "running":
                if self._stored_by(job):
                    job.status, job.error = "succeeded", None
                else:
                    job.status, job.error = "failed", "interrupted"
                job.finished_at = job.finished_at or _now()
                self.files.save(job)
            self._jobs[job.id] = job
        self._publish()

    def _stored_by(self, job: Job) -> bool:
        try:
            return self.store_exists(job.task) and self.store_manifest(job.task).get("job_id") == job.id
        except Exception:
            return False

    def _save(self, job: Job) -> None:
        self.files.save(job)
        self._publish()

    def _publish(self) -> None:
        counts = {s: 0 for s in STATES}
        for job in self._jobs.values():
            counts[job.status] += 1
        for state, n in counts.items():
            self.metrics.jobs.labels(state).set(n)

    # -- API -----------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()

    def task_taken(self, task: str) -> bool:
        return self.store_exists(task) or any(
            j.task == task and j.status in ("queued", "running") for j in self._jobs.values())

    def submit(self, task: str, rows: list, config: dict) -> Job:
        with self._lock:
            if self.task_taken(task):
                raise Conflict(f"task {task!r} already exists or is being trained", param="name")
            job = Job(id=f"job-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}",
                      task=task, status="queued", created_at=_now(), config=config, n_rows=len(rows))
            self.files.save_data(job.id, rows)
            self._jobs[job.id] = job
            self._save(job)
            self._lock.notify_all()
        return job

    def list(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: (j.created_at, j.id))

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} not found", param="job_id")
        return job

    def cancel(self, job_id: str) -> Job:
        with self._lock:
            job = self.get(job_id)
            if job.status in FINAL:
                raise Conflict(f"job {job_id!r} is already {job.status}", param="job_id")
            if job.status == "queued":
                job.status, job.finished_at = "cancelled", _now()
                self._save(job)
                return job
            self._cancel_requested.add(job_id)
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return job

    # -- the worker loop -----------------------------------------------------------------------------------------

    def _next(self) -> Job | None:
        queued = [j for j in self._jobs.values() if j.status == "queued"]
        return min(queued, key=lambda j: (j.created_at, j.id)) if queued else None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and self._next() is None:
                    self._lock.wait(timeout=1.0)
                if self._stopping:
                    return
                job = self._next()
                job.status, job.started_at = "running", _now()
                self._running = job.id
                self._save(job)
            try:
                self._run(job)
            except Exception as e:  # the manager survives whatever happens to one job
                log.exception("job %s failed", job.id)
                self._finish(job, "failed", f"internal error: {e}")
            finally:
                self._running = None

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
        drain.join(timeout=5)
        with self._lock:
            self._proc = None
            cancelled = job.id in self._cancel_requested
            self._cancel_requested.discard(job.id)
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
            self.files.save(job)

    def _register(self, job: Job, result: dict) -> None:
        """Make the engine serve the new adapter. The registry build runs torch ops: it runs in a thread that
        ends right after, so that the serving thread stays the only long-lived user of torch's thread pool."""
        t0 = time.monotonic()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.register()
            except BaseException as e:  # reported by the job record below
                errors.append(e)
        worker = threading.Thread(target=run, name="register")
        worker.start()
        worker.join()
        if errors:
            log.error("registering %s failed: %s", job.task, errors[0])
            self._finish(job, "failed", f"the adapter was stored but could not be served: {errors[0]}")
            return
        self.metrics.register_seconds.observe(time.monotonic() - t0)
        job.metrics = result.get("metrics", {})
        job.step = job.total_steps or job.step
        job.eta_s = 0.0
        self._finish(job, "succeeded", None)

    def _finish(self, job: Job, status: str, error: str | None) -> None:
        with self._lock:
            job.status, job.error, job.finished_at = status, error, _now()
            self._save(job)
        log.info("job %s (%s): %s%s", job.id, job.task, status, f": {error}" if error else "")
