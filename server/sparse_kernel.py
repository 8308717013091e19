"""The compiled CPU kernel for the decode rows' sparse deltas (``csrc/sparse_delta.c``): built once per machine
with the system C compiler into the cache folder, loaded with ctypes. Without a compiler (or if the build or
the load fails) the engine uses torch's sparse products instead, with the same results; ``load`` says why in
the log.

Measured on the 2-core AMD EPYC this was built on, one projection group (q/k/v of SmolLM2, 8 adapters at 3.5 %
density) at 16 decode rows in a decode step: about 100 µs through torch (gather the rows' inputs, MKL's CSR SpMM
of a block-diagonal table, scatter the outputs back), about 55 µs here (``csrc/sparse_delta.c`` says why).
README, Benchmarks, has the whole step."""
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

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "sparse_delta.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
PAD = 7  # spare rows of scratch per adapter: a chunk of its rows is padded to a power of two (csrc/sparse_delta.c)


class _CSR(ctypes.Structure):
    _fields_ = [("crow", ctypes.c_void_p), ("col", ctypes.c_void_p), ("val", ctypes.c_void_p),
                ("bf16", ctypes.c_int64)]


@dataclass
class Prepared:
    """One projection group's arguments for a batch: the distinct adapters' CSR deltas (kept referenced, so
    that the pointers stay valid) and the rows of each."""

    deltas: list  # [GroupDelta] (T,), all of shape (d_out, d_in)
    table: ctypes.Array  # (T,) _CSR pointing into them
    d_in: int
    d_out: int


class SparseDeltaKernel:
    """y[r] += Σ_t Δ_t·x[r] over the adapters t of row r's route, every distinct adapter's delta read once per
    chunk of 16 of its rows. fp32 inputs and outputs on CPU only; delta values fp32 or bf16."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        self._fn = lib.jumplora_sparse_delta_add
        self._fn.restype = None
        self._fn.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                             ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                             ctypes.c_void_p, ctypes.c_int32]

    @staticmethod
    def prepare(deltas: list) -> Prepared:
        """The per-group part, which depends on the adapters alone: ``deltas`` (T,) sparse GroupDeltas with
        int32 indices and fp32 or bf16 values on CPU, one shape."""
        shapes = {d.shape for d in deltas}
        if len(shapes) != 1:
            raise ValueError(f"deltas of different shapes {sorted(shapes)}")
        for d in deltas:
            if (d.kind != "sparse" or d.col.dtype != torch.int32 or d.crow.dtype != torch.int32
                    or d.val.dtype not in (torch.float32, torch.bfloat16) or d.val.device.type != "cpu"):
                raise ValueError("the kernel takes sparse deltas on CPU with int32 indices and fp32 or bf16 values")
        table = (_CSR * len(deltas))(*[_CSR(d.crow.data_ptr(), d.col.data_ptr(), d.val.data_ptr(),
                                            int(d.val.dtype == torch.bfloat16)) for d in deltas])
        d_out, d_in = shapes.pop()
        return Prepared(list(deltas), table, d_in, d_out)

    @staticmethod
    def scratch_size(group: Prepared, n_rows: int) -> int:
        """Floats of scratch for ``n_rows`` rows: their inputs interleaved, with PAD spare rows per adapter
        (``csrc/sparse_delta.c``)."""
        return (n_rows + PAD * len(group.deltas)) * group.d_in

    def add(self, group: Prepared, row_start: torch.Tensor, rows: torch.Tensor, x: torch.Tensor,
            y: torch.Tensor, scratch: torch.Tensor) -> None:
        """y[rows[row_start[t]:row_start[t+1]]] += Δ_t · x[same rows], in place, for every adapter t.
        row_start: (T + 1,) int32; rows: (n_a,) int32 row indices of x and y, grouped by adapter (a row may
        stand under several adapters, never twice under one);
        x: (n, ≥ d_in) fp32, rows contiguous; y: (n, ≥ d_out) fp32, rows contiguous; scratch: ≥ (n_a + T)·d_in
        fp32 (``scratch_size``)."""
        if x.dtype != torch.float32 or y.dtype != torch.float32 or x.stride(1) != 1 or y.stride(1) != 1:
            raise ValueError("x and y must be fp32 with contiguous rows")
        if row_start.dtype != torch.int32 or rows.dtype != torch.int32:
            raise ValueError("row_start and rows must be int32")
        if (scratch.numel() < self.scratch_size(group, rows.numel()) or x.shape[1] < group.d_in
                or y.shape[1] < group.d_out):
            raise ValueError("scratch, x or y too small for the group")
        self._fn(len(group.deltas), ctypes.addressof(group.table), row_start.data_ptr(), rows.data_ptr(),
                 group.d_in, group.d_out, x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0),
                 scratch.data_ptr(), torch.get_num_threads())


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
