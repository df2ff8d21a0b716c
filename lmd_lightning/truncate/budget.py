"""Budget policies: the targeted layers together keep a share of their parameters or multiply-adds.

`GlobalBudget` spends the budget across layers by the least error per unit saved; `UniformRank`
gives every layer one rank, the largest that fits. Both see the layers as `LayerSpectrum`s
(policies.py).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmd_lightning.checks import check_unit_interval
from lmd_lightning.truncate.policies import LayerSpectrum, RankPolicy

__all__ = ["GlobalBudget", "UniformRank"]


@dataclass(frozen=True)
class _Budget(RankPolicy):
    """A share of the targeted layers' parameters (`params`) or multiply-adds (`flops`): exactly one, in (0, 1)."""

    params: float | None = None  # fraction of parameters to keep
    flops: float | None = None  # fraction of multiply-adds to keep

    def __post_init__(self) -> None:
        if (self.params is None) == (self.flops is None):
            raise ValueError(
                f"give exactly one of `params` or `flops`, got params={self.params!r}, flops={self.flops!r}"
            )
        check_unit_interval(self.fraction, self.knob)
        super().__post_init__()

    knob_range: ClassVar[tuple[float, float]] = (0.99, 0.02)

    @property
    def knob(self) -> str:  # type: ignore[override]
        return "params" if self.params is not None else "flops"

    @property
    def fraction(self) -> float:
        return self.params if self.params is not None else self.flops

    def _budget(self, layers: Sequence[LayerSpectrum]) -> tuple[float, bool]:
        """(the budget in parameters or multiply-adds, whether biases count): of what the layers cost now."""
        with_bias = self.knob == "params"
        return self.fraction * sum(layer.cost_at(layer.max_rank, with_bias) for layer in layers), with_bias

    def _cannot_meet(self) -> None:
        warnings.warn(
            f"{self!r} cannot be met: min_rank or the break-even guard keeps the total above it", stacklevel=3
        )


@dataclass(frozen=True)
class UniformRank(_Budget):
    """One rank r for every layer (capped at each layer's own), the largest whose total fits the budget.

    Give exactly one of `params` or `flops`, in (0, 1), as for `GlobalBudget`: `params=0.1` means
    10× smaller over the targeted layers. A layer whose rank r would not save (r·(m+n) ≥ m·n) stays
    as it is, and costs what it costs now. The spectrum plays no part: uniform rank is the baseline
    every allocation has to beat, and on wide MLPs it is hard to beat
    (benchmarks/results/recipes_mlp1024.md).
    """

    needs_spectrum: ClassVar[bool] = False

    def choose(self, layers: Sequence[LayerSpectrum]) -> list[int]:
        if not layers:
            return []
        budget, with_bias = self._budget(layers)

        def total(rank: int) -> int:
            return sum(layer.cost_at(self.clamp(rank, layer), with_bias) for layer in layers)

        lo, hi = 1, max(layer.max_rank for layer in layers)  # the largest rank whose total fits: in [lo, hi]
        if total(lo) > budget:
            self._cannot_meet()
            return [self.clamp(lo, layer) for layer in layers]
        while lo < hi:  # total() never falls as the rank grows
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if total(mid) <= budget else (lo, mid - 1)
        return [self.clamp(lo, layer) for layer in layers]


@dataclass(frozen=True)
class GlobalBudget(_Budget):
    """Keep at most a fraction of the targeted layers' parameters (or multiply-adds) in total.

    Give exactly one of `params` or `flops`, in (0, 1): `params=0.2` means 5× smaller.
    Singular values are dropped across all layers in order of least added relative error
    σᵢ²/‖W‖_F² per unit of cost saved, as long as the total stays above the budget.
    """

    def choose(self, layers: Sequence[LayerSpectrum]) -> list[int]:
        if not layers:
            return []
        budget, with_bias = self._budget(layers)
        owners = self._drop_order(layers)
        lo, hi = 0, owners.numel()  # number of singular values dropped; hi drops all to min_rank
        while lo < hi:  # the fewest drops whose total fits the budget
            mid = (lo + hi) // 2
            if self._total(layers, owners, mid, with_bias) <= budget:
                hi = mid
            else:
                lo = mid + 1
        if self._total(layers, owners, lo, with_bias) > budget:
            self._cannot_meet()
        return self._ranks(layers, owners, lo)

    @staticmethod
    def _drop_order(layers: Sequence[LayerSpectrum]) -> Tensor:
        """Layer index of each singular value, in the order they are dropped.

        score(i, j) = σ_ij² / (‖W_i‖² · cost per rank of layer i): least error per unit saved
        goes first. A dense layer's first saving cut, from full rank to below its break-even
        rank m·n/(m+n), is one step costed by what it saves, and scores are pooled to the
        convex hull of each layer's error–saving curve (`_convex_scores`). Spectra in the loss's
        metric are comparable across layers and are not normalized: σ̃²/2 estimates the loss
        increase itself. Ties go tail first, so every layer always loses a suffix of its spectrum.
        """
        scores, owners, positions = [], [], []
        for index, layer in enumerate(layers):
            s2 = layer.s.double().square()[: layer.max_rank]
            scale = 1.0 if layer.comparable else (float(s2.sum()) or 1.0)  # loss units, or relative error
            scores.append(GlobalBudget._convex_scores(s2 / scale, layer))
            owners.append(torch.full_like(s2, index, dtype=torch.long))
            positions.append(torch.arange(s2.numel()))
        by_position = torch.cat(positions).argsort(descending=True, stable=True)
        by_score = torch.cat(scores)[by_position].argsort(stable=True)
        return torch.cat(owners)[by_position[by_score]]

    @staticmethod
    def _convex_scores(s2: Tensor, layer: LayerSpectrum) -> Tensor:
        """Each value's error per unit saved, on the lower convex hull of the layer's error–saving curve.

        A dense layer saves nothing until its rank falls below m·n/(m+n), so its values from there
        to full rank are one step, costed by what that step saves (r·(m+n) < m·n). Adjacent steps
        whose cost per unit falls are pooled (pool-adjacent-violators), so that a layer's scores
        never fall in drop order: the greedy then takes a layer's drops in order, and takes a
        costly first cut only together with the cheap cuts it opens.
        """
        n = s2.numel()
        first = max(min(math.ceil(layer.cost_now / layer.cost_per_rank) - 1, n - 1), 0)
        steps = [(float(s2[first:].sum()), float(layer.cost_now - first * layer.cost_per_rank), n - first)]
        steps += [(float(s2[j]), float(layer.cost_per_rank), 1) for j in range(first - 1, -1, -1)]
        pooled: list[list[float]] = []  # [error, saving, count], in drop order
        for error, saving, count in steps:
            pooled.append([error, max(saving, 1.0), count])
            while len(pooled) > 1 and pooled[-2][0] * pooled[-1][1] > pooled[-1][0] * pooled[-2][1]:
                error, saving, count = pooled.pop()
                pooled[-1] = [pooled[-1][0] + error, pooled[-1][1] + saving, pooled[-1][2] + count]
        in_drop_order = torch.cat([torch.full((int(c),), e / s, dtype=torch.float64) for e, s, c in pooled])
        return in_drop_order.flip(0)  # by position: index 0 is the largest value, dropped last

    def _ranks(self, layers: Sequence[LayerSpectrum], owners: Tensor, dropped: int) -> list[int]:
        counts = torch.bincount(owners[:dropped], minlength=len(layers)).tolist()
        return [self.clamp(layer.max_rank - count, layer) for layer, count in zip(layers, counts)]

    def _total(self, layers: Sequence[LayerSpectrum], owners: Tensor, dropped: int, with_bias: bool) -> int:
        ranks = self._ranks(layers, owners, dropped)
        return sum(layer.cost_at(rank, with_bias) for layer, rank in zip(layers, ranks))
