"""AdapterStore: round trips, manifests, refusals on load, immutability and failed writes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch

from adapters_store import (
    FORMAT_VERSION,
    AdapterExists,
    AdapterNotFound,
    AdapterStore,
    CorruptAdapter,
    ForeignAdapter,
    InvalidTaskName,
    LowRankDelta,
    MalformedAdapter,
    SparseDelta,
    StoreWriteError,
    UnsupportedFormat,
)
from adapters_store import atomic

FP = "a1" * 32  # a base fingerprint
Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"


def meta(**changes) -> dict:
    return {"base_fingerprint": FP, "method": "jumplora", "regularizer": "incremental", "order": 0, **changes}


def sparse(seed: int, shape=(8, 16)) -> SparseDelta:
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.3)
    return SparseDelta.from_dense(dense)


def lowrank(seed: int, shape=(8, 16), r=2, scale=4.0) -> LowRankDelta:
    g = torch.Generator().manual_seed(seed)
    return LowRankDelta(torch.randn(r, shape[1], generator=g), torch.randn(shape[0], r, generator=g), scale)


def put_one(store: AdapterStore, task="foo", **meta_changes) -> dict:
    return store.put(task, {Q: sparse(1), V: lowrank(2)}, meta(**meta_changes))


def rewrite(store: AdapterStore, task: str, tensors: dict | None = None, /, **manifest_changes) -> None:
    """Tamper with a stored adapter by hand; with `tensors`, fix the checksum so it still matches."""
    folder = store.path(task)
    for p in folder.iterdir():
        os.chmod(p, 0o644)
    if tensors is not None:
        blob = safetensors.torch.save(tensors)
        (folder / "adapter.safetensors").write_bytes(blob)
        manifest_changes["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(manifest_changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def stored_tensors(store: AdapterStore, task: str) -> dict:
    return safetensors.torch.load_file(store.path(task) / "adapter.safetensors")


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- deltas and round trips ---------------------------------------------------------------------


def test_sparse_from_dense_keeps_nonzeros_in_row_major_order():
    dense = torch.tensor([[0.0, 1.5, 0.0], [-2.0, 0.0, 3.0]])
    d = SparseDelta.from_dense(dense)
    assert d.shape == (2, 3)
    assert d.indices.tolist() == [1, 3, 5] and d.indices.dtype == torch.int64
    assert d.values.tolist() == [1.5, -2.0, 3.0] and d.values.dtype == torch.float32
    assert d.nnz == 3
    assert torch.equal(d.to_dense(), dense)


def test_lowrank_to_dense_and_nnz():
    A = torch.tensor([[1.0, 0.0, 2.0]])  # (1, 3)
    B = torch.tensor([[1.0], [0.0]])  # (2, 1)
    d = LowRankDelta(A, B, 0.5)
    assert d.shape == (2, 3) and d.rank == 1
    assert torch.equal(d.to_dense(), torch.tensor([[0.5, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    assert d.nnz == 2


def test_round_trip_returns_exact_tensors(tmp_path):
    store = AdapterStore(tmp_path / "nested" / "root")  # parents are created
    s, lr = sparse(1, (32, 24)), lowrank(2, (16, 40), r=3, scale=2.5)
    store.put("foo", {Q: s, V: lr}, meta())
    got = store.get("foo", fingerprint=FP, layer_shapes={Q: (32, 24), V: (16, 40), "other": (1, 1)})
    assert got.name == "foo" and set(got.deltas) == {Q, V}
    gs, glr = got.deltas[Q], got.deltas[V]
    assert isinstance(gs, SparseDelta) and isinstance(glr, LowRankDelta)
    assert gs.shape == (32, 24) and torch.equal(gs.indices, s.indices) and torch.equal(gs.values, s.values)
    assert torch.equal(glr.A, lr.A) and torch.equal(glr.B, lr.B) and glr.scale == 2.5
    assert torch.equal(gs.to_dense(), s.to_dense()) and torch.equal(glr.to_dense(), lr.to_dense())
    assert gs.nnz == s.nnz > 0 and glr.nnz == lr.nnz
    assert set(stored_tensors(store, "foo")) == {f"{Q}.indices", f"{Q}.values", f"{V}.A", f"{V}.B"}


def test_manifest_fields_and_checksum(tmp_path):
    store = AdapterStore(tmp_path)
    written = put_one(store, rank=8, alpha=32, targets=["q_proj", "v_proj"], parents=[], metrics={"acc": 0.5})
    on_disk = (store.path("foo") / "manifest.json").read_text()
    manifest = json.loads(on_disk)
    assert on_disk == json.dumps(manifest, sort_keys=True, indent=1) + "\n"
    assert manifest == written == store.manifest("foo") == store.verify("foo")
    assert manifest["format_version"] == FORMAT_VERSION and manifest["task"] == "foo"
    assert manifest["created_at"].endswith("Z") and manifest["created_at"][:4].isdigit()
    assert manifest["targets"] == ["q_proj", "v_proj"] and manifest["metrics"] == {"acc": 0.5}
    assert manifest["layers"] == {
        Q: {"kind": "sparse", "shape": [8, 16], "nnz": sparse(1).nnz},
        V: {"kind": "lowrank", "shape": [8, 16], "nnz": lowrank(2).nnz, "rank": 2, "scale": 4.0},
    }
    digest = hashlib.sha256((store.path("foo") / "adapter.safetensors").read_bytes()).hexdigest()
    assert manifest["tensors_sha256"] == digest == store.file_sha256("foo")


def test_names_and_list_order_skip_dot_and_broken_folders(tmp_path, caplog):
    store = AdapterStore(tmp_path)
    put_one(store, "late", order=2)
    put_one(store, "b", order=1, created_at="2026-01-01T00:00:00Z")
    put_one(store, "a", order=1, created_at="2026-01-01T00:00:00Z")
    put_one(store, "early", order=1, created_at="2025-01-01T00:00:00Z")
    put_one(store, "zero", order=0)
    (tmp_path / ".tmp-x-host-1-ab").mkdir()
    (tmp_path / ".trash").mkdir()
    (tmp_path / "broken").mkdir()  # no manifest
    (tmp_path / "file.lock").write_text("")
    expected = ["zero", "early", "a", "b", "late"]
    assert store.names() == expected
    assert [m["task"] for m in store.list()] == expected
    assert "broken" in caplog.text and "manifest.json" in caplog.text
    assert store.exists("broken") and not store.exists("nothing")


# ---- refusals on put --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "@stack", "Upper", "", "a" * 65, "a/b", "x\n", ".hidden"])
def test_invalid_names_are_refused_without_touching_disk(tmp_path, name):
    store = AdapterStore(tmp_path)
    with pytest.raises(InvalidTaskName) as err:
        store.put(name, {Q: sparse(1)}, meta())
    assert err.value.task == name
    for call in (store.get, store.path, store.manifest, store.exists):
        with pytest.raises(InvalidTaskName):
            call(name)
    assert list(tmp_path.iterdir()) == []


def test_longest_valid_name_is_accepted(tmp_path):
    store = AdapterStore(tmp_path)
    put_one(store, "a" * 64)
    assert store.names() == ["a" * 64]


def test_second_put_is_refused_and_files_stay_identical(tmp_path):
    store = AdapterStore(tmp_path)
    put_one(store)
    before = snapshot(tmp_path)
    with pytest.raises(AdapterExists, match="adapter 'foo'"):
        store.put("foo", {Q: sparse(9)}, meta(order=5))
    assert snapshot(tmp_path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["foo"]


@pytest.mark.parametrize(
    "change, key",
    [
        ({"base_fingerprint": None}, "base_fingerprint"),
        ({"method": "adam"}, "method"),
        ({"regularizer": "l2"}, "regularizer"),
        ({"order": -1}, "order"),
        ({"config": {"lr": float("nan")}}, "config"),
        ({"metrics": object()}, "metrics"),
        ({"layers": {}}, "layers"),
    ],
)
def test_bad_meta_is_refused_naming_the_key(tmp_path, change, key):
    store = AdapterStore(tmp_path)
    bad = {k: v for k, v in {**meta(), **change}.items() if v is not None}
    with pytest.raises(ValueError, match=key):
        store.put("foo", {Q: sparse(1)}, bad)
    assert list(tmp_path.iterdir()) == []


def _sp(indices, values, shape=(2, 3)):
    return SparseDelta(shape, torch.tensor(indices, dtype=torch.int64), torch.tensor(values, dtype=torch.float32))


def _bf16(indices, values, shape=(2, 3)):
    return SparseDelta(shape, torch.tensor(indices, dtype=torch.int32), torch.tensor(values, dtype=torch.bfloat16))


def test_extreme_finite_values_pass_the_finite_check(tmp_path):
    """bf16 values are checked by their exponent bits: the largest and smallest finite ones are no infinity."""
    big, tiny = torch.finfo(torch.bfloat16).max, torch.finfo(torch.bfloat16).smallest_normal
    store = AdapterStore(tmp_path)
    store.put("foo", {Q: sparse(1), V: _bf16([0, 1, 5], [-big, tiny / 4, big])}, meta())
    assert torch.equal(store.get("foo").deltas[V].values.float(), torch.tensor([-big, tiny / 4, big]))


@pytest.mark.parametrize(
    "delta, why",
    [
        (_sp([2, 1], [1.0, 2.0]), "strictly increasing"),
        (_sp([1, 1], [1.0, 2.0]), "strictly increasing"),
        (_sp([0, 6], [1.0, 2.0]), "out of range"),
        (_sp([-1, 0], [1.0, 2.0]), "out of range"),
        (_sp([0, 1], [1.0]), "values"),
        (_sp([0, 1], [1.0, float("inf")]), "finite"),
        (_sp([0, 1], [float("nan"), 1.0]), "finite"),
        (_bf16([0, 1], [1.0, float("nan")]), "finite"),
        (_bf16([0, 1], [float("-inf"), 1.0]), "finite"),
        (SparseDelta((2, 3), torch.tensor([0, 1], dtype=torch.int16), torch.ones(2)), "dtype"),
        (SparseDelta((2, 3), torch.tensor([0, 1]), torch.ones(2, dtype=torch.float64)), "dtype"),
        (SparseDelta((2, 0), torch.tensor([], dtype=torch.int64), torch.ones(0)), "shape"),
        (LowRankDelta(torch.ones(2, 3), torch.ones(4, 3), 1.0), "do not make"),
        (LowRankDelta(torch.ones(2, 3), torch.ones(4, 2), float("nan")), "scale"),
        (torch.ones(2, 3), "SparseDelta or LowRankDelta"),
    ],
)
def test_malformed_deltas_are_refused_before_writing(tmp_path, delta, why):
    store = AdapterStore(tmp_path)
    with pytest.raises(MalformedAdapter, match=why) as err:
        store.put("foo", {Q: sparse(1), V: delta}, meta())
    assert err.value.task == "foo" and V in err.value.reason
    assert list(tmp_path.iterdir()) == []


# ---- refusals on get ----------------------------------------------------------------------------


def test_missing_adapter_is_not_found(tmp_path):
    with pytest.raises(AdapterNotFound, match="adapter 'nope'"):
        AdapterStore(tmp_path).get("nope")


def test_flipped_byte_is_a_checksum_mismatch(tmp_path):
    store = AdapterStore(tmp_path)
    put_one(store)
    path = store.path("foo") / "adapter.safetensors"
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptAdapter, match=r"^adapter 'foo': checksum mismatch \(manifest says [0-9a-f]{12}…"):
        store.get("foo")
    with pytest.raises(CorruptAdapter):
        store.verify("foo")
    assert store.names() == ["foo"]  # listing reads manifests only


def test_other_base_is_foreign_and_checked_before_the_checksum(tmp_path):
    store = AdapterStore(tmp_path)
    put_one(store)
    other = "f0" * 32
    with pytest.raises(ForeignAdapter) as err:
        store.get("foo", fingerprint=other)
    assert err.value.task == "foo"
    assert FP[:12] in err.value.reason and other[:12] in err.value.reason and FP not in err.value.reason
    (store.path("foo") / "adapter.safetensors").unlink()
    with pytest.raises(ForeignAdapter):
        store.verify("foo", fingerprint=other)
    with pytest.raises(CorruptAdapter, match="cannot read adapter.safetensors"):
        store.verify("foo", fingerprint=FP)


@pytest.mark.parametrize("version", [99, None, "1", True])
def test_unknown_format_version_is_unsupported(tmp_path, caplog, version):
    store = AdapterStore(tmp_path)
    put_one(store)
    rewrite(store, "foo", format_version=version)
    with pytest.raises(UnsupportedFormat, match="adapter 'foo': format_version"):
        store.get("foo")
    with pytest.raises(UnsupportedFormat):
        store.manifest("foo")
    assert store.names() == [] and "format_version" in caplog.text


@pytest.mark.parametrize("text, why", [("{not json", "not valid JSON"), ("[1, 2]", "not a JSON object")])
def test_unreadable_manifest_is_corrupt(tmp_path, text, why):
    store = AdapterStore(tmp_path)
    put_one(store)
    os.chmod(store.path("foo") / "manifest.json", 0o644)
    (store.path("foo") / "manifest.json").write_text(text)
    with pytest.raises(CorruptAdapter, match=why):
        store.get("foo")


def test_manifest_of_another_task_is_corrupt(tmp_path):
    store = AdapterStore(tmp_path)
    put_one(store)
    rewrite(store, "foo", task="bar")
    with pytest.raises(CorruptAdapter, match="'bar'"):
        store.get("foo")


def test_garbage_tensor_file_with_matching_checksum_is_corrupt(tmp_path):
    store = AdapterStore(tmp_path)
    put_one(store)
    path = store.path("foo") / "adapter.safetensors"
    os.chmod(path, 0o644)
    path.write_bytes(b"\xff" * 64)
    rewrite(store, "foo", tensors_sha256=hashlib.sha256(b"\xff" * 64).hexdigest())
    with pytest.raises(CorruptAdapter, match="cannot read adapter.safetensors"):
        store.get("foo")


def _tamper_cases():
    s, lr = sparse(1), lowrank(2)
    good = {f"{Q}.indices": s.indices, f"{Q}.values": s.values, f"{V}.A": lr.A, f"{V}.B": lr.B}

    def without(name):
        return {k: v for k, v in good.items() if k != name}

    return [
        ("missing tensor", without(f"{Q}.values"), "missing"),
        ("extra tensor", {**good, f"{Q}.bias": torch.zeros(3)}, "unexpected"),
        ("lengths differ", {**good, f"{Q}.values": s.values[:-1]}, "values"),
        ("values dtype", {**good, f"{Q}.values": s.values.double()}, "dtype"),
        ("indices dtype", {**good, f"{Q}.indices": s.indices.short()}, "dtype"),
        ("fewer entries than nnz", {**good, f"{Q}.indices": s.indices[:-1], f"{Q}.values": s.values[:-1]}, "nnz"),
        ("unsorted", {**good, f"{Q}.indices": s.indices.flip(0)}, "strictly increasing"),
        ("out of range", {**good, f"{Q}.indices": s.indices + 8 * 16}, "out of range"),
        ("A wrong shape", {**good, f"{V}.A": torch.ones(2, 17)}, "do not fit"),
        ("B wrong rank", {**good, f"{V}.A": torch.ones(3, 16), f"{V}.B": torch.ones(8, 3)}, "rank"),
    ]


@pytest.mark.parametrize("case, tensors, why", _tamper_cases(), ids=[c[0] for c in _tamper_cases()])
def test_tensors_that_do_not_fit_the_manifest_are_malformed(tmp_path, case, tensors, why):
    store = AdapterStore(tmp_path)
    put_one(store)
    rewrite(store, "foo", tensors)
    with pytest.raises(MalformedAdapter, match=why) as err:
        store.get("foo")
    assert str(err.value).startswith("adapter 'foo': ")


def test_layer_shapes_must_cover_every_layer_with_its_shape(tmp_path):
    store = AdapterStore(tmp_path)
    put_one(store)
    assert store.verify("foo", layer_shapes={Q: (8, 16), V: (8, 16)})["task"] == "foo"
    with pytest.raises(MalformedAdapter, match=f"layer '{V}' is not in the model"):
        store.get("foo", layer_shapes={Q: (8, 16)})
    with pytest.raises(MalformedAdapter, match=r"\(8, 16\), the model's is \(16, 8\)"):
        store.verify("foo", layer_shapes={Q: (16, 8), V: (8, 16)})


# ---- writing: immutability, failures, races, temp cleanup ----------------------------------------


def test_stored_files_are_read_only(tmp_path):
    store = AdapterStore(tmp_path)
    put_one(store)
    modes = {p.name: p.stat().st_mode & 0o777 for p in store.path("foo").iterdir()}
    assert modes == {"adapter.safetensors": 0o444, "manifest.json": 0o444}


def test_read_only_root_gives_a_write_error_and_leaves_nothing(tmp_path, monkeypatch):
    root = tmp_path / "store"
    store = AdapterStore(root)
    os.chmod(root, 0o555)
    try:
        if os.access(root, os.W_OK):  # root ignores the mode bits: simulate a read-only file system
            def refuse(path, *args, **kwargs):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

            monkeypatch.setattr(os, "mkdir", refuse)
        with pytest.raises(StoreWriteError, match="adapter 'foo': write failed") as err:
            put_one(store)
        assert err.value.task == "foo"
    finally:
        monkeypatch.undo()
        os.chmod(root, 0o755)
    assert list(root.iterdir()) == [] and store.names() == []


@pytest.mark.parametrize("step", ["fsync", "rename"])
def test_disk_full_during_write_leaves_nothing(tmp_path, monkeypatch, step):
    store = AdapterStore(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, step, disk_full)
    with pytest.raises(StoreWriteError, match="No space left on device"):
        put_one(store)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    put_one(store)  # the name is still free
    assert store.names() == ["foo"]


def test_target_appearing_during_write_is_adapter_exists(tmp_path, monkeypatch):
    store, rival = AdapterStore(tmp_path), AdapterStore(tmp_path)
    real_rename = os.rename

    def rename_after_rival(src, dst):
        monkeypatch.setattr(os, "rename", real_rename)
        put_one(rival)  # another writer wins the race
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_after_rival)
    with pytest.raises(AdapterExists, match="another writer"):
        store.put("foo", {Q: sparse(7)}, meta(order=3))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["foo"]
    assert store.verify("foo")["order"] == 0  # the rival's adapter, untouched


def test_cleanup_temp_removes_only_dead_or_stale_writers(tmp_path):
    store = AdapterStore(tmp_path)
    host = atomic._hostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    folders = {
        "dead": f".tmp-my-task-{host}-{dead_pid}-0a1b",
        "live": f".tmp-my-task-{host}-{os.getpid()}-0a1b",
        "other host": f".tmp-my-task-elsewhere-{dead_pid}-0a1b",
        "other host, same suffix": f".tmp-my-task-x{host}-{dead_pid}-0a1b",
        "other host, old": f".tmp-my-task-elsewhere-{dead_pid}-ffff",
        "unparsable, old": ".tmp-junk",
    }
    for name in folders.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter.safetensors").write_bytes(b"partial")
    day_ago = time.time() - 25 * 3600
    for key in ("other host, old", "unparsable, old"):
        os.utime(tmp_path / folders[key], (day_ago, day_ago))
    assert store.cleanup_temp() == 3
    kept = [folders[k] for k in ("live", "other host", "other host, same suffix")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert store.cleanup_temp() == 0


def test_compact_form_rounds_values_to_bf16_and_drops_underflow(tmp_path):
    dense = torch.tensor([[0.0, 1.0 + 2**-12, -3.0], [1e-44, 0.0, 0.5]])
    full = SparseDelta.from_dense(dense)
    small = SparseDelta.from_dense(dense, compact=True)
    assert full.indices.dtype == torch.int64 and full.values.dtype == torch.float32 and full.nnz == 4
    assert small.indices.dtype == torch.int32 and small.values.dtype == torch.bfloat16
    assert small.indices.tolist() == [1, 2, 5]  # 1e-44 (an fp32 subnormal) is 0 in bf16: dropped, not stored as a zero
    assert small.to_dense().tolist() == [[0.0, 1.0, -3.0], [0.0, 0.0, 0.5]]
    store = AdapterStore(tmp_path / "s")
    store.put("c", {"layer": small}, {"base_fingerprint": "f", "method": "jumplora", "regularizer": "incremental",
                                      "order": 0})
    back = store.get("c").deltas["layer"]
    assert back.values.dtype == torch.bfloat16 and torch.equal(back.to_dense(), small.to_dense())


def test_lineage_is_the_parents_then_the_task_each_checked(tmp_path):
    import shutil

    store = AdapterStore(tmp_path / "s")
    meta = {"base_fingerprint": "f", "method": "jumplora", "regularizer": "incremental"}
    one = {"layer": SparseDelta.from_dense(torch.tensor([[1.0, 0.0]]))}
    a = store.put("a", one, {**meta, "order": 0})
    store.put("b", one, {**meta, "order": 1, "parents": [{"task": "a", "sha256": a["tensors_sha256"]}]})
    assert [s.name for s in store.lineage("b")] == ["a", "b"] and [s.name for s in store.lineage("a")] == ["a"]
    shutil.rmtree(store.path("a"))
    with pytest.raises(AdapterNotFound, match="trained on 'a'"):
        store.lineage("b")
    store.put("a", {"layer": SparseDelta.from_dense(torch.tensor([[2.0, 0.0]]))}, {**meta, "order": 0})
    with pytest.raises(CorruptAdapter, match="not the adapter it was trained on"):
        store.lineage("b")
