"""The bounded load test (benchmarks/load.py) at a small size on the tiny model: no failures but 429s,
memory flat after warm-up."""
from __future__ import annotations

import json

import pytest

from benchmarks import load

pytestmark = pytest.mark.slow


def test_load_with_training_has_no_failures_and_flat_memory(tiny_model_dir, tmp_path):
    out = tmp_path / "load.json"
    code = load.main(["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"), "--requests", "600",
                      "--seconds", "30", "--min-new", "4", "--max-new", "32", "--train-rows", "32",
                      "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 0 and result["failures"] == 0, result["codes"]
    assert result["codes"].get("200", 0) >= 500
    assert result["training_job"] is not None
    rss = result["rss_mb"]
    assert rss["end"] <= rss["after_warmup"] * 1.2 + 64, rss
