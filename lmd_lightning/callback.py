"""LMDCompression: compress at convergence, then keep training (the fine-tuning phase).

1. Every optimizer step (after accumulation and AMP unscaling, before clipping), the fused
   gradient norm ‖∇L‖ goes to a ConvergenceMonitor (LMD.md section 1); or, with
   trigger="stable_rank", each layer's stable rank goes to a StableRankMonitor once per epoch
   (trigger.py); trigger="epoch" watches nothing.
2. At the first epoch boundary after the monitor reports convergence (never before `min_epochs`,
   always by the forced epoch), `compress_` truncates and swaps the layers.
3. `trainer_surgery.rebuild` re-runs the user's `configure_optimizers`, carries the state of
   surviving parameters over and continues the LR schedule. Training goes on.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from lmd_lightning import trainer_surgery
from lmd_lightning.calibration import DataMetric, layer_weight
from lmd_lightning.checkpoint import StrictLoadingHold
from lmd_lightning.compress import compress_
from lmd_lightning.convergence import ConvergenceMonitor
from lmd_lightning.factored import PARAMETRIZATIONS
from lmd_lightning.guard import check_guard_arguments, measure_and_guard
from lmd_lightning.lmd_proper import LMDProper
from lmd_lightning.policies import RankPolicy
from lmd_lightning.regularize import Regularizer
from lmd_lightning.report import CompressionReport
from lmd_lightning.schedule import Schedule, default_last_epoch
from lmd_lightning.stable_rank import StableRankMonitor
from lmd_lightning.svd import METHODS
from lmd_lightning.targets import FilterFn, Patterns, find_targets, undo, undo_record
from lmd_lightning.trigger import TriggerWatch

__all__ = ["LMDCompression", "LMDCompressionBase"]


def _check_int(value: Any, arg: str, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{arg}` must be {'None or ' if optional else ''}an int >= {low}, got {value!r}")


class LMDCompressionBase:
    """Truncate dense layers by SVD once ‖∇L‖ has converged, then fine-tune the factored model.

    The implementation, shared by `LMDCompression` (for `pytorch_lightning`) and
    `lmd_lightning.lightning.LMDCompression` (for the unified `lightning` package).

    Args:
        policy: how many singular values each layer keeps (EnergyRank, GlobalBudget, …).
        trigger: "grad_norm" (a ConvergenceMonitor with its defaults), "epoch" (compress exactly
            at `min_epochs`, the Pufferfish baseline), "stable_rank" (a StableRankMonitor with its
            defaults: once the targeted layers' stable ranks have settled, their mean relative
            change per epoch below its `tol`, the Cuttlefish switch; one round only), or a configured ConvergenceMonitor / StableRankMonitor. With
            "stable_rank" each layer's ξ is measured when fit starts and given to a `StableRank`
            policy that has no `scales` of its own.
        include / exclude / filter_fn: which layers, as in `compress_`.
        min_epochs: epochs of dense training before compression may happen.
        max_epochs: the epoch at which compression is forced if the monitor has not fired.
            None: two thirds of the Trainer's `max_epochs` (rounded down, at least `min_epochs`),
            late enough for training to have gone somewhere, early enough to leave a third of
            the epochs for fine-tuning.
        rounds: compress iteratively. Round k uses `policy.for_round(k, rounds)` (a share of
            what is left each round, so that the last round reaches the policy's target) once
            ‖∇L‖ has re-converged after the previous one; forced epochs are spread evenly up to
            `max_epochs`. With trigger="epoch" round k happens at the k-th of those epochs,
            the first at `min_epochs`.
        every_n_steps: measure ‖∇L‖ every this many optimizer steps. The norm reads every gradient
            once; 4 keeps that under 2% of a step on small CPU models, and the monitor counts its
            windows in steps, so it fires at the same epochs as with a norm every step
            (benchmarks/results/convergence_every4.md, callback_overhead.md).
        per_layer_norms: also keep each layer's gradient norm (`convergence.latest_layer_norms`)
            and log it as `lmd/grad_norm/<layer>` at every epoch end, next to `lmd/grad_norm_ema`.
        parametrization / method: passed to `compress_`.
        metric: "weight" (Eckart–Young on each weight) or "data" / a `DataMetric`: truncate each
            layer in the metric of its inputs, measured on the first `DataMetric.batches` batches
            of the training loader (moved to the device, run in eval mode under the trainer's
            precision; summed over DDP processes). See `compress_` and LMD.md section 5.
        metric_maps: give each factored layer learnable r×r I_dist and O_dist at the identity
            (LMD Eq. 3–4), trained in the fine-tuning phase.
        regularizer: None, "identity", "laplacian" or a `Regularizer` (λ as `lmd_lambda`, how
            often, graph size): a penalty on the metric maps whose gradient the callback adds after
            each backward (respecting gradient accumulation, AMP scaling and DDP); logged as
            `lmd/reg/<kind>`. Needs `metric_maps=True`. See lmd_lightning.regularize.
        fold_maps: at the end of training, fold the metric maps into the factors (same outputs,
            canonical U, s, V, no maps left). Export folds too, unless told not to.
        monitor: a metric logged by `validation_step`, measured on `guard_batches` validation
            batches per loader right before truncation and right after it, and at `sweep_points`
            settings of the policy's knob (the rank–accuracy sweep, logged to TensorBoard).
        max_accuracy_drop: the accuracy guard (needs `monitor`): the knob is bisected
            (`search_steps` times) to the most compressive setting whose one-shot drop stays
            within it, or the model stays dense. `mode`: "max" if higher is better, "min" if lower.
    """

    def __init__(
        self,
        policy: RankPolicy,
        trigger: str | ConvergenceMonitor | StableRankMonitor = "grad_norm",
        include: Patterns = None,
        exclude: Patterns = None,
        filter_fn: FilterFn | None = None,
        rounds: int = 1,
        min_epochs: int = 1,
        max_epochs: int | None = None,
        every_n_steps: int = 4,
        per_layer_norms: bool = False,
        parametrization: str = "balanced",
        method: str = "auto",
        metric: str | DataMetric = "weight",
        metric_maps: bool = False,
        regularizer: str | Regularizer | None = None,
        fold_maps: bool = True,
        monitor: str | None = None,
        max_accuracy_drop: float | None = None,
        mode: str = "max",
        guard_batches: int = 10,
        search_steps: int = 5,
        sweep_points: int = 8,
    ) -> None:
        if not isinstance(policy, RankPolicy):
            raise TypeError(f"`policy` must be a RankPolicy (EnergyRank, FixedRank, GlobalBudget, …), got {policy!r}")
        self._watch = TriggerWatch(trigger, every_n_steps, per_layer_norms)
        self.trigger, self.convergence = self._watch.kind, self._watch.convergence
        self.stable_ranks = self._watch.stable_ranks
        _check_int(min_epochs, "min_epochs", 0)
        _check_int(max_epochs, "max_epochs", 0, optional=True)
        if max_epochs is not None and max_epochs < min_epochs:
            raise ValueError(f"`max_epochs` ({max_epochs}) must be >= `min_epochs` ({min_epochs})")
        _check_int(rounds, "rounds", 1)
        if rounds > 1 and policy.knob is None:
            raise ValueError(f"`rounds`={rounds} needs a policy with a knob to spread over rounds; {policy!r} has none")
        if rounds > 1:
            policy.for_round(rounds, rounds)  # raises for a policy that cannot be spread over rounds
        if rounds > 1 and self.trigger == "stable_rank":
            raise ValueError(f"`rounds`={rounds}: the stable-rank trigger switches once; use rounds=1")
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"`parametrization` must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
        self.lmd = LMDProper(metric, metric_maps, regularizer, fold_maps)
        self.data_metric, self.metric_maps = self.lmd.data_metric, metric_maps
        self.regularizer, self.fold_maps = self.lmd.regularizer, fold_maps
        check_guard_arguments(monitor, max_accuracy_drop, mode, guard_batches, search_steps)
        _check_int(sweep_points, "sweep_points", 0)
        self.sweep_points = sweep_points
        self.sweep: list[dict[str, Any]] = []  # the last rank–accuracy sweep: knob, metric, params
        self.metric, self.max_accuracy_drop, self.mode = monitor, max_accuracy_drop, mode
        self.guard_batches, self.search_steps = guard_batches, search_steps
        self.guard: dict[str, Any] | None = None  # metric before/after and every trial of the search
        self._metric_checked = False
        self.per_layer_norms = per_layer_norms
        self.policy = policy
        self.include, self.exclude, self.filter_fn = include, exclude, filter_fn
        self.min_epochs, self.max_epochs, self.every_n_steps = min_epochs, max_epochs, every_n_steps
        self.parametrization, self.method = parametrization, method
        self.rounds = rounds
        self.compressed_epochs: list[int] = []  # the epoch of each round done
        self.reports: list[dict[str, Any]] = []  # CompressionReport.to_dict() of each compression
        self.failure: str | None = None  # why compression was abandoned, if it was
        self._schedule = Schedule(min_epochs, max_epochs, rounds, by_epoch=self.trigger == "epoch")  # set at setup
        self._lightning: Any = None  # pytorch_lightning or lightning.pytorch, set at setup
        self._strict = StrictLoadingHold()  # loose first load on resume, strict again after the rebuild

    # ---- Lightning hooks: each hands off to a private method ----

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._lightning = trainer_surgery.lightning_of(trainer)
        trainer_surgery.check_supported(trainer, pl_module)
        self._check_targets(pl_module)
        last = self.max_epochs if self.max_epochs is not None else default_last_epoch(self.min_epochs, trainer.max_epochs)
        if last is None and self.trigger != "epoch":
            self._warn("LMDCompression: the Trainer has no max_epochs, so compression is never forced")
        self._schedule = Schedule(self.min_epochs, last, self.rounds, by_epoch=self.trigger == "epoch")
        self._strict.take(pl_module)  # see StrictLoadingHold
        if trainer.loggers and stage == "fit":
            from lmd_lightning import tensorboard

            tensorboard.log_layout(trainer.loggers, self.metric)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        rebuilt = self._strict.reload(pl_module, checkpoint["state_dict"])
        if rebuilt:
            self._info(f"LMDCompression: rebuilt {len(rebuilt)} factored layers from the checkpoint")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._strict.give_back(pl_module)
        if not self.compressed:
            self._watch.fit_start(pl_module, lambda: self._target_weights(pl_module))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release(pl_module)  # also when no checkpoint was loaded

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release(pl_module)  # Lightning skips teardown on an exception

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self.round < self.rounds:
            self._watch.before_optimizer_step(trainer, optimizer, self._info)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.metric is not None and not trainer.sanity_checking and not self._metric_checked:
            self._check_metric(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.lmd.before_batch(trainer, pl_module)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lmd.after_backward(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.round < self.rounds and self.failure is None:
            self._watch.measure_epoch(trainer, pl_module, lambda: self._target_weights(pl_module), self._info)
        if self._due(trainer.current_epoch):
            self._compress(trainer, pl_module)
        self._watch.refresh(pl_module)  # swaps happen only above

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._watch.epoch_end(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lmd.at_train_end(trainer, pl_module, self._info, self._warn)
        if self.guard is not None and self.guard["after"] is not None and self.metric in trainer.callback_metrics:
            self._report_final(float(trainer.callback_metrics[self.metric]))
        if trainer.loggers:
            self._log_hparams(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {
            "compressed_epochs": self.compressed_epochs,
            "reports": self.reports,
            "failure": self.failure,
            "guard": self.guard,
            "sweep": self.sweep,
            **self._watch.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.compressed_epochs = list(state_dict["compressed_epochs"])
        self.reports, self.failure, self.guard = state_dict["reports"], state_dict["failure"], state_dict["guard"]
        self.sweep = state_dict["sweep"]
        self._watch.load_state_dict(state_dict)

    # ---- the work ----

    def _info(self, message: str) -> None:
        self._lightning.utilities.rank_zero_info(message)

    def _warn(self, message: str) -> None:
        self._lightning.utilities.rank_zero_warn(message)

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

    @property
    def round(self) -> int:
        """Compression rounds done so far."""
        return len(self.compressed_epochs)

    @property
    def compressed(self) -> bool:
        return self.round > 0

    @property
    def compressed_epoch(self) -> int | None:
        """The epoch of the latest round."""
        return self.compressed_epochs[-1] if self.compressed_epochs else None

    def _due(self, epoch: int) -> bool:
        return self.failure is None and self._schedule.due(epoch, self.compressed_epochs, self._watch.monitor.converged)

    def _target_weights(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        targets = find_targets(pl_module, self.include, self.exclude, self.filter_fn)
        return {t.name: layer_weight(t.module) for t in targets if t.skip_reason is None}

    def _check_metric(self, trainer: pl.Trainer) -> None:
        if self.metric not in trainer.callback_metrics:
            raise KeyError(
                f"LMDCompression `monitor` metric {self.metric!r} was not logged in validation; "
                f"available: {sorted(trainer.callback_metrics)}"
            )
        self._metric_checked = True

    def _compress(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        monitor = self._watch.monitor
        why = monitor.reason if monitor.converged else f"epoch {trainer.current_epoch} reached"
        record, before = undo_record(pl_module), trainer_surgery.snapshot(trainer)
        try:
            self.lmd.read_calibration(trainer)
            policy = self._choose_policy(trainer, pl_module, record)
            if policy is None:
                self.failure = f"accuracy guard: no setting keeps the drop within {self.max_accuracy_drop}"
                self._info(f"LMDCompression: model kept dense. {self.failure}; trials: {self.guard['trials']}")
                return
            report = self._apply(pl_module, policy)
            if self.metric:
                self.guard["after"] = trainer_surgery.evaluate(trainer, pl_module, self.metric, self.guard_batches)
            trainer_surgery.rebuild(trainer, before)
        except Exception as err:  # leave the dense model training as before, and say why
            undo(pl_module, record)
            trainer_surgery.restore(trainer, before)
            self.failure = f"{type(err).__name__}: {err}"
            self._warn(f"LMDCompression: compression failed, training continues dense. {self.failure}")
            return
        finally:
            self.lmd.drop_calibration()
        self._finish(trainer, report, why)

    def _apply(self, pl_module: pl.LightningModule, policy: RankPolicy) -> CompressionReport:
        return compress_(
            pl_module, policy, include=self.include, exclude=self.exclude, filter_fn=self.filter_fn,
            parametrization=self.parametrization, method=self.method,
            **self.lmd.compress_kwargs(),
        )

    def _release(self, pl_module: pl.LightningModule) -> None:
        """Leave the user's module as it was: strict loading given back, no hooks of ours left on it."""
        self._strict.give_back(pl_module)
        self.lmd.release()

    def _choose_policy(self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: dict) -> RankPolicy | None:
        """This round's policy; with a `monitor`, also the sweep, and the guard's search if asked for."""
        policy = self._watch.policy_for(self.policy.for_round(self.round + 1, self.rounds))
        if not self.metric:
            return policy
        outcome = measure_and_guard(
            policy,
            evaluate=lambda: trainer_surgery.evaluate(trainer, pl_module, self.metric, self.guard_batches),
            apply=lambda candidate: self._apply(pl_module, candidate),
            undo=lambda: undo(pl_module, record),
            max_drop=self.max_accuracy_drop, mode=self.mode, steps=self.search_steps, sweep_points=self.sweep_points,
        )
        self.guard, self.sweep = outcome.guard, outcome.sweep
        for line in outcome.describe(self.metric):
            self._info(f"LMDCompression guard: {line}")
        return outcome.policy

    def _finish(self, trainer: pl.Trainer, report: CompressionReport, why: str) -> None:
        self.compressed_epochs.append(trainer.current_epoch)
        guard = None if self.guard is None else {key: self.guard[key] for key in ("before", "after")}
        self.reports.append({**report.to_dict(), "epoch": trainer.current_epoch, "trigger": why, "guard": guard})
        self.convergence.reset()  # the next round waits for fine-tuning to re-converge
        where = f"round {self.round}/{self.rounds} at epoch {trainer.current_epoch}"
        self._info(f"LMDCompression: compressed, {where} ({why}).\n{report}")
        if self.guard is not None:
            self._info(
                f"LMDCompression: {self.metric} {self.guard['before']:.4f} before truncation, "
                f"{self.guard['after']:.4f} right after it (before fine-tuning)"
            )
        if trainer.loggers:
            from lmd_lightning import tensorboard  # matplotlib is imported only when something is logged

            tensorboard.log_compression(
                trainer.loggers, trainer.global_step, report, self.round, self.guard, self.sweep, self.metric
            )

    def _log_hparams(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lmd_lightning import tensorboard

        hparams = {
            "lmd/policy": repr(self.policy), "lmd/trigger": self.trigger, "lmd/rounds": self.rounds,
            "lmd/min_epochs": self.min_epochs, "lmd/parametrization": self.parametrization,
            **self.lmd.hparams(),
            "lmd/compressed_epochs": str(self.compressed_epochs),
        }
        ratio = self.reports[-1]["totals"]["compression_ratio"] if self.reports else 1.0
        value = trainer.callback_metrics.get(self.metric) if self.metric else None
        params = sum(p.numel() for p in pl_module.parameters())
        tensorboard.log_final(trainer.loggers, hparams, params, ratio, self.metric, value)

    def _report_final(self, value: float) -> None:
        self.guard["final"] = value
        self._info(
            f"LMDCompression: {self.metric} {self.guard['before']:.4f} dense, {self.guard['after']:.4f} right after "
            f"truncation, {value:.4f} after fine-tuning"
        )


class LMDCompression(LMDCompressionBase, Callback):
    __doc__ = LMDCompressionBase.__doc__
