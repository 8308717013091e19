"""The compact-form benchmark (``python -m benchmarks.compact``) on the tiny model: every task of the subset, both
forms answered, the texts compared."""
from __future__ import annotations

import json

from benchmarks import compact


def test_compact_benchmark_runs_on_the_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "compact.json"
    assert compact.main(["--model", str(tiny_model_dir), "--train-rows", "8", "--test-rows", "4",
                         "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["task"] for r in rows] == ["agnews", "amazon", "dbpedia", "yahoo"]
    for r in rows:
        assert r["test_rows"] == 4 and 0 <= r["identical"] <= 4 and r["nonzero"] <= r["n_lora"]
