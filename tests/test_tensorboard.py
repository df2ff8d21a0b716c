"""What reaches TensorBoard and other loggers, read back from the files they wrote."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmd_lightning import EnergyRank, Guard, LMDCompression
from tests.lightning_models import LitMLP, loaders, trainer


def fit_logged(logger, **kwargs) -> LMDCompression:
    pl.seed_everything(0, verbose=False)
    callback = LMDCompression(
        EnergyRank(0.6),
        trigger="epoch",
        min_epochs=1,
        exclude="net.4",
        monitor="val_acc",
        guard=Guard(batches=1, **kwargs),
    )
    train, val = loaders()
    trainer(2, [callback], logger=logger).fit(LitMLP(max_epochs=2), train, val)
    return callback


def test_tensorboard_gets_scalars_sweep_spectra_and_layout(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    callback = fit_logged(logger, sweep_points=4)
    events = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()
    value = {tag: events.Scalars(tag)[-1].value for tag in tags["scalars"]}
    ranks = callback.ranks
    assert ranks and all(value[f"lmd/rank/{name}"] == rank for name, rank in ranks.items())
    report = callback.reports[0]
    assert value["lmd/params"] == report["totals"]["model_params_after"]
    assert value["lmd/compression_ratio"] == pytest.approx(report["totals"]["compression_ratio"], rel=1e-6)
    assert value["lmd/metric_before"] == pytest.approx(callback.guard_record.before, rel=1e-6)
    assert value["lmd/metric_after"] == pytest.approx(callback.guard_record.after, rel=1e-6)
    assert "lmd/grad_norm_ema" not in value  # trigger="epoch" measures no gradient norm
    sweep = events.Scalars("lmd/sweep/val_acc")
    assert len(sweep) == 4 and sorted(s.step for s in sweep) == sorted(p.params for p in callback.sweep)
    assert {"lmd/spectra", "lmd/rank_accuracy_sweep"} <= set(tags["images"])
    assert {"lmd/singular_values/net.0", "lmd/singular_values/net.2"} <= set(tags["histograms"])
    assert "custom_scalars__config__" in tags["tensors"]  # the Custom Scalars layout
    # hparams at the end: the final metric replaces Lightning's hp_metric = -1 placeholder.
    assert value["hp_metric"] == pytest.approx(value["lmd/final_val_acc"]) and value["hp_metric"] > 0
    assert value["lmd/final_params"] == report["totals"]["model_params_after"]


def test_csv_logger_gets_the_scalars(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="run", version=0)
    callback = fit_logged(logger, sweep_points=0)
    rows = list(csv.DictReader(open(tmp_path / "run" / "version_0" / "metrics.csv")))
    logged = [row for row in rows if row.get("lmd/rank/net.0")]
    assert len(logged) == 1 and float(logged[0]["lmd/rank/net.0"]) == callback.ranks["net.0"]
    assert callback.sweep == []  # sweep_points=0 turns it off
