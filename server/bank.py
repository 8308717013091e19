"""The serving-time adapter bank: every registered task's delta, each task's route, ``@stack``, and the plan that
adds to a forward's positions the deltas of their routes.

Routes. A request names ``@base`` (no delta), ``@stack`` (the sum of every task's delta) or a task. A task's
route is the set of adapters it was trained on, its parents, plus its own (``server/registry.py`` resolves them
from the manifests): the model that was trained and evaluated for it. A route is a tuple of ``Adapter`` objects;
adapters are immutable and shared by every state and route that holds them.

Representation. An adapter holds, per projection group (the layers of a block that share their input, such as
q/k/v: ``server/runner.py``), one ``GroupDelta``: the group's layers' rows one after the other, (Σ d_out, d_in),
in one of three forms, chosen when it is built (on CPU at the adapter's first use: ``Groups``):
  * sparse (CSR; on CPU int16 columns and fp32 values, rows padded to a multiple of 4 non-zeros and stored by
    length within chunks of 64 rows, ``perm`` giving their output rows; elsewhere int32 columns and bf16 values
    as stored, rows in order: ``served_form``) up to ``DENSE_ABOVE`` density. On CPU in fp32 these go through
    the compiled kernel of ``server/sparse_kernel.py`` (positions in blocks of up to 32 with similar routes, each
    adapter's delta read once per block that holds it); on CUDA through the Triton kernel of
    ``server/triton_delta.py`` (every sparse adapter of a group in one launch); elsewhere through torch's CSR
    product, per adapter.
  * dense above that (one oneDNN product per adapter over its positions): ``@stack`` sums of many tasks.
  * low rank (A, B) for dense-LoRA baseline adapters: s·(x·Aᵀ)·Bᵀ is cheaper than either.

One plan for every forward (``Plan``): each distinct adapter of the batch is applied once, to every position
(decode row or prompt position) whose route holds it. A forward whose positions are all on the same ``@stack``
runs the merged weights W + Σ instead, at exactly the cost of ``@base``; given a cache of merged weights
(``server/merged.py``: fp32 on CPU), so does a forward whose positions are all on any one route.

A state is immutable once built; registering a task builds a new state off the engine thread and the engine
swaps it in between two steps; a request keeps the route it was admitted with."""
from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from adapters_store import LowRankDelta, SparseDelta

from .kernels import Linear
from .merged import MergedRoutes
from .sparse_kernel import COL16_MAX, SparseDeltaKernel, kernel_rows, padded_lengths

BASE = "@base"
STACK = "@stack"
DENSE_ABOVE = 0.06  # a group's delta denser than this is served dense
# On CUDA an adapter with more positions than this in one forward (a long prompt chunk) takes torch's CSR product,
# which reads the delta once, where the Triton kernel reads it once per block of positions. The CPU kernel takes
# every position: on the 2-core AMD EPYC (AVX2), one q/k/v group of the trained chain, 256 positions on one
# adapter took 0.72 ms there against 1.26 ms in torch's CSR product, on 8 adapters 2.1 ms against 12.2 ms (ad hoc).
KERNEL_MAX_ROWS = 128

Group = tuple[tuple[str, ...], tuple[int, ...]]  # a projection group: its layers (module paths), each one's d_out


@dataclass(frozen=True, eq=False)
class GroupDelta:
    """One adapter's delta over one projection group, (Σ d_out, d_in), in exactly one representation."""

    shape: tuple[int, int]
    nnz: int
    crow: torch.Tensor | None = None  # (Σ d_out + 1,) int32   } sparse (served_form): the stored rows, on CPU
    col: torch.Tensor | None = None  # (nnz',) int16 or int32    } padded with zeros and reordered for the kernel
    val: torch.Tensor | None = None  # (nnz',) fp32 or bf16      } (nnz' ≥ nnz), stored row o being output row
    perm: torch.Tensor | None = None  # (Σ d_out,) int32         } perm[o]; perm None: rows in order, no padding
    dense: torch.Tensor | None = None  # (Σ d_out, d_in) fp32; its product is packed on first use
    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None  # A (R, d_in), B (Σ d_out, R) with the scale in B
    # made lazily: torch's CSR, perm's inverse, the dense product, the kernel's table entry (not an init field:
    # dataclasses.replace gives a copy its own)
    _lazy: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def kind(self) -> str:
        return "sparse" if self.crow is not None else "dense" if self.dense is not None else "lowrank"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Δ·x for positions x (N, d_in): (N, Σ d_out) fp32."""
        xf = x.float()
        if self.kind == "sparse":
            out = torch.sparse.mm(self._csr(), xf.T).T  # (N, Σ d_out), the stored rows' order
            return out if self.perm is None else out.index_select(1, self._lazy["inverse"])
        if self.kind == "dense":
            if "product" not in self._lazy:
                self._lazy["product"] = Linear([self.dense])
            return self._lazy["product"](xf)
        a, b = self.lowrank
        return F.linear(F.linear(xf, a), b)

    def _csr(self) -> torch.Tensor:
        """torch's fp32 CSR of the stored rows, and the inverse of ``perm`` (the stored row of each output row)."""
        if "csr" not in self._lazy:
            self._lazy["csr"] = torch.sparse_csr_tensor(self.crow, self.col.int(), self.val.float(), self.shape,
                                                        check_invariants=False)
            if self.perm is not None:
                self._lazy["inverse"] = torch.argsort(self.perm.long())
        return self._lazy["csr"]

    def _stored_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each stored entry's output row (int64), the places of the entries that are not padding, and every
        stored value (fp32)."""
        rows = np.arange(self.shape[0]) if self.perm is None else self.perm.cpu().numpy().astype(np.int64)
        rows = np.repeat(rows, np.diff(self.crow.cpu().numpy()))
        val = self.val.cpu().float().numpy()
        return rows, np.flatnonzero(val != 0), val

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A sparse delta's non-zero entries in numpy, in the stored order, without the padding: rows (int64),
        columns (int64), values (fp32)."""
        rows, keep, val = self._stored_rows()
        return rows[keep], self.col.cpu().numpy()[keep].astype(np.int64), val[keep]

    def in_order(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A sparse delta's CSR with its rows in order and no padding, on its device: crow (Σ d_out + 1,) int32,
        col and val in their dtypes."""
        if self.perm is None:
            return self.crow, self.col, self.val
        rows, keep, _ = self._stored_rows()
        rows, col = rows[keep], self.col.cpu().numpy()[keep].astype(np.int64)
        order = keep[np.argsort(rows * self.shape[1] + col, kind="stable")]  # rows ascend, columns within a row
        crow = np.zeros(self.shape[0] + 1, dtype=np.int32)
        np.cumsum(np.bincount(rows, minlength=self.shape[0]), out=crow[1:])
        index = torch.from_numpy(order).to(self.col.device)
        return torch.from_numpy(crow).to(self.crow.device), self.col[index], self.val[index]

    def add_to(self, w: torch.Tensor) -> None:
        """w (Σ d_out, d_in) += Δ, summed in w's dtype (padding adds zeros)."""
        if self.kind == "sparse":
            rows, _, val = self._stored_rows()
            flat = torch.from_numpy(rows * self.shape[1] + self.col.cpu().numpy().astype(np.int64))
            w.view(-1).index_add_(0, flat.to(w.device), torch.from_numpy(val).to(w.device, w.dtype))
        else:
            w += self.to_dense().to(w.dtype)

    def to_dense(self) -> torch.Tensor:
        if self.kind == "sparse":
            crow, col, val = self.in_order()
            return torch.sparse_csr_tensor(crow, col.int(), val.float(), self.shape, check_invariants=False).to_dense()
        if self.kind == "dense":
            return self.dense
        a, b = self.lowrank
        return b @ a

    @property
    def nbytes(self) -> int:
        if self.kind == "sparse":
            return sum(t.numel() * t.element_size() for t in (self.crow, self.col, self.val, self.perm)
                       if t is not None)
        if self.kind == "dense":
            return 2 * self.dense.numel() * self.dense.element_size()  # the weight and its packed copy
        return sum(t.numel() * t.element_size() for t in self.lowrank)


Stored = SparseDelta | LowRankDelta  # a layer's delta as the store keeps it


def group_delta(parts: dict[str, Stored], group: Group, device=None, dense_above: float = DENSE_ABOVE) -> GroupDelta:
    """A group's delta from its layers' deltas (``parts``: layer -> delta, for the adapted layers of ``group``):
    low rank if they are, else sparse up to ``dense_above`` of the adapted layers' entries, else dense."""
    layers, widths = group
    offsets = dict(zip(layers, [sum(widths[:j]) for j in range(len(widths))]))
    d_out = sum(widths)
    d_in = next(iter(parts.values())).shape[1]
    if all(isinstance(p, LowRankDelta) for p in parts.values()):
        a = torch.cat([p.A.float() for p in parts.values()])  # (R, d_in)
        b = torch.zeros(d_out, a.shape[0])
        r = 0
        for name, p in parts.items():
            b[offsets[name]:offsets[name] + p.shape[0], r:r + p.rank] = p.B.float() * float(p.scale)
            r += p.rank
        return GroupDelta(shape=(d_out, d_in), nnz=d_out * d_in, lowrank=(a.to(device), b.to(device)))
    sparse = {name: p if isinstance(p, SparseDelta) else SparseDelta.from_dense(p.to_dense())
              for name, p in parts.items()}
    nnz = sum(p.nnz for p in sparse.values())
    if _served_dense(sparse, dense_above):
        dense = torch.zeros(d_out, d_in)
        for name, p in sparse.items():
            dense[offsets[name]:offsets[name] + p.shape[0]] = p.to_dense()
        return GroupDelta(shape=(d_out, d_in), nnz=nnz, dense=dense.to(device))
    # in numpy, on the calling thread: on SmolLM2's q/k/v groups torch's per-op overhead made this 5x slower
    # (layer order: rows ascend, and columns ascend within a row: flat positions ascend)
    cols = [sparse[name].indices.numpy() % d_in for name in layers if name in sparse]
    vals = [sparse[name].values for name in layers if name in sparse]
    crow = np.zeros(d_out + 1, dtype=np.int64)
    np.cumsum(_row_counts(sparse, group), out=crow[1:])
    served = served_form(torch.from_numpy(crow), torch.from_numpy(np.concatenate(cols)), _cat_values(vals), d_in,
                         device)
    return GroupDelta(shape=(d_out, d_in), nnz=nnz, **served)


def _served_dense(sparse: dict[str, SparseDelta], dense_above: float) -> bool:
    """Whether a group of sparse deltas is served dense: more non-zeros than ``dense_above`` of their entries."""
    return sum(p.nnz for p in sparse.values()) > dense_above * sum(p.shape[0] * p.shape[1] for p in sparse.values())


def _row_counts(sparse: dict[str, SparseDelta], group: Group) -> np.ndarray:
    """(Σ d_out,) int64 the non-zeros of each row of a group of sparse deltas, its layers one after the other."""
    counts, start = np.zeros(sum(group[1]), dtype=np.int64), 0
    for name, width in zip(*group):
        if name in sparse:
            p = sparse[name]
            counts[start:start + p.shape[0]] = np.bincount(p.indices.numpy() // p.shape[1], minlength=p.shape[0])
        start += width
    return counts


def float32_values(values: torch.Tensor) -> np.ndarray:
    """fp32 numpy values of an fp32 or bf16 CPU tensor (bf16 widened by a shift: it is the upper half of an fp32)."""
    if values.dtype == torch.bfloat16:
        return (values.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return values.float().numpy()


def _cat_values(parts: list[torch.Tensor]) -> torch.Tensor:
    """(Σ n,) the parts' values one after the other: bf16 if all are, else fp32 (numpy: no torch op)."""
    if all(v.dtype == torch.bfloat16 for v in parts):
        return torch.from_numpy(np.concatenate([v.view(torch.int16).numpy() for v in parts])).view(torch.bfloat16)
    return torch.from_numpy(np.concatenate([float32_values(v) for v in parts]))


def served_form(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, d_in: int, device=None) -> dict:
    """A sparse delta's CSR (crow (R + 1,), col and val (nnz,), rows in order) as it is served, GroupDelta's
    fields. On CPU for the compiled kernel: int16 columns (where d_in allows) and fp32 values, exactly as stored
    (the inner loop reads a value with one broadcast instead of widening it), each row padded to a multiple of 4
    and the rows sorted by length within chunks of 64 (``sparse_kernel.kernel_rows``): 6 bytes a stored
    non-zero as stored (int32 positions, bf16 values), about 8 % more of them, and 4 bytes a row for ``perm``.
    Elsewhere the rows in order, int32 columns and the values as stored (bf16 if all are), which the Triton
    kernel widens itself."""
    if device is None or torch.device(device).type == "cpu":
        col = torch.from_numpy(col.numpy().astype(np.int16 if d_in <= COL16_MAX else np.int32))
        crow, col, val, perm = kernel_rows(crow, col, torch.from_numpy(float32_values(val)))
        return {"crow": crow, "col": col, "val": val, "perm": perm}
    return {"crow": crow.to(torch.int32).to(device), "col": col.to(torch.int32).to(device),
            "val": (val if val.dtype == torch.bfloat16 else val.float()).to(device)}


@dataclass(frozen=True, eq=False)
class Adapter:
    """One task's delta (or ``@stack``'s sum), per projection group it adapts. For ``@stack`` also the merged
    weights W + Σ of the adapted layers, whose fused products are packed on first use."""

    name: str
    groups: Mapping[tuple[str, ...], GroupDelta]  # group layers -> delta (``Groups``: built on first use)
    merged: dict[str, torch.Tensor] | None = None  # @stack: layer -> W + Σ deltas
    _linears: dict = field(default_factory=dict, repr=False)

    @property
    def nbytes(self) -> int:
        if isinstance(self.groups, Groups):
            return self.groups.nbytes  # (what it serves once every group is built)
        return sum(g.nbytes for g in self.groups.values())

    def merged_linear(self, layers: tuple[str, ...], base: Linear) -> Linear:
        """The fused product of a projection group with the merged weights, from the group's base product."""
        if layers not in self.groups:
            return base  # no task adapts these layers: no second copy of their weights
        if layers not in self._linears:
            parts = [(self.merged.get(name, w), b) for name, (w, b) in zip(layers, base.parts)]
            self._linears[layers] = Linear([w for w, _ in parts], [b for _, b in parts])
        return self._linears[layers]


def make_adapter(name: str, deltas: dict[str, Stored], layout: list[Group], device=None,
                 dense_above: float = DENSE_ABOVE) -> Adapter:
    """An adapter from its layers' deltas, grouped by the model's projection groups (``layout``); layers in no
    group are not served (the caller checks that there are none)."""
    lazy = device is None or torch.device(device).type == "cpu"
    groups: dict = {}
    for layers, widths in layout:
        parts = {name_: deltas[name_] for name_ in layers if name_ in deltas}
        if not parts:
            continue
        if lazy and all(isinstance(p, SparseDelta) for p in parts.values()):
            groups[layers] = (parts, (layers, widths))  # built on first use
        else:
            groups[layers] = group_delta(parts, (layers, widths), device, dense_above)
    return Adapter(name, Groups(groups, dense_above))


class Groups(Mapping):
    """An adapter's group deltas (layers -> ``GroupDelta``), each of the pending ones built from its layers'
    stored sparse deltas on first use, on CPU. A start-up then reads and checks 1,000 adapters without serving
    any: building the served form is a third of loading one (about 13 ms for SmolLM2 q/v adapters of the
    default size), and each adapter's first forward pays it once. Until then an adapter holds its stored
    deltas, 6 bytes a non-zero, as its served form does. Thread-safe: the engine builds, the registry may read."""

    def __init__(self, groups: dict, dense_above: float = DENSE_ABOVE):
        """groups: layers -> its GroupDelta, or (parts, group) for ``group_delta`` to build at its first use."""
        self._keys = list(groups)
        self._built = {k: g for k, g in groups.items() if isinstance(g, GroupDelta)}
        self._pending = {k: g for k, g in groups.items() if not isinstance(g, GroupDelta)}  # until built
        self._dense_above = dense_above
        self._lock = threading.Lock()
        self.nbytes = sum(g.nbytes for g in self._built.values()) + sum(
            served_nbytes(parts, group, dense_above) for parts, group in self._pending.values())

    def __getitem__(self, layers: tuple[str, ...]) -> GroupDelta:
        delta = self._built.get(layers)
        if delta is None:
            with self._lock:
                delta = self._built.get(layers)
                if delta is None:
                    parts, group = self._pending[layers]  # (KeyError: not a group it adapts)
                    delta = self._built[layers] = group_delta(parts, group, None, self._dense_above)
                    del self._pending[layers]
        return delta

    def __contains__(self, layers: object) -> bool:
        return layers in self._built or layers in self._pending

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def stored(self, layers: tuple[str, ...]) -> dict[str, SparseDelta] | None:
        """A pending group's stored deltas (layer -> delta), or None once it is built."""
        with self._lock:
            pending = self._pending.get(layers)
        return None if pending is None else pending[0]


def served_nbytes(parts: dict[str, SparseDelta], group: Group, dense_above: float = DENSE_ABOVE) -> int:
    """The bytes ``group_delta`` will hold for a group of stored sparse deltas on CPU (``GroupDelta.nbytes``)."""
    d_out, d_in = sum(group[1]), next(iter(parts.values())).shape[1]
    if _served_dense(parts, dense_above):
        return 2 * 4 * d_out * d_in
    stored = int(padded_lengths(_row_counts(parts, group)).sum())  # non-zeros with kernel_rows' padding
    return stored * ((2 if d_in <= COL16_MAX else 4) + 4) + 4 * (d_out + 1) + 4 * d_out


def make_stack(sums: dict[tuple[str, ...], np.ndarray], weights: dict[str, torch.Tensor],
               layout: list[Group]) -> Adapter | None:
    """``@stack`` from the sums of every task's delta per projection group (fp32, (Σ d_out, d_in), copied here),
    and the merged weights W + Σ of those groups' layers (``weights``: layer -> base weight). The work is numpy's
    where the weights are on CPU: it runs on the calling thread, off the engine's cores' OpenMP pool."""
    if not sums:
        return None
    widths = dict(layout)
    device = next(iter(weights.values())).device
    groups, merged = {}, {}
    for layers, total in sums.items():
        nnz = int(np.count_nonzero(total))
        if nnz > DENSE_ABOVE * total.size:
            groups[layers] = GroupDelta(shape=total.shape, nnz=nnz, dense=torch.from_numpy(total.copy()).to(device))
        else:
            csr = torch.from_numpy(total.copy()).to_sparse_csr()
            groups[layers] = GroupDelta(shape=total.shape, nnz=nnz, **served_form(
                csr.crow_indices(), csr.col_indices(), csr.values(), total.shape[1], device))
        start = 0
        for name, width in zip(layers, widths[layers]):
            w, part = weights[name].detach(), total[start:start + width]
            if w.is_cpu:
                merged[name] = torch.from_numpy(w.float().numpy() + part).to(w.dtype)
            else:
                merged[name] = (w.float() + torch.from_numpy(part).to(w.device)).to(w.dtype)
            start += width
    return Adapter(STACK, groups, merged)


Route = tuple[Adapter, ...]  # the adapters whose deltas a request is served with: () for @base


@dataclass(frozen=True)
class TaskInfo:
    name: str
    order: int
    manifest: dict
    nonzero: int
    total: int
    overlap: float  # fraction of its non-zero positions that are non-zero in an earlier task's delta
    route: tuple[str, ...] = ()  # the tasks whose deltas serve it, in order, itself last
    nbytes: int = 0  # memory of its served delta

    @property
    def density(self) -> float:
        return self.nonzero / self.total if self.total else 0.0


@dataclass(frozen=True)
class BankState:
    """Immutable: the served tasks (in order), the route of every name a request may use, ``@stack``."""

    tasks: dict[str, TaskInfo] = field(default_factory=dict)
    routes: dict[str, Route] = field(default_factory=lambda: {BASE: ()})
    stack: Adapter | None = None
    version: int = 0

    def route(self, name: str) -> Route:
        """KeyError for an unknown task."""
        return self.routes[name]

    def names(self) -> list[str]:
        return list(self.tasks)


def build_state(tasks: list[tuple[TaskInfo, Route]], stack: Adapter | None, version: int) -> BankState:
    """A state over ``tasks`` (in order), each with its route."""
    routes: dict[str, Route] = {BASE: (), STACK: (stack,) if stack is not None else ()}
    routes.update((info.name, route) for info, route in tasks)
    return BankState(tasks={info.name: info for info, _ in tasks}, routes=routes, stack=stack, version=version)


class KernelTables:
    """The sparse-delta kernel's per-group argument tables, kept across plans while the same adapters stay in the
    batch (one per projection group and set of adapters; a few thousand at most)."""

    LIMIT = 4096

    def __init__(self, kernel):
        self.kernel = kernel  # the CPU kernel (SparseDeltaKernel), or on CUDA the Triton one (TritonDeltas)
        self.on_device = not isinstance(kernel, SparseDeltaKernel)
        self._tables: dict[tuple, object] = {}
        self._scratch = torch.empty(0, dtype=torch.float32)  # the kernel's interleaved inputs, grown as needed

    def scratch(self, n: int) -> torch.Tensor:
        if self._scratch.numel() < n:
            self._scratch = torch.empty(n, dtype=torch.float32)
        return self._scratch

    def get(self, deltas: list[GroupDelta]):
        key = tuple(id(d) for d in deltas)
        if key not in self._tables:
            if len(self._tables) >= self.LIMIT:
                self._tables.clear()
            self._tables[key] = self.kernel.prepare(deltas)  # (keeps the deltas referenced, so ids stay theirs)
        return self._tables[key]


class Plan:
    """The deltas of one forward over N positions: the decode rows first (``rows``: one route each), then
    prompt segments ``(begin, end, route)`` of x that each belong to one request. Each distinct adapter in the
    batch is applied once to all positions whose route holds it: on CPU in fp32 the sparse ones in one kernel
    call per projection group, the others (and everything elsewhere) by one product per adapter."""

    def __init__(self, rows: list[Route], segments: list[tuple[int, int, Route]] = (), device=None,
                 kernel: KernelTables | SparseDeltaKernel | None = None, merged: MergedRoutes | None = None,
                 build_merged: bool = True):
        self.n = len(rows)
        if isinstance(kernel, SparseDeltaKernel):
            kernel = KernelTables(kernel)
        self.kernel = kernel
        self.device = device
        spans = [(i, i + 1, route) for i, route in enumerate(rows)] + [s for s in segments if s[2]]
        members: dict[int, tuple[Adapter, list[int]]] = {}  # id(adapter) -> (adapter, its positions), in order
        for begin, end, route in spans:
            for adapter in route:
                members.setdefault(id(adapter), (adapter, []))[1].extend(range(begin, end))
        # every position on the same route: its merged weights W + Σ serve it at the cost of @base, @stack's own
        # or, given a cache of merged sets (fp32 on CPU: server/merged.py), the route's (made if build_merged)
        positions = self.n + sum(end - begin for begin, end, _ in segments)  # @base's included
        one_route = bool(members) and all(len(p) == positions for _, p in members.values())
        held = tuple(a for a, _ in members.values())  # with one_route: that route's adapters
        self.merged = None
        if one_route and len(held) == 1 and held[0].merged is not None:
            self.merged = held[0]
        elif one_route and merged is not None:
            self.merged = merged.get(held, build_merged)
        self.members = [] if self.merged is not None else list(members.values())
        self.adapted = set().union(*(a.groups for a, _ in self.members)) if self.members else set()
        self._groups: dict[tuple[str, ...], tuple] = {}
        self._layouts: dict[tuple, object] = {}  # the kernel's positions, by (starts, rows)

    @staticmethod
    def key(rows: list[Route]) -> tuple:
        return tuple(tuple(id(a) for a in route) for route in rows)

    def _prepare(self, layers: tuple[str, ...]) -> tuple:
        """A group's work: the kernel's table and rows (or None), and the (delta, positions) it leaves to torch."""
        on_kernel, rest = [], []
        for adapter, positions in self.members:
            delta = adapter.groups.get(layers)
            if delta is None:
                continue
            if self.kernel is not None and delta.kind == "sparse" and (
                    len(positions) <= KERNEL_MAX_ROWS or not self.kernel.on_device):
                on_kernel.append((delta, positions))
            else:
                contiguous = positions[-1] - positions[0] == len(positions) - 1
                index = slice(positions[0], positions[-1] + 1) if contiguous else torch.tensor(positions,
                                                                                             device=self.device)
                rest.append((delta, index))
        kernel = None
        if on_kernel:
            starts = [0]
            for _, positions in on_kernel:
                starts.append(starts[-1] + len(positions))
            rows = [i for _, p in on_kernel for i in p]
            key = (tuple(starts), tuple(rows))  # the groups of a forward mostly share their adapters' positions
            if key not in self._layouts:
                if self.kernel.on_device:  # the Triton kernel: the positions grouped once, on the device
                    self._layouts[key] = self.kernel.kernel.positions(starts, rows, self.device)
                else:  # the CPU kernel: the positions in blocks of rows with similar routes
                    self._layouts[key] = self.kernel.kernel.layout(starts, rows)
            kernel = (self.kernel.get([d for d, _ in on_kernel]), self._layouts[key])
        return kernel, rest

    def project(self, layers: tuple[str, ...], lin: Linear, x: torch.Tensor) -> torch.Tensor:
        """x: (N, d_in) -> x·Wᵀ (+ bias) + Σ over each position's route of Δ·x, for a projection group whose
        base product is ``lin``: (N, Σ d_out), the layers' outputs side by side."""
        if self.merged is not None:
            lin = self.merged.merged_linear(layers, lin)
        y = lin(x)
        if layers not in self.adapted:
            return y
        if layers not in self._groups:
            self._groups[layers] = self._prepare(layers)
        kernel, rest = self._groups[layers]
        if kernel is not None:
            table, at = kernel
            if self.kernel.on_device:  # Triton
                self.kernel.kernel.add_at(table, at, x, y)
            else:
                scratch = self.kernel.scratch(self.kernel.kernel.scratch_size(table, at))
                self.kernel.kernel.add_at(table, at, x if x.stride(1) == 1 else x.contiguous(), y, scratch)
        for delta, index in rest:
            if isinstance(index, slice):
                y[index] += delta.apply(x[index]).to(y.dtype)
            else:
                y.index_add_(0, index, delta.apply(x.index_select(0, index)).to(y.dtype))
        return y

