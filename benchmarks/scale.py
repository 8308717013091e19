"""Scale: one server process holding many registered adapters of the default size.

    python -m benchmarks.scale [--model PATH] [--adapters 1000] [--registrations 5] [--out FILE]

It makes a store of ``--adapters`` tasks (each on the base alone) whose deltas are those of the benchmark
adapters (``benchmarks/trained.py``: the trainer's default config, stored compact), cycled under as many names,
and measures:

  * in this process, the registry: loading every adapter (what a start-up does), the memory of the served deltas
    (its own accounting), registering one more adapter (``--registrations`` times), deleting one;
  * a real server on loopback on that store: the time from its start to ``/readyz`` 200, its resident memory then
    (against a server on an empty store), and the time from a new adapter's write to the store to that server
    answering a generate naming it (the store is polled every 0.1 s).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .model_args import add_model_args, model_and_cache


def rss_mb(pid: str | int = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fill_store(root: Path, source, names: list[str], count: int, fingerprint: str, first: int = 0) -> list[str]:
    """``count`` tasks named ``scale-<i>`` from ``first`` on, each a copy of one of ``names`` in ``source``."""
    from adapters_store import AdapterStore

    store = AdapterStore(root)
    made = []
    for i in range(first, first + count):
        stored = source.get(names[i % len(names)])
        meta = {k: v for k, v in stored.manifest.items()
                if k not in ("format_version", "task", "layers", "tensors_sha256", "created_at")}
        meta.update(order=i, parent="@base", parents=[], base_fingerprint=fingerprint)
        name = f"scale-{i}"
        store.put(name, stored.deltas, meta)
        made.append(name)
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--registrations", type=int, default=5)
    ap.add_argument("--sources", type=int, default=64,
                    help="trained adapters whose deltas the store's tasks copy (the serving benchmark's set)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    import httpx

    from adapters_store import AdapterStore
    from server.metrics import Metrics
    from server.model import load_base
    from server.registry import Registry
    from server.runner import projection_layout

    from .loopback import ServerProcess
    from .trained import trained_store

    model_dir, cache = model_and_cache(args)
    base = load_base(model_dir, cache, "cpu", "float32")
    source_dir, _, solo = trained_store(base, cache, independent=args.sources)
    source = AdapterStore(source_dir)
    work = Path(tempfile.mkdtemp(prefix="jumplora-scale-"))
    n = args.adapters
    t0 = time.monotonic()
    fill_store(work / "store", source, solo, n, base.fingerprint)
    results: dict = {"adapters": n, "write_s": round(time.monotonic() - t0, 1)}
    print(f"wrote {n} adapters in {results['write_s']} s", flush=True)

    # the registry alone, in this process
    before = rss_mb()
    registry = Registry(AdapterStore(work / "store"), base.model, base.fingerprint, "cpu", Metrics(),
                        projection_layout(base.model), max_tasks=n + args.registrations + 10)
    t0 = time.monotonic()
    state = registry.refresh()
    results["registry_load_s"] = round(time.monotonic() - t0, 2)
    results["registry_rss_mb"] = round(rss_mb() - before, 1)
    per = [info.nbytes for info in state.tasks.values()]
    results["bytes_per_adapter"] = int(statistics.mean(per))
    results["nonzero_per_adapter"] = int(statistics.mean(info.nonzero for info in state.tasks.values()))
    times = []
    for i in range(args.registrations):
        fill_store(work / "store", source, solo, 1, base.fingerprint, first=n + i)
        t0 = time.monotonic()
        state = registry.refresh()
        times.append(time.monotonic() - t0)
        assert f"scale-{n + i}" in state.tasks
    results["register_one_s"] = [round(t, 3) for t in times]
    AdapterStore(work / "store").trash(f"scale-{n + args.registrations - 1}")
    t0 = time.monotonic()
    state = registry.refresh()
    results["delete_one_s"] = round(time.monotonic() - t0, 2)
    del registry, state
    print(json.dumps(results), flush=True)

    # a real server: start-up, memory, registration through the store watcher
    extra = ["--max-tasks", str(n + 2 * args.registrations + 10), "--store-poll-seconds", "0.1",
             "--log-level", "warning"]
    empty = ServerProcess(model_dir, work / "empty", cache, extra_args=extra).wait_ready(timeout=300)
    results["server_empty_rss_mb"] = round(rss_mb(empty.proc.pid), 1)
    empty.stop()
    t0 = time.monotonic()
    server = ServerProcess(model_dir, work / "store", cache, extra_args=extra).wait_ready(timeout=600)
    results["server_ready_s"] = round(time.monotonic() - t0, 1)
    try:
        results["server_rss_mb"] = round(rss_mb(server.proc.pid), 1)
        served = len(httpx.get(server.url + "/v1/tasks", timeout=60).json()["tasks"])
        results["server_tasks"] = served
        times = []
        for i in range(args.registrations):
            name = fill_store(work / "store", source, solo, 1, base.fingerprint, first=n + args.registrations + i)[0]
            t0 = time.monotonic()
            while True:
                r = httpx.post(server.url + "/v1/generate", timeout=60,
                               json={"task": name, "prompt": "Hello", "max_new_tokens": 1})
                if r.status_code == 200:
                    break
                assert r.status_code == 404, r.text
                time.sleep(0.02)
            times.append(time.monotonic() - t0)
        results["server_register_one_s"] = [round(t, 3) for t in times]
        results["server_rss_after_mb"] = round(rss_mb(server.proc.pid), 1)
    finally:
        server.stop()
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
