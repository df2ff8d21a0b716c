from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from lmd_lightning.data import MNIST1DDataModule, TeacherDataModule, TorchvisionDataModule, load_mnist1d


def test_mnist1d_generated_offline_split_and_cached(tmp_path: Path) -> None:
    dm = MNIST1DDataModule(data_dir=tmp_path, batch_size=100)
    dm.prepare_data()
    assert (tmp_path / "mnist1d_n5000_seed42.npz").exists()
    dm.setup("fit")
    sizes = {name: len(ds) for name, ds in dm.datasets.items()}
    assert sizes == {"train": 3600, "val": 400, "test": 1000}  # the official 1,000 test samples kept apart
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 40) and y.dtype == torch.int64 and int(y.max()) <= 9
    train_x = dm.datasets["train"].tensors[0]
    torch.testing.assert_close(train_x.mean(0), torch.zeros(40), atol=1e-4, rtol=0)  # standardized on train
    torch.testing.assert_close(train_x.std(0), torch.ones(40), atol=1e-3, rtol=0)
    # The cache is what a second load reads: same tensors, no regeneration.
    raw = load_mnist1d(tmp_path)
    torch.testing.assert_close(raw["test"].y, dm.datasets["test"].tensors[1])


def test_mnist1d_shuffle_is_seeded(tmp_path: Path) -> None:
    first, second = MNIST1DDataModule(tmp_path), MNIST1DDataModule(tmp_path)
    first.setup(), second.setup()
    loader = first.train_dataloader()
    epoch_1, epoch_2 = next(iter(loader))[0], next(iter(loader))[0]
    torch.testing.assert_close(epoch_1, next(iter(second.train_dataloader()))[0])  # same seed, same order
    in_order = first.datasets["train"].tensors[0][: len(epoch_1)]
    assert not torch.equal(epoch_1, in_order)  # shuffled, not the stored order
    assert not torch.equal(epoch_1, epoch_2)  # and reshuffled every epoch


def test_teacher_data_module() -> None:
    dm = TeacherDataModule(n=500, dim=8, classes=3, rank=2, batch_size=50)
    dm.setup()
    assert {name: len(ds) for name, ds in dm.datasets.items()} == {"train": 400, "val": 50, "test": 50}
    assert dm.num_classes == 3 and dm.input_shape == (8,)
    assert set(dm.datasets["train"].tensors[1].unique().tolist()) <= {0, 1, 2}


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MNIST1DDataModule(val_fraction=1.0), r"`val_fraction` must be in \(0, 1\), got 1.0"),
        (lambda: MNIST1DDataModule(batch_size=0), r"`batch_size` must be an int >= 1, got 0"),
        (lambda: TeacherDataModule(rank=0), r"`rank` must be an int >= 1, got 0"),
        (lambda: TorchvisionDataModule("imagenet"), r"`name` must be one of \['cifar10', 'mnist'\], got 'imagenet'"),
    ],
)
def test_invalid_arguments(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_torchvision_missing_says_what_to_do(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="needs torchvision: install the build that matches your torch"):
        TorchvisionDataModule("mnist").prepare_data()


def test_offline_without_files_says_what_to_do(monkeypatch, tmp_path: Path) -> None:
    seen = {}

    class OfflineMNIST:
        def __init__(self, root: str, train: bool, download: bool, transform) -> None:
            seen.update(root=root, download=download)
            raise RuntimeError("Dataset not found. You can use download=True to download it")

    fake = types.SimpleNamespace(
        datasets=types.SimpleNamespace(MNIST=OfflineMNIST), transforms=types.SimpleNamespace(ToTensor=lambda: None)
    )
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    with pytest.raises(RuntimeError, match=r"MNIST is not in .* could not be downloaded .* use the offline MNIST-1D"):
        TorchvisionDataModule("mnist", data_dir=tmp_path).prepare_data()
    assert seen == {"root": str(tmp_path), "download": True}  # the real download path was taken


def test_teacher_data_module_image_shaped() -> None:
    dm = TeacherDataModule(n=200, classes=10, input_shape=[1, 4, 6], batch_size=20)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (20, 1, 4, 6) and dm.input_shape == (1, 4, 6) and dm.dim == 24
    train_x = dm.datasets["train"].tensors[0].flatten(1)
    torch.testing.assert_close(train_x.mean(0), torch.zeros(24), atol=1e-4, rtol=0)  # standardized per pixel
    with pytest.raises(ValueError, match="`input_shape`"):
        TeacherDataModule(input_shape=[3, 0, 32])
