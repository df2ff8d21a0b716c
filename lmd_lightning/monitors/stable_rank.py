"""StableRankMonitor: the Cuttlefish switch, when the layers' stable ranks have stopped moving.

Cuttlefish (Wang et al., MLSys 2023) observes that the stable rank of each layer,
srank(W) = ‖W‖_F² / σ₁² = Σσᵢ²/σ₁², settles after a few epochs of full-rank training, and switches
to low-rank training once every layer's has. Its ranks are the *scaled* stable rank ξ·srank(W), with
ξ = rank(W₀)/srank(W₀) taken from the weights at initialization: srank underestimates the rank a
layer needs (a Gaussian n×n matrix has srank ≈ n/4), and ξ corrects for that per layer.

Here, once per epoch: srank of each layer from the dense weight (σ₁ by power iteration, warm
started from the last epoch's vector), an EMA of it over epochs that starts at the first epoch's
value (the initial weights give ξ only), and its relative change per epoch |e_t − e_{t−1}| / e_{t−1}.
Converged when the mean of that change over the layers stays below `tol` for `patience` epochs in
a row. Two deviations from Cuttlefish, which asks every layer's absolute slope to be small: the
slope is relative, so that one threshold means the same for a 64-wide and a 4096-wide layer, and
it is averaged over the layers (the criterion this project's benchmark issue specifies), so one
layer still moving a little does not hold the switch back.

Framework-free: torch only. `lmd_lightning.LMDCompression(trigger="stable_rank")` feeds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lmd_lightning.checks import check_interval

__all__ = ["StableRankMonitor", "spectral_norm", "stable_rank"]


def spectral_norm(matrix: Tensor, iterations: int, vector: Tensor | None = None) -> tuple[float, Tensor]:
    """σ₁ of `matrix` (m, n) by `iterations` power iterations on WᵀW; returns σ₁ and the last right vector."""
    w = matrix.detach().float()
    if vector is None or vector.shape != (w.shape[1],) or vector.device != w.device:
        generator = torch.Generator().manual_seed(0)  # the same start on every process
        vector = torch.randn(w.shape[1], generator=generator).to(w.device)
    v = vector / vector.norm().clamp_min(1e-30)
    for _ in range(iterations):
        v = w.T @ (w @ v)  # (n,)
        v = v / v.norm().clamp_min(1e-30)
    return float(torch.linalg.vector_norm(w @ v)), v


def stable_rank(matrix: Tensor, sigma_max: float) -> float:
    """‖W‖_F² / σ₁²; 0 for a zero matrix."""
    if sigma_max <= 0.0:
        return 0.0
    return float(torch.linalg.vector_norm(matrix.detach().float()) ** 2) / sigma_max**2


class StableRankMonitor:
    """Decides when the layers' stable ranks have converged (their mean relative change), once per epoch.

    `start(weights)` at the beginning of training records each layer's ξ = min(m, n)/srank(W₀)
    (`scales`); `update(weights, epoch)` after each epoch advances the EMAs and checks. A layer
    measured for the first time (no warm-start vector, e.g. after a resume) gets 10× the iterations.
    """

    def __init__(
        self,
        beta: float = 0.5,  # EMA decay per epoch: epochs are few, so short memory
        tol: float = 0.02,  # mean relative change of the EMA per epoch below 2% is "not moving"
        patience: int = 2,  # epochs in a row below `tol`
        power_iterations: int = 10,  # per layer per epoch, warm started; `start` runs 10× as many
    ) -> None:
        check_interval(beta, "beta", 0.0, 1.0)
        check_interval(tol, "tol", 0.0, open_low=True)
        check_interval(patience, "patience", 1, integer=True)
        check_interval(power_iterations, "power_iterations", 1, integer=True)
        self.beta, self.tol, self.patience, self.power_iterations = beta, tol, patience, power_iterations
        self.scales: dict[str, float] = {}  # layer → ξ, set by `start`
        self._vectors: dict[str, Tensor] = {}  # warm starts for the power iteration
        self.reset()

    def reset(self) -> None:
        """Forget the EMAs and the decision (the scales stay: they belong to the initialization)."""
        self.ema: dict[str, float] = {}
        self.latest: dict[str, float] = {}  # the last measured srank of each layer
        self.change: float | None = None  # the last mean relative change of the EMAs
        self.streak = 0
        self.converged = False
        self.converged_epoch: int | None = None
        self.reason: str | None = None

    @property
    def started(self) -> bool:
        return bool(self.scales)

    def _measure(self, weights: Mapping[str, Tensor]) -> dict[str, float]:
        ranks = {}
        for name, weight in weights.items():
            if not torch.isfinite(weight).all():
                raise ValueError(f"StableRankMonitor: layer {name!r} has non-finite weights")
            warm = self._vectors.get(name)
            iterations = self.power_iterations * (1 if warm is not None else 10)
            sigma, self._vectors[name] = spectral_norm(weight, iterations, warm)
            ranks[name] = stable_rank(weight, sigma)
        return ranks

    def start(self, weights: Mapping[str, Tensor]) -> None:
        """Measure the initial weights: ξ = min(m, n) / srank(W₀) per layer."""
        if not weights:
            raise ValueError("StableRankMonitor.start needs at least one layer's weight")
        ranks = self._measure(weights)
        self.scales = {name: min(weights[name].shape) / r if r > 0 else 1.0 for name, r in ranks.items()}
        self.reset()
        self.latest = ranks

    def update(self, weights: Mapping[str, Tensor], epoch: int) -> bool:
        """Measure the weights after `epoch`; returns `converged`. A layer's EMA starts at its first measurement."""
        if self.converged:
            return True
        self.latest = self._measure(weights)
        changes = []
        for name, value in self.latest.items():
            previous = self.ema.get(name)
            self.ema[name] = value if previous is None else self.beta * previous + (1 - self.beta) * value
            if previous is not None and previous > 0:
                changes.append(abs(self.ema[name] - previous) / previous)
        if not changes:
            return False
        self.change = sum(changes) / len(changes)
        self.streak = self.streak + 1 if self.change < self.tol else 0
        if self.streak >= self.patience:
            self.converged, self.converged_epoch = True, epoch
            self.reason = f"stable ranks changed < {self.tol:.0%} per epoch for {self.streak} epochs"
        return self.converged

    def retract(self) -> None:
        """Take back a convergence another process did not reach (DDP): the next epoch decides again."""
        self.converged, self.converged_epoch, self.reason = False, None, None

    _STATE = ("scales", "ema", "latest", "change", "streak", "converged", "converged_epoch", "reason")

    def state_dict(self) -> dict[str, Any]:
        """Plain Python numbers only, so checkpoints load with torch.load(weights_only=True)."""
        return {key: getattr(self, key) for key in self._STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in self._STATE:
            value = state[key]
            setattr(self, key, dict(value) if isinstance(value, dict) else value)

    def __repr__(self) -> str:
        return (
            f"StableRankMonitor(beta={self.beta}, tol={self.tol}, patience={self.patience}, "
            f"power_iterations={self.power_iterations})"
        )
