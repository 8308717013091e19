"""Decode-step time by delta representation: 8 tasks with random deltas of density d on q_proj and v_proj, each
row of the batch on one of them (evenly), stored compact (bf16 values), served sparse (through torch's CSR
products, one per adapter, and through the compiled kernel of ``server/sparse_kernel.py``) or dense, against the
base model alone. The runner is driven directly (no HTTP, no scheduler), and the cases alternate in short blocks
so that a slow stretch of a shared machine hits each alike; the figure is the median over the blocks.

    python -m benchmarks.deltas [--model PATH] [--rows 1 16] [--density 0.035 0.2 0.39 0.6]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from .model_args import add_model_args, model_and_cache

N_TASKS = 8


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.deltas", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--density", type=float, nargs="+", default=[0.035, 0.2, 0.39, 0.6])
    ap.add_argument("--blocks", type=int, default=8, help="blocks of --steps steps per case")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-kernel", action="store_true", help="leave out the compiled kernel's case")
    args = ap.parse_args(argv)

    import torch

    from adapters_store import SparseDelta
    from server.bank import Plan, make_adapter
    from server.model import load_base, target_linears
    from server.runner import ModelRunner, projection_layout
    from server.sparse_kernel import load as load_kernel

    model_dir, cache = model_and_cache(args)
    kernel = None if args.no_kernel else load_kernel(cache / "kernels")
    base = load_base(model_dir, cache, "cpu", "float32")
    layers = target_linears(base.model, ["q_proj", "v_proj"])
    layout = projection_layout(base.model)
    most = max(args.rows)
    runner = ModelRunner(base.model, max_rows=most, max_len=256)
    prompt = list(range(100, 130))
    for row in range(most):  # every row holds a 30-token prompt
        runner.prefill(row, prompt, None)
    g = torch.Generator().manual_seed(args.seed)
    lines = ["| rows | density | base (ms) | sparse, torch (ms) | sparse, kernel (ms) | dense (ms) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for density in args.density:
        deltas = [{name: torch.randn(m.weight.shape, generator=g) * 1e-3
                   * (torch.rand(m.weight.shape, generator=g) < density) for name, m in layers.items()}
                  for _ in range(N_TASKS)]
        adapters = {}  # kind -> one adapter per task, its deltas compact (bf16 values) as the trainer stores them
        for kind, dense_above in (("sparse", 1.0), ("dense", 0.0)):
            adapters[kind] = [make_adapter(f"task-{t}", {name: SparseDelta.from_dense(d, compact=True)
                                                         for name, d in deltas[t].items()},
                                           layout, dense_above=dense_above) for t in range(N_TASKS)]
        for n in args.rows:
            plans = {"base": None}
            for kind, made in adapters.items():
                routes = [(made[i % N_TASKS],) for i in range(n)]
                plans[kind] = Plan(routes, (), runner.device)
                if kind == "sparse" and kernel is not None:
                    plans["kernel"] = Plan(routes, (), runner.device, kernel)
            tokens = torch.full((n,), 200)
            times: dict[str, list[float]] = {k: [] for k in plans}
            for _ in range(args.blocks):
                for kind, plan in plans.items():
                    runner.decode(tokens, torch.full((n,), len(prompt)), plan)  # first use outside the clock
                    start = time.perf_counter()
                    for k in range(args.steps):
                        runner.decode(tokens, torch.full((n,), len(prompt) + k), plan)
                    times[kind].append((time.perf_counter() - start) / args.steps * 1000)
            med = {k: statistics.median(v) for k, v in times.items()}
            with_kernel = f"{med['kernel']:.1f}" if "kernel" in med else "-"
            lines.append(f"| {n} | {density} | {med['base']:.1f} | {med['sparse']:.1f} | {with_kernel} "
                         f"| {med['dense']:.1f} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
