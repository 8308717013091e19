"""The Triton kernels of the sparse deltas (``server/triton_delta.py``), run on CPU through Triton's interpreter
(TRITON_INTERPRET=1) against a dense torch reference: several adapters whose positions overlap and are
scattered in the batch, fp32, bf16 and mixed delta values, empty rows, an adapter with no non-zeros and one
with no positions, sizes that are no multiple of the blocks, x and y as strided views, y fp32 and bf16; the
bank's own deltas (``make_adapter``) against their torch product; and the module importable without triton.
triton is a dev dependency: without it these tests fail, they do not skip."""
from __future__ import annotations

import dataclasses
import importlib.util
import sys

import pytest
import torch

from adapters_store import SparseDelta
from server import triton_delta as td
from server.bank import GroupDelta, group_delta, make_adapter

D_OUT, D_IN = 40, 24  # R = 40 rows: not a multiple of the row block (16)


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    """The interpreter on for this module: triton reads TRITON_INTERPRET when a kernel is decorated, and the
    kernels are decorated on their first use, keyed by the setting, so it is set before any."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        assert td.available(), "triton is a dev dependency (pip install -e '.[dev]')"
        assert td.interpreting()
        yield


def _delta(g, dtype, density=0.25, empty_rows=(), empty=False):
    """A sparse group delta (D_OUT, D_IN) of one layer through the bank's own path (``empty``: no non-zeros),
    and its dense form."""
    dense = torch.randn(D_OUT, D_IN, generator=g) * (torch.rand(D_OUT, D_IN, generator=g) < density)
    dense[list(empty_rows)] = 0
    if empty:
        delta = GroupDelta(shape=(D_OUT, D_IN), nnz=0, crow=torch.zeros(D_OUT + 1, dtype=torch.int32),
                           col=torch.zeros(0, dtype=torch.int32), val=torch.zeros(0, dtype=dtype))
    else:
        stored = SparseDelta.from_dense(dense, compact=dtype == torch.bfloat16)
        delta = group_delta({"layer": stored}, (("layer",), (D_OUT,)), dense_above=1.0)
        delta = dataclasses.replace(delta, val=delta.val.to(dtype))  # (on CPU served as fp32: bf16 as on CUDA)
    assert delta.kind == "sparse" and delta.val.dtype == dtype
    return delta, delta.to_dense()


def _reference(dense, starts, rows, x, y):
    """y + Σ_t Δ_t·x at each of adapter t's rows, in fp32: (N, R)."""
    expected = y.float().clone()
    for t, d in enumerate(dense):
        for p in rows[starts[t]:starts[t + 1]]:
            expected[p] += d @ x[p].float()
    return expected


@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16], ids=["y-fp32", "y-bf16"])
@pytest.mark.parametrize("values", ["fp32", "bf16", "mixed"])
def test_matches_dense_reference(values, y_dtype):
    g = torch.Generator().manual_seed(3 + 10 * ["fp32", "bf16", "mixed"].index(values) + (y_dtype == torch.bfloat16))
    dtypes = {"fp32": [torch.float32] * 5, "bf16": [torch.bfloat16] * 5,
              "mixed": [torch.bfloat16, torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]}[values]
    made = [_delta(g, dtypes[0], empty_rows=(0, 5, 6, 17, 39)),  # empty rows, the first and the last among them
            _delta(g, dtypes[1], density=0.6),
            _delta(g, dtypes[2], empty=True),  # no non-zeros
            _delta(g, dtypes[3]),  # no positions (below)
            _delta(g, dtypes[4], density=0.05)]
    n = 23  # positions: not a multiple of the position block (8)
    counts = [19, 11, 7, 0, 23]  # adapter 0 spans 3 position blocks; adapter 4 every position
    starts, rows = [0], []
    for c in counts:  # each adapter on a random subset of the positions, in random order: they overlap
        rows += torch.randperm(n, generator=g)[:c].tolist()
        starts.append(starts[-1] + c)
    x = torch.randn(n, D_IN + 5, generator=g)[:, 3:3 + D_IN]  # views with wider rows, as a fused product's
    y_full = torch.randn(n, D_OUT + 6, generator=g).to(y_dtype)
    y = y_full[:, 2:2 + D_OUT]
    expected = _reference([d for _, d in made], starts, rows, x, y)

    kernel = td.TritonDeltas(block_r=16, block_p=8)
    table = kernel.prepare([d for d, _ in made])
    assert table.val.dtype == (torch.float32 if values != "bf16" else torch.bfloat16)
    before = y_full.clone()
    kernel.add(table, torch.tensor(starts, dtype=torch.int32), torch.tensor(rows, dtype=torch.int32), x, y)

    if y_dtype == torch.float32:
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    else:  # rounded to bf16 once, from a sum in fp32 in another order than the reference's: 2 ulp at most
        torch.testing.assert_close(y.float(), expected.to(torch.bfloat16).float(), rtol=2 ** -6, atol=1e-6)
    # nothing else of y moved: the columns around the view, and the positions no adapter holds
    assert torch.equal(y_full[:, :2], before[:, :2]) and torch.equal(y_full[:, 2 + D_OUT:], before[:, 2 + D_OUT:])
    untouched = sorted(set(range(n)) - set(rows))
    assert torch.equal(y_full[untouched], before[untouched])


def test_deterministic_and_positions_reused():
    """The same positions (grouped once, as a plan keeps them) give bitwise the same sums on every call; a
    position that stands twice under one adapter gets its delta twice."""
    g = torch.Generator().manual_seed(11)
    made = [_delta(g, torch.bfloat16) for _ in range(3)]
    n = 10
    starts, rows = [0, 4, 9, 12], [1, 3, 5, 7, 0, 1, 2, 3, 9, 3, 3, 8]
    x = torch.randn(n, D_IN, generator=g, dtype=torch.float32)
    y0 = torch.randn(n, D_OUT, generator=g)
    kernel = td.TritonDeltas(block_r=32, block_p=4)
    table, at = kernel.prepare([d for d, _ in made]), kernel.positions(starts, rows)
    assert at.unique.tolist() == [0, 1, 2, 3, 5, 7, 8, 9] and at.last == 9
    results = []
    for _ in range(2):
        y = y0.clone()
        kernel.add_at(table, at, x, y)
        results.append(y)
    assert torch.equal(results[0], results[1])
    torch.testing.assert_close(results[0], _reference([d for _, d in made], starts, rows, x, y0),
                               rtol=1e-5, atol=1e-5)


def test_bank_adapters_match_their_torch_product():
    """Deltas made by the bank's own path (``make_adapter``: a q/k/v group of which q and v are adapted, bf16
    compact values as stored; made on CPU, so in the CPU's served form, int16 columns and the values widened to
    fp32) give what ``GroupDelta.apply`` (torch's CSR product, the plan's other path) does; x and y bf16 as a
    GPU model runs them."""
    g = torch.Generator().manual_seed(5)
    layers, widths = ("m.q_proj", "m.k_proj", "m.v_proj"), (32, 16, 16)
    group = (layers, widths)
    adapters = []
    for i in range(3):
        dense = {name: torch.randn(w, D_IN, generator=g) * 0.05 * (torch.rand(w, D_IN, generator=g) < 0.1)
                 for name, w in zip(layers, widths) if name != "m.k_proj"}
        stored = {name: SparseDelta.from_dense(d, compact=True) for name, d in dense.items()}
        adapters.append(make_adapter(f"task-{i}", stored, [group], dense_above=0.5))  # 10 %: sparse
    deltas = [a.groups[layers] for a in adapters]
    assert all(d.kind == "sparse" and d.col.dtype == torch.int16 and d.val.dtype == torch.float32 for d in deltas)
    n = 9
    members = [[0, 1, 2, 3, 4], [2, 3, 4], [4, 7, 8]]  # a chain: positions 2..4 hold two or three adapters
    x = torch.randn(n, D_IN, generator=g).to(torch.bfloat16)
    y = torch.randn(n, sum(widths), generator=g).to(torch.bfloat16)
    expected = y.float().clone()
    for d, pos in zip(deltas, members):
        expected[pos] += d.apply(x[pos])
    kernel = td.TritonDeltas(block_r=16, block_p=4)
    starts = [0, 5, 8, 11]
    kernel.add(kernel.prepare(deltas), starts, [p for pos in members for p in pos], x, y)
    torch.testing.assert_close(y.float(), expected.to(torch.bfloat16).float(), rtol=2 ** -6, atol=1e-6)


def test_rejects_bad_arguments():
    g = torch.Generator().manual_seed(2)
    (a, _), (b, _) = _delta(g, torch.float32), _delta(g, torch.bfloat16)
    kernel = td.TritonDeltas()
    with pytest.raises(ValueError, match="shapes"):
        kernel.prepare([a, group_delta({"l": SparseDelta.from_dense(torch.eye(4))}, (("l",), (4,)), dense_above=1)])
    table = kernel.prepare([a, b])
    x, y = torch.randn(4, D_IN), torch.randn(4, D_OUT)
    with pytest.raises(ValueError, match="past"):
        kernel.add(table, [0, 1, 2], [0, 4], x, y)
    with pytest.raises(ValueError, match="adapters"):
        kernel.add(table, [0, 2], [0, 1], x, y)
    with pytest.raises(ValueError, match="too small"):
        kernel.add(table, [0, 1, 2], [0, 1], x[:, :-1], y)
    with pytest.raises(ValueError, match="ascend"):
        kernel.add(table, [0, 2, 1], [0, 1], x, y)


def test_imports_without_triton(monkeypatch):
    """The CPU server imports the module where triton is not installed: triton is imported on first use only."""
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("triton_delta_without_triton", td.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    assert not module.available()
    assert not module.applies_to(torch.device("cuda"))


def test_the_plan_serves_mixed_routes_through_the_triton_kernel(tiny_base, tmp_path):
    """The engine's plan with the Triton kernel (as on CUDA, here interpreted on the CPU) against the same plan
    on torch's products: decode rows on routes of one and two adapters (a chain), @base, and a prompt segment,
    over every projection group of the tiny model."""
    from server.bank import BASE, KernelTables, Plan
    from server.kernels import Linear
    from support import make_bank

    state, _ = make_bank(tiny_base.model, tmp_path / "bank", tiny_base.fingerprint)
    rows = [state.route(n) for n in ("sparse-a", "chain-d", BASE, "dense-b", "chain-d", "lowrank-c")]
    segments = [(6, 10, state.route("chain-d")), (10, 12, state.route("sparse-a"))]
    tables = KernelTables(td.TritonDeltas(block_r=16, block_p=4))
    with_kernel = Plan(rows, segments, torch.device("cpu"), tables)
    without = Plan(rows, segments, torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    used = 0
    for layers, delta in state.route("chain-d")[-1].groups.items():
        d_in = delta.shape[1]
        lin = Linear([torch.zeros(delta.shape[0], d_in)], pack=False)
        x = torch.randn(12, d_in, generator=g)
        expected = without.project(layers, lin, x)
        got = with_kernel.project(layers, lin, x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        used += with_kernel._groups[layers][0] is not None
    assert used > 0  # the kernel did the sparse adapters' part (dense and low-rank ones stay on torch)
