"""The callback's LMD options (LMD.md sections 3–6) and their work inside a fit: calibration batches
for data-metric truncation, the metric maps' penalty after each backward, folding at the end.
`LMDCompressionBase` holds one `LMDOptions` and hands these parts to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl

from lmd_lightning.callback import surgery
from lmd_lightning.checks import check_bool
from lmd_lightning.lmd.regularize import Regularizer, RegularizerRun
from lmd_lightning.truncate.calibration import Calibration, DataMetric
from lmd_lightning.truncate.loss_metric import LossMetric
from lmd_lightning.truncate.maps import fold_, metric_map_layers
from lmd_lightning.truncate.targets import undo, undo_record

__all__ = ["CALLBACK_METRICS", "LMDOptions", "truncation_settings"]

CALLBACK_METRICS = ("loss", "data", "weight")


def truncation_settings(metric: str | DataMetric | LossMetric) -> DataMetric | LossMetric | None:
    """The callback's `metric`: None for "weight", the settings for "data" / "loss" or a DataMetric / LossMetric."""
    if isinstance(metric, (DataMetric, LossMetric)):
        return metric
    if metric == "loss":
        return LossMetric()
    if metric in ("weight", "data"):
        return DataMetric.of(metric)
    raise ValueError(f"`metric` must be one of {CALLBACK_METRICS}, a DataMetric or a LossMetric, got {metric!r}")


class LMDOptions:
    """Validated LMD options and their work inside a fit: calibration, the penalty, the fold."""

    def __init__(
        self,
        metric: str | DataMetric | LossMetric,
        metric_maps: bool,
        regularizer: str | Regularizer | None,
        fold_maps: bool,
    ) -> None:
        self.data_metric = truncation_settings(metric)  # DataMetric, LossMetric, or None for "weight"
        check_bool(metric_maps, "metric_maps")
        check_bool(fold_maps, "fold_maps")
        self.metric_maps, self.fold_maps = metric_maps, fold_maps
        self.regularizer = Regularizer.of(regularizer)
        if self.regularizer is not None and not metric_maps:
            raise ValueError(
                f"`regularizer`={self.regularizer.kind!r} acts on the metric maps: it needs metric_maps=True"
            )
        self._run = RegularizerRun(self.regularizer) if self.regularizer is not None else None
        self.calibration: Calibration | None = None  # the batches of the compression under way
        self._settings: DataMetric | LossMetric | None = None  # with the step's loss or forward filled in

    def compress_kwargs(self) -> dict[str, Any]:
        """What `compress_` needs from these options."""
        return {"metric": self._settings or "weight", "calibration": self.calibration, "metric_maps": self.metric_maps}

    def read_calibration(self, trainer: pl.Trainer) -> None:
        if self.data_metric is not None:
            self._settings, self.calibration = surgery.calibration(trainer, self.data_metric)

    def drop_calibration(self) -> None:
        self.calibration = self._settings = None  # do not keep the batches alive between rounds

    def before_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._run is not None and self._run.due(trainer.global_step):
            self._run.arm(metric_map_layers(pl_module))

    def after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Add the penalty's gradient: per accumulated batch, AMP-scaled like the loss, averaged over processes."""
        if self._run is None or not self._run.due(trainer.global_step):
            return
        layers = self._run.layers  # found once per step, in before_batch
        if not layers:
            self._run.disarm()
            return
        value = self._run.add_gradients(
            layers,
            scale=1.0 / trainer.accumulate_grad_batches,
            loss_scale=surgery.loss_scale(trainer),  # the task loss's gradients carry it
            reduce=lambda grad: trainer.strategy.reduce(grad, reduce_op="mean"),
        )
        if value is not None:
            pl_module.log(f"lmd/reg/{self.regularizer.kind}", value, on_step=True, on_epoch=True)

    def release(self) -> None:
        """No hooks of ours left on the user's module."""
        if self._run is not None:
            self._run.disarm()

    def at_train_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        info: Callable[[str], None],
        warn: Callable[[str], None],
    ) -> None:
        """Fold the maps into the factors, then rebuild the optimizers so that they hold no dropped map."""
        self.release()
        if not self.fold_maps or not metric_map_layers(pl_module):
            return
        record, before = undo_record(pl_module), surgery.snapshot(trainer)
        try:
            folded = fold_(pl_module)
            surgery.rebuild(trainer, before)
        except Exception as err:  # e.g. a diverged run's non-finite factors: keep the maps, say why
            undo(pl_module, record)
            surgery.restore(trainer, before)
            warn(f"LMDCompression: the metric maps were left unfolded. {type(err).__name__}: {err}")
            return
        info(f"LMDCompression: folded the metric maps of {len(folded)} layers into their factors")

    def hparams(self) -> dict[str, Any]:
        return {
            "lmd/metric": "weight" if self.data_metric is None else repr(self.data_metric),
            "lmd/metric_maps": self.metric_maps,
            "lmd/regularizer": repr(self.regularizer),
        }
