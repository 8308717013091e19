"""Bounded load test on loopback: a fixed number of requests at a steady rate over a fixed time, mixed tasks,
streaming and not, with a training job running part of the time. Reports failures (anything but 200 and the
deliberate 429), p50/p99 latency and the server's resident memory over the run. Sends traffic only to the
127.0.0.1 server it starts itself, and stops by itself.

    python -m benchmarks.load [--requests 2000] [--seconds 120] [--model PATH]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from .model_args import add_model_args, model_and_cache
from .serving import PROMPTS, percentile
from .trained import trained_store


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one(client: httpx.AsyncClient, url: str, body: dict, stream: bool) -> tuple[int, float]:
    start = time.perf_counter()
    if not stream:
        r = await client.post(url + "/v1/generate", json=body)
        return r.status_code, time.perf_counter() - start
    async with client.stream("POST", url + "/v1/generate", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, time.perf_counter() - start
        done = False
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    return 599, time.perf_counter() - start  # an error after the stream began
                done = event.get("type") == "done"
        return (200 if done else 598), time.perf_counter() - start


async def run_load(url: str, tasks: list[str], n: int, seconds: float, seed: int, new_tokens: tuple[int, int],
                   on_fraction: tuple[float, callable] | None = None) -> dict:
    rng = random.Random(seed)
    plan = [(tasks[rng.randrange(len(tasks))], PROMPTS[rng.randrange(len(PROMPTS))], rng.randint(*new_tokens),
             rng.random() < 0.5) for _ in range(n)]
    codes: dict[int, int] = {}
    latencies: list[float] = []
    fired = False
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=1000)) as client:
        start = time.perf_counter()
        pending = []
        for i, (task, prompt, k, stream) in enumerate(plan):
            due = start + seconds * i / n
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            if on_fraction and not fired and i >= on_fraction[0] * n:
                fired = True
                on_fraction[1]()
            body = {"task": task, "prompt": prompt, "max_new_tokens": k}
            pending.append(asyncio.create_task(one(client, url, body, stream)))
        for code, latency in await asyncio.gather(*pending):
            codes[code] = codes.get(code, 0) + 1
            if code == 200:
                latencies.append(latency)
        wall = time.perf_counter() - start
    failures = sum(v for k, v in codes.items() if k not in (200, 429))
    return {"requests": n, "wall_s": wall, "codes": codes, "failures": failures,
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--min-new", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=16)
    add_model_args(ap)
    ap.add_argument("--train-rows", type=int, default=64, help="rows of the job started at 30 %% of the run")
    ap.add_argument("--out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from server.model import load_base

    from .loopback import ServerProcess

    model_dir, cache = model_and_cache(args)
    base = load_base(model_dir, cache, "cpu", "float32")
    work = Path(tempfile.mkdtemp(prefix="jumplora-load-"))
    # four tasks trained in a chain by the trainer (benchmarks/trained.py), copied: the job below adds to the store
    source, chain, _ = trained_store(base, cache, chain=4, independent=0)
    shutil.copytree(source, work / "store", ignore=shutil.ignore_patterns(".*"))
    tasks = chain + ["@stack", "@base"]
    del base
    server = ServerProcess(model_dir, work / "store", cache, extra_args=["--log-level", "warning"],
                           log_path=work / "server.log").wait_ready(timeout=300)
    memory: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample_memory():
        t0 = time.monotonic()
        while not stop.wait(1.0):
            memory.append((time.monotonic() - t0, rss_mb(server.proc.pid)))
    sampler = threading.Thread(target=sample_memory, daemon=True)

    def start_training():
        rows = [{"prompt": f"Review: {p}\nSentiment:", "completion": " positive" if i % 2 else " negative"}
                for i, p in enumerate(PROMPTS * (args.train_rows // len(PROMPTS) + 1))][:args.train_rows]
        httpx.post(server.url + "/v1/tasks", json={"name": "load-job", "data": rows,
                                                   "config": {"batch_size": 8, "epochs": 1}}, timeout=60)
    try:
        # warm-up: a tenth of the load, not counted
        asyncio.run(run_load(server.url, tasks, max(10, args.requests // 10), args.seconds / 10, args.seed + 1,
                             (args.min_new, args.max_new)))
        sampler.start()
        result = asyncio.run(run_load(server.url, tasks, args.requests, args.seconds, args.seed,
                                      (args.min_new, args.max_new), (0.3, start_training)))
        stop.set()
        jobs = httpx.get(server.url + "/v1/jobs").json()["jobs"]
        result["training_job"] = {k: jobs[0][k] for k in ("status", "step", "total_steps")} if jobs else None
    finally:
        stop.set()
        server.stop()
    quarter = [m for t, m in memory if t >= result["wall_s"] * 0.25]
    result["rss_mb"] = {"after_warmup": quarter[0] if quarter else None, "end": memory[-1][1] if memory else None,
                        "max": max((m for _, m in memory), default=None)}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({**result, "memory": memory}, indent=1))
    return 0 if result["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
