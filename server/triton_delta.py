"""The sparse adapter deltas of a projection group on GPU, as Triton kernels: the CUDA counterpart of the CPU
kernel of ``server/sparse_kernel.py`` (``csrc/sparse_delta.c``), with the same job and the same arguments.

For the T sparse adapters of one projection group in a forward, adapter t with CSR delta Δ_t (R = Σ d_out,
d_in) applied to its positions P_t (rows of x; positions of different adapters overlap, as a route holds
several adapters):

    y[p, :] += Σ_{t: p ∈ P_t} Δ_t · x[p, :]     x (N, d_in), y (N, R); accumulated in fp32

in two launches:
  1. ``delta``: out[j, :] = Δ_t · x[rows[j], :] for every entry j of adapter t (entries laid out by adapter:
     ``starts``/``rows`` as the CPU kernel takes them), all T adapters in one grid (row blocks of Δ, adapters);
     each program keeps a (BLOCK_R, BLOCK_P) fp32 tile for BLOCK_P of the adapter's positions and walks the
     non-zeros of its BLOCK_R rows, each row masked by its own count. out: (M = Σ_t |P_t|, R) fp32.
  2. ``gather``: y[p, :] = y[p, :] + Σ out[j, :] over the entries j of position p, summed in fp32 in adapter
     order and rounded to y's dtype once. Deterministic: no atomics (``index_add_`` on CUDA adds with atomics,
     in an order that changes from run to run where positions repeat, and would round a bf16 y per adapter).

The adapters' CSR arrays are concatenated once per set of adapters (``TritonDeltas.prepare``: a ``DeltaTable``,
kept across forwards like the CPU kernel's tables) and a forward's positions grouped once per plan and group
(``TritonDeltas.positions``). triton is imported on first use only (``available``): the CPU server imports this
module without it. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors through Triton's interpreter,
which is how the tests check them without a GPU; triton reads that variable when a kernel is decorated, so the
kernels are defined on first use, once per interpreter setting."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

BLOCK_R = 64  # rows of Δ per program
BLOCK_P = 16  # positions per tile


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether triton can be imported (not whether there is a GPU: ``applies_to`` says where it serves)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether triton runs kernels through its interpreter (``TRITON_INTERPRET``), read as triton reads it."""
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def applies_to(device: torch.device) -> bool:
    """Where these kernels serve the sparse deltas: on CUDA devices, with triton installed."""
    return device.type == "cuda" and available()


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """The two kernels, defined (decorated) here on first use; ``interpret`` keys the cache only, as triton
    chooses the interpreter or the compiler when ``triton.jit`` runs."""
    import triton
    import triton.language as tl

    @triton.jit
    def delta(crow_ptr, col_ptr, val_ptr, starts_ptr, rows_ptr, x_ptr, out_ptr, R, stride_xn, stride_xk,
              BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
        """out[j, r] = Σ_k val[k]·x[rows[j], col[k]] over the non-zeros k of row r of adapter t's Δ, for the
        entries j in starts[t]..starts[t+1]-1. Program (row block, t).
        crow: (T, R + 1) int64 into col/val; col: (nnz,) int32; val: (nnz,) fp32 or bf16; starts: (T + 1,)
        int32; rows: (M,) int32; x: (N, d_in) any float dtype, strides (stride_xn, stride_xk); out: (M, R) fp32
        contiguous."""
        t = tl.program_id(1)
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) rows of Δ_t
        r_ok = r < R
        crow = crow_ptr + t.to(tl.int64) * (R + 1)
        begin = tl.load(crow + r, mask=r_ok, other=0)  # (BLOCK_R,) int64: each row's first non-zero
        count = tl.load(crow + r + 1, mask=r_ok, other=0) - begin  # (BLOCK_R,) its non-zeros (0 past R)
        most = tl.max(count, axis=0).to(tl.int32)  # the block's longest row
        p_begin = tl.load(starts_ptr + t)
        p_end = tl.load(starts_ptr + t + 1)
        for p0 in range(p_begin, p_end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)  # (BLOCK_P,) entries of adapter t
            p_ok = p < p_end
            xrow = tl.load(rows_ptr + p, mask=p_ok, other=0).to(tl.int64)  # (BLOCK_P,) their rows of x
            acc = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.float32)
            for k in range(0, most):
                k_ok = k < count  # (BLOCK_R,) rows that have a k-th non-zero
                c = tl.load(col_ptr + begin + k, mask=k_ok, other=0).to(tl.int64)  # (BLOCK_R,)
                v = tl.load(val_ptr + begin + k, mask=k_ok, other=0.0).to(tl.float32)  # (BLOCK_R,)
                xv = tl.load(x_ptr + xrow[None, :] * stride_xn + c[:, None] * stride_xk,
                             mask=k_ok[:, None] & p_ok[None, :], other=0.0)  # (BLOCK_R, BLOCK_P)
                acc += v[:, None] * xv.to(tl.float32)
            tl.store(out_ptr + p[None, :].to(tl.int64) * R + r[:, None], acc,
                     mask=r_ok[:, None] & p_ok[None, :])

    @triton.jit
    def gather(out_ptr, order_ptr, segments_ptr, unique_ptr, y_ptr, R, stride_yn, stride_yr,
               BLOCK_R: tl.constexpr):
        """y[unique[u], r] += Σ out[order[e], r] for e in segments[u]..segments[u+1]-1, in fp32, rounded once.
        Program (distinct position u, row block). out: (M, R) fp32; order: (M,) int32; segments: (U + 1,)
        int32; unique: (U,) int32; y: (N, R) fp32, bf16 or fp16, strides (stride_yn, stride_yr)."""
        u = tl.program_id(0)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        r_ok = r < R
        e_begin = tl.load(segments_ptr + u)
        e_end = tl.load(segments_ptr + u + 1)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for e in range(e_begin, e_end):
            j = tl.load(order_ptr + e).to(tl.int64)
            acc += tl.load(out_ptr + j * R + r, mask=r_ok, other=0.0)
        row = tl.load(unique_ptr + u).to(tl.int64)
        target = y_ptr + row * stride_yn + r * stride_yr  # (BLOCK_R,)
        old = tl.load(target, mask=r_ok, other=0.0)
        tl.store(target, (old.to(tl.float32) + acc).to(old.dtype), mask=r_ok)

    return delta, gather


@dataclass
class DeltaTable:
    """One projection group's sparse deltas for a set of adapters, concatenated on their device."""

    deltas: list  # [GroupDelta] (T,), kept referenced (a cache keyed by their ids stays valid)
    crow: torch.Tensor  # (T, R + 1) int64: adapter t's row r is col/val[crow[t, r]:crow[t, r + 1]]
    col: torch.Tensor  # (Σ nnz + 1,) int32 (one spare entry: never an empty buffer)
    val: torch.Tensor  # (Σ nnz + 1,) bf16 if every adapter's values are, else fp32
    shape: tuple[int, int]  # (R, d_in)
    nnz: int  # Σ nnz


@dataclass
class Positions:
    """A forward's positions for one group's adapters, on the device: the entries by adapter (the kernel's
    rows) and, for the sum, the entries of each distinct position."""

    starts: torch.Tensor  # (T + 1,) int32: adapter t's entries are rows[starts[t]:starts[t + 1]]
    rows: torch.Tensor  # (M,) int32 rows of x and y, by adapter
    order: torch.Tensor  # (M,) int32 entries sorted by row (adapter order within a row)
    segments: torch.Tensor  # (U + 1,) int32: row unique[u]'s entries are order[segments[u]:segments[u + 1]]
    unique: torch.Tensor  # (U,) int32 the distinct rows, ascending
    last: int  # the largest row (-1 without entries), checked against x and y on the host


class TritonDeltas:
    """y[p] += Σ_t Δ_t·x[p] over the sparse adapters t whose positions hold p, on GPU (or on CPU through
    Triton's interpreter); x and y of any float dtype, delta values fp32 or bf16, sums in fp32."""

    def __init__(self, block_r: int = BLOCK_R, block_p: int = BLOCK_P, num_warps: int = 4):
        self.block_r, self.block_p, self.num_warps = block_r, block_p, num_warps

    @staticmethod
    def prepare(deltas: list) -> DeltaTable:
        """The per-group part, which depends on the adapters alone: ``deltas`` (T,) sparse GroupDeltas of one
        shape on one device, int32 rows, int32 or int16 columns (the CPU's served form), fp32 or bf16 values."""
        shapes = {d.shape for d in deltas}
        if len(shapes) != 1:
            raise ValueError(f"deltas of different shapes {sorted(shapes)}")
        devices = {d.val.device for d in deltas if d.kind == "sparse"}
        for d in deltas:
            if (d.kind != "sparse" or d.col.dtype not in (torch.int32, torch.int16) or d.crow.dtype != torch.int32
                    or d.val.dtype not in (torch.float32, torch.bfloat16) or len(devices) != 1):
                raise ValueError("the kernel takes sparse deltas on one device with int32 rows, int32 or int16 "
                                 "columns and fp32 or bf16 values")
        (r, d_in), device = shapes.pop(), devices.pop()
        dtype = torch.bfloat16 if all(d.val.dtype == torch.bfloat16 for d in deltas) else torch.float32
        csrs = [d.in_order() for d in deltas]  # (crow, col, val): the CPU's served form has its rows reordered
        counts = torch.tensor([0] + [c.numel() for _, c, _ in csrs[:-1]], dtype=torch.int64)  # (col: (nnz,))
        offsets = torch.cumsum(counts, 0).to(device)  # (T,) where each adapter's non-zeros begin
        crow = torch.stack([r.to(torch.int64) for r, _, _ in csrs]) + offsets[:, None]  # (T, R + 1)
        spare_col = torch.zeros(1, dtype=torch.int32, device=device)
        spare_val = torch.zeros(1, dtype=dtype, device=device)
        col = torch.cat([*(c.to(torch.int32) for _, c, _ in csrs), spare_col])  # (Σ nnz + 1,)
        val = torch.cat([*(v.to(dtype) for _, _, v in csrs), spare_val])  # (Σ nnz + 1,)
        return DeltaTable(list(deltas), crow.contiguous(), col, val, (r, d_in), col.numel() - 1)

    @staticmethod
    def positions(starts, rows, device=None) -> Positions:
        """The per-plan part: ``starts`` (T + 1,) and ``rows`` (M,) as the CPU kernel takes them (int tensors or
        lists; a row may stand under several adapters), grouped on the host and moved to ``device`` once."""
        starts = torch.as_tensor(starts, dtype=torch.int64).cpu()  # (T + 1,)
        rows = torch.as_tensor(rows, dtype=torch.int64).cpu()  # (M,)
        if starts.dim() != 1 or starts.numel() < 1 or int(starts[0]) != 0 or int(starts[-1]) != rows.numel() \
                or bool((starts[1:] < starts[:-1]).any()):
            raise ValueError("starts must ascend from 0 to the number of rows")
        if rows.numel() and int(rows.min()) < 0:
            raise ValueError("negative row")
        ordered, order = torch.sort(rows, stable=True)  # (M,), (M,)
        unique, counts = torch.unique_consecutive(ordered, return_counts=True)  # (U,), (U,)
        segments = torch.zeros(unique.numel() + 1, dtype=torch.int64)
        segments[1:] = torch.cumsum(counts, 0)  # (U + 1,)
        moved = [t.to(torch.int32).to(device) for t in (starts, rows, order, segments, unique)]
        return Positions(*moved, last=int(unique[-1]) if unique.numel() else -1)

    @staticmethod
    def scratch_size(table: DeltaTable, n_rows: int) -> int:
        """The CPU kernel's scratch, which this one does not use (its (M, R) fp32 buffer is allocated per call on
        the device, by torch's caching allocator)."""
        return 0

    def add(self, table: DeltaTable, starts, rows, x: torch.Tensor, y: torch.Tensor, scratch=None) -> None:
        """y[rows[starts[t]:starts[t+1]]] += Δ_t · x[same rows], in place, for every adapter t: the CPU kernel's
        call (``scratch`` unused). It groups the positions on every call: a plan that keeps its positions
        calls ``positions`` once and ``add_at`` per forward."""
        self.add_at(table, self.positions(starts, rows, x.device), x, y)

    def add_at(self, table: DeltaTable, at: Positions, x: torch.Tensor, y: torch.Tensor) -> None:
        """y[p] += Σ_t Δ_t · x[p] over ``at``'s positions. x: (N, ≥ d_in), y: (N, ≥ R), any strides, on the
        table's device; y fp32, bf16 or fp16."""
        rows_r, d_in = table.shape
        if x.dim() != 2 or y.dim() != 2 or x.shape[1] < d_in or y.shape[1] < rows_r:
            raise ValueError(f"x {tuple(x.shape)} or y {tuple(y.shape)} too small for a group of {table.shape}")
        if at.last >= min(x.shape[0], y.shape[0]):
            raise ValueError(f"row {at.last} past x {tuple(x.shape)} or y {tuple(y.shape)}")
        if at.starts.numel() != len(table.deltas) + 1:
            raise ValueError(f"{at.starts.numel() - 1} adapters' positions for a table of {len(table.deltas)}")
        if not (x.device == y.device == table.val.device == at.rows.device):
            raise ValueError("x, y, the table and the positions must be on one device")
        if not x.is_floating_point() or y.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError("x must be floating point, y fp32, bf16 or fp16")
        interpret = interpreting()
        if x.device.type == "cpu" and not interpret:
            raise ValueError("on CPU the kernels run only through triton's interpreter (TRITON_INTERPRET=1)")
        m, u = at.rows.numel(), at.unique.numel()
        if m == 0 or table.nnz == 0:
            return
        delta, gather = _kernels(interpret)
        out = torch.empty(m, rows_r, dtype=torch.float32, device=y.device)  # (M, R) each entry's Δ_t·x
        grid = (_cdiv(rows_r, self.block_r), len(table.deltas))
        delta[grid](table.crow, table.col, table.val, at.starts, at.rows, x, out, rows_r, x.stride(0), x.stride(1),
                    BLOCK_R=self.block_r, BLOCK_P=self.block_p, num_warps=self.num_warps)
        gather[(u, _cdiv(rows_r, self.block_r))](out, at.order, at.segments, at.unique, y, rows_r, y.stride(0),
                                                  y.stride(1), BLOCK_R=self.block_r, num_warps=self.num_warps)


def _cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ (triton.cdiv, without importing triton)."""
    return -(-a // b)
