"""Datasets that work offline: MNIST-1D generated locally, and synthetic data."""

from lmd_lightning.data.mnist1d import Split, load_mnist1d
from lmd_lightning.data.modules import MNIST1DDataModule, TeacherDataModule, TorchvisionDataModule
from lmd_lightning.data.synthetic import teacher_classification

__all__ = [
    "MNIST1DDataModule",
    "Split",
    "TeacherDataModule",
    "TorchvisionDataModule",
    "load_mnist1d",
    "teacher_classification",
]
