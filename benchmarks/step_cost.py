"""What the adapters cost a decode step on the runner alone (no HTTP, no scheduling), measured paired: the same
step for ``@base``, for the 8-task chain (row i on the chain's task i mod 8, served with its adapters 0..k, as
the serving benchmark's case (b)), and for distinct adapters one a row (case (m)), in interleaved blocks of
``--steps`` steps. With ``--prompt N`` every step also carries a prompt chunk of N tokens for one more row (on
the chain's 5th task, or on an adapter of its own in the distinct case), as a step does while a new request
joins the batch. The adapters are those of ``benchmarks/trained.py`` (the trainer's default config).

    python -m benchmarks.step_cost [--rows 8 16 32] [--blocks 12] [--steps 3] [--prompt 0]

Per row count: each case's median step time, and its ratio to ``@base`` as ``benchmarks.serving`` pairs it
(each block's speed over the geometric mean of the ``@base`` blocks just before and after it), median over the
blocks. On a shared host this separates what the deltas cost from the host's own drift, which moves whole
serving cases by about 10 %.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from .model_args import add_model_args, cpu_base, model_and_cache

CASES = ("base", "chain", "distinct")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--blocks", type=int, default=12, help="blocks of each case per row count, interleaved")
    ap.add_argument("--steps", type=int, default=3, help="decode steps in a block")
    ap.add_argument("--prompt", type=int, default=0, help="tokens of a prompt chunk riding along in every step")
    ap.add_argument("--context", type=int, default=80, help="tokens in each decode row's cache")
    ap.add_argument("--chain", type=int, default=8)
    ap.add_argument("--adapters", type=int, default=64, help="independent adapters trained (the serving benchmark's "
                    "set; more than the most rows)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if max(args.rows) >= args.adapters:
        ap.error(f"--adapters ({args.adapters}) must be more than the most --rows ({max(args.rows)})")

    import torch

    from adapters_store import AdapterStore
    from server.bank import KernelTables, Plan, make_adapter
    from server.runner import Chunk, ModelRunner, projection_layout
    from server.sparse_kernel import load as load_kernel

    from .serving import paired_ratios
    from .trained import trained_store

    _, cache = model_and_cache(args)
    base = cpu_base(args)
    rows_max = max(args.rows)
    layout = projection_layout(base.model)
    folder, chain_names, solo_names = trained_store(base, cache, args.chain, args.adapters)
    store = AdapterStore(folder)
    chain = [make_adapter(name, store.get(name).deltas, layout) for name in chain_names]
    solo = [make_adapter(name, store.get(name).deltas, layout) for name in solo_names]
    kernel = load_kernel(cache / "kernels")
    tables = KernelTables(kernel) if kernel is not None else None
    runner = ModelRunner(base.model, max_rows=rows_max + 1, max_len=args.context + args.prompt + args.steps * 2 + 8)
    vocab = base.model.config.vocab_size
    for row in range(rows_max):
        runner.prefill(row, [(100 + row + i) % vocab for i in range(args.context)], None)
    print(f"kernel: {'compiled' if kernel is not None else 'none (torch fallback)'}; prompt chunk: {args.prompt} "
          f"tokens; {args.blocks} blocks of {args.steps} steps\n")
    print("| rows | @base step (ms) | chain step (ms) | distinct step (ms) | chain / @base (paired) "
          "| distinct / @base (paired) |\n| --- | --- | --- | --- | --- | --- |")
    for n in args.rows:
        routes = {"base": [()] * n, "chain": [tuple(chain[:i % len(chain) + 1]) for i in range(n)],
                  "distinct": [(solo[i],) for i in range(n)]}
        joining = {"base": (), "chain": tuple(chain[:min(5, len(chain))]), "distinct": (solo[n],)}
        segments = {case: [(n, n + args.prompt, joining[case])] if args.prompt else [] for case in CASES}
        plans = {case: Plan(routes[case], segments[case], runner.device, tables) for case in CASES}
        tokens, positions = torch.full((n,), 200 % vocab), torch.full((n,), args.context)
        chunks = [Chunk(n, [(300 + i) % vocab for i in range(args.prompt)], 0, True)] if args.prompt else []

        def step(case: str) -> None:
            runner.step(tokens, positions, chunks, plans[case])

        for case in CASES:  # warm-up: kernel tables, first touches
            step(case)
            step(case)
        runs = []
        for block in range(args.blocks):
            for case in CASES:
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(case)
                spent = (time.perf_counter() - start) / args.steps
                runs.append({"case": case, "concurrency": n, "repeat": block, "tok_s": 1.0 / spent})
        ms = {case: statistics.median(1000.0 / r["tok_s"] for r in runs if r["case"] == case) for case in CASES}
        paired = {case: statistics.median(v) for (case, _), v in paired_ratios({"runs": runs}).items()}
        print(f"| {n} | {ms['base']:.1f} | {ms['chain']:.1f} | {ms['distinct']:.1f} | {paired['chain']:.3f} "
              f"| {paired['distinct']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
