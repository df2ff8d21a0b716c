"""FactoredEmbedding: an nn.Embedding table (vocab, d) held as (vocab, r)·(r, d), as in ALBERT.

A lookup gathers rows of U·diag(s) (vocab, r) and maps them through Vᵀ (r, d): the full table
is never built. The truncated matrix is the table itself, so Eckart–Young keeps the best rank-r
table; parameters fall from vocab·d to r·(vocab + d). Opt-in: `compress_` touches embeddings
only when `include` names them, because a language model's table often feeds a tied output head
(which then keeps both dense) and because an embedding's "inputs" are indices, so
metric="data" does not apply to it.

`padding_idx`: the row of U at that index gets no gradient, as nn.Embedding's row does; its value
is the truncation's, like every other row (a pretrained table's padding row need not be zero, and
is used as it is). `max_norm` renormalizes table rows in place and has no factored counterpart,
and `sparse=True` would give U a sparse gradient but V a dense one, which sparse optimizers
refuse: such embeddings stay dense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmd_lightning.layers.base import FactoredModule, Parametrization, copy_requires_grad, qualified_name
from lmd_lightning.layers.registry import register_kind

__all__ = ["FactoredEmbedding"]


@register_kind
class FactoredEmbedding(FactoredModule):
    """y = (U·diag(s))[idx]·Vᵀ: (…) indices → (…, r) → (…, embedding_dim)."""

    dense_name = qualified_name(nn.Embedding)
    opt_in = True
    data_metric = False

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        padding_idx: int | None = None,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        parametrization: Parametrization = "balanced",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        metric_maps: bool = False,
    ) -> None:
        super().__init__()
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(
                    f"`padding_idx` must be within [-{num_embeddings}, {num_embeddings}), got {padding_idx}"
                )
            padding_idx = padding_idx % num_embeddings
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.scale_grad_by_freq, self.sparse = padding_idx, scale_grad_by_freq, sparse
        self.weight_shape = (num_embeddings, embedding_dim)  # nn.Embedding's
        self._init_parameters(num_embeddings, embedding_dim, rank, False, parametrization, device, dtype, metric_maps)

    def init_variance(self) -> float:
        """nn.Embedding's table has unit-variance entries."""
        return 1.0

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As FactoredModule's, with nn.Embedding's unit variance, and a zero padding row."""
        super().reset_parameters()
        if getattr(self, "padding_idx", None) is not None:
            self.U[self.padding_idx].zero_()

    def forward(self, indices: Tensor) -> Tensor:
        rows = F.embedding(
            indices, self.scaled_U(), self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse
        )  # (…, r)
        return rows @ self.V.mT  # (…, embedding_dim)

    @classmethod
    def dense_matrix(cls, dense: nn.Module) -> Tensor:
        return dense.weight.detach()  # (vocab, d): rows are the "outputs", one per index

    @classmethod
    def dense_skip_reason(cls, dense: nn.Module) -> str | None:
        if dense.max_norm is not None:
            return f"max_norm={dense.max_norm} renormalizes table rows in place, which a factored table cannot do"
        if dense.sparse:
            return "sparse=True: V would get a dense gradient, which sparse optimizers (SparseAdam) refuse"
        return None

    @classmethod
    def like(cls, module, rank, bias, parametrization, metric_maps=False) -> FactoredEmbedding:
        like = module.U if isinstance(module, FactoredModule) else module.weight
        return cls(
            module.num_embeddings,
            module.embedding_dim,
            rank,
            module.padding_idx,
            module.scale_grad_by_freq,
            module.sparse,
            parametrization,
            like.device,
            like.dtype,
            metric_maps,
        )

    @classmethod
    def input_rows(cls, module: nn.Module, x: Tensor) -> Tensor:
        raise TypeError("an embedding's inputs are indices, not rows of features: metric='data' does not apply")

    def to_dense(self) -> nn.Embedding:
        """A dense nn.Embedding with the factors' product as its table."""
        dense = nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            self.padding_idx,
            scale_grad_by_freq=self.scale_grad_by_freq,
            sparse=self.sparse,
            device=self.U.device,
            dtype=self.U.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
        copy_requires_grad(self, dense)
        return dense

    def extra_repr(self) -> str:
        extra = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.num_embeddings}, {self.embedding_dim}{extra}, {self._common_repr()}"
