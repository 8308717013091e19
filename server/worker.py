"""The training worker: one process per job (``python -m server.worker ...``), started by the job manager.

It loads its own copy of the base model (on a GPU too: a second copy of a 135M model costs ~0.3 GB, and a
process of its own can be killed to cancel a job without touching the serving process; sharing CUDA memory
across processes would tie their lifetimes together), merges the current stack into its targeted weights,
trains the new task's adapter, evaluates it on the held-out rows, and writes it to the store atomically.
It reports on stdout, one JSON object per line: ``progress`` events, then ``done`` or ``error``."""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def split_rows(rows: list[tuple[str, str]], fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded shuffle; at least one training row."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(round(len(rows) * fraction), len(rows) - 1)
    held = [rows[i] for i in order[:n_eval]]
    return [rows[i] for i in order[n_eval:]], held


def die_with_parent() -> None:
    """Linux: get SIGKILL when the server process dies, so that no orphan goes on training (and then writes an
    adapter for a job the restarted server has already marked interrupted)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def stored_form(cfg, result) -> dict:
    """A trained adapter as the store keeps it: JumpLoRA deltas compact (int32 positions, bf16 values), a dense
    LoRA's factors as they are."""
    from adapters_store import LowRankDelta, SparseDelta

    if cfg.method == "jumplora":
        return {k: SparseDelta.from_dense(d, compact=True) for k, d in result.deltas.items()}
    return {k: LowRankDelta(a, b, s) for k, (a, b, s) in result.lowrank.items()}


def task_meta(fingerprint: str, cfg, order: int, parents: list, metrics: dict, job_id: str | None) -> dict:
    """The manifest fields of a trained task; ``parents``: the stored adapters of its route before it."""
    return {
        "base_fingerprint": fingerprint, "method": cfg.method, "regularizer": cfg.regularizer,
        "rank": cfg.rank, "alpha": cfg.alpha, "targets": cfg.targets, "threshold_mode": cfg.threshold_mode,
        "order": order, "parent": cfg.parent, "config": cfg.model_dump(), "metrics": metrics, "job_id": job_id,
        "parents": [{"task": p.name, "sha256": p.manifest["tensors_sha256"]} for p in parents],
    }


def parent_route(store, parent: str, fingerprint: str, shapes: dict) -> list:
    """The stored adapters a new task trains on and is served with (``TrainConfig.parent``), in order: every
    readable task for ``@stack``, none for ``@base``, else the named task's own route (its parents, then it),
    each checked to be the adapter that task was trained on."""
    from adapters_store import StoreError

    if parent == "@base":
        return []
    if parent == "@stack":
        route = []
        for name in store.names():
            try:
                route.append(store.get(name, fingerprint=fingerprint, layer_shapes=shapes))
            except StoreError:
                continue  # not served either
        return route
    try:
        return store.lineage(parent, fingerprint=fingerprint, layer_shapes=shapes)
    except StoreError as e:
        raise ValueError(f"config.parent: {e}") from None


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    ap = argparse.ArgumentParser(prog="python -m server.worker")
    ap.add_argument("--job", required=True, help="the job record (JSON)")
    ap.add_argument("--data", required=True, help="the dataset (JSONL)")
    ap.add_argument("--store", required=True)
    ap.add_argument("--model", required=True, help="the base model folder")
    ap.add_argument("--fingerprint", required=True, help="the serving base's fingerprint")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        run(args)
    except Exception as e:  # the message goes to the job (read-key holders see it), the traceback to the log
        traceback.print_exc()
        emit("error", message=user_message(e, {args.store: "<store>", args.model: "<model>"}))
        return 1
    return 0


def user_message(e: Exception, folders: dict[str, str]) -> str:
    """``Type: message`` with the server's folders named, not shown (``<store>``, ``<model>``)."""
    message = f"{type(e).__name__}: {e}"
    for folder, name in folders.items():
        for form in sorted({str(Path(folder).resolve()), str(folder)}, key=len, reverse=True):
            message = message.replace(form, name)
    return message[:1000]


def run(args) -> None:
    import torch

    from adapters_store import AdapterStore

    from .model import load_base, merged_deltas
    from .schemas import TrainConfig
    from .training import Progress, exact_match, greedy_texts, train_adapter

    torch.set_num_threads(args.threads)
    job = json.loads(Path(args.job).read_text())
    cfg = TrainConfig(**job["config"])
    task = job["task"]
    rows = [(r["prompt"], r["completion"]) for r in map(json.loads, Path(args.data).read_text().splitlines())]
    train, held = split_rows(rows, cfg.eval_fraction, cfg.seed)

    base = load_base(Path(args.model), Path(args.store), args.device, args.dtype)
    if base.fingerprint != args.fingerprint:
        raise RuntimeError("the worker's base model differs from the server's (fingerprint mismatch)")
    store = AdapterStore(args.store)
    shapes = {n: tuple(m.weight.shape) for n, m in base.model.named_modules() if isinstance(m, torch.nn.Linear)}
    parents = parent_route(store, cfg.parent, base.fingerprint, shapes)
    past: dict[str, torch.Tensor] = {}  # layer -> Σ of the parents' deltas, exactly as they are served
    for stored in parents:
        for layer, delta in stored.deltas.items():
            dense = delta.to_dense()
            past[layer] = past[layer] + dense if layer in past else dense
    orders = [int(m["order"]) for m in store.list()]
    order = max(orders) + 1 if orders else 0

    start = time.monotonic()

    def progress(p: Progress) -> None:
        emit("progress", step=p.step, total_steps=p.total_steps, loss=p.loss, density=p.density,
             threshold=p.threshold, tokens=p.tokens, seconds=time.monotonic() - start)

    result = train_adapter(base.model, base.tokenizer, train, cfg, past=past or None, on_progress=progress)
    seconds = time.monotonic() - start
    stored_deltas = stored_form(cfg, result)  # evaluated below exactly as it will be served
    deltas = {k: d.to_dense() for k, d in stored_deltas.items()}
    nonzero = sum(int((d != 0).sum()) for d in deltas.values())
    overlap = sum(int(((d != 0) & (past[k] != 0)).sum()) for k, d in deltas.items() if k in past)
    metrics = {
        "final_loss": result.metrics["final_loss"], "steps": result.metrics["steps"],
        "nonzero": nonzero, "density": nonzero / result.metrics["total_entries"],
        "overlap_ratio": overlap / nonzero if nonzero else 0.0, "n_lora": result.metrics["n_lora"],
        "train_rows": len(train), "heldout_rows": len(held), "train_seconds": seconds,
        "train_tokens": result.metrics["train_tokens"], "train_tokens_per_s": result.metrics["train_tokens"] / seconds,
        "thresholds": result.metrics["thresholds"],
    }
    if held:  # on the task's route (its parents' deltas and its own), the model a request naming it gets
        metrics["heldout_exact_match_base"] = exact_match(base.model, base.tokenizer, held)
        route = {k: deltas.get(k, 0) + past.get(k, 0) for k in set(deltas) | set(past)}
        with merged_deltas(base.model, route):
            texts = greedy_texts(base.model, base.tokenizer, held)
        metrics["heldout_exact_match"] = exact_match(base.model, base.tokenizer, held, texts=texts)
        if cfg.method == "jumplora":  # what storing compact changed: the same rows with the fp32 delta
            full = {k: result.deltas.get(k, 0) + past.get(k, 0) for k in set(deltas) | set(past)}
            with merged_deltas(base.model, full):
                texts_fp32 = greedy_texts(base.model, base.tokenizer, held)
            metrics["heldout_texts_changed_by_compact"] = sum(a != b for a, b in zip(texts, texts_fp32))
    store.put(task, stored_deltas, task_meta(base.fingerprint, cfg, order, parents, metrics, job["id"]))
    emit("done", metrics=metrics)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
