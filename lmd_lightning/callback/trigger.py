"""The trigger inside a fit: what LMDCompression watches to decide that training has converged.

- "grad_norm": ‖∇L‖ every `every_n_steps` optimizer steps into a ConvergenceMonitor (LMD.md section 1);
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
from torch import Tensor
from torch.optim import Optimizer

from lmd_lightning.callback import surgery
from lmd_lightning.checks import check_bool, check_int
from lmd_lightning.layers.base import FactoredModule
from lmd_lightning.monitors.convergence import ConvergenceMonitor, GradNormMeter
from lmd_lightning.monitors.stable_rank import StableRankMonitor
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

    def refresh(self, pl_module: pl.LightningModule) -> None:
        """Re-read the parameters ‖∇L‖ is measured over (after a swap)."""
        self._meter.refresh(pl_module.named_parameters())

    def before_optimizer_step(self, trainer: pl.Trainer, optimizer: Optimizer, info: Callable[[str], None]) -> None:
        if self.kind != "grad_norm" or trainer.global_step % self.every_n_steps:
            return
        norm, layers = self._meter.measure(surgery.gradient_unscale_factor(trainer, optimizer))
        monitor, was = self.convergence, self.convergence.converged
        if monitor.update(norm, trainer.global_step, layers) and not was:
            info(
                f"LMDCompression: converged at step {trainer.global_step} ({monitor.reason}); "
                f"‖∇L‖ EMA {monitor.ema:.4g}, peak {monitor.peak:.4g}. Compressing at the next epoch."
            )

    def measure_epoch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, weights: Weights, info: Callable[[str], None]
    ) -> None:
        """At an epoch start: the stable ranks the last epoch left, decided alike on every process."""
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

    def epoch_end(self, pl_module: pl.LightningModule) -> None:
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
