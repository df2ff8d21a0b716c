"""Rank policies: rules over a layer's singular spectrum (LMD.md section 2).

A policy sees every targeted layer at once as a `LayerSpectrum` and returns one rank per
layer. Per-layer policies implement `rank_for`; `GlobalBudget` spends a budget across
layers. All honour `min_rank`/`max_rank`; the break-even guard (factor only when
r·(m+n) < m·n) is applied by `compress_` for every policy alike.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from lmd_lightning.checks import check_int, check_number, check_unit_interval, is_number

__all__ = [
    "EffectiveRank",
    "EnergyRank",
    "ErrorBound",
    "FixedRank",
    "GlobalBudget",
    "LayerSpectrum",
    "PerLayerPolicy",
    "RankPolicy",
    "RankRatio",
    "StableRank",
    "UniformRank",
]


@dataclass(frozen=True)
class LayerSpectrum:
    """What a policy knows about one layer, seen as the matrix (out, fan_in)."""

    name: str
    shape: tuple[int, int]  # (out, fan_in)
    s: Tensor | None  # exact spectrum, descending; None when the policy does not need it
    max_rank: int  # min(out, fan_in) for a dense layer, the current rank for a factored one
    cost_per_rank: int  # parameters or multiply-adds that one unit of rank costs: out + fan_in
    cost_now: int  # what the layer costs now (dense m·n, or r·(m+n) when already factored)
    bias: int = 0  # bias parameters: counted by parameter budgets, not by multiply-add budgets
    comparable: bool = False  # `s` in units shared by every layer (the loss metric): no per-layer normalization

    @property
    def full_rank(self) -> int:
        return min(self.shape)

    def cost_at(self, rank: int, with_bias: bool = True) -> int:
        """Cost after truncation to `rank`; a rank that does not save stays at today's cost."""
        return self.bias * with_bias + min(self.cost_now, rank * self.cost_per_rank)


def _positive_finite(value: object) -> bool:
    return is_number(value) and 0 < value < math.inf


@dataclass(frozen=True, kw_only=True)
class RankPolicy(abc.ABC):
    """Base of all policies. `min_rank` ≤ chosen rank ≤ `max_rank` (None: no upper bound)."""

    min_rank: int = 1  # never truncate below this rank
    max_rank: int | None = None  # never keep more than this rank

    needs_spectrum: ClassVar[bool] = True
    # The one number that sets how hard the policy compresses, for searches over it (the
    # callback's accuracy guard): its field name and its mildest and most aggressive values.
    knob: ClassVar[str | None] = None
    knob_range: ClassVar[tuple[float, float]] = (0.0, 0.0)  # (mild, aggressive)

    def __post_init__(self) -> None:
        check_int(self.min_rank, "min_rank", 1)
        if self.max_rank is not None:
            check_int(self.max_rank, "max_rank", 1)
            if self.max_rank < self.min_rank:
                raise ValueError(f"`max_rank` ({self.max_rank}) must be >= `min_rank` ({self.min_rank})")

    @property
    def knob_value(self) -> float | None:
        return None if self.knob is None else getattr(self, self.knob)

    def with_knob(self, value: float) -> RankPolicy:
        """The same policy with its knob set to `value` (validated like a new policy)."""
        if self.knob is None:
            raise ValueError(f"{type(self).__name__} has no knob to search over")
        return dataclasses.replace(self, **{self.knob: value})

    def for_round(self, k: int, rounds: int) -> RankPolicy:
        """The policy for round `k` of `rounds` of iterative compression, reaching this one at the last.

        Each round is applied to the model the previous rounds left, so relative targets are
        split geometrically: keeping a share q^(1/R) of what is left, R times, keeps q in total.
        """
        if rounds == 1:
            return self
        if self.knob is None:
            raise ValueError(f"{type(self).__name__} has no knob to spread over rounds; use rounds=1")
        return self.with_knob(self._round_knob(k, rounds))

    def _round_knob(self, k: int, rounds: int) -> float:
        """Default for a kept fraction of what is left (energy, budget): the R-th root each round."""
        return self.knob_value ** (1 / rounds)

    @abc.abstractmethod
    def choose(self, layers: Sequence[LayerSpectrum]) -> list[int]:
        """One rank per layer, each within [min_rank, max_rank] and the layer's own maximum."""

    def clamp(self, rank: int, layer: LayerSpectrum) -> int:
        upper = layer.max_rank if self.max_rank is None else min(self.max_rank, layer.max_rank)
        return max(min(rank, upper), min(self.min_rank, layer.max_rank))


@dataclass(frozen=True, kw_only=True)
class PerLayerPolicy(RankPolicy):
    """A policy that decides each layer from that layer alone."""

    def choose(self, layers: Sequence[LayerSpectrum]) -> list[int]:
        return [self.clamp(self.rank_for(layer), layer) for layer in layers]

    @abc.abstractmethod
    def rank_for(self, layer: LayerSpectrum) -> int:
        """The rank for one layer, before clamping."""


@dataclass(frozen=True)
class FixedRank(PerLayerPolicy):
    """The same rank r for every layer (capped at each layer's full rank)."""

    rank: int  # the rank to keep

    needs_spectrum: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_int(self.rank, "rank", 1)
        super().__post_init__()

    def rank_for(self, layer: LayerSpectrum) -> int:
        return self.rank


@dataclass(frozen=True)
class RankRatio(PerLayerPolicy):
    """r = round(ratio · min(m, n)), at least 1: a fixed fraction of each layer's full rank."""

    ratio: float  # fraction of full rank to keep, in (0, 1)

    needs_spectrum: ClassVar[bool] = False
    knob: ClassVar[str] = "ratio"
    knob_range: ClassVar[tuple[float, float]] = (0.999, 0.01)

    def __post_init__(self) -> None:
        check_unit_interval(self.ratio, "ratio")
        super().__post_init__()

    def rank_for(self, layer: LayerSpectrum) -> int:
        return max(1, round(self.ratio * layer.full_rank))

    def _round_knob(self, k: int, rounds: int) -> float:
        # The ratio is of the full rank, not of what is left: step linearly towards it.
        return 1 - (1 - self.ratio) * k / rounds


def _smallest_rank_keeping(s: Tensor, energy: float) -> int:
    """Smallest r with Σ_{i≤r} σᵢ² / Σ σᵢ² ≥ energy."""
    s2 = s.double().square()
    total = float(s2.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(s2, 0) / total  # non-decreasing
    short = int((kept < energy - 1e-12).sum())  # how many prefixes fall short of `energy`
    return min(short + 1, s.numel())


@dataclass(frozen=True)
class EnergyRank(PerLayerPolicy):
    """Smallest r keeping Σ_{i≤r} σᵢ² / Σ σᵢ² ≥ energy."""

    energy: float  # share of ‖W‖_F² to keep, in (0, 1)

    knob: ClassVar[str] = "energy"
    knob_range: ClassVar[tuple[float, float]] = (0.9999, 0.3)

    def __post_init__(self) -> None:
        check_unit_interval(self.energy, "energy")
        super().__post_init__()

    def rank_for(self, layer: LayerSpectrum) -> int:
        return _smallest_rank_keeping(layer.s, self.energy)


@dataclass(frozen=True)
class ErrorBound(PerLayerPolicy):
    """Smallest r with ‖W − W_r‖_F ≤ eps·‖W‖_F: the margin of error ε of LMD Theorem 1."""

    eps: float  # relative Frobenius error allowed, in (0, 1)

    knob: ClassVar[str] = "eps"
    knob_range: ClassVar[tuple[float, float]] = (0.01, 0.85)

    def __post_init__(self) -> None:
        check_unit_interval(self.eps, "eps")
        super().__post_init__()

    def rank_for(self, layer: LayerSpectrum) -> int:
        # ‖W − W_r‖² / ‖W‖² = 1 − energy kept, so the bound is an energy of 1 − eps².
        return _smallest_rank_keeping(layer.s, 1.0 - self.eps**2)

    def _round_knob(self, k: int, rounds: int) -> float:
        return math.sqrt(1 - (1 - self.eps**2) ** (1 / rounds))


@dataclass(frozen=True)
class EffectiveRank(PerLayerPolicy):
    """r = ⌈exp(H(p))⌉ with pᵢ = σᵢ/Σσ: the entropy effective rank (Roy & Vetterli 2007)."""

    def rank_for(self, layer: LayerSpectrum) -> int:
        s = layer.s.double()
        total = float(s.sum())
        if total == 0.0:
            return 1
        p = s[s > 0] / total
        erank = math.exp(float(-(p * p.log()).sum()))
        return max(1, math.ceil(erank - 1e-9))


@dataclass(frozen=True)
class StableRank(PerLayerPolicy):
    """r = ⌈multiplier · ξ · ‖W‖_F²/σ₁²⌉: the scaled stable rank of Cuttlefish (Wang et al., 2023).

    ξ is per layer, min(m, n)/srank(W₀) of the weights at initialization (`scales`, layer name →
    ξ). `LMDCompression(trigger="stable_rank")` measures them when training starts and fills them
    in when `scales` is None. Elsewhere `scales=None` means ξ = 1 for every layer (the plain stable
    rank, with a warning); given `scales` must name every layer truncated.
    """

    multiplier: float = 1.0  # on every layer's ξ·srank: > 1 keeps more, < 1 compresses harder
    scales: Mapping[str, float] | None = field(default=None, hash=False)  # layer name → ξ

    knob: ClassVar[str] = "multiplier"
    knob_range: ClassVar[tuple[float, float]] = (8.0, 0.125)

    def __post_init__(self) -> None:
        check_number(self.multiplier, "multiplier", 0, strict=True, finite=True)
        if self.scales is not None and not (
            isinstance(self.scales, Mapping) and all(_positive_finite(v) for v in self.scales.values())
        ):
            raise ValueError(f"`scales` must map layer names to finite numbers > 0, got {self.scales!r}")
        super().__post_init__()

    def _round_knob(self, k: int, rounds: int) -> float:
        raise ValueError("StableRank is relative to the weights at initialization, not to what is left; use rounds=1")

    def choose(self, layers: Sequence[LayerSpectrum]) -> list[int]:
        if self.scales is None:
            warnings.warn(
                "StableRank without `scales`: ξ = 1 for every layer, the plain stable rank "
                "(LMDCompression(trigger='stable_rank') measures Cuttlefish's ξ)",
                stacklevel=2,
            )
        else:
            missing = [layer.name for layer in layers if layer.name not in self.scales]
            if missing:
                raise ValueError(f"StableRank `scales` has no ξ for {missing}; it has {sorted(self.scales)}")
        return super().choose(layers)

    def rank_for(self, layer: LayerSpectrum) -> int:
        s2 = layer.s.double().square()
        if float(s2[0]) == 0.0:
            return 1
        scale = 1.0 if self.scales is None else float(self.scales[layer.name])
        return max(1, math.ceil(self.multiplier * scale * float(s2.sum() / s2[0]) - 1e-9))


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
