"""Build the shipped continual-learning subset ``benchmarks/data/cl-subset/`` from the full benchmark.

    python -m benchmarks.make_cl_subset [--src ../shared/data/cl-benchmark] [--out benchmarks/data/cl-subset]

The subset has the four tasks of the standard benchmark (dbpedia, amazon, yahoo, agnews), the orders
``short_order_1..3`` and, per task, ``task.json`` (copied), ``train.jsonl`` and ``test.jsonl`` in the benchmark's own
row format ``{"prompt", "completion", "label"}``. Each split is balanced over labels: the same number of rows per
label (``--train-rows`` / ``--test-rows`` divided by the task's number of labels, rounded down; the defaults 420 and
280 divide evenly for 4, 5, 10 and 14 labels), drawn by a seeded shuffle of each label's rows, then shuffled
together (seeded). Rows whose prompt plus completion is longer than ``--max-chars`` characters (default 1500,
about 350-500 SmolLM2 tokens) are left out before sampling, so that every row fits the default ``max_seq_len`` of
512 tokens; apart from that cap, no preference is given to short prompts (the length distribution is the
benchmark's). The output depends only on the source files and the options: running it again writes the same bytes.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from collections import defaultdict
from pathlib import Path

TASKS = ["dbpedia", "amazon", "yahoo", "agnews"]
ORDERS = ["short_order_1", "short_order_2", "short_order_3"]
HERE = Path(__file__).resolve().parent
DEFAULT_SRC = HERE.parents[1] / "shared" / "data" / "cl-benchmark"
DEFAULT_OUT = HERE / "data" / "cl-subset"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def label_of(row: dict) -> str:
    return row.get("label") or row["completion"].strip()


def balanced_sample(rows: list[dict], n: int, max_chars: int, seed: str) -> list[dict]:
    """``n // labels`` rows per label (fewer if a label has fewer short-enough rows), seeded; shuffled together."""
    by_label: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if len(row["prompt"]) + len(row["completion"]) <= max_chars:
            by_label[label_of(row)].append(row)
    labels = sorted({label_of(r) for r in rows})
    per_label = n // len(labels)
    out = []
    for label in labels:
        pool = list(by_label[label])
        random.Random(f"{seed}/{label}").shuffle(pool)
        if len(pool) < per_label:
            print(f"  warning: label {label!r} has only {len(pool)} rows of at most {max_chars} characters",
                  file=sys.stderr)
        out += pool[:per_label]
    random.Random(f"{seed}/all").shuffle(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"], "label": label_of(r)},
                                       ensure_ascii=False) + "\n" for r in rows))


def build(src: Path, out: Path, train_rows: int, test_rows: int, max_chars: int, seed: int) -> None:
    orders = json.loads((src / "orders.json").read_text())
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for task in TASKS:
        (out / task).mkdir()
        shutil.copyfile(src / task / "task.json", out / task / "task.json")
        for split, n in (("train", train_rows), ("test", test_rows)):
            rows = balanced_sample(read_jsonl(src / task / f"{split}.jsonl"), n, max_chars, f"{seed}/{task}/{split}")
            write_jsonl(out / task / f"{split}.jsonl", rows)
            print(f"{task}/{split}: {len(rows)} rows", flush=True)
    (out / "orders.json").write_text(json.dumps({k: orders[k] for k in ORDERS}, indent=1) + "\n")
    (out / "README.md").write_text(
        "# cl-subset\n\nA small, label-balanced subset of the standard continual-learning benchmark "
        f"({', '.join(TASKS)}; orders {', '.join(ORDERS)}), made by `python -m benchmarks.make_cl_subset` "
        f"(train {train_rows} and test {test_rows} rows per task, rows over {max_chars} characters left out, "
        f"seed {seed}). Used by `python -m benchmarks.cl` when `../shared/data/cl-benchmark` is absent.\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.make_cl_subset", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC, help="the full benchmark folder")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the subset folder (replaced)")
    ap.add_argument("--train-rows", type=int, default=420)
    ap.add_argument("--test-rows", type=int, default=280)
    ap.add_argument("--max-chars", type=int, default=1500, help="leave out longer rows (prompt + completion)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not (args.src / "orders.json").is_file():
        raise SystemExit(f"no benchmark at {args.src} (orders.json missing); pass --src")
    build(args.src, args.out, args.train_rows, args.test_rows, args.max_chars, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
