"""The registry: routes from the manifests' parents, the @stack sums and overlap figures kept up to date one task
at a time (a deletion rebuilds them), and the adapters it refuses (over max_tasks, a missing or changed parent)."""
from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from adapters_store import AdapterStore
from server.bank import BASE, DENSE_ABOVE, STACK, Groups, group_delta
from server.metrics import Metrics
from server.registry import Registry
from server.runner import projection_layout
from support import put_task, served_deltas, task_deltas


def make_registry(tiny_base, store, **kw) -> Registry:
    return Registry(store, tiny_base.model, tiny_base.fingerprint, "cpu", Metrics(), projection_layout(tiny_base.model),
                    **kw)


def brute_force(store: AdapterStore, state) -> tuple[dict, dict]:
    """Each served task's overlap with the earlier served tasks' non-zero positions, and the per-layer @stack sum,
    from the stored deltas."""
    seen, sums, overlap = {}, {}, {}
    for name in state.tasks:  # in order
        deltas = served_deltas(store, name)
        hit = nz = 0
        for layer, d in deltas.items():
            mask = d != 0
            nz += int(mask.sum())
            if layer in seen:
                hit += int((mask & seen[layer]).sum())
                seen[layer] |= mask
                sums[layer] += d
            else:
                seen[layer], sums[layer] = mask.clone(), d.clone()
        overlap[name] = hit / nz
    return overlap, sums


def check(store, state, tiny_base):
    overlap, sums = brute_force(store, state)
    assert {n: t.overlap for n, t in state.tasks.items()} == pytest.approx(overlap, abs=1e-12)
    for layer, total in sums.items():
        w = tiny_base.model.get_submodule(layer).weight
        assert torch.allclose(state.stack.merged[layer], w + total, atol=1e-6), layer


def check_gauges(registry: Registry, state) -> None:
    """The per-task gauges show exactly the served tasks' figures (only changed series are set again)."""
    metrics = registry.metrics.registry
    for gauge, field in [("jumplora_adapter_density", "density"), ("jumplora_adapter_nonzero_params", "nonzero"),
                         ("jumplora_adapter_overlap_ratio", "overlap")]:
        shown = {s.labels["task"]: s.value for m in metrics.collect() if m.name == gauge for s in m.samples}
        assert shown == pytest.approx({name: getattr(info, field) for name, info in state.tasks.items()}), gauge


def test_registration_is_incremental_and_deletion_rebuilds(tiny_base, tmp_path, monkeypatch):
    store = AdapterStore(tmp_path / "store")
    registry = make_registry(tiny_base, store)
    rebuilds = []
    original = registry._rebuild
    monkeypatch.setattr(registry, "_rebuild", lambda: (rebuilds.append(1), original())[1])
    for i in range(5):
        put_task(store, f"t{i}", task_deltas(tiny_base.model, 0.2, seed=40 + i), tiny_base.fingerprint, i)
        state = registry.refresh()
        check(store, state, tiny_base)
        check_gauges(registry, state)
    assert rebuilds == [] and list(state.tasks) == [f"t{i}" for i in range(5)]
    assert all(state.tasks[f"t{i}"].overlap > 0 for i in range(1, 5)) and state.tasks["t0"].overlap == 0
    assert registry.refresh() is None  # nothing changed
    store.trash("t1")
    state = registry.refresh()
    assert rebuilds == [1] and list(state.tasks) == ["t0", "t2", "t3", "t4"]
    check(store, state, tiny_base)  # overlaps now against the tasks still served
    check_gauges(registry, state)  # t1's series gone, the later tasks' overlaps shown anew
    assert state.tasks["t4"].nbytes > 0 and state.route(BASE) == () and state.route(STACK) == (state.stack,)


def test_refused_adapters_and_a_parent_removed_by_hand(tiny_base, tmp_path):
    store = AdapterStore(tmp_path / "store")
    fp = tiny_base.fingerprint
    put_task(store, "a", task_deltas(tiny_base.model, 0.05, seed=1), fp, 0)
    put_task(store, "b", task_deltas(tiny_base.model, 0.05, seed=2), fp, 1, parents=["a"])
    put_task(store, "c", task_deltas(tiny_base.model, 0.05, seed=3), fp, 2, parents=["a", "b"])
    metrics = Metrics()
    registry = Registry(store, tiny_base.model, fp, "cpu", metrics, projection_layout(tiny_base.model), max_tasks=2)
    state = registry.refresh()
    assert list(state.tasks) == ["a", "b"]  # c is one over max_tasks
    assert 'reason="TooManyTasks",task="c"' in metrics.render().decode()
    assert [a.name for a in state.route("b")] == ["a", "b"]

    # a parent changed under the same name, or gone: the child is refused
    other = AdapterStore(tmp_path / "other")
    put_task(other, "a", task_deltas(tiny_base.model, 0.05, seed=1), fp, 0)
    put_task(other, "b", task_deltas(tiny_base.model, 0.05, seed=2), fp, 1, parents=["a"])
    shutil.rmtree(other.path("a"))
    put_task(other, "a", task_deltas(tiny_base.model, 0.05, seed=9), fp, 0)  # another "a"
    put_task(other, "zz", task_deltas(tiny_base.model, 0.05, seed=5), fp, 0)
    put_task(other, "d", task_deltas(tiny_base.model, 0.05, seed=4), fp, 2, parents=["zz"])
    shutil.rmtree(other.path("zz"))
    metrics = Metrics()
    state = Registry(other, tiny_base.model, fp, "cpu", metrics, projection_layout(tiny_base.model)).refresh()
    assert list(state.tasks) == ["a"]
    text = metrics.render().decode()
    assert 'reason="ChangedParent",task="b"' in text and 'reason="MissingParent",task="d"' in text

    # removed by hand (or by another replica) while served: the child keeps its whole route
    registry = make_registry(tiny_base, store)
    registry.refresh()
    store.trash("a")
    state = registry.refresh()
    assert list(state.tasks) == ["b", "c"] and [a.name for a in state.route("c")] == ["a", "b", "c"]


def test_many_at_once_are_read_in_parallel_and_added_in_order(tiny_base, tmp_path):
    """A start-up: more than 8 new adapters are read two at a time; routes and sums come out as one by one."""
    store = AdapterStore(tmp_path / "store")
    fp = tiny_base.fingerprint
    for i in range(12):
        parents = [f"t{i - 1}"] if i % 3 else []
        put_task(store, f"t{i}", task_deltas(tiny_base.model, 0.2, seed=60 + i), fp, i, parents=parents)
    state = make_registry(tiny_base, store).refresh()
    assert list(state.tasks) == [f"t{i}" for i in range(12)]
    assert [a.name for a in state.route("t5")] == ["t4", "t5"] and state.tasks["t6"].route == ("t6",)
    check(store, state, tiny_base)


@pytest.mark.parametrize("density", [0.03, 0.2])  # served sparse (kernel rows), and dense above DENSE_ABOVE
def test_groups_are_built_on_first_use_as_loading_would_build_them(tiny_base, tmp_path, density):
    """A loaded adapter's groups wait as stored deltas; each one's first use builds what ``group_delta`` builds,
    once even when two threads ask at the same time; its size is known before; a deletion's rebuild reads built
    and pending groups alike."""
    store = AdapterStore(tmp_path / "store")
    for i in range(3):
        put_task(store, f"t{i}", task_deltas(tiny_base.model, density, seed=80 + i), tiny_base.fingerprint, i)
    registry = make_registry(tiny_base, store)
    state = registry.refresh()
    adapter = state.route("t0")[-1]
    groups = adapter.groups
    assert isinstance(groups, Groups) and len(groups) > 0
    assert all(groups.stored(layers) is not None for layers in groups)  # nothing built by loading
    size = adapter.nbytes
    stored = store.get("t0").deltas
    layout = projection_layout(tiny_base.model)
    assert list(groups) == [layers for layers, _ in layout if any(n in stored for n in layers)]  # model order
    widths = dict(layout)
    with ThreadPoolExecutor(4) as pool:
        for layers in groups:
            built = list(pool.map(groups.__getitem__, [layers] * 8))
            assert all(b is built[0] for b in built)
            assert groups.stored(layers) is None and layers in groups
            eager = group_delta({n: stored[n] for n in layers if n in stored}, (layers, widths[layers]))
            assert built[0].kind == eager.kind == ("sparse" if density < DENSE_ABOVE else "dense")
            for name in ("crow", "col", "val", "perm", "dense"):
                a, b = getattr(built[0], name), getattr(eager, name)
                assert (a is None and b is None) or torch.equal(a, b), name
    assert sum(groups[layers].nbytes for layers in groups) == size == adapter.nbytes
    with pytest.raises(KeyError):
        groups[("no.such.layer",)]
    store.trash("t1")  # t0 built, t2 pending
    check(store, registry.refresh(), tiny_base)
