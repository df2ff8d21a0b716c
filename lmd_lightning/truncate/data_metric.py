"""The linear algebra of metric="data" (LMD.md section 5): whitening, the target W_ls·R, its factors.

With C̃ = X̃ᵀX̃/p + δI = R·Rᵀ and M = X_dᵀX̃/p, the best rank-r Ŵ for
‖W·X_dᵀ − Ŵ·X̃ᵀ‖²/p + δ‖W − Ŵ‖² is (W_ls·R)_r·R⁺ with W_ls·R = W·(M + δI)·R⁺ᵀ (see calibration.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lmd_lightning.layers.svd import Factors, singular_values, truncated_svd

__all__ = ["EIG_TOL", "LayerMoments", "Whitening", "data_factors", "data_spectrum", "whitening"]

EIG_TOL = 1e-12  # eigenvalues of C below this share of the largest count as zero (δ = 0 only)


@dataclass(frozen=True)
class Whitening:
    """C + δI = R·Rᵀ in C's eigenbasis: R = Q·√λ (fan_in, k) and R⁺ = (1/√λ)·Qᵀ (k, fan_in)."""

    R: Tensor
    R_pinv: Tensor
    delta: float


def whitening(moment: Tensor, rows: int, damping: float) -> Whitening:
    """Factor C = moment/rows + δI, with δ = damping × mean diagonal of moment/rows (float64)."""
    C = moment / max(rows, 1)
    scale = float(C.diagonal().mean())
    delta = damping * scale if scale > 0 else damping
    C = C + delta * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    lam, Q = torch.linalg.eigh((C + C.mT) / 2)
    keep = lam > EIG_TOL * max(float(lam.max()), 0.0)
    if not bool(keep.any()):
        raise ValueError(
            "the calibration inputs of this layer are all zero and `damping` is 0: no metric to truncate in"
        )
    root = lam[keep].sqrt()
    Q = Q[:, keep]
    return Whitening(R=Q * root, R_pinv=(Q / root).mT, delta=delta)


@dataclass
class LayerMoments:
    """What one layer's data-metric truncation needs (all float64, divided by the row count)."""

    dense: Tensor  # X_dᵀX_d/p, undamped
    cross: Tensor  # X_dᵀX̃/p
    white: Whitening  # of X̃ᵀX̃/p + δI

    @classmethod
    def independent(cls, moment: Tensor, rows: int, damping: float) -> LayerMoments:
        C = moment / rows
        return cls(C, C, whitening(moment, rows, damping))

    @classmethod
    def paired(cls, dense: Tensor, cross: Tensor, trunc: Tensor, rows: int, damping: float) -> LayerMoments:
        return cls(dense / rows, cross / rows, whitening(trunc, rows, damping))

    def target(self, weight: Tensor) -> Tensor:
        """W_ls·R = W·(M + δI)·R⁺ᵀ (out, k): Eckart–Young on this gives the best Ŵ·R."""
        W = weight.double()
        eye = torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
        return W @ (self.cross + self.white.delta * eye) @ self.white.R_pinv.mT

    def norm2(self, weight: Tensor) -> float:
        """‖W·X_dᵀ‖²/p + δ‖W‖²: the objective of Ŵ = 0, what errors are relative to."""
        W = weight.double()
        return float((W @ self.dense * W).sum()) + self.white.delta * float(W.square().sum())


def data_spectrum(weight: Tensor, moments: LayerMoments, name: str) -> Tensor:
    """Singular values of W_ls·R: what a policy sees under metric="data"."""
    return singular_values(moments.target(weight), name)


def data_factors(weight: Tensor, moments: LayerMoments, rank: int, method: str, name: str) -> Factors:
    """The rank-`rank` Ŵ = (W_ls·R)_r·R⁺ as canonical factors in `weight`'s dtype.

    `error`/`norm` are in the data metric: √objective and √objective(Ŵ = 0), so `relative_error`
    is the layer's relative output error on the calibration inputs (with the damping term).
    """
    A = moments.target(weight)
    rank = min(rank, *A.shape)  # with damping 0 the metric may have fewer dimensions than fan_in
    whitened = truncated_svd(A, rank, method=method, name=name)  # A_r = P·diag(σ)·Qᵀ
    V_raw = moments.white.R_pinv.mT @ whitened.V  # (fan_in, r): Ŵ = P·diag(σ)·V_rawᵀ
    Qv, Rv = torch.linalg.qr(V_raw)
    P, sigma, Qh = torch.linalg.svd(whitened.s[:, None] * Rv.mT)  # the r×r core diag(σ)·Rvᵀ
    norm2 = moments.norm2(weight)
    kept = float(whitened.s.double().square().sum())
    # objective(Ŵ) = norm2 − ‖A_r‖² (the residual of W_ls plus the Eckart–Young tail)
    error = math.sqrt(max(norm2 - kept, 0.0))
    dtype = weight.dtype
    return Factors(
        U=(whitened.U @ P).to(dtype).contiguous(),
        s=sigma.to(dtype).contiguous(),
        V=(Qv @ Qh.mT).to(dtype).contiguous(),
        error=error,
        norm=math.sqrt(max(norm2, 0.0)),
        method=whitened.method,
    )
