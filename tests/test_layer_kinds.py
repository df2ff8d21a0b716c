"""Every registered layer kind: round trips, Eckart–Young, `.weight`, checkpoints, and `compress_` reaching it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lmd_lightning import FixedRank, RankRatio, compress_, restore_factored_
from lmd_lightning.layers import (
    KINDS,
    FactoredConv1d,
    FactoredEmbedding,
    FactoredHFConv1D,
    FactoredLinear,
    FactoredModule,
    register_kind,
)
from lmd_lightning.layers.svd import eckart_young_error


def hf_conv1d(nf: int, nx: int) -> nn.Module:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    return pytorch_utils.Conv1D(nf, nx)


# (dense layer, an input for it); dtype float64 so that full-rank round trips are exact to 1e-10
CASES = {
    "Linear": (lambda: nn.Linear(6, 9), lambda: torch.randn(4, 3, 6)),
    "Conv1d": (lambda: nn.Conv1d(4, 7, 3, padding=1), lambda: torch.randn(2, 4, 13)),
    "Conv1d-strided-dilated": (lambda: nn.Conv1d(3, 8, 5, stride=2, dilation=2), lambda: torch.randn(2, 3, 21)),
    "Conv1d-same-reflect": (
        lambda: nn.Conv1d(3, 5, 4, padding="same", padding_mode="reflect"),
        lambda: torch.randn(2, 3, 11),
    ),
    "Conv1d-circular-nobias": (
        lambda: nn.Conv1d(2, 6, 3, padding=2, padding_mode="circular", bias=False),
        lambda: torch.randn(3, 2, 9),
    ),
    "Conv2d": (lambda: nn.Conv2d(3, 8, 3, padding=1), lambda: torch.randn(2, 3, 7, 7)),
    "HF-Conv1D": (lambda: hf_conv1d(10, 6), lambda: torch.randn(2, 5, 6)),
    "Embedding": (lambda: nn.Embedding(20, 6, padding_idx=2), lambda: torch.randint(0, 20, (3, 7))),
}


def build(case: str) -> tuple[nn.Module, torch.Tensor]:
    make_layer, make_input = CASES[case]
    torch.manual_seed(0)
    layer = make_layer().double()
    x = make_input()
    return layer, x if not torch.is_floating_point(x) else x.double()


def kind_for(layer: nn.Module) -> type[FactoredModule]:
    return KINDS[f"{type(layer).__module__}.{type(layer).__qualname__}"]


@pytest.mark.parametrize("case", list(CASES))
def test_full_rank_round_trip_weight_and_dense_copy(case: str) -> None:
    dense, x = build(case)
    kind = kind_for(dense)
    matrix = kind.dense_matrix(dense)
    layer = kind.from_dense(dense, min(matrix.shape))
    assert type(layer) is kind
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-10, atol=1e-10)
    weight = layer.weight  # outside readers see the dense layer's weight
    assert (weight.shape, weight.dtype) == (dense.weight.shape, dense.weight.dtype)
    torch.testing.assert_close(weight, dense.weight, rtol=1e-10, atol=1e-10)
    back = layer.to_dense()
    assert type(back) is type(dense)
    torch.testing.assert_close(back(x), dense(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", list(CASES))
def test_truncation_is_eckart_young_of_the_kinds_matrix(case: str) -> None:
    dense, x = build(case)
    kind = kind_for(dense)
    matrix = kind.dense_matrix(dense)
    layer = kind.from_dense(dense, 2)
    s = torch.linalg.svdvals(matrix)
    error = float(torch.linalg.matrix_norm(layer.dense_weight().detach() - matrix))
    assert error == pytest.approx(eckart_young_error(s, 2), rel=1e-9)
    # The factored layer equals the dense layer with the truncated weight written in.
    truncated = kind.from_dense(dense, min(matrix.shape)).to_dense()
    with torch.no_grad():
        truncated.weight.copy_(layer.weight)
    torch.testing.assert_close(layer(x), truncated(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", list(CASES))
def test_compress_reaches_the_kind_and_a_checkpoint_round_trips(case: str) -> None:
    dense, x = build(case)
    model = nn.Sequential(dense)
    include = "0" if kind_for(dense).opt_in else None
    report = compress_(model, FixedRank(2), include=include)
    assert isinstance(model[0], kind_for(dense)) and model[0].rank == 2, report.dense
    assert report.params_after < report.params_before
    state = model.state_dict()
    fresh = nn.Sequential(build(case)[0])
    assert restore_factored_(fresh, state) == ["0"]
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_kinds_registered_and_registration_checked() -> None:
    assert {kind.__name__ for kind in KINDS.values()} >= {
        "FactoredLinear",
        "FactoredConv1d",
        "FactoredConv2d",
        "FactoredHFConv1D",
        "FactoredEmbedding",
    }
    with pytest.raises(ValueError, match="torch.nn.modules.linear.Linear already has a layer kind: FactoredLinear"):

        @register_kind
        class Another(FactoredLinear):
            pass

    with pytest.raises(TypeError, match="register_kind takes a FactoredModule subclass"):
        register_kind(nn.Linear)


def test_hf_conv1d_kind_never_imports_transformers() -> None:
    """The HF kind is registered by name: a model without transformers never loads it."""
    code = textwrap.dedent(
        """
        import sys
        import torch
        from torch import nn
        from lmd_lightning import FixedRank, compress_
        model = nn.Sequential(nn.Linear(8, 8), nn.Conv1d(2, 4, 3))
        compress_(model, FixedRank(2))
        assert "transformers" not in sys.modules, "transformers was imported"
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_hf_conv1d_reads_like_conv1d() -> None:
    dense = hf_conv1d(12, 8)
    layer = FactoredHFConv1D.from_dense(dense, 8)
    assert (layer.nf, layer.nx, layer.weight.shape) == (12, 8, (8, 12))  # Conv1D's (nx, nf) layout
    assert "nf=12, nx=8, rank=8" in repr(layer)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer.to_linear()(x), dense(x), rtol=1e-5, atol=1e-6)


def test_conv1d_is_a_k_wide_conv_into_rank_then_pointwise() -> None:
    layer = FactoredConv1d.from_dense(nn.Conv1d(8, 16, 5, padding=2), 3)
    assert layer.V.shape == (8 * 5, 3) and layer.U.shape == (16, 3) and layer.weight.shape == (16, 8, 5)
    assert "kernel_size=(5,), stride=(1,), padding=(2,), rank=3" in repr(layer)


def test_embedding_is_opt_in_with_a_reason() -> None:
    model = nn.Sequential(nn.Embedding(40, 16), nn.Linear(16, 16))
    report = compress_(model, FixedRank(2))
    embedding = next(layer for layer in report.layers if layer.name == "0")
    assert isinstance(model[0], nn.Embedding)
    assert embedding.reason == "Embedding is opt-in: name it in `include` to factor it"
    compress_(model, FixedRank(2), include=["0"])
    assert isinstance(model[0], FactoredEmbedding) and model[0].rank == 2


def test_embedding_padding_row_is_used_as_it_is_and_gets_no_gradient() -> None:
    """nn.Embedding only blocks the padding row's gradient: a non-zero (pretrained) padding row is kept."""
    torch.manual_seed(0)
    dense = nn.Embedding(30, 8, padding_idx=5)
    with torch.no_grad():  # a rank-3 table whose padding row is not zero
        dense.weight.copy_(torch.randn(30, 3) @ torch.randn(3, 8))
    layer = FactoredEmbedding.from_dense(dense, 3)
    indices = torch.tensor([[5, 1, 2], [5, 5, 3]])
    torch.testing.assert_close(layer(indices), dense(indices), rtol=1e-4, atol=1e-5)
    assert float(layer(indices)[0, 0].abs().max()) > 0.1  # the padding row's value is used
    layer(indices).square().sum().backward()
    assert float(layer.U.grad[5].abs().max()) == 0.0 and float(layer.U.grad[1].abs().max()) > 0
    fresh = FactoredEmbedding(30, 8, 3, padding_idx=5)  # constructed: a zero padding row, as nn.Embedding's
    assert float(fresh.U[5].abs().max()) == 0.0


def test_embedding_cases_that_stay_dense() -> None:
    model = nn.Sequential(nn.Embedding(30, 8, max_norm=1.0))
    report = compress_(model, FixedRank(2), include="0")
    assert isinstance(model[0], nn.Embedding) and "max_norm=1.0 renormalizes" in report.layers[0].reason
    with pytest.raises(ValueError, match="cannot factor this Embedding: max_norm=1.0"):
        FactoredEmbedding.from_dense(model[0], 2)
    sparse = nn.Sequential(nn.Embedding(30, 8, sparse=True))
    report = compress_(sparse, FixedRank(2), include="0")
    assert isinstance(sparse[0], nn.Embedding) and report.layers[0].reason.startswith("sparse=True: V would get")
    model = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 8))
    data = [torch.randint(0, 30, (4, 5)) for _ in range(2)]
    report = compress_(model, RankRatio(0.25), include=["0", "1"], metric="data", calibration=data)
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert reasons["0"] == "metric='data' does not apply to Embedding: its inputs are indices, not features"
    assert isinstance(model[0], nn.Embedding) and isinstance(model[1], FactoredLinear)


class AllKinds(nn.Module):
    """One layer of every kind, as a small sequence model."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.conv = nn.Conv1d(32, 32, 3, padding=1)
        self.conv2d = nn.Conv2d(4, 16, 3, padding=1)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.proj = hf_conv1d(32, 32)
        self.head = nn.Linear(32, 50)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)  # (B, L, 32)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.conv2d(h.unsqueeze(1).expand(-1, 4, -1, -1)).mean(1)  # (B, 16, L, 32) → (B, L, 32)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(torch.relu(self.proj(h)))


def test_a_training_step_of_every_kind_never_builds_a_dense_weight(monkeypatch) -> None:
    """Forward and backward through every factored kind: no dense product, and the counter does see a read."""
    built = []
    original = FactoredModule.dense_weight
    monkeypatch.setattr(FactoredModule, "dense_weight", lambda self: built.append(self) or original(self))
    torch.manual_seed(0)
    model = AllKinds()
    report = compress_(model, FixedRank(4), include=["embed", "conv", "conv2d", "attn.*", "proj", "head"])
    assert report.dense == [], [(layer.name, layer.reason) for layer in report.dense]
    assert sum(isinstance(m, FactoredModule) for m in model.modules()) == 9
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randint(0, 50, (2, 6))).square().mean().backward()
    opt.step()
    assert built == []
    model.proj.weight  # noqa: B018 - a read from outside builds it, and is counted
    assert built == [model.proj]
