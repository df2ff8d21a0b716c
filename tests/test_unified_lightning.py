"""The twin callback for the unified `lightning` package (skipped when it is not installed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

L = pytest.importorskip("lightning.pytorch")

from lmd_lightning import FactoredLinear, FixedRank, Guard, load_compressed  # noqa: E402
from lmd_lightning.lightning import LMDCompression  # noqa: E402
from tests.lightning_models import loaders  # noqa: E402


class UnifiedMLP(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch[0]).argmax(-1) == batch[1]).float().mean())

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, 3)}


def test_unified_trainer_compresses_checkpoints_and_reloads(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = UnifiedMLP()
    callback = LMDCompression(
        FixedRank(8), trigger="epoch", min_epochs=1, exclude="net.4", monitor="val_acc", guard=Guard(max_drop=0.5)
    )
    checkpoint = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, checkpoint],
    )
    train, val = loaders()
    trainer.fit(model, train, val)
    assert isinstance(model.net[0], FactoredLinear) and callback.compressed_epochs == [1]
    assert callback.guard_record.before - callback.guard_record.after <= 0.5
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}
    loaded = load_compressed(UnifiedMLP, tmp_path / "last.ckpt")
    x = torch.randn(4, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x))
