"""metric=LossMetric(loss=fn): truncation in the loss's metric (LMD.md section 5b), K-FAC's quadratic model.

For a layer y = W·x, let C_x = E[x xᵀ] over its inputs and C_g = E[g gᵀ] over the loss gradients
g = ∂ℓ/∂y at its outputs (per row: the mean-reduced loss's gradient times the rows of the batch).
The Kronecker-factored Fisher models the loss increase of a change ΔW as ½‖C_g^{1/2}·ΔW·C_x^{1/2}‖²_F.
With C_x + δ_x·I = R_x·R_xᵀ and C_g + δ_g·I = R_g·R_gᵀ, ‖R_gᵀ·ΔW·R_x‖_F is that norm, so

    Ŵ = R_g⁺ᵀ·(R_gᵀ·W·R_x)_r·R_x⁺

is the best rank-r layer under it: Eckart–Young of the layer seen through metric maps on both
sides (LMD's O_dist = R_gᵀ and I_dist = R_x), mapped back. The squared singular values σ̃ᵢ² of
R_gᵀ·W·R_x, halved, estimate what dropping component i costs in loss, in the same units in
every layer: `GlobalBudget` spends its budget on them directly instead of on relative errors.
Memory: one fan_in² and one out² float64 matrix per layer (use `exclude` for a vocabulary-sized
head, whose C_g is vocab²).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lmd_lightning.checks import check_callable, check_int, check_number
from lmd_lightning.layers.svd import Factors, singular_values, truncated_svd
from lmd_lightning.truncate.calibration import CALIBRATION_SEED, layer_rows, output_rows
from lmd_lightning.truncate.check import cuda_devices
from lmd_lightning.truncate.data_metric import Whitening, whitening

__all__ = ["LossMetric", "LossMoments", "loss_factors", "loss_moments", "loss_spectrum"]

Loss = Callable[[nn.Module, Any], Tensor]


@dataclass(frozen=True)
class LossMetric:
    """Settings of the loss metric: `loss(model, batch)` returns the scalar loss of one batch.

    Args:
        loss: the batch's loss (mean-reduced, as training computes it).
        batches: calibration batches read (None: all of them).
        damping: δ on each side, as a share of that side's mean diagonal (> 0 keeps both invertible).
    """

    loss: Loss
    batches: int | None = 8
    damping: float = 0.01

    def __post_init__(self) -> None:
        check_callable(self.loss, "loss", "loss(model, batch) -> scalar Tensor", owner="LossMetric")
        check_int(self.batches, "batches", 1, optional=True, owner="LossMetric")
        check_number(self.damping, "damping", 0, finite=True, owner="LossMetric")


@dataclass
class LossMoments:
    """One layer's whitening on both sides: inputs (R_x) and output gradients (R_g)."""

    x: Whitening
    g: Whitening

    def target(self, weight: Tensor) -> Tensor:
        """R_gᵀ·W·R_x: the layer in the loss's metric (float64)."""
        return self.g.R.mT @ weight.double() @ self.x.R


def loss_spectrum(weight: Tensor, moments: LossMoments, name: str) -> Tensor:
    """σ̃ of R_gᵀ·W·R_x: σ̃ᵢ²/2 estimates the loss increase of dropping component i."""
    return singular_values(moments.target(weight), name)


def loss_factors(weight: Tensor, moments: LossMoments, rank: int, method: str, name: str) -> Factors:
    """Ŵ = R_g⁺ᵀ·(R_gᵀ·W·R_x)_r·R_x⁺ as canonical factors in `weight`'s dtype.

    `error`/`norm` are in the loss metric: ‖T − T_r‖_F and ‖T‖_F with T = R_gᵀ·W·R_x.
    """
    T = moments.target(weight)
    rank = min(rank, *T.shape)
    whitened = truncated_svd(T, rank, method=method, name=name)  # T_r = P·diag(σ)·Qᵀ
    U_raw = moments.g.R_pinv.mT @ whitened.U  # (out, r)
    V_raw = moments.x.R_pinv.mT @ whitened.V  # (fan_in, r): Ŵ = U_raw·diag(σ)·V_rawᵀ
    Qu, Ru = torch.linalg.qr(U_raw)
    Qv, Rv = torch.linalg.qr(V_raw)
    P, sigma, Qh = torch.linalg.svd(Ru @ (whitened.s.double()[:, None] * Rv.mT))  # the r×r core
    norm2 = float(T.square().sum())
    error = math.sqrt(max(norm2 - float(whitened.s.double().square().sum()), 0.0))
    dtype = weight.dtype
    return Factors(
        U=(Qu @ P).to(dtype).contiguous(),
        s=sigma.to(dtype).contiguous(),
        V=(Qv @ Qh.mT).to(dtype).contiguous(),
        error=error,
        norm=math.sqrt(norm2),
        method=whitened.method,
    )


def loss_moments(
    model: nn.Module, modules: list[nn.Module], batches: Iterable[Any], settings: LossMetric
) -> dict[nn.Module, LossMoments | str]:
    """Each module's two-sided whitening from forward and backward passes of `settings.loss` (eval mode).

    A module that saw no input or no gradient gets the reason instead. The model's gradients,
    train/eval modes and the global random state are left as they were.
    """
    xs: dict[nn.Module, Tensor] = {}
    gs: dict[nn.Module, Tensor] = {}
    x_rows: dict[nn.Module, int] = {}
    g_rows: dict[nn.Module, int] = {}

    def add(store: dict, counts: dict, module: nn.Module, rows: Tensor) -> None:
        rows = rows.double()
        if module not in store:
            store[module] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
            counts[module] = 0
        store[module] += rows.mT @ rows
        counts[module] += rows.shape[0]

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        add(xs, x_rows, module, layer_rows(module, args[0].detach()))
        if isinstance(output, Tensor) and output.requires_grad:

            def on_grad(grad: Tensor) -> None:
                rows = output_rows(module, grad.detach())
                add(gs, g_rows, module, rows * rows.shape[0])  # per-row gradients of a mean-reduced loss

            output.register_hook(on_grad)

    modes = {module: module.training for module in model.modules()}
    grads = {param: param.grad for param in model.parameters()}
    handles = [module.register_forward_hook(hook) for module in modules]
    devices = cuda_devices(model)
    model.eval()
    read = 0
    try:
        for batch in batches:
            if settings.batches is not None and read >= settings.batches:
                break
            read += 1
            for param in grads:
                param.grad = None
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                torch.manual_seed(CALIBRATION_SEED)
                settings.loss(model, batch).backward()
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.train(training)
        for param, grad in grads.items():
            param.grad = grad
    if read == 0:
        raise ValueError("the loss metric needs calibration data, but the calibration iterable yielded no batch")
    result: dict[nn.Module, LossMoments | str] = {}
    for module in modules:
        if module not in xs:
            result[module] = "received no input in the calibration passes"
        elif module not in gs:
            result[module] = "received no loss gradient in the calibration passes"
        elif not (bool(torch.isfinite(xs[module]).all()) and bool(torch.isfinite(gs[module]).all())):
            raise ValueError("non-finite calibration inputs or loss gradients (NaN or inf); refusing to truncate")
        else:
            result[module] = LossMoments(
                whitening(xs[module], x_rows[module], settings.damping),
                whitening(gs[module], g_rows[module], settings.damping),
            )
    return result
