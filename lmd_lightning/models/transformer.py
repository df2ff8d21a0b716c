"""TransformerClassifier: a small pre-norm transformer over patches of a 1-D signal (MNIST-1D).

Attention is written with separate q, k, v and output projections rather than
nn.MultiheadAttention: its fused `in_proj_weight` is not an nn.Linear, so it could not be
factored, and compress_ leaves its `out_proj` dense (it reads `.weight` directly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmd_lightning.checks import check_int
from lmd_lightning.models.classifier import Classifier, OptimizerFactory, SchedulerFactory, check_dropout

__all__ = ["Block", "FeedForward", "SelfAttention", "TransformerClassifier", "TransformerNet"]


class SelfAttention(nn.Module):
    """Multi-head self-attention from four nn.Linear layers: `q`, `k`, `v` and `proj`."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.resid_dropout = nn.Dropout(dropout)

    def _split_heads(self, t: Tensor) -> Tensor:
        B, T, C = t.shape
        return t.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, H, T, C/H)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self._split_heads(self.q(x)), self._split_heads(self.k(x)), self._split_heads(self.v(x))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, C/H)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    """fc1 → GELU → fc2: (B, T, C) → (B, T, ratio·C) → (B, T, C)."""

    def __init__(self, dim: int, ratio: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ratio * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_ratio, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))  # (B, T, C)
        return x + self.mlp(self.norm2(x))  # (B, T, C)


class TransformerNet(nn.Module):
    """(B, L) → patches (B, T, P) → embed + position (B, T, C) → blocks → norm → mean over T → head."""

    def __init__(
        self,
        in_features: int,
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: int,
        num_classes: int,
        dropout: float,
    ) -> None:
        super().__init__()
        tokens = in_features // patch_size
        self.patches = nn.Unflatten(1, (tokens, patch_size))
        self.embed = nn.Linear(patch_size, dim)
        self.pos_embedding = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)  # (1, T, C), learned
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(self.patches(x)) + self.pos_embedding  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        x = self.norm(x).mean(dim=1)  # (B, C)
        return self.head(x)  # (B, num_classes)


class TransformerClassifier(Classifier):
    """A pre-norm transformer classifier over non-overlapping patches of a (B, L) signal.

    Layers: `net.embed`; per block i, `net.blocks.i.attn.q`, `.k`, `.v`, `.proj` and
    `net.blocks.i.mlp.fc1`, `.fc2` (all nn.Linear, all factorable), with LayerNorms
    `net.blocks.i.norm1`, `.norm2`; then `net.norm` and `net.head`.

    Args:
        in_features: signal length L (40 for MNIST-1D); must be a multiple of `patch_size`.
        patch_size: samples per token P; the sequence has T = L / P tokens.
        dim: token width C; must be a multiple of `heads`.
        depth: number of blocks.
        heads: attention heads, each of width C / heads.
        mlp_ratio: hidden width of the feed-forward layers, in multiples of `dim`.
        num_classes: number of classes (outputs of the head).
        dropout: dropout on attention weights and on each residual branch, in [0, 1).
        optimizer, scheduler, scheduler_interval: see `Classifier`.
    """

    def __init__(
        self,
        in_features: int = 40,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 2,
        num_classes: int = 10,
        dropout: float = 0.0,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
    ) -> None:
        super().__init__(optimizer, scheduler, scheduler_interval)
        for arg, value in (
            ("in_features", in_features),
            ("patch_size", patch_size),
            ("dim", dim),
            ("depth", depth),
            ("heads", heads),
            ("mlp_ratio", mlp_ratio),
        ):
            check_int(value, arg)
        check_int(num_classes, "num_classes", low=2)
        dropout = check_dropout(dropout)
        if in_features % patch_size:
            raise ValueError(f"`in_features` ({in_features}) must be a multiple of `patch_size` ({patch_size})")
        if dim % heads:
            raise ValueError(f"`dim` ({dim}) must be a multiple of `heads` ({heads})")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.net = TransformerNet(in_features, patch_size, dim, depth, heads, mlp_ratio, num_classes, dropout)
        self.example_input_array = torch.zeros(2, in_features)
