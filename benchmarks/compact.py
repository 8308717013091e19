"""What storing a delta compact (bf16 values, ``SparseDelta.compact``) changes in what the model answers.

    python -m benchmarks.compact [--model PATH] [--train-rows 64] [--test-rows 60] [--out FILE]

For each task of the shipped continual-learning subset (``benchmarks/data/cl-subset``), an adapter is trained on
the base with the trainer's default config (batch 8, one epoch over ``--train-rows`` rows); then the test rows
are answered greedily (as the worker evaluates: transformers ``generate``, the delta merged into the weights) with
the trained fp32 delta and with its compact form, and the texts are compared one by one.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .model_args import add_model_args, model_and_cache
from .trained import CL_SUBSET


def read(path: Path, n: int) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["prompt"], r["completion"]) for r in rows[:n]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compact", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--train-rows", type=int, default=64)
    ap.add_argument("--test-rows", type=int, default=60)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    from server.model import load_base, merged_deltas
    from server.schemas import TrainConfig
    from server.training import exact_match, greedy_texts, train_adapter
    from server.worker import stored_form

    model_dir, cache = model_and_cache(args)
    base = load_base(model_dir, cache, "cpu", "float32")
    results = []
    lines = ["| task | test rows | identical greedy texts | exact match, fp32 delta | exact match, compact |",
             "| --- | --- | --- | --- | --- |"]
    for folder in sorted(p for p in CL_SUBSET.iterdir() if (p / "train.jsonl").is_file()):
        train = read(folder / "train.jsonl", args.train_rows)
        test = read(folder / "test.jsonl", args.test_rows)
        cfg = TrainConfig(batch_size=8, parent="@base")
        result = train_adapter(base.model, base.tokenizer, train, cfg)
        forms = {"fp32": result.deltas, "compact": {k: d.to_dense() for k, d in stored_form(cfg, result).items()}}
        texts = {}
        for form, deltas in forms.items():
            with merged_deltas(base.model, deltas):
                texts[form] = greedy_texts(base.model, base.tokenizer, test)
        same = sum(a == b for a, b in zip(texts["fp32"], texts["compact"]))
        row = {"task": folder.name, "test_rows": len(test), "identical": same,
               "em_fp32": exact_match(base.model, base.tokenizer, test, texts=texts["fp32"]),
               "em_compact": exact_match(base.model, base.tokenizer, test, texts=texts["compact"]),
               "nonzero": result.metrics["nonzero"], "n_lora": result.metrics["n_lora"]}
        results.append(row)
        lines.append(f"| {row['task']} | {row['test_rows']} | {same} | {row['em_fp32']:.3f} | {row['em_compact']:.3f} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
