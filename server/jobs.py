"""Training jobs: records on disk (``<store>/.jobs``), one job at a time in FIFO order, each in a worker process
of its own (``python -m server.worker``), progress read from the worker's output, and the new adapter
registered with the engine when the worker has stored it.

What jobs leave is bounded: at most ``max_queued`` jobs wait (more get 429), a job's dataset is deleted as soon
as the job is final, final records are deleted after ``retention_s`` or beyond the newest ``max_records``, and a
worker running over ``max_seconds`` is stopped (the job fails)."""
from __future__ import annotations

import collections
import json
import calendar
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

from adapters_store.atomic import fsync as fsync_dir

from .errors import Conflict, NotFound, Overloaded, StorageError
from .threads import run_isolated

log = logging.getLogger(__name__)

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = {"succeeded", "failed", "cancelled"}
STAMP = "%Y-%m-%dT%H:%M:%SZ"
MAX_BACKOFF_S = 60.0  # the jobs thread's longest wait after repeated errors
PRUNE_EVERY_S = 60.0  # how often an idle trainer deletes expired records
KILL_AFTER_S = 10.0  # a worker still alive this long after SIGTERM gets SIGKILL
STALE_TEMP_S = 3600.0  # temp files of a crashed record writer are deleted after this


def _now() -> str:
    return time.strftime(STAMP, time.gmtime())


def _epoch(stamp: str | None) -> float | None:
    try:
        return calendar.timegm(time.strptime(stamp, STAMP)) if stamp else None
    except ValueError:
        return None


def _brief(e: BaseException) -> str:
    """An error in a few words, without paths: its type, and for an OSError its errno text."""
    if isinstance(e, OSError) and e.strerror:
        return f"{type(e).__name__} ({e.strerror})"
    return type(e).__name__


def _exit_message(code: int) -> str:
    if code < 0:
        try:
            return f"worker was killed by signal {signal.Signals(-code).name}; see the server log"
        except ValueError:
            pass
    return f"worker exited with code {code}; see the server log"


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
        self._seen: dict[str, tuple[int, int, int]] = {}  # record file -> (inode, mtime_ns, size) when last read

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:  # the rename is durable once the folder is
            fsync_dir(self.root)
        except OSError as e:  # the record is complete and visible; only its durability is in doubt
            log.warning("%s written but fsync of %s failed: %s", path.name, self.root, e)

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

    def changes(self) -> tuple[list[Job], set[str]]:
        """(the records written since the last call, the ids of every record): a directory scan, a stat per
        record, and a read of the changed ones only (a record is replaced by a rename, so its inode changes
        with every write). Not thread-safe: the manager calls it under its lock."""
        changed, present, seen = [], set(), {}
        for entry in os.scandir(self.root):
            name = entry.name
            if not (name.startswith("job-") and name.endswith(".json")):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:  # deleted meanwhile
                continue
            present.add(name[:-5])
            seen[name] = key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._seen.get(name) == key:
                continue
            try:
                changed.append(Job.from_dict(json.loads(Path(entry.path).read_bytes())))
            except FileNotFoundError:
                present.discard(name[:-5])
                del seen[name]
            except (OSError, ValueError, TypeError) as e:  # logged once per version of the file
                log.error("skipping unreadable job record %s: %s", entry.path, e)
        self._seen = seen
        return changed, present

    def remove(self, job_id: str, suffix: str) -> bool:
        """Delete ``<id><suffix>``; True if it is gone (or was never there)."""
        try:
            (self.root / f"{job_id}{suffix}").unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot delete %s%s: %s", job_id, suffix, e)
            return False
        return True


class JobManager:
    """The job queue of a store. Records on disk are the truth, so that several server processes can share a
    store: any of them accepts jobs and cancels; exactly one, the holder of ``trainer.lock`` (an flock, freed
    by the kernel when its holder dies), runs them, one at a time in FIFO order, each in a worker process.
    ``register`` is called after a worker stored its adapter; it must make the engine serve it, and
    ``unserved(task)`` then says why it does not (None: it does)."""

    def __init__(self, files: JobFiles, worker_args: list[str], store_exists: Callable[[str], bool],
                 store_manifest: Callable[[str], dict], register: Callable[[], None], metrics,
                 worker_env: dict[str, str] | None = None, poll_seconds: float = 1.0,
                 on_training: Callable[[bool], None] | None = None,
                 unserved: Callable[[str], str | None] | None = None, max_queued: int = 16,
                 max_seconds: float = 6 * 3600, retention_s: float = 7 * 86400, max_records: int = 1000):
        self.files = files
        self.worker_args = worker_args  # the command line of a worker, without --job/--data
        self.store_exists, self.store_manifest = store_exists, store_manifest
        self.register = register
        self.unserved = unserved or (lambda task: None)
        self.metrics = metrics
        self.worker_env = worker_env or {}
        self.poll_seconds = poll_seconds
        self.on_training = on_training or (lambda running: None)  # told when a worker starts and ends
        self.max_queued, self.max_seconds = max_queued, max_seconds
        self.retention_s, self.max_records = retention_s, max_records
        self._lock = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._proc: subprocess.Popen | None = None
        self._running: str | None = None
        self._lock_fd: int | None = None
        self._dirty: set[str] = set()  # jobs whose last record write failed
        self._stopping = False
        self._error: str | None = None  # why the jobs thread's last turn failed (None: it did not)
        self._last_prune = 0.0
        self._thread = threading.Thread(target=self._loop, name="jobs", daemon=True)

    @property
    def is_trainer(self) -> bool:
        return self._lock_fd is not None

    def health(self) -> str:
        """"ok", or "failing: <why>" while the jobs thread's turns fail (it retries), or "stopped"."""
        if self._error is not None:
            return f"failing: {self._error}"
        if not self._thread.is_alive() and not self._stopping:
            return "stopped"
        return "ok"

    # -- records -----------------------------------------------------------------------------------------------

    def _reload(self) -> None:
        """Refresh the cache from the records written since the last refresh, and drop the deleted ones (the
        running job's record is this process's own and newer in memory; so is one whose write failed)."""
        with self._lock:
            changed, present = self.files.changes()
            for job in changed:
                if job.id != self._running and job.id not in self._dirty:
                    self._jobs[job.id] = job
            for job_id in [i for i in self._jobs if i not in present and i != self._running and i not in self._dirty]:
                del self._jobs[job_id]
            self._publish()

    def _become_trainer(self) -> bool:
        """Take ``trainer.lock`` if nobody holds it; then fail the jobs an earlier trainer left running. If
        that fails, let go of the lock again (another process may do better) and raise."""
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
        try:
            self._recover()
        except BaseException:
            self._lock_fd = None
            os.close(fd)  # the only descriptor of this open file: the flock goes with it
            raise
        log.info("this process trains the jobs of %s", self.files.root)
        return True

    def _recover(self) -> None:
        """A job recorded as running while no trainer holds the lock was interrupted: mark it failed
        (``interrupted``), unless its adapter made it into the store; then it ends as a finished worker's job
        does, succeeded only if the adapter is served (with the metrics its manifest keeps)."""
        for job in self.files.load_all():
            if job.status == "running":
                manifest = self._stored_by(job)
                if manifest is not None:
                    metrics = manifest.get("metrics", {})
                    self._register(job, {"metrics": metrics if isinstance(metrics, dict) else {}})
                    continue
                job.status, job.error = "failed", "interrupted"
                job.finished_at = job.finished_at or _now()
                self._save(job)
                self.files.remove(job.id, ".jsonl")
        self._reload()

    def _stored_by(self, job: Job) -> dict | None:
        """The manifest of the job's adapter if this job stored it, else None."""
        try:
            if self.store_exists(job.task):
                manifest = self.store_manifest(job.task)
                if manifest.get("job_id") == job.id:
                    return manifest
        except Exception:
            pass
        return None

    def _save(self, job: Job) -> None:
        """Write the record; if the store cannot be written (full, read-only), keep the state in memory, where
        the API still reports it, and say so in the log."""
        self._jobs[job.id] = job  # this object is the newest state of the job
        try:
            self.files.save(job)
            self._dirty.discard(job.id)
        except OSError as e:
            log.error("cannot write the record of job %s: %s", job.id, e)
            self._dirty.add(job.id)  # the memory copy is newer than the disk's: keep it
        self._publish()

    def _publish(self) -> None:
        counts = {s: 0 for s in STATES}
        for job in list(self._jobs.values()):
            counts[job.status] += 1
        for state, n in counts.items():
            self.metrics.jobs.labels(state).set(n)

    def _prune(self) -> None:
        """Trainer only: delete what final jobs leave behind. Their datasets at once; their records (and cancel
        files) once they finished over ``retention_s`` ago or are not among the newest ``max_records`` final
        ones; the temp files of a writer that died, after an hour."""
        self._last_prune = time.monotonic()
        root = self.files.root
        names = set(os.listdir(root))
        now = time.time()
        with self._lock:
            final = sorted((j for j in self._jobs.values() if j.status in FINAL and j.id not in self._dirty),
                           key=lambda j: (j.finished_at or j.created_at, j.id), reverse=True)
        removed = 0
        for rank, job in enumerate(final):
            if f"{job.id}.jsonl" in names:
                self.files.remove(job.id, ".jsonl")
            ended = _epoch(job.finished_at or job.created_at)
            if rank >= self.max_records or (ended is not None and now - ended > self.retention_s):
                if self.files.remove(job.id, ".json"):
                    self.files.remove(job.id, ".cancel")
                    with self._lock:
                        self._jobs.pop(job.id, None)
                    removed += 1
        for name in names:
            if name.startswith(".job-") and name.endswith(".tmp"):
                try:
                    if now - os.stat(root / name).st_mtime > STALE_TEMP_S:
                        os.unlink(root / name)
                except FileNotFoundError:
                    pass
        if removed:
            log.info("deleted the records of %d finished job(s)", removed)
            with self._lock:
                self._publish()

    # -- API -----------------------------------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._become_trainer()
            self._reload()
        except Exception as e:  # serving goes on; the jobs thread retries
            log.exception("the job queue cannot be read")
            self._error = _brief(e)
            self.metrics.jobs_loop_errors.inc()
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()

    def task_taken(self, task: str) -> bool:
        with self._lock:
            self._reload()
            return self.store_exists(task) or any(
                j.task == task and j.status in ("queued", "running") for j in self._jobs.values())

    def submit(self, task: str, rows: list, config: dict) -> Job:
        with self._lock:
            if self.task_taken(task):
                raise Conflict(f"task {task!r} already exists or is being trained", param="name")
            queued = sum(j.status == "queued" for j in self._jobs.values())
            if queued >= self.max_queued:
                raise Overloaded(f"{queued} training jobs are queued already (max_queued_jobs={self.max_queued}); "
                                 "retry when one has started", retry_after=60)
            job = Job(id=f"job-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}",
                      task=task, status="queued", created_at=_now(), config=config, n_rows=len(rows))
            try:
                self.files.save_data(job.id, rows)
                self.files.save(job)
            except OSError as e:
                self.files.remove(job.id, ".jsonl")
                raise StorageError(f"the job cannot be recorded in the store: {e.strerror or e}") from None
            self._jobs[job.id] = job
            self._publish()
            self._lock.notify_all()
        return job

    def list(self) -> list[Job]:
        with self._lock:
            self._reload()
            return sorted(self._jobs.values(), key=lambda j: (j.created_at, j.id))

    def pending_count(self) -> int:
        """Jobs queued or running, in any process sharing the store."""
        with self._lock:
            self._reload()
            return sum(j.status in ("queued", "running") for j in self._jobs.values())

    def running(self) -> list[Job]:
        """The jobs running now (in whichever process trains)."""
        with self._lock:
            self._reload()
            return [j for j in self._jobs.values() if j.status == "running"]

    def get(self, job_id: str) -> Job:
        with self._lock:
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
                self.files.remove(job.id, ".jsonl")
                return job
            proc = self._proc if self._running == job_id else None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return job

    # -- the jobs thread -----------------------------------------------------------------------------------------

    def _next(self) -> Job | None:
        queued = [j for j in self._jobs.values() if j.status == "queued"]
        return min(queued, key=lambda j: (j.created_at, j.id)) if queued else None

    def _loop(self) -> None:
        """Turn after turn until ``stop()``. No error ends it: one that escapes a turn is logged, counted
        (``jumplora_jobs_loop_errors``) and reported by ``health()`` (``/readyz``), and the next turn comes after
        a wait that doubles with each error in a row, up to ``MAX_BACKOFF_S``."""
        failures = 0
        while True:
            with self._lock:
                if self._stopping:
                    return
            try:
                self._turn()
            except Exception as e:
                failures += 1
                self._error = _brief(e)
                self.metrics.jobs_loop_errors.inc()
                delay = min(self.poll_seconds * 2 ** min(failures - 1, 20), MAX_BACKOFF_S)
                log.exception("the jobs thread failed (%d time(s) in a row); next try in %.1f s", failures, delay)
                with self._lock:
                    if not self._stopping:
                        self._lock.wait(timeout=delay)
                continue
            if failures or self._error is not None:
                log.info("the jobs thread works again")
                failures, self._error = 0, None

    def _turn(self) -> None:
        """Wait for a job (not being the trainer: try to become it), then run it."""
        with self._lock:
            job = self._next() if self.is_trainer else None
            if job is None:
                self._lock.wait(timeout=self.poll_seconds)
        if job is None:
            if self._become_trainer():
                self._reload()
                if time.monotonic() - self._last_prune >= PRUNE_EVERY_S:
                    self._prune()
            return
        current = self.files.load(job.id)  # another replica may have cancelled it meanwhile
        if current is None or current.status != "queued" or self.files.cancel_path(job.id).exists():
            if current is not None and current.status == "queued":
                with self._lock:
                    current.status, current.finished_at = "cancelled", _now()
                    self._save(current)
                    self.files.remove(job.id, ".jsonl")
            self._reload()
            return
        with self._lock:
            if self._jobs.get(job.id) is not job or job.status != "queued":  # changed meanwhile: look again
                return
            job.status, job.started_at = "running", _now()
            self._running = job.id
            self._save(job)
        self._error = None  # past the steps that failed, if any: not "failing" for the hours a job may take
        try:
            self.on_training(True)
            self._run(job)
        except Exception as e:  # the job fails; the thread goes on
            log.exception("job %s failed", job.id)
            self._finish(job, "failed", f"internal error ({type(e).__name__}); see the server log")
        finally:
            self._running = None
            try:
                self.on_training(False)
            except Exception:
                log.exception("on_training(False) failed")
        self._prune()

    def _watch(self, job: Job, proc: subprocess.Popen, done: threading.Event, timed_out: threading.Event) -> None:
        """Stop the worker when a cancel request for its job appears (from any replica), or when it has run
        ``max_seconds``: SIGTERM, then SIGKILL if it is still there ``KILL_AFTER_S`` later."""
        deadline = time.monotonic() + self.max_seconds
        while not done.wait(min(0.5, self.max_seconds)):
            if proc.poll() is not None:
                return
            if time.monotonic() >= deadline:
                timed_out.set()
            elif not self.files.cancel_path(job.id).exists():
                continue
            proc.send_signal(signal.SIGTERM)
            if not done.wait(KILL_AFTER_S) and proc.poll() is None:
                proc.kill()
            return

    def _run(self, job: Job) -> None:
        cmd = [*self.worker_args, "--job", str(self.files.root / f"{job.id}.json"),
               "--data", str(self.files.data_path(job.id))]
        env = {**os.environ, **self.worker_env}
        with self._lock:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
            proc = self._proc
        stderr_tail: collections.deque[str] = collections.deque(maxlen=40)  # lines; for the server log only
        drain = threading.Thread(target=stderr_tail.extend, args=(proc.stderr,), daemon=True)
        drain.start()
        done, timed_out = threading.Event(), threading.Event()
        threading.Thread(target=self._watch, args=(job, proc, done, timed_out), daemon=True).start()
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
                error = str(event.get("message"))[:2000]
        proc.wait()
        done.set()
        drain.join(timeout=5)
        with self._lock:
            self._proc = None
        cancelled = self.files.cancel_path(job.id).exists()
        if self._stored_by(job) is not None:  # the adapter is in the store: succeeded (even if a cancel came late)
            self._register(job, result or {})
            return
        if cancelled:
            self._finish(job, "cancelled", None)
            return
        tail = "".join(stderr_tail).strip()
        log.error("job %s: the worker exited with %s%s", job.id, proc.returncode,
                  f"; the end of its stderr:\n{tail}" if tail else " (nothing on stderr)")
        if timed_out.is_set():
            self._finish(job, "failed", f"timed out after {self.max_seconds:g} s")
        else:  # the worker's own message (it writes it for the user), never its stderr (paths, tracebacks)
            self._finish(job, "failed", error or _exit_message(proc.returncode))

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
        """Make the engine serve the new adapter (the registry build runs torch ops: ``run_isolated``); the job
        succeeds only if it is served (the registry refuses an adapter whose parent left, one over max_tasks,
        ...)."""
        try:
            run_isolated(self.register, "register")
            reason = self.unserved(job.task)
        except Exception as e:
            log.exception("registering %s failed", job.task)
            self._finish(job, "failed", f"the adapter was stored but could not be served: {_brief(e)}")
            return
        if reason is not None:
            self._finish(job, "failed", f"the adapter was stored but is not served: {reason}")
            return
        job.metrics = result.get("metrics", {})
        job.step = job.total_steps or job.step
        job.eta_s = 0.0
        self._finish(job, "succeeded", None)

    def _finish(self, job: Job, status: str, error: str | None) -> None:
        """Record the final state (paths of the store shown as ``<store>``) and delete the job's dataset."""
        if error is not None:
            error = error.replace(str(self.files.root.parent), "<store>")
        with self._lock:  # the dataset is gone by the time anyone sees the job final
            job.status, job.error, job.finished_at = status, error, _now()
            self._save(job)
            self.files.remove(job.id, ".jsonl")
        log.info("job %s (%s): %s%s", job.id, job.task, status, f": {error}" if error else "")
