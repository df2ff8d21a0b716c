"""Datasets that work offline: MNIST-1D generated locally, scikit-learn's 8×8 digits, and synthetic data."""

from lmd_lightning.data.digits import load_digits_splits
from lmd_lightning.data.mnist1d import Split, load_mnist1d
from lmd_lightning.data.modules import DigitsDataModule, MNIST1DDataModule, TeacherDataModule, TorchvisionDataModule
from lmd_lightning.data.synthetic import teacher_classification

__all__ = [
    "DigitsDataModule",
    "MNIST1DDataModule",
    "Split",
    "TeacherDataModule",
    "TorchvisionDataModule",
    "load_digits_splits",
    "load_mnist1d",
    "teacher_classification",
]
