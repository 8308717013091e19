"""The compiled CPU kernel for the rows' sparse deltas (``csrc/sparse_delta.c``): built once per machine with the
system C compiler into the cache folder, loaded with ctypes. Without a compiler (or if the build or the load
fails) the engine uses torch's sparse products instead, with the same results; ``load`` says why in the log.

A batch's rows go in blocks of up to 32 (``layout``), rows with the same or similar routes side by side; each
block reads every delta it needs once, for all its rows. A delta is served with its rows padded and ordered for
the inner loop (``kernel_rows``). ``python -m benchmarks.chain_kernel`` times the kernel alone on the trained
8-task chain, with the caches flushed between calls as a decode step leaves them (2-core Xeon, AVX-512; µs per
q/k/v group, median of 6 passes over the 30 layers; two runs): 37–43 at 1 row (one adapter), 134–148 at 8 rows,
119–145 at 16 and 183–213 at 32 (rows on every route of the chain: all 8 deltas read). Before the padded rows:
60, 187–190, 194–214 and 263–274. On a 2-core AMD EPYC (Zen 3, AVX2; three runs each): 43–67, 145–184, 177–215 and
282–342, against 46–56, 157–186, 418–459 and 937–966 while a 16-lane window was one 16-lane vector type, which
without AVX-512 went through the stack. README, Benchmarks, has the whole decode step and the serving figures."""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "sparse_delta.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
COL16_MAX = 32768  # the most columns a delta may have with int16 column indices (read as unsigned 16 bits)


ROW_PAD = 4  # a stored row's non-zeros: padded with zeros to a multiple of this (the inner loop's unrolling)
ROW_CHUNK = 64  # stored rows sorted by their padded length within chunks of this many rows (``kernel_rows``)


class _CSR(ctypes.Structure):
    _fields_ = [("crow", ctypes.c_void_p), ("col", ctypes.c_void_p), ("val", ctypes.c_void_p),
                ("perm", ctypes.c_void_p),  # int32 output row of each stored row, or NULL: in order
                ("kind", ctypes.c_int64)]  # 1: bf16 values (else fp32); 2: 16-bit columns (else int32)


def padded_lengths(lengths: np.ndarray, pad: int = ROW_PAD) -> np.ndarray:
    """Stored rows' non-zeros as ``kernel_rows`` pads them: each up to a multiple of ``pad``."""
    return -(-lengths // pad) * pad


def kernel_rows(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, chunk: int = ROW_CHUNK,
                pad: int = ROW_PAD) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A CSR delta (crow (R + 1,), col (nnz,), val (nnz,) of 2 or 4 bytes, on CPU) as the kernel reads it
    fastest: each row's non-zeros padded to a multiple of ``pad`` with zero values (on the row's last column),
    and within each chunk of ``chunk`` rows the rows stored by their padded length (then by row). The inner
    loop's trip count then repeats from row to row and has no remainder: on the trained 8-task chain this
    halves the time per non-zero with the delta in cache, and takes a quarter off it from memory (a branch
    mispredicted at the end of nearly every row of ~20 non-zeros cost as much as the multiply-adds). Returns
    (crow (R + 1,) int32, col, val in their dtypes, perm (R,) int32: stored row o holds output row perm[o], a
    row of the same chunk). In numpy: about 0.2 ms for a q/k/v group of SmolLM2, built at an adapter's first
    use (``bank.Groups``), not when it is loaded."""
    starts = crow.numpy().astype(np.int64)  # (R + 1,)
    r = starts.size - 1
    length = np.diff(starts)  # (R,)
    padded = padded_lengths(length, pad)  # (R,)
    # (R,) by chunk, then padded length (stable: then row)
    perm = np.argsort((np.arange(r) // chunk) * (int(padded.max(initial=0)) + 1) + padded, kind="stable")
    run = padded[perm]  # (R,) each stored row's padded length
    stored_crow = np.zeros(r + 1, dtype=np.int64)
    np.cumsum(run, out=stored_crow[1:])
    begin = starts[:-1][perm]  # (R,) each stored row's first entry in the given CSR
    index = np.arange(stored_crow[-1]) + np.repeat(begin - stored_crow[:-1], run)  # (nnz',) the entry it holds
    last = np.repeat(begin + length[perm] - 1, run)  # (nnz',) its row's last entry
    pads = index > last
    np.minimum(index, last, out=index)  # a pad repeats its row's last entry, with a zero value
    bits = {2: torch.int16, 4: torch.int32}[val.element_size()]  # (numpy has no bf16: the values' bits)
    stored_val = val.view(bits).numpy()[index]
    stored_val[pads] = 0  # +0.0 in fp32 and bf16
    return (torch.from_numpy(stored_crow.astype(np.int32)), torch.from_numpy(col.numpy()[index]),
            torch.from_numpy(stored_val).view(val.dtype), torch.from_numpy(perm.astype(np.int32)))


@dataclass
class Prepared:
    """One projection group's arguments for a batch: the distinct adapters' CSR deltas (kept referenced, so
    that the pointers stay valid)."""

    deltas: list  # [GroupDelta] (T,), all of shape (d_out, d_in)
    table: ctypes.Array  # (T,) _CSR pointing into them
    d_in: int
    d_out: int


BLOCK_ROWS = 32  # rows in a block (csrc/sparse_delta.c: two AVX-512 vectors of fp32; bits of a mask)


def _width(n: int) -> int:
    """A block's lanes: its rows padded to the next power of two."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


@dataclass
class Layout:
    """The per-batch part (``SparseDeltaKernel.layout``): the rows in blocks of up to ``BLOCK_ROWS``, rows of the
    same or similar routes together, and each block's entries, an adapter and the mask of its rows whose route
    holds it."""

    n_adapters: int
    rows: torch.Tensor  # (M,) int32 the rows, each once, block by block
    block_start: torch.Tensor  # (B + 1,) int32 block b's rows: rows[block_start[b]:block_start[b + 1]]
    entry_start: torch.Tensor  # (B + 1,) int32 block b's entries: entry_start[b]:entry_start[b + 1]
    entry_adapter: torch.Tensor  # (E,) int32 an entry's adapter
    entry_mask: torch.Tensor  # (E,) int32 (read as uint32) bit k: the block's k-th row takes that adapter
    lanes: int  # Σ over the blocks of their widths
    last: int  # the highest row, -1 for none


def _entry(d) -> _CSR:
    """A sparse GroupDelta's table entry, checked once and kept with it (``_lazy``): a batch whose rows change
    prepares its tables again, and checking 32 adapters' 30 groups each time took 24 ms."""
    entry = d._lazy.get("kernel_entry")
    if entry is None:
        d_out, d_in = d.shape
        if (d.kind != "sparse" or d.crow.dtype != torch.int32 or d.col.dtype not in (torch.int32, torch.int16)
                or d.val.dtype not in (torch.float32, torch.bfloat16) or d.val.device.type != "cpu"):
            raise ValueError("the kernel takes sparse deltas on CPU with int32 rows, int32 or int16 columns and "
                             "fp32 or bf16 values")
        if d.col.dtype == torch.int16 and d_in > COL16_MAX:
            raise ValueError(f"int16 columns for {d_in} columns")
        if d.perm is not None and (d.perm.dtype != torch.int32 or d.perm.shape != (d_out,) or not torch.equal(
                d.perm // ROW_CHUNK, torch.arange(d_out, dtype=torch.int32) // ROW_CHUNK)):
            raise ValueError(f"perm must be int32 (d_out,), each stored row's output row in its chunk of "
                             f"{ROW_CHUNK} rows (kernel_rows)")
        entry = d._lazy["kernel_entry"] = _CSR(
            d.crow.data_ptr(), d.col.data_ptr(), d.val.data_ptr(), d.perm.data_ptr() if d.perm is not None else None,
            int(d.val.dtype == torch.bfloat16) | 2 * int(d.col.dtype == torch.int16))
    return entry


class SparseDeltaKernel:
    """y[r] += Σ_t Δ_t·x[r] over the adapters t of row r's route, every adapter's delta read once per block of
    up to 32 rows that holds it. fp32 inputs and outputs on CPU only; delta values fp32 or bf16."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        self._fn = lib.jumplora_sparse_delta_add
        self._fn.restype = None
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        # adapters, n_adapters, n_blocks, block_start, rows, entry_start, entry_adapter, entry_mask, d_in, d_out,
        # chunk, x, xs, y, ys, xp, yp, n_threads
        self._fn.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ptr, i64, ptr, i64, ptr, ptr,
                             ctypes.c_int32]

    @staticmethod
    def prepare(deltas: list) -> Prepared:
        """The per-group part, which depends on the adapters alone: ``deltas`` (T,) sparse GroupDeltas with
        int32 rows, int32 or int16 columns (read as unsigned 16 bits) and fp32 or bf16 values on CPU, one shape;
        their rows stored in order (``perm`` None) or as ``kernel_rows`` stores them."""
        shapes = {d.shape for d in deltas}
        if len(shapes) != 1:
            raise ValueError(f"deltas of different shapes {sorted(shapes)}")
        d_out, d_in = shapes.pop()
        table = (_CSR * len(deltas))(*[_entry(d) for d in deltas])
        return Prepared(list(deltas), table, d_in, d_out)

    @staticmethod
    def layout(starts, rows) -> Layout:
        """The blocks for adapter t's rows ``rows[starts[t]:starts[t+1]]`` (``starts`` (T + 1,), ``rows`` (M,):
        int sequences or tensors; a row may stand under several adapters, never twice under one). Rows are
        ordered by their adapters' indices (lexicographically, so a chain's routes, each the one before plus an
        adapter, stand side by side) and cut into blocks of ``BLOCK_ROWS``."""
        starts = [int(s) for s in starts]
        rows = [int(r) for r in rows]
        if not starts or starts[0] != 0 or starts[-1] != len(rows) or any(b < a for a, b in zip(starts, starts[1:])):
            raise ValueError("starts must ascend from 0 to the number of rows")
        if rows and min(rows) < 0:
            raise ValueError("negative row")
        held: dict[int, list[int]] = {}  # row -> its adapters, ascending
        for t in range(len(starts) - 1):
            for r in rows[starts[t]:starts[t + 1]]:
                mine = held.setdefault(r, [])
                if mine and mine[-1] == t:
                    raise ValueError(f"row {r} twice under adapter {t}")
                mine.append(t)
        order = sorted(held, key=held.__getitem__)
        block_start, entry_start, entry_adapter, entry_mask, lanes = [0], [0], [], [], 0
        for b in range(0, len(order), BLOCK_ROWS):
            block = order[b:b + BLOCK_ROWS]
            masks: dict[int, int] = {}
            for k, r in enumerate(block):
                for t in held[r]:
                    masks[t] = masks.get(t, 0) | (1 << k)
            for t in sorted(masks):
                entry_adapter.append(t)
                entry_mask.append(masks[t] - (1 << 32) if masks[t] >= 1 << 31 else masks[t])  # (as int32)
            block_start.append(block_start[-1] + len(block))
            entry_start.append(len(entry_adapter))
            lanes += _width(len(block))

        def i32(values):
            return torch.tensor(values, dtype=torch.int32)

        return Layout(len(starts) - 1, i32(order), i32(block_start), i32(entry_start), i32(entry_adapter),
                      i32(entry_mask), lanes, max(order, default=-1))

    @staticmethod
    def scratch_size(group: Prepared, at: Layout) -> int:
        """Floats of scratch for a layout: its blocks' inputs interleaved (``csrc/sparse_delta.c``)."""
        return at.lanes * (group.d_in + group.d_out)

    def add(self, group: Prepared, starts, rows, x: torch.Tensor, y: torch.Tensor,
            scratch: torch.Tensor | None = None) -> None:
        """y[rows[starts[t]:starts[t+1]]] += Δ_t · x[same rows], in place, for every adapter t: ``layout`` and
        ``add_at`` in one call (a plan that keeps its rows makes the layout once)."""
        self.add_at(group, self.layout(starts, rows), x, y, scratch)

    def add_at(self, group: Prepared, at: Layout, x: torch.Tensor, y: torch.Tensor,
               scratch: torch.Tensor | None = None) -> None:
        """y[r] += Σ_t Δ_t · x[r] over the layout's rows and entries, in place. x: (n, ≥ d_in) fp32, rows
        contiguous; y: (n, ≥ d_out) fp32, rows contiguous; scratch: ≥ ``scratch_size`` fp32 (made if None)."""
        if x.dtype != torch.float32 or y.dtype != torch.float32 or x.stride(1) != 1 or y.stride(1) != 1:
            raise ValueError("x and y must be fp32 with contiguous rows")
        if at.n_adapters != len(group.deltas):
            raise ValueError(f"a layout of {at.n_adapters} adapters for a group of {len(group.deltas)}")
        if x.shape[1] < group.d_in or y.shape[1] < group.d_out or at.last >= min(x.shape[0], y.shape[0]):
            raise ValueError(f"x {tuple(x.shape)} or y {tuple(y.shape)} too small for the group and rows")
        size = self.scratch_size(group, at)
        if scratch is None:
            scratch = torch.empty(size, dtype=torch.float32)
        if scratch.dtype != torch.float32 or scratch.numel() < size:
            raise ValueError(f"scratch too small: {size} fp32 needed")
        if not at.rows.numel():
            return
        self._fn(ctypes.addressof(group.table), len(group.deltas), at.block_start.numel() - 1,
                 at.block_start.data_ptr(), at.rows.data_ptr(), at.entry_start.data_ptr(), at.entry_adapter.data_ptr(),
                 at.entry_mask.data_ptr(), group.d_in, group.d_out, ROW_CHUNK, x.data_ptr(), x.stride(0),
                 y.data_ptr(), y.stride(0), scratch.data_ptr(), scratch.data_ptr() + 4 * at.lanes * group.d_in,
                 torch.get_num_threads())


def applies_to(device: torch.device, dtype: torch.dtype) -> bool:
    """Where the kernel serves the decode rows' sparse deltas: fp32 on CPU."""
    return device.type == "cpu" and dtype == torch.float32


def _cpu_identity() -> str:
    """What -march=native depends on: a cached build is reused only on the same kind of CPU."""
    text = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return f"{platform.machine()}|{model.group(1) if model else ''}|{flags.group(1) if flags else ''}"


def _omp_runtimes() -> set[str]:
    """The OpenMP runtimes mapped into this process (Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    return {line.split()[-1] for line in maps.splitlines() if re.search(r"lib(gomp|iomp5|omp)[^/]*\.so", line)}


def build(cache_dir: Path, compiler: str | None = None, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile the kernel into ``cache_dir`` (once: the file name carries a hash of the source, the flags, the
    compiler and the CPU) and return the shared library's path. ``extra_flags`` go after ``FLAGS`` (the tests
    build the portable variant with ``-mno-avx512f``). Raises ``RuntimeError`` with the compiler's message."""
    cc = compiler or os.environ.get("CC") or "cc"
    exe = shutil.which(cc)
    if exe is None:
        raise RuntimeError(f"no C compiler: {cc!r} not found")
    source = SOURCE.read_bytes()
    flags = (*FLAGS, *extra_flags)
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), exe.encode(),
                                     _cpu_identity().encode()])).hexdigest()[:16]
    target = Path(cache_dir) / f"sparse_delta-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([exe, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(cache_dir: Path, compiler: str | None = None, extra_flags: tuple[str, ...] = ()) -> SparseDeltaKernel | None:
    """Build (or find) and load the kernel; None, with a logged warning saying why, if that is not possible.
    Call it after torch is imported, so that the kernel binds to the OpenMP runtime torch loaded."""
    try:
        before = _omp_runtimes()
        path = build(cache_dir, compiler, extra_flags)
        lib = ctypes.CDLL(str(path))
        after = _omp_runtimes()
        if before and after != before:
            # a second OpenMP runtime would start threads of its own next to torch's on the same cores
            raise RuntimeError(f"it loaded another OpenMP runtime ({sorted(after - before)}) than torch's")
        kernel = SparseDeltaKernel(lib, path)
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        log.warning("sparse-delta CPU kernel unavailable (%s); using torch's sparse products", e)
        return None
    log.info("sparse-delta CPU kernel: %s", path)
    return kernel
