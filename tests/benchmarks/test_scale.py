"""The scale benchmark (``python -m benchmarks.scale``) end to end on the tiny model: a store of many trained
adapters, the registry's load, registration and deletion, and a real server's start and registration."""
from __future__ import annotations

import json

import pytest

from benchmarks import scale


@pytest.mark.slow
def test_scale_benchmark_runs_on_the_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "scale.json"
    assert scale.main(["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"), "--adapters", "20",
                       "--registrations", "2", "--sources", "3", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["adapters"] == 20 and r["server_tasks"] == 21  # 20, 2 registered by the registry, 1 deleted
    assert len(r["register_one_s"]) == 2 and len(r["server_register_one_s"]) == 2
    assert r["bytes_per_adapter"] > 0 and r["server_ready_s"] > 0
    # the adapters are the trainer's, at the budget: N_LoRA non-zeros (2 blocks, q 64x64 and v 32x64, rank 8)
    assert r["nonzero_per_adapter"] <= 2 * 8 * ((64 + 64) + (64 + 32))
