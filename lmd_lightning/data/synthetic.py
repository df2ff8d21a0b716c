"""A synthetic classification task from a low-rank teacher network, generated in milliseconds."""

from __future__ import annotations

import torch

from lmd_lightning.data.mnist1d import Split

__all__ = ["teacher_classification"]


def teacher_classification(
    n: int = 2048, dim: int = 32, classes: int = 4, rank: int = 4, seed: int = 0
) -> dict[str, Split]:
    """Labels from argmax(W₂·relu(W₁·x) − mean) with a rank-`rank` W₁; 80/10/10 train/val/test."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)  # (n, dim)
    w1 = torch.randn(64, rank, generator=gen) @ torch.randn(rank, dim, generator=gen) / dim**0.5  # (64, dim)
    w2 = torch.randn(classes, 64, generator=gen)  # (classes, 64)
    logits = torch.relu(x @ w1.T) @ w2.T  # (n, classes)
    y = (logits - logits.mean(0)).argmax(-1)  # centred per class, so no class dominates
    a, b = int(0.8 * n), int(0.9 * n)
    return {"train": Split(x[:a], y[:a]), "val": Split(x[a:b], y[a:b]), "test": Split(x[b:], y[b:])}
