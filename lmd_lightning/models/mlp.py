"""MLPClassifier: fully connected ReLU layers, the classic target of low-rank compression."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from lmd_lightning.checks import check_int
from lmd_lightning.models.classifier import Classifier, OptimizerFactory, SchedulerFactory, as_int_tuple, check_dropout

__all__ = ["MLPClassifier"]


class MLPClassifier(Classifier):
    """Flatten → [Linear → ReLU (→ Dropout)] per width → Linear head.

    Layers: `net.flatten`, then `net.fc1`, `net.act1`, (`net.drop1`), `net.fc2`, … and
    `net.head`, so `exclude="net.head"` keeps the classifier dense. The input is flattened,
    so MNIST's LeNet-300-100 is `MLPClassifier(in_features=784, widths=(300, 100))` on
    (B, 1, 28, 28) images.

    Args:
        in_features: features per sample once flattened (40 for MNIST-1D).
        widths: hidden layer widths, input side first; empty for a linear classifier.
        num_classes: number of classes (outputs of the head).
        dropout: dropout probability after each hidden ReLU, in [0, 1); 0 adds no Dropout.
        optimizer, scheduler, scheduler_interval: see `Classifier`.
    """

    def __init__(
        self,
        in_features: int = 40,
        widths: Sequence[int] = (512, 512, 512),
        num_classes: int = 10,
        dropout: float = 0.0,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
    ) -> None:
        super().__init__(optimizer, scheduler, scheduler_interval)
        check_int(in_features, "in_features")
        widths = as_int_tuple(widths, "widths", allow_empty=True)
        check_int(num_classes, "num_classes", low=2)
        dropout = check_dropout(dropout)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])

        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())  # (B, ...) → (B, in_features)
        fan_in = in_features
        for i, width in enumerate(widths, start=1):
            layers[f"fc{i}"] = nn.Linear(fan_in, width)  # (B, fan_in) → (B, width)
            layers[f"act{i}"] = nn.ReLU()
            if dropout > 0:
                layers[f"drop{i}"] = nn.Dropout(dropout)
            fan_in = width
        layers["head"] = nn.Linear(fan_in, num_classes)  # (B, fan_in) → (B, num_classes)
        self.net = nn.Sequential(layers)
        self.example_input_array = torch.zeros(2, in_features)
