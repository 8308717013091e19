"""The machine-noise benchmark (``python -m benchmarks.step_noise``): its window statistics, and a short run on
the tiny model."""
from __future__ import annotations

import pytest

from benchmarks import step_noise


def test_windows_give_the_spread_of_their_means_and_of_neighbours_ratios():
    # 1 s windows of steps taking 10, 20, 10, 20 ms, then a partial window (left out)
    steps = [(w + k / 10, 0.010 * (1 + w % 2)) for w in range(4) for k in range(10)] + [(4.2, 1.0)]
    n, mean, sd, ratio_sd = step_noise.spread(steps, 1)
    assert n == 4 and mean == pytest.approx(15.0)
    assert sd == pytest.approx(0.3849, abs=1e-3)  # sd(10, 20, 10, 20) / 15
    assert ratio_sd == pytest.approx(0.8660, abs=1e-3)  # sd(2, 0.5, 2)
    assert step_noise.spread(steps, 5) is None  # fewer than three whole windows


def test_runs_on_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    assert step_noise.main(["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path), "--rows", "2",
                            "--seconds", "4", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "steps of 2 rows, 1 threads" in out and "| 1 | 3 |" in out
