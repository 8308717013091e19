"""Reads task adapters from the store into bank states: verified against this base model, each task's route
resolved from its manifest's ``parents``, refused ones skipped with a logged error and a metric, and the result
published to the engine and to the metrics.

Registering one more task costs the same however many are served: the ``@stack`` sums and the union of the
earlier tasks' non-zero positions (for the overlap figure) are kept per projection group and updated with the
new task's entries alone. Only a deletion (or a task older than the newest, from another replica) rebuilds
them from the served adapters.

Loading an adapter reads, verifies and lists its entries; its served form is built at its first use
(``bank.Groups``). With 1,000 adapters of the default size, that took a start-up from 57.5 s of loading to 24.5 s
(README, Scale)."""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch

from adapters_store import AdapterStore, SparseDelta, StoreError

from .bank import (Adapter, BankState, Group, Groups, TaskInfo, build_state, float32_values, make_adapter,
                   make_stack)
from .metrics import Metrics

log = logging.getLogger(__name__)

BATCH = 32  # tasks read, then added to the sums, at a time


@dataclass(frozen=True)
class Loaded:
    info: TaskInfo
    adapter: Adapter
    route: tuple[Adapter, ...]  # its parents' adapters, then its own (kept even if a parent leaves the store)
    entries: Entries | None = None  # its non-zero entries, only until it is added to the sums


Entries = dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]]  # group -> (flat positions int64, fp32 values)


def _stored_entries(deltas: dict, layout: list[Group]) -> Entries:
    """A stored adapter's non-zero entries per projection group, without building anything."""
    out: Entries = {}
    for layers, widths in layout:
        if any(name in deltas for name in layers):
            out[layers] = _group_entries(deltas, layers, widths)
    return out


def _group_entries(deltas: dict, layers: tuple[str, ...], widths: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One group's entries from its layers' stored deltas: a layer's flat position p in (d_out, d_in) is
    p + offset·d_in in the group's (Σ d_out, d_in). In numpy (see ``_sums``)."""
    pos, val, offset = [], [], 0
    for name, width in zip(layers, widths):
        d = deltas.get(name)
        if d is not None:
            if isinstance(d, SparseDelta):
                p, v = d.indices.numpy().astype(np.int64), float32_values(d.values)
            else:
                dense = d.to_dense().reshape(-1).numpy()
                p = np.flatnonzero(dense)
                v = dense[p]
            pos.append(p + offset * d.shape[1])
            val.append(v)
        offset += width
    return np.concatenate(pos), np.concatenate(val)


def _entries(adapter: Adapter, layers: tuple[str, ...], widths: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A served adapter's non-zero entries over a group: flat positions in (Σ d_out·d_in) (int64) and fp32
    values, in numpy (the rebuild after a deletion runs this for every served adapter), from its stored deltas
    while the group is not built."""
    stored = adapter.groups.stored(layers) if isinstance(adapter.groups, Groups) else None
    if stored is not None:
        return _group_entries(stored, layers, widths)
    delta = adapter.groups[layers]
    if delta.kind == "sparse":
        rows, col, val = delta.entries()
        return rows * delta.shape[1] + col, val
    dense = delta.to_dense().cpu().reshape(-1).numpy()
    positions = np.flatnonzero(dense)
    return positions, dense[positions].astype(np.float32)


class Registry:
    def __init__(self, store: AdapterStore, model: torch.nn.Module, fingerprint: str, device, metrics: Metrics,
                 layout: list[Group], max_tasks: int = 1000):
        self.store, self.model, self.fingerprint = store, model, fingerprint
        self.device, self.metrics, self.layout, self.max_tasks = device, metrics, layout, max_tasks
        linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        self.layer_shapes = {n: tuple(m.weight.shape) for n, m in linears.items()}
        self.weights = {n: m.weight for n, m in linears.items()}
        self.served_layers = {name for layers, _ in layout for name in layers}
        self.widths = dict(layout)  # group layers -> each one's d_out
        self._loaded: dict[str, Loaded] = {}  # in registration order
        self._refused: dict[str, str] = {}  # name -> reason, so that a bad adapter is reported once
        self._lock = threading.Lock()
        self._version = 0
        # per projection group: Σ of every served task's delta (fp32, (Σ d_out, d_in)) and the union of their
        # non-zero positions (bool, flat); the newest order they hold. In numpy, on purpose: its ops run on the
        # calling thread, where torch's would start its OpenMP pool next to the engine's, on cores the engine is
        # using (a registration took 0.8 s per adapter that way while the cores were busy).
        self._sums: dict[tuple[str, ...], np.ndarray] = {}
        self._union: dict[tuple[str, ...], np.ndarray] = {}
        self._newest = -1
        self._stack: Adapter | None = None

    # -- loading ------------------------------------------------------------------------------------------------

    def _refuse(self, name: str, reason: str, kind: str) -> None:
        if self._refused.get(name) != reason:
            log.error("skipping adapter %r: %s", name, reason)
            self.metrics.adapter_load_errors.labels(name, kind).inc()
            self._refused[name] = reason

    def _read(self, name: str) -> tuple:
        """What loading an adapter needs no other adapter for: read and verify it, build its served form and list
        its entries. (stored, adapter, entries), or (reason, kind) if it is refused. Thread-safe: a start-up runs
        several at once."""
        try:
            stored = self.store.get(name, fingerprint=self.fingerprint, layer_shapes=self.layer_shapes)
        except StoreError as e:
            return str(e), type(e).__name__
        unserved = sorted(set(stored.deltas) - self.served_layers)
        if unserved:
            return f"layer(s) {unserved[:3]} are not projections the engine serves", "UnservedLayer"
        return (stored, make_adapter(name, stored.deltas, self.layout, self.device),
                _stored_entries(stored.deltas, self.layout))

    def _load(self, name: str, read: tuple | None = None) -> Loaded | None:
        if len(self._loaded) >= self.max_tasks:
            self._refuse(name, f"the server already serves max_tasks={self.max_tasks} tasks", "TooManyTasks")
            return None
        read = read if read is not None else self._read(name)
        if len(read) == 2:
            self._refuse(name, *read)
            return None
        stored, adapter, entries = read
        m = stored.manifest
        # the route: the adapters it was trained on, exactly as they were then, and its own
        route = []
        for parent in m.get("parents", []):
            p = self._loaded.get(parent.get("task")) if isinstance(parent, dict) else None
            if p is None:
                self._refuse(name, f"it was trained on {parent!r}, which is not served", "MissingParent")
                return None
            if p.info.manifest["tensors_sha256"] != parent.get("sha256"):
                self._refuse(name, f"its parent {parent['task']!r} is not the adapter it was trained on",
                             "ChangedParent")
                return None
            route.append(p.adapter)
        nonzero = sum(d.nnz for d in stored.deltas.values())
        total = sum(d.shape[0] * d.shape[1] for d in stored.deltas.values())
        info = TaskInfo(name=name, order=int(m["order"]), manifest=m, nonzero=nonzero, total=total, overlap=0.0,
                        route=tuple(a.name for a in route) + (name,), nbytes=adapter.nbytes)
        return Loaded(info, adapter, (*route, adapter), entries)

    # -- the @stack sums and overlap ----------------------------------------------------------------------------

    def _add(self, batch: list[Loaded]) -> list[Loaded]:
        """Add tasks' entries to the sums and the union, in the batch's order; each one's overlap with the tasks
        added before it. Group by group over the whole batch: a group's sum and union (2.8 MB for a q/k/v group
        of SmolLM2) then stay in the core's cache for every task of the batch, where task by task each one was
        evicted before its next use (with ``np.add.at``, 11.5 -> 4.4 ms per task for 32 of the default size)."""
        overlapping = [0] * len(batch)
        groups = {layers: None for loaded in batch for layers in loaded.adapter.groups}  # in order, once each
        for layers in groups:
            widths = self.widths[layers]
            for k, loaded in enumerate(batch):
                if layers not in loaded.adapter.groups:
                    continue
                positions, values = (loaded.entries[layers] if loaded.entries is not None
                                     else _entries(loaded.adapter, layers, widths))
                if layers not in self._sums:
                    shape = (sum(widths), self.layer_shapes[layers[0]][1])  # (Σ d_out, d_in)
                    self._sums[layers] = np.zeros(shape, dtype=np.float32)
                    self._union[layers] = np.zeros(shape[0] * shape[1], dtype=bool)
                union = self._union[layers]
                overlapping[k] += int(np.count_nonzero(union[positions]))
                union[positions] = True
                np.add.at(self._sums[layers].reshape(-1), positions, values)  # (distinct positions: one add each)
        out = []
        for loaded, overlap in zip(batch, overlapping):
            self._newest = max(self._newest, loaded.info.order)
            nz = loaded.info.nonzero
            out.append(replace(loaded, info=replace(loaded.info, overlap=overlap / nz if nz else 0.0), entries=None))
        return out

    def _rebuild(self) -> None:
        """Sums, union and every overlap from the served tasks, in order (after a deletion)."""
        self._sums, self._union, self._newest = {}, {}, -1
        ordered = sorted(self._loaded.values(), key=_order)
        self._loaded = {}
        for start in range(0, len(ordered), BATCH):
            for loaded in self._add(ordered[start:start + BATCH]):
                self._loaded[loaded.info.name] = loaded

    # -- refreshing ---------------------------------------------------------------------------------------------

    def why_unserved(self, name: str) -> str | None:
        """None if ``name`` is in the state the last refresh built, else why not (its refusal's reason)."""
        with self._lock:
            if name in self._loaded:
                return None
            return self._refused.get(name, "it was not loaded (is it in the store?)")

    def pending(self) -> bool:
        """Cheap (a directory listing): has the store gained or lost adapters since the last refresh? Adapters
        refused once are not retried."""
        names = self.store.folders()
        return bool(names - set(self._loaded) - set(self._refused)) or bool(set(self._loaded) - names)

    def _new_names(self, folders: set[str]) -> list[str]:
        """The store's adapters not loaded or refused yet, by (order, created_at, name): parents before the tasks
        trained on them. Only their manifests are read."""
        found = []
        for name in folders - set(self._loaded) - set(self._refused):
            try:
                m = self.store.manifest(name)
                found.append((m["order"], m["created_at"], name))
            except StoreError:
                found.append((float("inf"), "", name))  # last: loading it reports why it is refused
        return [name for *_, name in sorted(found)]

    def refresh(self) -> BankState | None:
        """Load adapters that appeared in the store since the last call and drop those that left it; return the
        new state, or None when nothing changed."""
        with self._lock:
            folders = self.store.folders()
            gone = set(self._loaded) - folders
            rebuild = False
            for name in gone:
                del self._loaded[name]
                rebuild = True
            added = False
            new = self._new_names(folders)
            # many at once (a start-up): read them two at a time (file reads, checksums and numpy let go of the
            # GIL), then resolve the routes and add to the sums in order, BATCH at a time (so that the entries
            # waiting to be added stay few, and the sums are added group by group: ``_add``)
            with ThreadPoolExecutor(max_workers=2 if len(new) > 8 else 1) as pool:
                for start in range(0, len(new), BATCH):
                    chunk, batch = new[start:start + BATCH], []
                    for name, read in zip(chunk, pool.map(self._read, chunk)):
                        loaded = self._load(name, read)
                        if loaded is None:
                            continue
                        added = True
                        self._loaded[name] = loaded  # (a later task of the chunk may have it as a parent)
                        newest = max([self._newest] + [b.info.order for b in batch])
                        if rebuild or loaded.info.order < newest:
                            rebuild = True
                        else:
                            batch.append(loaded)
                    if not rebuild:
                        for loaded in self._add(batch):
                            self._loaded[loaded.info.name] = loaded
            if not (added or gone) and self._version > 0:
                return None
            if rebuild:
                self._rebuild()
            self._stack = make_stack(self._sums, self.weights, self.layout)
            return self._build()

    def _build(self) -> BankState:
        self._version += 1
        ordered = sorted(self._loaded.values(), key=_order)
        state = build_state([(loaded.info, loaded.route) for loaded in ordered], self._stack, self._version)
        self.metrics.set_adapters(list(state.tasks.values()))
        log.info("serving %d task adapter(s)%s", len(state.tasks),
                 ": " + ", ".join(list(state.tasks)[:8]) + (" ..." if len(state.tasks) > 8 else "")
                 if state.tasks else "")
        return state


def _order(loaded: Loaded):
    m = loaded.info.manifest
    return loaded.info.order, m.get("created_at", ""), loaded.info.name
