"""AdapterStore: one immutable folder per task under a root directory.

    <root>/<task>/adapter.safetensors   tensors only (see codec.py for the names)
    <root>/<task>/manifest.json         caller metadata plus the fields the store sets
Entries whose name starts with "." (temp folders, trash, locks) are never adapters.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch

from . import atomic, codec
from .deltas import Delta
from .errors import (
    AdapterExists,
    AdapterNotFound,
    CorruptAdapter,
    ForeignAdapter,
    MalformedAdapter,
    StoreError,
    StoreWriteError,
)
from .manifest import build_manifest, check_meta, check_task_name, dump_manifest, parse_manifest

ADAPTER_FILE = "adapter.safetensors"
MANIFEST_FILE = "manifest.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class StoredAdapter:
    manifest: dict
    deltas: dict[str, Delta]  # layer (module path) -> delta

    @property
    def name(self) -> str:
        return self.manifest["task"]


def _short(text: str) -> str:
    return text if len(text) <= 12 else text[:12] + "…"


class AdapterStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, task: str) -> Path:
        return self.root / check_task_name(task)

    def exists(self, task: str) -> bool:
        """True if the name is taken (put() would refuse it), whether or not the adapter is readable."""
        return os.path.lexists(self.path(task))

    # ---- writing ----------------------------------------------------------------------------

    def put(self, task: str, deltas: Mapping[str, Delta], meta: Mapping) -> dict:
        """Validate, then store `deltas` as adapter `task` atomically; return the manifest written."""
        if self.exists(task):
            raise AdapterExists(task, "already stored; stored adapters are immutable")
        check_meta(meta)
        if not isinstance(deltas, Mapping) or not deltas:
            raise MalformedAdapter(task, "no layers given")
        layers: dict[str, dict] = {}
        tensors: dict = {}
        for layer, delta in deltas.items():
            if not isinstance(layer, str) or not layer:
                raise MalformedAdapter(task, f"layer name {layer!r} is not a non-empty string")
            try:
                layers[layer], parts = codec.encode(layer, delta)
            except ValueError as e:
                raise MalformedAdapter(task, str(e)) from None
            tensors.update(parts)
        blob = safetensors.torch.save(tensors, metadata={"format": "pt"})
        manifest = build_manifest(task, meta, layers, hashlib.sha256(blob).hexdigest())
        atomic.publish(self.root, task, {ADAPTER_FILE: blob, MANIFEST_FILE: dump_manifest(manifest)})
        return manifest

    def trash(self, task: str) -> Path:
        """Move an adapter out of service into ``<root>/.trash/<task>-<UTC time>-<hex>`` (one rename, so it is
        either served or not; recoverable by moving it back). Returns its new path."""
        src = self.path(task)
        if not src.is_dir():
            raise AdapterNotFound(task, f"not found in {self.root}")
        bin_ = self.root / ".trash"
        bin_.mkdir(exist_ok=True)
        dst = bin_ / f"{task}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.urandom(4).hex()}"
        try:
            os.rename(src, dst)
        except OSError as e:
            raise StoreWriteError(task, f"cannot move to the trash: {e}") from None
        atomic.fsync(bin_)  # the rename changed both folders: sync the one it entered, then the one it left
        atomic.fsync(self.root)
        return dst

    def cleanup_temp(self) -> int:
        """Remove temp folders left by crashed writers; return how many were removed."""
        return atomic.cleanup_temp(self.root)

    # ---- reading ----------------------------------------------------------------------------

    def _read(self, task: str, filename: str) -> bytes:
        try:
            return (self.path(task) / filename).read_bytes()
        except OSError as e:
            raise CorruptAdapter(task, f"cannot read {filename}: {e}") from None

    def manifest(self, task: str) -> dict:
        """Parse and check manifest.json only (cheap: the tensor file is not read)."""
        if not self.path(task).is_dir():
            raise AdapterNotFound(task, f"not found in {self.root}")
        return parse_manifest(task, self._read(task, MANIFEST_FILE))

    def file_sha256(self, task: str) -> str:
        return self.manifest(task)["tensors_sha256"]

    def get(
        self,
        task: str,
        *,
        fingerprint: str | None = None,
        layer_shapes: Mapping[str, tuple[int, int]] | None = None,
    ) -> StoredAdapter:
        """Load and fully verify an adapter; raise a StoreError subclass on any problem."""
        manifest = self.manifest(task)  # name, existence, JSON, format version
        base = manifest["base_fingerprint"]
        if fingerprint is not None and base != fingerprint:
            raise ForeignAdapter(
                task, f"base fingerprint mismatch (trained on {_short(base)}, this base is {_short(fingerprint)})"
            )
        blob = self._read(task, ADAPTER_FILE)
        actual, expected = hashlib.sha256(blob).hexdigest(), manifest["tensors_sha256"]
        if actual != expected:
            raise CorruptAdapter(
                task, f"checksum mismatch (manifest says {_short(expected)}, file is {_short(actual)})"
            )
        try:
            tensors = safetensors.torch.load(blob)
        except Exception as e:  # safetensors raises its own error type for a bad header
            raise CorruptAdapter(task, f"cannot read {ADAPTER_FILE}: {e}") from None
        try:
            deltas = codec.decode(manifest["layers"], tensors)
        except ValueError as e:
            raise MalformedAdapter(task, str(e)) from None
        if layer_shapes is not None:
            for layer, delta in deltas.items():
                if layer not in layer_shapes:
                    raise MalformedAdapter(task, f"layer {layer!r} is not in the model")
                want = tuple(int(n) for n in layer_shapes[layer])
                if delta.shape != want:
                    raise MalformedAdapter(task, f"layer {layer!r} is {delta.shape}, the model's is {want}")
        return StoredAdapter(manifest, deltas)

    def lineage(
        self,
        task: str,
        *,
        fingerprint: str | None = None,
        layer_shapes: Mapping[str, tuple[int, int]] | None = None,
    ) -> list[StoredAdapter]:
        """The adapters a task is served with, in order: those its manifest's ``parents`` name (the tasks it was
        trained on), then itself; each verified as get() does and checked to be the very adapter it was
        trained on (same tensors checksum). Raises AdapterNotFound or CorruptAdapter naming the parent."""
        own = self.get(task, fingerprint=fingerprint, layer_shapes=layer_shapes)
        route = []
        for parent in own.manifest.get("parents", []):
            name = parent.get("task") if isinstance(parent, dict) else None
            if not isinstance(name, str) or not self.exists(name):
                raise AdapterNotFound(task, f"it was trained on {name!r}, which is not in the store")
            stored = self.get(name, fingerprint=fingerprint, layer_shapes=layer_shapes)
            if stored.manifest["tensors_sha256"] != parent.get("sha256"):
                raise CorruptAdapter(task, f"its parent {name!r} is not the adapter it was trained on")
            route.append(stored)
        return route + [own]

    def verify(
        self,
        task: str,
        *,
        fingerprint: str | None = None,
        layer_shapes: Mapping[str, tuple[int, int]] | None = None,
    ) -> dict:
        """Run every check get() runs; return the manifest."""
        return self.get(task, fingerprint=fingerprint, layer_shapes=layer_shapes).manifest

    def list(self) -> list[dict]:
        """Manifests of the readable adapters, by (order, created_at, name); others are logged."""
        found = []
        for entry in os.scandir(self.root):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                found.append(self.manifest(entry.name))
            except StoreError as e:
                log.warning("skipping %s: %s", entry.path, e)
        found.sort(key=lambda m: (m["order"], m["created_at"], m["task"]))
        return found

    def names(self) -> list[str]:
        return [m["task"] for m in self.list()]

    def folders(self) -> set[str]:
        """The names of the adapter folders, without reading any (a directory listing: cheap however many)."""
        return {e.name for e in os.scandir(self.root) if not e.name.startswith(".") and e.is_dir()}
