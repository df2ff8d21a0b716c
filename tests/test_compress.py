from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lmd_lightning import (
    CompressionReport,
    EnergyRank,
    FactoredConv2d,
    FactoredLinear,
    FixedRank,
    GlobalBudget,
    RankRatio,
    compress_,
    restore_factored_,
)
from lmd_lightning.layers import FactoredMultiheadAttention


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.depthwise(torch.relu(self.conv1(x))))))
        return self.fc(x.mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=128, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.encoder(self.embed(x), src_key_padding_mask=mask)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.mean(dim=1))


def test_mlp_report_values() -> None:
    model = TinyMLP()
    x = torch.randn(16, 32)
    report = compress_(model, FixedRank(8))
    assert isinstance(model.fc1, FactoredLinear) and model.fc1.rank == 8
    assert isinstance(model.fc2, FactoredLinear) and model.fc2.rank == 8
    head = next(layer for layer in report.layers if layer.name == "head")
    assert isinstance(model.head, nn.Linear) and head.rank is None
    assert "break-even" in head.reason  # 8·(64+4) = 544 ≥ 256 = 64·4
    fc1 = next(layer for layer in report.layers if layer.name == "fc1")
    assert (fc1.kind, fc1.shape, fc1.full_rank) == ("Linear", (64, 32), 32)
    assert fc1.params_before == 64 * 32 + 64 and fc1.params_after == 8 * (64 + 32) + 64
    assert fc1.macs_before == 64 * 32 and fc1.macs_after == 8 * 96
    assert 0 < fc1.relative_error < 1 and fc1.energy == pytest.approx(1 - fc1.relative_error**2)
    assert report.model_params_after == sum(p.numel() for p in model.parameters())
    assert report.compression_ratio == pytest.approx(report.model_params_before / report.model_params_after)
    assert report.ranks() == {"fc1": 8, "fc2": 8}
    assert model(x).shape == (16, 4)
    text = str(report)
    assert "fc1" in text and "break-even" in text and "whole model" in text
    round_tripped = json.loads(json.dumps(report.to_dict()))
    assert round_tripped["totals"]["params_after"] == report.params_after
    assert round_tripped["layers"][0]["shape"] == [64, 32]
    back = CompressionReport.from_dict(round_tripped)
    assert back.layers == report.layers and str(back) == str(report)


def test_high_energy_keeps_outputs() -> None:
    """fc1 (64×32, break-even rank 21.3) holds a rank-8 weight plus noise: rank 8 keeps the outputs, rank 1 does not."""
    torch.manual_seed(0)
    model = TinyMLP()
    with torch.no_grad():
        model.fc1.weight.copy_(torch.randn(64, 8) @ torch.randn(8, 32) / 8 + 1e-3 * torch.randn(64, 32))
    x = torch.randn(16, 32)
    expected = model(x).detach()

    def output_error(rank: int) -> float:
        copy = TinyMLP()
        copy.load_state_dict(model.state_dict())
        report = compress_(copy, FixedRank(rank), include=["fc1"])
        assert isinstance(copy.fc1, FactoredLinear) and report.layers[0].rank == rank  # really truncated
        return float((copy(x) - expected).detach().norm() / expected.norm())

    assert 0 < output_error(8) < 0.01
    assert output_error(1) > 0.2  # the measurement sees a bad truncation


def test_cnn_convs_factored_grouped_conv_stays_dense() -> None:
    model = TinyCNN()
    with torch.no_grad():  # conv2 of rank 4: truncation at high energy is then nearly exact
        model.conv2.weight.copy_((torch.randn(32, 4) @ torch.randn(4, 144)).reshape(32, 16, 3, 3) / 30)
    x = torch.randn(2, 3, 12, 12)
    expected = model(x)
    report = compress_(model, EnergyRank(0.999999))
    assert isinstance(model.depthwise, nn.Conv2d)
    depthwise = next(layer for layer in report.layers if layer.name == "depthwise")
    assert "grouped conv (groups=16)" in depthwise.reason
    assert isinstance(model.conv2, FactoredConv2d)
    assert depthwise.shape == (16, 1, 3, 3)
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-3)


def _low_rank_(weight: torch.Tensor, rank: int) -> None:
    out_dim, fan_in = weight.shape
    weight.copy_(torch.randn(out_dim, rank) @ torch.randn(rank, fan_in) / fan_in)


def test_transformer_still_runs_and_is_close_at_high_energy() -> None:
    """Feed-forward and attention projections factored; the fused fast paths never read a dense weight."""
    model = TinyTransformer().eval()
    with torch.no_grad():  # weights of rank 6 (projections: 3 each): high energy then means nearly exact
        for layer in model.encoder.layers:
            for linear in (layer.linear1, layer.linear2):
                _low_rank_(linear.weight, 6)
        for mha in [model.attn, *(layer.self_attn for layer in model.encoder.layers)]:
            for chunk in mha.in_proj_weight.split(32):
                _low_rank_(chunk, 3)
            _low_rank_(mha.out_proj.weight, 3)
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[False] * 5, [False] * 4 + [True], [False] * 3 + [True] * 2])
    with torch.no_grad():
        expected, expected_masked = model(x), model(x, mask)
    report = compress_(model, EnergyRank(0.999))
    ranks = {layer.name: layer.rank for layer in report.layers}
    for prefix in ("attn", "encoder.layers.0.self_attn", "encoder.layers.1.self_attn"):
        assert isinstance(model.get_submodule(prefix), FactoredMultiheadAttention)
        assert [ranks[f"{prefix}.{p}"] for p in ("q_proj", "k_proj", "v_proj", "out_proj")] == [3, 3, 3, 3]
    assert isinstance(model.encoder.layers[0].linear1, FactoredLinear)
    assert any("fused fast path" in note for note in report.notes)
    with torch.no_grad():  # eval + no grad is where the fused kernels would read .weight
        got, got_masked = model(x), model(x, mask)
    assert float((got - expected).norm() / expected.norm()) < 0.05
    torch.testing.assert_close(got_masked[:1], expected_masked[:1], atol=0.05, rtol=0.05)


def test_already_factored_layers_are_shrunk_never_grown() -> None:
    model = TinyMLP()
    compress_(model, FixedRank(16))
    layer_before = model.fc1
    report = compress_(model, FixedRank(4))
    assert model.fc1 is layer_before and model.fc1.rank == 4  # shrunk in place
    fc1 = next(layer for layer in report.layers if layer.name == "fc1")
    assert (fc1.kind, fc1.rank_before, fc1.rank) == ("FactoredLinear", 16, 4)
    report = compress_(model, FixedRank(12))
    assert model.fc1.rank == 4 and "already factored at rank 4" in report.layers[0].reason


def test_include_exclude_filter() -> None:
    model = TinyMLP()
    compress_(model, FixedRank(4), include="fc*", exclude=["fc2"])
    assert isinstance(model.fc1, FactoredLinear) and isinstance(model.fc2, nn.Linear)
    model = TinyMLP()
    compress_(model, FixedRank(4), filter_fn=lambda name, module: module.in_features == 64)
    assert isinstance(model.fc1, nn.Linear) and isinstance(model.fc2, FactoredLinear)


@pytest.mark.parametrize("arg", ["include", "exclude"])
def test_pattern_matching_nothing_lists_candidates(arg: str) -> None:
    with pytest.raises(
        ValueError, match=rf"`{arg}` pattern 'decoder\.\*' matches no .* candidates are: \['fc1', 'fc2', 'head'\]"
    ):
        compress_(TinyMLP(), FixedRank(4), **{arg: "decoder.*"})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"policy": 0.9}, TypeError, r"`policy` must be a RankPolicy"),
        ({"include": 3}, TypeError, r"`include` must be a glob string"),
        ({"exclude": []}, TypeError, r"`exclude` must be a glob string or a non-empty list"),
        ({"filter_fn": "fc1"}, TypeError, r"`filter_fn` must be callable"),
        ({"parametrization": "qr"}, ValueError, r"`parametrization` must be one of \('balanced', 'svd'\), got 'qr'"),
        ({"method": "fast"}, ValueError, r"`method` must be one of"),
    ],
)
def test_invalid_arguments(kwargs: dict, error: type, match: str) -> None:
    args = {"policy": FixedRank(2), **kwargs}
    with pytest.raises(error, match=match):
        compress_(TinyMLP(), **args)


def test_bare_layer_is_refused() -> None:
    with pytest.raises(TypeError, match="`model` is itself a Linear"):
        compress_(nn.Linear(4, 4), FixedRank(1))


def test_non_finite_weight_raises_and_changes_nothing() -> None:
    model = TinyMLP()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer `fc2` has 1 non-finite"):
        compress_(model, EnergyRank(0.9))
    assert isinstance(model.fc1, nn.Linear)  # fc1 comes first and was not swapped either
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], equal_nan=True)


def test_failed_svd_leaves_that_layer_dense_with_a_warning(monkeypatch) -> None:
    model = TinyMLP()
    real_svdvals = torch.linalg.svdvals

    def failing_for_fc2(A, *args, **kwargs):
        if A.shape == (64, 64):
            raise torch.linalg.LinAlgError("did not converge")
        return real_svdvals(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svdvals", failing_for_fc2)
    with pytest.warns(UserWarning, match="layer `fc2` left unchanged: SVD failed"):
        report = compress_(model, EnergyRank(0.5))
    assert isinstance(model.fc2, nn.Linear) and isinstance(model.fc1, FactoredLinear)
    assert "SVD failed" in next(layer for layer in report.layers if layer.name == "fc2").reason


def test_linear_subclass_skipped_unless_included_by_name() -> None:
    class Tagged(nn.Linear):
        pass

    model = nn.Sequential(Tagged(32, 32), nn.ReLU(), nn.Linear(32, 32))
    report = compress_(model, FixedRank(2))
    assert type(model[0]) is Tagged and "subclass Tagged" in report.layers[0].reason
    compress_(model, FixedRank(2), include=["0"])
    assert isinstance(model[0], FactoredLinear)


def test_shared_module_is_swapped_everywhere() -> None:
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    compress_(model, FixedRank(2))
    assert isinstance(model[0], FactoredLinear) and model[0] is model[2]


@pytest.mark.parametrize("parametrization", ["balanced", "svd"])
@pytest.mark.parametrize("make", [TinyMLP, TinyCNN, TinyTransformer], ids=["mlp", "cnn", "transformer"])
def test_restore_factored_then_strict_load(parametrization: str, make) -> None:
    model = make().eval()
    compress_(model, RankRatio(0.25), parametrization=parametrization)
    state = model.state_dict()
    fresh = make().eval()
    rebuilt = restore_factored_(fresh, state)
    assert rebuilt and all(isinstance(fresh.get_submodule(name), (FactoredLinear, FactoredConv2d)) for name in rebuilt)
    fresh.load_state_dict(state, strict=True)
    x = (
        torch.randn(2, 3, 12, 12)
        if make is TinyCNN
        else torch.randn(2, 5, 8)
        if make is TinyTransformer
        else torch.randn(2, 32)
    )
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    assert restore_factored_(fresh, state) == []  # already in shape: nothing to do


def test_restore_rejects_mismatched_shapes() -> None:
    model = TinyMLP()
    compress_(model, FixedRank(4))
    state = model.state_dict()
    state["fc1.U"] = torch.zeros(65, 4)
    with pytest.raises(ValueError, match=r"`fc1.U`\(65, 4\).*does not fit layer `fc1`"):
        restore_factored_(TinyMLP(), state)


def test_global_budget_end_to_end_meets_budget() -> None:
    model = TinyCNN()
    report = compress_(model, GlobalBudget(params=0.3))
    considered = [layer for layer in report.layers if "grouped" not in (layer.reason or "")]
    before, after = sum(la.params_before for la in considered), sum(la.params_after for la in considered)
    assert before == 448 + 4640 + 330  # conv1, conv2, fc; the depthwise conv is not the policy's to spend
    assert after <= 0.3 * before
    assert after >= 0.3 * before - (32 + 144)  # within one rank unit of the largest layer


def test_dtype_and_training_mode_preserved() -> None:
    model = TinyMLP().to(torch.float64).eval()
    compress_(model, FixedRank(4))
    assert model.fc1.U.dtype == torch.float64 and not model.fc1.training


def test_non_finite_factor_of_a_factored_layer_raises() -> None:
    model = TinyMLP()
    compress_(model, FixedRank(8))
    with torch.no_grad():
        model.fc2.V[3, 1] = float("inf")
    with pytest.raises(ValueError, match="layer `fc2` has 1 non-finite"):
        compress_(model, FixedRank(4))
    assert model.fc1.rank == 8  # nothing was shrunk


def test_lazy_module_stays_dense_with_a_reason() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.LazyLinear(32))
    report = compress_(model, FixedRank(4))
    assert isinstance(model[0], FactoredLinear)
    lazy = next(layer for layer in report.layers if layer.name == "2")
    assert "not initialised" in lazy.reason and lazy.params_before == 0
    assert model(torch.randn(3, 64)).shape == (3, 32)  # still materialises on first use


def test_undo_puts_back_modules_factors_and_fast_paths() -> None:
    from lmd_lightning.truncate.targets import undo, undo_record

    model = TinyTransformer().eval()
    compress_(model, FixedRank(8), include=["encoder.layers.0.linear1"])
    shrunk = model.encoder.layers[0].linear1
    record = undo_record(model)
    compress_(model, FixedRank(2))
    assert model.encoder.layers[1].activation_relu_or_gelu == 0 and shrunk.rank == 2
    undo(model, record)
    assert model.encoder.layers[1].activation_relu_or_gelu == 1 and isinstance(model.head, nn.Linear)
    assert model.encoder.layers[0].linear1 is shrunk and shrunk.rank == 8
    assert model.encoder.use_nested_tensor is False  # layer 0 is still factored, as when recorded
