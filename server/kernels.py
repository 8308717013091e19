"""Products with the frozen base weights, x·Wᵀ + b, for the serving engine. Projections of the same input (q, k
and v; gate and up) are fused into one product whose outputs lie side by side. On CPU the weights are packed
once for oneDNN; elsewhere (CUDA, or a torch without oneDNN) each part is an ``F.linear``.

Why, measured on the 2-core AMD EPYC (AVX-512) this engine was built on, fp32, SmolLM2-135M, all 211 projections
of one decode step (``python -m benchmarks.kernels``), at 1, 8, 16 and 32 rows: torch's ``F.linear`` goes to MKL
and took 32.9, 51.7, 64.3 and 89.3 ms; the same products through oneDNN with the weights reordered once into its
own layout took 12.0, 15.9, 20.4 and 29.6 ms, and with q/k/v and gate/up fused (121 products) 11.0, 14.9, 19.4
and 28.7 ms. The results are the same fp32 products summed in another order (about 1e-6 apart). The packed copy
costs as much memory as the weights it packs (540 MB for SmolLM2-135M in fp32); the model keeps its own weights
for everything else (training, export, the merged reference)."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_PACKED_DTYPES = (torch.float32, torch.bfloat16)
_warned = False


def onednn_available() -> bool:
    """Whether this torch can pack linear weights for oneDNN on CPU."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class Linear:
    """x (..., d_in) -> [x·W_1ᵀ + b_1, x·W_2ᵀ + b_2, ...] side by side: (..., Σ d_out), in the weights' dtype.
    ``parts`` keeps the given weights and biases (references, not copies; with ``keep_weights`` False and the
    weights packed, the biases only: a caller's own copy is then freed); ``widths`` each part's d_out."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None] | None = None, *,
                 pack: bool | None = None, fuse: bool | None = None, keep_weights: bool = True):
        biases = list(biases) if biases is not None else [None] * len(weights)
        self.parts = list(zip(weights, biases))  # [(W (d_out, d_in), b (d_out,) | None)]
        self.widths = tuple(int(w.shape[0]) for w in weights)
        self.packed: torch.Tensor | None = None  # oneDNN's layout of the fused (Σ d_out, d_in) weight
        self.bias: torch.Tensor | None = None  # (Σ d_out,) when packed or fused and any part has a bias
        self.fused: torch.Tensor | None = None  # (Σ d_out, d_in): the parts' weights in one tensor (a copy)
        w0 = weights[0]
        if pack is None:
            pack = w0.device.type == "cpu" and w0.dtype in _PACKED_DTYPES and onednn_available()
        if pack:
            with torch.inference_mode():
                self.packed = _pack(torch.cat([w.detach() for w in weights]) if len(weights) > 1 else w0.detach())
                if any(b is not None for b in biases):
                    self.bias = torch.cat([b.detach() if b is not None else w0.new_zeros(n)
                                           for b, n in zip(biases, self.widths)])
        if self.packed is not None and not keep_weights:  # the packed copy alone serves: parts hold no weight
            self.parts = [(None, b) for _, b in self.parts]
        # elsewhere (CUDA) several parts become one product over a concatenated copy of their weights: one
        # kernel launch instead of one per part and a concatenation
        if fuse is None:
            fuse = w0.device.type != "cpu"
        if self.packed is None and fuse and len(weights) > 1:
            with torch.inference_mode():
                self.fused = torch.cat([w.detach() for w in weights])
                if any(b is not None for b in biases):
                    self.bias = torch.cat([b.detach() if b is not None else w0.new_zeros(n)
                                           for b, n in zip(biases, self.widths)])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.fused is not None:
            return F.linear(x, self.fused, self.bias)
        if len(self.parts) == 1:
            return F.linear(x, *self.parts[0])
        return torch.cat([F.linear(x, w, b) for w, b in self.parts], dim=-1)


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    global _warned
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight)
    except RuntimeError as e:  # an unusual shape or build: the plain products still work
        if not _warned:
            log.warning("oneDNN weight packing failed (%s); using F.linear", e)
            _warned = True
        return None
