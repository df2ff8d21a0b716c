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


def mean_std(values: list[float]) -> str:
    """`mean ± std` to one decimal (the mean alone for one value)."""
    spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1f}{spread}"
