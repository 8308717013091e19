"""Adapters as users have them, for the serving and scale benchmarks: trained by the server's trainer
(``server/training.py``) with the default config (JumpLoRA with the budget gate, rank 8 on q_proj and v_proj,
lr 1e-3, incremental) on rows of the shipped continual-learning subset, and stored as the worker stores them
(compact, with their parents):

  * a chain of ``chain`` tasks, each trained on top of those before it (parent ``@stack``): routes of 1 to
    ``chain`` adapters, as continual learning builds them;
  * ``independent`` tasks trained on the base alone (parent ``@base``): that many distinct adapters.

Each is trained for ``steps`` steps of ``batch`` rows (the only departures from the defaults, to keep the set quick
to make): training length changes the values of a delta, not its size, since the budget gate keeps exactly N_LoRA
entries whatever the steps. The set is made once into a folder of the cache, named by the base fingerprint and
these settings, and reused."""
from __future__ import annotations

import json
import time
from pathlib import Path

CL_SUBSET = Path(__file__).resolve().parent / "data" / "cl-subset"


def cl_rows() -> list[tuple[str, str]]:
    """The shipped subset's training rows, the tasks interleaved."""
    per_task = []
    for folder in sorted(p for p in CL_SUBSET.iterdir() if (p / "train.jsonl").is_file()):
        rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines() if line.strip()]
        per_task.append([(r["prompt"], r["completion"]) for r in rows])
    return [rows[i] for i in range(max(map(len, per_task))) for rows in per_task if i < len(rows)]


def trained_store(base, cache_dir: Path, chain: int = 8, independent: int = 64, steps: int = 1, batch: int = 4,
                  log=print) -> tuple[Path, list[str], list[str]]:
    """(store folder, chain task names in order, independent task names), made on first use."""
    import torch

    from adapters_store import AdapterStore
    from server.schemas import TrainConfig
    from server.training import train_adapter
    from server.worker import stored_form, task_meta

    folder = Path(cache_dir) / "bench-adapters" / f"{base.fingerprint[:12]}-c{chain}-i{independent}-s{steps}-b{batch}"
    names = ([f"chain-{i}" for i in range(chain)], [f"solo-{j}" for j in range(independent)])
    if (folder / ".complete").is_file():
        return folder, *names
    store = AdapterStore(folder)
    rows = cl_rows()
    start = time.monotonic()
    for k, name in enumerate(names[0] + names[1]):
        if store.exists(name):
            continue
        in_chain = k < chain
        cfg = TrainConfig(max_steps=steps, batch_size=batch, seed=k, parent="@stack" if in_chain else "@base")
        parents = [store.get(p) for p in names[0][:k]] if in_chain else []
        past: dict[str, torch.Tensor] = {}
        for stored in parents:
            for layer, delta in stored.deltas.items():
                past[layer] = past.get(layer, 0) + delta.to_dense()
        data = [rows[(k * steps * batch + i) % len(rows)] for i in range(steps * batch)]
        result = train_adapter(base.model, base.tokenizer, data, cfg, past=past or None)
        deltas = stored_form(cfg, result)
        nonzero = sum(d.nnz for d in deltas.values())
        metrics = {"nonzero": nonzero, "density": nonzero / result.metrics["total_entries"],
                   "n_lora": result.metrics["n_lora"], "steps": steps}
        store.put(name, deltas, task_meta(base.fingerprint, cfg, k, parents, metrics, job_id=None))
        log(f"trained {name} ({k + 1}/{chain + independent}, {time.monotonic() - start:.0f} s): {nonzero} non-zeros "
            f"(N_LoRA {result.metrics['n_lora']})")
    (folder / ".complete").write_text(json.dumps({"chain": names[0], "independent": names[1]}))
    return folder, *names


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.trained [--model PATH] [--chain 8] [--independent 64]``: make the set ahead of the
    benchmarks that use it."""
    import argparse

    from .model_args import add_model_args, model_and_cache

    ap = argparse.ArgumentParser(prog="python -m benchmarks.trained", description=main.__doc__)
    add_model_args(ap)
    ap.add_argument("--chain", type=int, default=8)
    ap.add_argument("--independent", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1)
    args = ap.parse_args(argv)
    from server.model import load_base

    model_dir, cache = model_and_cache(args)
    base = load_base(model_dir, cache, "cpu", "float32")
    print(trained_store(base, cache, args.chain, args.independent, args.steps)[0])
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
