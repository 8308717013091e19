"""The job queue under faults and over time (issue 14): a jobs thread that survives its errors, bounded queues,
datasets and records, a wall-clock limit per job, cheap listings, synced folders, refused adapters and safe
error messages. Most run a JobManager in-process with a fake worker script (no torch: each job takes a
fraction of a second); the last one runs a real server."""
from __future__ import annotations

import collections
import errno
import fcntl
import json
import logging
import os
import sys
import time

import httpx
import pytest

from adapters_store import AdapterStore
from server.errors import Overloaded
from server.jobs import FINAL, STAMP, Job, JobFiles, JobManager
from server.metrics import Metrics
from support import TOY_CONFIG, put_task, random_sparse, task_deltas, toy_rows, wait_job

Row = collections.namedtuple("Row", "prompt completion")
ROWS = [Row("a", " b"), Row("c", " d")]

# Stands in for ``python -m server.worker``: its job's ``config.mode`` says what it does.
FAKE_WORKER = r'''
import json, sys, time
from pathlib import Path

args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
job = json.loads(Path(args["--job"]).read_text())
mode = job["config"].get("mode", "ok")
if mode == "ok":  # store an "adapter" (a folder with the manifest fields the manager reads)
    rows = Path(args["--data"]).read_text().splitlines()
    folder = Path(args["--store"]) / job["task"]
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"job_id": job["id"]}))
    print(json.dumps({"event": "done", "metrics": {"rows": len(rows)}}), flush=True)
elif mode == "crash":  # dies with a traceback and no error event
    sys.stderr.write('Traceback (most recent call last):\n  File "/srv/secret/server/worker.py", line 9, in run\n'
                     'RuntimeError: boom\n')
    sys.exit(3)
elif mode == "error":  # reports an error the way the real worker does
    message = f"StoreWriteError: write failed: [Errno 28] No space left on device: '{args['--store']}/.tmp-x/a'"
    print(json.dumps({"event": "error", "message": message}), flush=True)
    sys.exit(1)
elif mode == "sleep":
    time.sleep(60)
'''


class Harness:
    """A JobManager over ``<tmp>/store/.jobs`` whose worker is FAKE_WORKER; ``refused`` maps task -> the reason
    the fake registry gives for not serving it."""

    def __init__(self, tmp_path, **kw):
        self.store = tmp_path / "store"
        self.store.mkdir()
        self.files = JobFiles(self.store / ".jobs")
        script = tmp_path / "fake_worker.py"
        script.write_text(FAKE_WORKER)
        self.registered: list[float] = []
        self.refused: dict[str, str] = {}
        self.metrics = Metrics()
        kw.setdefault("poll_seconds", 0.05)
        self.manager = JobManager(
            self.files, [sys.executable, str(script), "--store", str(self.store)],
            lambda task: (self.store / task).is_dir(),
            lambda task: json.loads((self.store / task / "manifest.json").read_text()),
            lambda: self.registered.append(time.monotonic()), self.metrics,
            unserved=lambda task: self.refused.get(task), **kw)

    def wait(self, job_id: str, timeout: float = 20.0) -> Job:
        wait_until(lambda: self.manager.get(job_id).status in FINAL, timeout)
        return self.manager.get(job_id)

    def loop_errors(self) -> float:
        return self.metrics.registry.get_sample_value("jumplora_jobs_loop_errors_total")


@pytest.fixture
def harness(tmp_path):
    made = []

    def make(**kw) -> Harness:
        made.append(Harness(tmp_path, **kw))
        return made[-1]

    yield make
    for h in made:
        h.manager.stop()


def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def stamp(age_s: float) -> str:
    return time.strftime(STAMP, time.gmtime(time.time() - age_s))


def test_the_jobs_thread_survives_errors_backs_off_and_says_so(harness, monkeypatch):
    h = harness(poll_seconds=0.2)
    real_load, real_load_all = JobFiles.load, JobFiles.load_all
    loads, health, load_alls = [], [], []

    def load(self, job_id):  # the jobs thread's re-read of the job it is about to run: fails 3 times
        loads.append(time.monotonic())
        health.append(h.manager.health())
        if len(loads) <= 3:
            raise OSError(errno.EIO, "Input/output error")
        return real_load(self, job_id)

    def load_all(self):  # the recovery after taking trainer.lock: fails twice
        load_alls.append(1)
        if len(load_alls) <= 2:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_load_all(self)

    monkeypatch.setattr(JobFiles, "load", load)
    monkeypatch.setattr(JobFiles, "load_all", load_all)
    job = h.manager.submit("t", ROWS, {})

    # A recovery that fails lets go of trainer.lock again: another process can take it.
    with pytest.raises(PermissionError):
        h.manager._become_trainer()
    assert not h.manager.is_trainer
    fd = os.open(h.files.root / "trainer.lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the manager still held it
    finally:
        os.close(fd)
    # start() survives it too, and says so.
    h.manager.start()
    assert h.manager.health() == "failing: PermissionError (Permission denied)"

    done = h.wait(job.id)
    assert done.status == "succeeded", done
    assert health[1:4] == ["failing: OSError (Input/output error)"] * 3
    gaps = [b - a for a, b in zip(loads, loads[1:])]
    assert all(gap >= 0.9 * want for gap, want in zip(gaps, (0.2, 0.4, 0.8))), gaps  # doubling back-off
    assert h.manager.health() == "ok" and h.manager.is_trainer
    assert h.loop_errors() == 4


def test_the_queue_is_capped_with_429(harness):
    h = harness(max_queued=2)  # not started: jobs stay queued
    a = h.manager.submit("a", ROWS, {})
    h.manager.submit("b", ROWS, {})
    with pytest.raises(Overloaded) as refused:
        h.manager.submit("c", ROWS, {})
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "60"}
    assert "max_queued_jobs=2" in refused.value.message
    assert len(list(h.files.root.glob("job-*.json"))) == 2 and len(list(h.files.root.glob("*.jsonl"))) == 2
    assert h.manager.cancel(a.id).status == "cancelled"
    assert not h.files.data_path(a.id).exists()  # a final job's dataset is deleted at once
    assert h.manager.submit("c", ROWS, {}).status == "queued"


def test_final_jobs_leave_no_dataset_and_old_records_are_deleted(harness):
    h = harness(max_records=3, retention_s=86400)

    def record(name: str, status: str, age_s: float) -> str:
        job = Job(id=f"job-{name}", task=name, status=status, created_at=stamp(age_s + 60), config={}, n_rows=2,
                  finished_at=stamp(age_s))
        h.files.save(job)
        h.files.data_path(job.id).write_text("{}\n")
        h.files.cancel_path(job.id).touch()
        return job.id

    root = h.files.root
    expired = record("expired", "succeeded", 2 * 86400)  # among the newest 3, but finished 2 days ago
    recent = record("recent", "failed", 600)
    old_temp, new_temp = root / ".job-x.json.0000.tmp", root / ".job-y.json.0001.tmp"  # from dead writers
    old_temp.write_text("{")
    new_temp.write_text("{")
    os.utime(old_temp, (time.time() - 7200,) * 2)
    h.manager.start()
    first = h.manager.submit("first", ROWS, {})
    assert h.wait(first.id).status == "succeeded"
    wait_until(lambda: not (root / f"{expired}.json").exists())
    assert not (root / f"{expired}.cancel").exists() and not (root / f"{expired}.jsonl").exists()
    assert (root / f"{recent}.json").exists() and not (root / f"{recent}.jsonl").exists()
    assert not h.files.data_path(first.id).exists()
    assert not old_temp.exists() and new_temp.exists()

    # Beyond the newest max_records=3 final ones.
    newer = [record(f"newer{i}", "cancelled", 100 * (i + 1)) for i in range(3)]
    second = h.manager.submit("second", ROWS, {})
    assert h.wait(second.id).status == "succeeded"
    wait_until(lambda: not (root / f"{recent}.json").exists())
    kept = {j.id for j in h.manager.list()}
    assert kept == {second.id, first.id, newer[0]}, kept
    assert sorted(p.name for p in root.glob("job-*")) == sorted([f"{i}.json" for i in kept] + [f"{newer[0]}.cancel"])


def test_a_job_over_max_job_seconds_is_stopped_and_fails(harness):
    h = harness(max_seconds=0.5)
    h.manager.start()
    started = time.monotonic()
    job = h.manager.submit("slow", ROWS, {"mode": "sleep"})
    done = h.wait(job.id)
    assert done.status == "failed" and done.error == "timed out after 0.5 s", done
    assert time.monotonic() - started < 10 and h.registered == []
    assert not h.files.data_path(job.id).exists()


def test_listing_reads_only_the_records_that_changed(harness, monkeypatch):
    h = harness()
    for i in range(30):
        h.files.save(Job(id=f"job-{i:04d}", task=f"t{i}", status="succeeded", created_at=stamp(100 - i), config={},
                         n_rows=1))
    parsed = []
    from_dict = Job.from_dict.__func__
    monkeypatch.setattr(Job, "from_dict", classmethod(lambda cls, d: parsed.append(d["id"]) or from_dict(cls, d)))
    assert len(h.manager.list()) == 30 and len(parsed) == 30
    parsed.clear()
    assert len(h.manager.list()) == 30 and h.manager.pending_count() == 0 and h.manager.running() == []
    assert parsed == []  # nothing changed: nothing read
    h.files.save(Job(id="job-0003", task="t3", status="running", created_at=stamp(97), config={}, n_rows=1))
    (h.files.root / "job-0005.json").unlink()
    jobs = {j.id: j for j in h.manager.list()}
    assert parsed == ["job-0003"] and len(jobs) == 29 and jobs["job-0003"].status == "running"
    assert [j.id for j in h.manager.running()] == ["job-0003"] and h.manager.pending_count() == 1


def test_records_and_the_trash_are_synced_with_their_folders(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        synced.append((st.st_dev, st.st_ino))
        return real_fsync(fd)

    def ident(path):
        st = os.stat(path)
        return st.st_dev, st.st_ino

    monkeypatch.setattr(os, "fsync", fsync)
    files = JobFiles(tmp_path / "store" / ".jobs")
    files.save(Job(id="job-1", task="t", status="queued", created_at=stamp(0), config={}, n_rows=1))
    assert ident(files.root) in synced  # the rename of the record is durable

    store = AdapterStore(tmp_path / "adapters")
    put_task(store, "t", {"model.layers.0.self_attn.q_proj": random_sparse((8, 8), 0.3, seed=1)}, "fp", 0)
    synced.clear()
    moved = store.trash("t")
    assert ident(moved.parent) in synced and ident(store.root) in synced  # .trash gained it, the root lost it


def test_a_stored_adapter_the_registry_refuses_fails_the_job(harness):
    h = harness()
    h.refused["t"] = "the server already serves max_tasks=1 tasks"
    h.manager.start()
    job = h.wait(h.manager.submit("t", ROWS, {}).id)
    assert job.status == "failed", job
    assert job.error == "the adapter was stored but is not served: the server already serves max_tasks=1 tasks"
    assert len(h.registered) == 1  # the registry was asked, and said no
    served = h.wait(h.manager.submit("u", ROWS, {}).id)
    assert served.status == "succeeded" and served.error is None and served.metrics == {"rows": 2}


def test_a_restart_ends_a_stored_running_job_as_served_or_refused(harness):
    """A server that died after its worker stored the adapter: the next trainer ends the job as a finished
    worker's, succeeded only if the registry serves the adapter, with the metrics its manifest keeps."""
    h = harness()
    jobs = {}
    for task in ("served", "refused"):
        job = h.manager.submit(task, ROWS, {})
        job.status = "running"
        h.files.save(job)  # as the dead trainer left it
        (h.store / task).mkdir()
        (h.store / task / "manifest.json").write_text(json.dumps({"job_id": job.id, "metrics": {"rows": 2}}))
        jobs[task] = job.id
    h.refused["refused"] = "it was trained on 'gone', which is not served"
    h.manager.start()
    served, refused = h.manager.get(jobs["served"]), h.manager.get(jobs["refused"])
    assert served.status == "succeeded" and served.error is None and served.metrics == {"rows": 2}
    assert refused.status == "failed"
    assert refused.error == "the adapter was stored but is not served: it was trained on 'gone', which is not served"
    assert len(h.registered) == 2
    on_disk = {j.id: j for j in h.files.load_all()}
    assert on_disk[jobs["served"]].status == "succeeded" and on_disk[jobs["refused"]].status == "failed"
    assert not list(h.files.root.glob("*.jsonl"))  # their datasets are gone


def test_job_errors_are_short_and_the_log_keeps_the_details(harness, caplog, tmp_path):
    from server.worker import user_message

    caplog.set_level(logging.INFO, logger="server.jobs")
    h = harness()
    h.manager.start()
    crashed = h.wait(h.manager.submit("crash", ROWS, {"mode": "crash"}).id)
    assert crashed.status == "failed" and crashed.error == "worker exited with code 3; see the server log", crashed
    assert "/srv/secret/server/worker.py" in caplog.text and "RuntimeError: boom" in caplog.text
    reported = h.wait(h.manager.submit("full", ROWS, {"mode": "error"}).id)
    assert reported.error == ("StoreWriteError: write failed: [Errno 28] No space left on device: "
                              "'<store>/.tmp-x/a'"), reported  # the worker's own message, the store unnamed
    assert str(tmp_path) not in reported.error
    # The real worker names the server's folders the same way.
    error = FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "m" / "config.json"))
    assert user_message(error, {str(tmp_path / "s"): "<store>", str(tmp_path / "m"): "<model>"}) == (
        "FileNotFoundError: [Errno 2] No such file or directory: '<model>/config.json'")


def test_server_fails_a_job_whose_adapter_it_refuses(tiny_model_dir, tiny_base, start_server, tmp_path):
    """End to end: the job's adapter is stored, but meanwhile another process sharing the store added a task
    and this server (max_tasks=1) is full: the job fails saying so, instead of succeeding unserved."""
    store = tmp_path / "store"
    server = start_server(tiny_model_dir, store=store, extra_args=["--max-tasks", "1", "--store-poll-seconds", "0.2"])
    assert httpx.get(server.url + "/readyz").json()["jobs"] == "ok"
    r = httpx.post(server.url + "/v1/tasks", json={"name": "late", "data": toy_rows(),
                                                   "config": {**TOY_CONFIG, "epochs": 2}})
    assert r.status_code == 202, r.text
    put_task(AdapterStore(store), "early", task_deltas(tiny_base.model, 0.03, seed=1), tiny_base.fingerprint, 0)
    job = wait_job(server.url, r.json()["job_id"], timeout=60, log=server.log)
    assert job["status"] == "failed", job
    assert job["error"] == "the adapter was stored but is not served: the server already serves max_tasks=1 tasks"
    assert [t["name"] for t in httpx.get(server.url + "/v1/tasks").json()["tasks"]] == ["early"]
    assert not list((store / ".jobs").glob("*.jsonl"))  # the dataset went when the job ended
    assert "jumplora_jobs_loop_errors_total 0.0" in httpx.get(server.url + "/metrics").text
