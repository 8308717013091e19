"""Trace per-task-routing answers that change between evaluations to floating-point ties (or show they are not).

    python -m benchmarks.cl_ties --store OUT/METHOD/store --task dbpedia --rows OUT/rows/dbpedia.test.jsonl

An adapter never changes once stored, so a task's answers through its own route should never change either; but
the engine batches rows differently from one evaluation to the next (other rows, other prompt chunks), and fp32
sums in another order differ in the last bits. Where the top two logits of a greedy step are that close, the
chosen token can flip. This script:

1. starts a server on the store and asks the task's route for every test prompt several times: once alone
   (one request in flight) and ``--repeats`` times mixed with ``@stack`` requests in a shuffled order (16 in
   flight, as the harness evaluates), and lists the prompts whose answer was not always the same;
2. for each of those, decodes greedily with a plain transformers copy of the base whose targeted weights carry the
   task's route (its parents' deltas and its own) (the merged reference, one row, no batching) and reports the gap between the top two logits at
   every step. A flip at a step whose gap is within floating-point noise (far below 1e-2 on fp32 logits of this
   size) is a tie; a flip at a step with a wide gap would be a bug.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from pathlib import Path

from .cl import _generate_all, normalize
from .loopback import ServerProcess


def served_answers(url: str, task: str, prompts: list[str], max_new_tokens: int, repeats: int,
                   seed: int) -> list[list[str]]:
    """Per prompt, the answer of each evaluation: alone, then ``repeats`` shuffled mixes with ``@stack``."""
    seen: list[list[str]] = [[] for _ in prompts]
    alone = asyncio.run(_generate_all(url, [(task, p) for p in prompts], max_new_tokens, 1))
    for k, (text, _) in enumerate(alone):
        seen[k].append(text)
    rng = random.Random(seed)
    for _ in range(repeats):
        items = [(task, k) for k in range(len(prompts))] + [("@stack", k) for k in range(len(prompts))]
        rng.shuffle(items)
        out = asyncio.run(_generate_all(url, [(r, prompts[k]) for r, k in items], max_new_tokens, 16))
        for (route, k), (text, _) in zip(items, out):
            if route == task:
                seen[k].append(text)
    return seen


def reference_gaps(model_dir: Path | None, cache_dir: Path, store: Path, task: str, prompts: list[str],
                   max_new_tokens: int) -> list[dict]:
    """Greedy decode of each prompt on the merged reference; the top-2 logit gap at every step."""
    import torch

    from adapters_store import AdapterStore
    from server.model import load_base, merged_deltas

    base = load_base(model_dir, cache_dir, "cpu", "float32")
    shapes = {n: tuple(m.weight.shape) for n, m in base.model.named_modules() if isinstance(m, torch.nn.Linear)}
    route = AdapterStore(store).lineage(task, fingerprint=base.fingerprint, layer_shapes=shapes)  # as served
    merged: dict = {}
    for stored in route:
        for layer, d in stored.deltas.items():
            merged[layer] = merged.get(layer, 0) + d.to_dense()
    tok, out = base.tokenizer, []
    with merged_deltas(base.model, merged), torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt")["input_ids"]  # (1, T)
            steps = []
            for _ in range(max_new_tokens):
                logits = base.model(ids).logits[0, -1]  # (V,)
                top = torch.topk(logits, 2)
                steps.append({"token": tok.decode([int(top.indices[0])]), "runner_up": tok.decode([int(top.indices[1])]),
                              "gap": float(top.values[0] - top.values[1])})
                if int(top.indices[0]) == tok.eos_token_id:
                    break
                ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
            out.append({"text": "".join(s["token"] for s in steps if s["token"] != tok.eos_token), "steps": steps})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--rows", type=Path, required=True, help="the task's test rows (JSONL with prompt, completion)")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "jumplora")
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the findings as JSON here")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the server and the reference")
    args = ap.parse_args(argv)

    rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    prompts = [r["prompt"] for r in rows]
    extra = ["--threads", str(args.threads)] if args.threads else []
    server = ServerProcess(args.model, args.store, args.cache_dir, extra_args=extra,
                           log_path=Path("/tmp") / f"cl-ties-{args.task}.log").wait_ready()
    try:
        seen = served_answers(server.url, args.task, prompts, args.max_new_tokens, args.repeats, args.seed)
    finally:
        server.stop()
    unstable = [k for k, answers in enumerate(seen) if len(set(answers)) > 1]
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    refs = reference_gaps(args.model, args.cache_dir, args.store, args.task, [prompts[k] for k in unstable],
                          args.max_new_tokens) if unstable else []
    report = {"task": args.task, "prompts": len(prompts), "evaluations": 1 + args.repeats, "unstable": [],
              "sample": [{"expected": rows[k]["completion"], "answer": seen[k][0]} for k in range(min(5, len(rows)))]}
    for item in report["sample"]:
        print(f"expected {item['expected']!r}, answered alone {item['answer']!r}")
    for k, ref in zip(unstable, refs):
        answers = sorted(set(seen[k]))
        correct = [normalize(a) == normalize(rows[k]["completion"]) for a in answers]
        entry = {"row": k, "answers": answers, "correct": correct, "reference": ref["text"],
                 "min_gap": min(s["gap"] for s in ref["steps"]), "steps": ref["steps"]}
        report["unstable"].append(entry)
        print(f"row {k}: served {answers} (correct {correct}); reference {ref['text']!r}; top-2 gaps "
              + ", ".join(f"{s['token']!r}/{s['runner_up']!r} {s['gap']:.2e}" for s in ref["steps"]))
    print(f"{len(unstable)} of {len(prompts)} prompts answered differently across {1 + args.repeats} evaluations")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
