"""The serving-time adapter bank: every registered task's delta in a fixed slot, the ``@stack`` sum, and the
per-batch plan that adds each row's own delta to a targeted projection in one vectorised call.

Representation, chosen by measurement on the 2-core CPU this was built on (SmolLM2-135M, q_proj+v_proj of one
block fused to 768x576, fp32; the base products then went through MKL, before ``server/kernels.py``):
  * sparse (CSR, int32 indices) for slots of density below ``DENSE_ABOVE``. On CPU in fp32 the decode rows'
    sparse deltas go through the compiled kernel of ``server/sparse_kernel.py``: one call per projection group
    reads each distinct adapter's CSR once per 4 of its rows and adds straight into the rows' outputs (README,
    Benchmarks, for its cost). Without it (no compiler, CUDA, other dtypes) a decode step multiplies the
    batch's inputs by one block-diagonal CSR matrix per projection group through torch (``RowPlan``: a block
    per row, or per adapter when rows share adapters). At 3.5 % density (rank-8 JumpLoRA) and 16 rows, one
    block per row, that took 73 µs against 128 µs for the dense base product of the same layers (MKL), and 17
    µs against 27 µs for one row; per-slot dense deltas grouped by row cost one extra weight read per distinct
    task (8 tasks: about 2x the base time). Prompt segments (one adapter, many positions) always take torch's
    CSR product.
  * dense (d_out, d_in) for slots denser than ``DENSE_ABOVE`` (one oneDNN product per distinct delta, its
    rows gathered). With 8 tasks on q_proj and v_proj at density d, one decode step of 16 rows took, sparse /
    dense (ms; ``python -m benchmarks.deltas``; the base model alone 28-30): d = 0.035: 30.9 / 54.4; 0.2: 35.8 /
    53.8; 0.39: 42.8 / 56.7; 0.6: 48.4 / 54.4. One row at d = 0.6: 22.4 / 23.2 (base alone 19.7). Sparse wins
    up to well past half density, because the dense path reads every task's full weight matrix, and 0.06 is
    still the threshold because of the block tables: every position of a table is padded to its densest block,
    and the padding is multiplied like the deltas, so one dense-ish delta in a batch makes every row of it pay
    for that density. With the threshold at 0.25, the ``@stack`` of the serving benchmark's 8 random tasks
    (density 0.246) was served sparse, and a table sized for it during warm-up left the 8-task case at 0.76 of
    ``@base`` at 16 streams (0.87 with 0.06). The dense path costs two copies of a dense slot (the dense one
    and oneDNN's), 106 MB for SmolLM2's q_proj and v_proj.
  * ``@stack`` (the sum of all tasks) keeps merged weights W + Σ as well: a batch of only ``@stack`` rows runs
    the very same products as ``@base`` (no extra cost at all), a mixed batch pays its stack rows' delta like
    any task.
  * low rank (A, B) for dense-LoRA baseline adapters: s·(x·Aᵀ)·Bᵀ is cheaper than either.
A state is immutable once built; registering a task builds a new state off the engine thread and the engine
swaps it in between two decode steps."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from adapters_store import LowRankDelta, SparseDelta

from .kernels import Linear
from .sparse_kernel import SparseDeltaKernel

BASE = "@base"
STACK = "@stack"
DENSE_ABOVE = 0.06  # slots denser than this are served dense (see the module docstring)


@dataclass(frozen=True)
class SlotDelta:
    """One slot's delta for one layer, in exactly one representation."""

    shape: tuple[int, int]
    nnz: int
    crow: torch.Tensor | None = None  # (d_out + 1,) int32  } sparse
    col: torch.Tensor | None = None  # (nnz,) int32         }
    val: torch.Tensor | None = None  # (nnz,) fp32          }
    dense: torch.Tensor | None = None  # (d_out, d_in) fp32
    product: Linear | None = None  # the dense delta's product (packed for oneDNN on CPU)
    lowrank: tuple[torch.Tensor, torch.Tensor, float] | None = None  # A (r, d_in), B (d_out, r), scale

    @property
    def kind(self) -> str:
        return "sparse" if self.crow is not None else "dense" if self.dense is not None else "lowrank"

    def csr(self) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, self.val, self.shape, check_invariants=False)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Δ x for rows x: (N, d_in) -> (N, d_out), fp32."""
        xf = x.float()
        if self.kind == "sparse":
            return torch.sparse.mm(self.csr(), xf.T).T
        if self.kind == "dense":
            return self.product(xf)
        a, b, scale = self.lowrank
        return scale * F.linear(F.linear(xf, a), b)

    def to_dense(self) -> torch.Tensor:
        if self.kind == "sparse":
            return self.csr().to_dense()
        if self.kind == "dense":
            return self.dense
        a, b, scale = self.lowrank
        return scale * (b @ a)


def slot_delta(dense: torch.Tensor | None = None, *, lowrank=None, device=None,
               dense_above: float = DENSE_ABOVE) -> SlotDelta:
    """Pick the representation of one layer's delta by its density (module docstring): sparse up to
    ``dense_above``, dense above."""
    if lowrank is not None:
        a, b, scale = lowrank
        shape = (b.shape[0], a.shape[1])
        return SlotDelta(shape=shape, nnz=shape[0] * shape[1],
                         lowrank=(a.float().to(device), b.float().to(device), float(scale)))
    dense = dense.float().to(device)
    nnz = int(torch.count_nonzero(dense))
    shape = tuple(dense.shape)
    if nnz <= dense_above * dense.numel():
        csr = dense.to_sparse_csr()
        return SlotDelta(shape=shape, nnz=nnz, crow=csr.crow_indices().to(torch.int32),
                         col=csr.col_indices().to(torch.int32), val=csr.values())
    return SlotDelta(shape=shape, nnz=nnz, dense=dense, product=Linear([dense]))


def from_stored(delta: SparseDelta | LowRankDelta, device) -> SlotDelta:
    if isinstance(delta, LowRankDelta):
        return slot_delta(lowrank=(delta.A, delta.B, delta.scale), device=device)
    return slot_delta(delta.to_dense(), device=device)


@dataclass(frozen=True)
class TaskInfo:
    name: str
    order: int
    manifest: dict
    nonzero: int
    total: int
    overlap: float  # fraction of its non-zero positions that are non-zero in an earlier task's delta

    @property
    def density(self) -> float:
        return self.nonzero / self.total if self.total else 0.0


@dataclass(frozen=True)
class BankState:
    """Immutable: slot 0 is ``@stack``; tasks follow in order. ``@base`` has no slot (index -1)."""

    tasks: dict[str, TaskInfo] = field(default_factory=dict)
    slots: dict[str, int] = field(default_factory=dict)  # name -> slot (STACK -> 0)
    layers: dict[str, list[SlotDelta | None]] = field(default_factory=dict)  # layer -> per slot
    stack_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> W + Σ deltas (merged)
    version: int = 0
    # (layers, slot) -> that slot's sparse deltas of these layers stacked into one CSR; filled on first use
    _fused: dict = field(default_factory=dict, repr=False, compare=False)
    # layers -> the merged @stack product of a projection group; slot -> its layers not served sparse
    _stack_linears: dict = field(default_factory=dict, repr=False, compare=False)
    _unsparse: dict = field(default_factory=dict, repr=False, compare=False)

    def stack_linear(self, layers: tuple[str, ...], base: Linear) -> Linear:
        """The fused product of a projection group with the merged ``@stack`` weights W + Σ deltas, from the
        group's base product ``base``; packed on first use."""
        if not any(name in self.stack_weights for name in layers):
            return base  # no task adapts these layers: no second copy of their weights
        if layers not in self._stack_linears:
            parts = [(self.stack_weights.get(name, w), b) for name, (w, b) in zip(layers, base.parts)]
            self._stack_linears[layers] = Linear([w for w, _ in parts], [b for _, b in parts])
        return self._stack_linears[layers]

    def unsparse(self, slot: int) -> frozenset[str]:
        """The layers whose delta in ``slot`` is dense or low rank."""
        if slot not in self._unsparse:
            self._unsparse[slot] = frozenset(name for name, per_slot in self.layers.items()
                                             if per_slot[slot] is not None and per_slot[slot].kind != "sparse")
        return self._unsparse[slot]

    def fused_csr(self, layers: tuple[str, ...], widths: tuple[int, ...], slot: int) -> SlotDelta | None:
        """One CSR (Σ d_out, d_in) holding the sparse deltas of ``layers`` (which share their input) for a slot,
        one layer's rows after the other (``widths``: each layer's d_out); non-sparse or missing layers give
        empty rows. None if it is empty."""
        key = (layers, slot)
        if key not in self._fused:
            parts = [(self.layers[name][slot] if name in self.layers else None) for name in layers]
            sparse = [d if d is not None and d.kind == "sparse" else None for d in parts]
            if all(d is None for d in sparse):
                self._fused[key] = None
            else:
                d_in = next(d.shape[1] for d in sparse if d is not None)
                crows, cols, vals, offset, d_out = [], [], [], 0, 0
                for rows, d in zip(widths, sparse):
                    if d is None:
                        crows.append(torch.full((rows,), offset, dtype=torch.int32))
                    else:
                        crows.append(d.crow[:-1] + offset)
                        cols.append(d.col)
                        vals.append(d.val)
                        offset += d.nnz
                    d_out += rows
                crows.append(torch.tensor([offset], dtype=torch.int32))
                dev = next(d.val.device for d in sparse if d is not None)
                self._fused[key] = SlotDelta(shape=(d_out, d_in), nnz=offset, crow=torch.cat(crows).to(dev),
                                             col=torch.cat(cols), val=torch.cat(vals))
        return self._fused[key]

    def slot_of(self, name: str) -> int:
        """-1 for ``@base``; KeyError for an unknown task."""
        return -1 if name == BASE else self.slots[name]

    def names(self) -> list[str]:
        return list(self.tasks)


def build_state(weights: dict[str, torch.Tensor], tasks: list[tuple[TaskInfo, dict[str, SlotDelta]]],
                version: int) -> BankState:
    """A bank over the given tasks (already ordered). ``weights``: layer -> base weight (d_out, d_in), used for
    the merged ``@stack`` weights. Per-task overlap is measured here against all earlier tasks."""
    slots = {STACK: 0}
    layer_names = sorted({layer for _, deltas in tasks for layer in deltas})
    layers: dict[str, list[SlotDelta | None]] = {layer: [None] for layer in layer_names}
    stack_weights: dict[str, torch.Tensor] = {}
    infos: dict[str, TaskInfo] = {}
    seen: dict[str, torch.Tensor] = {}  # layer -> union of earlier tasks' non-zero positions (bool)
    sums: dict[str, torch.Tensor] = {}
    for index, (info, deltas) in enumerate(tasks, start=1):
        slots[info.name] = index
        overlapping = nonzero = 0
        for layer in layer_names:
            delta = deltas.get(layer)
            layers[layer].append(delta)
            if delta is None:
                continue
            dense = delta.to_dense()
            mask = dense != 0
            nonzero += int(mask.sum())
            if layer in seen:
                overlapping += int((mask & seen[layer]).sum())
                seen[layer] |= mask
                sums[layer] += dense
            else:
                seen[layer] = mask.clone()
                sums[layer] = dense.clone()
        infos[info.name] = TaskInfo(info.name, info.order, info.manifest, info.nonzero, info.total,
                                    overlapping / nonzero if nonzero else 0.0)
    for layer, total in sums.items():
        layers[layer][0] = slot_delta(total)
        w = weights[layer]
        stack_weights[layer] = (w.float() + total.to(w.device)).to(w.dtype)
    return BankState(tasks=infos, slots=slots, layers=layers, stack_weights=stack_weights, version=version)


RowAdapter = tuple[BankState, int]  # a row's adapter: the bank state it was admitted under and its slot (-1: base)


def row_delta(row: RowAdapter, layer: str) -> SlotDelta | None:
    state, slot = row
    per_slot = state.layers.get(layer)
    return None if slot < 0 or per_slot is None else per_slot[slot]


class BlockTable:
    """The block-diagonal CSR of one layer group for the running batch, kept in place across batch changes.

    Every row position i owns a fixed stretch of ``capacity`` entries (its delta's non-zeros, then zero
    padding in the block's last row), so a row that joins or moves rewrites only its own stretch: a few µs,
    where rebuilding the whole matrix at every change (the first design) cost 0.2-0.6 ms per group, a
    composition change every one or two steps at 16-32 streams, and up to 10 % of the decode time. The padding
    costs ``capacity - nnz`` multiply-adds of zeros per row, little while tasks have similar density."""

    def __init__(self, d_out: int, d_in: int, max_rows: int, device):
        self.d_out, self.d_in, self.max_rows, self.device = d_out, d_in, max_rows, device
        self.capacity = 0
        self.held: list[object] = []  # per position: the SlotDelta written there (None: empty block)
        self.crow = self.col = self.val = None

    def _allocate(self, capacity: int) -> None:
        self.capacity = capacity
        self.crow = torch.empty(self.max_rows * self.d_out + 1, dtype=torch.int32, device=self.device)
        self.col = torch.empty(self.max_rows * capacity, dtype=torch.int32, device=self.device)
        self.val = torch.empty(self.max_rows * capacity, dtype=torch.float32, device=self.device)
        self.held = [_UNSET] * self.max_rows

    def _write(self, i: int, block: SlotDelta | None) -> None:
        c, d_out = self.capacity, self.d_out
        rows = self.crow[i * d_out:(i + 1) * d_out]
        col = self.col[i * c:(i + 1) * c]
        val = self.val[i * c:(i + 1) * c]
        nnz = 0 if block is None else block.nnz
        if block is None:
            rows.fill_(i * c)
        else:
            torch.add(block.crow[:-1], i * c, out=rows)
            torch.add(block.col, i * self.d_in, out=col[:nnz])
            val[:nnz] = block.val
        col[nnz:] = i * self.d_in  # padding: zeros at the block's first column, in its last row
        val[nnz:] = 0.0

    def matrix(self, blocks: list[SlotDelta | None]) -> torch.Tensor | None:
        """The (n·d_out, n·d_in) block-diagonal CSR with ``blocks[i]`` at position i (None: no sparse rows)."""
        need = max((b.nnz for b in blocks if b is not None), default=0)
        if need == 0:
            return None
        # Every position is padded to the capacity, and the padding is multiplied like the deltas: a table that
        # once held a much denser block than the batch now needs shrinks again.
        if need > self.capacity or self.capacity > 2 * need:
            self._allocate(-(-need * 33 // 32))
        for i, block in enumerate(blocks):
            if self.held[i] is not block:
                self._write(i, block)
                self.held[i] = block
        n, c = len(blocks), self.capacity
        self.crow[n * self.d_out] = n * c
        return torch.sparse_csr_tensor(self.crow[:n * self.d_out + 1], self.col[:n * c], self.val[:n * c],
                                       (n * self.d_out, n * self.d_in), check_invariants=False)


_UNSET = object()


def _empty_csr(d_out: int, d_in: int) -> SlotDelta:
    return SlotDelta(shape=(d_out, d_in), nnz=0, crow=torch.zeros(d_out + 1, dtype=torch.int32),
                     col=torch.zeros(0, dtype=torch.int32), val=torch.zeros(0, dtype=torch.float32))


class BlockTables:
    """The engine's block tables, one per layer group, shared by its successive plans (one live at a time)."""

    def __init__(self, max_rows: int, device):
        self.max_rows, self.device = max_rows, device
        self._tables: dict[tuple, BlockTable] = {}

    def get(self, layers: tuple[str, ...], d_out: int, d_in: int, layout: str = "row") -> BlockTable:
        """The table of a layer group in one of the plans' layouts ("row" or "adapter"): one each, so that a
        batch whose layout changes back and forth (16 rows over 8 adapters: one leaves, one joins) finds its
        blocks still in place."""
        key = (layers, d_out, d_in, layout)
        if key not in self._tables:
            self._tables[key] = BlockTable(d_out, d_in, self.max_rows, self.device)
        return self._tables[key]


class RowPlan:
    """How the decode rows of a batch get their deltas: per group of layers that share an input (q, k, v), one
    block-diagonal CSR product for all sparse deltas, and one grouped product per dense or low-rank delta. Each
    row keeps the bank state it was admitted under, so that a registration changes nothing for requests in
    flight. Built once per batch composition and reused across decode steps (per group lazily).

    The block-diagonal product has two layouts, chosen per composition:
      * by row: block i is row i's delta, and the product is one SpMV over the rows' concatenated inputs. Every
        row reads its own copy of its task's delta.
      * by adapter: block t is the t-th distinct adapter's delta, and the product is one SpMM of that matrix
        with a (T·d_in, K) matrix whose column k of block t is the input of the k-th row using adapter t (zero
        where an adapter has fewer than K rows). Each delta is read once, however many rows use it.
    The deltas are read from memory at every step (the base weights streamed in between evict them from the
    caches), so reading fewer is what counts once rows share adapters: with 8 adapters at 3.5 % density over
    q_proj and v_proj of SmolLM2 (30 blocks, a block's weights streamed between two products), the delta
    products of one step took 2.9 ms by row and 2.6 ms by adapter at 16 rows, 5.6 and 3.0 ms at 32 rows; at 8
    rows (K = 1) the by-row layout was faster, 1.6 against 2.1 ms. By adapter is used when there are at least
    1.5 rows per adapter."""

    def __init__(self, rows: list[RowAdapter], device, tables: BlockTables | None = None,
                 previous: RowPlan | None = None, kernel: SparseDeltaKernel | None = None):
        self.rows = rows
        # the compiled CPU kernel (``server/sparse_kernel.py``; fp32 on CPU): when given, it does the sparse
        # products instead of the block tables, reading each adapter's delta once for up to 4 of its rows
        self.kernel = kernel
        self.n = len(rows)
        self.device = device
        # the engine's tables (it keeps one plan alive at a time); a plan of its own otherwise
        self.tables = tables or BlockTables(max(1, len(rows)), device)
        self.adapted = set().union(*(state.layers for state, slot in rows if slot >= 0)) if rows else set()
        self._prepared: dict[tuple[str, ...], tuple] = {}
        # rows with a dense or low-rank delta somewhere, and those layers
        self.unsparse = [(i, state.unsparse(slot)) for i, (state, slot) in enumerate(rows)
                         if slot >= 0 and state.unsparse(slot)]
        # Rows with an adapter, grouped by adapter in a stable order (the bank's order), so that the block
        # tables keep their blocks in place while the same adapters stay in the batch.
        with_adapter = [i for i, (_, slot) in enumerate(rows) if slot >= 0]
        distinct = sorted({(id(rows[i][0]), rows[i][1]): rows[i] for i in with_adapter}.items(),
                          key=lambda kv: (kv[1][0].version, kv[1][1]))
        self.adapters = [adapter for _, adapter in distinct]  # (T,)
        self.by_adapter = bool(with_adapter) and 2 * len(with_adapter) >= 3 * len(self.adapters)
        where = {key: t for t, (key, _) in enumerate(distinct)}
        owner = [where[(id(rows[i][0]), rows[i][1])] for i in with_adapter]  # (n_a,) each adapted row's adapter
        if kernel is not None:
            members: list[list[int]] = [[] for _ in self.adapters]
            for i, t in zip(with_adapter, owner):
                members[t].append(i)
            starts = [0]
            for m in members:
                starts.append(starts[-1] + len(m))
            self.k_start = torch.tensor(starts, dtype=torch.int32)  # (T + 1,) adapter t's rows in k_rows
            self.k_rows = torch.tensor([i for m in members for i in m], dtype=torch.int32)  # (n_a,) by adapter
            self._scratch = torch.empty(0, dtype=torch.float32)  # the kernel's interleaved inputs
        elif self.by_adapter:
            seen = [0] * len(self.adapters)
            k_idx = []
            for t in owner:
                k_idx.append(seen[t])
                seen[t] += 1
            self.k = max(seen)
            self.t_idx = torch.tensor(owner, device=device)  # (n_a,) each adapted row's block
            self.k_idx = torch.tensor(k_idx, device=device)  # (n_a,) and its column in that block
            # (n_a,) the adapted rows; None when that is every row (no gather needed)
            self.row_idx = None if len(with_adapter) == self.n else torch.tensor(with_adapter, device=device)
            self._inputs: dict[int, torch.Tensor] = {}  # d_in -> (T, d_in, K) fp32, zero where unused
        # Rows that join or leave without changing the set of adapters (most batch changes at 16-32 rows) keep
        # the previous plan's block products, which depend on the adapters alone (``previous``: the plan this one
        # replaces, on the same tables).
        self.adapters_key = RowPlan.key(self.adapters)
        # (the kernel's tables depend on the adapters alone; torch's on the layout and the tables too)
        same_products = previous is not None and previous.kernel is kernel and (
            kernel is not None or (previous.tables is self.tables and self.by_adapter and previous.by_adapter))
        if (same_products and previous.adapters_key == self.adapters_key
                and not self.unsparse and not previous.unsparse):
            self._prepared = previous._prepared

    @staticmethod
    def key(rows: list[RowAdapter]) -> tuple:
        return tuple((id(state), slot) for state, slot in rows)

    def _prepare(self, layers: tuple[str, ...], widths: tuple[int, ...]) -> tuple:
        owners = self.adapters if self.by_adapter or self.kernel is not None else self.rows
        blocks = [state.fused_csr(layers, widths, slot) if slot >= 0 else None for state, slot in owners]
        block = None
        if any(b is not None for b in blocks):
            d_out, d_in = next(b.shape for b in blocks if b is not None)
            if self.kernel is not None:
                if any(b is None for b in blocks):  # an adapter with no sparse delta in this group
                    empty = _empty_csr(d_out, d_in)
                    blocks = [b if b is not None else empty for b in blocks]
                block = self.kernel.prepare(blocks)
            else:
                layout = "adapter" if self.by_adapter else "row"
                block = self.tables.get(layers, d_out, d_in, layout).matrix(blocks)
        offsets = [sum(widths[:j]) for j in range(len(layers))]
        others: dict[int, tuple[int, SlotDelta, list[int]]] = {}  # dense and low-rank deltas, by layer
        for i, names in self.unsparse:
            for j, name in enumerate(layers):
                if name in names:
                    delta = row_delta(self.rows[i], name)
                    others.setdefault(id(delta), (j, delta, []))[2].append(i)
        groups = [(offsets[j], widths[j], torch.tensor(rows, device=self.device), delta)
                  for j, delta, rows in others.values()]
        return block, groups

    def _sparse(self, block: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The block-diagonal product: x (n, d_in) -> (n_a, Σ d_out) fp32, for the adapted rows (all n by row)."""
        if not self.by_adapter:
            return (block @ x.float().reshape(-1)).view(self.n, -1)  # (n, Σ d_out)
        d_in = x.shape[1]
        t, k = len(self.adapters), self.k
        if d_in not in self._inputs:
            self._inputs[d_in] = torch.zeros(t, d_in, k, dtype=torch.float32, device=self.device)
        inputs = self._inputs[d_in]  # (T, d_in, K)
        xa = x if self.row_idx is None else x.index_select(0, self.row_idx)  # (n_a, d_in)
        inputs[self.t_idx, :, self.k_idx] = xa.float()
        out = (block @ inputs.view(t * d_in, k)).view(t, -1, k)  # (T, Σ d_out, K)
        return out[self.t_idx, :, self.k_idx]  # (n_a, Σ d_out)

    def add(self, layers: tuple[str, ...], widths: tuple[int, ...], x: torch.Tensor, y: torch.Tensor) -> None:
        """y += each row's Δ·x in place, for a group of layers whose outputs lie side by side in y (``widths``).
        x: (n, d_in), y: (n, Σ d_out)."""
        if not self.adapted.intersection(layers):
            return
        if layers not in self._prepared:
            self._prepared[layers] = self._prepare(layers, widths)
        block, groups = self._prepared[layers]
        if block is not None and self.kernel is not None:
            need = self.kernel.scratch_size(block, self.k_rows.numel())
            if self._scratch.numel() < need:
                self._scratch = torch.empty(need, dtype=torch.float32)
            self.kernel.add(block, self.k_start, self.k_rows, x if x.stride(1) == 1 else x.contiguous(), y,
                            self._scratch)
        elif block is not None:
            out = self._sparse(block, x).to(y.dtype)  # (n_a, Σ d_out)
            if self.by_adapter and self.row_idx is not None:
                y.index_add_(0, self.row_idx, out)
            else:
                y += out
        for start, width, rows, delta in groups:
            y[:, start:start + width].index_add_(0, rows, delta.apply(x.index_select(0, rows)).to(y.dtype))


class StepPlan:
    """The deltas of one forward: the decode rows (first ``rows.n`` positions of x), then prompt segments
    ``(begin, end, adapter)`` of x that each belong to one request."""

    def __init__(self, rows: RowPlan | None, segments: list[tuple[int, int, RowAdapter]]):
        self.rows = rows if rows is not None and rows.n else None
        self.segments = [seg for seg in segments if seg[2][1] >= 0]  # @base segments need nothing
        everyone = (rows.rows if self.rows else []) + [adapter for _, _, adapter in segments]
        # every layer some position has a delta in (a group outside it is the plain base product)
        self.adapted = set().union(*(state.layers for state, _ in (a for _, _, a in self.segments)),
                                   self.rows.adapted if self.rows else set())
        # Every position on the same @stack: the merged weights W + Σ serve it at the cost of @base.
        self.all_stack = everyone[0][0] if everyone and all(
            a[0] is everyone[0][0] and a[1] == 0 for a in everyone) else None

    def project(self, layers: tuple[str, ...], lin: Linear, x: torch.Tensor) -> torch.Tensor:
        """x: (N, d_in) -> x·Wᵀ (+ bias) + each position's own Δ·x for a projection group whose base product is
        ``lin``: (N, Σ d_out), the layers' outputs side by side."""
        if self.all_stack is not None:
            return self.all_stack.stack_linear(layers, lin)(x)
        y = lin(x)
        if self.adapted.isdisjoint(layers):
            return y
        if self.rows is not None:
            n = self.rows.n
            if n == x.shape[0]:
                self.rows.add(layers, lin.widths, x, y)
            else:
                self.rows.add(layers, lin.widths, x[:n], y[:n])
        for begin, end, (state, slot) in self.segments:
            xs, ys = x[begin:end], y[begin:end]
            fused = state.fused_csr(layers, lin.widths, slot)  # the group's sparse deltas in one product
            if fused is not None:
                ys += fused.apply(xs).to(y.dtype)
            unsparse, start = state.unsparse(slot), 0
            for name, width in zip(layers, lin.widths):
                if name in unsparse:
                    ys[:, start:start + width] += row_delta((state, slot), name).apply(xs).to(y.dtype)
                start += width
        return y
