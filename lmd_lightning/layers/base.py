"""Factored layers: W = U·diag(s)·Vᵀ held as thin factors, never as the dense matrix.

Two ways to hold the factors (`parametrization`):
- "balanced" (default): U·√s and V·√s as the parameters `U` and `V`, no `s`. Both factors
  carry the same scale, so they train stably at the dense model's learning rate
  (Pufferfish, Cuttlefish; measured in benchmarks/results/parametrization.md).
- "svd": orthonormal `U`, `V` and the spectrum `s` as three parameters (LMD Eq. 2).
Either way `singular_values()` returns the current spectrum exactly.

Optionally a layer carries LMD's metric maps (Eq. 3–4): learnable r×r `I_dist` and `O_dist`,
initialized to the identity, so that W = U·O_dist·diag(s)·I_dist·Vᵀ ("svd") or
W = (U√s)·O_dist·I_dist·(V√s)ᵀ ("balanced"). `fold_()` multiplies them into the factors and
restores the canonical form; the layer then computes the same map without them.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmd_lightning.checks import check_bool, check_choice
from lmd_lightning.layers.svd import Factors, compute_dtype, eckart_young_error, truncated_svd

__all__ = [
    "PARAMETRIZATIONS",
    "FactoredModule",
    "check_layer_type",
    "check_rank",
    "copy_requires_grad",
    "qualified_name",
]

Parametrization = Literal["balanced", "svd"]
PARAMETRIZATIONS = ("balanced", "svd")


def check_rank(rank: int, out_dim: int, fan_in: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(out_dim, fan_in):
        raise ValueError(
            f"`rank` must be an int in [1, {min(out_dim, fan_in)}] for a ({out_dim}, {fan_in}) weight, got {rank!r}"
        )


def qualified_name(cls: type) -> str:
    """`module.QualName` of a class: how the registry names the dense class a kind replaces."""
    return f"{cls.__module__}.{cls.__qualname__}"


class FactoredModule(nn.Module):
    """Shared mechanics of every factored layer kind over its (out, fan_in) matrix.

    A layer kind is one subclass, registered with `layers.registry.register_kind`. Besides its
    forward it says how to read the dense layer it replaces (`dense_matrix`, `dense_skip_reason`),
    how to build itself from one (`like`, `from_dense`) and back (`to_dense`), and how calibration
    reads its inputs (`input_rows`, `output_rows`, `dense_forward`). The defaults are nn.Linear's.
    """

    dense_name: ClassVar[str]  # qualified name of the dense class this kind replaces
    opt_in: ClassVar[bool] = False  # targeted only when `include` names it (embeddings)
    data_metric: ClassVar[bool] = True  # its inputs read as rows of fan_in, so metric="data" applies

    U: nn.Parameter  # (out, r)
    V: nn.Parameter  # (fan_in, r)
    s: nn.Parameter | None  # (r,), only with parametrization="svd"
    bias: nn.Parameter | None  # (out,)
    I_dist: nn.Parameter | None  # (r, r), only with metric maps
    O_dist: nn.Parameter | None  # (r, r), only with metric maps

    def _init_parameters(
        self,
        out_dim: int,
        fan_in: int,
        rank: int,
        bias: bool,
        parametrization: str,
        device,
        dtype,
        metric_maps: bool = False,
    ) -> None:
        check_choice(parametrization, "parametrization", PARAMETRIZATIONS)
        check_rank(rank, out_dim, fan_in)
        self.parametrization = parametrization
        kw = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(out_dim, rank, **kw))
        self.V = nn.Parameter(torch.empty(fan_in, rank, **kw))
        self.s = nn.Parameter(torch.empty(rank, **kw)) if parametrization == "svd" else None
        self.bias = nn.Parameter(torch.empty(out_dim, **kw)) if bias else None
        self.I_dist: nn.Parameter | None = None
        self.O_dist: nn.Parameter | None = None
        self.reset_parameters()
        check_bool(metric_maps, "metric_maps")
        if metric_maps:
            self.add_metric_maps_()

    def init_variance(self) -> float:
        """The variance of the product's entries after `reset_parameters`: nn.Linear's default 1/(3·fan_in)."""
        return 1.0 / (3.0 * self.V.shape[0])

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random factors whose product has entries of variance `init_variance()`, a uniform bias as nn.Linear's."""
        fan_in, rank = self.V.shape
        std = (self.init_variance() / rank) ** 0.25
        nn.init.normal_(self.U, std=std)
        nn.init.normal_(self.V, std=std)
        if self.s is not None:
            nn.init.ones_(self.s)
        for dist in (self.I_dist, self.O_dist):
            if dist is not None:
                dist.copy_(torch.eye(self.rank, dtype=dist.dtype, device=dist.device))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @property
    def has_metric_maps(self) -> bool:
        return self.I_dist is not None

    def core(self) -> Tensor | None:
        """O_dist·diag(s)·I_dist (r, r), or O_dist·I_dist when "balanced"; None without metric maps."""
        if self.I_dist is None:
            return None
        inner = self.I_dist if self.s is None else self.s[:, None] * self.I_dist
        return self.O_dist @ inner

    def scaled_U(self) -> Tensor:
        """The left factor (out, r), with the spectrum and any metric maps in it: W = scaled_U()·Vᵀ."""
        core = self.core()
        if core is not None:
            return self.U @ core
        return self.U if self.s is None else self.U * self.s

    @torch.no_grad()
    def add_metric_maps_(self) -> FactoredModule:
        """Give the layer learnable r×r I_dist and O_dist at the identity (LMD Eq. 4): same output.

        New parameters: rebuild any optimizer that should train them. A no-op if it has them.
        """
        if self.I_dist is None:
            eye = torch.eye(self.rank, device=self.U.device, dtype=self.U.dtype)
            self.I_dist = nn.Parameter(eye.clone(), requires_grad=self.U.requires_grad)
            self.O_dist = nn.Parameter(eye.clone(), requires_grad=self.U.requires_grad)
        return self

    @torch.no_grad()
    def fold_(self) -> FactoredModule:
        """Multiply the metric maps into the factors and drop them, restoring the canonical form.

        Afterwards U and V have orthonormal columns (scaled by √s when "balanced") and s descends;
        the layer computes the same map up to rounding. A no-op without metric maps.
        """
        if self.I_dist is None:
            return self
        if not all(bool(torch.isfinite(p).all()) for p in self.parameters(recurse=False)):
            raise ValueError(f"cannot fold the metric maps of {self.extra_repr()}: it has non-finite parameters")
        factors = self.canonical_factors()
        self.I_dist = self.O_dist = None
        return self.load_factors_(factors)

    def dense_weight(self) -> Tensor:
        """The (out, fan_in) product U·diag(s)·Vᵀ. For export and checks, not for forward."""
        return self.scaled_U() @ self.V.mT

    weight_shape: tuple[int, ...]  # the dense layer's weight shape, set by each layer kind

    @property
    def weight(self) -> Tensor:
        """The dense layer's weight, built from the factors when read, in its shape, dtype and device.

        For code outside the layer that reads a child's `.weight` (its dtype, as many Hugging Face
        models do, or its value); gradients flow back into the factors. Each read builds the full
        product, so the layer's own forward never reads it. Read-only: change the layer through its
        factors (`load_factors_`, `truncate_`).
        """
        return self.dense_weight().reshape(self.weight_shape)

    @weight.setter
    def weight(self, value: Tensor) -> None:
        raise AttributeError(
            f"{type(self).__name__}.weight is read-only: it is the product of the factors U, V (and s); "
            "set them with load_factors_, or shrink the layer with truncate_"
        )

    @torch.no_grad()
    def canonical_factors(self) -> Factors:
        """The exact SVD of the current product, from QR of both factors and an SVD of the r×r core."""
        work = compute_dtype(self.U.dtype)
        Qu, Ru = torch.linalg.qr(self.scaled_U().to(work))  # (out, r), (r, r)
        Qv, Rv = torch.linalg.qr(self.V.to(work))  # (fan_in, r), (r, r)
        P, sigma, Qh = torch.linalg.svd(Ru @ Rv.mT)  # core (r, r) = P·diag(σ)·Qh
        norm = float(torch.linalg.vector_norm(sigma))
        return Factors(U=Qu @ P, s=sigma, V=Qv @ Qh.mT, error=0.0, norm=norm, method="exact")

    def singular_values(self) -> Tensor:
        """The current spectrum σ₁ ≥ … ≥ σ_r of U·diag(s)·Vᵀ (float32, or float64 for float64 layers)."""
        return self.canonical_factors().s

    def truncated_factors(self, new_rank: int) -> Factors:
        """Eckart–Young truncation of the current product to `new_rank`, not yet applied."""
        if isinstance(new_rank, bool) or not isinstance(new_rank, int) or not 1 <= new_rank <= self.rank:
            raise ValueError(f"`new_rank` must be an int in [1, {self.rank}] (the current rank), got {new_rank!r}")
        full = self.canonical_factors()
        return Factors(
            U=full.U[:, :new_rank],
            s=full.s[:new_rank],
            V=full.V[:, :new_rank],
            error=eckart_young_error(full.s, new_rank),
            norm=full.norm,
            method="exact",
        )

    def truncate_(self, new_rank: int) -> FactoredModule:
        """Shrink in place to the best rank-`new_rank` approximation of the current product.

        The factors become new Parameter objects: rebuild any optimizer that held the old ones.
        """
        return self.load_factors_(self.truncated_factors(new_rank))

    @torch.no_grad()
    def load_factors_(self, factors: Factors) -> FactoredModule:
        """Replace U, (s,) V by `factors` (orthonormal U, V; s descending), in this layer's layout.

        Metric maps, if the layer has them, start again from the identity at the new rank.
        """
        out_dim, fan_in = self.U.shape[0], self.V.shape[0]
        if factors.U.shape[0] != out_dim or factors.V.shape[0] != fan_in:
            raise ValueError(
                f"factors of shape U{tuple(factors.U.shape)}, V{tuple(factors.V.shape)} do not fit "
                f"a layer with out={out_dim}, fan_in={fan_in}"
            )
        requires_grad, like = self.U.requires_grad, self.U
        if self.parametrization == "balanced":
            root = factors.s.clamp_min(0).sqrt()
            tensors = {"U": factors.U * root, "V": factors.V * root}
        else:
            tensors = {"U": factors.U, "s": factors.s, "V": factors.V}
        if self.I_dist is not None:
            eye = torch.eye(factors.rank, device=factors.U.device, dtype=factors.U.dtype)
            tensors.update(I_dist=eye, O_dist=eye.clone())
        for key, value in tensors.items():
            value = value.to(device=like.device, dtype=like.dtype).contiguous()
            setattr(self, key, nn.Parameter(value, requires_grad=requires_grad))
        return self

    # ---- the layer kind's interface; the defaults are nn.Linear's ----

    @classmethod
    def dense_matrix(cls, dense: nn.Module) -> Tensor:
        """The dense layer's weight as the (out, fan_in) matrix that is truncated (detached, no copy)."""
        weight = dense.weight.detach()
        return weight.reshape(weight.shape[0], -1)

    @classmethod
    def dense_skip_reason(cls, dense: nn.Module) -> str | None:
        """Why this dense layer cannot be factored (a grouped conv, say), or None."""
        return None

    @classmethod
    def like(
        cls, module: nn.Module, rank: int, bias: bool, parametrization: Parametrization, metric_maps: bool = False
    ) -> FactoredModule:
        """An empty factored layer with the geometry, device and dtype of `module` (dense or factored)."""
        raise NotImplementedError(f"{cls.__name__} does not implement `like`")

    def to_dense(self) -> nn.Module:
        """The dense layer computing the same map, with the factors' product as its weight."""
        raise NotImplementedError(f"{type(self).__name__} does not implement `to_dense`")

    @classmethod
    def from_dense_factors(
        cls, dense: nn.Module, factors: Factors, parametrization: Parametrization = "balanced"
    ) -> FactoredModule:
        """A layer holding `factors`, with the geometry of `dense`, a copy of its bias and its requires_grad."""
        bias = getattr(dense, "bias", None)
        layer = cls.like(dense, factors.rank, bias is not None, parametrization).filled_(factors, bias)
        copy_requires_grad(dense, layer)
        return layer

    @torch.no_grad()
    def filled_(self, factors: Factors, bias: Tensor | None = None) -> FactoredModule:
        """`load_factors_(factors)` and a copy of `bias` (when given) into the layer's own bias."""
        self.load_factors_(factors)
        if bias is not None:
            self.bias.copy_(bias)
        return self

    @classmethod
    def from_dense(
        cls, dense: nn.Module, rank: int, parametrization: Parametrization = "balanced", method: str = "auto"
    ) -> FactoredModule:
        """The best rank-`rank` factored copy of `dense` (Eckart–Young), same device, dtype, requires_grad."""
        if qualified_name(type(dense)) != cls.dense_name:
            raise TypeError(
                f"{cls.__name__} replaces a {cls.dense_name}, got {type(dense).__module__}.{type(dense).__name__}"
            )
        reason = cls.dense_skip_reason(dense)
        if reason is not None:
            raise ValueError(f"cannot factor this {type(dense).__name__}: {reason}")
        matrix = cls.dense_matrix(dense)
        check_rank(rank, *matrix.shape)
        return cls.from_dense_factors(dense, truncated_svd(matrix, rank, method=method), parametrization)

    @classmethod
    def input_rows(cls, module: nn.Module, x: Tensor) -> Tensor:
        """The layer's input as (rows, fan_in), the space its matrix's columns act on."""
        return x.reshape(-1, x.shape[-1])

    @classmethod
    def output_rows(cls, module: nn.Module, y: Tensor) -> Tensor:
        """The layer's output as (rows, out), in the row order of `input_rows`."""
        return y.reshape(-1, y.shape[-1])

    @classmethod
    def dense_forward(cls, module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
        """The layer's output with its (out, fan_in) matrix replaced by `weight`."""
        bias = getattr(module, "bias", None)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @torch.no_grad()
    def share_factors_(self, source: FactoredModule) -> FactoredModule:
        """Hold `source`'s factor Parameters themselves (U, V, s), not copies: one set of factors for both.

        Same (out, fan_in) and parametrization required; the rank becomes `source`'s.
        For a head tied to its embedding (joint factoring): both compute with the same U·diag(s)·Vᵀ
        and train it together. Layers with metric maps cannot share (their maps would be separate).
        """
        if not isinstance(source, FactoredModule):
            raise TypeError(f"`source` must be a factored layer, got {type(source).__name__}")
        layout = (self.U.shape[0], self.V.shape[0], self.parametrization)
        if layout != (source.U.shape[0], source.V.shape[0], source.parametrization):
            raise ValueError(
                f"cannot share factors of (out, fan_in) = {tuple(source.U.shape[:1] + source.V.shape[:1])} "
                f"({source.parametrization}) with a layer of {tuple(self.U.shape[:1] + self.V.shape[:1])} "
                f"({self.parametrization})"
            )
        if self.has_metric_maps or source.has_metric_maps:
            raise ValueError("layers with metric maps cannot share factors: fold the maps first (fold_)")
        self.U, self.V = source.U, source.V
        if source.s is not None:
            self.s = source.s
        return self

    def _common_repr(self) -> str:
        maps = ", metric_maps=True" if self.has_metric_maps else ""
        return f"rank={self.rank}, bias={self.bias is not None}, parametrization={self.parametrization}{maps}"


def check_layer_type(obj: object, expected: type, arg: str) -> None:
    """`obj` must be exactly an `expected` (a subclass may read `.weight` in its own forward)."""
    if type(obj) is not expected:
        raise TypeError(f"`{arg}` must be a {expected.__module__}.{expected.__name__}, got {type(obj).__name__}")


def copy_requires_grad(src: nn.Module, dst: nn.Module) -> None:
    """The weight's flag goes to the weight or to all factors; the bias keeps its own."""
    weight_grad = (src.U if isinstance(src, FactoredModule) else src.weight).requires_grad
    bias = getattr(src, "bias", None)
    for name, param in dst.named_parameters(recurse=False):
        param.requires_grad_(bias.requires_grad if name == "bias" and bias is not None else weight_grad)
