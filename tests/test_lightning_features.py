"""The callback next to the rest of Lightning: AMP, accumulation, clipping, other callbacks, compile."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from lmd_lightning import ConvergenceMonitor, FactoredLinear, FixedRank, LMDCompression
from lmd_lightning.monitors.convergence import grad_norm
from tests.lightning_models import LitMLP, loaders, trainer


class NormProbe(pl.Callback):
    """What ‖∇L‖ the callback sees vs the norm right before clipping, per optimizer step."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.norms.append(float(grad_norm(p.grad for p in pl_module.parameters() if p.grad is not None)))


class RecordingMonitor(ConvergenceMonitor):
    """A ConvergenceMonitor that keeps every norm the callback hands it (and never fires)."""

    def __init__(self) -> None:
        super().__init__(min_steps=10**9)
        self.seen: list[tuple[int, float]] = []

    def update(self, grad_norm, step, layer_norms=None) -> bool:
        self.seen.append((step, float(grad_norm)))
        return super().update(grad_norm, step, layer_norms)


def test_bf16_accumulation_clipping_early_stopping_lr_monitor(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    probe = NormProbe()
    monitor = RecordingMonitor()
    lmd = LMDCompression(FixedRank(8), trigger=monitor, every_n_steps=1, min_epochs=1, max_epochs=1, exclude="net.4")
    callbacks = [lmd, probe, EarlyStopping("val_acc", mode="max", patience=10), LearningRateMonitor("step")]
    t = trainer(
        3,
        callbacks,
        precision="bf16-mixed",
        accumulate_grad_batches=2,
        gradient_clip_val=0.25,
        logger=CSVLogger(tmp_path),
        deterministic=False,
    )
    model = LitMLP(max_epochs=3)
    train, val = loaders()
    t.fit(model, train, val)
    assert lmd.compressed and lmd.compressed_epochs == [1] and isinstance(model.net[0], FactoredLinear)
    # One measurement per optimizer step, not per batch: 13 batches / 2 = 7 steps per epoch.
    assert len(probe.norms) == t.global_step == 3 * 7
    # The callback's own norms, until it compresses at epoch 1: one per optimizer step (steps 0…6),
    # each the accumulated gradient's norm as the probe reads it right before the step, unclipped
    # (clipping comes after the hook).
    assert [step for step, _ in monitor.seen] == list(range(7))
    assert [norm for _, norm in monitor.seen] == pytest.approx(probe.norms[:7], rel=1e-5)
    assert max(norm for _, norm in monitor.seen) > 0.25
    first, last = sum(probe.losses[:6]) / 6, sum(probe.losses[-6:]) / 6
    assert last < first - 0.02  # it still learns after the swap


def test_gradients_seen_are_unscaled_under_fp16_style_scaling() -> None:
    # Under "16-mixed" Lightning unscales before on_before_optimizer_step; CPU has no fp16 GradScaler,
    # so this checks the fused-optimizer path of gradient_unscale_factor directly.
    from lmd_lightning.callback.surgery import gradient_unscale_factor

    class FakeScaler:
        _scale = torch.tensor(1024.0)

    class FakePlugin:
        scaler = FakeScaler()

    class FakeTrainer:
        precision_plugin = FakePlugin()

    fused = torch.optim.Adam([nn.Parameter(torch.zeros(2))], fused=False)
    fused._step_supports_amp_scaling = True  # what fused=True sets on CUDA
    plain = torch.optim.Adam([nn.Parameter(torch.zeros(2))])
    assert float(gradient_unscale_factor(FakeTrainer(), fused)) == pytest.approx(1 / 1024)
    assert gradient_unscale_factor(FakeTrainer(), plain) is None


@pytest.mark.parametrize("averaging", ["StochasticWeightAveraging", "EMAWeightAveraging"])
def test_weight_averaging_is_refused(averaging: str) -> None:
    if not hasattr(pl.callbacks, averaging):
        pytest.skip(f"this Lightning has no {averaging} (EMA weight averaging came in 2.6)")
    make = getattr(pl.callbacks, averaging)
    callback = make(swa_lrs=0.01) if averaging == "StochasticWeightAveraging" else make()
    train, val = loaders()
    model = LitMLP(max_epochs=2)
    t = trainer(2, [LMDCompression(FixedRank(4)), callback])
    with pytest.raises(ValueError, match=rf"cannot run with \['{averaging}'\]"):
        t.fit(model, train, val)
    assert type(model.net[0]) is nn.Linear and t.global_step == 0  # refused at setup, before any step


class CompiledBlock(LitMLP):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = torch.compile(self.net)


@pytest.mark.slow
def test_compiled_submodule_recompiles_and_stays_correct() -> None:
    pl.seed_everything(0, verbose=False)
    model = CompiledBlock(max_epochs=2)
    lmd = LMDCompression(FixedRank(8), trigger="epoch", min_epochs=1, exclude="*.4")
    train, val = loaders()
    trainer(2, [lmd], deterministic=False).fit(model, train, val)
    inner = model.net._orig_mod
    assert isinstance(inner[0], FactoredLinear)
    x = torch.randn(7, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.net(x), inner(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_sharded_strategies_are_refused_at_setup(strategy: str) -> None:
    import pytorch_lightning.strategies as strategies

    from lmd_lightning.callback import surgery

    sharded = getattr(strategies, strategy)
    fake = sharded.__new__(sharded)  # no distributed environment needed for an isinstance check

    class FakeTrainer:
        pass

    FakeTrainer.__module__ = "pytorch_lightning.trainer.trainer"
    trainer_ = FakeTrainer()
    trainer_.strategy, trainer_.callbacks = fake, []
    with pytest.raises(ValueError, match=rf"does not support {strategy} yet"):
        surgery.check_supported(trainer_, LitMLP())
