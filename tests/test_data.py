from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from lmd_lightning.data import (
    DigitsDataModule,
    MNIST1DDataModule,
    TeacherDataModule,
    TorchvisionDataModule,
    load_digits_splits,
    load_mnist1d,
)


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
        (lambda: DigitsDataModule(val_fraction=0.0), r"`val_fraction` must be a float in \(0, 1\), got 0.0"),
        (lambda: DigitsDataModule(test_fraction=True), r"`test_fraction` must be a float in \(0, 1\), got True"),
        (lambda: DigitsDataModule(val_fraction=0.5, test_fraction=0.5), r"must be below 1 .* got 0.5 \+ 0.5"),
        (lambda: DigitsDataModule(image="yes"), r"`image` must be a bool, got 'yes'"),
        (lambda: DigitsDataModule(seed=-1), r"`seed` must be an int >= 0, got -1"),
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


def test_digits_split_is_stratified_disjoint_complete_and_seeded() -> None:
    splits = load_digits_splits()
    assert {name: len(s.y) for name, s in splits.items()} == {"train": 1079, "val": 359, "test": 359}
    rows = torch.cat([s.x for s in splits.values()])
    assert rows.shape == (1797, 64) and rows.min() == 0 and rows.max() == 16  # ink counts of 4×4 blocks
    from sklearn.datasets import load_digits

    every = torch.as_tensor(load_digits().data, dtype=torch.float32)  # a partition: each image exactly once
    assert all(
        torch.equal(a, b)
        for a, b in zip(torch.unique(rows, dim=0, return_counts=True), torch.unique(every, dim=0, return_counts=True))
    )
    class_sizes = torch.cat([s.y for s in splits.values()]).bincount()
    for s, share in ((splits["val"], 0.2), (splits["test"], 0.2)):
        assert (s.y.bincount(minlength=10) - class_sizes * share).abs().max() <= 0.5  # each class rounded
    again, other = load_digits_splits(), load_digits_splits(seed=1)
    assert torch.equal(again["val"].x, splits["val"].x) and not torch.equal(other["val"].x, splits["val"].x)


def test_digits_module_standardizes_with_training_statistics_and_shapes_images() -> None:
    flat, image = DigitsDataModule(batch_size=32), DigitsDataModule(batch_size=32, image=True)
    flat.setup(), image.setup()
    train = flat.datasets["train"].tensors[0]
    assert flat.input_shape == (64,) and flat.num_classes == 10
    constant = train.std(0) == 0  # border pixels that are blank in every training image
    assert torch.allclose(train.mean(0), torch.zeros(64), atol=1e-5)
    assert torch.allclose(train.std(0)[~constant], torch.ones(int((~constant).sum())), atol=1e-4)
    x, y = next(iter(image.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and image.input_shape == (1, 8, 8) and y.dtype == torch.int64
    assert torch.equal(image.datasets["val"].tensors[0].flatten(1), flat.datasets["val"].tensors[0])


def test_digits_without_scikit_learn_says_what_to_do(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"needs scikit-learn, which ships the images: pip install scikit-learn"):
        DigitsDataModule().prepare_data()
