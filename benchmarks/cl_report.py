"""Continual-learning metrics and the report of ``python -m benchmarks.cl``: OA and BWT of accuracy matrices,
the Markdown summary and the figure.

An accuracy matrix ``a`` is lower triangular, as a list of rows: ``a[i][j]`` (j <= i) is the accuracy on task j's
test rows after learning task i, a fraction in [0, 1]. Row i has i + 1 entries.

- OA (average accuracy at the end) = mean_j a[T-1][j].
- BWT (backward transfer) = 1/(T-1) * sum_{j<T-1} (a[T-1][j] - a[j][j]): negative is forgetting. It is undefined
  for one task; these functions return ``None`` then (``null`` in JSON, "–" in Markdown).
"""
from __future__ import annotations

from pathlib import Path

Matrix = list[list[float]]


def check_matrix(a: Matrix) -> None:
    if not a:
        raise ValueError("empty accuracy matrix")
    for i, row in enumerate(a):
        if len(row) != i + 1:
            raise ValueError(f"row {i} of the accuracy matrix has {len(row)} entries, not {i + 1}")


def overall_accuracy(a: Matrix) -> float:
    """OA: the mean of the last row (every task's accuracy after the last task)."""
    check_matrix(a)
    return sum(a[-1]) / len(a[-1])


def backward_transfer(a: Matrix) -> float | None:
    """BWT = 1/(T-1) * sum_{j<T-1} (a[T-1][j] - a[j][j]); ``None`` for T = 1."""
    check_matrix(a)
    t = len(a)
    if t == 1:
        return None
    return sum(a[-1][j] - a[j][j] for j in range(t - 1)) / (t - 1)


def learned_accuracy(a: Matrix) -> float:
    """The mean accuracy of each task just after it was learned: mean_j a[j][j]. Where a task's route is the
    model it was trained and evaluated as, the routing OA equals this (and its BWT is 0)."""
    check_matrix(a)
    return sum(a[j][j] for j in range(len(a))) / len(a)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def markdown(results: dict) -> str:
    """The summary table (OA and BWT per method and mode, in percent), the last rows of the matrices, and each
    task's density and overlap."""
    tasks = results["tasks"]
    lines = [f"# Continual learning: {results['order']} ({' → '.join(tasks)})", "",
             f"Data `{results['data']}`, model `{results['model']}`; {results['settings']['train_rows']} training "
             f"and {results['settings']['test_rows']} test rows per task (test rows actually used: "
             f"{', '.join(f'{t} {n}' for t, n in results['test_rows_used'].items())}). Accuracy is exact match of the "
             "greedy generation (lower case, collapsed whitespace), in percent. OA: mean accuracy over all tasks after "
             "the last one; BWT: mean change of each earlier task's accuracy from just after it was learned to the "
             "end (negative is forgetting; – for one task); just after: mean accuracy of each task right after it "
             "was learned.", "",
             "| method | mode | OA | BWT | just after |", "| --- | --- | --- | --- | --- |"]
    for method, m in results["methods"].items():
        for mode, a in m.get("matrices", {}).items():
            name = method if m.get("complete", True) else f"{method} (incomplete: {len(a)} of {len(tasks)} tasks)"
            if method == "multitask" and not m.get("complete", True):
                name = f"{method} (incomplete)"
            lines.append(f"| {name} | {mode} | {_pct(m['OA'][mode])} | {_pct(m['BWT'][mode])} "
                         f"| {_pct(None if method == 'multitask' else learned_accuracy(a))} |")
    lines += ["", "Accuracy on each task after the last task (learned so far, if the run is not complete):", "",
              "| method | mode | " + " | ".join(tasks) + " |",
              "| --- | --- | " + " | ".join("---" for _ in tasks) + " |"]
    for method, m in results["methods"].items():
        for mode, a in m.get("matrices", {}).items():
            last = list(a[-1]) + [None] * (len(tasks) - len(a[-1]))
            lines.append(f"| {method} | {mode} | " + " | ".join(_pct(x) for x in last) + " |")
    lines += ["", "Each task's adapter: density (non-zero entries of the targeted weights, percent) / overlap with the "
              "earlier tasks' non-zero entries (percent of its own):", "",
              "| method | " + " | ".join(tasks) + " |", "| --- | " + " | ".join("---" for _ in tasks) + " |"]
    for method, m in results["methods"].items():
        info = m.get("adapters", {})
        if method == "multitask":
            continue
        cells = []
        for t in tasks:
            a = info.get(t)
            cells.append("–" if a is None else f"{100 * a['density']:.2f} / {100 * a['overlap_ratio']:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Wall time per method (s): " + ", ".join(
        f"{method} {m['timings'].get('total_s', 0):.0f}" for method, m in results["methods"].items()), ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """One heat map per method and mode (rows: after learning task i; columns: task j), the multi-task
    accuracies, OA and BWT side by side, and each task's density and overlap per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = results["tasks"]
    t = len(tasks)
    methods = results["methods"]
    cl_methods = [k for k in methods if k != "multitask"]
    heat = [(k, mode, a) for k in cl_methods for mode, a in methods[k].get("matrices", {}).items()]
    if "multitask" in methods and methods["multitask"].get("matrices"):
        for mode, a in methods["multitask"]["matrices"].items():
            heat.append(("multitask", mode, a))
    ncols = 2
    panels = len(heat) + 3  # the heat maps, OA/BWT bars, density, overlap
    nrows = (panels + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.2 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for k, (method, mode, a) in enumerate(heat):
        ax = flat[k]
        grid = np.full((len(a), t), np.nan)
        for i, row in enumerate(a):
            grid[i, :len(row)] = row
        ax.imshow(grid * 100, vmin=0, vmax=100, cmap="viridis", aspect="equal")
        for i in range(grid.shape[0]):
            for j in range(t):
                if not np.isnan(grid[i, j]):
                    v = grid[i, j] * 100
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="white" if v < 60 else "black",
                            fontsize=9)
        ax.set_xticks(range(t), tasks, rotation=30, ha="right", fontsize=8)
        if method == "multitask":
            ax.set_yticks([0], ["all tasks"], fontsize=8)
        else:
            ax.set_yticks(range(len(a)), [f"after {tasks[i]}" for i in range(len(a))], fontsize=8)
        oa, bwt = methods[method]["OA"][mode], methods[method]["BWT"][mode]
        ax.set_title(f"{method} ({mode})\nOA {_pct(oa)}  BWT {_pct(bwt)}", fontsize=10)
    ax = flat[len(heat)]
    names = [f"{method}\n({mode})" for method, mode, _ in heat]
    oas = [100 * methods[m]["OA"][mode] for m, mode, _ in heat]
    bwts = [100 * (methods[m]["BWT"][mode] or 0.0) for m, mode, _ in heat]
    x = np.arange(len(heat))
    ax.bar(x - 0.2, oas, 0.4, label="OA")
    ax.bar(x + 0.2, bwts, 0.4, label="BWT")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("percent")
    ax.set_title("OA and BWT (BWT of one task shown as 0)", fontsize=10)
    ax.legend(fontsize=7)
    series = (("density", "density (%)"), ("overlap_ratio", "overlap with earlier tasks (%)"))
    for col, (key, label) in enumerate(series):
        ax = flat[len(heat) + 1 + col]
        width = 0.8 / max(1, len(cl_methods))
        for n, method in enumerate(cl_methods):
            info = methods[method].get("adapters", {})
            values = [100 * info[x][key] if x in info else np.nan for x in tasks]
            ax.bar(np.arange(t) + (n - (len(cl_methods) - 1) / 2) * width, values, width, label=method)
        ax.set_xticks(range(t), tasks, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_title(f"{label} per task", fontsize=10)
        if col == 0 and cl_methods:
            ax.legend(fontsize=7)
    for ax in flat[panels:]:
        ax.axis("off")
    fig.suptitle(f"{results['order']}: accuracy (%) after learning each task", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
