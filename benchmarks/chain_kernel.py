"""The CPU sparse-delta kernel alone on a chain of trained adapters: every layer's q/k/v group once per pass, for
``--rows`` decode rows spread evenly over the chain's routes (row i on task i mod 8, served with adapters 0..k),
as the serving benchmark's case (b) has them. With ``--flush-mb`` a buffer of that size is written between two
calls, so that the deltas come from memory as in a decode step (whose base weights evict them from the caches);
only the kernel calls are timed. The adapters are those of ``benchmarks/trained.py`` (trained with the default
config), served as the engine serves them.

    python -m benchmarks.chain_kernel [--rows 1 8 16 32] [--flush-mb 16] [--passes 6]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from .model_args import add_model_args, model_and_cache


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.chain_kernel", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--chain", type=int, default=8)
    ap.add_argument("--flush-mb", type=int, default=16, help="MB written between two calls (0: none)")
    ap.add_argument("--passes", type=int, default=6, help="passes over the layers per row count")
    args = ap.parse_args(argv)

    import torch

    from server.bank import KernelTables, Plan, make_adapter
    from server.model import load_base
    from server.runner import projection_layout
    from server.sparse_kernel import load as load_kernel

    from .trained import trained_store
    from adapters_store import AdapterStore

    model_dir, cache = model_and_cache(args)
    kernel = load_kernel(cache / "kernels")
    if kernel is None:
        print("no compiled kernel on this machine (see the log)", file=sys.stderr)
        return 1
    base = load_base(model_dir, cache, "cpu", "float32")
    layout = projection_layout(base.model)
    folder, chain_names, _ = trained_store(base, cache, args.chain)
    store = AdapterStore(folder)
    chain = [make_adapter(name, store.get(name).deltas, layout) for name in chain_names]
    groups = [layers for layers, _ in layout if layers in chain[0].groups]
    tables = KernelTables(kernel)
    junk = torch.zeros(args.flush_mb * (1 << 18))  # fp32: 1 MB = 2^18 entries
    print("| rows | µs per layer group (median of passes) | min |\n| --- | --- | --- |")
    for n in args.rows:
        plan = Plan([tuple(chain[:i % len(chain) + 1]) for i in range(n)], (), None, tables)
        calls = [plan._prepare(layers)[0] for layers in groups]  # (table, layout) per group
        d_in = chain[0].groups[groups[0]].shape[1]
        d_out = max(table.d_out for table, _ in calls)
        x, y = torch.randn(n, d_in), torch.zeros(n, d_out)
        scratch = tables.scratch(max(kernel.scratch_size(table, at) for table, at in calls))
        per_pass = []
        for _ in range(args.passes + 1):
            spent = 0.0
            for table, at in calls:
                if junk.numel():
                    junk.add_(1.0)
                start = time.perf_counter()
                kernel.add_at(table, at, x, y, scratch)
                spent += time.perf_counter() - start
            per_pass.append(spent / len(calls) * 1e6)
        per_pass = per_pass[1:]  # the first pass warms up
        print(f"| {n} | {statistics.median(per_pass):.0f} | {min(per_pass):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
