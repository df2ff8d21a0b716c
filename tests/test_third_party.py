"""Models nobody here wrote: code that reads a child's `.weight` keeps working after compression."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from lmd_lightning import (
    ConvergenceMonitor,
    FactoredConv2d,
    FactoredLinear,
    FixedRank,
    LMDCompression,
    RankRatio,
    compress_,
    restore_factored_,
)
from tests.lightning_models import trainer


class ReadsItsChildsWeight(nn.Module):
    """The Hugging Face pattern (ViT's patch embedding, T5's `wo`): cast the input to a child's weight dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.projection = nn.Conv2d(3, 16, 4, stride=4)
        self.wo = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.projection(x.to(self.projection.weight.dtype)).flatten(2).mean(-1)  # (B, 16)
        x = x.to(self.wo.weight.dtype) if self.wo.weight.dtype != x.dtype else x
        return self.head(torch.relu(self.wo(x)))


def test_weight_readers_run_after_compression() -> None:
    model = ReadsItsChildsWeight()
    x = torch.randn(2, 3, 16, 16)
    compress_(model, FixedRank(4), exclude="head")
    assert isinstance(model.projection, FactoredConv2d) and isinstance(model.wo, FactoredLinear)
    model(x).sum().backward()
    assert model.projection.U.grad is not None


def tiny_vit():
    """The zoo's HF ViT classifier (benchmarks/zoo.py): 2 layers, d = 32, 16×16 images, 4 labels."""
    pytest.importorskip("transformers")
    from benchmarks.zoo import build

    return build("vit").train()


def test_hf_vit_compresses_and_still_runs() -> None:
    """HF ViT's patch embedding reads `projection.weight.dtype`: before factored layers had `.weight`, this raised."""
    model = tiny_vit()
    x, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 3])
    report = compress_(model, RankRatio(0.25))
    embed = model.vit.embeddings.patch_embeddings.projection
    assert isinstance(embed, FactoredConv2d) and report.model_params_after < report.model_params_before
    loss = model(pixel_values=x, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and embed.U.grad is not None


class ViTClassifier(pl.LightningModule):
    """An HF ViT in a plain LightningModule, as a user would write it."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_vit()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.model(pixel_values=x, labels=y).loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.model(pixel_values=x).logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_hf_vit_through_the_callback_keeps_training() -> None:
    """The reported crash: compressed at epoch 2, the next training step raised AttributeError and the fit was lost."""
    pl.seed_everything(0, verbose=False)
    x = torch.randn(64, 3, 16, 16)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0].mean(dim=(1, 2)) > 0).long()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    module = ViTClassifier()
    before = copy.deepcopy(module.model.state_dict())
    lmd = LMDCompression(FixedRank(8), trigger="epoch", min_epochs=2, exclude="*classifier", monitor="val_acc")
    t = trainer(4, [lmd])
    t.fit(module, data, data)
    assert lmd.failure is None and lmd.compressed_epochs == [2] and t.global_step == 16
    embed = module.model.vit.embeddings.patch_embeddings.projection
    assert isinstance(embed, FactoredConv2d) and embed.rank == 8
    assert sum(p.numel() for p in module.parameters()) < sum(v.numel() for v in before.values())
    assert torch.isfinite(F.cross_entropy(module.model(pixel_values=x).logits, y))


class TiedLM(nn.Module):
    """A language model whose output head shares the token embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.body = nn.Linear(32, 32)
        self.head = nn.Linear(32, 100, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.embed(tokens))))


def test_a_head_tied_to_the_embedding_stays_dense_and_tied() -> None:
    model, by_hand = TiedLM(), TiedLM()
    by_hand.load_state_dict(model.state_dict())
    report = compress_(model, FixedRank(4))
    head = next(layer for layer in report.layers if layer.name == "head")
    assert head.rank is None and head.reason.startswith("tied to `embed.weight`")
    assert model.head.weight is model.embed.weight and isinstance(model.body, FactoredLinear)
    excluded = compress_(by_hand, FixedRank(4), exclude="head")
    assert report.model_params_after == excluded.model_params_after < report.model_params_before


def test_hf_gpt2_lm_head_is_not_untied() -> None:
    """GPT-2 ties lm_head to wte; factoring the head grew a small GPT-2 from 114,944 to 119,168 parameters."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=1000, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    params = sum(p.numel() for p in model.parameters())
    report = compress_(model, RankRatio(0.25))
    head = next(layer for layer in report.layers if layer.name == "lm_head")
    assert head.rank is None and "tied to `transformer.wte.weight`" in head.reason
    assert model.lm_head.weight is model.transformer.wte.weight
    assert sum(p.numel() for p in model.parameters()) == report.model_params_after <= params
    model(torch.randint(0, 1000, (2, 8)), labels=torch.randint(0, 1000, (2, 8))).loss.backward()


class GPT2CharLM(pl.LightningModule):
    """An HF GPT-2 language model in a LightningModule whose batches are dicts (HF style)."""

    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=40, n_positions=32)
        torch.manual_seed(0)
        self.model = transformers.GPT2LMHeadModel(config)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def periodic_text() -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """Train and validation loaders of a periodic "text" (learnable), in HF-style dict batches."""
    text = torch.arange(40).repeat(40)[: 64 * 17].reshape(64, 17) % 40

    def as_dict(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = torch.stack(rows)
        return {"input_ids": ids, "labels": ids}

    train = torch.utils.data.DataLoader(list(text), batch_size=8, collate_fn=as_dict)
    return train, torch.utils.data.DataLoader(list(text[:16]), batch_size=8, collate_fn=as_dict)


def test_hf_gpt2_lm_through_the_callback_keeps_training() -> None:
    """Conv1D projections factored mid-fit, lm_head still tied, the loss still falls after the swap."""
    pl.seed_everything(0, verbose=False)
    train, val = periodic_text()
    module = GPT2CharLM()
    lmd = LMDCompression(RankRatio(0.5), trigger="epoch", min_epochs=2, monitor="val_loss", mode="min")
    t = trainer(5, [lmd])
    t.fit(module, train, val)
    assert lmd.failure is None and lmd.compressed_epochs == [2]
    gpt2 = module.model.transformer
    assert type(gpt2.h[0].attn.c_attn).__name__ == "FactoredHFConv1D" and gpt2.h[1].mlp.c_fc.rank == 16
    assert module.model.lm_head.weight is gpt2.wte.weight
    history = lmd.guard_record
    assert history is not None and float(t.callback_metrics["val_loss"]) < history.before


class Seq2SeqLM(pl.LightningModule):
    """A word-level LM on nn.Transformer whose forward takes two inputs: forward(inputs, target)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(30, 32)
        self.transformer = nn.Transformer(32, 4, 1, 1, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.out = nn.Linear(32, 30)
        self.mean_loss = torchmetrics.MeanMetric()  # a logged metric object: calibration must leave it empty

    def forward(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(target.shape[1])
        return self.out(self.transformer(self.embed(inputs), self.embed(target), tgt_mask=mask, tgt_is_causal=True))

    def training_step(self, batch, batch_idx):
        inputs, target, labels = batch
        loss = F.cross_entropy(self(inputs, target).flatten(0, 1), labels.flatten())
        self.mean_loss(loss)
        self.log("train_mean_loss", self.mean_loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class MetricStateAtCompression(pl.Callback):
    """The logged metric's accumulated weight right after the callback compressed (same hook, later in the list)."""

    def __init__(self, lmd: LMDCompression) -> None:
        self.lmd, self.weight = lmd, None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.lmd.compressed_epochs and self.weight is None:
            self.weight = float(pl_module.mean_loss.weight)


def seq2seq_loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    inputs, target = torch.randint(0, 30, (48, 7), generator=g), torch.randint(0, 30, (48, 6), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, target, target.roll(1, 1)), batch_size=8)


@pytest.mark.parametrize("forward", ["training_step", "batch[0]"])
def test_data_metric_calibrates_through_the_modules_own_training_step(forward: str) -> None:
    """forward(inputs, target): feeding `batch[0]` to the model fails, and the callback used to train on dense."""
    from lmd_lightning import DataMetric
    from lmd_lightning.truncate.calibration import default_forward

    pl.seed_everything(0, verbose=False)
    metric = DataMetric(batches=2) if forward == "training_step" else DataMetric(batches=2, forward=default_forward)
    lmd = LMDCompression(RankRatio(0.25), trigger="epoch", min_epochs=1, metric=metric)
    probe = MetricStateAtCompression(lmd)
    module = Seq2SeqLM()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the failing variant warns that it trains dense
        trainer(2, [lmd, probe]).fit(module, seq2seq_loader())
    if forward == "batch[0]":
        assert lmd.compressed_epochs == [] and "forward()" in lmd.failure
        return
    assert lmd.failure is None and lmd.compressed_epochs == [1]
    attention = module.transformer.decoder.layers[0].multihead_attn
    assert isinstance(attention.q_proj, FactoredLinear) and isinstance(module.out, FactoredLinear)
    assert probe.weight == 0.0  # the calibration batches left no trace in the logged metric


def test_joint_factoring_shares_one_set_of_factors_between_a_head_and_its_embedding() -> None:
    torch.manual_seed(0)
    model, by_hand = TiedLM(), TiedLM()
    with torch.no_grad():  # a table and a body of rank 4: rank-4 factors are exact
        model.embed.weight.copy_(torch.randn(100, 4) @ torch.randn(4, 32))
        model.body.weight.copy_(torch.randn(32, 4) @ torch.randn(4, 32) / 8)
    by_hand.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 100, (3, 7))
    with torch.no_grad():
        expected = model(tokens)
    report = compress_(model, FixedRank(4), tied="joint")
    embed, head = model.embed, model.head
    assert type(embed).__name__ == "FactoredEmbedding" and isinstance(head, FactoredLinear)
    assert head.U is embed.U and head.V is embed.V and head.rank == embed.rank == 4
    assert "`head` shares the factors of `embed` (tied='joint')" in report.notes
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), expected, rtol=1e-4, atol=1e-4)  # float32 outputs of size ~10
    excluded = compress_(by_hand, FixedRank(4), exclude="head")
    assert report.model_params_after == excluded.model_params_after - 100 * 32 + 4 * (100 + 32)
    # a training step trains the shared factors from both uses, and the tie survives it
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(tokens).square().mean().backward()
    opt.step()
    assert model.head.U is model.embed.U
    # shrinking again keeps them shared
    compress_(model, FixedRank(2), tied="joint")
    assert model.head.U is model.embed.U and model.head.rank == 2
    # a checkpoint restores into a fresh model with the tie
    fresh = TiedLM()
    restore_factored_(fresh, model.state_dict())
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert fresh.head.U is fresh.embed.U and fresh.head.V is fresh.embed.V
    torch.testing.assert_close(fresh(tokens), model(tokens), rtol=0, atol=0)


def test_joint_factoring_of_hf_gpt2_and_where_it_does_not_apply() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=1000, n_positions=64)
    torch.manual_seed(0)
    model, default = transformers.GPT2LMHeadModel(config), transformers.GPT2LMHeadModel(config)
    default.load_state_dict(model.state_dict())
    joint = compress_(model, RankRatio(0.25), tied="joint")
    dense_tie = compress_(default, RankRatio(0.25))
    assert model.lm_head.U is model.transformer.wte.U and joint.model_params_after < dense_tie.model_params_after
    model(torch.randint(0, 1000, (2, 8)), labels=torch.randint(0, 1000, (2, 8))).loss.backward()
    with pytest.raises(ValueError, match="`metric_maps=True` cannot be combined with tied='joint'"):
        compress_(TiedLM(), FixedRank(2), tied="joint", metric_maps=True)
    with pytest.raises(ValueError, match=r"`tied` must be one of \('dense', 'joint'\), got 'share'"):
        compress_(TiedLM(), FixedRank(2), tied="share")
    lm = TiedLM()  # the data metric does not apply to embeddings: the pair stays dense, and says why
    report = compress_(lm, FixedRank(2), tied="joint", metric="data", calibration=[torch.randint(0, 100, (4, 5))])
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert isinstance(lm.head, nn.Linear) and lm.head.weight is lm.embed.weight
    assert reasons["head"] == (
        "tied to `embed`, which stays as it is: "
        "metric='data' does not apply to Embedding: its inputs are indices, not features"
    )


def test_joint_factoring_from_the_callback_and_metric_maps_refused() -> None:
    from lmd_lightning import add_metric_maps_

    with pytest.raises(ValueError, match="`metric_maps=True` cannot be combined with tied='joint'"):
        LMDCompression(FixedRank(2), tied="joint", metric_maps=True)
    with pytest.raises(ValueError, match=r"`tied` must be one of \('dense', 'joint'\), got 'yes'"):
        LMDCompression(FixedRank(2), tied="yes")
    model = TiedLM()
    compress_(model, FixedRank(4), tied="joint")
    with pytest.raises(ValueError, match="`embed` shares its factors with `head` \\(tied='joint'\\)"):
        add_metric_maps_(model)
    assert not model.embed.has_metric_maps and model.head.U is model.embed.U


def test_a_later_round_with_metric_maps_does_not_untie_a_joint_pair() -> None:
    model = TiedLM()
    compress_(model, FixedRank(8), tied="joint")
    with pytest.raises(ValueError, match=r"`metric_maps=True`: `embed` shares its factors with `head`"):
        compress_(model, FixedRank(8), metric_maps=True)
    assert model.head.U is model.embed.U and not model.embed.has_metric_maps and not model.head.has_metric_maps


def test_the_ladder_climbs_on_hf_gpt2() -> None:
    """rounds="auto" on an HF GPT-2 in the loss metric: three rungs, each smaller, lm_head still tied to wte."""
    from lmd_lightning import Guard

    pl.seed_everything(0, verbose=False)
    train, val = periodic_text()
    module = GPT2CharLM()
    lmd = LMDCompression(
        RankRatio(0.25),
        trigger="epoch",
        min_epochs=2,
        monitor="val_loss",
        mode="min",
        guard=Guard(max_drop=100.0),
        rounds="auto",
    )
    trainer(6, [lmd]).fit(module, train, val)
    rungs = lmd.ladder
    assert [r.decision for r in rungs] == ["kept"] * 3 and [r.epoch for r in rungs] == [2, 3, 4]
    assert rungs[0].params > rungs[1].params > rungs[2].params == sum(p.numel() for p in module.parameters())
    gpt2 = module.model.transformer
    assert type(gpt2.h[0].attn.c_attn).__name__ == "FactoredHFConv1D" and module.model.lm_head.weight is gpt2.wte.weight
    assert lmd.ranks["model.transformer.h.0.mlp.c_fc"] == gpt2.h[0].mlp.c_fc.rank


def gpt2_sizes(*ratios: float) -> dict[float, int]:
    """GPT2CharLM's parameter count after RankRatio(ratio), for each ratio."""
    import copy

    sizes = {}
    for ratio in ratios:
        probe = copy.deepcopy(GPT2CharLM())
        compress_(probe, RankRatio(ratio))
        sizes[ratio] = sum(p.numel() for p in probe.parameters())
    return sizes


def scored_gpt2_ladder(score, max_drop: float) -> tuple[pl.LightningModule, LMDCompression]:
    """A GPT-2 ladder (floor RankRatio(0.25), from epoch 2 of 6) whose monitor is `score(parameter count)`."""
    from lmd_lightning import Guard

    class ScoredGPT2(GPT2CharLM):
        def validation_step(self, batch, batch_idx):
            super().validation_step(batch, batch_idx)
            self.log("score", score(sum(p.numel() for p in self.parameters())))

    pl.seed_everything(0, verbose=False)
    train, val = periodic_text()
    module = ScoredGPT2()
    options = dict(trigger="epoch", min_epochs=2, monitor="score", guard=Guard(max_drop=max_drop), rounds="auto")
    lmd = LMDCompression(RankRatio(0.25), **options)
    trainer(6, [lmd]).fit(module, train, val)
    return module, lmd


def test_the_ladder_bisects_on_hf_gpt2() -> None:
    """A size-gated GPT-2 ladder: RankRatio 0.75 kept, 0.5 rolled back, then the half step 0.625 kept, cut from
    the kept rung's factored HF Conv1D layers (roll-back and re-compression through a third-party model)."""
    sizes = gpt2_sizes(0.5, 0.625)
    threshold = (sizes[0.5] + sizes[0.625]) // 2
    module, lmd = scored_gpt2_ladder(lambda params: float(params >= threshold), max_drop=0.5)
    rungs = lmd.ladder
    assert [r.decision for r in rungs] == ["kept", "rolled back", "kept"]
    assert [(r.at, r.of) for r in rungs] == [(1, 3), (2, 3), (3, 6)]
    assert [r.setting for r in rungs] == pytest.approx([0.75, 0.5, 0.625])
    assert rungs[2].params == sizes[0.625] == sum(p.numel() for p in module.parameters())
    gpt2 = module.model.transformer
    assert type(gpt2.h[0].attn.c_attn).__name__ == "FactoredHFConv1D" and module.model.lm_head.weight is gpt2.wte.weight
    assert gpt2.h[0].mlp.c_fc.rank == lmd.ranks["model.transformer.h.0.mlp.c_fc"] == round(0.625 * 32)


def test_the_ladder_bar_rises_to_a_kept_rung_on_hf_gpt2() -> None:
    """A GPT-2 ladder whose score peaks at RankRatio(0.75): that rung beats the dense reference and raises the
    bar, so 0.5, within `max_drop` of dense but not of the bar, is rolled back; 0.625 clears the raised bar."""
    sizes = gpt2_sizes(0.75, 0.5, 0.625)
    scores = {sizes[0.75]: 1.0, sizes[0.5]: 0.6, sizes[0.625]: 0.8}  # the dense model scores 0.5
    module, lmd = scored_gpt2_ladder(lambda params: scores.get(params, 0.5), max_drop=0.3)
    rungs = lmd.ladder
    assert [r.setting for r in rungs] == pytest.approx([0.75, 0.5, 0.625])
    # 0.6 passes the dense reference's 0.5 - 0.3 but not the raised bar's 1.0 - 0.3
    assert [r.decision for r in rungs] == ["kept", "rolled back", "kept"]
    assert [r.bar for r in rungs] == pytest.approx([0.5, 1.0, 1.0]) and lmd.dense_value == pytest.approx(0.5)
    assert sum(p.numel() for p in module.parameters()) == sizes[0.625]


@pytest.mark.parametrize("model", ["gpt2", "nn.Transformer"])
def test_a_roll_back_to_dense_restores_third_party_layers(model: str) -> None:
    """restore_structure_ (the ladder's roll-back) turns factored HF Conv1D and split attention back into originals."""
    from lmd_lightning.truncate.restore import restore_structure_

    module = GPT2CharLM() if model == "gpt2" else Seq2SeqLM()
    net = (module.model if model == "gpt2" else module).eval()  # no dropout between the two passes
    dense = {key: value.clone() for key, value in net.state_dict().items()}
    kinds = {name: type(m) for name, m in net.named_modules()}
    if model == "gpt2":
        inputs = (torch.randint(0, 40, (2, 9)),)
    else:
        inputs = (torch.randint(0, 30, (2, 7)), torch.randint(0, 30, (2, 6)))
    with torch.no_grad():
        expected = net(*inputs) if model != "gpt2" else net(*inputs).logits
    compress_(net, FixedRank(4), exclude="lm_head" if model == "gpt2" else "out")
    assert any(type(m) is not kinds.get(name) for name, m in net.named_modules())
    restore_structure_(net, dense)
    net.load_state_dict(dense)
    assert {name: type(m) for name, m in net.named_modules()} == kinds
    with torch.no_grad():
        got = net(*inputs) if model != "gpt2" else net(*inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_noise_ratio_and_the_epoch_criterion_on_hf_gpt2() -> None:
    """The per-sample hooks measure GPT-2's Conv1D layers (lm_head, tied, is left out) inside a fit; the
    epoch criterion fires in the epoch its recorded means predict, and no hook outlives the fit."""
    pl.seed_everything(0, verbose=False)
    train, _ = periodic_text()
    module = GPT2CharLM()
    means: list[float] = []
    ratios: list[float] = []
    measured: list[set[str]] = []

    class Recording(ConvergenceMonitor):
        def end_epoch(self) -> bool:
            if lmd._watch._noise is not None and not measured:
                measured.append(set(lmd._watch._noise.layers))  # the dense model's, before any swap
            converged = super().end_epoch()
            if self.last_epoch_mean is not None and len(means) < self.epochs:
                means.append(self.last_epoch_mean)
                ratios.append(self.noise_ratio)
            return converged

    # with noise_tol the noise ratio decides (an unbiased ρ can be negative, so it may fire)...
    monitor = Recording(criterion="epoch", min_steps=0, rel_tol=0.5, noise_tol=1e-9)
    lmd = LMDCompression(RankRatio(0.5), trigger=monitor, every_n_steps=1)
    t = trainer(6, [lmd])
    t.fit(module, train)
    assert measured[0] == {f"model.transformer.h.{i}.{n}" for i in (0, 1) for n in _GPT2_LAYERS}
    assert ratios and all(r is not None and math.isfinite(r) for r in ratios)
    trigger = lmd.reports[0]["trigger"]
    assert trigger.startswith("noise ratio") or lmd.compressed_epochs == [4], trigger  # never the epoch rule
    assert not any(m._forward_hooks for m in module.modules())
    # ...and without noise_tol the epoch rule fires where the means say
    pl.seed_everything(0, verbose=False)
    module, means[:] = GPT2CharLM(), []
    lmd = LMDCompression(RankRatio(0.5), trigger=Recording(criterion="epoch", min_steps=0, rel_tol=0.8))
    trainer(6, [lmd]).fit(module, train)
    predicted = next(e + 1 for e in range(len(means)) if means[e] <= 0.8 * max(means[: e + 1]))
    assert lmd.compressed_epochs == [predicted] and predicted < 4  # here the mean falls 20% by epoch 3
    assert lmd.reports[0]["trigger"].startswith("epoch-mean ‖g‖")


_GPT2_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
