"""FactoredMultiheadAttention keeps nn.MultiheadAttention's forward contract; compress_ factors its projections."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lmd_lightning import EnergyRank, FixedRank, RankRatio, compress_, restore_factored_
from lmd_lightning.layers import FactoredLinear, FactoredMultiheadAttention

OPTIONS = list(
    itertools.product(
        [True, False],  # batch_first
        [True, False],  # bias
        [True, False],  # add_bias_kv
        [True, False],  # add_zero_attn
        [None, 6],  # kdim = vdim
    )
)
N, L, S, E = 3, 5, 4, 8


def masks() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [
        {},
        {"key_padding_mask": torch.tensor([[False] * S, [False] * 3 + [True], [True] + [False] * 3])},
        {"key_padding_mask": torch.randn(N, S, generator=g)},
        {"attn_mask": torch.rand(L, S, generator=g) > 0.7},
        {"attn_mask": torch.randn(N * 2, L, S, generator=g)},
        {
            "attn_mask": torch.rand(L, S, generator=g) > 0.8,
            "key_padding_mask": torch.tensor([[False] * S, [False] * 3 + [True], [False] * S]),
        },
    ]


@pytest.mark.parametrize("batch_first,bias,bias_kv,zero_attn,kdim", OPTIONS)
def test_same_outputs_weights_and_gradients_as_nn_multihead_attention(
    batch_first: bool, bias: bool, bias_kv: bool, zero_attn: bool, kdim: int | None
) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(
        E, 2, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero_attn, kdim=kdim, vdim=kdim, batch_first=batch_first
    ).double()
    split = FactoredMultiheadAttention.from_mha(mha)
    q = torch.randn(N, L, E, dtype=torch.float64)
    k = torch.randn(N, S, kdim or E, dtype=torch.float64)
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    for mask, need_weights, average in itertools.product(masks(), [True, False], [True, False]):
        mask = {key: m.double() if torch.is_floating_point(m) else m for key, m in mask.items()}
        kw = {"need_weights": need_weights, "average_attn_weights": average, **mask}
        expected, expected_weights = mha(q, k, k, **kw)
        got, weights = split(q, k, k, **kw)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        if need_weights:
            torch.testing.assert_close(weights, expected_weights, rtol=1e-10, atol=1e-12)
        else:
            assert weights is None and expected_weights is None
    # gradients: the inputs' and every projection's
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    mha(qg, kg, kg, need_weights=False)[0].square().sum().backward()
    qs, ks = q.clone().requires_grad_(), k.clone().requires_grad_()
    split(qs, ks, ks, need_weights=False)[0].square().sum().backward()
    torch.testing.assert_close(qs.grad, qg.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ks.grad, kg.grad, rtol=1e-9, atol=1e-12)
    in_grad = mha.in_proj_weight.grad if mha._qkv_same_embed_dim else mha.q_proj_weight.grad
    torch.testing.assert_close(split.q_proj.weight.grad, in_grad[:E], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(split.out_proj.weight.grad, mha.out_proj.weight.grad, rtol=1e-9, atol=1e-12)


def test_unbatched_causal_dropout_and_back_to_dense() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, 2, dropout=0.5, batch_first=True).double().eval()
    split = FactoredMultiheadAttention.from_mha(mha)
    x = torch.randn(L, E, dtype=torch.float64)  # unbatched (L, E)
    for got, expected in zip(split(x, x, x), mha(x, x, x)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    xb = x.expand(2, L, E)
    for need_weights in (True, False):
        kw = {"attn_mask": causal, "is_causal": True, "need_weights": need_weights}
        torch.testing.assert_close(split(xb, xb, xb, **kw)[0], mha(xb, xb, xb, **kw)[0], rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        split(xb, xb, xb, is_causal=True)
    split.train()  # dropout acts in training only
    assert not torch.allclose(split(xb, xb, xb)[0], split(xb, xb, xb)[0])
    split.eval()
    compress_(nn.Sequential(split), FixedRank(2))
    dense = split.to_mha()
    assert type(dense) is nn.MultiheadAttention
    torch.testing.assert_close(dense(xb, xb, xb)[0], split(xb, xb, xb)[0], rtol=1e-10, atol=1e-12)


def test_from_mha_refuses_a_subclass_and_compress_says_why() -> None:
    class Custom(nn.MultiheadAttention):
        pass

    with pytest.raises(TypeError, match="`mha` must be a torch.nn.MultiheadAttention, got Custom"):
        FactoredMultiheadAttention.from_mha(Custom(E, 2))
    model = nn.Sequential(Custom(E, 2))
    report = compress_(model, FixedRank(1))
    assert type(model[0]) is Custom
    assert "nn.MultiheadAttention reads this layer's .weight directly (a subclass, Custom, is not split)" in (
        report.layers[0].reason
    )


class EncoderClassifier(nn.Module):
    """A ViT-like classifier on torch's own nn.TransformerEncoder."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(12, d)
        layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x), src_key_padding_mask=mask).mean(1))


def test_transformer_encoder_attention_is_factored_and_fast_paths_stay_off() -> None:
    torch.manual_seed(0)
    model = EncoderClassifier().eval()
    x = torch.randn(4, 6, 12)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1, 4:] = True
    with torch.no_grad():  # every matrix of rank 4 (the packed in_proj: each of q, k, v), then a high energy is exact
        for module in model.modules():
            matrices = []
            if isinstance(module, nn.MultiheadAttention):
                matrices = [*module.in_proj_weight.split(32), module.out_proj.weight]
            elif isinstance(module, nn.Linear) and module.weight.shape[0] > 3:
                matrices = [module.weight]
            for w in matrices:
                w.copy_(torch.randn(w.shape[0], 4) @ torch.randn(4, w.shape[1]) / w.shape[1])
        expected = model(x, mask)
    compress_(model, EnergyRank(0.99999))
    assert isinstance(model.encoder.layers[1].self_attn.v_proj, FactoredLinear)
    with torch.no_grad():  # eval + no grad: where the fused kernels would read packed dense weights
        got = model(x, mask)
    # Row 1 is padded: the dense model's nested-tensor fast path zeroes padded positions, which the
    # regular path (any model with factored layers takes it) computes, so their mean differs.
    keep = [0, 2, 3]
    assert float((got[keep] - expected[keep]).norm() / expected[keep].norm()) < 1e-3
    model = EncoderClassifier().eval()
    report = compress_(model, RankRatio(0.25))
    attention = model.encoder.layers[0].self_attn
    assert isinstance(attention, FactoredMultiheadAttention)
    assert all(isinstance(getattr(attention, p), FactoredLinear) for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    linear_like = sum(layer.params_before for layer in report.layers)
    factored = sum(layer.params_before for layer in report.layers if layer.reason is None)
    assert factored / linear_like > 0.9  # all projections and feed-forward layers are reachable
    with torch.no_grad():
        model(x, mask)
    model.train()
    model(x, mask).sum().backward()


def test_nothing_factored_puts_the_original_attention_back() -> None:
    model = EncoderClassifier()
    attention = model.encoder.layers[0].self_attn
    params = {name: p for name, p in model.named_parameters()}
    report = compress_(model, EnergyRank(0.999999))  # random weights: nothing saves at this energy
    assert model.encoder.layers[0].self_attn is attention
    assert {name: p for name, p in model.named_parameters()} == params
    assert report.params_after == report.params_before


def test_failed_compress_puts_the_original_attention_back() -> None:
    model = EncoderClassifier()
    attention = model.encoder.layers[1].self_attn
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        compress_(model, FixedRank(2))
    assert model.encoder.layers[1].self_attn is attention
    assert not any(isinstance(m, FactoredMultiheadAttention) for m in model.modules())


def test_a_checkpoint_of_factored_attention_restores_into_a_fresh_model() -> None:
    torch.manual_seed(0)
    model = nn.Transformer(16, 2, 1, 1, dim_feedforward=32, dropout=0.0, batch_first=True)
    compress_(model, FixedRank(3), include=["*self_attn.q_proj", "*multihead_attn.*"])
    assert isinstance(model.decoder.layers[0].multihead_attn, FactoredMultiheadAttention)
    assert isinstance(model.encoder.layers[0].self_attn.k_proj, nn.Linear)  # split, left dense
    state = model.state_dict()
    fresh = nn.Transformer(16, 2, 1, 1, dim_feedforward=32, dropout=0.0, batch_first=True)
    rebuilt = restore_factored_(fresh, state)
    assert "decoder.layers.0.multihead_attn.v_proj" in rebuilt and "encoder.layers.0.self_attn.q_proj" in rebuilt
    fresh.load_state_dict(state, strict=True)
    src, tgt = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    model.eval(), fresh.eval()
    expected = model(src, tgt, tgt_mask=causal, tgt_is_causal=True)
    torch.testing.assert_close(fresh(src, tgt, tgt_mask=causal, tgt_is_causal=True), expected, rtol=0, atol=0)


def test_include_patterns_may_name_projections_before_the_split() -> None:
    """`include="*.q_proj"` is valid on a model that still holds nn.MultiheadAttention (callback setup checks it)."""
    from lmd_lightning.truncate.targets import find_targets

    model = EncoderClassifier()
    assert find_targets(model, "*.q_proj", None, None) == []  # valid: nothing to target before the split
    with pytest.raises(ValueError, match=r"matches no layer that can be factored; candidates are: \[.*'head'"):
        find_targets(model, "*.w_proj", None, None)
    compress_(model, FixedRank(2), include="*.q_proj")
    layers = model.encoder.layers
    assert isinstance(layers[0].self_attn.q_proj, FactoredLinear) and type(layers[1].self_attn.k_proj) is nn.Linear


def test_a_bare_attention_module_is_refused_and_left_alone() -> None:
    mha = nn.MultiheadAttention(16, 2)
    params = [p.clone() for p in mha.parameters()]
    with pytest.raises(TypeError, match=r"`model` is itself a MultiheadAttention; wrap it in a container"):
        compress_(mha, FixedRank(2))
    assert "" not in dict(mha.named_children()) and all(torch.equal(a, b) for a, b in zip(params, mha.parameters()))


def test_a_failed_restore_leaves_the_fresh_model_as_it_was_and_frozen_layers_frozen() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 16)

    model = Model()
    compress_(model, FixedRank(3))
    state = model.state_dict()
    fresh = Model()
    fresh.fc.weight.requires_grad_(False)
    broken = {**state, "fc.U": torch.zeros(5, 3)}
    with pytest.raises(ValueError, match=r"`fc.U`\(5, 3\) / `fc.V`\(16, 3\) does not fit layer `fc`"):
        restore_factored_(fresh, broken)
    assert type(fresh.attn) is nn.MultiheadAttention and type(fresh.fc) is nn.Linear  # nothing half rebuilt
    restore_factored_(fresh, state)
    assert isinstance(fresh.attn, FactoredMultiheadAttention)
    assert not fresh.fc.U.requires_grad and not fresh.fc.V.requires_grad and fresh.fc.bias.requires_grad
