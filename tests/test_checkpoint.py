"""Checkpoints after compression: resume, weights_only loading, load_compressed, the mixin."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lmd_lightning import FactoredLinear, FixedRank, LMDCheckpointMixin, LMDCompression, load_compressed
from tests.lightning_models import LitMLP, loaders, trainer

STEPS_PER_EPOCH = 13


def lmd() -> LMDCompression:
    return LMDCompression(FixedRank(8), trigger="epoch", min_epochs=1, exclude="net.4")


def run(tmp_path: Path, max_epochs: int, ckpt_path: str | None = None, **kwargs) -> tuple[LitMLP, LMDCompression]:
    pl.seed_everything(0, verbose=False)
    model, callback = LitMLP(max_epochs=4, optimizer="adamw", lr=3e-3, interval="step"), lmd()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=STEPS_PER_EPOCH, save_top_k=-1)
    train, val = loaders()
    t = trainer(max_epochs, [callback, checkpoint], enable_checkpointing=True, **kwargs)
    t.fit(model, train, val, ckpt_path=ckpt_path)
    return model, callback


def test_resume_mid_fine_tune_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    reference, _ = run(tmp_path / "ref", max_epochs=4)
    stopped, _ = run(tmp_path / "cut", max_epochs=4, max_steps=3 * STEPS_PER_EPOCH)  # 2 epochs after the swap
    assert isinstance(stopped.net[0], FactoredLinear)
    last = tmp_path / "cut" / "last.ckpt"
    resumed, callback = run(tmp_path / "resumed", max_epochs=4, ckpt_path=str(last))
    assert callback.compressed and callback.compressed_epoch == 1 and callback.ranks == {"net.0": 8, "net.2": 8}
    assert isinstance(resumed.net[0], FactoredLinear) and resumed.net[0].rank == 8
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_checkpoint_reads_with_weights_only_and_holds_callback_state(tmp_path: Path) -> None:
    run(tmp_path, max_epochs=2)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"]["net.0.U"].shape == (64, 8)
    state = next(value for key, value in checkpoint["callbacks"].items() if key.startswith("LMDCompression"))
    assert state["compressed_epochs"] == [1] and state["reports"][0]["epoch"] == 1
    assert state["reports"][0]["layers"][0]["rank"] == 8


def test_load_compressed_in_one_line(tmp_path: Path) -> None:
    model, _ = run(tmp_path, max_epochs=2)
    loaded = load_compressed(LitMLP, tmp_path / "last.ckpt")
    assert isinstance(loaded.net[2], FactoredLinear) and not loaded.training
    x = torch.randn(5, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x))


class OptedIn(LMDCheckpointMixin, LitMLP):
    pass


def test_mixin_load_from_checkpoint_and_save_weights_only(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    model = OptedIn(max_epochs=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True, save_last=True)
    train, val = loaders()
    trainer(2, [lmd(), checkpoint], enable_checkpointing=True).fit(model, train, val)
    raw = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert "optimizer_states" not in raw and "net.0.U" in raw["state_dict"]
    loaded = OptedIn.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert isinstance(loaded.net[0], FactoredLinear)
    x = torch.randn(3, 32)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    assert isinstance(load_compressed(OptedIn, tmp_path / "last.ckpt").net[0], FactoredLinear)


def test_validate_a_compressed_checkpoint_with_the_callback_attached(tmp_path: Path) -> None:
    run(tmp_path, max_epochs=2)
    model = LitMLP()
    _, val = loaders()
    results = trainer(1, [lmd()]).validate(model, val, ckpt_path=str(tmp_path / "last.ckpt"), weights_only=True)
    assert isinstance(model.net[0], FactoredLinear) and results[0]["val_acc"] > 0.5


def test_load_compressed_errors(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="holds no 'state_dict'"):
        load_compressed(LitMLP, tmp_path / "plain.pt")
    with pytest.raises(TypeError, match="`module_cls` must be a LightningModule class"):
        load_compressed("LitMLP", tmp_path / "plain.pt")


def test_strict_loading_is_given_back_after_fit_and_validate(tmp_path: Path) -> None:
    model = LitMLP()
    model.strict_loading = True
    train, val = loaders()
    trainer(1, [lmd()]).validate(model, val)
    assert model.strict_loading is True
    trainer(1, [lmd()]).fit(model, train, val)
    assert model.strict_loading is True
