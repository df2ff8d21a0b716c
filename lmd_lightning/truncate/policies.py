"""Rank policies: rules over a layer's singular spectrum (LMD.md section 2).

A policy sees every targeted layer at once as a `LayerSpectrum` and returns one rank per
layer. Per-layer policies implement `rank_for`; the budget policies (`GlobalBudget`,
`UniformRank`) live in `budget.py`. All honour `min_rank`/`max_rank`; the break-even guard (factor only when
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
    "LayerSpectrum",
    "PerLayerPolicy",
    "RankPolicy",
    "RankRatio",
    "StableRank",
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
