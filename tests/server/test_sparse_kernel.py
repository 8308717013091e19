"""The compiled sparse-delta kernel: every row gets the deltas of its adapters (one or several: a route), whatever
the number of rows per adapter (rows go in blocks of up to 32), the row order, the strides of x and y, the values'
dtype (fp32, bf16), the columns' (int32, int16), the stored rows' order (padded and reordered, or in order), the
number of threads, and empty deltas; rows are laid out so that a chain's routes share
blocks; the build is cached, and a missing or failing compiler leaves the engine on torch's products with a logged
reason."""
from __future__ import annotations

import dataclasses
import logging
import os
import platform

import pytest
import torch

from server import sparse_kernel as sk
from adapters_store import SparseDelta
from server.bank import group_delta


def _delta(d_out, d_in, density, g, form="f32-i16"):
    """A sparse group delta of one layer in ``form`` (values-columns), and its dense reference (after the bf16
    rounding of the store)."""
    dense = torch.randn(d_out, d_in, generator=g) * (torch.rand(d_out, d_in, generator=g) < density)
    stored = SparseDelta.from_dense(dense, compact=True)
    delta = group_delta({"layer": stored}, (("layer",), (d_out,)), dense_above=1.0)
    assert delta.kind == "sparse" and delta.val.dtype == torch.float32 and delta.col.dtype == torch.int16  # served
    values, columns = form.split("-")
    delta = dataclasses.replace(delta, val=delta.val.to(torch.bfloat16 if values == "bf16" else torch.float32),
                                col=delta.col.to(torch.int16 if columns == "i16" else torch.int32))
    return delta, stored.to_dense()


X86 = platform.machine() in ("x86_64", "AMD64")


@pytest.fixture(scope="module", params=["native", "portable", *(["128-bit"] if X86 else [])])
def any_kernel(request, sparse_kernel, tmp_path_factory):
    """The kernel as the server builds it (-march=native: AVX-512 paths on CPUs that have it), and on x86 also
    built without AVX-512 (16 lanes as two AVX vectors) and without AVX (128-bit vectors, windows of 8 lanes at
    most), so that the x86 paths are tested on whatever x86 CPU runs the tests."""
    if request.param == "native":
        return sparse_kernel
    flags = {"portable": ("-mno-avx512f",) if X86 else (), "128-bit": ("-mno-avx",)}[request.param]
    kernel = sk.load(tmp_path_factory.mktemp(request.param), extra_flags=flags)
    assert kernel is not None
    return kernel


@pytest.mark.parametrize("form", ["f32-i16", "bf16-i32", "f32-i32", "bf16-i16"])
@pytest.mark.parametrize("shared", [False, True], ids=["own", "routes"])
@pytest.mark.parametrize("counts", [[1], [2, 1, 3], [4, 5, 0, 9], [8, 7, 1, 2, 3], [2] * 8, [1] * 8, [16, 17, 33],
                                    [15, 12, 6, 10], [1] * 20])
def test_each_row_gets_its_adapters_deltas(any_kernel, counts, shared, form):
    """``shared``: each adapter takes a random subset of the rows, so that most rows have several adapters (a
    route of several deltas), as a chain of tasks gives; otherwise each row has one."""
    g = torch.Generator().manual_seed(len(counts) * 100 + sum(counts) + 7 * shared + len(form))
    d_out, d_in = 24, 40
    made = [_delta(d_out, d_in, 0.2, g, form) for _ in counts]
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
    at = any_kernel.layout(starts, rows)
    assert sorted(at.rows.tolist()) == sorted(set(rows))  # each row once
    scratch = torch.full((any_kernel.scratch_size(group, at),), float("nan"))  # never read unwritten
    any_kernel.add_at(group, at, x, y, scratch)
    assert torch.allclose(y_full, expected, atol=1e-4), float((y_full - expected).abs().max())


def test_stored_rows_padded_and_reordered_keep_the_product():
    """``kernel_rows``: every row padded to a multiple of 4 with zeros, rows ordered by padded length within
    chunks of 64 (the last one partial), perm mapping each stored row to its output row in its own chunk; the
    rows in order again (``in_order``) are the delta as given, and torch's product of the stored form agrees."""
    g = torch.Generator().manual_seed(11)
    delta, dense = _delta(150, 30, 0.15, g)
    lengths = delta.crow[1:] - delta.crow[:-1]
    assert bool((lengths % 4 == 0).all()) and delta.perm.dtype == torch.int32
    assert delta.col.numel() == int(lengths.sum()) > delta.nnz == int((delta.val != 0).sum())
    for c in range(0, 150, 64):
        assert sorted(delta.perm[c:c + 64].tolist()) == list(range(c, min(c + 64, 150)))
        assert bool((lengths[c:c + 64].diff() >= 0).all())
    crow, col, val = delta.in_order()
    assert crow[-1] == delta.nnz and torch.equal(delta.to_dense(), dense)
    in_order = torch.sparse_csr_tensor(crow, col.int(), val, (150, 30), check_invariants=False)
    assert torch.equal(in_order.to_dense(), dense)
    x = torch.randn(5, 30, generator=g)
    assert torch.allclose(delta.apply(x), x @ dense.T, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("stored", ["kernel", "in-order"])
def test_threads_split_the_rows_at_whole_chunks(any_kernel, stored, threads):
    """The threads split the output rows at multiples of 64: each holds whole chunks, so that a stored row's
    output row (perm) is its own thread's. Rows in order (perm None, no padding) are served as well."""
    g = torch.Generator().manual_seed(13 + threads)
    made = [_delta(200, 48, 0.2, g, form) for form in ("f32-i16", "bf16-i32", "f32-i32")]
    if stored == "in-order":
        made = [(dataclasses.replace(d, **dict(zip(("crow", "col", "val"), d.in_order())), perm=None), dense)
                for d, dense in made]
    starts, rows = [0, 9, 13, 14], [*range(9), *range(5, 9), 3]  # rows 5..8 take adapters 0 and 1
    _add_at_threads(any_kernel, made, starts, rows, torch.randn(9, 48, generator=g),
                    torch.randn(9, 200, generator=g), threads)


def _add_at_threads(kernel, made, starts, rows, x, y, threads):
    """The kernel's sums with ``threads`` torch threads against each row's dense deltas."""
    expected = y.clone()
    for t, (_, dense) in enumerate(made):
        for r in rows[starts[t]:starts[t + 1]]:
            expected[r] += dense @ x[r]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kernel.add(kernel.prepare([d for d, _ in made]), starts, rows, x, y)
    finally:
        torch.set_num_threads(before)
    assert torch.allclose(y, expected, atol=1e-4), float((y - expected).abs().max())


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_entries_over_32_lanes_run_window_by_window_over_every_chunk(any_kernel, threads):
    """A block of 32 rows: an entry over all of them and one over lanes 2..28 (both run 16 lanes at a time, or 8
    with 128-bit vectors on x86, chunk by chunk of 64 rows: 200 output rows make four, the last partial), one
    over lanes 25..28 and one over 29..31 (narrow windows)."""
    g = torch.Generator().manual_seed(21 + threads)
    made = [_delta(200, 48, 0.2, g) for _ in range(4)]
    starts = [0, 32, 32 + 27, 32 + 27 + 4, 32 + 27 + 4 + 3]
    rows = [*range(32), *range(3, 30), *range(20, 24), 1, 2, 30]
    at = any_kernel.layout(starts, rows)
    assert at.block_start.tolist()[:2] == [0, 32]  # one block of 32 rows
    assert [m & 0xFFFFFFFF for m in at.entry_mask.tolist()[:4]] == [0xFFFFFFFF, 0x1FFFFFFC, 0x1E000000, 0xE0000000]
    _add_at_threads(any_kernel, made, starts, rows, torch.randn(34, 48, generator=g),
                    torch.randn(34, 200, generator=g), threads)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_wide_entry_leaves_out_the_windows_without_its_rows(any_kernel, threads):
    """An entry on lanes 0..7 and 24..31 of a block of 32: a window of 32 lanes, whose lanes 8..23 (two windows
    of 8 with 128-bit vectors on x86) hold none of its rows and are left out; the rows there get only their
    own adapter."""
    g = torch.Generator().manual_seed(31 + threads)
    made = [_delta(130, 40, 0.2, g) for _ in range(3)]
    starts = [0, 8, 24, 40]
    rows = [*range(8), *range(8, 24), *range(8), *range(24, 32)]
    at = any_kernel.layout(starts, rows)
    assert at.block_start.tolist() == [0, 32] and at.rows.tolist() == list(range(32))
    assert [m & 0xFFFFFFFF for m in at.entry_mask.tolist()] == [0xFF, 0xFFFF00, 0xFF0000FF]
    _add_at_threads(any_kernel, made, starts, rows, torch.randn(32, 40, generator=g),
                    torch.randn(32, 130, generator=g), threads)


def test_a_row_outside_an_entry_never_reaches_its_sums(any_kernel):
    """A block computes an entry's sums for all its lanes and clears those of rows outside the entry: an input
    that is not finite in such a row stays out of the others' outputs."""
    g = torch.Generator().manual_seed(5)
    (a, dense_a), (b, dense_b) = _delta(8, 12, 0.5, g), _delta(8, 12, 0.5, g)
    x = torch.randn(3, 12, generator=g)
    x[0] = float("inf")  # row 0 has adapter a only; rows 1 and 2 have a and b
    y = torch.zeros(3, 8)
    any_kernel.add(any_kernel.prepare([a, b]), [0, 3, 5], [0, 1, 2, 1, 2], x, y)
    assert torch.allclose(y[1:], x[1:] @ (dense_a + dense_b).T, atol=1e-4)


def test_a_chains_routes_share_blocks(sparse_kernel):
    """A chain's routes (route k: adapters 0..k) over 48 rows, 6 each, interleaved in the batch: ordered by route,
    a block of 32 rows needs adapters 0..5 and one of 16 all 8 (14 delta passes), where blocks in batch order
    would need all 8 twice; a later adapter's rows are the block's last lanes."""
    routes = [list(range(i % 8 + 1)) for i in range(48)]
    starts, rows = [0], []
    for t in range(8):
        rows += [r for r, route in enumerate(routes) if t in route]
        starts.append(len(rows))
    at = sparse_kernel.layout(starts, rows)
    assert at.block_start.tolist() == [0, 32, 48] and at.entry_start.tolist() == [0, 6, 14]
    assert at.lanes == 48
    masks = {t: m & 0xFFFFFFFF for t, m in zip(at.entry_adapter[:6].tolist(), at.entry_mask[:6].tolist())}
    assert masks[0] == 0xFFFFFFFF and masks[5] == 0xC0000000  # every row has adapter 0; 2 rows of route 0..5
    with pytest.raises(ValueError, match="twice"):
        sparse_kernel.layout([0, 2], [1, 1])


def test_empty_deltas_and_wrong_inputs_are_refused_or_harmless(sparse_kernel):
    g = torch.Generator().manual_seed(3)
    empty, _ = _delta(6, 5, 0.0, g)
    assert empty.nnz == 0
    group = sparse_kernel.prepare([empty])
    y = torch.randn(2, 6)
    before = y.clone()
    at = sparse_kernel.layout([0, 2], [1, 0])
    assert sparse_kernel.scratch_size(group, at) == 2 * (5 + 6)  # one block of 2 lanes: inputs and sums
    sparse_kernel.add_at(group, at, torch.randn(2, 5), y, torch.empty(22))
    assert torch.equal(y, before)
    with pytest.raises(ValueError, match="fp32"):
        sparse_kernel.add(group, [0, 1], [0], torch.randn(1, 5, dtype=torch.float64), y)
    with pytest.raises(ValueError, match="scratch too small"):
        sparse_kernel.add_at(group, at, torch.randn(2, 5), y, torch.empty(21))
    with pytest.raises(ValueError, match="too small"):  # row 2 is past x and y
        sparse_kernel.add(group, [0, 1], [2], torch.randn(2, 5), y)
    with pytest.raises(ValueError, match="adapters"):
        sparse_kernel.add(group, [0, 1, 2], [0, 1], torch.randn(2, 5), y)
    with pytest.raises(ValueError, match="starts"):
        sparse_kernel.add(group, [0, 3], [0, 1], torch.randn(2, 5), y)
    assert torch.equal(y, before)
    wide = dataclasses.replace(empty, shape=(6, 40000), col=empty.col.to(torch.int16))
    with pytest.raises(ValueError, match="int16 columns"):
        sparse_kernel.prepare([wide])
    with pytest.raises(ValueError, match="shapes"):
        sparse_kernel.prepare([empty, _delta(7, 5, 0.5, g)[0]])
    tall, _ = _delta(130, 5, 0.5, g)
    with pytest.raises(ValueError, match="perm"):  # a stored row's output row outside its chunk
        sparse_kernel.prepare([dataclasses.replace(tall, perm=tall.perm.flip(0))])


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


def test_a_deltas_table_entry_is_checked_once_and_kept_with_it(sparse_kernel):
    """A batch whose rows change prepares its tables again: each delta's entry is made once and kept with the
    delta, whatever table it goes into; a copy with other values (``dataclasses.replace``) gets its own."""
    g = torch.Generator().manual_seed(5)
    (a, dense_a), (b, dense_b) = _delta(70, 9, 0.3, g), _delta(70, 9, 0.3, g)
    sparse_kernel.prepare([a, b])
    entry = a._lazy["kernel_entry"]
    assert entry.val == a.val.data_ptr() and entry.perm == a.perm.data_ptr()
    doubled = dataclasses.replace(a, val=a.val * 2)
    assert "kernel_entry" not in doubled._lazy
    group = sparse_kernel.prepare([b, doubled, a])
    assert a._lazy["kernel_entry"] is entry and doubled._lazy["kernel_entry"].val == doubled.val.data_ptr()
    x = torch.randn(3, 9, generator=g)
    y = torch.zeros(3, 70)
    sparse_kernel.add(group, [0, 1, 2, 3], [2, 1, 0], x, y)  # row 2: b, row 1: a doubled, row 0: a
    want = torch.stack([x[0] @ dense_a.T, 2 * x[1] @ dense_a.T, x[2] @ dense_b.T])
    assert torch.allclose(y, want, atol=1e-5)
