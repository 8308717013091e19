"""The two kinds of per-layer weight delta the store keeps, and their validation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


INDEX_DTYPES = (torch.int64, torch.int32)
VALUE_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True, eq=False)
class SparseDelta:
    """A dense (out, in) delta kept as its non-zero entries at flat row-major positions. Two forms: the full
    one (int64 positions, float32 values) and the compact one the trainer stores (int32 positions, bfloat16
    values: 6 bytes a non-zero instead of 12; README, Benchmarks, for what the rounding changes)."""

    shape: tuple[int, int]  # (out, in)
    indices: torch.Tensor  # (nnz,) int64 or int32, strictly increasing, each < out*in
    values: torch.Tensor  # (nnz,) float32 or bfloat16

    @classmethod
    def from_dense(cls, dense: torch.Tensor, compact: bool = False) -> SparseDelta:
        """Keep the entries of `dense` (out, in) that are non-zero once cast to float32 (``compact``: in the
        compact form; an entry too small for bfloat16 is dropped rather than stored as a zero)."""
        if dense.dim() != 2:
            raise ValueError(f"expected a 2-D tensor, got shape {tuple(dense.shape)}")
        flat = dense.detach().to(torch.float32).reshape(-1)  # (out*in,)
        indices = torch.nonzero(flat).reshape(-1)  # (nnz,) int64, ascending
        delta = cls((int(dense.shape[0]), int(dense.shape[1])), indices, flat[indices])
        return delta.compact() if compact else delta

    def compact(self) -> SparseDelta:
        """The compact form: int32 positions (where out*in fits) and bfloat16 values."""
        values = self.values.to(torch.bfloat16)
        keep = values != 0
        indices = self.indices[keep] if not bool(keep.all()) else self.indices
        if self.shape[0] * self.shape[1] <= torch.iinfo(torch.int32).max:
            indices = indices.to(torch.int32)
        return SparseDelta(self.shape, indices, values[keep] if indices.numel() != values.numel() else values)

    def to_dense(self) -> torch.Tensor:
        out, inp = self.shape
        dense = torch.zeros(out * inp, dtype=torch.float32, device=self.values.device)
        dense[self.indices] = self.values.to(torch.float32)
        return dense.view(out, inp)  # (out, in)

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())


@dataclass(frozen=True, eq=False)
class LowRankDelta:
    """A dense LoRA delta: scale * B @ A."""

    A: torch.Tensor  # (r, in) float32
    B: torch.Tensor  # (out, r) float32
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.B.shape[0]), int(self.A.shape[1]))

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def to_dense(self) -> torch.Tensor:
        return (self.B.to(torch.float32) @ self.A.to(torch.float32)) * float(self.scale)  # (out, in)

    @property
    def nnz(self) -> int:
        return int(torch.count_nonzero(self.to_dense()))


Delta = SparseDelta | LowRankDelta


def check_delta(delta: Delta) -> None:
    """Raise ValueError saying what is inconsistent in `delta`; return None if it is sound."""
    if isinstance(delta, SparseDelta):
        _check_sparse(delta)
    elif isinstance(delta, LowRankDelta):
        _check_lowrank(delta)
    else:
        raise ValueError(f"expected SparseDelta or LowRankDelta, got {type(delta).__name__}")


def _is_count(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0


def _check_tensor(name: str, t: object, dtype: torch.dtype | tuple[torch.dtype, ...], dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} is a {type(t).__name__}, not a tensor")
    allowed = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in allowed:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {' or '.join(map(str, allowed))}")
    if t.dim() != dim:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {dim} dimension(s)")


def _all_finite(values: torch.Tensor) -> bool:
    """Whether fp32 or bf16 values are all finite: an infinity or NaN has every exponent bit set."""
    if values.dtype == torch.bfloat16:
        bits = values.detach().cpu().view(torch.int16).numpy()
        return not ((bits & 0x7F80) == 0x7F80).any()
    return bool(np.isfinite(values.detach().cpu().numpy()).all())


def _check_sparse(d: SparseDelta) -> None:
    if not (isinstance(d.shape, tuple) and len(d.shape) == 2 and all(map(_is_count, d.shape))):
        raise ValueError(f"shape must be two positive ints, got {d.shape!r}")
    _check_tensor("indices", d.indices, INDEX_DTYPES, 1)
    _check_tensor("values", d.values, VALUE_DTYPES, 1)
    if d.indices.numel() != d.values.numel():
        raise ValueError(f"{d.indices.numel()} indices but {d.values.numel()} values")
    # in numpy: on a few thousand entries its checks take a fifth of torch's time (a start-up checks 60,000)
    indices = d.indices.detach().cpu().numpy()  # (nnz,)
    if indices.size:
        if not (indices[1:] > indices[:-1]).all():
            raise ValueError("indices are not strictly increasing")
        size = d.shape[0] * d.shape[1]
        if int(indices[0]) < 0 or int(indices[-1]) >= size:
            raise ValueError(f"indices out of range [0, {size}) for shape {d.shape}")
    if not _all_finite(d.values):
        raise ValueError("values are not all finite")
    if d.indices.dtype == torch.int32 and d.shape[0] * d.shape[1] > torch.iinfo(torch.int32).max:
        raise ValueError(f"int32 indices cannot address shape {d.shape}")


def _check_lowrank(d: LowRankDelta) -> None:
    _check_tensor("A", d.A, torch.float32, 2)
    _check_tensor("B", d.B, torch.float32, 2)
    if d.A.shape[0] != d.B.shape[1] or not all(map(_is_count, (*d.A.shape, *d.B.shape))):
        raise ValueError(f"A {tuple(d.A.shape)} and B {tuple(d.B.shape)} do not make (out, r) @ (r, in)")
    if isinstance(d.scale, bool) or not isinstance(d.scale, (int, float)) or not math.isfinite(d.scale):
        raise ValueError(f"scale must be a finite number, got {d.scale!r}")
    if not (bool(torch.isfinite(d.A).all()) and bool(torch.isfinite(d.B).all())):
        raise ValueError("A or B has non-finite entries")
