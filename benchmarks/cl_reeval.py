"""Evaluate a finished (or partly finished) ``benchmarks.cl`` run again, without training anything again.

    python -m benchmarks.cl_reeval --out OUT [--methods M ...] [--cache-dir DIR] [--threads N]
    python -m benchmarks.cl --out OUT ...the run's own options...   # then rewrites results.* from the state

Why: stored adapters never change, so a run's training stays valid when the evaluation has to be redone (for
example after a serving bug is fixed). The matrix needs, after learning task i, ``@stack`` over tasks 0..i only;
so for each i this builds a store holding the method's first i + 1 adapters (hard links to the run's own
files, which nothing ever rewrites), starts a fresh server on it and evaluates exactly as the harness does,
over HTTP. The new scores go to OUT/reeval.json (safe while the harness still runs other methods: it rewrites
state.json); ``--apply``, once the harness has stopped, moves them into OUT/state.json, which keeps the old
ones under ``evals_superseded``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from . import cl
from .loopback import ServerProcess


def prefix_store(run_store: Path, tasks: list[str], dest: Path) -> Path:
    """A store with the adapters ``tasks`` of ``run_store``, as hard links."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for t in tasks:
        shutil.copytree(run_store / t, dest / t, copy_function=os.link)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the benchmarks.cl output folder")
    ap.add_argument("--methods", nargs="+", default=None, help="default: every sequential method with evaluations")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "jumplora")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the evaluating servers")
    ap.add_argument("--apply", action="store_true", help="only move OUT/reeval.json into OUT/state.json")
    args = ap.parse_args(argv)

    out = args.out.resolve()
    state_path, reeval_path = out / "state.json", out / "reeval.json"
    state = cl.State(state_path, json.loads(state_path.read_text())["settings"])
    done = json.loads(reeval_path.read_text()) if reeval_path.exists() else {}
    if args.apply:
        for method, fresh in done.items():
            st = state.method(method)
            st.setdefault("evals_superseded", {}).update({k: v for k, v in st["evals"].items() if k in fresh})
            st["evals"].update(fresh)
        state.save()
        cl.log(f"applied re-evaluations of {', '.join(done) or 'nothing'} to {state_path}")
        return 0
    settings = state.data["settings"]
    bench = cl.Benchmark(Path(settings["data"]), settings["order"], settings["train_rows"], settings["test_rows"],
                         settings["max_seq_len"], settings["chars_per_token"], settings["seed"])
    if args.model is None and settings.get("model"):
        args.model = Path(settings["model"])
    if args.model is None:
        from server.model import convert_default_model
        args.model = convert_default_model(args.cache_dir)
    ctx = SimpleNamespace(bench=bench, args=SimpleNamespace(max_new_tokens=settings["max_new_tokens"],
                                                            concurrency=args.concurrency))
    methods = args.methods or [m for m in state.data["methods"] if m != cl.MULTITASK]
    extra = ["--log-level", "warning"] + (["--threads", str(args.threads)] if args.threads else [])
    for method in methods:
        st = state.method(method)
        learned = [t for t in bench.tasks if t in st["learned"]]
        if learned != bench.tasks[:len(learned)]:
            raise SystemExit(f"{method}: learned tasks {learned} are not a prefix of the order {bench.tasks}")
        fresh = {}
        for i in range(len(learned)):
            store = prefix_store(out / method / "store", learned[:i + 1], out / method / "reeval" / f"store-{i}")
            server = ServerProcess(args.model, store, args.cache_dir, extra_args=extra).wait_ready(timeout=900)
            try:
                ev = cl.evaluate(server.url, ctx, cl.eval_plan(settings["modes"], learned[:i + 1]))
            finally:
                server.stop()
            ev["reevaluated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            fresh[str(i)] = ev
            cl.log(f"[{method}] re-evaluated after {learned[i]} ({ev['requests']} requests, {ev['seconds']:.1f} s): "
                   f"{cl._fmt_scores(ev['scores'])}")
        done[method] = fresh
        reeval_path.write_text(json.dumps(done, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
