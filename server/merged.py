"""Merged weights W + Σ Δ of the adapters of a route, for forwards whose positions are all on that route, kept
in a bounded cache.

When every position of a forward is on the same route (one stream on one task; many streams on one task), the
plan of ``server/bank.py`` runs that route's projections with merged weights instead of reading its deltas: the
forward then costs what ``@base`` does. The weights are built from the base product's weights on first use,
one projection group at a time (30-70 ms for a route of 1-8 adapters of the default model, up to 110 ms with
the packing), and packed as the base is (``server/kernels.py``). A build stalls every row of the batch, and
one row's deltas cost little (40 µs a layer group for a route of 8 adapters, 1.2 ms a step): the engine builds
a route's weights only when its batch is to run at least ``merged_weights_min_steps`` more steps (its rows'
largest ``max_new_tokens`` left), and otherwise takes them from the cache or runs the deltas. Only whole
routes: the adapters that a mixed batch's routes share (a chain's first tasks) change as requests come and go,
and a build costs about as much as 100 decode steps' reads of the delta it would save (merging the adapters
that most rows hold, and subtracting them from the rest, was measured too: README, Serving).

Only in fp32 on CPU: in bf16 or fp16 the sum W + Δ would round most of a small delta away, and on CUDA the
Triton kernel already reads all of a group's deltas in one launch. Memory: one merged copy of the adapted
groups' weights per route (66 MB for SmolLM2-135M's q/k/v in fp32), least recently used evicted beyond the
budget (``merged_weights_mb``)."""
from __future__ import annotations

import collections

import torch

from .kernels import Linear


class MergedWeights:
    """The merged products of one route's adapters, built per projection group on first use. Has
    the interface of ``Adapter.merged_linear`` so that a plan runs it as it runs ``@stack``'s."""

    def __init__(self, route: tuple, on_build=None):
        self.route = route  # the adapters (kept referenced while cached, so their ids stay theirs)
        self._linears: dict[tuple[str, ...], Linear] = {}
        self._on_build = on_build  # called once per group built

    def merged_linear(self, layers: tuple[str, ...], base: Linear) -> Linear:
        """The group's fused product with W + Σ of the route's deltas (``base`` itself if none adapts it)."""
        if layers not in self._linears:
            deltas = [a.groups[layers] for a in self.route if layers in a.groups]
            if not deltas:
                return base
            with torch.inference_mode():
                w = torch.cat([w.detach() for w, _ in base.parts])  # (Σ d_out, d_in), a copy
                for delta in deltas:
                    delta.add_to(w)
                # the parts' rows of the sum and the base's biases, fused and packed as the base is; packed, the
                # sum itself is freed
                self._linears[layers] = Linear(list(w.split(base.widths)), [b for _, b in base.parts],
                                               keep_weights=False)
            if self._on_build is not None:
                self._on_build()
        return self._linears[layers]


def merged_size(route: tuple) -> int:
    """Bytes of a route's merged fp32 weights: those of every projection group one of its adapters adapts."""
    shapes = {layers: delta.shape for adapter in route for layers, delta in adapter.groups.items()}
    return sum(rows * cols * 4 for rows, cols in shapes.values())


class MergedRoutes:
    """Merged weights per route (a set of adapters), least recently used evicted beyond ``budget`` bytes.
    ``size`` says what a route's merged weights will take, in bytes (the base weights of the groups its
    adapters adapt). Used from the engine thread only."""

    def __init__(self, budget: int, size, metrics=None):
        self.budget = budget
        self.size = size  # route -> bytes
        self.metrics = metrics
        self._entries: collections.OrderedDict[tuple, tuple[MergedWeights, int]] = collections.OrderedDict()
        self.used = 0  # bytes of the cached sets (as sized up front; built lazily)

    def get(self, route: tuple, build: bool = True) -> MergedWeights | None:
        """The merged weights of ``route`` (a tuple of adapters, in any order), made if needed and ``build``;
        None when they are not cached and not to be made, or when they alone would exceed the budget."""
        key = tuple(sorted(id(a) for a in route))
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key][0]
        if not build:
            return None
        need = self.size(route)
        if need > self.budget:
            return None
        while self._entries and self.used + need > self.budget:
            self._drop(next(iter(self._entries)))
        entry = MergedWeights(route, self._built)
        self._entries[key] = (entry, need)
        self.used += need
        self._report()
        return entry

    def retain(self, adapters: set[int]) -> None:
        """Drop the sets holding an adapter whose id is not in ``adapters`` (deleted or replaced tasks)."""
        for key in [k for k in self._entries if not set(k) <= adapters]:
            self._drop(key)

    def _drop(self, key: tuple) -> None:
        _, need = self._entries.pop(key)
        self.used -= need
        self._report()

    def __len__(self) -> int:
        return len(self._entries)

    def _built(self) -> None:
        if self.metrics is not None:
            self.metrics.merged_builds.inc()

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.merged_bytes.set(self.used)
            self.metrics.merged_sets.set(len(self._entries))
