"""The runner-level step-cost benchmark (``python -m benchmarks.step_cost``): a short run on the tiny model with
trained adapters, a prompt chunk riding along, and its refusal of more rows than adapters."""
from __future__ import annotations

import pytest

from benchmarks import step_cost


def test_runs_every_case_paired_on_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    assert step_cost.main(["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path), "--rows", "2", "3",
                           "--blocks", "3", "--steps", "1", "--prompt", "2", "--context", "4", "--chain", "2",
                           "--adapters", "4", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "prompt chunk: 2 tokens; 3 blocks of 1 steps" in out
    table = [line for line in out.splitlines() if line.startswith("| 2 |") or line.startswith("| 3 |")]
    assert len(table) == 2
    for line in table:
        cells = [float(c) for c in line.strip("| ").split(" | ")[1:]]
        assert len(cells) == 5 and all(c > 0 for c in cells)  # three step times, two ratios
    assert (tmp_path / "bench-adapters").is_dir()  # the trainer's adapters, made for the run


def test_refuses_more_rows_than_adapters(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit):
        step_cost.main(["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path), "--rows", "4",
                        "--adapters", "4"])
