"""Helpers shared by tests (importable because tests/conftest.py puts this folder on sys.path)."""
from __future__ import annotations

import time

import httpx
import torch

from adapters_store import AdapterStore, LowRankDelta, SparseDelta


def random_sparse(shape, density: float, seed: int, scale: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g) * scale
    return values * (torch.rand(shape, generator=g) < density)


def task_deltas(model, density: float, seed: int, targets=("q_proj", "v_proj")) -> dict[str, torch.Tensor]:
    """Random dense-form deltas of the given density for the targeted layers of ``model``."""
    out = {}
    for i, (name, mod) in enumerate(model.named_modules()):
        if name.rsplit(".", 1)[-1] in targets and isinstance(mod, torch.nn.Linear):
            out[name] = random_sparse(tuple(mod.weight.shape), density, seed * 1000 + i)
    return out


def put_task(store: AdapterStore, name: str, deltas: dict[str, torch.Tensor], fingerprint: str, order: int,
             lowrank: dict | None = None, method: str = "jumplora", parents: list[str] = (),
             compact: bool = True) -> dict:
    """Store a task as the trainer does (compact sparse deltas, or low rank); ``parents``: the stored tasks it
    counts as trained on, in order (its route before itself)."""
    stored = {k: (LowRankDelta(*lowrank[k]) if lowrank else SparseDelta.from_dense(v, compact=compact))
              for k, v in deltas.items()}
    nz = sum(int((v != 0).sum()) for v in deltas.values())
    total = sum(v.numel() for v in deltas.values())
    meta = {"base_fingerprint": fingerprint, "method": method, "regularizer": "incremental", "order": order,
            "targets": ["q_proj", "v_proj"], "rank": 8, "alpha": 32.0, "config": {},
            "parents": [{"task": p, "sha256": store.manifest(p)["tensors_sha256"]} for p in parents],
            "metrics": {"density": nz / total, "nonzero": nz}}
    return store.put(name, stored, meta)


def served_deltas(store: AdapterStore, name: str) -> dict[str, torch.Tensor]:
    """A stored task's own delta per layer, dense, exactly as it is served (after the compact form's rounding)."""
    return {k: d.to_dense() for k, d in store.get(name).deltas.items()}


def make_bank(model, folder, fingerprint: str = "test"):
    """A bank state (through a real store in ``folder`` and the registry) with one task in each representation,
    sparse (3 %), dense (70 %) and low rank, and a task trained on top of the sparse one ("chain-d", route
    sparse-a + chain-d); plus the dense-form reference delta of every name (tasks' routes, @stack, @base) for
    merged-model checks."""
    from server.bank import BASE, STACK
    from server.metrics import Metrics
    from server.registry import Registry
    from server.runner import projection_layout

    store = AdapterStore(folder)
    g = torch.Generator().manual_seed(3)
    sparse = task_deltas(model, 0.03, seed=1)
    lowrank = {name: (torch.randn(4, d.shape[1], generator=g) * 0.1, torch.randn(d.shape[0], 4, generator=g) * 0.1,
                      2.0) for name, d in sparse.items()}
    put_task(store, "sparse-a", sparse, fingerprint, 0)
    put_task(store, "dense-b", task_deltas(model, 0.70, seed=2), fingerprint, 1)
    put_task(store, "lowrank-c", sparse, fingerprint, 2, lowrank=lowrank, method="lora")
    put_task(store, "chain-d", task_deltas(model, 0.03, seed=4), fingerprint, 3, parents=["sparse-a"])
    device = next(model.parameters()).device  # (the CUDA tests' bank is on the GPU)
    registry = Registry(store, model, fingerprint, device, Metrics(), projection_layout(model))
    state = registry.refresh()
    own = {name: {k: d.to(device) for k, d in served_deltas(store, name).items()} for name in state.tasks}
    refs = {name: {k: sum(own[t][k] for t in info.route if k in own[t]) for k in own[name]}
            for name, info in state.tasks.items()}
    refs[STACK] = {k: sum(d[k] for d in own.values()) for k in sparse}
    refs[BASE] = {}
    return state, refs


FRUITS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "grape", "mango", "peach", "melon", "berry",
          "cherry", "lemon", "guava", "papaya"]
VEGETABLES = ["leek", "kale", "corn", "okra", "bean", "pea", "beet", "chard", "onion", "garlic", "radish", "turnip",
              "carrot", "celery", "potato", "squash"]


def toy_rows() -> list[dict]:
    """A two-class toy task a tiny random model can learn and generalise: a marker in the prompt gives the
    class word, so held-out rows (unseen items) are answerable."""
    rows = [{"prompt": f"item: {w} (f)\nclass:", "completion": " fruit"} for w in FRUITS]
    rows += [{"prompt": f"item: {w} (v)\nclass:", "completion": " veg"} for w in VEGETABLES]
    return rows


TOY_CONFIG = {"learning_rate": 1e-2, "batch_size": 8, "epochs": 40, "eval_fraction": 0.25, "seed": 3}


FINAL_JOB_STATES = ("succeeded", "failed", "cancelled")


def wait_job(url: str, job_id: str, states=FINAL_JOB_STATES, timeout: float = 180, poll: float = 0.2, log=None) -> dict:
    """Poll ``GET /v1/jobs/{job_id}`` until the job is in one of ``states``; its record. On timeout, the error
    carries the last record and, given ``log`` (a callable), the server's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        if job["status"] in states:
            return job
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} still {job['status']}: {job}" + (f"\n{log()}" if log else ""))


def reproduce_heldout(url: str, task: str, rows: list[dict], config: dict) -> float:
    """Exact match of greedy generations naming ``task`` over the rows the job held out (the worker's split)."""
    from server.training import normalize
    from server.worker import split_rows

    _, held = split_rows([(r["prompt"], r["completion"]) for r in rows], config["eval_fraction"], config["seed"])
    hits = 0
    for prompt, completion in held:
        r = httpx.post(url + "/v1/generate", timeout=60,
                       json={"task": task, "prompt": prompt, "max_new_tokens": len(completion) + 2})
        hits += normalize(r.json()["text"]) == normalize(completion)
    return hits / len(held)
