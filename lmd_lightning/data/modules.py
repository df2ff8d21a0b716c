"""LightningDataModules for the recipes: MNIST-1D, scikit-learn's digits and a synthetic task offline,
MNIST/CIFAR-10 online.

MNIST-1D is generated locally by the `mnist1d` package (no network) and cached; the 8×8 digits
ship inside scikit-learn; the synthetic teacher task is generated in milliseconds. MNIST and
CIFAR-10 come from torchvision with its real `download=True` path, for users who have a network;
offline and without the files they raise an error that says what to do.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, random_split

from lmd_lightning.checks import check_int
from lmd_lightning.data.digits import check_split_fractions, load_digits_splits
from lmd_lightning.data.mnist1d import Split, default_data_dir, load_mnist1d
from lmd_lightning.data.synthetic import teacher_classification

__all__ = ["DigitsDataModule", "MNIST1DDataModule", "TeacherDataModule", "TorchvisionDataModule"]


class _DataModule(pl.LightningDataModule):
    """Loaders over `self.datasets` ("train", "val", "test"), the training one shuffled with a seed."""

    num_classes: int
    input_shape: tuple[int, ...]

    def __init__(self, batch_size: int, seed: int, num_workers: int = 0) -> None:
        super().__init__()
        check_int(batch_size, "batch_size", 1)
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.datasets: dict[str, Dataset] = {}

    def _loader(self, name: str, shuffle: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.datasets[name],
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class _SplitsDataModule(_DataModule, abc.ABC):
    """Train/val/test from in-memory Splits, features standardized with the training statistics."""

    @abc.abstractmethod
    def _make_splits(self) -> dict[str, Split]:
        """The raw train/val/test splits."""

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        splits = self._make_splits()
        train = splits["train"].x.flatten(1)  # per-feature statistics, also for image-shaped inputs
        mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
        self.datasets = {
            name: TensorDataset(((s.x.flatten(1) - mean) / std).reshape(s.x.shape), s.y) for name, s in splits.items()
        }


class MNIST1DDataModule(_SplitsDataModule):
    """MNIST-1D (Greydanus 2020): 40-sample 1-D digits, 10 classes, generated locally and cached."""

    num_classes = 10
    input_shape = (40,)

    def __init__(
        self,
        data_dir: str | Path | None = None,  # cache folder; None: $LMD_DATA_DIR or ~/.cache/lmd_lightning
        batch_size: int = 100,
        val_fraction: float = 0.1,  # held out from the 4,000 training samples
        num_samples: int = 5000,  # the generator's default: 4,000 train + 1,000 official test
        seed: int = 42,  # the generator's default seed; also seeds the training shuffle
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction!r}")
        check_int(num_samples, "num_samples", 1)
        self.data_dir, self.val_fraction, self.num_samples = data_dir, val_fraction, num_samples

    def prepare_data(self) -> None:
        load_mnist1d(self.data_dir, self.num_samples, self.seed, self.val_fraction)  # generates and caches once

    def _make_splits(self) -> dict[str, Split]:
        return load_mnist1d(self.data_dir, self.num_samples, self.seed, self.val_fraction)


class DigitsDataModule(_SplitsDataModule):
    """scikit-learn's 1,797 real handwritten 8×8 digits, 10 classes, in a stratified seeded split.

    Defaults: 60% train / 20% val / 20% test, rounded per class (1,079 / 359 / 359). `image=True` gives (1, 8, 8)
    images for convolutional models, else 64 features. Standardized with the training statistics.
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        seed: int = 0,  # the split's and the training shuffle's seed
        image: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        if not isinstance(image, bool):
            raise ValueError(f"`image` must be a bool, got {image!r}")
        check_int(seed, "seed", 0)
        self.val_fraction, self.test_fraction = check_split_fractions(val_fraction, test_fraction)
        self.image, self.input_shape = image, (1, 8, 8) if image else (64,)

    def prepare_data(self) -> None:
        load_digits_splits(self.val_fraction, self.test_fraction, self.seed)  # fails early without scikit-learn

    def _make_splits(self) -> dict[str, Split]:
        splits = load_digits_splits(self.val_fraction, self.test_fraction, self.seed)
        return {name: Split(s.x.reshape(-1, *self.input_shape), s.y) for name, s in splits.items()}


class TeacherDataModule(_SplitsDataModule):
    """A synthetic task labelled by a random low-rank teacher network: fast, for tests and smoke runs.

    `input_shape` (e.g. [1, 28, 28]) reshapes the `dim = prod(input_shape)` features into images,
    so image recipes can be smoke-run without their dataset: `data=synthetic data.input_shape=[3,32,32]`.
    """

    def __init__(
        self,
        n: int = 2048,
        dim: int = 32,
        classes: int = 4,
        rank: int = 4,
        batch_size: int = 128,
        seed: int = 0,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(batch_size, seed)
        if input_shape is not None:
            input_shape = tuple(input_shape)
            for size in input_shape:
                check_int(size, "input_shape", 1)
            dim = math.prod(input_shape)
        for value, arg in ((n, "n"), (dim, "dim"), (classes, "classes"), (rank, "rank")):
            check_int(value, arg, 1)
        self.n, self.dim, self.classes, self.rank = n, dim, classes, rank
        self.num_classes, self.input_shape = classes, input_shape or (dim,)

    def _make_splits(self) -> dict[str, Split]:
        splits = teacher_classification(self.n, self.dim, self.classes, self.rank, self.seed)
        return {name: Split(s.x.reshape(-1, *self.input_shape), s.y) for name, s in splits.items()}


TORCHVISION = {"mnist": ("MNIST", 10, (1, 28, 28)), "cifar10": ("CIFAR10", 10, (3, 32, 32))}


class TorchvisionDataModule(_DataModule):
    """MNIST or CIFAR-10 through torchvision, downloaded on first use when a network is there.

    The validation split is the last `val_size` images of the training set (fixed seed); the
    official test set is kept for test.
    """

    def __init__(
        self,
        name: str = "mnist",
        data_dir: str | Path | None = None,
        batch_size: int = 128,
        val_size: int = 5000,
        download: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        if name not in TORCHVISION:
            raise ValueError(f"`name` must be one of {sorted(TORCHVISION)}, got {name!r}")
        super().__init__(batch_size, seed, num_workers)
        check_int(val_size, "val_size", 1)
        self.name, self.val_size = name, val_size
        self.data_dir = Path(data_dir or default_data_dir())
        self.download = download
        _, self.num_classes, self.input_shape = TORCHVISION[name]

    def _dataset(self, train: bool) -> Dataset:
        try:
            import torchvision
        except ImportError as err:
            raise ImportError(
                f"TorchvisionDataModule({self.name!r}) needs torchvision: install the build that matches your torch "
                "(https://pytorch.org/get-started/locally/), or use the offline MNIST-1D data (data=mnist1d)"
            ) from err
        cls = getattr(torchvision.datasets, TORCHVISION[self.name][0])
        transform = torchvision.transforms.ToTensor()
        try:
            return cls(str(self.data_dir), train=train, download=self.download, transform=transform)
        except (RuntimeError, OSError) as err:  # "Dataset not found", or no network during download
            raise RuntimeError(
                f"{TORCHVISION[self.name][0]} is not in {self.data_dir} and could not be downloaded ({err}). "
                f"Run once with a network (download=True), or copy the torchvision files into {self.data_dir}, "
                "or use the offline MNIST-1D data (data=mnist1d)."
            ) from err

    def prepare_data(self) -> None:
        self._dataset(train=True)
        self._dataset(train=False)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        full = self._dataset(train=True)
        sizes = [len(full) - self.val_size, self.val_size]
        train, val = random_split(full, sizes, generator=torch.Generator().manual_seed(self.seed))
        self.datasets = {"train": train, "val": val, "test": self._dataset(train=False)}
