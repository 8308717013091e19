"""How much this machine's speed moves on its own: the same ``@base`` decode step (the runner alone, no HTTP, no
adapter) run back to back for ``--seconds``, its mean time over windows of 1, 5, 10 and 30 s. For each window
length the table gives the spread of the windows' means (standard deviation over mean) and that of the ratio
of two neighbouring windows, which is what a comparison of two cases run one after the other inherits. No
step differs from another in its work: every difference is the machine's.

    python -m benchmarks.step_noise [--rows 8] [--seconds 120] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from .model_args import add_model_args, cpu_base

WINDOWS = (1, 5, 10, 30)


def spread(steps: list[tuple[float, float]], window: float) -> tuple[int, float, float, float] | None:
    """(windows, mean step ms, sd of the windows' means / mean, sd of neighbouring windows' ratio) for the
    (start s, duration s) ``steps``, the last (partial) window left out; None with fewer than 3 windows."""
    bins: dict[int, list[float]] = {}
    for start, spent in steps:
        bins.setdefault(int(start // window), []).append(spent)
    means = [statistics.mean(v) * 1000 for _, v in sorted(bins.items())][:-1]
    if len(means) < 3:
        return None
    ratios = [b / a for a, b in zip(means, means[1:])]
    mean = statistics.mean(means)
    return len(means), mean, statistics.stdev(means) / mean, statistics.stdev(ratios)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_noise", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--rows", type=int, default=8, help="decode rows in the step")
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)

    import torch

    from server.runner import ModelRunner

    base = cpu_base(args)
    runner = ModelRunner(base.model, max_rows=args.rows, max_len=256)
    prompt = list(range(100, 130))
    for row in range(args.rows):
        runner.prefill(row, prompt, None)
    tokens, positions = torch.full((args.rows,), 200), torch.full((args.rows,), len(prompt))
    for _ in range(5):  # warm-up
        runner.decode(tokens, positions, None)
    steps: list[tuple[float, float]] = []
    began = time.perf_counter()
    while time.perf_counter() - began < args.seconds:
        start = time.perf_counter()
        runner.decode(tokens, positions, None)
        steps.append((start - began, time.perf_counter() - start))
    print(f"{len(steps)} steps of {args.rows} rows, {torch.get_num_threads()} threads\n")
    print("| window (s) | windows | mean step (ms) | sd of the windows' means | sd of neighbours' ratio |")
    print("| --- | --- | --- | --- | --- |")
    for window in WINDOWS:
        row = spread(steps, window)
        if row:
            n, mean, sd, ratio_sd = row
            print(f"| {window} | {n} | {mean:.1f} | {sd * 100:.1f} % | {ratio_sd * 100:.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
