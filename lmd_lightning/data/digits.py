"""scikit-learn's handwritten digits (UCI optdigits test set): 1,797 real 8×8 images, offline.

The images ship inside the scikit-learn wheel (`sklearn.datasets.load_digits`), so no network
is needed. Each pixel is a count 0–16 of the ink in a 4×4 block of a 32×32 bitmap. The set has
no official split; `load_digits_splits` draws a stratified one: per class, a seeded permutation
puts `val_fraction` of the class into validation, `test_fraction` into test and the rest into
training, so every split holds every digit in proportion.
"""

from __future__ import annotations

import numpy as np
import torch

from lmd_lightning.checks import check_int
from lmd_lightning.data.mnist1d import Split

__all__ = ["check_split_fractions", "load_digits_splits"]


def check_split_fractions(val_fraction: float, test_fraction: float) -> tuple[float, float]:
    """Both in (0, 1), with their sum below 1 so that training data remain; returns them as floats."""
    for value, arg in ((val_fraction, "val_fraction"), (test_fraction, "test_fraction")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ValueError(f"`{arg}` must be a float in (0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"`val_fraction` + `test_fraction` must be below 1 to leave training data, got "
            f"{val_fraction} + {test_fraction}"
        )
    return float(val_fraction), float(test_fraction)


def load_digits_splits(val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0) -> dict[str, Split]:
    """{"train", "val", "test"} splits of the 1,797 digits, stratified by class; x is (N, 64) float32 in 0–16."""
    val_fraction, test_fraction = check_split_fractions(val_fraction, test_fraction)
    check_int(seed, "seed", 0)
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "the digits data needs scikit-learn, which ships the images: pip install scikit-learn "
            "(or the package's `digits` extra: pip install -e '.[digits]')"
        ) from err
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        n_val, n_test = round(len(members) * val_fraction), round(len(members) * test_fraction)
        parts["val"].append(members[:n_val])
        parts["test"].append(members[n_val : n_val + n_test])
        parts["train"].append(members[n_val + n_test :])
    splits = {}
    for name, chunks in parts.items():
        index = np.sort(np.concatenate(chunks))
        splits[name] = Split(
            torch.as_tensor(x[index], dtype=torch.float32), torch.as_tensor(y[index], dtype=torch.int64)
        )
    return splits
