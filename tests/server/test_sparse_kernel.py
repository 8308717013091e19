"""The compiled sparse-delta kernel: every row gets the deltas of its adapters (one or several: a route), whatever
the number of rows per adapter (the kernel takes them 4 at a time), the row order, the strides of x and y, the
values' dtype (fp32, bf16) and empty deltas; the build is cached, and a missing or failing compiler leaves the
engine on torch's products with a logged reason."""
from __future__ import annotations

import logging
import os
import platform

import pytest
import torch

from server import sparse_kernel as sk
from adapters_store import SparseDelta
from server.bank import group_delta


def _delta(d_out, d_in, density, g, bf16=False):
    """A sparse group delta of one layer, and its dense reference (after the bf16 rounding, if any)."""
    dense = torch.randn(d_out, d_in, generator=g) * (torch.rand(d_out, d_in, generator=g) < density)
    stored = SparseDelta.from_dense(dense, compact=bf16)
    delta = group_delta({"layer": stored}, (("layer",), (d_out,)), dense_above=1.0)
    assert delta.kind == "sparse" and delta.val.dtype == (torch.bfloat16 if bf16 else torch.float32)
    return delta, stored.to_dense()


@pytest.fixture(scope="module", params=["native", "portable"])
def any_kernel(request, sparse_kernel, tmp_path_factory):
    """The kernel as the server builds it (-march=native: AVX-512 paths on CPUs that have it), and on x86 also
    built without AVX-512, so that the portable paths are tested on an AVX-512 machine too."""
    if request.param == "native":
        return sparse_kernel
    flags = ("-mno-avx512f",) if platform.machine() in ("x86_64", "AMD64") else ()
    kernel = sk.load(tmp_path_factory.mktemp("portable"), extra_flags=flags)
    assert kernel is not None
    return kernel


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shared", [False, True], ids=["own", "routes"])
@pytest.mark.parametrize("counts", [[1], [2, 1, 3], [4, 5, 0, 9], [8, 7, 1, 2, 3], [2] * 8, [1] * 8, [16, 17, 33],
                                    [15, 12, 6, 10]])
def test_each_row_gets_its_adapters_deltas(any_kernel, counts, shared, bf16):
    """``shared``: each adapter takes a random subset of the rows, so that most rows have several adapters (a
    route of several deltas), as a chain of tasks gives; otherwise each row has one."""
    g = torch.Generator().manual_seed(len(counts) * 100 + sum(counts) + 7 * shared + bf16)
    d_out, d_in = 24, 40
    made = [_delta(d_out, d_in, 0.2, g, bf16) for _ in counts]
    n = (max(counts) + 3) if shared else sum(counts) + 2  # rows without an adapter too
    order = torch.randperm(n, generator=g)[:sum(counts)].tolist()  # rows of each adapter, scattered in the batch
    starts, rows = [0], []
    for t, c in enumerate(counts):
        rows += torch.randperm(n, generator=g)[:c].tolist() if shared else order[starts[-1]:starts[-1] + c]
        starts.append(starts[-1] + c)
    # x and y are views with row strides wider than d_in and d_out, as in a fused projection's output
    x = torch.randn(n, d_in + 8, generator=g)[:, :d_in]
    y_full = torch.randn(n, d_out + 5, generator=g)
    y = y_full[:, 2:2 + d_out]
    expected = y_full.clone()
    for t in range(len(counts)):
        for r in rows[starts[t]:starts[t + 1]]:
            expected[r, 2:2 + d_out] += made[t][1] @ x[r]
    group = any_kernel.prepare([d for d, _ in made])
    scratch = torch.full((any_kernel.scratch_size(group, len(rows)),), float("nan"))  # never read unwritten
    any_kernel.add(group, torch.tensor(starts, dtype=torch.int32), torch.tensor(rows, dtype=torch.int32), x, y,
                      scratch)
    assert torch.allclose(y_full, expected, atol=1e-4), float((y_full - expected).abs().max())


def test_empty_deltas_and_wrong_inputs_are_refused_or_harmless(sparse_kernel):
    g = torch.Generator().manual_seed(3)
    empty, _ = _delta(6, 5, 0.0, g)
    assert empty.nnz == 0
    group = sparse_kernel.prepare([empty])
    y = torch.randn(2, 6)
    before = y.clone()
    sparse_kernel.add(group, torch.tensor([0, 2], dtype=torch.int32), torch.tensor([1, 0], dtype=torch.int32),
                      torch.randn(2, 5), y, torch.empty(45))
    assert torch.equal(y, before)
    with pytest.raises(ValueError, match="fp32"):
        sparse_kernel.add(group, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
                          torch.randn(1, 5, dtype=torch.float64), y, torch.empty(45))
    with pytest.raises(ValueError, match="too small"):
        sparse_kernel.add(group, torch.tensor([0, 2], dtype=torch.int32), torch.tensor([1, 0], dtype=torch.int32),
                          torch.randn(2, 5), y, torch.empty(44))  # needs (2 rows + 7 spare rows an adapter) · 5
    with pytest.raises(ValueError, match="int32"):  # int64 row lists would be read as garbage row numbers
        sparse_kernel.add(group, torch.tensor([0, 2]), torch.tensor([1, 0]), torch.randn(2, 5), y, torch.empty(45))
    assert torch.equal(y, before)
    with pytest.raises(ValueError, match="shapes"):
        sparse_kernel.prepare([empty, _delta(7, 5, 0.5, g)[0]])


def test_the_build_is_cached_per_source_and_machine(tmp_path):
    first = sk.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert sk.build(tmp_path) == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left


def test_no_compiler_or_a_failing_one_falls_back_with_the_reason(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="server.sparse_kernel"):
        assert sk.load(tmp_path, compiler="no-such-cc-here") is None
    assert "no C compiler" in caplog.text and "no-such-cc-here" in caplog.text
    failing = tmp_path / "failing-cc"
    failing.write_text("#!/bin/sh\necho 'cc: fatal error: out of luck' >&2\nexit 1\n")
    os.chmod(failing, 0o755)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="server.sparse_kernel"):
        assert sk.load(tmp_path / "k", compiler=str(failing)) is None
    assert "out of luck" in caplog.text
    assert not list((tmp_path / "k").iterdir())  # nothing half-written is left for a later start
