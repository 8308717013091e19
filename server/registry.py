"""Reads task adapters from the store into bank states: verified against this base model, refused ones skipped
with a logged error and a metric, and the result published to the engine and to the metrics."""
from __future__ import annotations

import logging
import threading

import torch

from adapters_store import AdapterStore, StoreError

from .bank import BankState, SlotDelta, TaskInfo, build_state, from_stored
from .metrics import Metrics

log = logging.getLogger(__name__)


class Registry:
    def __init__(self, store: AdapterStore, model: torch.nn.Module, fingerprint: str, device, metrics: Metrics):
        self.store, self.model, self.fingerprint = store, model, fingerprint
        self.device, self.metrics = device, metrics
        linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        self.layer_shapes = {n: tuple(m.weight.shape) for n, m in linears.items()}
        self.weights = {n: m.weight for n, m in linears.items()}
        self._loaded: dict[str, tuple[TaskInfo, dict[str, SlotDelta]]] = {}
        self._refused: dict[str, str] = {}  # name -> reason, so that a bad adapter is reported once
        self._lock = threading.Lock()
        self._version = 0

    def _load(self, name: str) -> tuple[TaskInfo, dict[str, SlotDelta]] | None:
        try:
            stored = self.store.get(name, fingerprint=self.fingerprint, layer_shapes=self.layer_shapes)
        except StoreError as e:
            if self._refused.get(name) != e.reason:
                log.error("skipping adapter: %s", e)
                self.metrics.adapter_load_errors.labels(name, type(e).__name__).inc()
                self._refused[name] = e.reason
            return None
        deltas = {layer: from_stored(d, self.device) for layer, d in stored.deltas.items()}
        nonzero = sum(d.nnz for d in deltas.values())
        total = sum(d.shape[0] * d.shape[1] for d in deltas.values())
        m = stored.manifest
        info = TaskInfo(name=name, order=int(m["order"]), manifest=m, nonzero=nonzero, total=total, overlap=0.0)
        return info, deltas

    def pending(self) -> bool:
        """Cheap (a directory listing and small manifests): has the store gained or lost adapters since the
        last refresh? Adapters refused once are not retried."""
        names = set(self.store.names())
        return bool(names - set(self._loaded) - set(self._refused)) or bool(set(self._loaded) - names)

    def refresh(self) -> BankState | None:
        """Load adapters that appeared in the store since the last call and drop those that left it; return the
        new state, or None when nothing changed."""
        with self._lock:
            names = self.store.names()
            gone = set(self._loaded) - set(names)
            for name in gone:
                del self._loaded[name]
            changed = bool(gone)
            for name in names:
                if name in self._loaded:
                    continue
                loaded = self._load(name)
                if loaded is not None:
                    self._loaded[name] = loaded
                    self._refused.pop(name, None)
                    changed = True
            if not changed and self._version > 0:
                return None
            return self._build()

    def _build(self) -> BankState:
        self._version += 1
        ordered = sorted(self._loaded.values(), key=lambda t: (t[0].order, t[0].manifest.get("created_at", ""),
                                                               t[0].name))
        state = build_state(self.weights, ordered, self._version)
        self.metrics.set_adapters(list(state.tasks.values()))
        log.info("serving %d task adapter(s): %s", len(state.tasks), ", ".join(state.tasks) or "-")
        return state
