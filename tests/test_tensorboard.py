"""What reaches TensorBoard and other loggers, read back from the files they wrote."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmd_lightning import EnergyRank, Guard, LMDCompression, StableRank
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
    assert value["lmd/macs"] == report["totals"]["macs_after"] < report["totals"]["macs_before"]
    assert [e.value for e in events.Scalars("lmd/round")] == [1.0]  # one event, at the one round
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


def test_stable_rank_trigger_logs_each_layers_stable_rank_until_it_compresses(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    logger = CSVLogger(tmp_path, name="run", version=0)
    callback = LMDCompression(StableRank(), trigger="stable_rank", min_epochs=1, max_epochs=2, exclude="net.4")
    train, val = loaders()
    trainer(4, [callback], logger=logger).fit(LitMLP(max_epochs=4), train, val)
    rows = list(csv.DictReader(open(tmp_path / "run" / "version_0" / "metrics.csv")))
    logged = [row for row in rows if row.get("lmd/stable_rank/net.0")]
    # Measured at the starts of epochs 1 and 2 (on the weights epochs 0 and 1 left); compressed at 2.
    assert callback.compressed_epochs == [2] and len(logged) == 2
    assert float(logged[-1]["lmd/stable_rank/net.0"]) == pytest.approx(callback.stable_ranks.latest["net.0"], rel=1e-5)
    assert float(logged[-1]["lmd/stable_rank/net.2"]) == pytest.approx(callback.stable_ranks.latest["net.2"], rel=1e-5)
    assert float(logged[-1]["lmd/stable_rank_change"]) == pytest.approx(callback.stable_ranks.change, rel=1e-5)


def test_without_a_logger_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No logger: no files, and neither the scalars nor the figures are even built."""
    from lmd_lightning.callback import logs

    called = []
    for name in ("log_layout", "log_compression", "log_final"):
        monkeypatch.setattr(logs, name, lambda *a, _name=name, **k: called.append(_name))
    monkeypatch.chdir(tmp_path)
    callback = fit_logged(False, sweep_points=2)
    assert callback.compressed and callback.sweep  # it measured and swept, and logged none of it
    assert called == [] and list(tmp_path.iterdir()) == []
