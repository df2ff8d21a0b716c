"""LMDCompression: compress at convergence, then keep training (the fine-tuning phase).

The trigger's monitor is fed in `trigger.py`, rounds are timed by `schedule.py`, the monitored
metric and the accuracy guard are in `guard.py`, rounds="auto" in `ladder.py` (decisions) and
`climb.py` (its steps in a fit), the LMD options in `lmd_options.py`, and every
touch of Lightning internals (optimizer rebuild, DDP re-wrap, evaluation) in `surgery.py`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from typing_extensions import override

from lmd_lightning.callback import surgery
from lmd_lightning.callback.checkpoint import StrictLoadingHold
from lmd_lightning.callback.climb import LadderSteps
from lmd_lightning.callback.guard import GUARD_KEYWORDS, Guard, GuardRecord, GuardRun, SweepPoint, guard_from_keywords
from lmd_lightning.callback.ladder import AUTO, Rung
from lmd_lightning.callback.lmd_options import LMDOptions
from lmd_lightning.callback.schedule import Schedule, check_rounds, default_last_epoch
from lmd_lightning.callback.trigger import TriggerWatch
from lmd_lightning.checks import check_choice
from lmd_lightning.layers import METHODS, PARAMETRIZATIONS
from lmd_lightning.layers.registry import split_of
from lmd_lightning.lmd.regularize import Regularizer
from lmd_lightning.monitors import ConvergenceMonitor, StableRankMonitor
from lmd_lightning.truncate.calibration import DataMetric, layer_weight
from lmd_lightning.truncate.compress import JOINT_WITH_MAPS, compress_
from lmd_lightning.truncate.loss_metric import LossMetric
from lmd_lightning.truncate.policies import RankPolicy
from lmd_lightning.truncate.report import CompressionReport
from lmd_lightning.truncate.targets import TIED, FilterFn, Patterns, find_targets, undo, undo_record

__all__ = ["LMDCompression", "LMDCompressionBase"]

# Type checkers see the hooks' real base, so that `@override` is checked against Callback; at run time
# the base is mixed into `pytorch_lightning`'s or `lightning.pytorch`'s Callback by the subclass.
_Hooks = Callback if TYPE_CHECKING else object


class LMDCompressionBase(LadderSteps, _Hooks):
    """Truncate dense layers by SVD once training has converged, then fine-tune the factored model.

    Args:
        policy: how many singular values each layer keeps (EnergyRank, GlobalBudget, …).
        trigger: "grad_norm" (‖∇L‖ into a ConvergenceMonitor(), its epoch-mean criterion),
            "stable_rank" (Cuttlefish's switch, one round only), "epoch" (compress exactly at
            `min_epochs`, Pufferfish), or a configured ConvergenceMonitor / StableRankMonitor.
        include / exclude / filter_fn: which layers, as in `compress_`.
        tied: "dense" keeps a head tied to its embedding dense and tied; "joint" factors the pair
            with one shared set of factors, as in `compress_` (not with `metric_maps`).
        rounds: compress iteratively, `policy.for_round(k, rounds)` in round k; or "auto": a
            validated ladder (ladder.py) that compresses in rungs, fine-tunes and validates each on
            the whole validation set, keeps the last rung within `guard.max_drop` of the dense
            `monitor`, rolls back those that are not and bisects between kept and rejected
            with the rung slots left. `policy` is the most aggressive
            setting allowed; needs `monitor`, `Guard(max_drop=...)` and a policy with a knob.
        min_epochs: dense epochs before compression may happen.
        max_epochs: the epoch at which compression is forced; None: two thirds of the Trainer's.
        every_n_steps: measure ‖∇L‖ every this many optimizer steps.
        per_layer_norms: also keep and log each layer's gradient norm.
        parametrization / method: passed to `compress_`.
        metric: where each layer is truncated and ranks are costed. "loss" (the default) / a
            LossMetric: in the loss's K-FAC metric, from forward and backward passes of
            `training_step` on a few training batches, so that `GlobalBudget` compares layers by
            the loss each component is worth; "data" / a DataMetric: in the metric of each layer's
            inputs; "weight": Eckart–Young on each weight, no data.
        metric_maps / regularizer / fold_maps: LMD's learnable I_dist, O_dist, their penalty, and
            folding them into the factors at the end of training.
        monitor: a metric `validation_step` logs, measured right before and right after truncation
            and in the rank–accuracy sweep. `mode`: "max" if higher is better, "min" if lower.
        guard: how that is measured, and the accuracy guard: `Guard(max_drop=0.01)` bisects the
            policy's knob to the most compressive setting whose one-shot drop stays within 0.01.

    Example::

        trainer = pl.Trainer(max_epochs=30, callbacks=[
            LMDCompression(GlobalBudget(params=0.2), exclude="head", monitor="val_acc", guard=Guard(max_drop=0.01))
        ])

    After fit: `ranks`, `reports` (one `CompressionReport.to_dict()` per round; with rounds="auto"
    each carries its rung's "ladder" record), `compressed_epochs`, `guard_record` and `sweep` (with a
    `monitor`), `ladder` (rounds="auto"), and `failure` (why compression was abandoned).
    The README ("Use it in Lightning") says what happens at each step and what is logged.
    """

    def __init__(
        self,
        policy: RankPolicy,
        trigger: str | ConvergenceMonitor | StableRankMonitor = "grad_norm",
        include: Patterns = None,
        exclude: Patterns = None,
        filter_fn: FilterFn | None = None,
        rounds: int | str = 1,
        min_epochs: int = 1,
        max_epochs: int | None = None,
        every_n_steps: int = 4,
        per_layer_norms: bool = False,
        parametrization: str = "balanced",
        method: str = "auto",
        metric: str | DataMetric | LossMetric = "loss",
        metric_maps: bool = False,
        regularizer: str | Regularizer | None = None,
        fold_maps: bool = True,
        monitor: str | None = None,
        mode: str = "max",
        guard: Guard | None = None,
        tied: str = "dense",
        **deprecated: Any,
    ) -> None:
        unknown = sorted(set(deprecated) - set(GUARD_KEYWORDS))
        if unknown:
            raise TypeError(f"LMDCompression got unexpected keyword arguments {unknown}")
        if not isinstance(policy, RankPolicy):
            raise TypeError(f"`policy` must be a RankPolicy (EnergyRank, FixedRank, GlobalBudget, …), got {policy!r}")
        self._watch = TriggerWatch(trigger, every_n_steps, per_layer_norms)
        auto = rounds == AUTO
        if isinstance(rounds, str) and not auto:
            raise ValueError(f"`rounds` must be a positive int or 'auto', got {rounds!r}")
        check_rounds(policy, self._watch.kind == "stable_rank", 1 if auto else rounds, min_epochs, max_epochs)
        check_choice(parametrization, "parametrization", PARAMETRIZATIONS)
        check_choice(method, "method", METHODS)
        check_choice(tied, "tied", TIED)
        if tied == "joint" and metric_maps:
            raise ValueError(JOINT_WITH_MAPS)
        self.lmd = LMDOptions(metric, metric_maps, regularizer, fold_maps)
        self._guarding = GuardRun(monitor, mode, guard_from_keywords(guard, deprecated, monitor))
        self._ladder = self._check_auto(policy, tied) if auto else None

        self.trigger, self.convergence = self._watch.kind, self._watch.convergence
        self.stable_ranks = self._watch.stable_ranks
        self.data_metric, self.metric_maps = self.lmd.data_metric, metric_maps
        self.regularizer, self.fold_maps = self.lmd.regularizer, fold_maps
        self.policy, self.rounds = policy, rounds
        self.include, self.exclude, self.filter_fn, self.tied = include, exclude, filter_fn, tied
        self.min_epochs, self.max_epochs, self.every_n_steps = min_epochs, max_epochs, every_n_steps
        self.per_layer_norms, self.parametrization, self.method = per_layer_norms, parametrization, method

        self.compressed_epochs: list[int] = []  # the epoch of each round done
        self.reports: list[dict[str, Any]] = []  # CompressionReport.to_dict() of each compression
        self.failure: str | None = None  # why compression was abandoned, if it was
        self._schedule = Schedule(min_epochs, max_epochs, self._rounds, by_epoch=self.trigger == "epoch")  # at setup
        self._lightning: Any = None  # pytorch_lightning or lightning.pytorch, set at setup
        self._strict = StrictLoadingHold()  # loose first load on resume, strict again after the rebuild

    # ---- what it did ----

    @property
    def monitor(self) -> str | None:
        """The validation metric measured around each truncation."""
        return self._guarding.monitor

    @property
    def mode(self) -> str:
        return self._guarding.mode

    @property
    def guard(self) -> Guard:
        return self._guarding.guard

    @property
    def metric(self) -> str | None:
        """Deprecated: the monitored metric's name is `monitor` (`metric` is the truncation's "weight" or "data")."""
        warnings.warn(
            "LMDCompression.metric is deprecated; use LMDCompression.monitor", DeprecationWarning, stacklevel=2
        )
        return self.monitor

    @property
    def guard_record(self) -> GuardRecord | None:
        """The monitored metric around the last compression: before, right after, after fine-tuning, trials."""
        return self._guarding.record

    @property
    def sweep(self) -> list[SweepPoint]:
        """The last rank–accuracy sweep."""
        return self._guarding.sweep

    @property
    def ladder(self) -> list[Rung]:
        """rounds="auto": every rung so far, with its parameters, validated metric and decision."""
        return [] if self._ladder is None else list(self._ladder.rungs)

    @property
    def dense_value(self) -> float | None:
        """rounds="auto": the dense reference each rung must hold (see ladder.py)."""
        return None if self._ladder is None else self._ladder.dense

    def _standing(self) -> dict[str, Any] | None:
        """The report of the compression the model stands on now (rolled-back rungs skipped)."""
        standing = [r for r in self.reports if (r.get("ladder") or {}).get("decision") != "rolled back"]
        return standing[-1] if standing else None

    @property
    def ranks(self) -> dict[str, int]:
        """Layer name → rank after the last compression (with rounds="auto": of the rung kept)."""
        report = self._standing()
        if report is None:
            return {}
        return {layer["name"]: layer["rank"] for layer in report["layers"] if layer["rank"] is not None}

    @property
    def compression_ratio(self) -> float:
        """Whole-model parameters before the first compression over those now."""
        report = self._standing()
        if report is None:
            return 1.0
        return self.reports[0]["totals"]["model_params_before"] / report["totals"]["model_params_after"]

    @property
    def round(self) -> int:
        """Compression rounds done so far."""
        return len(self.compressed_epochs)

    @property
    def compressed(self) -> bool:
        if self._ladder is not None:
            return self._standing() is not None
        return self.round > 0

    @property
    def _rounds(self) -> int:
        """The rounds the schedule plans: the ladder's first rung only is the schedule's."""
        return 1 if self.rounds == AUTO else self.rounds

    def _watching(self) -> bool:
        if self._ladder is not None:
            return not self._ladder.finished and self.failure is None
        return self.round < self.rounds

    @property
    def compressed_epoch(self) -> int | None:
        """The epoch of the latest round."""
        return self.compressed_epochs[-1] if self.compressed_epochs else None

    # ---- Lightning hooks: each hands off to a private method ----

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._lightning = surgery.lightning_of(trainer)
        surgery.check_supported(trainer, pl_module)
        self._check_targets(pl_module)
        self._set_schedule(trainer)
        self._strict.take(pl_module)  # see StrictLoadingHold
        if trainer.loggers and stage == "fit":
            from lmd_lightning.callback import logs  # matplotlib and tensorboard load only when something is logged

            logs.log_layout(trainer.loggers, self.monitor)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        rebuilt = self._strict.reload(pl_module, checkpoint["state_dict"])
        if rebuilt:
            self._info(f"LMDCompression: rebuilt {len(rebuilt)} factored layers from the checkpoint")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._strict.give_back(pl_module)
        if not self.compressed:
            self._watch.fit_start(pl_module, lambda: self._target_weights(pl_module))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release(pl_module)  # also when no checkpoint was loaded

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release(pl_module)  # Lightning skips teardown on an exception

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._watching():
            self._watch.before_optimizer_step(trainer, optimizer, self._info)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._guarding.check_logged(trainer.callback_metrics)
            ladder, full = self._ladder, trainer.limit_val_batches
            if ladder is not None and not ladder.finished and isinstance(full, float) and full == 1.0:
                value = surgery.mean_over_processes(trainer, float(trainer.callback_metrics[self.monitor]))
                ladder.observe(trainer.current_epoch, value)  # the same on every process, synced or not

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.lmd.before_batch(trainer, pl_module)
        if self._watching():
            self._watch.before_batch(trainer, batch)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lmd.after_backward(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._watching() and self.failure is None:
            self._watch.measure_epoch(trainer, pl_module, lambda: self._target_weights(pl_module), self._info)
        if self._ladder is not None:
            self._climb(trainer, pl_module)
        elif self._due(trainer.current_epoch):
            self._compress(trainer, pl_module)
        self._watch.refresh(pl_module)  # swaps happen only above

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._watch.epoch_end(pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._ladder is not None and self._ladder.pending is not None:
            self._validate_rung(trainer, pl_module, last=True)  # a rung the run ended in must hold too
            if self._ladder.rungs[-1].decision == "rolled back":
                self._warn(
                    "LMDCompression ladder: the run ended during a rung (EarlyStopping or max_steps?), which was "
                    "rolled back after the last checkpoint was written: that checkpoint holds the rejected rung; "
                    "save the model again (trainer.save_checkpoint) to keep the rung it was rolled back to"
                )
        self.lmd.at_train_end(trainer, pl_module, self._info, self._warn)
        record = self.guard_record
        if record is not None and record.after is not None and self.monitor in trainer.callback_metrics:
            self._report_final(float(trainer.callback_metrics[self.monitor]))
        if trainer.loggers:
            from lmd_lightning.callback import logs

            logs.log_final(trainer, pl_module, self)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "compressed_epochs": self.compressed_epochs,
            "reports": self.reports,
            "failure": self.failure,
            **self._guarding.state_dict(),
            **self._watch.state_dict(),
            "ladder": None if self._ladder is None else self._ladder.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.compressed_epochs = list(state_dict["compressed_epochs"])
        self.reports, self.failure = state_dict["reports"], state_dict["failure"]
        self._guarding.load_state_dict(state_dict)
        self._watch.load_state_dict(state_dict)
        if self._ladder is not None and state_dict.get("ladder") is not None:
            self._ladder.load_state_dict(state_dict["ladder"])

    # ---- the work ----

    def _info(self, message: str) -> None:
        self._lightning.utilities.rank_zero_info(message)

    def _warn(self, message: str) -> None:
        self._lightning.utilities.rank_zero_warn(message)

    def _set_schedule(self, trainer: pl.Trainer) -> None:
        last = (
            self.max_epochs if self.max_epochs is not None else default_last_epoch(self.min_epochs, trainer.max_epochs)
        )
        if last is None and self.trigger != "epoch":
            self._warn("LMDCompression: the Trainer has no max_epochs, so compression is never forced")
        if self._ladder is not None and (trainer.max_epochs is None or trainer.max_epochs < 0):
            raise ValueError("LMDCompression(rounds='auto') times its rungs by the Trainer's epochs: set max_epochs")
        self._schedule = Schedule(self.min_epochs, last, self._rounds, by_epoch=self.trigger == "epoch")

    def _check_targets(self, pl_module: pl.LightningModule) -> None:
        targets = find_targets(pl_module, self.include, self.exclude, self.filter_fn, self.tied)
        if not any(t.skip_reason is None for t in targets) and not any(map(split_of, pl_module.modules())):
            names = [name for name, _ in pl_module.named_modules() if name]
            raise ValueError(
                "LMDCompression found no layer it can factor (Linear, Conv1d, Conv2d, Hugging Face Conv1D, "
                f"MultiheadAttention; Embedding when included); the modules are: {names}"
            )

    def _due(self, epoch: int) -> bool:
        return self.failure is None and self._schedule.due(epoch, self.compressed_epochs, self._watch.monitor.converged)

    def _target_weights(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        targets = find_targets(pl_module, self.include, self.exclude, self.filter_fn)
        return {t.name: layer_weight(t.module) for t in targets if t.skip_reason is None}

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        return surgery.evaluate(trainer, pl_module, self.monitor, self.guard.batches)

    def _compress(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        monitor = self._watch.monitor
        why = monitor.reason if monitor.converged else f"epoch {trainer.current_epoch} reached"
        record, before = undo_record(pl_module), surgery.snapshot(trainer)
        try:
            self.lmd.read_calibration(trainer)
            policy = self._choose_policy(trainer, pl_module, record)
            if policy is None:
                self.failure = f"accuracy guard: no setting keeps the drop within {self.guard.max_drop}"
                trials = [vars(trial) for trial in self.guard_record.trials]
                self._info(f"LMDCompression: model kept dense. {self.failure}; trials: {trials}")
                return
            report = self._apply(pl_module, policy)
            surgery.check_training_step(trainer, pl_module)  # a swap never leaves a model that cannot train
            if self._guarding.record is not None and self._ladder is None:
                self._guarding.record.after = self._evaluate(trainer, pl_module)
            surgery.rebuild(trainer, before)
        except Exception as err:  # leave the dense model training as before, and say why
            undo(pl_module, record)
            surgery.restore(trainer, before)
            self.failure = f"{type(err).__name__}: {err}"
            state = (
                "dense" if self._ladder is None or self._ladder.kept.rung == 0 else f"at rung {self._ladder.kept.rung}"
            )
            self._warn(f"LMDCompression: compression failed, training continues {state}. {self.failure}")
            return
        finally:
            self.lmd.drop_calibration()
        self._finish(trainer, report, why)

    def _apply(self, pl_module: pl.LightningModule, policy: RankPolicy) -> CompressionReport:
        return compress_(
            pl_module,
            policy,
            include=self.include,
            exclude=self.exclude,
            filter_fn=self.filter_fn,
            tied=self.tied,
            parametrization=self.parametrization,
            method=self.method,
            **self.lmd.compress_kwargs(),
        )

    def _release(self, pl_module: pl.LightningModule) -> None:
        """Leave the user's module as it was: strict loading given back, no hooks of ours left on it."""
        self._strict.give_back(pl_module)
        self.lmd.release()
        self._watch.release()

    def _choose_policy(self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: dict) -> RankPolicy | None:
        """This round's policy; with a `monitor`, also the sweep, and the guard's search if asked for.

        With rounds="auto" the ladder's rung is the policy: it is validated after fine-tuning instead.
        """
        if self._ladder is not None:
            return self._ladder.policy(self.policy)
        return self._guarding.choose(
            self._watch.policy_for(self.policy.for_round(self.round + 1, self.rounds)),
            evaluate=lambda: self._evaluate(trainer, pl_module),
            apply=lambda candidate: self._apply(pl_module, candidate),
            undo=lambda: undo(pl_module, record),
            info=self._info,
        )

    def _finish(self, trainer: pl.Trainer, report: CompressionReport, why: str) -> None:
        self.compressed_epochs.append(trainer.current_epoch)
        record = self.guard_record
        guard = None if record is None else {"before": record.before, "after": record.after}
        entry = {**report.to_dict(), "epoch": trainer.current_epoch, "trigger": why, "guard": guard}
        if self._ladder is not None:
            dense_params = (
                self.reports[0]["totals"]["model_params_before"] if self.reports else report.model_params_before
            )
            rung = self._ladder.add(
                trainer.current_epoch,
                self._ladder.policy(self.policy).knob_value,
                report.model_params_after,
                dense_params,
            )
            entry["ladder"] = dataclasses.asdict(rung)
            why = f"{why}; ladder rung {rung.rung}/{self._ladder.plan.rungs}"
        self.reports.append(entry)
        self.convergence.reset()  # the next round waits for fine-tuning to re-converge
        where = f"round {self.round}/{self.rounds} at epoch {trainer.current_epoch}"
        if self._ladder is not None:
            where = f"at epoch {trainer.current_epoch}"
        self._info(f"LMDCompression: compressed, {where} ({why}).\n{report}")
        if record is not None:
            self._info(
                f"LMDCompression: {self.monitor} {record.before:.4f} before truncation, "
                f"{record.after:.4f} right after it (before fine-tuning)"
            )
        if trainer.loggers:
            from lmd_lightning.callback import logs

            logs.log_compression(
                trainer.loggers, trainer.global_step, report, self.round, record, self.sweep, self.monitor
            )

    def _report_final(self, value: float) -> None:
        record = self._guarding.record
        record.final = value
        self._info(
            f"LMDCompression: {self.monitor} {record.before:.4f} dense, {record.after:.4f} right after "
            f"truncation, {value:.4f} after fine-tuning"
        )


class LMDCompression(LMDCompressionBase, Callback):
    __doc__ = LMDCompressionBase.__doc__
