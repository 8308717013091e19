"""Deltas <-> flat safetensors tensor dicts plus the manifest's per-layer entries.

Tensor names: `<layer>.indices` / `<layer>.values` for a sparse delta, `<layer>.A` / `<layer>.B`
for a low-rank one. No suffix ends another, so two layers can never produce the same name.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .deltas import Delta, LowRankDelta, SparseDelta, check_delta

PARTS = {"sparse": ("indices", "values"), "lowrank": ("A", "B")}


def encode(layer: str, delta: Delta) -> tuple[dict, dict[str, torch.Tensor]]:
    """Validate one delta; return its manifest entry and its tensors (CPU copies, contiguous)."""
    try:
        check_delta(delta)
    except ValueError as e:
        raise ValueError(f"layer {layer!r}: {e}") from None
    entry: dict = {"shape": list(delta.shape), "nnz": delta.nnz}
    if isinstance(delta, SparseDelta):
        entry["kind"] = "sparse"
        parts = {"indices": delta.indices, "values": delta.values}
    else:
        entry.update(kind="lowrank", rank=delta.rank, scale=float(delta.scale))
        parts = {"A": delta.A, "B": delta.B}
    # Own copies: safetensors refuses tensors that share storage, and callers keep theirs.
    tensors = {f"{layer}.{k}": t.detach().to("cpu", copy=True).contiguous() for k, t in parts.items()}
    return entry, tensors


def decode(layers: Mapping[str, dict], tensors: Mapping[str, torch.Tensor]) -> dict[str, Delta]:
    """Rebuild every layer's delta; raise ValueError if the tensors do not match the manifest."""
    expected: set[str] = set()
    for layer, entry in layers.items():
        kind = entry.get("kind") if isinstance(entry, dict) else None
        if kind not in PARTS:
            raise ValueError(f"layer {layer!r}: unknown kind {kind!r} in manifest")
        expected.update(f"{layer}.{p}" for p in PARTS[kind])
    if missing := sorted(expected - tensors.keys()):
        raise ValueError(f"tensor(s) missing from file: {', '.join(missing[:5])}")
    if extra := sorted(tensors.keys() - expected):
        raise ValueError(f"unexpected tensor(s) in file: {', '.join(extra[:5])}")
    deltas = {}
    for layer, entry in layers.items():
        try:
            deltas[layer] = _decode_layer(layer, entry, tensors)
        except ValueError as e:
            raise ValueError(f"layer {layer!r}: {e}") from None
    return deltas


def _decode_layer(layer: str, entry: dict, tensors: Mapping[str, torch.Tensor]) -> Delta:
    shape = entry.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2):
        raise ValueError(f"manifest shape {shape!r} is not [out, in]")
    delta: Delta
    if entry["kind"] == "sparse":
        delta = SparseDelta(tuple(shape), tensors[f"{layer}.indices"], tensors[f"{layer}.values"])
        check_delta(delta)  # also checks the indices against the manifest's shape
    else:
        delta = LowRankDelta(tensors[f"{layer}.A"], tensors[f"{layer}.B"], entry.get("scale"))
        check_delta(delta)
        if list(delta.shape) != shape or delta.rank != entry.get("rank"):
            raise ValueError(
                f"A {tuple(delta.A.shape)} and B {tuple(delta.B.shape)} do not fit manifest "
                f"shape {shape} and rank {entry.get('rank')!r}"
            )
    if entry["kind"] == "sparse" and delta.nnz != entry.get("nnz"):
        raise ValueError(f"{delta.nnz} entries in file, manifest says nnz={entry.get('nnz')!r}")
    return delta
