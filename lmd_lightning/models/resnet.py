"""ResNetClassifier: the CIFAR-style ResNet-18 (He et al. 2016) for 32×32 images.

CIFAR-style: the stem is one 3×3 conv with stride 1 and no max-pool, so a 32×32 image
still has 4×4 positions in the last stage (ImageNet's 7×7 stride-2 stem would leave 1×1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmd_lightning.checks import check_int
from lmd_lightning.models.classifier import Classifier, OptimizerFactory, SchedulerFactory, as_int_tuple

__all__ = ["BasicBlock", "ResNet", "ResNetClassifier"]


class BasicBlock(nn.Module):
    """Two 3×3 convs with BatchNorm and a residual: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    The shortcut is the identity, or a 1×1 conv with BatchNorm when the stride or the
    channel count changes the shape.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        # No conv bias: the BatchNorm right after it has its own shift.
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, C_out, H/s, W/s)
        out = self.bn2(self.conv2(out))  # (B, C_out, H/s, W/s)
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem → stages of BasicBlocks, widths w·2^i, strides 1, 2, 2, … → global average pool → head."""

    def __init__(self, in_channels: int, width: int, blocks: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        channels = width
        self.stages = nn.Sequential()
        for i, count in enumerate(blocks):
            out_channels, stride = width * 2**i, 1 if i == 0 else 2
            stage = [BasicBlock(channels, out_channels, stride)]
            stage += [BasicBlock(out_channels, out_channels) for _ in range(count - 1)]
            self.stages.append(nn.Sequential(*stage))
            channels = out_channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))  # (B, w, H, W)
        x = self.stages(x)  # (B, w·2^(S-1), H/2^(S-1), W/2^(S-1))
        x = self.pool(x).flatten(1)  # (B, w·2^(S-1))
        return self.head(x)  # (B, num_classes)


class ResNetClassifier(Classifier):
    """CIFAR-style ResNet; the defaults are ResNet-18 (11.2M parameters) for CIFAR-10.

    Layers: `net.stem` (3×3 conv) and `net.stem_bn`; block j of stage i is `net.stages.i.j`
    with convs `.conv1`, `.conv2`, BatchNorms `.bn1`, `.bn2` and, where the shape changes,
    the 1×1 conv `.shortcut.0` with BatchNorm `.shortcut.1`; then `net.pool` and `net.head`.
    Stage i has width `width`·2^i and stride 1 for the first stage, 2 after.

    Args:
        in_channels: image channels (3 for CIFAR-10).
        width: channels of the stem and of the first stage, w.
        blocks: BasicBlocks per stage; (2, 2, 2, 2) is ResNet-18, (3, 4, 6, 3) ResNet-34.
        num_classes: number of classes (outputs of the head).
        optimizer, scheduler, scheduler_interval: see `Classifier`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        width: int = 64,
        blocks: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
    ) -> None:
        super().__init__(optimizer, scheduler, scheduler_interval)
        check_int(in_channels, "in_channels")
        check_int(width, "width")
        blocks = as_int_tuple(blocks, "blocks")
        check_int(num_classes, "num_classes", low=2)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.net = ResNet(in_channels, width, blocks, num_classes)
        self.example_input_array = torch.zeros(2, in_channels, 32, 32)
