"""ConvergenceMonitor: LMD's stable-convergence criterion on the gradient norm ‖∇L‖.

LMD Theorem 1 assumes ‖W* − W‖ ≤ M*·‖∇L(W*)‖: once ‖∇L‖ has settled, the weights sit in a
basin and a truncation within that radius changes the loss by less than ε (LMD.md section 1).
Minibatch noise keeps ‖∇L‖ from reaching zero, so the monitor smooths it with an EMA and calls
training converged when the EMA has plateaued or has fallen far below its peak.

Framework-free: torch only. The running state lives in tensors on the gradients' device, so an
update costs no host synchronisation; the monitor reads numbers back once per `window` updates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["ConvergenceMonitor", "grad_norm"]


def grad_norm(grads: Iterable[Tensor]) -> Tensor:
    """‖g‖₂ over all gradients as one 0-dim tensor: per-tensor norms fused, then one norm."""
    grads = [g for g in grads if g is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = torch._foreach_norm(grads)  # one kernel per dtype/device group, no host sync
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def _check(value: Any, arg: str, low: float, high: float = math.inf, *, integer: bool = False, open_low: bool = False) -> None:
    is_number = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not is_number or not (value > low if open_low else value >= low) or not value < high:
        bounds = f"{'(' if open_low else '['}{low}, {high})"
        raise ValueError(f"`{arg}` must be {'an int' if integer else 'a number'} in {bounds}, got {value!r}")


class ConvergenceMonitor:
    """Decides when training has converged from a stream of gradient norms.

    Converged when, after `min_steps` updates, either
    - plateau: the EMA's relative change between two checks `window` updates apart stays below
      `plateau_tol` for `patience` consecutive checks; or
    - decay: the EMA falls below `rel_tol` × its running peak.
    Non-finite norms are counted and skipped; they never move the EMA or trigger anything.
    """

    def __init__(
        self,
        beta: float = 0.9,  # EMA factor: averages over ~1/(1-beta) = 10 steps of minibatch noise
        window: int = 50,  # updates between two plateau checks
        plateau_tol: float = 0.05,  # a relative change of the EMA below 5% per window is a plateau
        patience: int = 3,  # consecutive plateau checks needed: 3 windows = 150 steps by default
        rel_tol: float = 0.05,  # EMA at 5% of its peak: ‖∇L‖ has decayed by 20×
        min_steps: int = 100,  # never converged before this many updates
    ) -> None:
        _check(beta, "beta", 0.0, 1.0)
        _check(window, "window", 1, integer=True)
        _check(plateau_tol, "plateau_tol", 0.0, open_low=True)
        _check(patience, "patience", 1, integer=True)
        _check(rel_tol, "rel_tol", 0.0, 1.0)
        _check(min_steps, "min_steps", 0, integer=True)
        self.beta, self.window, self.plateau_tol = beta, window, plateau_tol
        self.patience, self.rel_tol, self.min_steps = patience, rel_tol, min_steps
        self.reset()

    def reset(self) -> None:
        """Forget everything: used after each compression round, before fine-tuning re-converges."""
        self._ema: Tensor | None = None  # biased EMA, on the gradients' device
        self._updates: Tensor | None = None  # finite updates, as a tensor to avoid syncs
        self._calls = 0  # every call to update(), finite or not
        self.nonfinite = 0
        self.peak = 0.0
        self.last_check_ema: float | None = None
        self.streak = 0
        self.converged = False
        self.converged_step: int | None = None
        self.reason: str | None = None
        self._nonfinite_pending: Tensor | None = None

    @property
    def ema(self) -> float | None:
        """The bias-corrected EMA of ‖∇L‖ (a host sync)."""
        if self._ema is None or int(self._updates) == 0:
            return None
        return float(self._ema / (1 - self.beta ** int(self._updates)))

    def update(self, grad_norm: Tensor | float, step: int) -> bool:
        """Feed one gradient norm measured at optimizer step `step`; returns `converged`."""
        if self.converged:
            return True
        norm = torch.as_tensor(grad_norm, dtype=torch.float32).detach()
        finite = torch.isfinite(norm)
        if self._ema is None:
            self._ema = torch.zeros((), device=norm.device)
            self._updates = torch.zeros((), device=norm.device, dtype=torch.long)
            self._nonfinite_pending = torch.zeros((), device=norm.device, dtype=torch.long)
        elif self._ema.device != norm.device:  # restored from a checkpoint onto the host
            self._ema, self._updates = self._ema.to(norm.device), self._updates.to(norm.device)
            self._nonfinite_pending = self._nonfinite_pending.to(norm.device)
        self._ema = torch.where(finite, self.beta * self._ema + (1 - self.beta) * norm.nan_to_num(), self._ema)
        self._updates += finite.long()
        self._nonfinite_pending += (~finite).long()
        self._calls += 1
        if self._calls % self.window == 0:
            self._check(step)
        return self.converged

    def _check(self, step: int) -> None:
        self.nonfinite += int(self._nonfinite_pending)
        self._nonfinite_pending.zero_()
        ema = self.ema
        if ema is None:
            return
        self.peak = max(self.peak, ema)
        previous, self.last_check_ema = self.last_check_ema, ema
        if previous is not None and previous > 0:
            plateau = abs(ema - previous) / previous < self.plateau_tol
            self.streak = self.streak + 1 if plateau else 0
        if int(self._updates) < self.min_steps:
            return
        if self.streak >= self.patience:
            self._declare(step, f"‖∇L‖ EMA changed < {self.plateau_tol:.0%} per {self.window} steps for {self.streak} checks")
        elif ema <= self.rel_tol * self.peak:
            self._declare(step, f"‖∇L‖ EMA fell to {ema / self.peak:.1%} of its peak {self.peak:.4g}")

    def _declare(self, step: int, reason: str) -> None:
        self.converged, self.converged_step, self.reason = True, step, reason

    def state_dict(self) -> dict[str, Any]:
        """Plain Python numbers only, so checkpoints load with torch.load(weights_only=True)."""
        ema = None if self._ema is None else float(self._ema)
        updates = 0 if self._updates is None else int(self._updates)
        pending = 0 if self._nonfinite_pending is None else int(self._nonfinite_pending)
        return {
            "ema_raw": ema, "updates": updates, "calls": self._calls, "nonfinite": self.nonfinite + pending,
            "peak": self.peak, "last_check_ema": self.last_check_ema, "streak": self.streak,
            "converged": self.converged, "converged_step": self.converged_step, "reason": self.reason,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        if state["ema_raw"] is not None:
            self._ema = torch.tensor(state["ema_raw"])
            self._updates = torch.tensor(state["updates"])
            self._nonfinite_pending = torch.zeros((), dtype=torch.long)
        self._calls, self.nonfinite, self.peak = state["calls"], state["nonfinite"], state["peak"]
        self.last_check_ema, self.streak = state["last_check_ema"], state["streak"]
        self.converged, self.converged_step, self.reason = state["converged"], state["converged_step"], state["reason"]

    def __repr__(self) -> str:
        return (
            f"ConvergenceMonitor(beta={self.beta}, window={self.window}, plateau_tol={self.plateau_tol}, "
            f"patience={self.patience}, rel_tol={self.rel_tol}, min_steps={self.min_steps})"
        )
