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
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lmd_lightning.checks import check_callable, check_int, check_number
from lmd_lightning.layers.svd import Factors, singular_values, truncated_svd
from lmd_lightning.truncate.calibration import CALIBRATION_SEED, layer_rows, layer_weight, output_rows, samples_in
from lmd_lightning.truncate.check import cuda_devices, eager
from lmd_lightning.truncate.data_metric import Whitening, whitening

__all__ = ["LossMetric", "LossMoments", "Side", "loss_factors", "loss_moments", "loss_spectrum"]

Loss = Callable[[nn.Module, Any], Tensor]


@dataclass(frozen=True)
class LossMetric:
    """Settings of the loss metric: `loss(model, batch)` returns the scalar loss of one batch.

    Args:
        loss: the batch's loss (mean-reduced, as training computes it). None: in `LMDCompression`,
            the loss the module's own `training_step` returns; `compress_` needs a callable.
        batches: calibration batches read (None: all of them).
        damping: δ on each side, as a share of that side's mean diagonal (> 0 keeps both invertible).
        max_dim: a side with more features than this keeps only the diagonal of its covariance,
            so that a vocabulary-sized head costs a vector, not a vocab² matrix.
    """

    loss: Loss | None = None
    batches: int | None = 8
    damping: float = 0.01
    max_dim: int = 4096

    def __post_init__(self) -> None:
        if self.loss is not None:
            check_callable(self.loss, "loss", "loss(model, batch) -> scalar Tensor", owner="LossMetric")
        check_int(self.batches, "batches", 1, optional=True, owner="LossMetric")
        check_number(self.damping, "damping", 0, finite=True, owner="LossMetric")
        check_int(self.max_dim, "max_dim", 1, owner="LossMetric")


@dataclass(frozen=True)
class Side:
    """One side's metric C + δI = R·Rᵀ: eigen-factored (`full`), or its diagonal only (`diag` = √(diag C + δ))."""

    full: Whitening | None = None
    diag: Tensor | None = None

    def root_t(self, M: Tensor) -> Tensor:
        """Rᵀ·M."""
        return self.full.R.mT @ M if self.full is not None else self.diag[:, None] * M

    def pinv_t(self, M: Tensor) -> Tensor:
        """R⁺ᵀ·M."""
        return self.full.R_pinv.mT @ M if self.full is not None else M / self.diag[:, None]


def _side(moment: Tensor, count: float, damping: float) -> Side:
    """The metric of a summed moment: a square matrix (full) or a vector of diagonal sums."""
    if moment.dim() == 2:
        return Side(full=whitening(moment, count, damping))
    diag = moment / count
    scale = float(diag.mean())
    delta = damping * scale if scale > 0 else damping
    if delta <= 0 and not bool((diag > 0).all()):
        raise ValueError("a diagonal loss metric with zero entries needs `damping` > 0")
    return Side(diag=(diag + delta).sqrt())


@dataclass
class LossMoments:
    """One layer's whitening on both sides: inputs (R_x) and output gradients (R_g)."""

    x: Side
    g: Side

    def target(self, weight: Tensor) -> Tensor:
        """R_gᵀ·W·R_x: the layer in the loss's metric (float64)."""
        return self.x.root_t(self.g.root_t(weight.double()).mT).mT


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
    U_raw = moments.g.pinv_t(whitened.U.double())  # (out, r)
    V_raw = moments.x.pinv_t(whitened.V.double())  # (fan_in, r): Ŵ = U_raw·diag(σ)·V_rawᵀ
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
    model: nn.Module,
    modules: list[nn.Module],
    batches: Iterable[Any],
    settings: LossMetric,
    reduce: Callable[[Tensor], Tensor] | None = None,
    context: Callable[[], Any] | None = None,
) -> dict[nn.Module, LossMoments | str]:
    """Each module's two-sided whitening from forward and backward passes of `settings.loss` (eval mode).

    Per batch of N samples, a layer's output-gradient moment is N·Σ_rows g·gᵀ: the per-sample
    Fisher of the mean loss, with the rows of one sample (tokens, pixels) summed as K-FAC does. So
    a layer that runs once per token and a head that runs once per sample are measured in the same
    units. `reduce` sums a tensor over processes (DDP), `context()` wraps each pass (precision).
    A module that saw no input or no gradient gets the reason instead. The model's gradients,
    train/eval modes and the global random state are left as they were.
    """
    if settings.loss is None:
        raise ValueError("LossMetric(loss=None) is only for LMDCompression; compress_ needs loss=fn(model, batch)")
    reduce = reduce or (lambda tensor: tensor)
    context = context or nullcontext
    xs: dict[nn.Module, Tensor] = {}
    gs: dict[nn.Module, Tensor] = {}
    x_rows: dict[nn.Module, float] = {}
    samples = 0  # N of the batch being run

    def add(store: dict, module: nn.Module, rows: Tensor, weight: float = 1.0) -> None:
        rows = rows.double()
        wide = rows.shape[1] > settings.max_dim
        if module not in store:
            shape = (rows.shape[1],) if wide else (rows.shape[1], rows.shape[1])
            store[module] = torch.zeros(shape, dtype=torch.float64, device=rows.device)
        store[module] += weight * (rows.square().sum(0) if wide else rows.mT @ rows)

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        rows = layer_rows(module, args[0].detach())
        add(xs, module, rows)
        x_rows[module] = x_rows.get(module, 0) + rows.shape[0]
        if isinstance(output, Tensor) and output.requires_grad:
            weight = float(samples)
            output.register_hook(lambda grad: add(gs, module, output_rows(module, grad.detach()), weight))

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
            samples = samples_in(batch)
            for param in grads:
                param.grad = None
            with torch.random.fork_rng(devices=devices), torch.enable_grad(), eager(), context():
                torch.manual_seed(CALIBRATION_SEED)
                loss = settings.loss(model, batch)
                if not (isinstance(loss, Tensor) and loss.dim() == 0):
                    raise TypeError(f"the loss metric's loss must be a scalar Tensor, got {_describe(loss)}")
                loss.backward()
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
    for module in modules:  # the same reductions, in the same order, on every process (DDP)
        weight = layer_weight(module)  # only its shape and device: a factored layer's product is built once
        out_dim, fan_in = weight.shape
        device = weight.device
        x = xs.get(module, _empty(fan_in, settings.max_dim, device))
        g = gs.get(module, _empty(out_dim, settings.max_dim, device))
        counts = torch.tensor([x_rows.get(module, 0), float(module in gs), read], dtype=torch.float64, device=device)
        x, g, counts = reduce(x), reduce(g), reduce(counts)
        rows, with_gradient, batch_count = (float(c) for c in counts)
        if rows == 0:
            result[module] = "received no input in the calibration passes"
        elif with_gradient == 0:
            result[module] = "received no loss gradient in the calibration passes"
        elif not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(g).all())):
            raise ValueError("non-finite calibration inputs or loss gradients (NaN or inf); refusing to truncate")
        else:
            result[module] = LossMoments(_side(x, rows, settings.damping), _side(g, batch_count, settings.damping))
    return result


def _empty(dim: int, max_dim: int, device: torch.device) -> Tensor:
    """The moment of a side that saw nothing on this process: zeros, shaped as `add` would have made it."""
    shape = (dim,) if dim > max_dim else (dim, dim)
    return torch.zeros(shape, dtype=torch.float64, device=device)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a Tensor of shape {tuple(value.shape)}"
    return type(value).__name__
