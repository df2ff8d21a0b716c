"""StableRankMonitor (the Cuttlefish switch), the StableRank policy and LMDCompression(trigger="stable_rank")."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from lmd_lightning import EnergyRank, FactoredLinear, LMDCompression, StableRank, StableRankMonitor, compress_
from lmd_lightning.monitors.stable_rank import spectral_norm, stable_rank
from lmd_lightning.truncate.policies import LayerSpectrum
from tests.lightning_models import LitMLP, loaders, trainer


def matrix_with_spectrum(s: list[float], m: int = 40, n: int = 30, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g))
    q2, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g))
    return q1 @ torch.diag(torch.tensor(s)) @ q2.T


def test_spectral_norm_by_power_iteration_matches_the_exact_one_and_warm_starts() -> None:
    w = matrix_with_spectrum([5.0, 3.0, 2.0, 1.0, 0.5])
    sigma, v = spectral_norm(w, iterations=30)
    assert sigma == pytest.approx(5.0, rel=1e-5)
    again, _ = spectral_norm(w, iterations=1, vector=v)  # warm: one iteration from the last vector suffices
    assert again == pytest.approx(5.0, rel=1e-6)
    assert stable_rank(w, sigma) == pytest.approx((25 + 9 + 4 + 1 + 0.25) / 25, rel=1e-4)
    assert stable_rank(torch.zeros(3, 3), 0.0) == 0.0


def test_start_measures_xi_from_the_initial_weights() -> None:
    gaussian = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) / 16
    low = matrix_with_spectrum([4.0, 2.0, 1.0])  # (40, 30), srank = 21/16
    monitor = StableRankMonitor()
    monitor.start({"wide": gaussian, "low": low})
    exact = {"wide": stable_rank(gaussian, float(torch.linalg.matrix_norm(gaussian, 2))), "low": 21 / 16}
    assert monitor.scales["low"] == pytest.approx(30 / exact["low"], rel=1e-4)
    assert monitor.scales["wide"] == pytest.approx(256 / exact["wide"], rel=0.02)
    assert 3.0 < monitor.scales["wide"] < 5.0  # Marchenko–Pastur: srank of an n×n Gaussian ≈ n/4
    assert monitor.ema == {} and not monitor.converged  # W₀ gives ξ only: the EMA starts after an epoch


def test_converges_when_the_stable_ranks_stop_moving_and_not_while_they_move() -> None:
    a, b = matrix_with_spectrum([4.0, 2.0, 1.0]), matrix_with_spectrum([4.0, 4.0, 4.0])  # srank 21/16 and 3
    gaussian = torch.randn(40, 30, generator=torch.Generator().manual_seed(1))  # srank ≈ 8, far from a's 1.3
    still = StableRankMonitor(patience=2)
    still.start({"layer": gaussian})
    # however far the weights moved from W₀, the switch comes `patience` epochs after they stop moving
    assert [still.update({"layer": a}, epoch) for epoch in range(4)] == [False, False, True, True]
    assert still.converged_epoch == 2 and still.change == pytest.approx(0.0, abs=1e-5)
    assert still.reason == "stable ranks changed < 2% per epoch for 2 epochs"
    moving = StableRankMonitor(beta=0.5, tol=0.02, patience=1)
    moving.start({"layer": a})
    assert not any(moving.update({"layer": a if epoch % 2 else b}, epoch) for epoch in range(6))
    assert moving.change > 0.1 and moving.streak == 0
    ema = 3.0  # the first measurement (b)
    for value in (21 / 16, 3, 21 / 16, 3, 21 / 16):  # β = 0.5 over a, b, a, b, a
        ema = 0.5 * ema + 0.5 * value
    assert moving.ema["layer"] == pytest.approx(ema, rel=1e-4)
    moving.retract()  # what a process does when another has not converged
    assert not moving.converged and moving.converged_epoch is None and moving.reason is None


def test_state_dict_round_trip_and_a_cold_restart_measures_as_accurately() -> None:
    monitor = StableRankMonitor(patience=1, power_iterations=1)
    w = matrix_with_spectrum([5.0, 3.0, 2.0, 1.0, 0.5])  # srank = 39.25/25 = 1.57
    monitor.start({"layer": w})
    assert not monitor.update({"layer": w}, 0)
    state = monitor.state_dict()
    restored = StableRankMonitor(patience=1, power_iterations=1)
    restored.load_state_dict(torch.load(_saved(state), weights_only=True))
    assert restored.state_dict() == state and restored.started
    assert restored.ema == pytest.approx({"layer": 1.57}, rel=1e-3)
    # no warm-start vector after a restore: 10 iterations instead of 1, so the measurement stays exact
    assert restored.update({"layer": w}, 1) and restored.latest["layer"] == pytest.approx(39.25 / 25, rel=1e-4)


def test_non_finite_weights_and_no_layers_raise() -> None:
    with pytest.raises(ValueError, match=r"layer 'bad' has non-finite weights"):
        StableRankMonitor().start({"bad": torch.full((3, 3), float("nan"))})
    with pytest.raises(ValueError, match=r"needs at least one layer"):
        StableRankMonitor().start({})


def _saved(state: dict):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": 1.0}, r"`beta` must be a number in \[0.0, 1.0\), got 1.0"),
        ({"tol": 0.0}, r"`tol` must be a number in \(0.0, inf\), got 0.0"),
        ({"patience": 0}, r"`patience` must be an int in \[1, inf\), got 0"),
        ({"power_iterations": 2.5}, r"`power_iterations` must be an int in \[1, inf\), got 2.5"),
    ],
)
def test_monitor_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StableRankMonitor(**kwargs)


def spectrum(name: str, s: list[float]) -> LayerSpectrum:
    s = torch.tensor(s)
    return LayerSpectrum(name, (40, 30), s, len(s), 70, 1200)


def test_stable_rank_policy_scales_the_stable_rank() -> None:
    layer = spectrum("fc", [4.0, 2.0, 1.0, 1.0])  # srank = 22/16 = 1.375
    assert StableRank(scales={"fc": 2.0}).choose([layer]) == [3]  # ⌈2.75⌉
    assert StableRank(multiplier=2.0, scales={"fc": 1.5}).choose([layer]) == [4]  # ⌈4.125⌉ clamped to 4
    with pytest.warns(UserWarning, match=r"StableRank without `scales`: ξ = 1 for every layer"):
        assert StableRank().choose([layer, spectrum("zero", [0.0, 0.0])]) == [2, 1]  # ⌈1.375⌉; a zero layer keeps 1
    with pytest.raises(ValueError, match=r"`scales` has no ξ for \['fc'\]; it has \['other'\]"):
        StableRank(scales={"other": 9.0}).choose([layer])
    assert StableRank(multiplier=3.0, scales={"fc": 1.0}).with_knob(0.5).multiplier == 0.5
    assert hash(StableRank(scales={"fc": 1.0})) == hash(StableRank(scales={"fc": 2.0}))  # a dict field, hashable policy


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"multiplier": 0}, r"`multiplier` must be a finite number > 0, got 0"),
        ({"multiplier": True}, r"`multiplier` must be a finite number > 0, got True"),
        ({"multiplier": float("inf")}, r"`multiplier` must be a finite number > 0, got inf"),
        ({"scales": {"fc": -1.0}}, r"`scales` must map layer names to finite numbers > 0, got \{'fc': -1.0\}"),
        ({"scales": [1.0]}, r"`scales` must map layer names to finite numbers > 0"),
    ],
)
def test_stable_rank_policy_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StableRank(**kwargs)


class WeightsAtEpochStart(pl.Callback):
    """The dense weights each epoch begins with (runs before LMDCompression in the callback list)."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch not in self.weights and not any(isinstance(m, FactoredLinear) for m in pl_module.net):
            net = pl_module.net
            self.weights[trainer.current_epoch] = {
                "net.0": net[0].weight.detach().clone(),
                "net.2": net[2].weight.detach().clone(),
            }


def fit(lmd: LMDCompression, max_epochs: int = 6) -> tuple[LitMLP, WeightsAtEpochStart]:
    pl.seed_everything(0, verbose=False)
    model, seen = LitMLP(max_epochs=max_epochs), WeightsAtEpochStart()
    train, val = loaders()
    init = {"net.0": model.net[0].weight.detach().clone(), "net.2": model.net[2].weight.detach().clone()}
    seen.weights[-1] = init
    trainer(max_epochs, [seen, lmd]).fit(model, train, val)
    return model, seen


def test_stable_rank_trigger_compresses_once_settled_with_cuttlefish_ranks() -> None:
    monitor = StableRankMonitor(tol=0.5, patience=1)
    lmd = LMDCompression(
        StableRank(multiplier=0.5), trigger=monitor, min_epochs=1, exclude="net.4", metric="weight"
    )  # Cuttlefish's ranks are those of the weights
    model, seen = fit(lmd)
    # epoch 1 starts with the first measurement (after epoch 0), epoch 2 with the first change: < 50%
    assert lmd.compressed_epochs == [2] and lmd.reports[0]["trigger"].startswith("stable ranks changed < 50%")
    for name, index in (("net.0", 0), ("net.2", 2)):
        w0 = seen.weights[-1][name]
        xi = min(w0.shape) / stable_rank(w0, float(torch.linalg.matrix_norm(w0, 2)))
        assert lmd.stable_ranks.scales[name] == pytest.approx(xi, rel=1e-3)
        w = seen.weights[2][name]  # what was truncated at the start of epoch 2
        expected = math.ceil(0.5 * xi * stable_rank(w, float(torch.linalg.matrix_norm(w, 2))))
        m, n = w.shape
        if expected < m * n / (m + n):
            assert lmd.ranks[name] == expected and isinstance(model.net[index], FactoredLinear)
        else:  # the break-even guard keeps it dense
            assert name not in lmd.ranks and type(model.net[index]) is torch.nn.Linear
    assert lmd.ranks  # at least one layer really was truncated
    assert "scales={'net.0'" in lmd.reports[0]["policy"]


def test_stable_rank_trigger_is_forced_when_the_ranks_keep_moving() -> None:
    lmd = LMDCompression(EnergyRank(0.9), trigger="stable_rank", exclude="net.4")
    lmd.stable_ranks.tol = 1e-9  # never settles
    fit(lmd)
    assert lmd.compressed_epochs == [4] and lmd.reports[0]["trigger"] == "epoch 4 reached"  # 2/3 of 6 epochs
    resumed = LMDCompression(EnergyRank(0.9), trigger="stable_rank", exclude="net.4")
    resumed.load_state_dict(torch.load(_saved(lmd.state_dict()), weights_only=True))
    assert resumed.stable_ranks.scales == lmd.stable_ranks.scales and resumed.stable_ranks.ema == lmd.stable_ranks.ema
    assert len(lmd.stable_ranks.ema) == 2 and lmd.stable_ranks.change > 1e-9  # both layers measured, still moving


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"trigger": "stable_rank", "rounds": 2, "policy": EnergyRank(0.5)},
            r"`rounds`=2: the stable-rank trigger switches once",
        ),
        ({"policy": StableRank(), "rounds": 2}, r"StableRank is relative to the weights at initialization"),
        ({"trigger": "cuttlefish"}, r"`trigger` must be one of \('grad_norm', 'epoch', 'stable_rank'\)"),
    ],
)
def test_callback_rejects_stable_rank_misuse(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LMDCompression(**{"policy": StableRank(), **kwargs})


def test_compress_with_stable_rank_outside_the_callback_warns_and_uses_the_plain_stable_rank() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(30, 40))
    with torch.no_grad():
        model[0].weight.copy_(matrix_with_spectrum([4.0, 2.0, 1.0]))
    with pytest.warns(UserWarning, match="ξ = 1 for every layer"):
        report = compress_(model, StableRank(multiplier=2.0))
    assert report.layers[0].rank == math.ceil(2 * 21 / 16)
