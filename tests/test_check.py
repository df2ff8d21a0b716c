"""A swap never leaves a model that cannot run: compress_(check=...) and the callback's training step."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lmd_lightning import FactoredLinear, FixedRank, LMDCompression, ModelCheckError, compress_
from lmd_lightning.truncate.check import check_step, output_loss
from tests.lightning_models import LitMLP, loaders, trainer


class ReadsAPrivateAttribute(nn.Module):
    """User code that reads something only its dense child has (the issue's "private attribute")."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(32)
        self.proj = nn.Linear(32, 32)
        self.proj._scale = 2.0  # set by the user on the nn.Linear; a FactoredLinear does not have it
        self.out = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.proj(self.norm(x)) * self.proj._scale)


def test_compress_check_puts_every_layer_back_and_names_the_module() -> None:
    model = ReadsAPrivateAttribute()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelCheckError, match=r"fails a forward/backward step in `proj`: AttributeError: .*'_scale'"):
        compress_(model, FixedRank(4), check=torch.randn(8, 32))
    assert type(model.proj) is nn.Linear and type(model.out) is nn.Linear  # nothing half-swapped
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())  # BatchNorm stats too


def test_compress_check_names_the_innermost_module_and_passes_a_good_model() -> None:
    class Picky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            assert isinstance(self.fc, nn.Linear), "needs the dense layer"
            return self.fc(x)

    model = nn.Sequential(nn.Linear(16, 16), Picky())
    with pytest.raises(ModelCheckError, match=r"step in `1`: AssertionError: needs the dense layer") as caught:
        compress_(model, FixedRank(2), check=(torch.randn(4, 16),))
    assert caught.value.module == "1" and type(model[0]) is nn.Linear
    good = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    report = compress_(good, FixedRank(2), check={"input": torch.randn(4, 16)})
    assert isinstance(good[0], FactoredLinear) and report.model_params_after < report.model_params_before
    assert all(p.grad is None for p in good.parameters())  # the check's backward left no gradient behind


class FailsInBackward(torch.autograd.Function):
    """Identity forward, error in backward: only a check that really backpropagates sees it."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward of the factored path failed")


def test_compress_check_runs_the_backward_too(monkeypatch) -> None:
    """The check must backpropagate: a failure that only the backward meets is caught, and undone."""
    from lmd_lightning.layers import FactoredLinear as Factored

    original = Factored.forward
    monkeypatch.setattr(Factored, "forward", lambda self, x: FailsInBackward.apply(original(self, x)))
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    with pytest.raises(ModelCheckError, match="backward of the factored path failed"):
        compress_(model, FixedRank(2), check=torch.randn(4, 16))
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear


def test_check_step_leaves_gradients_buffers_and_random_state_alone() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model[0].weight.grad = torch.ones(4, 4)
    stats = model[1].running_mean.clone()
    rng = torch.get_rng_state()
    check_step(model, lambda: model(torch.randn(8, 4) + 3.0))
    assert torch.equal(model[0].weight.grad, torch.ones(4, 4)) and model[0].bias.grad is None
    assert torch.equal(model[1].running_mean, stats) and torch.equal(torch.get_rng_state(), rng)
    assert output_loss({"loss": torch.tensor(2.0, requires_grad=True), "logits": torch.ones(2)}).item() == 2.0
    assert output_loss((torch.ones(2, requires_grad=True), [torch.full((3,), 2.0, requires_grad=True)])).item() == 8.0
    assert output_loss(torch.ones(2)) is None  # nothing to backpropagate


class PrivateReader(LitMLP):
    """The tests' LightningModule, reading a private attribute of one of its layers in forward."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net[2]._offset = 0.0

    def forward(self, x):
        h = self.net[1](self.net[0](x))
        return self.net[4](self.net[3](self.net[2](h) + self.net[2]._offset))


def test_callback_keeps_training_dense_when_the_swapped_model_cannot_train() -> None:
    """No `monitor`, so no evaluation would have caught it: the check step does, before committing."""
    pl.seed_everything(0, verbose=False)
    lmd = LMDCompression(FixedRank(8), trigger="epoch", min_epochs=1, exclude="net.4")
    model = PrivateReader(max_epochs=3)
    train, val = loaders()
    t = trainer(3, [lmd])
    with pytest.warns(UserWarning, match=r"training continues dense\. ModelCheckError: .* step in `net.2`"):
        t.fit(model, train, val)
    assert not lmd.compressed and "`net.2`" in lmd.failure and "_offset" in lmd.failure
    assert type(model.net[0]) is nn.Linear and type(model.net[2]) is nn.Linear and t.global_step == 3 * 13
    assert all(isinstance(p, nn.Parameter) for p in t.optimizers[0].param_groups[0]["params"])
    assert set(map(id, t.optimizers[0].param_groups[0]["params"])) == set(map(id, model.parameters()))
