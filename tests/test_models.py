"""The reference models: shapes, compression of every layer, optimizer factories, logging, checkpoints."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import omegaconf
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lmd_lightning import FixedRank, Guard, LMDCompression, compress_, load_compressed
from lmd_lightning.layers.conv import FactoredConv2d
from lmd_lightning.layers.linear import FactoredLinear
from lmd_lightning.models import Classifier, CNN1DClassifier, MLPClassifier, ResNetClassifier, TransformerClassifier

NUM_CLASSES = 3


def _resnet_layers(stages: int) -> list[str]:
    names = ["net.stem"]
    for i in range(stages):
        names += [f"net.stages.{i}.0.conv1", f"net.stages.{i}.0.conv2"] + [f"net.stages.{i}.0.shortcut.0"] * (i > 0)
    return names + ["net.head"]


# Tiny models, sized so that rank 2 is below every layer's break-even r < m·n/(m+n): all are factored.
TINY = {
    "mlp": (
        MLPClassifier,
        dict(in_features=12, widths=(8, 8), num_classes=NUM_CLASSES),
        (12,),
        ["net.fc1", "net.fc2", "net.head"],
    ),
    "cnn": (
        CNN1DClassifier,
        dict(in_features=16, channels=(4, 6), kernel_size=5, num_classes=NUM_CLASSES),
        (16,),
        ["net.conv1", "net.conv2", "net.head"],
    ),
    "transformer": (
        TransformerClassifier,
        dict(in_features=16, patch_size=4, dim=8, depth=2, heads=2, mlp_ratio=2, num_classes=NUM_CLASSES),
        (16,),
        ["net.embed"]
        + [
            f"net.blocks.{i}.{layer}"
            for i in range(2)
            for layer in ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2")
        ]
        + ["net.head"],
    ),
    "resnet": (
        ResNetClassifier,
        dict(in_channels=3, width=4, blocks=(1, 1, 1, 1), num_classes=NUM_CLASSES),
        (3, 8, 8),
        _resnet_layers(4),
    ),
}
MODELS = pytest.mark.parametrize("kind", list(TINY))


def tiny(kind: str, **overrides: Any) -> tuple[Classifier, tuple[int, ...]]:
    cls, kwargs, input_shape, _ = TINY[kind]
    return cls(**{**kwargs, **overrides}), input_shape


def data(input_shape: tuple[int, ...], n: int = 16) -> DataLoader:
    dataset = TensorDataset(torch.randn(n, *input_shape), torch.randint(0, NUM_CLASSES, (n,)))
    return DataLoader(dataset, batch_size=8)


def trainer(**kwargs: Any) -> pl.Trainer:
    defaults = dict(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def param_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


@MODELS
def test_forward_gives_one_logit_per_class(kind: str) -> None:
    model, input_shape = tiny(kind)
    assert model(torch.randn(5, *input_shape)).shape == (5, NUM_CLASSES)
    example_shape = (2, input_shape[0], 32, 32) if kind == "resnet" else (2, *input_shape)  # ResNet: CIFAR size
    assert model.example_input_array.shape == example_shape
    assert model(model.example_input_array).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize(
    ("cls", "kwargs", "params"),
    [
        (MLPClassifier, {}, 551_434),
        (MLPClassifier, dict(in_features=784, widths=(300, 100)), 266_610),  # LeNet-300-100
        (CNN1DClassifier, {}, 12_106),
        (TransformerClassifier, {}, 68_682),
        (ResNetClassifier, {}, 11_173_962),  # the CIFAR ResNet-18 of the literature
    ],
    ids=["mlp", "lenet-300-100", "cnn", "transformer", "resnet18"],
)
def test_default_sizes(cls: type[Classifier], kwargs: dict[str, Any], params: int) -> None:
    model = cls(**kwargs)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(model.example_input_array).shape == (2, 10)


def test_lenet_flattens_images() -> None:
    model = MLPClassifier(in_features=784, widths=(300, 100))
    assert model(torch.zeros(4, 1, 28, 28)).shape == (4, 10)


def test_cnn_convs_compute_the_1d_convolution() -> None:
    model = CNN1DClassifier(in_features=16, channels=(4,), kernel_size=5)
    x = torch.randn(3, 16)
    conv = model.net.conv1
    expected = torch.nn.functional.conv1d(x[:, None], conv.weight[:, :, 0], conv.bias, stride=2, padding=2)  # (B, 4, 8)
    torch.testing.assert_close(conv(model.net.unflatten(x))[:, :, 0], expected)


def test_self_attention_matches_multihead_attention() -> None:
    block = TransformerClassifier(in_features=16, dim=8, heads=2, num_classes=NUM_CLASSES).net.blocks[0].attn
    reference = nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([block.q.weight, block.k.weight, block.v.weight]))
        reference.in_proj_bias.copy_(torch.cat([block.q.bias, block.k.bias, block.v.bias]))
        reference.out_proj.weight.copy_(block.proj.weight)
        reference.out_proj.bias.copy_(block.proj.bias)
    x = torch.randn(3, 4, 8)  # (B, T, C)
    torch.testing.assert_close(block(x), reference(x, x, x, need_weights=False)[0])


def test_mlp_dropout_layers_only_when_asked() -> None:
    assert not any(isinstance(m, nn.Dropout) for m in MLPClassifier(widths=(8,)).modules())
    model = MLPClassifier(widths=(8, 8), dropout=0.5)
    assert isinstance(model.net.drop1, nn.Dropout) and model.net.drop2.p == 0.5


@MODELS
def test_fixed_rank_factors_every_layer(kind: str) -> None:
    model, input_shape = tiny(kind)
    expected = TINY[kind][3]
    dense = {name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert list(dense) == expected
    x = torch.randn(4, *input_shape)
    report = compress_(model, FixedRank(2))
    assert report.dense == [] and [layer.name for layer in report.compressed] == expected
    modules = dict(model.named_modules())
    for name, kind_before in dense.items():
        factored = FactoredLinear if kind_before is nn.Linear else FactoredConv2d
        assert isinstance(modules[name], factored) and modules[name].rank == 2, name
    assert model(x).shape == (4, NUM_CLASSES)


@MODELS
def test_configure_optimizers_builds_a_new_optimizer_over_the_current_parameters(kind: str) -> None:
    model, _ = tiny(kind)
    first, second = model.configure_optimizers(), model.configure_optimizers()
    assert first is not second and param_ids(first) == param_ids(second) == {id(p) for p in model.parameters()}
    compress_(model, FixedRank(2))
    after = model.configure_optimizers()
    assert param_ids(after) == {id(p) for p in model.parameters()} != param_ids(first)


def test_default_optimizer_is_adam_without_scheduler() -> None:
    optimizer = MLPClassifier(widths=(8,)).configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 1e-3


def test_optimizer_and_scheduler_factories_are_called() -> None:
    model = MLPClassifier(
        widths=(8,),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=3),
        scheduler_interval="step",
    )
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.1
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and scheduler.optimizer is optimizer
    assert config["lr_scheduler"]["interval"] == "step" and "monitor" not in config["lr_scheduler"]
    assert "optimizer" not in model.hparams and "scheduler" not in model.hparams


def test_plateau_scheduler_monitors_val_loss() -> None:
    model = MLPClassifier(widths=(8,), scheduler=partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=1))
    config = model.configure_optimizers()
    assert config["lr_scheduler"] == {
        "scheduler": config["lr_scheduler"]["scheduler"],
        "interval": "epoch",
        "monitor": "val_loss",
    }


@pytest.mark.parametrize(
    ("cls", "kwargs", "error", "match"),
    [
        (MLPClassifier, dict(scheduler_interval="batch"), ValueError, r"`scheduler_interval` must be one of"),
        (MLPClassifier, dict(optimizer="adam"), TypeError, r"`optimizer` must be a callable"),
        (MLPClassifier, dict(scheduler=0.1), TypeError, r"`scheduler` must be a callable"),
        (MLPClassifier, dict(widths=(8, 0)), ValueError, r"`widths` must be a sequence of ints >= 1, got \[8, 0\]"),
        (MLPClassifier, dict(widths=8), ValueError, r"`widths` must be a sequence"),
        (MLPClassifier, dict(in_features=0), ValueError, r"`in_features` must be an int >= 1, got 0"),
        (MLPClassifier, dict(num_classes=1), ValueError, r"`num_classes` must be an int >= 2, got 1"),
        (MLPClassifier, dict(dropout=1.0), ValueError, r"`dropout` must be a float in \[0, 1\), got 1.0"),
        (CNN1DClassifier, dict(channels=()), ValueError, r"`channels` must hold at least one int"),
        (CNN1DClassifier, dict(kernel_size=True), ValueError, r"`kernel_size` must be an int >= 1, got True"),
        (
            TransformerClassifier,
            dict(in_features=42),
            ValueError,
            r"`in_features` \(42\) must be a multiple of `patch_size` \(4\)",
        ),
        (TransformerClassifier, dict(dim=30, heads=4), ValueError, r"`dim` \(30\) must be a multiple of `heads` \(4\)"),
        (TransformerClassifier, dict(depth=0), ValueError, r"`depth` must be an int >= 1"),
        (TransformerClassifier, dict(dropout=-0.1), ValueError, r"`dropout` must be a float in \[0, 1\)"),
        (ResNetClassifier, dict(blocks=(2, 2, 0, 2)), ValueError, r"`blocks` must be a sequence of ints >= 1"),
        (ResNetClassifier, dict(width=0), ValueError, r"`width` must be an int >= 1, got 0"),
    ],
)
def test_bad_arguments_raise(cls: type[Classifier], kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        cls(**kwargs)


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(item) for item in value)
    return type(value) in (int, float, str, bool, type(None))


@pytest.mark.parametrize(
    ("cls", "arg"), [(MLPClassifier, "widths"), (CNN1DClassifier, "channels"), (ResNetClassifier, "blocks")]
)
def test_listconfig_arguments_become_plain_tuples(cls: type[Classifier], arg: str) -> None:
    model = cls(**{arg: omegaconf.ListConfig([1, 2])})
    assert type(model.hparams[arg]) is tuple and model.hparams[arg] == (1, 2)
    assert all(_plain(value) for value in model.hparams.values()), dict(model.hparams)


@MODELS
def test_fit_and_test_log_loss_and_accuracy(kind: str) -> None:
    model, input_shape = tiny(kind)
    loader = data(input_shape)
    t = trainer()
    t.fit(model, loader, loader)
    metrics = t.callback_metrics
    model.eval()
    with torch.no_grad():  # recomputed by hand: validation read the first batch (limit_val_batches=1)
        x, y = next(iter(loader))
        logits = model(x)
        all_x, all_y = loader.dataset.tensors
        all_logits = model(all_x)
    assert float(metrics["val_acc"]) == pytest.approx(float((logits.argmax(-1) == y).float().mean()), abs=1e-6)
    assert float(metrics["val_loss"]) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert math.isfinite(float(metrics["train_loss"])) and "train_acc" in metrics
    (results,) = t.test(model, loader, verbose=False)
    assert set(results) == {"test_loss", "test_acc"}
    assert results["test_acc"] == pytest.approx(float((all_logits.argmax(-1) == all_y).float().mean()), abs=1e-6)
    assert results["test_loss"] == pytest.approx(float(F.cross_entropy(all_logits, all_y)), rel=1e-5)


@MODELS
def test_compressed_checkpoint_loads_with_weights_only(kind: str, tmp_path: Path) -> None:
    model, input_shape = tiny(kind)
    loader = data(input_shape)
    t = trainer()
    t.fit(model, loader, loader)
    compress_(model, FixedRank(2))
    t.save_checkpoint(tmp_path / "c.ckpt")
    checkpoint = torch.load(tmp_path / "c.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"] == dict(model.hparams)
    loaded = load_compressed(type(model), tmp_path / "c.ckpt")
    modules = dict(loaded.named_modules())
    assert all(isinstance(modules[name], (FactoredLinear, FactoredConv2d)) for name in TINY[kind][3])
    x = torch.randn(4, *input_shape)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_callback_compresses_and_rebuilds_optimizer_and_scheduler() -> None:
    model, input_shape = tiny(
        "transformer",
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        scheduler_interval="step",
    )
    callback = LMDCompression(
        FixedRank(2), trigger="epoch", min_epochs=1, monitor="val_acc", guard=Guard(sweep_points=0)
    )
    loader = data(input_shape)
    t = trainer(max_epochs=2, callbacks=[callback])
    t.fit(model, loader, loader)
    assert callback.compressed and sorted(callback.ranks) == sorted(TINY["transformer"][3])
    assert isinstance(model.net.blocks[1].attn.q, FactoredLinear)
    (optimizer,), (config,) = t.optimizers, t.lr_scheduler_configs
    assert param_ids(optimizer) == {id(p) for p in model.parameters()}
    assert config.scheduler.optimizer is optimizer and config.interval == "step"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**4)  # 4 steps: the schedule carried on
