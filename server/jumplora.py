"""The JumpLoRA method (DESIGN.md §2): a LoRA update ΔW = B·A made sparse by a symmetric JumpReLU gate with a
learned threshold θ = exp(τ), trained dense-to-sparse, with an optional ELLA penalty against earlier tasks.

Pure math and the training-time adapter layer; nothing here knows about models, stores or HTTP."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

EPSILON = 1e-3  # bandwidth ε of the rectangle kernel in the threshold's pseudo-derivative
RESET_FRACTION = 0.2  # the gate starts to blend in, and θ is reset, at step 0.2·S
SPARSE_FRACTION = 0.8  # fully sparse from step 0.8·S
DEFAULT_ELLA_LAMBDA = 3e4

Method = Literal["jumplora", "lora"]
ThresholdMode = Literal["global", "per_block"]


def rectangle_kernel(u: torch.Tensor) -> torch.Tensor:
    """K(u) = 1[-1/2 < u < 1/2]."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class SymmetricJumpGate(torch.autograd.Function):
    """J(z) = JumpReLU_θ(z) - JumpReLU_θ(-z) = z ⊙ 1[|z| > θ], with straight-through pseudo-derivatives.

    For each of the two JumpReLU terms f(u) = u·H(u - θ) with upstream gradient g_u:
      ∂/∂u → 1[u > θ]·g_u,   ∂/∂θ → -(θ/ε)·mean(K((u - θ)/ε)·g_u)   (mean over the matrix's entries).
    The second term has u = -z and g_u = -g, so the input gradients add up to 1[|z| > θ]·g and
      ∂/∂θ = (θ/ε)·mean((K((-z - θ)/ε) - K((z - θ)/ε))·g)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:  # z: (out, in), theta: () > 0
        mask = z.abs() > theta
        ctx.save_for_backward(z, theta, mask)
        return z * mask

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        z, theta, mask = ctx.saved_tensors
        grad_z = g * mask if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            k_pos = rectangle_kernel((z - theta) / EPSILON)
            k_neg = rectangle_kernel((-z - theta) / EPSILON)
            grad_theta = (theta / EPSILON) * ((k_neg - k_pos) * g).mean()
            grad_theta = grad_theta.reshape(theta.shape)
        return grad_z, grad_theta


def jump_gate(z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return SymmetricJumpGate.apply(z, theta)


def sparsity_mix(step: int, total_steps: int) -> float:
    """a = clip((step - 0.2·S) / (0.6·S), 0, 1): dense until 0.2·S, fully sparse from 0.8·S."""
    if total_steps <= 0:
        return 1.0
    span = (SPARSE_FRACTION - RESET_FRACTION) * total_steps
    return min(1.0, max(0.0, (step - RESET_FRACTION * total_steps) / span))


def reset_step(total_steps: int) -> int:
    """The first step at or after 0.2·S: θ is reset just before it runs."""
    return math.ceil(RESET_FRACTION * total_steps)


def block_index(layer_name: str) -> int:
    """The transformer block a layer belongs to: the first integer in its module path."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", layer_name)
    if m is None:
        raise ValueError(f"cannot tell the transformer block of layer {layer_name!r}")
    return int(m.group(1))


class Threshold(nn.Module):
    """Learnable log-thresholds τ: one for the whole model (``global``) or one per transformer block."""

    def __init__(self, n_groups: int, init_theta: float = 1e-3):
        super().__init__()
        self.tau = nn.Parameter(torch.full((n_groups,), math.log(init_theta)))  # (G,)

    def theta(self, group: int) -> torch.Tensor:  # () > 0
        return self.tau[group].exp()


@dataclass
class Schedule:
    """Mutable training-time state shared by all layers of one task's adapter."""

    mix: float = 0.0  # a in ΔW_eff = a·J(ΔW) + (1 - a)·ΔW


class JumpLoRALinear(nn.Module):
    """A frozen Linear (W, which already holds the earlier tasks' merged deltas) plus this task's trainable
    update: y = x·Wᵀ + s·x·ΔW_effᵀ (+ bias), ΔW = B·A, ΔW_eff = a·J(ΔW) + (1 - a)·ΔW (gate off: ΔW_eff = ΔW)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rank: int, alpha: float,
                 gated: bool, threshold: Threshold | None, group: int, schedule: Schedule):
        super().__init__()
        d_out, d_in = weight.shape
        self.register_buffer("weight", weight.detach(), persistent=False)  # (d_out, d_in), frozen
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)
        self.A = nn.Parameter(torch.empty(rank, d_in, device=weight.device, dtype=torch.float32))  # (r, d_in)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(d_out, rank, device=weight.device, dtype=torch.float32))  # (d_out, r)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.gated = gated
        self.threshold = threshold if gated else None
        self.group = group
        self.schedule = schedule

    @property
    def lora_params(self) -> int:
        """N_LoRA of this matrix: r·(d_in + d_out)."""
        return self.rank * (self.A.shape[1] + self.B.shape[0])

    def delta(self) -> torch.Tensor:  # (d_out, d_in)
        return self.B @ self.A

    def theta(self) -> torch.Tensor:
        assert self.threshold is not None
        return self.threshold.theta(self.group)

    def delta_eff(self) -> torch.Tensor:  # (d_out, d_in)
        dw = self.delta()
        a = self.schedule.mix
        if not self.gated or a == 0.0:
            return dw
        gated = jump_gate(dw, self.theta())
        return gated if a == 1.0 else a * gated + (1.0 - a) * dw

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in) -> (..., d_out)
        base = F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        xf = x.float()
        if not self.gated or self.schedule.mix == 0.0:
            update = F.linear(F.linear(xf, self.A), self.B)  # the dense phase is exactly low rank: cheaper
        else:
            update = F.linear(xf, self.delta_eff())
        return base + (self.scale * update).to(base.dtype)

    @torch.no_grad()
    def export(self) -> torch.Tensor:  # (d_out, d_in)
        """The finished task's delta s·J(ΔW) at a = 1 (s·ΔW with the gate off)."""
        dw = self.delta()
        if self.gated:
            dw = dw * (dw.abs() > self.theta())
        return self.scale * dw


def n_lora(layers: Iterable[JumpLoRALinear]) -> int:
    return sum(layer.lora_params for layer in layers)


@torch.no_grad()
def keep_interval(deltas: list[torch.Tensor], keep: int) -> tuple[float, float]:
    """(lo, hi): any θ with lo <= θ < hi leaves exactly ``keep`` entries of |ΔW| strictly above it over all the
    given matrices (ties at the boundary aside, where lo == hi).

    The reference takes θ = the (N - N_LoRA + 1)-th smallest |ΔW|, which the strict ``>`` then cuts, keeping
    N_LoRA - 1. Here lo is the (N_LoRA + 1)-th largest value and hi the N_LoRA-th, so exactly N_LoRA survive."""
    mags = torch.cat([d.detach().abs().flatten() for d in deltas]).float()  # (N,)
    tiny = float(torch.finfo(torch.float32).tiny)
    if keep >= mags.numel():
        return tiny, math.inf  # keep every non-zero entry
    if keep <= 0:
        top = float(mags.max())
        return max(top, tiny), math.inf
    top = torch.topk(mags, keep + 1).values  # (keep + 1,) descending
    return max(float(top[keep]), tiny), float(top[keep - 1])


@torch.no_grad()
def trim_to_budget(deltas: dict[str, torch.Tensor], budget: int) -> int:
    """Zero the smallest non-zero entries (in magnitude; ties broken by layer, then position) until at most
    ``budget`` remain over all the matrices, in place; how many were zeroed. θ alone cannot do it when entries
    tie at the boundary: after one Adam step every B entry is ±lr, and many |ΔW| come out equal."""
    nonzero = [(name, torch.nonzero(d.reshape(-1)).reshape(-1)) for name, d in deltas.items()]
    extra = sum(int(idx.numel()) for _, idx in nonzero) - budget
    if extra <= 0:
        return 0
    mags = torch.cat([deltas[name].reshape(-1)[idx].abs().float() for name, idx in nonzero])  # (nnz,)
    drop = torch.sort(mags, stable=True).indices[:extra]  # the smallest, in layer then position order on ties
    start = 0
    for name, idx in nonzero:
        mine = drop[(drop >= start) & (drop < start + idx.numel())] - start
        deltas[name].reshape(-1)[idx[mine]] = 0
        start += idx.numel()
    return extra


def _log_in_interval(lo: float, hi: float) -> torch.Tensor:
    """A float32 τ with lo <= exp(τ) < hi (when lo < hi): start at the midpoint, then step by ulps to undo the
    rounding of exp(log θ)."""
    theta = lo if not hi > lo or math.isinf(hi) else 0.5 * (lo + hi)
    tau = torch.tensor(math.log(theta), dtype=torch.float32)
    if not hi > lo:
        return tau
    for _ in range(64):
        t = float(tau.exp())
        if t >= hi:
            tau = torch.nextafter(tau, torch.tensor(-math.inf))
        elif t < lo:
            tau = torch.nextafter(tau, torch.tensor(math.inf))
        else:
            break
    return tau


@torch.no_grad()
def reset_thresholds(layers: list[JumpLoRALinear], threshold: Threshold) -> list[float]:
    """Set θ (per group) so that as many entries of J(ΔW) survive as a dense LoRA has parameters."""
    groups: dict[int, list[JumpLoRALinear]] = {}
    for layer in layers:
        groups.setdefault(layer.group, []).append(layer)
    thetas = []
    for group, members in sorted(groups.items()):
        lo, hi = keep_interval([m.delta() for m in members], n_lora(members))
        threshold.tau[group] = _log_in_interval(lo, hi).to(threshold.tau.dtype)
        thetas.append(float(threshold.tau[group].exp()))
    return thetas


def ella_penalty(layers: dict[str, JumpLoRALinear], past: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    """λ·(1/L)·Σ_l ‖s·ΔW_eff,l ⊙ W_past,l‖²_F, with W_past,l = Σ_earlier s·J(ΔW) (already scaled), L layers.
    Zero when there is no past."""
    any_layer = next(iter(layers.values()))
    total = torch.zeros((), device=any_layer.A.device)
    if not past:
        return total
    for name, layer in layers.items():
        w_past = past.get(name)
        if w_past is None:
            continue
        total = total + ((layer.scale * layer.delta_eff()) * w_past.to(total.device)).pow(2).sum()
    return lam * total / len(layers)


def density(deltas: Iterable[torch.Tensor]) -> tuple[int, int]:
    """(non-zero entries, all entries) over the given matrices."""
    nz = total = 0
    for d in deltas:
        nz += int((d != 0).sum())
        total += d.numel()
    return nz, total
