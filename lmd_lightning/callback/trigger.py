"""The trigger inside a fit: what LMDCompression watches to decide that training has converged.

- "grad_norm": ‖∇L‖ every `every_n_steps` optimizer steps into a ConvergenceMonitor (LMD.md section 1),
  and each epoch closed at the next epoch's start (its default criterion decides on epoch means);
  with `ConvergenceMonitor(noise_tol=…)` also the noise ratio ρ of the same steps, from per-sample
  gradient norms of the measurable layers (hooks armed only on the measured steps);
- "stable_rank": every targeted layer's stable rank into a StableRankMonitor (Cuttlefish), measured
  at each epoch start on the weights the last epoch left (so a checkpoint saved at the end of an
  epoch misses no measurement on resume); its ξ are measured on the weights when fit starts;
- "epoch": nothing to watch; the schedule alone decides (Pufferfish).

Callback glue: it takes the trainer and module from the callback's hooks, and logs through the module.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.optim import Optimizer

from lmd_lightning.callback import surgery
from lmd_lightning.checks import check_bool, check_int
from lmd_lightning.layers.base import FactoredModule
from lmd_lightning.monitors.convergence import ConvergenceMonitor, GradNormMeter, tensor_norms
from lmd_lightning.monitors.noise import PerSampleNorms, noise_estimates
from lmd_lightning.monitors.stable_rank import StableRankMonitor
from lmd_lightning.truncate.calibration import samples_in
from lmd_lightning.truncate.policies import RankPolicy, StableRank

__all__ = ["TRIGGERS", "TriggerWatch"]

TRIGGERS = ("grad_norm", "epoch", "stable_rank")
Weights = Callable[[], dict[str, Tensor]]  # the targeted layers' (out, fan_in) weights, read when called


class TriggerWatch:
    """One trigger's monitor, fed from the training loop."""

    def __init__(
        self, trigger: str | ConvergenceMonitor | StableRankMonitor, every_n_steps: int, per_layer_norms: bool
    ) -> None:
        if not isinstance(trigger, (ConvergenceMonitor, StableRankMonitor)) and trigger not in TRIGGERS:
            raise ValueError(
                f"`trigger` must be one of {TRIGGERS}, a ConvergenceMonitor or a StableRankMonitor, got {trigger!r}"
            )
        check_int(every_n_steps, "every_n_steps", 1)
        check_bool(per_layer_norms, "per_layer_norms")
        self.kind = (
            trigger
            if isinstance(trigger, str)
            else ("grad_norm" if isinstance(trigger, ConvergenceMonitor) else "stable_rank")
        )
        self.convergence = trigger if isinstance(trigger, ConvergenceMonitor) else ConvergenceMonitor()
        self.stable_ranks = trigger if isinstance(trigger, StableRankMonitor) else StableRankMonitor()
        self.every_n_steps, self.per_layer_norms = every_n_steps, per_layer_norms
        self._meter = GradNormMeter(per_layer_norms)  # parameters re-read every epoch start, after any swap
        self._noise: PerSampleNorms | None = None  # with noise_tol: the layers whose per-sample norms are taken
        self._samples = 0  # samples of the armed step so far (all its micro-batches)
        self._warned = False

    @property
    def monitor(self) -> ConvergenceMonitor | StableRankMonitor:
        """The monitor whose `converged` and `reason` the schedule follows."""
        return self.stable_ranks if self.kind == "stable_rank" else self.convergence

    def fit_start(self, pl_module: pl.LightningModule, weights: Weights) -> None:
        if self.kind == "stable_rank" and not self.stable_ranks.started:
            if any(isinstance(m, FactoredModule) for m in pl_module.modules()):
                warnings.warn(
                    "LMDCompression(trigger='stable_rank'): ξ is measured on a model with factored layers, "
                    "not on initial weights; StableRank's ranks will not be Cuttlefish's",
                    stacklevel=2,
                )
            self.stable_ranks.start(weights())  # ξ from the initial weights

    @property
    def noise_aware(self) -> bool:
        return self.kind == "grad_norm" and self.convergence.noise_tol is not None

    def refresh(self, pl_module: pl.LightningModule) -> None:
        """Re-read the parameters ‖∇L‖ is measured over (after a swap)."""
        self._meter.refresh(pl_module.named_parameters())
        if self.noise_aware:
            if self._noise is not None:
                self._noise.disarm()
            skipped = self._noise.skipped if self._noise is not None else set()
            self._noise = PerSampleNorms.of(pl_module)
            self._noise.skipped |= skipped  # too costly once, too costly again
            if not self._noise.layers and not self._warned:
                self._warned = True
                warnings.warn(
                    "ConvergenceMonitor(noise_tol=...): the model has no layer whose per-sample gradient norms "
                    "can be measured (Linear, Conv1d, Conv2d); the monitor falls back to its plateau and decay rules",
                    stacklevel=2,
                )

    def release(self) -> None:
        """Remove the per-sample hooks (end of fit, or an exception mid-step)."""
        if self._noise is not None:
            self._noise.disarm()

    def before_batch(self, trainer: pl.Trainer, batch: Any) -> None:
        """Arm the per-sample hooks for a step that will be measured (every micro-batch of it)."""
        if not self.noise_aware or self._noise is None or self.convergence.converged:
            return
        if trainer.global_step % self.every_n_steps:
            return
        if not self._noise.armed:
            self._samples = 0
            self._noise.arm()
        self._samples += samples_in(batch)

    def _ratio(self, trainer: pl.Trainer, scale: Tensor | None) -> Tensor | None:
        """The measured step's ρ = ‖∇L‖²·N/tr Σ over the measured layers, on their device (None if unknown)."""
        noise = self._noise
        per_sample = noise.take()
        noise.disarm()
        params = list(noise.parameters())
        if per_sample is None or not params:
            return None
        grads = [p.grad if p.grad is not None else torch.zeros((), device=p.device) for p in params]
        grad_sq = tensor_norms(grads).double().square().sum()
        if scale is not None:
            grad_sq = grad_sq * scale.double() ** 2
        loss_scale = surgery.loss_scale(trainer)
        if loss_scale:
            per_sample = per_sample / loss_scale**2  # backward ran on the scaled loss
        world = trainer.world_size
        if world > 1:  # each process's contributions enter the averaged gradient divided by the world size
            per_sample = trainer.strategy.reduce(per_sample, reduce_op="sum") / world**2
        samples = self._samples * world
        batches = trainer.num_training_batches
        if samples < 2 or not isinstance(batches, int):
            return None
        steps = max(1, batches // trainer.accumulate_grad_batches)
        signal, trace = noise_estimates(grad_sq.to(per_sample.device), per_sample, samples)
        return signal * (samples * steps) / trace.clamp_min(1e-300)

    def before_optimizer_step(self, trainer: pl.Trainer, optimizer: Optimizer, info: Callable[[str], None]) -> None:
        if self.kind != "grad_norm" or trainer.global_step % self.every_n_steps:
            return
        scale = surgery.gradient_unscale_factor(trainer, optimizer)
        norm, layers = self._meter.measure(scale)
        ratio = self._ratio(trainer, scale) if self._noise is not None and self._noise.armed else None
        monitor, was = self.convergence, self.convergence.converged
        extra = {} if ratio is None else {"ratio": ratio}  # subclasses written before `ratio` keep working
        if monitor.update(norm, trainer.global_step, layers, **extra) and not was:
            info(
                f"LMDCompression: converged at step {trainer.global_step} ({monitor.reason}); "
                f"‖∇L‖ EMA {monitor.ema:.4g}, peak {monitor.peak:.4g}. Compressing at the next epoch."
            )

    def measure_epoch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, weights: Weights, info: Callable[[str], None]
    ) -> None:
        """At an epoch start, decide on the epoch that ended: its mean ‖g‖ ("grad_norm"), or the
        stable ranks it left ("stable_rank"); alike on every process. Doing it here rather than at
        the epoch's end means a checkpoint written at the end of an epoch misses no decision on resume."""
        if self.kind == "grad_norm" and trainer.current_epoch > 0:
            self._end_epoch(trainer, pl_module, info)
            return
        monitor, epoch = self.stable_ranks, trainer.current_epoch - 1
        if self.kind != "stable_rank" or epoch < 0 or not monitor.started or monitor.converged:
            return
        converged = monitor.update(weights(), epoch)
        if trainer.strategy.reduce_boolean_decision(converged, all=True) != converged:
            monitor.retract()  # another process has not converged: compress together or not at all
        elif converged:
            info(f"LMDCompression: converged after epoch {epoch} ({monitor.reason}).")
        if monitor.change is not None:
            pl_module.log("lmd/stable_rank_change", monitor.change)
        for name, value in monitor.latest.items():
            pl_module.log(f"lmd/stable_rank/{name}", value)

    def _end_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, info: Callable[[str], None]) -> None:
        monitor, was = self.convergence, self.convergence.converged
        # ‖g‖ is measured after the gradients are all-reduced, so every process sees the same norms
        if monitor.end_epoch() and not was:
            # no "compressing now": after the first cut a re-convergence ends a ladder rung or a round's
            # fine-tuning, and the callback says itself when it compresses
            info(f"LMDCompression: converged after epoch {trainer.current_epoch - 1} ({monitor.reason}).")
        if monitor.last_epoch_mean is not None and not was:
            pl_module.log("lmd/grad_norm_epoch_mean", monitor.last_epoch_mean)

    def epoch_end(self, pl_module: pl.LightningModule) -> None:
        if self.kind == "grad_norm" and self.convergence.noise_ratio is not None:
            pl_module.log("lmd/noise_ratio", self.convergence.noise_ratio)
        if self.kind == "grad_norm" and self.convergence.ema is not None:
            pl_module.log("lmd/grad_norm_ema", self.convergence.ema)
            for name, norm in self.convergence.latest_layer_norms.items():
                pl_module.log(f"lmd/grad_norm/{name}", float(norm))

    def policy_for(self, policy: RankPolicy) -> RankPolicy:
        """A `StableRank` policy without scales gets the ξ measured at fit start."""
        if self.kind == "stable_rank" and isinstance(policy, StableRank) and policy.scales is None:
            return dataclasses.replace(policy, scales=dict(self.stable_ranks.scales))
        return policy

    def state_dict(self) -> dict[str, Any]:
        return {"convergence": self.convergence.state_dict(), "stable_rank": self.stable_ranks.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.convergence.load_state_dict(state["convergence"])
        if "stable_rank" in state:  # absent from checkpoints written before the trigger existed
            self.stable_ranks.load_state_dict(state["stable_rank"])
