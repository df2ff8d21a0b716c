"""ConvergenceMonitor: LMD's stable-convergence criterion on the gradient norm ‖∇L‖.

LMD Theorem 1 assumes ‖W* − W‖ ≤ M*·‖∇L(W*)‖: once ‖∇L‖ has settled, the weights sit in a
basin and a truncation within that radius changes the loss by less than ε (LMD.md section 1).
A minibatch norm is not ‖∇L‖: E‖g‖² = ‖∇L‖² + tr(Σ)/B, and the noise term tr(Σ)/B keeps it high
and jumpy long after the full gradient has settled. The default criterion ("epoch") averages the
norms over whole epochs and fires once an epoch's mean has fallen below `rel_tol` of the highest
epoch mean: both terms have then collapsed, which happens when the training samples are fitted
one by one. The "step" criterion smooths the norms with a short EMA instead and fires on its
plateau or its decay. A noise-ratio rule from per-sample gradients is a third, experimental option.

Framework-free: torch only. Norms are written into a small buffer on the gradients' device (one
copy per step, no host synchronisation); once per `window` updates, and at each `end_epoch()`,
the monitor reads the buffer back, advances the EMA and the epoch's sum over it and checks the
criteria.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lmd_lightning.checks import check_choice, check_interval

__all__ = ["CRITERIA", "ConvergenceMonitor", "GradNormMeter", "grad_norm", "tensor_norms"]

CRITERIA = ("epoch", "step")


def tensor_norms(grads: Iterable[Tensor]) -> Tensor:
    """‖g_i‖₂ of each gradient as one float32 vector (k,): one fused kernel, no host sync."""
    grads = list(grads)
    if not grads:
        return torch.zeros(0)
    norms = torch._foreach_norm(grads)  # one kernel per dtype/device group
    return torch.stack([n.float() for n in norms] if len({n.dtype for n in norms}) > 1 else norms).float()


def grad_norm(grads: Iterable[Tensor]) -> Tensor:
    """‖g‖₂ over all gradients (None skipped) as a 0-dim tensor: per-tensor norms fused, then one norm."""
    return torch.linalg.vector_norm(tensor_norms(g for g in grads if g is not None))


class GradNormMeter:
    """Measures ‖∇L‖ (and, on request, each layer's share) over a fixed list of parameters."""

    def __init__(self, per_layer: bool = False) -> None:
        self.per_layer = per_layer
        self.params: list[torch.nn.Parameter] = []
        self.layers: dict[str, list[int]] = {}  # module name → indices into params

    def refresh(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
        """Re-read the trainable parameters (after a module swap)."""
        named = [(name, p) for name, p in named_parameters if p.requires_grad]
        self.params = [p for _, p in named]
        self.layers = {}
        for index, (name, _) in enumerate(named):
            self.layers.setdefault(name.rpartition(".")[0], []).append(index)

    def measure(self, scale: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        """The global gradient norm, times `scale` if given, and the per-layer norms if asked for."""
        grads = (p.grad if p.grad is not None else torch.zeros((), device=p.device) for p in self.params)
        norms = tensor_norms(grads)  # (k,)
        if scale is not None:
            norms = norms * scale
        layers = None
        if self.per_layer:
            layers = {name: torch.linalg.vector_norm(norms[idx]) for name, idx in self.layers.items()}
        return torch.linalg.vector_norm(norms), layers


class ConvergenceMonitor:
    """Decides when training has converged from a stream of gradient norms.

    `criterion="epoch"` (the default): the loop calls `end_epoch()` after each training epoch,
    and training has converged when, `min_steps` optimizer steps after the first norm, the mean
    of that epoch's norms is at most `rel_tol` × the highest epoch mean so far. Averaging over an
    epoch (36+ norms) removes the step-to-step noise that a short EMA keeps; a relative level
    makes it independent of the loss's scale. Chosen in benchmarks/results/trigger.md: on 45
    runs (5 models × 3 optimizers × 3 seeds) it came within [−1, +2] epochs of the validation
    plateau, or rightly did not fire, in 33 against 29 for "step", with 1 early fire against 2.
    `update()` alone never fires it: without `end_epoch()` calls nothing converges.

    `criterion="step"` (the default until the recipes were re-measured with "epoch" in
    benchmarks/results/recipes_mnist1d.md): checks every `window` steps; converged when either
    - plateau: the EMA's relative change between two checks `window` steps apart stays below
      `plateau_tol` for `patience` consecutive checks; or
    - decay: the EMA falls below `rel_tol` × its running peak.
    Both keep an EMA of the norms (decay `beta` per step), read by `ema` and logged.
    Non-finite norms are counted and skipped; they never move the EMA or trigger anything.

    Noise-aware (`noise_tol` set, opt-in): the criterion is instead the noise ratio
    ρ = ‖∇L‖²/(tr Σ/N), the full-batch gradient's squared norm in units of its sampling variance
    over the N training samples, estimated per measured step from per-sample gradient norms
    (`lmd_lightning.monitors.noise`) and fed as `update(..., ratio=ρ)`. Its EMA (decay
    `noise_beta` per step) below `noise_tol` at `noise_patience` consecutive checks means
    converged: the data no longer agree on a direction beyond what N samples can resolve. The
    selected `criterion` is the fallback while no ratio has arrived (a model without measurable layers).
    """

    def __init__(
        self,
        criterion: str = "epoch",  # closer to the validation plateau than "step" in trigger.md
        # Measured on MNIST-1D, 3 seeds × (Adam, SGD + cosine): benchmarks/results/convergence.md.
        beta: float = 0.9,  # EMA decay per step (~10 steps); 0.98 smoothed the noise away and fired early
        window: int = 50,  # steps between checks; 25 fired 9 epochs early under SGD
        plateau_tol: float = 0.05,  # <5% change per window is a plateau; 10% fired early
        patience: int = 5,  # plateau checks in a row; 3 came within one check of firing early
        # None: the criterion's own. "step": 0.1 (5% fired 11 epochs late under cosine SGD); "epoch":
        # 0.12, chosen on seeds 0–1 in trigger.md (0.1 tied on score with a later mean lag; 0.15
        # and 0.2 fired early more often).
        rel_tol: float | None = None,
        min_steps: int = 100,  # never converged within this many steps of the first norm
        noise_tol: float | None = None,  # ρ threshold of the noise-aware criterion; None: off
        noise_beta: float = 0.8,  # EMA decay of ρ per step
        noise_patience: int = 2,  # checks in a row with the ρ EMA below noise_tol
    ) -> None:
        check_choice(criterion, "criterion", CRITERIA)
        check_interval(beta, "beta", 0.0, 1.0)
        check_interval(window, "window", 1, integer=True)
        check_interval(plateau_tol, "plateau_tol", 0.0, open_low=True)
        check_interval(patience, "patience", 1, integer=True)
        if rel_tol is None:
            rel_tol = 0.12 if criterion == "epoch" else 0.1
        check_interval(rel_tol, "rel_tol", 0.0, 1.0)
        check_interval(min_steps, "min_steps", 0, integer=True)
        if noise_tol is not None:
            check_interval(noise_tol, "noise_tol", 0.0, open_low=True)
        check_interval(noise_beta, "noise_beta", 0.0, 1.0)
        check_interval(noise_patience, "noise_patience", 1, integer=True)
        self.criterion = criterion
        self.beta, self.window, self.plateau_tol = beta, window, plateau_tol
        self.patience, self.rel_tol, self.min_steps = patience, rel_tol, min_steps
        self.noise_tol, self.noise_beta, self.noise_patience = noise_tol, noise_beta, noise_patience
        self.reset()

    def reset(self) -> None:
        """Forget everything: used after each compression round, before fine-tuning re-converges."""
        self._buffer: Tensor | None = None  # (window,) norms not yet folded into the EMA
        self._ratios: Tensor | None = None  # (window,) noise ratios ρ alongside, NaN where none was fed
        self._ratio_raw = 0.0  # EMA of ρ, not yet bias-corrected
        self._ratio_weight = 0.0
        self._ratio_step: int | None = None
        self.noise_streak = 0
        self._steps: list[int] = []  # the optimizer step of each buffered norm
        self._ema_raw = 0.0  # EMA over finite norms, not yet bias-corrected
        self._weight = 0.0  # the EMA's total weight, for bias correction
        self._last_step: int | None = None  # step of the last finite norm folded in
        self._first_step: int | None = None
        self._last_check: int | None = None  # step of the last check
        self.updates = 0  # finite norms folded in
        self.calls = 0  # every call to update(), finite or not
        self.nonfinite = 0
        self.peak = 0.0
        self.last_check_ema: float | None = None
        self.streak = 0
        self.converged = False
        self.converged_step: int | None = None
        self.reason: str | None = None
        self.latest_layer_norms: dict[str, Tensor] = {}
        self._finite_in_window = 0
        self._epoch_sum = 0.0  # finite norms folded in since the last end_epoch()
        self._epoch_count = 0
        self.epochs = 0  # end_epoch() calls that closed an epoch with norms
        self.epoch_peak = 0.0  # the highest epoch mean
        self.last_epoch_mean: float | None = None

    @property
    def ema(self) -> float | None:
        """The bias-corrected EMA of ‖∇L‖ as of the last check; None before any finite norm."""
        return self._ema_raw / self._weight if self._weight > 0 else None

    @property
    def noise_ratio(self) -> float | None:
        """The bias-corrected EMA of the noise ratio ρ as of the last check; None before any ratio."""
        return self._ratio_raw / self._ratio_weight if self._ratio_weight > 0 else None

    def update(
        self,
        grad_norm: Tensor | float,
        step: int,
        layer_norms: dict[str, Tensor] | None = None,
        ratio: Tensor | float | None = None,
    ) -> bool:
        """Feed one gradient norm measured at optimizer step `step`; returns `converged`.

        Steps may skip (a norm every few steps): the EMA decays by `beta` per step, and `window`
        and `min_steps` count steps, so the criterion means the same at any measuring rate.
        `layer_norms` (name → norm), when given, is kept as `latest_layer_norms` for inspection.
        `ratio`: the step's noise ratio ρ (see the class docstring), for `noise_tol`.
        """
        if layer_norms is not None:
            self.latest_layer_norms = layer_norms
        if self.converged:
            return True
        norm = torch.as_tensor(grad_norm).detach()
        if self._buffer is None:
            self._buffer = torch.empty(self.window, dtype=torch.float32, device=norm.device)
        elif self._buffer.device != norm.device:  # restored on the host, training on an accelerator
            self._buffer = self._buffer.to(norm.device)
        if self._first_step is None:
            self._first_step, self._last_check = step, step - 1
        if ratio is not None:
            if self._ratios is None:
                self._ratios = torch.full((self.window,), math.nan, dtype=torch.float32, device=norm.device)
            self._ratios[len(self._steps)] = torch.as_tensor(ratio).detach().to(self._ratios.device)
        elif self._ratios is not None:
            self._ratios[len(self._steps)] = math.nan
        self._buffer[len(self._steps)] = norm
        self._steps.append(step)
        self.calls += 1
        if step - self._last_check >= self.window or len(self._steps) == self.window:
            self._flush()
            self._check(step)
        return self.converged

    def end_epoch(self) -> bool:
        """Close a training epoch: with `criterion="epoch"`, decide on its mean norm; returns `converged`.

        An epoch without finite norms (none measured, or all NaN/inf) is skipped, not counted.
        """
        if self.converged:
            return True
        self._flush()
        if not self._epoch_count:
            return False
        mean, self._epoch_sum, self._epoch_count = self._epoch_sum / self._epoch_count, 0.0, 0
        self.epochs += 1
        self.last_epoch_mean, self.epoch_peak = mean, max(self.epoch_peak, mean)
        noise_decides = self.noise_tol is not None and self.noise_ratio is not None
        if self.criterion != "epoch" or noise_decides or self._last_step - self._first_step + 1 < self.min_steps:
            return False
        if self.epoch_peak > 0 and mean <= self.rel_tol * self.epoch_peak:
            self._declare(
                self._last_step,
                f"epoch-mean ‖g‖ {mean:.4g} fell to {mean / self.epoch_peak:.1%} of its peak epoch mean "
                f"{self.epoch_peak:.4g}",
            )
        return self.converged

    def _flush(self) -> None:
        """Fold the buffered norms (and ratios) into the EMAs and the epoch's sum."""
        count = len(self._steps)
        if not count:
            return
        if self._ratios is not None:
            self._fold_ratios(self._ratios[:count].tolist(), self._steps)
        self._fold(self._buffer[:count].tolist())

    def _fold(self, values: list[float]) -> None:
        """Advance the EMA over the buffered norms; non-finite ones are counted and skipped."""
        steps, self._steps = self._steps, []
        self._finite_in_window = sum(math.isfinite(v) for v in values)
        for value, step in zip(values, steps):
            if not math.isfinite(value):
                self.nonfinite += 1
                continue
            decay = self.beta ** (step - self._last_step) if self._last_step is not None else self.beta
            self._ema_raw = decay * self._ema_raw + (1 - decay) * value
            self._weight = decay * self._weight + (1 - decay)
            self._last_step = step
            self.updates += 1
            self._epoch_sum += value
            self._epoch_count += 1

    def _fold_ratios(self, values: list[float], steps: list[int]) -> None:
        for value, step in zip(values, steps):
            if not math.isfinite(value):
                continue
            decay = self.noise_beta ** (step - self._ratio_step) if self._ratio_step is not None else self.noise_beta
            self._ratio_raw = decay * self._ratio_raw + (1 - decay) * value
            self._ratio_weight = decay * self._ratio_weight + (1 - decay)
            self._ratio_step = step

    def _check(self, step: int) -> None:
        self._last_check = step
        if self.noise_tol is not None and self.noise_ratio is not None:
            self._check_noise(step)
            return
        ema = self.ema
        if ema is None or not self._finite_in_window:  # a window of only NaN/inf says nothing
            return
        self.peak = max(self.peak, ema)
        if self.criterion == "epoch":
            return  # decided at end_epoch(); the EMA and its peak are kept for the logs
        previous, self.last_check_ema = self.last_check_ema, ema
        if previous is not None and previous > 0:
            plateau = abs(ema - previous) / previous < self.plateau_tol
            self.streak = self.streak + 1 if plateau else 0
        if step - self._first_step + 1 < self.min_steps:
            return
        if self.streak >= self.patience:
            self._declare(
                step, f"‖∇L‖ EMA changed < {self.plateau_tol:.0%} per {self.window} steps for {self.streak} checks"
            )
        elif self.peak > 0 and ema <= self.rel_tol * self.peak:
            self._declare(step, f"‖∇L‖ EMA fell to {ema / self.peak:.1%} of its peak {self.peak:.4g}")

    def _check_noise(self, step: int) -> None:
        ratio = self.noise_ratio
        self.noise_streak = self.noise_streak + 1 if ratio < self.noise_tol else 0
        if step - self._first_step + 1 >= self.min_steps and self.noise_streak >= self.noise_patience:
            self._declare(
                step, f"noise ratio ‖∇L‖²/(tr Σ/N) EMA {ratio:.3g} < {self.noise_tol:g} for {self.noise_streak} checks"
            )

    def _declare(self, step: int, reason: str) -> None:
        self.converged, self.converged_step, self.reason = True, step, reason

    _STATE = (
        "_ema_raw",
        "_weight",
        "_last_step",
        "_first_step",
        "_last_check",
        "_steps",
        "updates",
        "calls",
        "nonfinite",
        "peak",
        "last_check_ema",
        "streak",
        "converged",
        "converged_step",
        "reason",
        "_ratio_raw",
        "_ratio_weight",
        "_ratio_step",
        "noise_streak",
        "_epoch_sum",
        "_epoch_count",
        "epochs",
        "epoch_peak",
        "last_epoch_mean",
    )

    def state_dict(self) -> dict[str, Any]:
        """Plain Python numbers and lists only, so checkpoints load with torch.load(weights_only=True)."""
        pending = [] if self._buffer is None else self._buffer[: len(self._steps)].tolist()
        ratios = [] if self._ratios is None else self._ratios[: len(self._steps)].tolist()
        state = {key.lstrip("_"): getattr(self, key) for key in self._STATE}
        return {"pending": pending, "pending_ratios": ratios, **state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        for key in self._STATE:
            if key.lstrip("_") in state:  # the noise and epoch entries are absent from older checkpoints
                setattr(self, key, state[key.lstrip("_")])
        self._steps = list(self._steps)
        pad = [0.0] * (self.window - len(state["pending"]))
        if state["pending"]:
            self._buffer = torch.tensor(state["pending"] + pad)
        if state.get("pending_ratios"):
            self._ratios = torch.tensor(state["pending_ratios"] + [math.nan] * len(pad))

    def __repr__(self) -> str:
        return (
            f"ConvergenceMonitor(criterion={self.criterion!r}, beta={self.beta}, window={self.window}, "
            f"plateau_tol={self.plateau_tol}, "
            f"patience={self.patience}, rel_tol={self.rel_tol}, min_steps={self.min_steps}"
            + (
                f", noise_tol={self.noise_tol}, noise_beta={self.noise_beta}, noise_patience={self.noise_patience})"
                if self.noise_tol is not None
                else ")"
            )
        )
