"""MNIST-1D (Greydanus 2020), generated locally by the `mnist1d` package: no network needed.

The generator's default arguments (5,000 samples of length 40, seed 42) give the official
4,000/1,000 train/test split. We hold out the last `val_fraction` of the training set for
validation and keep the official test set for the final report only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["Split", "default_data_dir", "load_mnist1d"]


@dataclass(frozen=True)
class Split:
    x: Tensor  # (N, 40) float32
    y: Tensor  # (N,) int64


def default_data_dir() -> Path:
    """$LMD_DATA_DIR, else ~/.cache/lmd_lightning."""
    return Path(os.environ.get("LMD_DATA_DIR", Path.home() / ".cache" / "lmd_lightning"))


def _generate(num_samples: int, seed: int) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    data = make_dataset(args)
    return {key: np.asarray(data[key]) for key in ("x", "y", "x_test", "y_test")}


def load_mnist1d(
    data_dir: str | Path | None = None, num_samples: int = 5000, seed: int = 42, val_fraction: float = 0.1
) -> dict[str, Split]:
    """{"train", "val", "test"} splits, generated once and cached as .npz under `data_dir`."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction!r}")
    path = Path(data_dir or default_data_dir()) / f"mnist1d_n{num_samples}_seed{seed}.npz"
    if path.exists():
        arrays = dict(np.load(path))
    else:
        arrays = _generate(num_samples, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)
    x, y = torch.as_tensor(arrays["x"], dtype=torch.float32), torch.as_tensor(arrays["y"], dtype=torch.int64)
    n_val = round(len(x) * val_fraction)
    test = Split(
        torch.as_tensor(arrays["x_test"], dtype=torch.float32), torch.as_tensor(arrays["y_test"], dtype=torch.int64)
    )
    return {"train": Split(x[:-n_val], y[:-n_val]), "val": Split(x[-n_val:], y[-n_val:]), "test": test}
