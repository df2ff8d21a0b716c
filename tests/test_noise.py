"""The noise-aware ‖∇L‖ statistic: per-sample gradient norms, the estimates, the monitor's criterion, the callback."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning_models import LitMLP, loaders, trainer
from torch import nn

from lmd_lightning import EnergyRank, LMDCompression
from lmd_lightning.monitors.convergence import ConvergenceMonitor
from lmd_lightning.monitors.noise import PerSampleNorms, measurable, noise_estimates


def brute_force(model: nn.Module, loss_of, batch: int, params: list[nn.Parameter]) -> float:
    """Σᵢ‖cᵢ‖² from B separate backward passes: cᵢ is sample i's share of the batch-mean loss's gradient."""
    total = 0.0
    for i in range(batch):
        grads = torch.autograd.grad(loss_of(slice(i, i + 1)) / batch, params)
        total += sum(float(g.double().square().sum()) for g in grads)
    return total


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Linear(6, 5), (7, 6)),
        (nn.Linear(6, 5), (7, 3, 6)),  # tokens: T·(n+m) = 33 > n·m = 30, explicit route
        (nn.Linear(16, 12), (7, 2, 16)),  # tokens: T·(n+m) = 56 ≤ n·m = 192, Gram route
        (nn.Linear(6, 5, bias=False), (7, 4, 2, 6)),
        (nn.Conv1d(3, 4, 3, stride=2, padding=1), (7, 3, 10)),
        (nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), (7, 2, 6, 5)),
    ],
)
def test_per_sample_squares_match_per_sample_backward_passes(layer: nn.Module, shape: tuple) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape)
    target = torch.randn_like(layer(x))

    def loss_of(rows: slice) -> torch.Tensor:
        return 0.5 * (layer(x[rows]) - target[rows]).square().sum() * 1.0

    meter = PerSampleNorms({"layer": layer})
    meter.arm()
    loss = loss_of(slice(None)) / shape[0]
    loss.backward()
    got = meter.take()
    meter.disarm()
    params = list(meter.parameters())
    assert len(params) == (2 if layer.bias is not None else 1)
    want = brute_force(layer, loss_of, shape[0], params)
    assert float(got) == pytest.approx(want, rel=1e-6)


def test_in_place_activation_after_the_layer_and_disarmed_steps() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    meter = PerSampleNorms.of(model)
    assert set(meter.layers) == {"0", "2"}

    def loss_of(rows: slice) -> torch.Tensor:
        return F.cross_entropy(model(x[rows]), y[rows], reduction="sum")

    meter.arm()
    (loss_of(slice(None)) / 9).backward()
    got = meter.take()
    meter.disarm()
    assert not any(m._forward_hooks for m in model.modules())
    assert float(got) == pytest.approx(brute_force(model, loss_of, 9, list(meter.parameters())), rel=1e-6)
    (loss_of(slice(None)) / 9).backward()  # disarmed: nothing is taken
    assert meter.take() is None


def test_hf_conv1d_and_a_gpt2_with_its_tied_head_left_out() -> None:
    """GPT-2's Conv1D layers are measured exactly; lm_head, tied to the token embedding, is not measured."""
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(2)
    layer, x = Conv1D(5, 6), torch.randn(7, 3, 6)  # nf=5 outputs, nx=6 inputs, 3 tokens
    target = torch.randn(7, 3, 5)

    def layer_loss(rows: slice) -> torch.Tensor:
        return 0.5 * (layer(x[rows]) - target[rows]).square().sum()

    meter = PerSampleNorms({"layer": layer})
    assert measurable(layer)
    meter.arm()
    (layer_loss(slice(None)) / 7).backward()
    assert float(meter.take()) == pytest.approx(brute_force(layer, layer_loss, 7, list(meter.parameters())), rel=1e-6)
    meter.disarm()

    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=8, bos_token_id=0, eos_token_id=0
    )
    config.attn_pdrop = config.resid_pdrop = config.embd_pdrop = 0.0
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 40, (5, 8))
    meter = PerSampleNorms.of(model)
    assert "lm_head" not in meter.layers and len(meter.layers) == 8  # c_attn, c_proj, c_fc, c_proj per block

    def lm_loss(rows: slice) -> torch.Tensor:
        logits = model(ids[rows]).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, 40), ids[rows, 1:].reshape(-1), reduction="sum") / 7

    meter.arm()
    (lm_loss(slice(None)) / 5).backward()
    got = meter.take()
    meter.disarm()
    assert float(got) == pytest.approx(brute_force(model, lm_loss, 5, list(meter.parameters())), rel=1e-5)


def test_what_is_measurable() -> None:
    assert measurable(nn.Linear(3, 4)) and measurable(nn.Conv2d(2, 2, 3))
    assert not measurable(nn.Conv2d(4, 4, 3, groups=2))
    assert not measurable(nn.Conv1d(2, 2, 3, padding="same"))
    assert not measurable(nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular"))
    assert not measurable(nn.Embedding(5, 3)) and not measurable(nn.LayerNorm(3))
    tied = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    tied[1].weight = tied[0].weight
    assert set(PerSampleNorms.of(tied).layers) == set()
    frozen = nn.Linear(3, 3).requires_grad_(False)
    assert not measurable(frozen)


def test_estimates_are_unbiased_for_known_signal_and_noise() -> None:
    """Per-sample gradients G + noise: the estimates' means come within 2% of ‖G‖² and tr Σ."""
    gen = torch.Generator().manual_seed(0)
    dim, batch, trials = 200, 16, 4000
    signal = torch.randn(dim, generator=gen, dtype=torch.float64) * 0.3  # ‖G‖² ≈ 18
    scales = torch.linspace(0.5, 1.5, dim, dtype=torch.float64)  # a diagonal Σ, tr Σ = Σ scales²
    estimates = torch.zeros(2, dtype=torch.float64)
    for _ in range(trials):
        grads = signal + torch.randn(batch, dim, generator=gen, dtype=torch.float64) * scales  # (B, D)
        c = grads / batch  # shares of the mean
        estimates += noise_estimates(c.sum(0).square().sum(), c.square().sum(), batch)
    estimates /= trials
    assert float(estimates[0]) == pytest.approx(float(signal.square().sum()), rel=0.02)
    assert float(estimates[1]) == pytest.approx(float(scales.square().sum()), rel=0.02)


def feed(monitor: ConvergenceMonitor, ratios, start: int = 0) -> int | None:
    for step, ratio in enumerate(ratios, start=start):
        if monitor.update(1.0, step, ratio=ratio):
            return step
    return None


def test_noise_criterion_fires_after_patience_checks_below_the_threshold() -> None:
    monitor = ConvergenceMonitor("step", window=10, min_steps=0, noise_tol=5.0, noise_beta=0.5, noise_patience=2)
    assert feed(monitor, [20.0] * 100) is None  # a constant ‖g‖ would have fired the plateau rule by now
    assert monitor.noise_ratio == pytest.approx(20.0)
    fired = feed(monitor, [1.0] * 40, start=100)
    assert fired == 119  # checks at 109 (1st below), 119 (2nd): patience 2
    assert monitor.reason.startswith("noise ratio") and monitor.noise_streak == 2


def test_noise_criterion_falls_back_without_ratios_and_needs_min_steps() -> None:
    fallback = ConvergenceMonitor(criterion="step", window=10, min_steps=0, patience=2, noise_tol=5.0)
    assert feed(fallback, [None] * 100) is not None and fallback.reason.startswith("‖∇L‖ EMA changed")
    held = ConvergenceMonitor(window=10, min_steps=60, noise_tol=5.0, noise_patience=1)
    assert feed(held, [1.0] * 100) == 59


def test_noise_state_survives_a_checkpoint_mid_window() -> None:
    ratios = [30.0 - 0.25 * i for i in range(200)]
    straight = ConvergenceMonitor(window=10, min_steps=0, noise_tol=5.0)
    want = feed(straight, ratios)
    first = ConvergenceMonitor(window=10, min_steps=0, noise_tol=5.0)
    assert feed(first, ratios[:55]) is None
    resumed = ConvergenceMonitor(window=10, min_steps=0, noise_tol=5.0)
    resumed.load_state_dict(first.state_dict())
    assert feed(resumed, ratios[55:], start=55) == want and want is not None
    assert resumed.noise_ratio == pytest.approx(straight.noise_ratio)
    old = first.state_dict()
    for key in ("pending_ratios", "ratio_raw", "ratio_weight", "ratio_step", "noise_streak"):
        del old[key]  # a checkpoint written before the noise criterion existed
    ConvergenceMonitor(window=10, noise_tol=5.0).load_state_dict(old)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"noise_tol": 0.0}, "noise_tol"),
        ({"noise_tol": -1.0}, "noise_tol"),
        ({"noise_beta": 1.0}, "noise_beta"),
        ({"noise_patience": 0}, "noise_patience"),
    ],
)
def test_invalid_noise_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ConvergenceMonitor(**kwargs)


def fit_with(monitor: ConvergenceMonitor, epochs: int, **kwargs) -> tuple[LMDCompression, LitMLP]:
    torch.manual_seed(0)
    model = LitMLP(max_epochs=epochs)
    callback = LMDCompression(EnergyRank(0.9), trigger=monitor, metric="weight", every_n_steps=2, **kwargs)
    train, val = loaders()
    trainer(epochs, [callback]).fit(model, train, val)
    return callback, model


def test_callback_fires_on_the_noise_ratio_and_leaves_no_hooks() -> None:
    """13 steps an epoch, ρ measured on even steps, checks every 6 steps (6, 12, 18, …): with a threshold
    above any ρ the first check past min_steps=14 fires, at step 18 in epoch 1; compression follows at 2
    (at 1 had it been the step-12 check, which min_steps holds back)."""
    monitor = ConvergenceMonitor(window=6, min_steps=14, noise_tol=1e12, noise_patience=1)
    callback, model = fit_with(monitor, epochs=6)
    assert callback.compressed_epoch == 2
    assert callback.reports[0]["trigger"].startswith("noise ratio")
    assert not any(m._forward_hooks for m in model.modules())


def test_callback_ratio_is_finite_and_below_threshold_never_fires() -> None:
    """A threshold below any ρ never fires (nor does the fallback: ratios arrive); the EMA is a finite ρ > 0."""
    monitor = ConvergenceMonitor(window=6, min_steps=10, noise_tol=1e-12)
    callback, model = fit_with(monitor, epochs=3, max_epochs=5)
    assert not monitor.converged and not callback.compressed
    assert monitor.noise_ratio is not None and math.isfinite(monitor.noise_ratio) and monitor.noise_ratio > 0
    assert not any(m._forward_hooks for m in model.modules())
