"""LMDCompression: compress at convergence, then keep training (the fine-tuning phase).

1. Every optimizer step (after accumulation and AMP unscaling, before clipping), the fused
   gradient norm ‖∇L‖ goes to a ConvergenceMonitor (LMD.md section 1).
2. At the first epoch boundary after it reports convergence (never before `min_epochs`,
   always by the forced epoch), `compress_` truncates and swaps the layers.
3. `trainer_surgery.rebuild` re-runs the user's `configure_optimizers`, carries the state of
   surviving parameters over and continues the LR schedule. Training goes on.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lmd_lightning import trainer_surgery
from lmd_lightning.compress import compress_, restore_factored_
from lmd_lightning.convergence import ConvergenceMonitor, grad_norm
from lmd_lightning.factored import PARAMETRIZATIONS, FactoredModule
from lmd_lightning.policies import RankPolicy
from lmd_lightning.report import CompressionReport
from lmd_lightning.svd import METHODS
from lmd_lightning.targets import FilterFn, Patterns, find_targets, swap_module

__all__ = ["LMDCompression"]

log = logging.getLogger("lmd_lightning")
TRIGGERS = ("grad_norm", "epoch")


def _check_epochs(value: Any, arg: str, low: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise ValueError(f"`{arg}` must be None or an int >= {low}, got {value!r}")


class LMDCompression(Callback):
    """Truncate dense layers by SVD once ‖∇L‖ has converged, then fine-tune the factored model.

    Args:
        policy: how many singular values each layer keeps (EnergyRank, GlobalBudget, …).
        trigger: "grad_norm" (a ConvergenceMonitor with its defaults), "epoch" (compress exactly
            at `min_epochs`, the Pufferfish baseline) or a configured ConvergenceMonitor.
        include / exclude / filter_fn: which layers, as in `compress_`.
        min_epochs: epochs of dense training before compression may happen.
        max_epochs: the epoch at which compression is forced if the monitor has not fired.
            None: two thirds of the Trainer's `max_epochs` (rounded down, at least `min_epochs`),
            late enough for training to have gone somewhere, early enough to leave a third of
            the epochs for fine-tuning.
        every_n_steps: measure ‖∇L‖ every this many optimizer steps.
        parametrization / method: passed to `compress_`.
    """

    def __init__(
        self,
        policy: RankPolicy,
        trigger: str | ConvergenceMonitor = "grad_norm",
        include: Patterns = None,
        exclude: Patterns = None,
        filter_fn: FilterFn | None = None,
        min_epochs: int = 1,
        max_epochs: int | None = None,
        every_n_steps: int = 1,
        parametrization: str = "balanced",
        method: str = "auto",
    ) -> None:
        if not isinstance(policy, RankPolicy):
            raise TypeError(f"`policy` must be a RankPolicy (EnergyRank, FixedRank, GlobalBudget, …), got {policy!r}")
        if not isinstance(trigger, ConvergenceMonitor) and trigger not in TRIGGERS:
            raise ValueError(f"`trigger` must be one of {TRIGGERS} or a ConvergenceMonitor, got {trigger!r}")
        _check_epochs(min_epochs, "min_epochs", 0)
        _check_epochs(max_epochs, "max_epochs", 0)
        if max_epochs is not None and max_epochs < min_epochs:
            raise ValueError(f"`max_epochs` ({max_epochs}) must be >= `min_epochs` ({min_epochs})")
        _check_epochs(every_n_steps, "every_n_steps", 1)
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"`parametrization` must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
        self.policy = policy
        self.trigger = trigger if isinstance(trigger, str) else "grad_norm"
        self.monitor = trigger if isinstance(trigger, ConvergenceMonitor) else ConvergenceMonitor()
        self.include, self.exclude, self.filter_fn = include, exclude, filter_fn
        self.min_epochs, self.max_epochs, self.every_n_steps = min_epochs, max_epochs, every_n_steps
        self.parametrization, self.method = parametrization, method
        self.compressed = False  # has the swap happened?
        self.compressed_epoch: int | None = None
        self.reports: list[dict[str, Any]] = []  # CompressionReport.to_dict() of each compression
        self.failure: str | None = None  # why compression was abandoned, if it was
        self._force_epoch: int | None = None
        self._user_strict = True

    # ---- Lightning hooks: each hands off to a private method ----

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        trainer_surgery.check_supported(trainer, pl_module)
        self._check_targets(pl_module)
        self._force_epoch = self._forced_epoch(trainer)
        # Lightning loads weights before callbacks see the checkpoint: load loosely, then
        # strictly again in on_load_checkpoint once the factored structure is rebuilt.
        self._user_strict, pl_module.strict_loading = pl_module.strict_loading, False

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._restore_structure(pl_module, checkpoint["state_dict"])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.strict_loading = self._user_strict

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if not self.compressed and self.trigger == "grad_norm" and trainer.global_step % self.every_n_steps == 0:
            self._measure(trainer, pl_module, optimizer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer.current_epoch):
            self._compress(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {
            "compressed": self.compressed,
            "compressed_epoch": self.compressed_epoch,
            "reports": self.reports,
            "failure": self.failure,
            "monitor": self.monitor.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.compressed, self.compressed_epoch = state_dict["compressed"], state_dict["compressed_epoch"]
        self.reports, self.failure = state_dict["reports"], state_dict["failure"]
        self.monitor.load_state_dict(state_dict["monitor"])

    # ---- the work ----

    @property
    def ranks(self) -> dict[str, int]:
        """Layer name → rank after the last compression."""
        if not self.reports:
            return {}
        return {layer["name"]: layer["rank"] for layer in self.reports[-1]["layers"] if layer["rank"] is not None}

    def _check_targets(self, pl_module: pl.LightningModule) -> None:
        targets = find_targets(pl_module, self.include, self.exclude, self.filter_fn)
        if not any(t.skip_reason is None for t in targets):
            names = [name for name, _ in pl_module.named_modules() if name]
            raise ValueError(f"LMDCompression found no Linear/Conv2d layer it can compress; the modules are: {names}")

    def _forced_epoch(self, trainer: pl.Trainer) -> int | None:
        if self.max_epochs is not None:
            return self.max_epochs
        if trainer.max_epochs is None or trainer.max_epochs < 0:
            rank_zero_warn("LMDCompression: the Trainer has no max_epochs, so compression is never forced")
            return None
        return max(self.min_epochs, (2 * trainer.max_epochs) // 3)

    def _due(self, epoch: int) -> bool:
        if self.compressed or self.failure is not None or epoch < self.min_epochs:
            return False
        if self.trigger == "epoch":
            return epoch == self.min_epochs
        forced = self._force_epoch is not None and epoch >= self._force_epoch
        return self.monitor.converged or forced

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        norm = grad_norm(p.grad for p in pl_module.parameters() if p.grad is not None)
        factor = trainer_surgery.gradient_unscale_factor(trainer, optimizer)
        was = self.monitor.converged
        if self.monitor.update(norm if factor is None else norm * factor, trainer.global_step) and not was:
            rank_zero_info(
                f"LMDCompression: converged at step {trainer.global_step} ({self.monitor.reason}); "
                f"‖∇L‖ EMA {self.monitor.ema:.4g}, peak {self.monitor.peak:.4g}. Compressing at the next epoch."
            )

    def _compress(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        why = self.monitor.reason if self.monitor.converged else f"epoch {trainer.current_epoch} reached"
        undo, before = _undo_record(pl_module), trainer_surgery.snapshot(trainer)
        try:
            report = compress_(
                pl_module, self.policy, include=self.include, exclude=self.exclude, filter_fn=self.filter_fn,
                parametrization=self.parametrization, method=self.method,
            )
            trainer_surgery.rebuild(trainer, before)
        except Exception as err:  # leave the dense model training as before, and say why
            _undo(pl_module, undo)
            trainer_surgery.restore(trainer, before)
            self.failure = f"{type(err).__name__}: {err}"
            rank_zero_warn(f"LMDCompression: compression failed, training continues dense. {self.failure}")
            return
        self._finish(trainer, report, why)

    def _finish(self, trainer: pl.Trainer, report: CompressionReport, why: str) -> None:
        self.compressed, self.compressed_epoch = True, trainer.current_epoch
        self.reports.append(report.to_dict())
        rank_zero_info(f"LMDCompression: compressed at epoch {trainer.current_epoch} ({why}).\n{report}")

    def _restore_structure(self, pl_module: pl.LightningModule, state_dict: dict[str, torch.Tensor]) -> None:
        rebuilt = restore_factored_(pl_module, state_dict)
        pl_module.load_state_dict(state_dict, strict=self._user_strict)
        pl_module.strict_loading = self._user_strict
        if rebuilt:
            rank_zero_info(f"LMDCompression: rebuilt {len(rebuilt)} factored layers from the checkpoint")


def _undo_record(model: torch.nn.Module) -> dict[str, Any]:
    """What compress_ can change: the module objects, and the parameters of factored ones."""
    return {
        "modules": {name: module for name, module in model.named_modules()},
        "factors": {
            name: dict(module._parameters) for name, module in model.named_modules() if isinstance(module, FactoredModule)
        },
    }


def _undo(model: torch.nn.Module, record: dict[str, Any]) -> None:
    current = dict(model.named_modules())
    for name, module in record["modules"].items():
        if name and name in current and current[name] is not module:
            swap_module(model, current[name], module)
    for name, params in record["factors"].items():
        record["modules"][name]._parameters.update(params)
