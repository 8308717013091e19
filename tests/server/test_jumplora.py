"""The JumpLoRA math pinned against values computed by hand (DESIGN.md §2)."""
from __future__ import annotations

import math

import pytest
import torch

from server import jumplora as jl


def _theta(value: float) -> torch.Tensor:
    """θ = exp(τ) as the training computes it, with τ = log(value)."""
    return torch.tensor(math.log(value), requires_grad=True)


def test_gate_output_keeps_large_entries_of_both_signs():
    z = torch.tensor([[0.5, -0.2], [-0.7, 0.1]])
    out = jl.jump_gate(z, torch.tensor(0.3))
    assert torch.equal(out, torch.tensor([[0.5, 0.0], [-0.7, 0.0]]))


def test_gate_output_is_strict_at_the_threshold():
    z = torch.tensor([0.3, -0.3, 0.30001])
    assert torch.equal(jl.jump_gate(z, torch.tensor(0.3)), torch.tensor([0.0, 0.0, 0.30001]))


def test_gradient_to_input_is_mask_times_upstream():
    z = torch.tensor([[0.5, -0.2], [-0.7, 0.1]], requires_grad=True)
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    jl.jump_gate(z, torch.tensor(0.3)).backward(g)
    assert torch.equal(z.grad, torch.tensor([[1.0, 0.0], [3.0, 0.0]]))


def test_gradient_to_tau_from_positive_entries():
    # θ = 0.5, ε = 0.001: only entries with |z - θ| < ε/2 = 0.0005 feel the kernel.
    tau = _theta(0.5)
    z = torch.tensor([[0.5002, 0.9], [0.4996, -0.1]])
    g = torch.tensor([[2.0, 5.0], [3.0, 7.0]])
    jl.jump_gate(z, tau.exp()).backward(g)
    # ∂L/∂θ = (θ/ε)·mean((K(-z-θ) - K(z-θ))·g) = 500 · mean([[-2, 0], [-3, 0]]) = -625; ∂θ/∂τ = θ.
    assert tau.grad.item() == pytest.approx(-625 * 0.5, rel=1e-5)


def test_gradient_to_tau_from_negative_entries():
    tau = _theta(0.5)
    z = torch.tensor([[-0.5003, 0.2], [-0.9, -0.4996]])
    g = torch.tensor([[4.0, 1.0], [1.0, 6.0]])
    jl.jump_gate(z, tau.exp()).backward(g)
    # K(-z-θ) = 1 at z = -0.5003 and z = -0.4996: ∂L/∂θ = 500 · (4 + 6) / 4 = 1250.
    assert tau.grad.item() == pytest.approx(1250 * 0.5, rel=1e-5)


def test_gradient_to_tau_from_both_signs_is_the_sum_of_the_two_terms():
    tau = _theta(0.5)
    z = torch.tensor([0.5001, -0.5001, 0.0, 2.0])
    g = torch.tensor([3.0, 5.0, 100.0, 100.0])
    jl.jump_gate(z, tau.exp()).backward(g)
    assert tau.grad.item() == pytest.approx(500 * (5 - 3) / 4 * 0.5, rel=1e-5)


def test_gradient_to_tau_is_zero_far_from_threshold():
    tau = _theta(0.5)
    jl.jump_gate(torch.tensor([0.1, -2.0, 0.52]), tau.exp()).sum().backward()
    assert tau.grad.item() == 0.0


@pytest.mark.parametrize("step,expected", [(0, 0.0), (20, 0.0), (35, 0.25), (50, 0.5), (80, 1.0), (100, 1.0)])
def test_dense_to_sparse_schedule(step, expected):
    assert jl.sparsity_mix(step, 100) == pytest.approx(expected)


def test_reset_step_is_at_a_fifth_of_training():
    assert jl.reset_step(100) == 20
    assert jl.reset_step(7) == 2  # first step at or after 1.4


def _layer(d_out, d_in, rank=4, alpha=8.0, gated=True, threshold=None, group=0, schedule=None, seed=0):
    torch.manual_seed(seed)
    layer = jl.JumpLoRALinear(torch.randn(d_out, d_in), None, rank, alpha, gated, threshold, group,
                              schedule or jl.Schedule())
    with torch.no_grad():
        layer.B.normal_()  # a trained-looking B (it starts at zero)
    return layer


@pytest.mark.parametrize("mode", ["global", "per_block"])
def test_threshold_reset_keeps_exactly_n_lora_entries(mode):
    names = [f"model.layers.{b}.self_attn.{p}" for b in range(3) for p in ("q_proj", "v_proj")]
    shapes = {"q_proj": (24, 24), "v_proj": (8, 24)}
    groups = {b: (b if mode == "per_block" else 0) for b in range(3)}
    threshold = jl.Threshold(3 if mode == "per_block" else 1)
    layers = [_layer(*shapes[n.rsplit(".", 1)[1]], threshold=threshold, group=groups[jl.block_index(n)], seed=i)
              for i, n in enumerate(names)]
    jl.reset_thresholds(layers, threshold)
    kept = sum(int((l.delta().abs() > l.theta()).sum()) for l in layers)
    assert kept == jl.n_lora(layers) == 3 * 4 * ((24 + 24) + (8 + 24))
    if mode == "per_block":
        for b in range(3):
            members = [l for l in layers if l.group == b]
            assert sum(int((l.delta().abs() > l.theta()).sum()) for l in members) == jl.n_lora(members)
    exported = [l.export() for l in layers]
    assert sum(int((d != 0).sum()) for d in exported) == jl.n_lora(layers)


def test_keep_interval_brackets_the_n_lora_th_largest():
    d = torch.tensor([[0.1, -0.9, 0.3], [0.5, -0.2, 0.7]])
    lo, hi = jl.keep_interval([d], 2)
    assert (lo, hi) == pytest.approx((0.5, 0.7))


def test_ella_penalty_by_hand():
    schedule = jl.Schedule()
    l1 = jl.JumpLoRALinear(torch.zeros(2, 2), None, rank=1, alpha=2.0, gated=False, threshold=None, group=0,
                           schedule=schedule)
    l2 = jl.JumpLoRALinear(torch.zeros(2, 2), None, rank=1, alpha=2.0, gated=False, threshold=None, group=0,
                           schedule=schedule)
    with torch.no_grad():
        l1.B.copy_(torch.tensor([[1.0], [2.0]]))
        l1.A.copy_(torch.tensor([[3.0, -1.0]]))  # ΔW = [[3, -1], [6, -2]], s = 2
    past = {"a": torch.tensor([[0.5, 0.0], [0.0, 1.0]])}
    # s·ΔW ⊙ W_past = [[3, 0], [0, -4]]: squared norm 25; L = 2 layers; λ = 3e4.
    value = jl.ella_penalty({"a": l1, "b": l2}, past, 3e4)
    assert value.item() == pytest.approx(3e4 * 25 / 2)
    assert jl.ella_penalty({"a": l1, "b": l2}, {}, 3e4).item() == 0.0


def test_ella_penalty_uses_the_gated_delta_when_sparse():
    threshold = jl.Threshold(1, init_theta=2.5)
    schedule = jl.Schedule(mix=1.0)
    layer = jl.JumpLoRALinear(torch.zeros(2, 2), None, rank=1, alpha=1.0, gated=True, threshold=threshold, group=0,
                              schedule=schedule)
    with torch.no_grad():
        layer.B.copy_(torch.tensor([[1.0], [2.0]]))
        layer.A.copy_(torch.tensor([[3.0, -1.0]]))  # ΔW = [[3, -1], [6, -2]]; J keeps 3 and 6
    past = {"a": torch.ones(2, 2)}
    assert jl.ella_penalty({"a": layer}, past, 1.0).item() == pytest.approx(9 + 36)


def test_forward_blends_gated_and_dense_delta():
    threshold = jl.Threshold(1, init_theta=2.5)
    schedule = jl.Schedule(mix=0.25)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    layer = jl.JumpLoRALinear(w, torch.tensor([0.5, -0.5]), rank=1, alpha=2.0, gated=True, threshold=threshold,
                              group=0, schedule=schedule)
    with torch.no_grad():
        layer.B.copy_(torch.tensor([[1.0], [2.0]]))
        layer.A.copy_(torch.tensor([[3.0, -1.0]]))
    dw = torch.tensor([[3.0, -1.0], [6.0, -2.0]])
    gated = torch.tensor([[3.0, 0.0], [6.0, 0.0]])
    eff = 0.25 * gated + 0.75 * dw
    x = torch.tensor([[1.0, 2.0]])
    expected = x @ w.T + torch.tensor([0.5, -0.5]) + 2.0 * x @ eff.T
    assert torch.allclose(layer(x), expected)
    schedule.mix = 0.0
    assert torch.allclose(layer(x), x @ w.T + torch.tensor([0.5, -0.5]) + 2.0 * x @ dw.T)


def test_export_is_scaled_gated_delta_and_dense_with_gate_off():
    threshold = jl.Threshold(1, init_theta=2.5)
    kwargs = dict(rank=1, alpha=2.0, threshold=threshold, group=0, schedule=jl.Schedule())
    gated = jl.JumpLoRALinear(torch.zeros(2, 2), None, gated=True, **kwargs)
    dense = jl.JumpLoRALinear(torch.zeros(2, 2), None, gated=False, **kwargs)
    for layer in (gated, dense):
        with torch.no_grad():
            layer.B.copy_(torch.tensor([[1.0], [2.0]]))
            layer.A.copy_(torch.tensor([[3.0, -1.0]]))
    assert torch.equal(gated.export(), torch.tensor([[6.0, 0.0], [12.0, 0.0]]))
    assert torch.equal(dense.export(), torch.tensor([[6.0, -2.0], [12.0, -4.0]]))
    dense.schedule.mix = 1.0
    assert torch.equal(dense.delta_eff(), torch.tensor([[3.0, -1.0], [6.0, -2.0]]))  # the gate stays off


def test_init_matches_lora_reference():
    layer = _layer(16, 32, rank=8, alpha=32.0)
    fresh = jl.JumpLoRALinear(torch.zeros(16, 32), None, 8, 32.0, True, jl.Threshold(1), 0, jl.Schedule())
    assert fresh.scale == 4.0
    assert torch.count_nonzero(fresh.B) == 0
    bound = 1 / math.sqrt(32)  # Kaiming-uniform with a = √5 gives U(-1/√fan_in, 1/√fan_in)
    assert fresh.A.abs().max() <= bound and fresh.A.abs().max() > 0.5 * bound
    assert layer.lora_params == 8 * (16 + 32)


def test_trim_to_budget_drops_the_smallest_and_breaks_ties_by_position():
    from server.jumplora import trim_to_budget

    deltas = {"a": torch.tensor([[0.5, -0.1], [0.1, 0.0]]), "b": torch.tensor([[0.1, 2.0]])}
    assert trim_to_budget(deltas, 5) == 0  # already within
    assert trim_to_budget(deltas, 3) == 2  # three entries tie at 0.1: the first two (layer a) go
    assert torch.equal(deltas["a"], torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    assert torch.equal(deltas["b"], torch.tensor([[0.1, 2.0]]))
