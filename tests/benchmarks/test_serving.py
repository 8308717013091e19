"""The serving benchmark (``python -m benchmarks.serving``): its summary, and a short end-to-end run on the tiny
model with every case, a real server on loopback and the transformers anchor."""
from __future__ import annotations

import json

import pytest

from benchmarks import serving


def test_summary_takes_the_median_of_the_repeats_and_the_table_gives_the_ratios():
    runs = [{"case": case, "concurrency": 8, "repeat": i, "tok_s": v, "p50_s": 1.0 + i, "p99_s": 2.0 + i,
             "requests": 32, "failures": 0, "step_ms": 10.0 * (i + 1)}
            for case, values in (("base", [100.0, 90.0, 120.0]), ("tasks", [95.0, 60.0, 99.0]))
            for i, v in enumerate(values)]
    rows = {r["case"]: r for r in serving.summary({"runs": runs})}
    assert rows["base"]["tok_s"] == 100.0 and rows["base"]["tok_s_min"] == 90.0 and rows["base"]["tok_s_max"] == 120.0
    assert rows["tasks"]["tok_s"] == 95.0 and rows["tasks"]["repeats"] == 3 and rows["tasks"]["p50_s"] == 2.0
    assert rows["tasks"]["step_ms"] == 20.0
    table = serving.table({"runs": runs})
    assert "(b)/(a) at 8: 0.950" in table and "| 20.0 |" in table and "(b) 8-task chain" in table
    # each repeat's ratio to the geometric mean of the @base runs before (same repeat) and after it (next repeat);
    # the last repeat has only the one before: 95/sqrt(100*90), 60/sqrt(90*120), 99/120; and their median
    assert "(paired: median 0.825, repeats 1.001 0.577 0.825)" in table
    paired = serving.paired_ratios({"runs": runs})
    assert list(paired) == [("tasks", 8)] and paired[("tasks", 8)][1] == pytest.approx(60.0 / (90.0 * 120.0) ** 0.5)


def test_benchmark_runs_every_case_on_the_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "serving.json"
    assert serving.main(["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"),
                         "--concurrency", "1", "3", "--requests-per-stream", "1", "--repeat", "2",
                         "--min-new", "2", "--max-new", "5", "--chain", "3", "--adapters", "5",
                         "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    runs = results["runs"]
    assert {(r["case"], r["concurrency"]) for r in runs} == {
        (c, s) for c in ("base", "tasks", "many", "stack", "hf") for s in (1, 3)}
    # the adapters are the trainer's: a chain (each on top of those before it) and independent ones
    adapters = results["adapters"]
    assert adapters["chain"] == ["chain-0", "chain-1", "chain-2"] and len(adapters["independent"]) == 5
    from adapters_store import AdapterStore
    store = AdapterStore(adapters["store"])
    assert [p["task"] for p in store.manifest("chain-2")["parents"]] == ["chain-0", "chain-1"]
    assert store.manifest("solo-0")["parents"] == [] and store.manifest("solo-0")["config"]["gate"] == "budget"
    m = store.manifest("solo-4")["metrics"]
    assert m["nonzero"] <= m["n_lora"]  # the budget
    assert sum(r["case"] == "tasks" for r in runs) == 4  # two concurrencies, two repeats
    requested = sum(n for _, n in serving.make_requests(8, 2, 5, 0))
    for r in runs:
        assert r["failures"] == 0 and r["requests"] == 8
        if r["case"] != "hf":  # the server's own decode steps in this run, from its /metrics
            longest = max(n for _, n in serving.make_requests(8, 2, 5, 0))
            assert r["steps"] >= longest - 1 and r["step_ms"] > 0, r  # the first token comes from the prefill
        assert r["tokens"] == requested, r  # every request generated exactly what it asked for
        assert r["tok_s"] > 0
    assert len(results["summary"]) == 10


@pytest.mark.slow
def test_the_gpu_check_script_runs_its_steps_and_writes_the_table(tiny_model_dir, tmp_path):
    """``benchmarks/gpu_check.sh`` with DEVICE=cpu: the same benchmark steps as on a GPU (the CUDA tests left
    out), on the tiny model, and the table it writes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "MODEL": str(tiny_model_dir),
           "CONCURRENCY": "1 2", "CHAIN": "2",
           "BENCH_ARGS": f"--cache-dir {tmp_path / 'cache'} --min-new 2 --max-new 4"}
    out = tmp_path / "check"
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh"), str(out)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (out / "gpu_check.md").read_text()
    for row in ("(a) @base", "(b) ", "(c) @stack", "HF generate"):
        assert row in table, table
    assert "| 2 |" in table and "(b)/(a) at 2:" in table
