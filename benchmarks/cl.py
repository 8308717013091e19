"""Continual-learning benchmark (DESIGN.md §3), driven only through the server's HTTP API.

    python -m benchmarks.cl [--order short_order_1] [--methods ...] [--train-rows 200] [--test-rows 100]
                            [--out cl-results] [--model PATH | --url URL] [...]

For each method, from a fresh adapter store, it learns the tasks of the order one by one (``POST /v1/tasks`` with
the method's config) and, after learning task i, evaluates every task j <= i on its test rows, both through
``@stack`` and through per-task routing (the task's own name): greedy generation (``/v1/generate``, temperature 0,
``--max-new-tokens``), exact match after lower-casing and collapsing whitespace, against the row's completion.
This gives an accuracy matrix a[i][j] per mode; OA = mean_j a[T][j], BWT = 1/(T-1) * sum_{j<T} (a[T][j] - a[j][j])
(``null`` for one task). Methods: ``jumplora+incremental``, ``lora+incremental``, ``jumplora+ella``,
``lora+ella`` and ``multitask`` (the upper bound: one dense adapter, lora + incremental, trained on every task's
training rows mixed and shuffled, evaluated on every task through its own name: a single-row "matrix").

Rows. Training and test rows are drawn per task, balanced over labels (a seeded shuffle of each label's rows,
taken round robin), so every method sees the same rows. ``--max-seq-len`` (also the jobs' ``max_seq_len``) skips
rows that would not fit: the harness cannot ask the server for token counts, so it first estimates a row's
tokens as its characters / ``--chars-per-token`` (3.5 by default; SmolLM2's tokenizer averages about 4.3 on this
benchmark, 3.3-3.7 at the 5th percentile), and then lets the server decide: when ``POST /v1/tasks`` answers 422
naming a row as over ``max_seq_len``, that row is excluded for good (recorded in the state, so every method uses
the same rows) and the next row of the same label takes its place. Test rows pass the same estimate only (they are
never posted); a test prompt the server refuses (400: over its context) counts as wrong and is reported as an
error.

Servers. Unless ``--url`` is given, each method gets a fresh server (``python -m server serve`` on loopback) with
its own store in ``OUT/<method>/store``, stopped when the method is done. With ``--url`` the harness uses that
server for a single method; its store should hold no other tasks (they would be part of ``@stack``).

Resuming. ``OUT/state.json`` records every completed step (job submitted, task learned, evaluation done). Running
the same command again continues where it stopped: the method's server restarts on its store, so the tasks
already learned are served again, and only what is missing is done. A job that was queued when the run stopped
runs after the restart and is waited for; one that was running is failed by the server (``interrupted``), and
the harness submits the task again (the name is free: nothing was stored). A run with other settings in the
same ``OUT`` is refused. ``--stop-after N`` stops after N steps (to test resuming).

Output in OUT: ``results.json`` (settings, every matrix, OA/BWT, per-task accuracy counts, each adapter's
density and overlap from ``GET /v1/tasks``, the jobs and timings), ``results.md`` (tables) and ``results.png``
(a heat map per method and mode, and density/overlap per task per method). They are rewritten at the end of
every run, with whatever is complete.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx

from .cl_report import backward_transfer, markdown, overall_accuracy, plot

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = [HERE.parents[1] / "shared" / "data" / "cl-benchmark", HERE / "data" / "cl-subset"]
METHODS = {
    "jumplora+incremental": {"method": "jumplora", "regularizer": "incremental"},  # the budget gate (default)
    "jumplora-adaptive+incremental": {"method": "jumplora", "regularizer": "incremental", "gate": "adaptive"},
    "lora+incremental": {"method": "lora", "regularizer": "incremental"},
    "jumplora+ella": {"method": "jumplora", "regularizer": "ella"},
    "lora+ella": {"method": "lora", "regularizer": "ella"},
    "multitask": {"method": "lora", "regularizer": "incremental"},
}
MULTITASK = "multitask"
MODES = ("stack", "routing")
STATE_VERSION = 1
FINAL = ("succeeded", "failed", "cancelled")


class HarnessError(RuntimeError):
    pass


class StopRun(Exception):
    """--stop-after reached."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


# -- data ------------------------------------------------------------------------------------------------------


def find_data(explicit: str | None) -> Path:
    for path in ([Path(explicit)] if explicit else DEFAULT_DATA):
        if (path / "orders.json").is_file():
            return path.resolve()
    raise SystemExit(f"no benchmark data found (tried {', '.join(map(str, DEFAULT_DATA))}); pass --data")


def read_rows(path: Path) -> list[dict]:
    """Rows with ``id`` = their line number among the file's non-blank lines."""
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows.append({"id": len(rows), "prompt": r["prompt"], "completion": r["completion"],
                         "label": r.get("label") or r["completion"].strip()})
    return rows


def balanced_order(rows: list[dict], seed: str) -> list[dict]:
    """Each label's rows in a seeded shuffle, taken round robin over the labels (sorted): any prefix is balanced
    over labels as far as their rows go."""
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_label[r["label"]].append(r)
    queues = []
    for label in sorted(by_label):
        q = list(by_label[label])
        random.Random(f"{seed}/{label}").shuffle(q)
        queues.append(q)
    out = []
    for k in range(max((len(q) for q in queues), default=0)):
        out += [q[k] for q in queues if k < len(q)]
    return out


class Benchmark:
    """The order's tasks and their sampled rows (deterministic given the settings and the rejected rows)."""

    def __init__(self, folder: Path, order: str, n_train: int, n_test: int, max_seq_len: int, chars_per_token: float,
                 seed: int):
        self.folder = folder
        orders = json.loads((folder / "orders.json").read_text())
        if order not in orders:
            raise SystemExit(f"order {order!r} is not in {folder / 'orders.json'} (has {', '.join(orders)})")
        self.order, self.tasks = order, list(orders[order])
        self.n_train, self.n_test = n_train, n_test
        self.max_seq_len, self.chars_per_token, self.seed = max_seq_len, chars_per_token, seed
        self._train_pool = {t: self._candidates(t, "train") for t in self.tasks}
        self.test = {t: self._candidates(t, "test")[:n_test or None] for t in self.tasks}
        for t in self.tasks:
            if not self.test[t]:
                raise SystemExit(f"task {t}: no test rows fit --max-seq-len {max_seq_len}")

    def fits(self, row: dict) -> bool:
        """A row's estimated tokens (characters / chars_per_token, plus BOS and EOS) are within max_seq_len."""
        return (len(row["prompt"]) + len(row["completion"])) / self.chars_per_token + 2 <= self.max_seq_len

    def _candidates(self, task: str, split: str) -> list[dict]:
        rows = read_rows(self.folder / task / f"{split}.jsonl")
        return [r for r in balanced_order(rows, f"{self.seed}/{task}/{split}") if self.fits(r)]

    def train(self, task: str, rejected: set[int]) -> list[dict]:
        rows = [r for r in self._train_pool[task] if r["id"] not in rejected][:self.n_train or None]
        if not rows:
            raise HarnessError(f"task {task}: no training rows fit max_seq_len {self.max_seq_len}")
        return rows


# -- state -----------------------------------------------------------------------------------------------------


class State:
    """``OUT/state.json``, rewritten atomically after every step."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        if path.exists():
            self.data = json.loads(path.read_text())
            old = self.data.get("settings", {})
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if diff:
                raise SystemExit(f"{path} is from a run with other settings ({', '.join(diff)} differ); use another "
                                 "--out, or the same options")
        else:
            self.data = {"version": STATE_VERSION, "settings": settings, "rejected": {}, "methods": {}, "log": []}
        self.steps_this_run = 0
        self.stop_after: int | None = None

    def save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    def method(self, name: str) -> dict:
        return self.data["methods"].setdefault(name, {"submitted": {}, "learned": {}, "evals": {}, "done": False})

    def rejected(self, task: str) -> set[int]:
        return set(self.data["rejected"].get(task, []))

    def reject(self, task: str, row_id: int) -> None:
        self.data["rejected"].setdefault(task, []).append(row_id)
        self.save()

    def step(self, kind: str, method: str, **fields) -> None:
        """Record a completed step; stop the run when --stop-after is reached."""
        self.data["log"].append({"step": kind, "method": method, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                    time.gmtime()), **fields})
        self.save()
        self.steps_this_run += 1
        if self.stop_after is not None and self.steps_this_run >= self.stop_after:
            raise StopRun(f"stopped after {self.steps_this_run} steps (--stop-after); run again to continue")


# -- server ----------------------------------------------------------------------------------------------------


def _stop_stale_server(pid_file: Path, store: Path) -> None:
    """A server this harness started for ``store`` that outlived an earlier run (killed hard) would share the
    store with the new one: stop it. Only a process whose command line names this store is touched."""
    if not pid_file.exists():
        return
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return
    if b"server" in cmdline and str(store).encode() in cmdline:
        log(f"stopping the server left over from an earlier run (pid {pid})")
        os.kill(pid, signal.SIGTERM)
        for _ in range(200):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


class MethodServer:
    """A fresh server on the method's store (or the --url server, not started or stopped here)."""

    def __init__(self, ctx: "Context", method: str):
        self.ctx, self.method = ctx, method
        self.proc = None
        self.url = ctx.args.url.rstrip("/") if ctx.args.url else None
        self.start_s = 0.0

    def __enter__(self) -> "MethodServer":
        if self.url:
            return self
        from .loopback import ServerProcess

        folder = self.ctx.out / self.method
        folder.mkdir(parents=True, exist_ok=True)
        store = (folder / "store").resolve()
        pid_file = folder / "server.pid"
        _stop_stale_server(pid_file, store)
        args = self.ctx.args
        extra = ["--device", args.device, "--train-threads", str(args.train_threads), "--log-level", "warning",
                 *(["--max-batch-size", str(args.concurrency)] if args.concurrency > 32 else []),
                 *args.server_arg]
        t0 = time.monotonic()
        self.proc = ServerProcess(self.ctx.model_dir, store, self.ctx.cache_dir, extra_args=extra)
        pid_file.write_text(str(self.proc.proc.pid))
        try:
            self.proc.wait_ready(timeout=900)
        except BaseException:
            self.__exit__()
            raise
        self.url = self.proc.url
        self.start_s = time.monotonic() - t0
        log(f"[{self.method}] server ready at {self.url} in {self.start_s:.1f} s (store {store}, log "
            f"{self.proc.log_path.name})")
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.stop()
            (self.ctx.out / self.method / "server.pid").unlink(missing_ok=True)
            self.proc = None


# -- talking to the server -------------------------------------------------------------------------------------


def _error(r: httpx.Response) -> tuple[str, str | None]:
    try:
        e = r.json()["error"]
        return e.get("message", r.text), e.get("param")
    except (ValueError, KeyError, TypeError):
        return r.text[:500], None


def served_tasks(client: httpx.Client) -> dict[str, dict]:
    r = client.get("/v1/tasks")
    r.raise_for_status()
    return {t["name"]: t for t in r.json()["tasks"]}


def list_jobs(client: httpx.Client) -> list[dict]:
    r = client.get("/v1/jobs")
    r.raise_for_status()
    return r.json()["jobs"]


def submit_task(client: httpx.Client, state: State, name: str, rows_fn, config: dict) -> tuple[dict, list[dict]]:
    """POST the task; a row the server refuses as over max_seq_len is excluded for good and the rows are drawn
    again. Returns (the 202 answer, the rows posted)."""
    for _ in range(10_000):
        rows = rows_fn()
        body = {"name": name, "data": [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows],
                "config": config}
        r = client.post("/v1/tasks", json=body)
        if r.status_code == 202:
            return r.json(), rows
        message, param = _error(r)
        m = re.fullmatch(r"data\[(\d+)\]", param or "")
        if r.status_code == 422 and m and "max_seq_len" in message:
            row = rows[int(m.group(1))]
            log(f"  {row['task']} row {row['id']} skipped: {message.split(': ', 1)[-1]}")
            state.reject(row["task"], row["id"])
            continue
        raise HarnessError(f"POST /v1/tasks for {name!r}: {r.status_code} {message}")
    raise HarnessError(f"POST /v1/tasks for {name!r}: too many rows refused")


def wait_job(client: httpx.Client, job_id: str, label: str, every: float = 30.0) -> dict:
    last_print, delay = time.monotonic(), 0.5
    while True:
        r = client.get(f"/v1/jobs/{job_id}")
        r.raise_for_status()
        job = r.json()
        if job["status"] in FINAL:
            return job
        if time.monotonic() - last_print >= every and job["status"] == "running":
            last_print = time.monotonic()
            loss = "–" if job.get("loss") is None else f"{job['loss']:.3f}"
            eta = "–" if job.get("eta_s") is None else f"{job['eta_s']:.0f} s"
            log(f"  {label}: step {job.get('step')}/{job.get('total_steps') or '?'}, loss {loss}, eta {eta}")
        time.sleep(delay)
        delay = min(2.0, delay * 1.5)


async def _generate_all(url: str, items: list[tuple[str, str]], max_new_tokens: int, concurrency: int
                        ) -> list[tuple[str | None, str | None]]:
    """(text, error) per (route, prompt), ``concurrency`` requests in flight so that the server batches them."""
    sem = asyncio.Semaphore(concurrency)
    out: list[tuple[str | None, str | None]] = [(None, None)] * len(items)

    async def one(c: httpx.AsyncClient, k: int, route: str, prompt: str) -> None:
        body = {"task": route, "prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0}
        async with sem:
            for attempt in range(100):
                r = await c.post(url + "/v1/generate", json=body)
                if r.status_code == 200:
                    out[k] = (r.json()["text"], None)
                    return
                if r.status_code in (429, 503):
                    await asyncio.sleep(min(10.0, float(r.headers.get("retry-after", 1))))
                    continue
                message, _ = _error(r)
                if r.status_code == 400:  # over the context: counted as wrong, reported
                    out[k] = (None, message)
                    return
                raise HarnessError(f"POST /v1/generate ({route}): {r.status_code} {message}")
            raise HarnessError(f"POST /v1/generate ({route}): still overloaded after 100 tries")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0, connect=30.0), limits=limits) as c:
        await asyncio.gather(*(one(c, k, route, prompt) for k, (route, prompt) in enumerate(items)))
    return out


def evaluate(url: str, ctx: "Context", plan: list[tuple[str, str, str]]) -> dict:
    """``plan``: (mode, task, route). Returns {mode: {task: {correct, n, errors}}} and the wall time."""
    items, keys = [], []
    for mode, task, route in plan:
        for row in ctx.bench.test[task]:
            items.append((route, row["prompt"]))
            keys.append((mode, task, row["completion"]))
    t0 = time.monotonic()
    answers = asyncio.run(_generate_all(url, items, ctx.args.max_new_tokens, ctx.args.concurrency))
    seconds = time.monotonic() - t0
    scores: dict = {}
    for (mode, task, target), (text, err) in zip(keys, answers):
        s = scores.setdefault(mode, {}).setdefault(task, {"correct": 0, "n": 0, "errors": 0})
        s["n"] += 1
        if err is not None:
            s["errors"] += 1
        elif normalize(text) == normalize(target):
            s["correct"] += 1
    return {"scores": scores, "seconds": seconds, "requests": len(items)}


# -- the protocol ----------------------------------------------------------------------------------------------


class Context:
    def __init__(self, args, out: Path, bench: Benchmark, state: State, model_dir: Path | None,
                 cache_dir: Path | None, job_config: dict):
        self.args, self.out, self.bench, self.state = args, out, bench, state
        self.model_dir, self.cache_dir, self.job_config = model_dir, cache_dir, job_config


def learn(client: httpx.Client, ctx: Context, method: str, name: str, rows_fn) -> None:
    """Make sure the server serves ``name`` learned by this method: done already, waiting for a job that
    survived a restart, or (again) submitted."""
    st, state = ctx.state.method(method), ctx.state
    if name in st["learned"]:
        if name not in served_tasks(client):
            raise HarnessError(f"[{method}] the state says {name!r} was learned but the server does not serve it "
                               f"(was {ctx.out / method / 'store'} changed?); use a fresh --out")
        return
    config = {**ctx.job_config, **METHODS[method]}
    job = None
    if name in st["submitted"]:
        r = client.get(f"/v1/jobs/{st['submitted'][name]}")
        job = r.json() if r.status_code == 200 else None
    if job is None or job["status"] in ("failed", "cancelled"):
        served = served_tasks(client)
        if name in served:  # learned, but the run stopped before recording it
            done = [j for j in list_jobs(client) if j["task"] == name and j["status"] == "succeeded"]
            job = done[-1] if done else {"id": None, "status": "succeeded", "metrics": served[name].get("metrics")}
            have = (served[name].get("method"), served[name].get("regularizer"))
            if have != (config["method"], config["regularizer"]):
                raise HarnessError(f"[{method}] the server already serves {name!r}, learned with "
                                   f"{served[name].get('method')}+{served[name].get('regularizer')}")
            log(f"[{method}] {name} is served already; taking it as learned")
        else:
            pending = [j for j in list_jobs(client) if j["task"] == name and j["status"] in ("queued", "running")]
            if pending:
                job = pending[-1]
                log(f"[{method}] {name}: job {job['id']} is {job['status']} (from before); waiting for it")
            else:
                if job is not None:
                    log(f"[{method}] {name}: job {job['id']} {job['status']} ({job.get('error')}); submitting again")
                accepted, rows = submit_task(client, state, name, rows_fn, config)
                job = {"id": accepted["job_id"], "status": accepted["status"]}
                st["submitted"][name] = job["id"]
                log(f"[{method}] learning {name}: {len(rows)} rows, job {job['id']}")
                state.step("submitted", method, task=name, job_id=job["id"], rows=len(rows))
    t0 = time.monotonic()
    if job is not None and job["status"] not in FINAL:
        job = wait_job(client, job["id"], f"[{method}] {name}")
    if job is None or job["status"] != "succeeded":
        raise HarnessError(f"[{method}] the job for {name!r} {job and job['status']}: {job and job.get('error')}")
    metrics = job.get("metrics") or {}
    st["submitted"][name] = job["id"]
    st["learned"][name] = {"job_id": job["id"], "wait_s": time.monotonic() - t0, "n_rows": job.get("n_rows"),
                           "train_s": metrics.get("train_seconds"), "steps": metrics.get("steps"),
                           "final_loss": metrics.get("final_loss"), "created_at": job.get("created_at"),
                           "started_at": job.get("started_at"), "finished_at": job.get("finished_at")}
    train_s = metrics.get("train_seconds")
    log(f"[{method}] learned {name}: job {job['id']}, {metrics.get('steps')} steps"
        + (f" in {train_s:.2f} s" if train_s is not None else "")
        + (f", density {metrics['density']:.4f}" if metrics.get("density") is not None else ""))
    state.step("learned", method, task=name, job_id=job["id"])


def _fmt_scores(scores: dict) -> str:
    return " | ".join(f"{mode}: " + ", ".join(f"{t} {100 * s['correct'] / s['n']:.1f}" for t, s in by.items())
                      for mode, by in scores.items())


def tagged_train(ctx: Context, task: str) -> list[dict]:
    return [{**r, "task": task} for r in ctx.bench.train(task, ctx.state.rejected(task))]


def eval_plan(modes, tasks: list[str]) -> list[tuple[str, str, str]]:
    """(mode, task, route) for every task seen so far: ``@stack``, or the task's own route."""
    return [(mode, t, "@stack" if mode == "stack" else t) for mode in modes for t in tasks]


def run_sequence(client: httpx.Client, url: str, ctx: Context, method: str) -> None:
    st = ctx.state.method(method)
    tasks = ctx.bench.tasks
    for i, task in enumerate(tasks):
        learn(client, ctx, method, task, lambda task=task: tagged_train(ctx, task))
        key = str(i)
        if key in st["evals"]:
            continue
        ev = evaluate(url, ctx, eval_plan(ctx.args.modes, tasks[:i + 1]))
        st["evals"][key] = ev
        snapshot(client, ctx, st)
        log(f"[{method}] after {task} ({ev['requests']} requests, {ev['seconds']:.1f} s): {_fmt_scores(ev['scores'])}")
        ctx.state.step("evaluated", method, after=task)


def run_multitask(client: httpx.Client, url: str, ctx: Context) -> None:
    st = ctx.state.method(MULTITASK)

    def mixed() -> list[dict]:
        rows = [r for t in ctx.bench.tasks for r in tagged_train(ctx, t)]
        random.Random(f"{ctx.args.seed}/multitask").shuffle(rows)
        return rows

    learn(client, ctx, MULTITASK, MULTITASK, mixed)
    if "0" not in st["evals"]:
        ev = evaluate(url, ctx, [("routing", t, MULTITASK) for t in ctx.bench.tasks])
        st["evals"]["0"] = ev
        log(f"[{MULTITASK}] ({ev['requests']} requests, {ev['seconds']:.1f} s): {_fmt_scores(ev['scores'])}")
        ctx.state.step("evaluated", MULTITASK, after="all")


def snapshot(client: httpx.Client, ctx: Context, st: dict) -> None:
    """The served adapters of this run (density, overlap, ...) and its jobs, as the server reports them."""
    ours = set(ctx.bench.tasks) | {MULTITASK}
    st["adapters"] = {name: {k: t.get(k) for k in ("order", "method", "regularizer", "nonzero_params",
                                                     "density", "overlap_ratio", "metrics")}
                      for name, t in served_tasks(client).items() if name in ours}
    st["jobs"] = [{k: j.get(k) for k in ("id", "task", "status", "error", "created_at", "started_at",
                                          "finished_at", "n_rows", "total_steps", "loss")}
                  for j in list_jobs(client) if j["task"] in ours]


def run_method(ctx: Context, method: str) -> None:
    st = ctx.state.method(method)
    if st["done"]:
        log(f"[{method}] done already")
        return
    t0 = time.monotonic()
    with MethodServer(ctx, method) as server:
        st.setdefault("server_start_s", []).append(server.start_s)
        with httpx.Client(base_url=server.url, timeout=httpx.Timeout(600.0, connect=30.0)) as client:
            if method == MULTITASK:
                run_multitask(client, server.url, ctx)
            else:
                run_sequence(client, server.url, ctx, method)
            snapshot(client, ctx, st)
    st["seconds_last_run"] = time.monotonic() - t0
    st["done"] = True
    ctx.state.save()
    log(f"[{method}] done")


# -- results ---------------------------------------------------------------------------------------------------


def build_results(ctx: Context, methods: list[str], started: float) -> dict:
    tasks = ctx.bench.tasks
    results: dict = {
        "order": ctx.bench.order, "tasks": tasks, "data": str(ctx.bench.folder),
        "model": str(ctx.model_dir) if ctx.model_dir else ctx.args.url,
        "settings": ctx.state.data["settings"], "job_config": ctx.job_config,
        "test_rows_used": {t: len(ctx.bench.test[t]) for t in tasks},
        "train_rows_used": {t: len(ctx.bench.train(t, ctx.state.rejected(t))) for t in tasks},
        "rejected_rows": ctx.state.data["rejected"], "methods": {},
        "accuracy": "exact match of the greedy generation, lower case and collapsed whitespace; fractions in [0, 1]",
        "bwt_for_one_task": None, "figure": "results.png",
    }
    for method in methods:
        st = ctx.state.data["methods"].get(method)
        if not st:
            continue
        m: dict = {"config": {**ctx.job_config, **METHODS[method]}, "complete": st["done"], "matrices": {},
                   "counts": {}, "OA": {}, "BWT": {}, "adapters": st.get("adapters", {}), "jobs": st.get("jobs", [])}
        evals = st["evals"]
        modes = ["routing"] if method == MULTITASK else list(ctx.args.modes)
        for mode in modes:
            rows, counts = [], []
            for i in range(len(tasks) if method != MULTITASK else 1):
                ev = evals.get(str(i))
                if ev is None:
                    break
                cols = tasks if method == MULTITASK else tasks[:i + 1]
                s = ev["scores"][mode]
                rows.append([s[t]["correct"] / s[t]["n"] for t in cols])
                counts.append([s[t] for t in cols])
            if not rows:
                continue
            m["matrices"][mode], m["counts"][mode] = rows, counts
            if method == MULTITASK:
                m["OA"][mode], m["BWT"][mode] = sum(rows[0]) / len(rows[0]), None
                m["accuracy"] = dict(zip(tasks, rows[0]))
            else:
                m["OA"][mode], m["BWT"][mode] = overall_accuracy(rows), backward_transfer(rows)
        m["timings"] = {
            "total_s": sum(st.get("server_start_s", [])) + sum(v.get("wait_s", 0) for v in st["learned"].values())
            + sum(ev["seconds"] for ev in evals.values()),
            "server_start_s": st.get("server_start_s", []),
            "learn": {t: {k: v.get(k) for k in ("wait_s", "train_s", "steps", "n_rows", "final_loss")}
                      for t, v in st["learned"].items()},
            "eval": {(tasks[int(i)] if method != MULTITASK else "all"): {"seconds": ev["seconds"],
                                                                         "requests": ev["requests"]}
                     for i, ev in evals.items()},
        }
        results["methods"][method] = m
    results["wall_s_this_run"] = time.monotonic() - started
    return results


def write_results(ctx: Context, methods: list[str], started: float) -> dict:
    results = build_results(ctx, methods, started)
    (ctx.out / "results.json").write_text(json.dumps(results, indent=1))
    (ctx.out / "results.md").write_text(markdown(results))
    if any(m["matrices"] for m in results["methods"].values()):
        plot(results, ctx.out / "results.png")
    return results


# -- command line ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cl", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--order", default="short_order_1")
    ap.add_argument("--data", help="benchmark folder (default: ../shared/data/cl-benchmark, else "
                    "benchmarks/data/cl-subset)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                    help=f"default: all ({', '.join(METHODS)})")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                    help="evaluation routes for the sequential methods (default: both)")
    ap.add_argument("--train-rows", type=int, default=200, help="training rows per task (0: all)")
    ap.add_argument("--test-rows", type=int, default=100, help="test rows per task (0: all)")
    ap.add_argument("--max-seq-len", type=int, default=512, help="rows longer than this (tokens) are skipped; also "
                    "the jobs' max_seq_len")
    ap.add_argument("--chars-per-token", type=float, default=3.5, help="for the length estimate of rows")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--config", default="{}", help="extra job config (JSON), merged into every job's config; "
                    "the harness sets eval_fraction 0 unless given here")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens generated per test row")
    ap.add_argument("--concurrency", type=int, default=16, help="generate requests in flight while evaluating")
    ap.add_argument("--out", default="cl-results", help="output folder (also the state and the stores)")
    ap.add_argument("--model", help="local model folder (default: the converted SmolLM2)")
    ap.add_argument("--cache-dir", help="the server's cache folder (default: the server's default)")
    ap.add_argument("--url", help="use this running server (one method only) instead of starting servers")
    ap.add_argument("--device", default="auto", help="the started servers' --device")
    ap.add_argument("--train-threads", type=int, default=os.cpu_count() or 1,
                    help="the started servers' --train-threads (default: every core; nothing is served while "
                    "a task trains)")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="extra argument of the started servers (repeat: --server-arg=--dtype --server-arg=bfloat16)")
    ap.add_argument("--seed", type=int, default=0, help="row sampling and the jobs' seed")
    ap.add_argument("--stop-after", type=int, help="stop after this many steps (job submitted, task learned, "
                    "evaluation done) in this run, to test resuming")
    args = ap.parse_args(argv)
    if args.url and len(args.methods) != 1:
        ap.error("--url serves one method's tasks: give exactly one --methods")
    try:
        extra = json.loads(args.config)
    except ValueError as e:
        ap.error(f"--config is not JSON: {e}")
    if not isinstance(extra, dict):
        ap.error("--config must be a JSON object")
    if {"method", "regularizer"} & set(extra):
        ap.error("--config cannot set method or regularizer: they are what --methods chooses")
    args.extra_config = extra
    return args


def run(argv: list[str] | None = None) -> dict:
    """The harness as a function: returns the results (also written to OUT). Raises StopRun at --stop-after."""
    args = parse_args(argv)
    started = time.monotonic()
    data = find_data(args.data)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    job_config = {"epochs": args.epochs, "learning_rate": args.lr, "batch_size": args.batch_size,
                  "max_seq_len": args.max_seq_len, "seed": args.seed, "eval_fraction": 0.0, **args.extra_config}
    settings = {"data": str(data), "order": args.order, "train_rows": args.train_rows, "test_rows": args.test_rows,
                "max_seq_len": args.max_seq_len, "chars_per_token": args.chars_per_token, "seed": args.seed,
                "job_config": job_config, "max_new_tokens": args.max_new_tokens,
                "model": str(Path(args.model).resolve()) if args.model else None,
                "modes": sorted(args.modes)}
    state = State(out / "state.json", settings)
    state.stop_after = args.stop_after
    state.save()
    bench = Benchmark(data, args.order, args.train_rows, args.test_rows, args.max_seq_len, args.chars_per_token,
                      args.seed)
    model_dir = cache_dir = None
    if not args.url:
        from server.config import Settings

        cache_dir = Path(args.cache_dir) if args.cache_dir else Settings().cache_dir
        if args.model:
            model_dir = Path(args.model).resolve()
        else:
            from server.model import convert_default_model

            model_dir = convert_default_model(cache_dir)
    ctx = Context(args, out, bench, state, model_dir, cache_dir, job_config)
    rows_dir = out / "rows"
    rows_dir.mkdir(exist_ok=True)
    for t in bench.tasks:
        (rows_dir / f"{t}.test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bench.test[t]))
    log(f"{bench.order}: {' -> '.join(bench.tasks)} from {data}; methods {', '.join(args.methods)}; out {out}")
    try:
        for method in args.methods:
            run_method(ctx, method)
    finally:
        for t in bench.tasks:
            rows = bench.train(t, state.rejected(t))
            (rows_dir / f"{t}.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        results = write_results(ctx, args.methods, started)
    for method, m in results["methods"].items():
        for mode in m["matrices"]:
            bwt = m["BWT"][mode]
            log(f"{method} ({mode}): OA {100 * m['OA'][mode]:.1f}, BWT {'–' if bwt is None else f'{100 * bwt:.1f}'}")
    log(f"results in {out / 'results.md'}")
    return results


def main(argv: list[str] | None = None) -> int:
    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term) if hasattr(signal, "SIGTERM") else None
    try:
        run(argv)
        return 0
    except StopRun as e:
        log(str(e))
        return 3
    except HarnessError as e:
        log(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted; run the same command again to continue")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
