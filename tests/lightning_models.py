"""A tiny LightningModule and data for the callback tests (unmodified user code: no lmd imports)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lmd_lightning.data import teacher_classification


class LitMLP(pl.LightningModule):
    def __init__(
        self,
        width: int = 64,
        lr: float = 0.05,
        optimizer: str = "sgd",
        scheduler: str = "cosine",
        interval: str = "epoch",
        max_epochs: int = 6,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=0.01)
        if hp.scheduler == "none":
            return opt
        steps = hp.max_epochs * (16 if hp.interval == "step" else 1)
        if hp.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        else:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, steps // 3), gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": hp.interval}}


def loaders(batch_size: int = 128, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Train (2048·0.8 = 1638 samples → 13 batches of 128) and validation loaders, fixed order."""
    data = teacher_classification(seed=seed)
    train = DataLoader(TensorDataset(data["train"].x, data["train"].y), batch_size=batch_size)
    val = DataLoader(TensorDataset(data["val"].x, data["val"].y), batch_size=256)
    return train, val


def trainer(max_epochs: int, callbacks: list, **kwargs) -> pl.Trainer:
    defaults = dict(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
    )
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})
