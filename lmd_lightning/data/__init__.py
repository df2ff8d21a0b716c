"""Datasets that work offline: MNIST-1D generated locally, and synthetic data."""

from lmd_lightning.data.mnist1d import Split, load_mnist1d
from lmd_lightning.data.synthetic import teacher_classification

__all__ = ["Split", "load_mnist1d", "teacher_classification"]
