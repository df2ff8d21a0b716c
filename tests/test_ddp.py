"""DDP with 2 CPU processes (gloo): identical factors at the swap, identical weights after fine-tuning."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lmd_lightning import DataMetric, EnergyRank, FactoredLinear, Guard, LMDCompression, Regularizer, StableRankMonitor
from tests.lightning_models import LitMLP, loaders, trainer

pytestmark = [pytest.mark.ddp, pytest.mark.slow]


class SaveOnEveryRank(pl.Callback):
    """Writes each rank's weights right after the swap and at the end of training."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.directory / f"{tag}_rank{trainer.global_rank}.pt")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            isinstance(pl_module.net[0], FactoredLinear)
            and not (self.directory / f"swap_rank{trainer.global_rank}.pt").exists()
        ):
            self._save(trainer, pl_module, "swap")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "end")


LMD_OPTIONS = {  # each process sees different batches: moments and penalty gradients must be reduced
    "metric=data + laplacian": dict(
        metric=DataMetric(batches=3),
        metric_maps=True,
        fold_maps=False,
        regularizer=Regularizer("laplacian", lmd_lambda=1.0, points=32, k=4),
    ),
    "identity": dict(metric_maps=True, fold_maps=False, regularizer=Regularizer("identity", lmd_lambda=1.0)),
    # the stable ranks are measured on each process; the decision to compress is reduced across them
    "trigger=stable_rank": dict(trigger=StableRankMonitor(tol=0.9, patience=1), min_epochs=1),
    # the ladder's rung is validated on every process's share of the validation set, reduced
    "rounds=auto": dict(rounds="auto", monitor="val_acc", guard=Guard(max_drop=1.0)),
}


@pytest.mark.parametrize("options", ["plain", *LMD_OPTIONS])
def test_ddp_two_processes_stay_identical(tmp_path: Path, options: str) -> None:
    pl.seed_everything(0, verbose=False)
    model = LitMLP(max_epochs=4)
    callback = LMDCompression(
        EnergyRank(0.8), exclude="net.4", **{"trigger": "epoch", "min_epochs": 2, **LMD_OPTIONS.get(options, {})}
    )
    train, val = loaders()
    t = trainer(4, [callback, SaveOnEveryRank(tmp_path)], strategy="ddp_spawn", devices=2)
    t.fit(model, train, val)
    for tag in ("swap", "end"):
        rank0 = torch.load(tmp_path / f"{tag}_rank0.pt", weights_only=True)
        rank1 = torch.load(tmp_path / f"{tag}_rank1.pt", weights_only=True)
        assert "net.0.U" in rank0 and rank0.keys() == rank1.keys()
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), f"{tag}: {key} differs between ranks"
    start = torch.load(tmp_path / "swap_rank0.pt", weights_only=True)
    end = torch.load(tmp_path / "end_rank0.pt", weights_only=True)
    assert not torch.equal(start["net.0.U"], end["net.0.U"])  # the factors were trained after the swap
    if LMD_OPTIONS.get(options, {}).get("metric_maps"):
        assert not torch.equal(start["net.0.I_dist"], end["net.0.I_dist"])  # and so were the maps
