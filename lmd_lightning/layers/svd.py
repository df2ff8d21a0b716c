"""Truncation kernels: exact and randomized SVD, and the Eckart–Young error.

Everything here is torch only. Weight matrices are (out, in), W = U·diag(s)·Vᵀ with
U (out, r), s (r,), V (in, r), s descending (LMD Eq. 2).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lmd_lightning.checks import check_choice

__all__ = [
    "Factors",
    "SVDFailedError",
    "compute_dtype",
    "eckart_young_error",
    "energy_kept",
    "singular_values",
    "truncated_svd",
    "use_randomized",
]

Method = Literal["auto", "exact", "randomized"]
METHODS = ("auto", "exact", "randomized")

# Randomized SVD pays off only when the kept rank is a small part of min(m, n) and the
# matrix is big enough for exact SVD to hurt (see benchmarks/bench_svd.py).
RANDOMIZED_MIN_DIM = 512  # below this, exact SVD costs tens of ms at most: not worth approximating
RANDOMIZED_MAX_FRACTION = 0.25  # rank + oversampling must stay under this part of min(m, n)
OVERSAMPLE = 16  # extra directions in the sketch (Halko et al. 2011 suggest 5–20)
MIN_POWER_ITERS = 2  # subspace iterations always done
MAX_POWER_ITERS = 8  # after this many without converging, fall back to exact
CONVERGENCE_TOL = 2e-3  # relative change of the error between iterations; stops ≲0.5% above optimum
OPTIMUM_TOL = 1e-2  # accepted error gap to Eckart–Young when the exact spectrum is known


class SVDFailedError(RuntimeError):
    """Raised when an SVD fails in float32 and again in float64."""


@dataclass(frozen=True)
class Factors:
    """A rank-r truncation W_r = U·diag(s)·Vᵀ and its exact Eckart–Young error."""

    U: Tensor  # (out, r), orthonormal columns
    s: Tensor  # (r,), descending
    V: Tensor  # (in, r), orthonormal columns
    error: float  # ‖W − W_r‖_F
    norm: float  # ‖W‖_F
    method: str  # "exact" or "randomized"

    @property
    def rank(self) -> int:
        return self.s.numel()

    @property
    def relative_error(self) -> float:
        return self.error / self.norm if self.norm > 0 else 0.0

    @property
    def energy(self) -> float:
        """Σ_{i≤r} σᵢ² / Σ σᵢ²: the share of ‖W‖_F² that the truncation keeps."""
        return 1.0 - self.relative_error**2 if self.norm > 0 else 1.0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """SVD runs in float64 for float64 weights and in float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def eckart_young_error(s: Tensor, rank: int) -> float:
    """‖W − W_r‖_F = √(Σ_{i>r} σᵢ²), exact from the full spectrum."""
    return math.sqrt(float(s[rank:].double().square().sum()))


def energy_kept(s: Tensor, rank: int) -> float:
    """Σ_{i≤r} σᵢ² / Σ σᵢ²."""
    s2 = s.double().square()
    total = float(s2.sum())
    return float(s2[:rank].sum()) / total if total > 0 else 1.0


def _with_float64_retry(fn, matrix: Tensor, name: str):
    """Run `fn` in the working precision; retry once in float64 when the solver fails."""
    work = matrix.to(compute_dtype(matrix.dtype))
    try:
        return fn(work)
    except torch.linalg.LinAlgError as first:
        if work.dtype == torch.float64:
            raise SVDFailedError(f"SVD of `{name}` failed in float64: {first}") from first
        warnings.warn(f"SVD of `{name}` failed in {work.dtype} ({first}); retrying in float64.", stacklevel=2)
        try:
            return fn(work.double())
        except torch.linalg.LinAlgError as second:
            raise SVDFailedError(f"SVD of `{name}` failed in float32 and float64: {second}") from second


def check_finite(matrix: Tensor, name: str) -> None:
    """Raise a ValueError naming the layer when its weight holds NaN or ±inf."""
    if not bool(torch.isfinite(matrix).all()):
        bad = int((~torch.isfinite(matrix)).sum())
        raise ValueError(f"layer `{name}` has {bad} non-finite weight entries (NaN or inf); refusing to truncate it")


def singular_values(matrix: Tensor, name: str = "weight") -> Tensor:
    """Exact singular values of a 2-D matrix, descending, in float32 or float64."""
    check_finite(matrix, name)
    return _with_float64_retry(torch.linalg.svdvals, matrix, name)


def use_randomized(shape: tuple[int, int], rank: int) -> bool:
    """The `method="auto"` rule: randomized when the rank is small against min(m, n)."""
    k = min(shape)
    return k >= RANDOMIZED_MIN_DIM and rank + OVERSAMPLE <= RANDOMIZED_MAX_FRACTION * k


def truncated_svd(
    matrix: Tensor, rank: int, *, method: Method = "auto", spectrum: Tensor | None = None, name: str = "weight"
) -> Factors:
    """Best rank-`rank` factors of a 2-D `matrix` (out, in), returned in its dtype.

    `method="auto"` picks the randomized kernel when `use_randomized` says so and falls
    back to the exact one when the randomized result has not converged or, if the exact
    `spectrum` is given, when its error is more than `OPTIMUM_TOL` above the optimum.
    """
    if matrix.dim() != 2:
        raise ValueError(f"`matrix` must be 2-D, got shape {tuple(matrix.shape)}")
    check_choice(method, "method", METHODS)
    full = min(matrix.shape)
    if not 1 <= rank <= full:
        raise ValueError(f"`rank` must be in [1, {full}] for `{name}` of shape {tuple(matrix.shape)}, got {rank}")
    check_finite(matrix, name)
    if method == "randomized" or (method == "auto" and use_randomized(tuple(matrix.shape), rank)):
        factors = _with_float64_retry(lambda w: _randomized(w, rank), matrix, name)
        if factors is not None and _close_to_optimum(factors, spectrum, rank):
            return _cast(factors, matrix.dtype)
        why = "did not converge" if factors is None else f"is over {OPTIMUM_TOL:.0%} above the optimum"
        warnings.warn(f"randomized SVD of `{name}` {why}; using exact SVD", stacklevel=2)
    return _cast(_with_float64_retry(lambda w: _exact(w, rank), matrix, name), matrix.dtype)


def _exact(work: Tensor, rank: int) -> Factors:
    U, s, Vh = torch.linalg.svd(work, full_matrices=False)  # (m, k), (k,), (k, n)
    return Factors(
        U=U[:, :rank],
        s=s[:rank],
        V=Vh[:rank].mT,
        error=eckart_young_error(s, rank),
        norm=math.sqrt(float(s.double().square().sum())),
        method="exact",
    )


def _randomized(work: Tensor, rank: int) -> Factors | None:
    """Randomized subspace iteration (Halko, Martinsson, Tropp 2011, Alg. 4.4).

    Q spans the sketch of W's range. Each pass forms Y = WᵀQ (n, q) and its QR, Y = Q_y·R_y,
    so that B = QᵀW = R_yᵀ·Q_yᵀ: the spectrum of the small R_y is that of B. The truncation is
    an orthogonal projection of W, so its error² is ‖W‖_F² − Σ_{i≤r} s̃ᵢ². Iteration stops once
    that changes by less than `CONVERGENCE_TOL`; None when it has not after `MAX_POWER_ITERS`.
    """
    m, n = work.shape
    q = min(rank + OVERSAMPLE, m, n)
    norm2 = float(torch.linalg.vector_norm(work, dim=1).double().square().sum())  # row-wise: float32-accurate
    gen = torch.Generator(device=work.device).manual_seed(0)
    sketch = torch.randn(n, q, generator=gen, device=work.device, dtype=work.dtype)
    Q = torch.linalg.qr(work @ sketch).Q  # (m, q)
    floor = 10 * torch.finfo(work.dtype).eps * norm2  # rounding noise of ‖W‖² − Σs̃²
    previous = math.inf
    for it in range(MAX_POWER_ITERS + 1):
        Qy, Ry = torch.linalg.qr(work.mT @ Q)  # (n, q), (q, q)
        tail = max(norm2 - float(torch.linalg.svdvals(Ry)[:rank].double().square().sum()), 0.0)
        if it >= MIN_POWER_ITERS and abs(previous - tail) <= 2 * CONVERGENCE_TOL * tail + floor:
            return _factors_from_sketch(work, Q, Qy, Ry, rank, norm2, tail)
        previous = tail
        Q = torch.linalg.qr(work @ Qy).Q  # (m, q): one more power iteration
    return None


def _factors_from_sketch(
    work: Tensor, Q: Tensor, Qy: Tensor, Ry: Tensor, rank: int, norm2: float, tail: float
) -> Factors:
    P, s, Rh = torch.linalg.svd(Ry.mT)  # B = QᵀW = Ryᵀ·Qyᵀ = P·diag(s)·(Qy·Rhᵀ)ᵀ
    U, s, V = Q @ P[:, :rank], s[:rank], Qy @ Rh[:rank].mT  # (m, r), (r,), (n, r)
    error = math.sqrt(tail)
    if error < 0.03 * math.sqrt(norm2):  # ‖W‖² − Σs̃² cancels badly here: measure it instead
        error = float(torch.linalg.matrix_norm(work - (U * s) @ V.mT))
    return Factors(U=U, s=s, V=V, error=error, norm=math.sqrt(norm2), method="randomized")


def _close_to_optimum(factors: Factors, spectrum: Tensor | None, rank: int) -> bool:
    if spectrum is None:
        return True
    optimum = eckart_young_error(spectrum, rank)
    return factors.error <= optimum * (1 + OPTIMUM_TOL) + 1e-12 * factors.norm


def _cast(factors: Factors, dtype: torch.dtype) -> Factors:
    return Factors(
        U=factors.U.to(dtype).contiguous(),
        s=factors.s.to(dtype).contiguous(),
        V=factors.V.to(dtype).contiguous(),
        error=factors.error,
        norm=factors.norm,
        method=factors.method,
    )
