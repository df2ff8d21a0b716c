"""Classifier: the LightningModule base of the reference models that the Hydra recipes train.

A subclass builds `self.net` (batch → logits), sets `example_input_array` and calls
`self.save_hyperparameters(ignore=["optimizer", "scheduler"])` once its list-like arguments
are plain tuples, so that a checkpoint's `hyper_parameters` load with `weights_only=True`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from lmd_lightning.checks import check_choice, check_unit_interval

__all__ = ["INTERVALS", "Classifier", "OptimizerFactory", "SchedulerFactory", "as_int_tuple", "check_dropout"]

OptimizerFactory = Callable[..., torch.optim.Optimizer]  # optimizer(params)
SchedulerFactory = Callable[..., LRScheduler]  # scheduler(optimizer)
INTERVALS = ("epoch", "step")


def as_int_tuple(value: object, arg: str, allow_empty: bool = False) -> tuple[int, ...]:
    """A plain tuple of ints >= 1 from any sequence, omegaconf's ListConfig included.

    Hydra hands lists over as ListConfig, which `torch.load(weights_only=True)` refuses to
    unpickle: hyper-parameters must be stored as builtins.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"`{arg}` must be a sequence of ints >= 1, got {value!r}")
    items = tuple(value)
    if not items and not allow_empty:
        raise ValueError(f"`{arg}` must hold at least one int >= 1, got {value!r}")
    if any(isinstance(item, bool) or not isinstance(item, int) or item < 1 for item in items):
        raise ValueError(f"`{arg}` must be a sequence of ints >= 1, got {list(items)!r}")
    return tuple(int(item) for item in items)


def check_dropout(value: object, arg: str = "dropout") -> float:
    """A dropout probability in [0, 1), as a float."""
    return float(check_unit_interval(value, arg, closed_low=True))


class Classifier(pl.LightningModule):
    """Cross-entropy training of `self.net`, with accuracy, and optimizers from factories.

    Args:
        optimizer: `optimizer(params)` → Optimizer, e.g. a Hydra `_partial_: true` config or
            `functools.partial(torch.optim.SGD, lr=0.1)`; None: Adam with lr 1e-3.
        scheduler: `scheduler(optimizer)` → LRScheduler; None: a constant learning rate.
            A ReduceLROnPlateau monitors `val_loss`.
        scheduler_interval: when the scheduler steps, "epoch" or "step".

    Logs `train_loss`/`train_acc`, `val_loss`/`val_acc` and `test_loss`/`test_acc`
    (accuracy as a fraction in [0, 1]), each weighted by batch size over the epoch.
    """

    net: nn.Module  # built by the subclass: (B, ...) → (B, num_classes)

    def __init__(
        self,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
    ) -> None:
        super().__init__()
        for arg, factory in (("optimizer", optimizer), ("scheduler", scheduler)):
            if factory is not None and not callable(factory):
                raise TypeError(f"`{arg}` must be a callable factory (e.g. functools.partial) or None, got {factory!r}")
        check_choice(scheduler_interval, "scheduler_interval", INTERVALS)
        # Kept as factories, never as built objects: LMDCompression re-runs configure_optimizers
        # after swapping modules, and the new optimizer must see the new parameters.
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, num_classes)

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch  # (B, ...), (B,)
        logits = self(x)  # (B, num_classes)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=-1) == y).float().mean()
        training = stage == "train"
        # Validation and test metrics are epoch means; averaged over processes under DDP.
        options = {"on_step": training, "on_epoch": True, "batch_size": y.shape[0], "sync_dist": not training}
        self.log(f"{stage}_loss", loss, prog_bar=training, **options)
        self.log(f"{stage}_acc", acc, prog_bar=stage == "val", **options)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        """A new optimizer (and scheduler) over the current parameters on every call."""
        if self.optimizer_factory is None:
            optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        else:
            optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.scheduler_interval}
        if isinstance(scheduler, ReduceLROnPlateau):
            config["monitor"] = "val_loss"  # Lightning refuses a plateau scheduler without one
        return {"optimizer": optimizer, "lr_scheduler": config}
