from __future__ import annotations

import math

import pytest
import torch

from lmd_lightning import EffectiveRank, EnergyRank, ErrorBound, FixedRank, GlobalBudget, RankRatio, UniformRank
from lmd_lightning.truncate.policies import LayerSpectrum


def layer(s: list[float] | torch.Tensor, shape: tuple[int, int] = (64, 64), name: str = "fc") -> LayerSpectrum:
    s = torch.as_tensor(s, dtype=torch.float64)
    out_dim, fan_in = shape
    return LayerSpectrum(name, shape, s, min(shape), out_dim + fan_in, out_dim * fan_in)


def test_fixed_rank_and_ratio() -> None:
    spectra = [layer(torch.ones(64)), layer(torch.ones(10), (10, 30))]
    assert FixedRank(16).choose(spectra) == [16, 10]
    assert RankRatio(0.25).choose(spectra) == [16, 2]
    assert RankRatio(0.01).choose(spectra) == [1, 1]
    assert not FixedRank(3).needs_spectrum and not RankRatio(0.5).needs_spectrum


def test_energy_rank_on_known_spectrum() -> None:
    s = [3.0, 2.0, 1.0, 1.0, 1.0]  # σ² = 9, 4, 1, 1, 1 → cumulative share 9/16, 13/16, 14/16, …
    assert EnergyRank(0.5).choose([layer(s)]) == [1]
    assert EnergyRank(0.8).choose([layer(s)]) == [2]
    assert EnergyRank(13 / 16).choose([layer(s)]) == [2]  # exactly reached counts
    assert EnergyRank(0.82).choose([layer(s)]) == [3]
    assert EnergyRank(0.99).choose([layer(s)]) == [5]


def test_error_bound_on_known_spectrum() -> None:
    s = [3.0, 2.0, 1.0, 1.0, 1.0]  # ‖W‖ = 4; tail norms after r=1..4: √7, √3, √2, 1
    assert ErrorBound(math.sqrt(3) / 4 + 1e-9).choose([layer(s)]) == [2]
    assert ErrorBound(math.sqrt(3) / 4 - 1e-3).choose([layer(s)]) == [3]
    assert ErrorBound(0.26).choose([layer(s)]) == [4]
    assert ErrorBound(0.9).choose([layer(s)]) == [1]


def test_effective_rank() -> None:
    assert EffectiveRank().choose([layer(torch.ones(12))]) == [12]  # flat: exp(log 12) = 12
    assert EffectiveRank().choose([layer([1.0, 0, 0, 0])]) == [1]
    # p = (1/2, 1/4, 1/4): H = 1.5 log 2, erank = 2^1.5 = 2.83 → 3
    assert EffectiveRank().choose([layer([2.0, 1.0, 1.0])]) == [3]


def test_min_and_max_rank_clamp() -> None:
    s = torch.logspace(0, -3, 32)
    assert EnergyRank(0.5, min_rank=6).choose([layer(s)]) == [6]
    assert EnergyRank(0.9999, max_rank=4).choose([layer(s)]) == [4]
    assert FixedRank(8, min_rank=2, max_rank=5).choose([layer(s)]) == [5]
    # Never above the layer's own maximum, even when min_rank is.
    assert FixedRank(2, min_rank=20).choose([layer(torch.ones(10), (10, 10))]) == [10]


def _relative_sq_error(sp: LayerSpectrum, rank: int) -> float:
    s2 = sp.s.square()
    return float(s2[rank:].sum() / s2.sum())


def test_global_budget_spends_where_error_is_cheapest() -> None:
    slow = layer(torch.linspace(1.0, 0.1, 64) ** 2, (64, 64), "slow")
    steep = layer(torch.logspace(0, -4, 64), (64, 64), "steep")  # nearly low-rank
    ranks = GlobalBudget(params=0.25).choose([slow, steep])
    assert ranks[0] > ranks[1]  # the steep layer gives up its tail first
    spent = slow.cost_at(ranks[0]) + steep.cost_at(ranks[1])
    greedy = _relative_sq_error(slow, ranks[0]) + _relative_sq_error(steep, ranks[1])
    # Every split of the same number of rank units is no better (equal cost per unit here).
    units = ranks[0] + ranks[1]
    assert spent <= 0.25 * 2 * 64 * 64
    for a in range(1, units):
        assert greedy <= _relative_sq_error(slow, a) + _relative_sq_error(steep, units - a) + 1e-12


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.35, 0.5])
@pytest.mark.parametrize("kind", ["params", "flops"])
def test_global_budget_meets_target_within_one_layer_granularity(fraction: float, kind: str) -> None:
    gen = torch.Generator().manual_seed(1)
    shapes = [(256, 128), (128, 128), (512, 64), (10, 128)]
    spectra = [
        layer(torch.rand(min(sh), generator=gen).sort(descending=True).values ** 3, sh, f"l{i}")
        for i, sh in enumerate(shapes)
    ]
    policy = GlobalBudget(**{kind: fraction})
    ranks = policy.choose(spectra)
    total = sum(sp.cost_at(r) for sp, r in zip(spectra, ranks))
    original = sum(sp.cost_now for sp in spectra)
    assert total <= fraction * original
    granularity = max(sp.cost_per_rank for sp in spectra)
    assert total >= fraction * original - granularity


def test_global_budget_respects_break_even() -> None:
    # A square layer factored above rank n/2 costs more than dense: the budget counts it as dense.
    sp = layer(torch.ones(64), (64, 64))
    assert sp.cost_at(40) == 64 * 64 and sp.cost_at(20) == 20 * 128


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: FixedRank(0), r"`rank` must be an int >= 1, got 0"),
        (lambda: FixedRank(2.5), r"`rank` must be an int >= 1, got 2.5"),
        (lambda: FixedRank(True), r"`rank` must be an int"),
        (lambda: RankRatio(0.0), r"`ratio` must be a float in \(0, 1\), got 0.0"),
        (lambda: RankRatio(1.5), r"`ratio` must be a float in \(0, 1\), got 1.5"),
        (lambda: EnergyRank(1.0), r"`energy` must be a float in \(0, 1\), got 1.0"),
        (lambda: EnergyRank("0.9"), r"`energy` must be a float in \(0, 1\), got '0.9'"),
        (lambda: ErrorBound(-0.1), r"`eps` must be a float in \(0, 1\), got -0.1"),
        (lambda: GlobalBudget(), r"give exactly one of `params` or `flops`"),
        (lambda: GlobalBudget(params=0.2, flops=0.2), r"give exactly one of `params` or `flops`"),
        (lambda: GlobalBudget(params=2), r"`params` must be a float in \(0, 1\), got 2"),
        (lambda: GlobalBudget(flops=0), r"`flops` must be a float in \(0, 1\), got 0"),
        (lambda: UniformRank(), r"give exactly one of `params` or `flops`"),
        (lambda: UniformRank(params=1.0), r"`params` must be a float in \(0, 1\), got 1.0"),
        (lambda: EffectiveRank(min_rank=0), r"`min_rank` must be an int >= 1, got 0"),
        (lambda: EnergyRank(0.9, min_rank=8, max_rank=4), r"`max_rank` \(4\) must be >= `min_rank` \(8\)"),
    ],
)
def test_invalid_arguments(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_params_budget_counts_biases_flops_budget_does_not() -> None:
    sp = LayerSpectrum("fc", (64, 64), torch.ones(64, dtype=torch.float64), 64, 128, 64 * 64, bias=64)
    assert sp.cost_at(10) == 64 + 10 * 128 and sp.cost_at(10, with_bias=False) == 10 * 128
    # params: (64 + 128·r) ≤ 0.25·(64 + 4096) → r = 7; flops: 128·r ≤ 0.25·4096 → r = 8.
    assert GlobalBudget(params=0.25).choose([sp]) == [7]
    assert GlobalBudget(flops=0.25).choose([sp]) == [8]


def test_unattainable_budget_warns_and_returns_the_most_compressive_ranks() -> None:
    sp = layer(torch.ones(64), (64, 64))
    with pytest.warns(UserWarning, match="cannot be met"):
        assert GlobalBudget(params=0.01, min_rank=16).choose([sp]) == [16]


def test_global_budget_costs_a_dense_layers_first_cut_to_break_even_as_one_step() -> None:
    """A layer ends at full rank or below its break-even rank m·n/(m+n), never at a rank that saves nothing."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(200, 200), (3985, 200), (200, 200), (96, 512), (64, 64)]
    for trial in range(20):
        spectra = [
            layer(torch.rand(min(sh), generator=gen).sort(descending=True).values ** (1 + trial % 4), sh, f"l{i}")
            for i, sh in enumerate(shapes)
        ]
        for fraction in (0.3, 0.5, 0.7):
            ranks = GlobalBudget(params=fraction).choose(spectra)
            for spectrum, rank in zip(spectra, ranks):
                m, n = spectrum.shape
                assert rank == min(m, n) or rank * (m + n) < m * n, (trial, fraction, spectrum.name, rank)


def test_uniform_rank_keeps_one_rank_the_largest_that_fits() -> None:
    # The MLP-1024's hidden layers (bias-free here): 40×1024 and two 1024×1024, 2,138,112 in all.
    spectra = [layer(torch.ones(40), (1024, 40), "fc1"), layer(torch.ones(1024), (1024, 1024), "fc2")]
    spectra.append(layer(torch.ones(1024), (1024, 1024), "fc3"))
    # 1/12 of 2,138,112 = 178,176; rank r costs 1064·r + 2·2048·r = 5160·r while fc1 saves (r < 39).
    assert UniformRank(params=1 / 12).choose(spectra) == [34, 34, 34]  # 5160·34 = 175,440; 35 → 180,600
    # The spectrum plays no part: a steep one gets the same ranks.
    steep = [layer(torch.logspace(0, -6, sp.max_rank), sp.shape, sp.name) for sp in spectra]
    assert UniformRank(params=1 / 12).choose(steep) == [34, 34, 34]
    assert UniformRank.needs_spectrum is False


def test_uniform_rank_counts_a_layer_that_would_not_save_at_its_cost_now() -> None:
    # fc1 (1024×40) saves only below rank 39: at rank 39 and above it costs its dense 40,960.
    spectra = [layer(torch.ones(40), (1024, 40), "fc1"), layer(torch.ones(1024), (1024, 1024), "fc2")]
    # 0.2 · (40,960 + 1,048,576) = 217,907: 40,960 + 2048·r ≤ 217,907 → r = 86, capped at 40 in fc1.
    assert UniformRank(params=0.2).choose(spectra) == [40, 86]
    assert UniformRank(params=0.2, max_rank=50).choose(spectra) == [40, 50]


def test_uniform_rank_budgets_params_with_biases_and_flops_without() -> None:
    sp = LayerSpectrum("fc", (64, 64), None, 64, 128, 64 * 64, bias=64)
    assert UniformRank(params=0.25).choose([sp]) == [7]  # 64 + 128·r ≤ 1,040
    assert UniformRank(flops=0.25).choose([sp]) == [8]  # 128·r ≤ 1,024


def test_uniform_rank_on_a_factored_model_keeps_a_share_of_what_is_left() -> None:
    # Already factored at rank 40 (cost 40·128 = 5,120): half of that is rank 20.
    factored = LayerSpectrum("fc", (64, 64), None, 40, 128, 40 * 128)
    assert UniformRank(params=0.5).choose([factored]) == [20]
    assert UniformRank(params=0.25).for_round(1, 2) == UniformRank(params=0.5)


def test_uniform_rank_that_cannot_be_met_warns_and_keeps_min_rank() -> None:
    sp = layer(torch.ones(64), (64, 64))
    with pytest.warns(UserWarning, match="cannot be met"):
        assert UniformRank(params=0.01, min_rank=16).choose([sp]) == [16]
    assert UniformRank(params=0.5).choose([]) == []
