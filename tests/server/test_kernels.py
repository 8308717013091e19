"""The base-weight products (server/kernels.py): fused and packed, they equal the plain per-layer products."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.kernels import Linear, onednn_available


@pytest.mark.parametrize("mode", ["parts", "fused", pytest.param("packed", marks=pytest.mark.skipif(
    not onednn_available(), reason="this torch has no oneDNN"))])  # fused: the default off the CPU (CUDA)
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_product_equals_the_parts_side_by_side(mode, with_bias):
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(d, 24, generator=g) for d in (16, 8, 8)]
    biases = [torch.randn(16, generator=g), None, torch.randn(8, generator=g)] if with_bias else None
    lin = Linear(weights, biases, pack=mode == "packed", fuse=mode == "fused")
    assert (lin.packed is not None) == (mode == "packed") and (lin.fused is not None) == (mode == "fused")
    assert lin.widths == (16, 8, 8)
    for rows in (1, 5, 33):
        x = torch.randn(rows, 24, generator=g)
        expected = torch.cat([F.linear(x, w, None if biases is None else biases[i]) for i, w in enumerate(weights)],
                             dim=-1)
        got = lin(x)
        assert got.shape == (rows, 32)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
        # a view of the rows (the engine passes slices of its batch) gives the same
        assert torch.allclose(lin(torch.cat([x, x])[rows:]), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")
def test_cpu_weights_are_packed_by_default_and_bfloat16_works():
    w = torch.randn(8, 16)
    assert Linear([w]).packed is not None
    lin = Linear([w.bfloat16()])
    x = torch.randn(3, 16).bfloat16()
    assert lin(x).dtype == torch.bfloat16
    assert torch.allclose(lin(x).float(), F.linear(x, w.bfloat16()).float(), atol=0.1)
