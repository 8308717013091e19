"""Learning benchmark: train one real task through the HTTP API while measuring serving latency.

    python -m benchmarks.learning [--task agnews] [--rows 500] [--data DIR] [--model PATH]

Starts a server (default model, fresh store), measures p50/p99 latency of short greedy generate calls with no
training, then posts ``--rows`` training rows of the task and measures the same while the job runs; reports
the job's held-out exact match against ``@base``, its density, wall time, training tokens/s and the time to
register, and the exact match on the task's test rows through the served routes.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from .model_args import add_model_args, model_and_cache
from .serving import percentile

DEFAULT_DATA = [Path(__file__).resolve().parents[2] / "shared" / "data" / "cl-benchmark",
                Path(__file__).resolve().parent / "data" / "cl-subset"]


def find_data(explicit: str | None) -> Path:
    for path in ([Path(explicit)] if explicit else DEFAULT_DATA):
        if (path / "orders.json").is_file():
            return path
    raise SystemExit(f"no benchmark data found (tried {', '.join(map(str, DEFAULT_DATA))}); pass --data")


def load_rows(folder: Path, split: str, n: int, seed: int) -> list[dict]:
    rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows[:n]]


class LatencyProbe:
    """Short greedy generate calls back to back, until stopped; records each latency."""

    def __init__(self, url: str, prompt: str):
        self.url, self.prompt = url, prompt
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=120) as c:
            while not self._stop.is_set():
                start = time.perf_counter()
                r = c.post(self.url + "/v1/generate",
                           json={"task": "@base", "prompt": self.prompt, "max_new_tokens": 8})
                if r.status_code == 200:
                    self.latencies.append(time.perf_counter() - start)
                else:
                    self.failures += 1

    def __enter__(self) -> "LatencyProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        return {"calls": len(self.latencies), "failures": self.failures,
                "p50_s": percentile(self.latencies, 50), "p99_s": percentile(self.latencies, 99)}


def exact_match(url: str, task: str, rows: list[dict]) -> float:
    def norm(t: str) -> str:
        return " ".join(t.lower().split())
    hits = 0
    with httpx.Client(timeout=300) as c:
        for r in rows:
            out = c.post(url + "/v1/generate", json={"task": task, "prompt": r["prompt"], "max_new_tokens": 12})
            hits += norm(out.json()["text"]) == norm(r["completion"])
    return hits / len(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.learning", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="agnews")
    ap.add_argument("--rows", type=int, default=500, help="rows posted (10 % are held out by the job)")
    ap.add_argument("--test-rows", type=int, default=100, help="test rows scored through the served routes")
    ap.add_argument("--data", help="benchmark folder (default: ../shared/data/cl-benchmark, else the subset)")
    add_model_args(ap)
    ap.add_argument("--config", default="{}", help="training config (JSON)")
    ap.add_argument("--probe-seconds", type=float, default=30.0, help="latency probe without training")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from .loopback import ServerProcess

    data = find_data(args.data) / args.task
    train = load_rows(data, "train", args.rows, args.seed)
    test = load_rows(data, "test", args.test_rows, args.seed)
    model_dir, cache = model_and_cache(args)
    work = Path(tempfile.mkdtemp(prefix="jumplora-learn-"))
    server = ServerProcess(model_dir, work / "store", cache, extra_args=["--log-level", "warning"],
                           log_path=work / "server.log").wait_ready(timeout=300)
    out: dict = {"task": args.task, "rows": len(train), "model": str(model_dir)}
    try:
        probe_prompt = test[0]["prompt"]
        with LatencyProbe(server.url, probe_prompt) as idle:
            time.sleep(args.probe_seconds)
        out["latency_idle"] = idle.summary()
        print("idle:", out["latency_idle"], flush=True)
        out["test_exact_match_base"] = exact_match(server.url, "@base", test)
        body = {"name": args.task, "data": train, "config": json.loads(args.config)}
        t0 = time.monotonic()
        job = httpx.post(server.url + "/v1/tasks", json=body, timeout=300).json()
        print("job:", job, flush=True)
        with LatencyProbe(server.url, probe_prompt) as busy:
            while True:
                state = httpx.get(f"{server.url}/v1/jobs/{job['job_id']}").json()
                if state["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(2)
        out["wall_s"] = time.monotonic() - t0
        out["latency_training"] = busy.summary()
        out["job"] = state
        print("training:", out["latency_training"], flush=True)
        if state["status"] == "succeeded":
            out["test_exact_match_task"] = exact_match(server.url, args.task, test)
            out["test_exact_match_stack"] = exact_match(server.url, "@stack", test)
        metrics = httpx.get(server.url + "/metrics").text
        out["register_seconds"] = [line for line in metrics.splitlines()
                                   if line.startswith("jumplora_register_seconds_sum")]
    finally:
        server.stop()
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
