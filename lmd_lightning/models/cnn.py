"""CNN1DClassifier: a small strided 1-D convolutional network for MNIST-1D."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from lmd_lightning.checks import check_int
from lmd_lightning.models.classifier import Classifier, OptimizerFactory, SchedulerFactory, as_int_tuple

__all__ = ["CNN1DClassifier"]


def _conv_length(length: int, kernel_size: int, stride: int = 2) -> int:
    """Output length of a conv with padding k//2 on each side."""
    return (length + 2 * (kernel_size // 2) - kernel_size) // stride + 1


class CNN1DClassifier(Classifier):
    """Unflatten → [Conv (1×k, stride 2) → ReLU] per channel count → Flatten → Linear head.

    The convolutions are 1-D over the signal but built as nn.Conv2d with kernel (1, k) on
    the input seen as (B, 1, 1, L), which computes exactly the map of an nn.Conv1d. This dates
    from before nn.Conv1d was a layer kind, and is kept so that the recipes' published results
    stay comparable; users' own nn.Conv1d layers factor as FactoredConv1d.

    Layers: `net.unflatten`, `net.conv1`, `net.act1`, `net.conv2`, …, `net.flatten`, `net.head`.
    Each conv halves the length (40 → 20 → 10 → 5 with the defaults).

    Args:
        in_features: signal length L (40 for MNIST-1D); the input is (B, L).
        channels: output channels of each conv, input side first.
        kernel_size: kernel width k of every conv.
        num_classes: number of classes (outputs of the head).
        optimizer, scheduler, scheduler_interval: see `Classifier`.
    """

    def __init__(
        self,
        in_features: int = 40,
        channels: Sequence[int] = (32, 32, 32),
        kernel_size: int = 5,
        num_classes: int = 10,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
    ) -> None:
        super().__init__(optimizer, scheduler, scheduler_interval)
        check_int(in_features, "in_features")
        channels = as_int_tuple(channels, "channels")
        check_int(kernel_size, "kernel_size")
        check_int(num_classes, "num_classes", low=2)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])

        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["unflatten"] = nn.Unflatten(1, (1, 1, in_features))  # (B, L) → (B, 1, 1, L)
        in_channels, length = 1, in_features
        for i, out_channels in enumerate(channels, start=1):
            layers[f"conv{i}"] = nn.Conv2d(
                in_channels, out_channels, (1, kernel_size), stride=(1, 2), padding=(0, kernel_size // 2)
            )  # (B, C_in, 1, L) → (B, C_out, 1, L')
            layers[f"act{i}"] = nn.ReLU()
            in_channels, length = out_channels, _conv_length(length, kernel_size)
        layers["flatten"] = nn.Flatten()  # (B, C·L')
        layers["head"] = nn.Linear(in_channels * length, num_classes)  # (B, num_classes)
        self.net = nn.Sequential(layers)
        self.example_input_array = torch.zeros(2, in_features)
