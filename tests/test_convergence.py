from __future__ import annotations

import math

import pytest
import torch

from lmd_lightning.monitors.convergence import ConvergenceMonitor, grad_norm


def test_grad_norm_is_the_global_norm() -> None:
    grads = [torch.randn(5, 3), torch.randn(7), None, torch.randn(2, 2, 2, dtype=torch.float64)]
    expected = math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None))
    assert float(grad_norm(grads)) == pytest.approx(expected, rel=1e-6)
    assert float(grad_norm([None])) == 0.0


def test_fires_on_decay_to_a_fraction_of_the_peak() -> None:
    monitor = ConvergenceMonitor(criterion="step", window=10, min_steps=20, rel_tol=0.05, plateau_tol=1e-9)
    step = 0
    while not monitor.update(10.0 * 0.97**step, step):  # ‖∇L‖ provably decays geometrically
        step += 1
        assert step < 1000
    assert "of its peak" in monitor.reason
    assert monitor.converged_step == step
    assert monitor.ema <= 0.05 * monitor.peak
    # 0.97^t reaches 5% of the first check's EMA near t = 103; the EMA lags ~10 steps; checks every 10.
    assert 100 <= step <= 130


def test_fires_on_plateau_after_patience_checks() -> None:
    monitor = ConvergenceMonitor(criterion="step", window=10, patience=3, plateau_tol=0.05, min_steps=0, rel_tol=0.0)
    gen = torch.Generator().manual_seed(0)
    fired = None
    for step in range(200):
        noise = float(torch.rand((), generator=gen)) * 0.1
        value = max(5.0 * 0.95**step, 0.4) + 0.4 * noise  # a decay, then a noisy plateau from t ≈ 50
        if monitor.update(value, step) and fired is None:
            fired = step
    assert fired is not None and "changed < 5%" in monitor.reason
    assert 50 + 3 * 10 <= fired < 150  # needs three quiet windows after the decay settles


def test_does_not_fire_on_noisy_non_converging_norms() -> None:
    monitor = ConvergenceMonitor(criterion="step", window=10, patience=3, plateau_tol=0.05, min_steps=0, rel_tol=0.05)
    gen = torch.Generator().manual_seed(1)
    for step in range(2000):
        # A slow oscillation with heavy noise: the EMA keeps moving by ≫ 5% per window.
        value = 2.0 + math.sin(step / 15.0) + float(torch.rand((), generator=gen))
        assert not monitor.update(value, step)


def test_min_steps_holds_back() -> None:
    monitor = ConvergenceMonitor(criterion="step", window=5, patience=1, min_steps=100, rel_tol=0.0)
    fired = next(step for step in range(1000) if monitor.update(1.0, step))
    assert fired == 99  # constant norms plateau at once, but not before 100 updates


def test_non_finite_norms_are_counted_and_ignored() -> None:
    monitor = ConvergenceMonitor(criterion="step", window=4, min_steps=0, rel_tol=0.5, patience=100)
    for step, value in enumerate([4.0, float("nan"), float("inf"), 4.0]):
        monitor.update(value, step)
    assert monitor.nonfinite == 2 and monitor.ema == pytest.approx(4.0)
    assert not monitor.converged
    for step in range(4, 8):
        monitor.update(float("nan"), step)
    assert not monitor.converged and monitor.nonfinite == 6
    # The epoch criterion: an epoch of only non-finite norms neither sets the peak nor fires.
    epochs = ConvergenceMonitor(min_steps=0, rel_tol=0.5)
    for step, value in enumerate([4.0, float("nan"), 4.0]):
        epochs.update(value, step)
    assert not epochs.end_epoch() and epochs.epoch_peak == pytest.approx(4.0)
    for step in range(3, 6):
        epochs.update(float("inf"), step)
    assert not epochs.end_epoch() and epochs.epoch_peak == pytest.approx(4.0) and epochs.nonfinite == 4


def test_state_dict_round_trip_continues_identically() -> None:
    def feed(monitor: ConvergenceMonitor, steps: range) -> list[bool]:
        return [monitor.update(3.0 * 0.98**s + 0.01 * (s % 7), s) for s in steps]

    reference = ConvergenceMonitor(criterion="step", window=10, min_steps=30, rel_tol=0.05, patience=3)
    expected = feed(reference, range(400))
    first = ConvergenceMonitor(criterion="step", window=10, min_steps=30, rel_tol=0.05, patience=3)
    head = feed(first, range(155))
    state = first.state_dict()
    assert len(state["pending"]) == 5  # 155 updates: 15 windows of 10 folded in, 5 pending
    lists = {"pending", "pending_ratios", "steps"}
    assert all(isinstance(v, (int, float, bool, str, type(None))) for k, v in state.items() if k not in lists)
    assert all(isinstance(v, float) for v in state["pending"]) and state["steps"] == [150, 151, 152, 153, 154]
    resumed = ConvergenceMonitor(criterion="step", window=10, min_steps=30, rel_tol=0.05, patience=3)
    resumed.load_state_dict(state)
    assert head + feed(resumed, range(155, 400)) == expected
    assert resumed.converged_step == reference.converged_step and resumed.reason == reference.reason


def test_reset_forgets() -> None:
    monitor = ConvergenceMonitor(criterion="step", window=1, patience=1, min_steps=0)
    monitor.update(1.0, 0)
    monitor.update(1.0, 1)
    assert monitor.converged
    monitor.reset()
    assert not monitor.converged and monitor.ema is None and monitor.peak == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": 1.0}, r"`beta` must be a number in \[0.0, 1.0\), got 1.0"),
        ({"window": 0}, r"`window` must be an int in \[1, inf\), got 0"),
        ({"window": 2.5}, r"`window` must be an int"),
        ({"plateau_tol": 0}, r"`plateau_tol` must be a number in \(0.0, inf\), got 0"),
        ({"patience": 0}, r"`patience` must be an int in \[1, inf\), got 0"),
        ({"rel_tol": 1.5}, r"`rel_tol` must be a number in \[0.0, 1.0\), got 1.5"),
        ({"min_steps": -1}, r"`min_steps` must be an int in \[0, inf\), got -1"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ConvergenceMonitor(**kwargs)


def test_windows_of_only_non_finite_norms_are_no_plateau() -> None:
    monitor = ConvergenceMonitor(criterion="step", window=10, patience=3, min_steps=0, rel_tol=0.0)
    for step in range(30):
        monitor.update(5.0 - 0.1 * step, step)
    for step in range(30, 70):
        assert not monitor.update(float("nan"), step)
    assert monitor.nonfinite == 40 and monitor.streak < 3


def test_all_zero_norms_do_not_divide_by_zero() -> None:
    monitor = ConvergenceMonitor(criterion="step", window=10, patience=100, min_steps=0)
    for step in range(30):
        assert not monitor.update(0.0, step)
    assert monitor.ema == 0.0
    epochs = ConvergenceMonitor(min_steps=0)  # a zero peak epoch mean has nothing to decay from: no fire
    for step in range(10):
        epochs.update(0.0, step)
    assert not epochs.end_epoch() and epochs.epochs == 1 and epochs.epoch_peak == 0.0


def test_sparse_measurements_mean_the_same_in_steps() -> None:
    """A norm every 4th step: windows, min_steps and the EMA's time constant are counted in steps."""
    dense = ConvergenceMonitor(criterion="step", window=20, min_steps=40, rel_tol=0.05, patience=100)
    sparse = ConvergenceMonitor(criterion="step", window=20, min_steps=40, rel_tol=0.05, patience=100)
    fired_dense = next(s for s in range(2000) if dense.update(10.0 * 0.98**s, s))
    fired_sparse = next(s for s in range(0, 2000, 4) if sparse.update(10.0 * 0.98**s, s))
    assert sparse.calls * 4 == pytest.approx(dense.calls, abs=4)
    assert abs(fired_sparse - fired_dense) <= 20  # within one window
    # Per-step decay: after a long gap the old norms weigh almost nothing.
    gap = ConvergenceMonitor(criterion="step", window=1, min_steps=10**9, beta=0.9)
    gap.update(100.0, 0)
    gap.update(1.0, 100)
    assert gap.ema == pytest.approx(1.0, rel=1e-2)


def feed_epochs(monitor: ConvergenceMonitor, means: list[float], steps: int = 10) -> int | None:
    """Epochs of `steps` norms each, alternating mean ± 50% (heavy step noise): the epoch it fires at (1-based)."""
    step = 0
    for epoch, mean in enumerate(means):
        for i in range(steps):
            monitor.update(mean * (1.5 if i % 2 else 0.5), step)
            step += 1
        if monitor.end_epoch():
            return epoch + 1
    return None


def test_epoch_criterion_fires_on_the_epoch_mean_against_its_peak() -> None:
    # Peak epoch mean 8 (epoch 2); 0.75 is 9.4% of it: fires at epoch 5, not at 0.9 (11%) in epoch 4.
    assert ConvergenceMonitor().criterion == "epoch" and ConvergenceMonitor().rel_tol == 0.12
    monitor = ConvergenceMonitor(criterion="epoch", min_steps=0, rel_tol=0.1)
    assert feed_epochs(monitor, [4.0, 8.0, 2.0, 0.9, 0.75, 0.1]) == 5
    assert monitor.epochs == 5 and monitor.epoch_peak == pytest.approx(8.0)
    assert monitor.last_epoch_mean == pytest.approx(0.75) and "9.4% of its peak" in monitor.reason
    assert monitor.converged_step == 49  # the last step of epoch 5
    # update() alone never fires it, however far the norms fall
    silent = ConvergenceMonitor(criterion="epoch", min_steps=0, window=5)
    assert not any(silent.update(10.0 * 0.5**s, s) for s in range(200))


def test_epoch_criterion_respects_min_steps_and_skips_epochs_without_norms() -> None:
    held = ConvergenceMonitor(criterion="epoch", min_steps=45, rel_tol=0.1)
    assert feed_epochs(held, [8.0, 0.5, 0.5, 0.5, 0.5, 0.5]) == 5  # steps 0–49: the 45th norm is in epoch 5
    empty = ConvergenceMonitor(criterion="epoch", min_steps=0)
    empty.update(float("nan"), 0)
    assert not empty.end_epoch() and empty.epochs == 0  # an epoch of only NaN is not counted
    assert not empty.end_epoch()  # and one with no norm at all neither


def test_epoch_state_survives_a_checkpoint_mid_epoch() -> None:
    means = [4.0, 8.0, 3.0, 1.0, 0.7, 0.3]
    straight = feed_epochs(ConvergenceMonitor(criterion="epoch", min_steps=0, window=4, rel_tol=0.1), means)
    first = ConvergenceMonitor(criterion="epoch", min_steps=0, window=4, rel_tol=0.1)
    feed_epochs(first, means[:2])
    for step in range(20, 27):  # 7 norms of epoch 3 (one window folded, three pending)
        first.update(3.0, step)
    state = first.state_dict()
    assert state["epoch_count"] == 4 and len(state["pending"]) == 3 and state["epoch_peak"] == pytest.approx(8.0)
    resumed = ConvergenceMonitor(criterion="epoch", min_steps=0, window=4, rel_tol=0.1)
    resumed.load_state_dict(state)
    for step in range(27, 30):
        resumed.update(3.0, step)
    assert resumed.end_epoch() is False and resumed.last_epoch_mean == pytest.approx(3.0)
    step, fired = 30, None
    for epoch, mean in enumerate(means[3:], start=4):
        for _ in range(10):
            resumed.update(mean, step)
            step += 1
        if resumed.end_epoch():
            fired = epoch
            break
    assert fired == straight == 5  # 0.7 ≤ 10% of 8
    old = {k: v for k, v in state.items() if k not in {"epoch_sum", "epoch_count", "epochs", "epoch_peak"}}
    old.pop("last_epoch_mean")
    ConvergenceMonitor(criterion="epoch").load_state_dict(old)  # a checkpoint written before the epoch criterion
    assert ConvergenceMonitor(criterion="epoch").rel_tol == 0.12


def test_invalid_criterion() -> None:
    with pytest.raises(ValueError, match=r"`criterion` must be one of \('epoch', 'step'\), got 'epochs'"):
        ConvergenceMonitor(criterion="epochs")
