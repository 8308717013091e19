"""Base-weight products of one decode step, by kernel: every projection of every block plus the output head, at
several batch sizes, as (1) torch's ``F.linear`` per projection, (2) oneDNN-packed per projection, (3)
oneDNN-packed with q/k/v and gate/up fused (what the engine runs, ``server/kernels.py``).

    python -m benchmarks.kernels [--model PATH] [--rows 1 8 16 32] [--steps 30]

Times are the mean over --steps of one pass over all the products, on random inputs of the right widths."""
from __future__ import annotations

import argparse
import sys
import time

from .model_args import add_model_args, cpu_base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from server.kernels import Linear, onednn_available
    from server.runner import ModelRunner

    base = cpu_base(args)
    runner = ModelRunner(base.model, max_rows=1, max_len=16)
    fused = [lin for group in runner.groups for _, lin in group.values()] + [runner.lm_head]
    parts = [(w, b) for lin in fused for w, b in lin.parts]  # every projection on its own
    # name -> [(d_in, product)]
    kernels = {"F.linear": [(w.shape[1], lambda x, w=w, b=b: F.linear(x, w, b)) for w, b in parts]}
    if onednn_available():
        kernels["oneDNN"] = [(w.shape[1], Linear([w], [b])) for w, b in parts]
        kernels["oneDNN fused"] = [(lin.parts[0][0].shape[1], lin) for lin in fused]
    print(f"{model_dir.name}: {len(parts)} projections a step, fused into {len(fused)}; "
          f"{torch.get_num_threads()} threads", flush=True)
    lines = ["| kernel | " + " | ".join(f"{n} rows (ms)" for n in args.rows) + " |",
             "| --- |" + " --- |" * len(args.rows)]
    with torch.inference_mode():
        for name, products in kernels.items():
            cells = []
            for n in args.rows:
                inputs = {d_in: torch.randn(n, d_in) for d_in, _ in products}

                def one_pass() -> None:
                    for d_in, product in products:
                        product(inputs[d_in])
                for _ in range(3):
                    one_pass()
                start = time.perf_counter()
                for _ in range(args.steps):
                    one_pass()
                cells.append(f"{(time.perf_counter() - start) / args.steps * 1000:.1f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
