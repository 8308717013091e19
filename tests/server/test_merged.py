"""The cache of merged weights (server/merged.py): sized up front, least recently used dropped beyond the
budget, a set larger than the budget refused, sets of deleted adapters dropped; its gauges follow."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from server.merged import MergedRoutes, merged_size
from server.metrics import Metrics

MB = 1 << 20


def _adapter(name: str, groups: dict[str, tuple[int, int]]):
    return SimpleNamespace(name=name, groups={(g,): SimpleNamespace(shape=shape) for g, shape in groups.items()})


def test_sets_are_sized_kept_and_dropped_least_recently_used_first():
    a = _adapter("a", {"qkv.0": (256, 1024)})  # 1 MB of fp32 weights
    b = _adapter("b", {"qkv.0": (256, 1024), "qkv.1": (256, 1024)})  # 2 MB
    c = _adapter("c", {"qkv.1": (256, 1024)})
    assert merged_size((a,)) == MB and merged_size((a, b)) == 2 * MB  # a group counts once per set
    metrics = Metrics()
    cache = MergedRoutes(3 * MB, merged_size, metrics)
    first = cache.get((a, b))
    assert cache.get((b, a)) is first and first.route == (a, b)  # a set, in any order
    ca = cache.get((c,))
    assert cache.used == 3 * MB and len(cache) == 2
    cache.get((a, b))  # used again: c's set is now the least recent
    cache.get((a,))  # 1 MB more: c's set goes
    assert len(cache) == 2 and cache.get((a, b)) is first and cache.get((c,)) is not ca
    assert cache.used <= 3 * MB
    assert cache.get((_adapter("big", {"qkv.0": (1024, 1024)}),)) is None  # 4 MB alone: never cached
    cache.retain({id(a), id(b)})  # c deleted
    assert len(cache) == 1 and cache.used == 2 * MB
    text = metrics.render().decode()
    assert "jumplora_merged_weights_sets 1.0" in text and "jumplora_merged_weights_bytes 2.097152e+06" in text


def test_merged_weights_are_the_base_plus_every_delta(tiny_base):
    """One group's merged product equals the base product plus each adapter's delta, built once."""
    from server.bank import GroupDelta, served_form
    from server.kernels import Linear

    torch.manual_seed(0)
    w = torch.randn(12, 8)
    base = Linear([w[:8], w[8:]], [None, torch.randn(4)])
    d1 = torch.where(torch.rand(12, 8) < 0.3, torch.randn(12, 8), torch.zeros(()))
    csr = d1.to_sparse_csr()
    sparse = GroupDelta(shape=(12, 8), nnz=int((d1 != 0).sum()),
                        **served_form(csr.crow_indices(), csr.col_indices(), csr.values(), 8))
    dense = GroupDelta(shape=(12, 8), nnz=96, dense=torch.randn(12, 8))
    lowrank = GroupDelta(shape=(12, 8), nnz=96, lowrank=(torch.randn(2, 8), torch.randn(12, 2)))
    layers = ("q", "kv")
    route = tuple(SimpleNamespace(groups={layers: g}) for g in (sparse, dense, lowrank))
    metrics = Metrics()
    entry = MergedRoutes(MB, merged_size, metrics).get(route)
    product = entry.merged_linear(layers, base)
    assert entry.merged_linear(layers, base) is product
    assert product.packed is None or product.parts[0][0] is None  # packed: the fp32 sum is not kept besides
    assert entry.merged_linear(("o",), base) is base  # a group no adapter of the set adapts: the base's own
    x = torch.randn(5, 8)
    expected = base(x) + x @ (d1 + dense.dense + lowrank.lowrank[1] @ lowrank.lowrank[0]).T
    assert torch.allclose(product(x), expected, atol=1e-5)
    assert "jumplora_merged_weights_builds_total 1.0" in metrics.render().decode()
