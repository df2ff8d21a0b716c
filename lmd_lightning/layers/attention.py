"""FactoredMultiheadAttention: nn.MultiheadAttention with its four projections as separate layers.

nn.MultiheadAttention keeps q, k and v in one packed `in_proj_weight` and reads `out_proj.weight`
inside its functional forward, so none of its projections can be swapped for a factored layer.
This module computes the same attention with `q_proj`, `k_proj`, `v_proj` and `out_proj` as
child layers, each an nn.Linear or any factored kind, and keeps MHA's forward contract:
`batch_first`, unbatched inputs, `key_padding_mask` and `attn_mask` (bool or float, 2-D or
per-head 3-D), `is_causal`, `need_weights` / `average_attn_weights`, `kdim` / `vdim`,
`add_bias_kv` and `add_zero_attn`, dropout on the attention weights.

`compress_` splits an nn.MultiheadAttention into this module (`from_mha`, the same function up to
rounding), factors the projections its policy chooses, and puts the original back if it chose
none. `_qkv_same_embed_dim` is False and `in_proj_weight` / `in_proj_bias` are None, which keeps
nn.TransformerEncoderLayer's and nn.TransformerEncoder's fused fast paths, which read packed dense
weights, off.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmd_lightning.layers.base import FactoredModule, qualified_name
from lmd_lightning.layers.registry import register_split

__all__ = ["FactoredMultiheadAttention"]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _float_mask(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """A bool mask (True = do not attend) as an additive float mask; float masks as they are."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"`{name}` must be a bool or floating-point tensor, got {mask.dtype}")
    return mask


class FactoredMultiheadAttention(nn.Module):
    """Multi-head attention over separate q/k/v/out projection layers (dense or factored)."""

    factorable_children = PROJECTIONS  # the child layers a split makes reachable
    split_children = ("q_proj", "k_proj", "v_proj")  # state-dict prefixes that show a split module

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"`embed_dim` ({embed_dim}) must be divisible by `num_heads` ({num_heads})")
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        self._qkv_same_embed_dim = False  # no packed in_proj: fused fast paths stay off
        self.in_proj_weight = self.in_proj_bias = None
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias, **kw)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias, **kw)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias, **kw)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **kw))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **kw))
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)
        else:
            self.bias_k = self.bias_v = None

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> FactoredMultiheadAttention:
        """The same attention as `mha`, with copies of its weights in four dense nn.Linear children."""
        if type(mha) is not nn.MultiheadAttention:
            raise TypeError(f"`mha` must be a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        like = mha.out_proj.weight
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            mha.dropout,
            bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None,
            add_zero_attn=mha.add_zero_attn,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device=like.device,
            dtype=like.dtype,
        )
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.split(mha.embed_dim)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.split(mha.embed_dim)
        sources = [*zip(weights, biases), (mha.out_proj.weight, mha.out_proj.bias)]
        with torch.no_grad():
            for name, (weight, bias) in zip(PROJECTIONS, sources):
                layer = getattr(new, name)
                layer.weight.copy_(weight)
                layer.weight.requires_grad_(weight.requires_grad)
                if bias is not None:
                    layer.bias.copy_(bias)
                    layer.bias.requires_grad_(bias.requires_grad)
            for name in ("bias_k", "bias_v"):
                if getattr(mha, name) is not None:
                    getattr(new, name).copy_(getattr(mha, name))
                    getattr(new, name).requires_grad_(getattr(mha, name).requires_grad)
        new.train(mha.training)
        return new

    def _dense(self, name: str) -> tuple[Tensor, Tensor | None]:
        layer = getattr(self, name)
        weight = layer.dense_weight() if isinstance(layer, FactoredModule) else layer.weight
        return weight.detach(), None if layer.bias is None else layer.bias.detach()

    def to_mha(self) -> nn.MultiheadAttention:
        """A dense nn.MultiheadAttention computing the same attention (factored projections multiplied out)."""
        (wq, bq), (wk, bk), (wv, bv), (wo, bo) = (self._dense(name) for name in PROJECTIONS)
        mha = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            self.dropout,
            bias=bq is not None,
            add_bias_kv=self.bias_k is not None,
            add_zero_attn=self.add_zero_attn,
            kdim=self.kdim,
            vdim=self.vdim,
            batch_first=self.batch_first,
            device=wq.device,
            dtype=wq.dtype,
        )
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                mha.in_proj_weight.copy_(torch.cat([wq, wk, wv]))
            else:
                mha.q_proj_weight.copy_(wq)
                mha.k_proj_weight.copy_(wk)
                mha.v_proj_weight.copy_(wv)
            if bq is not None:
                mha.in_proj_bias.copy_(torch.cat([bq, bk, bv]))
                mha.out_proj.bias.copy_(bo)
            mha.out_proj.weight.copy_(wo)
            if self.bias_k is not None:
                mha.bias_k.copy_(self.bias_k)
                mha.bias_v.copy_(self.bias_v)
        mha.train(self.training)
        return mha

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if not batched:  # (L, E) → (1, L, E)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) → (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length, e = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        padding = _float_mask(key_padding_mask, "key_padding_mask", query.dtype)  # (N, S)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention).")
        causal = is_causal and padding is None and not need_weights  # else the given mask says it
        mask = None if causal else _float_mask(attn_mask, "attn_mask", query.dtype)

        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)  # (N, L, E), (N, S, E), (N, S, E)
        if mask is not None:
            expected = [(length, k.shape[1]), (n * heads, length, k.shape[1])]
            if tuple(mask.shape) not in expected:
                raise RuntimeError(f"`attn_mask` has shape {tuple(mask.shape)}; expected one of {expected}")
        extra = 0  # key positions appended: bias_k/bias_v, then the zero attention
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.reshape(1, 1, e).expand(n, 1, e)], dim=1)
            v = torch.cat([v, self.bias_v.reshape(1, 1, e).expand(n, 1, e)], dim=1)
            extra += 1
        q = q.reshape(n, length, heads, head_dim).transpose(1, 2)  # (N, H, L, D)
        k = k.reshape(n, k.shape[1], heads, head_dim).transpose(1, 2)  # (N, H, S', D)
        v = v.reshape(n, v.shape[1], heads, head_dim).transpose(1, 2)
        if self.add_zero_attn:
            zeros = k.new_zeros(n, heads, 1, head_dim)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            extra += 1
        bias = None  # additive (N or 1, H or 1, L, S')
        if mask is not None:
            mask = F.pad(mask, (0, extra))
            bias = mask.reshape(1, 1, length, -1) if mask.dim() == 2 else mask.reshape(n, heads, length, -1)
        if padding is not None:
            padding = F.pad(padding, (0, extra)).reshape(n, 1, 1, -1)
            bias = padding if bias is None else bias + padding
        if bias is not None:
            bias = bias.to(q.dtype)  # under autocast the projections may run in a lower precision
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q * (1.0 / math.sqrt(head_dim))) @ k.mT  # (N, H, L, S')
            if bias is not None:
                scores = scores + bias
            weights = F.softmax(scores, dim=-1)
            if dropout > 0:
                weights = F.dropout(weights, dropout)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, bias, dropout, causal)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, e))  # (N, L, E)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        extra = f", kdim={self.kdim}, vdim={self.vdim}" if (self.kdim, self.vdim) != (self.embed_dim,) * 2 else ""
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}{extra}"


register_split(qualified_name(nn.MultiheadAttention), FactoredMultiheadAttention.from_mha, FactoredMultiheadAttention)
