"""The MNIST-1D reference models as the recipes build them, for the benchmarks that train them."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODEL_CONFIGS = {"mlp": "mlp", "cnn": "cnn1d", "transformer": "transformer"}
WIDTH_KEY = {"mlp": "widths", "cnn": "channels", "transformer": "dim"}  # what `width` narrows or widens


def build(model: str, quick: bool, width: int | None = None) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """The recipe's model (configs/model) and the MNIST-1D data module; `width` replaces every hidden width."""
    cfg = OmegaConf.load(CONFIGS / "model" / f"{MODEL_CONFIGS[model]}.yaml")
    if width is not None:
        key = WIDTH_KEY[model]
        cfg[key] = width if key == "dim" else [width] * len(cfg[key])
    data_cfg = OmegaConf.load(CONFIGS / "data" / "mnist1d.yaml")
    data_cfg.data_dir = None  # $LMD_DATA_DIR or the user cache
    if quick:
        data_cfg.num_samples = 1000
    return instantiate(cfg), instantiate(data_cfg)


def trainer(epochs: int, callbacks: list, validate_at_end_only: bool = False) -> pl.Trainer:
    """A quiet CPU Trainer; `validate_at_end_only`: no sanity check, one validation after the last epoch."""
    only_end = dict(check_val_every_n_epoch=max(epochs, 1), num_sanity_val_steps=0) if validate_at_end_only else {}
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        deterministic=True,
        **only_end,
    )


def mean_std(values: list[float]) -> str:
    """`mean ± std` to one decimal (the mean alone for one value)."""
    spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1f}{spread}"
