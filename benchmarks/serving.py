"""Serving benchmark: aggregate decode tokens/s and request latency over HTTP at several concurrencies, for
(a) all ``@base``, (b) requests spread evenly over a chain of 8 tasks (each trained on top of those before it,
so that a request naming the k-th is served with k adapters), (m) requests spread over 64 distinct adapters
(tasks trained on the base alone), (c) all ``@stack``; and the anchor: Hugging Face ``generate`` on the base
model with static batches of the same sizes and the same requests. The adapters are trained by the server's
trainer with its default config (``benchmarks/trained.py``: a few steps each; the budget gate makes their size
that of any longer run), made once and kept in the cache folder.

    python -m benchmarks.serving [--model PATH] [--concurrency 1 8 16 32] [--requests-per-stream 2] [--repeat 7]

Every request is greedy and has its own max_new_tokens (drawn from --min-new..--max-new, seeded). With
--workload fixed (default) it generates exactly that many tokens (end-of-sequence ignored, so that every run
decodes the same number of tokens); with --workload chat the prompt is in the model's chat template and
generation stops at end of sequence. Tokens/s counts
generated tokens over the wall time of the whole run, prefill included. The static-batch anchor runs each
batch until its longest request is done, which is what static batching costs; its tokens/s counts, as ours
does, only the tokens each request asked for.

The server cases run interleaved (at each concurrency: (a), (b), (m), (c), then again, ``--repeat`` times), so
that a slow stretch of a shared machine hits every case alike; the table gives each case's median over the
repeats and the range of its tokens/s. The anchor runs once per batch size.

Below the table, each case's ratio to ``@base`` at each concurrency: the ratio of the medians, and the paired
ratio: repeat by repeat, the case's tokens/s over the geometric mean of the two ``@base`` runs that bracket it in
time (that of its own repeat, just before it, and that of the next repeat, just after; the last repeat has only
the one before), with the median of those. On a shared 2-core host the speed of identical work moves by about
10 % from one case to the next, whatever the cases' length; averaging the two bracketing ``@base`` runs takes
part of that out (on the stored runs, ``@stack`` over ``@base``: 8.1 % spread instead of 9.7 %), and more short
repeats beat fewer long ones for the same time, hence the defaults (``--requests-per-stream 2 --repeat 7``:
40-50 minutes for the four cases at 1, 8, 16 and 32 streams on a 2-core CPU).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .model_args import add_model_args, model_and_cache

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is to a new programmer.",
    "List three tips for staying focused while studying.",
    "What is the capital of Australia, and why was it chosen?",
    "Summarize the plot of a detective story in two sentences.",
    "Give me a recipe for a simple tomato soup.",
    "Describe the water cycle.",
    "Why is the sky blue?",
    "Translate 'good morning, how are you?' into French and explain each word.",
    "Tell me a fun fact about octopuses.",
    "What are the pros and cons of working from home?",
    "Write a haiku about autumn leaves.",
    "How does a bicycle stay upright when it moves?",
    "Suggest a name for a small bakery and explain it.",
    "What should I pack for a weekend hiking trip?",
    "Explain recursion with an everyday example.",
]
CASES = ("base", "tasks", "many", "stack", "hf")
NAMES = {"base": "(a) @base", "tasks": "(b) 8-task chain", "many": "(m) 64 adapters", "stack": "(c) @stack",
         "hf": "HF generate (static)"}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def make_requests(n: int, lo: int, hi: int, seed: int, template=None) -> list[tuple[str, int]]:
    """n (prompt, max_new_tokens) pairs; ``template`` formats a prompt (the chat workload)."""
    rng = random.Random(seed)
    fmt = template or (lambda p: p)
    return [(fmt(PROMPTS[i % len(PROMPTS)]), rng.randint(lo, hi)) for i in range(n)]


async def drive(url: str, tasks: list[str], requests: list[tuple[str, int]], streams: int,
                ignore_eos: bool = True) -> dict:
    """``streams`` clients, each sending its share of ``requests`` back to back."""
    import httpx

    latencies: list[float] = []
    tokens = 0
    failures = 0
    queue = list(enumerate(requests))

    async def client(c: httpx.AsyncClient):
        nonlocal tokens, failures
        while queue:
            i, (prompt, n) = queue.pop(0)
            body = {"task": tasks[i % len(tasks)], "prompt": prompt, "max_new_tokens": n, "ignore_eos": ignore_eos}
            start = time.perf_counter()
            r = await c.post(url + "/v1/generate", json=body)
            if r.status_code != 200:
                failures += 1
                continue
            latencies.append(time.perf_counter() - start)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as c:
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(streams)))
        wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "p50_s": percentile(latencies, 50),
            "p99_s": percentile(latencies, 99), "requests": len(latencies), "failures": failures}


def hf_anchor(model, tokenizer, requests: list[tuple[str, int]], batch: int, ignore_eos: bool = True) -> dict:
    """transformers ``generate`` with static batches of ``batch`` requests (left padding, greedy). A batch
    runs until its longest request is done; each request counts the tokens it asked for, up to its end of
    sequence unless ``ignore_eos``."""
    import torch

    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens, latencies = 0, []
    start = time.perf_counter()
    for i in range(0, len(requests), batch):
        chunk = requests[i:i + batch]
        enc = tokenizer([p for p, _ in chunk], return_tensors="pt", padding=True)
        t0 = time.perf_counter()
        with torch.inference_mode():
            longest = max(n for _, n in chunk)
            out = model.generate(**enc, max_new_tokens=longest, min_new_tokens=longest if ignore_eos else 0,
                                 do_sample=False, pad_token_id=pad)
        dt = time.perf_counter() - t0
        for row, (_, n) in zip(out[:, enc["input_ids"].shape[1]:].tolist(), chunk):
            row = row[:n]
            eos = tokenizer.eos_token_id
            tokens += len(row) if ignore_eos or eos not in row else row.index(eos)
        latencies += [dt] * len(chunk)
    wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "p50_s": percentile(latencies, 50),
            "p99_s": percentile(latencies, 99), "requests": len(requests), "failures": 0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--requests-per-stream", type=int, default=2, help="requests = streams x this (at least 8)")
    ap.add_argument("--repeat", type=int, default=7, help="runs of each server case at each concurrency")
    ap.add_argument("--min-new", type=int, default=32)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--chain", type=int, default=8, help="tasks in the chain of case (b)")
    ap.add_argument("--adapters", type=int, default=64, help="distinct adapters of case (m)")
    ap.add_argument("--train-steps", type=int, default=1, help="training steps (of 4 rows) of each benchmark adapter")
    ap.add_argument("--dtype", default="auto", help="server and anchor dtype (auto: fp32 on CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workload", choices=["fixed", "chat"], default="fixed",
                    help="fixed: every request generates exactly its max_new_tokens (end of sequence ignored); "
                    "chat: prompts in the model's chat template, generation stops at end of sequence (output "
                    "lengths as the model chooses them, capped by max_new_tokens)")
    args = ap.parse_args(argv)

    from server.model import load_base

    from .loopback import ServerProcess
    from .trained import trained_store

    model_dir, cache = model_and_cache(args)
    base = load_base(model_dir, cache, args.device, args.dtype)
    results: dict = {"model": str(model_dir), "dtype": str(base.dtype), "device": str(base.device), "runs": []}
    work = Path(tempfile.mkdtemp(prefix="jumplora-bench-"))
    store, chain, solo = trained_store(base, cache, args.chain, args.adapters, args.train_steps)
    results["adapters"] = {"store": str(store), "chain": chain, "independent": solo, "train_steps": args.train_steps}
    template = None
    if args.workload == "chat":
        def template(p: str) -> str:
            return base.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                      add_generation_prompt=True)
    ignore_eos = args.workload == "fixed"
    results["workload"] = args.workload
    case_tasks = {"base": ["@base"], "tasks": chain, "many": solo, "stack": ["@stack"]}
    max_batch = max(args.concurrency)
    server_cases = [c for c in args.cases if c != "hf"]
    if server_cases:
        server = ServerProcess(model_dir, store, cache, extra_args=[
            "--max-batch-size", str(max_batch), "--dtype", args.dtype, "--device", args.device,
            "--log-level", "warning"], log_path=work / "server.log").wait_ready(timeout=300)
        try:
            # warm-up: every adapter, and every cache row to full length, so that first-use costs (page faults
            # in the KV cache) are not in the numbers
            asyncio.run(drive(server.url, chain + solo + ["@stack", "@base"],
                              make_requests(max_batch, args.max_new, args.max_new, 1), max_batch))
            for streams in args.concurrency:
                reqs = make_requests(max(8, streams * args.requests_per_stream), args.min_new, args.max_new,
                                     args.seed, template)
                for repeat in range(args.repeat):
                    for case in server_cases:
                        before = step_stats(server.url)
                        r = asyncio.run(drive(server.url, case_tasks[case], reqs, streams, ignore_eos))
                        after = step_stats(server.url)
                        steps = after[1] - before[1]  # the server's decode steps in this run, and their mean time
                        r.update(case=case, concurrency=streams, repeat=repeat, steps=int(steps),
                                 step_ms=round((after[0] - before[0]) / steps * 1000, 3) if steps else None)
                        results["runs"].append(r)
                        print(json.dumps(r), flush=True)
        finally:
            server.stop()
    if "hf" in args.cases:
        for streams in args.concurrency:
            reqs = make_requests(max(8, streams * args.requests_per_stream), args.min_new, args.max_new, args.seed,
                                 template)
            r = hf_anchor(base.model, base.tokenizer, reqs, streams, ignore_eos)
            r.update(case="hf", concurrency=streams, repeat=0)
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
    results["summary"] = summary(results)
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


def step_stats(url: str) -> tuple[float, float]:
    """The server's decode-step histogram so far, from /metrics: (sum of seconds, count)."""
    import httpx

    values = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("jumplora_decode_step_seconds_sum", "jumplora_decode_step_seconds_count"):
            values[name] = float(value)
    return values["jumplora_decode_step_seconds_sum"], values["jumplora_decode_step_seconds_count"]


def summary(results: dict) -> list[dict]:
    """Per (case, concurrency): the median tokens/s, p50 and p99 over its repeats, and the tokens/s range."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in results["runs"]:
        groups.setdefault((r["case"], r["concurrency"]), []).append(r)
    rows = []
    for (case, c), runs in groups.items():
        rows.append({"case": case, "concurrency": c, "repeats": len(runs),
                     "tok_s": statistics.median(r["tok_s"] for r in runs),
                     "tok_s_min": min(r["tok_s"] for r in runs), "tok_s_max": max(r["tok_s"] for r in runs),
                     "p50_s": statistics.median(r["p50_s"] for r in runs),
                     "p99_s": statistics.median(r["p99_s"] for r in runs),
                     "step_ms": statistics.median(r["step_ms"] for r in runs) if runs[0].get("step_ms") else None,
                     "requests": runs[0]["requests"], "failures": sum(r["failures"] for r in runs)})
    return sorted(rows, key=lambda r: (CASES.index(r["case"]), r["concurrency"]))


def table(results: dict) -> str:
    lines = ["| case | streams | tokens/s (median) | range | p50 latency (s) | p99 latency (s) | decode step (ms) "
             "| requests | repeats | failures |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = summary(results)
    for r in rows:
        step = f"{r['step_ms']:.1f}" if r.get("step_ms") else "–"
        lines.append(f"| {NAMES[r['case']]} | {r['concurrency']} | {r['tok_s']:.1f} | {math.floor(r['tok_s_min'])}-"
                     f"{math.ceil(r['tok_s_max'])} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | {step} | {r['requests']} | "
                     f"{r['repeats']} | {r['failures']} |")
    by = {(r["case"], r["concurrency"]): r["tok_s"] for r in rows}
    paired = paired_ratios(results)
    ratios = []
    for (case, c), v in by.items():
        for other, label in (("base", "(a)"), ("hf", "HF")):
            if case in ("tasks", "many", "stack") and (other, c) in by:
                line = f"{NAMES[case][:3]}/{label} at {c}: {v / by[(other, c)]:.3f}"
                if other == "base" and (case, c) in paired:
                    each = paired[(case, c)]
                    line += (f" (paired: median {statistics.median(each):.3f}, repeats "
                             + " ".join(f"{x:.3f}" for x in each) + ")")
                ratios.append(line)
    return "\n".join(lines + ([""] + ratios if ratios else []))


def paired_ratios(results: dict) -> dict[tuple[str, int], list[float]]:
    """Per (case, concurrency): each repeat's tokens/s over the geometric mean of the ``@base`` runs that bracket
    it in time, ``@base`` of the same repeat (run just before the other cases) and of the next repeat (just after
    them), or that of the same repeat alone in the last repeat; in repeat order."""
    base = {(r["concurrency"], r["repeat"]): r["tok_s"] for r in results["runs"] if r["case"] == "base"}
    out: dict[tuple[str, int], list[float]] = {}
    for r in results["runs"]:
        key = (r["concurrency"], r["repeat"])
        if r["case"] in ("base", "hf") or key not in base:
            continue
        after = base.get((r["concurrency"], r["repeat"] + 1))
        bracket = math.sqrt(base[key] * after) if after is not None else base[key]
        out.setdefault((r["case"], r["concurrency"]), []).append(r["tok_s"] / bracket)
    return out


if __name__ == "__main__":
    sys.exit(main())
