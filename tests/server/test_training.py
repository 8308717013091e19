"""The training loop: a tiny Llama learns a toy mapping through the gated adapter."""
from __future__ import annotations

import pytest
import torch

from server.schemas import TrainConfig
from server.model import merged_deltas
from server.training import completion_loss, collate, encode, train_adapter

TOY = [("word: apple\nkind:", " fruit"), ("word: carrot\nkind:", " veg"),
       ("word: pear\nkind:", " fruit"), ("word: leek\nkind:", " veg"),
       ("word: plum\nkind:", " fruit"), ("word: kale\nkind:", " veg")]


def _loss(base, rows):
    ex = [encode(base.tokenizer, p, c) for p, c in rows]
    with torch.no_grad():
        return float(completion_loss(base.model, *collate(ex, base.tokenizer.eos_token_id, "cpu")))


def test_encode_masks_the_prompt_and_ends_with_eos(tiny_base):
    tok = tiny_base.tokenizer
    ex = encode(tok, "abc:", " x")
    n_prompt = len(tok("abc:")["input_ids"])
    assert ex.labels[:n_prompt] == [-100] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("method", ["jumplora", "lora"])
def test_tiny_llama_learns_toy_mapping_sparsely(tiny_base, method):
    cfg = TrainConfig(method=method, learning_rate=1e-2, batch_size=6, epochs=150, seed=1)
    before = _loss(tiny_base, TOY)
    seen = []
    result = train_adapter(tiny_base.model, tiny_base.tokenizer, TOY, cfg, on_progress=seen.append)
    assert len(seen) == result.metrics["steps"] == 150
    # The model is left untouched by training ...
    assert _loss(tiny_base, TOY) == pytest.approx(before, rel=1e-6)
    # ... and the exported delta, merged into it, has learned the mapping.
    with merged_deltas(tiny_base.model, result.deltas):
        after = _loss(tiny_base, TOY)
    assert after < 0.3 * before, (before, after)
    n_lora, total = result.metrics["n_lora"], result.metrics["total_entries"]
    assert n_lora == 2 * 8 * ((64 + 64) + (64 + 32))  # 2 blocks, q_proj 64x64 and v_proj 32x64, rank 8
    if method == "jumplora":
        assert result.metrics["density"] <= n_lora / total + 0.01
        assert seen[0].density == 1.0 and seen[-1].density <= n_lora / total + 0.01
    else:
        assert result.metrics["density"] > 0.99


def test_the_default_budget_gate_holds_exactly_n_lora_entries(tiny_base):
    cfg = TrainConfig(learning_rate=1e-2, batch_size=6, epochs=60, seed=2)
    assert cfg.gate == "budget" and cfg.parent == "@stack"
    seen = []
    result = train_adapter(tiny_base.model, tiny_base.tokenizer, TOY, cfg, on_progress=seen.append)
    assert result.metrics["nonzero"] == result.metrics["n_lora"]
    budget = result.metrics["n_lora"] / result.metrics["total_entries"]
    # progress is read after each optimizer step, one update away from the reset that precedes it
    after = [p.density for p in seen if p.step > 13]  # the one-time reset is at step 12
    assert after and all(abs(d - budget) < 0.2 * budget for d in after)
    before = _loss(tiny_base, TOY)
    with merged_deltas(tiny_base.model, result.deltas):
        assert _loss(tiny_base, TOY) < 0.5 * before


def test_the_adaptive_gate_learns_its_threshold_after_the_reset(tiny_base):
    """The paper's gate (``gate: adaptive``): θ is set once at 0.2·S, then learned, so the kept count drifts away
    from N_LoRA; the budget gate would hold it there."""
    cfg = TrainConfig(learning_rate=1e-2, batch_size=6, epochs=60, seed=2, gate="adaptive")
    result = train_adapter(tiny_base.model, tiny_base.tokenizer, TOY, cfg)
    assert result.metrics["nonzero"] != result.metrics["n_lora"]
    assert len(result.metrics["thresholds"]) == 1  # the one reset at 0.2·S, none before export


def test_the_budget_is_an_upper_bound_even_where_theta_cannot_separate_ties(tiny_base, monkeypatch):
    """Where |ΔW| ties at the boundary, no θ keeps exactly N_LoRA (a run on SmolLM2 kept 24 too many); the export
    trims the excess. Here θ is forced far below every entry, so that only the trim can hold the budget."""
    import server.jumplora as jl

    def too_low(layers, threshold):
        with torch.no_grad():
            threshold.tau.fill_(-80.0)
        return [float(threshold.tau.exp().max())]
    monkeypatch.setattr(jl, "reset_thresholds", too_low)
    result = train_adapter(tiny_base.model, tiny_base.tokenizer, TOY, TrainConfig(max_steps=3, batch_size=4))
    nonzero = sum(int((d != 0).sum()) for d in result.deltas.values())
    assert nonzero == result.metrics["nonzero"] == result.metrics["n_lora"]
