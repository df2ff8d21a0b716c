"""A zoo of architectures nobody here wrote, built from configs (no downloaded weights).

For each: `compress_` at RankRatio(0.25) gives a smaller model that runs forward and backward;
at EnergyRank(0.9999), on weights of low rank, its outputs stay within 1e-3 of the dense model's;
`restore_factored_` + a strict `load_state_dict` round-trips; at least 90% of the parameters held
by linear-like modules (Linear, Conv1d, Conv2d with groups=1, HF Conv1D, attention projections)
end up factored, and every one left dense has a reason. A head tied to the embedding stays dense
by design (never untied silently): it is left out of that share, and the default must end no
bigger than the same call with the head excluded by hand.
"""

from __future__ import annotations

import pytest
import torch

from lmd_lightning import EnergyRank, RankRatio, compress_, restore_factored_
from lmd_lightning.layers import FactoredModule

pytest.importorskip("transformers")

from benchmarks.zoo import ZOO, build, linear_like, low_rank_, run  # noqa: E402


@pytest.mark.parametrize("name", list(ZOO))
def test_compress_at_rank_ratio_quarter(name: str) -> None:
    model = build(name)
    held = linear_like(model)
    report = compress_(model, RankRatio(0.25))
    assert report.model_params_after < report.model_params_before
    assert sum(p.numel() for p in model.parameters()) == report.model_params_after
    out = run(name, model)
    assert torch.isfinite(out).all()
    model.train()
    run(name, model).float().square().mean().backward()
    assert all(p.grad is not None for m in model.modules() if isinstance(m, FactoredModule) for p in (m.U, m.V))
    # coverage of the linear-like parameters, tied heads aside (they stay dense by design)
    tied = {layer.name for layer in report.dense if layer.reason.startswith("tied to")} & set(held)
    assert tied == ({ZOO[name].tied_head} if ZOO[name].tied_head else set())
    factored = sum(layer.params_before for layer in report.layers if layer.reason is None)
    total = sum(numel for module_name, numel in held.items() if module_name not in tied)
    assert factored / total >= 0.9, [(layer.name, layer.reason) for layer in report.dense]
    assert all(layer.reason for layer in report.dense)


@pytest.mark.parametrize("name", list(ZOO))
def test_high_energy_keeps_the_outputs(name: str) -> None:
    model = build(name)
    low_rank_(model)
    with torch.no_grad():
        expected = run(name, model)
    report = compress_(model, EnergyRank(0.9999))
    assert report.model_params_after < report.model_params_before  # the low-rank weights were factored
    with torch.no_grad():
        got = run(name, model)
    assert float((got - expected).norm() / expected.norm()) < 1e-3


@pytest.mark.parametrize("name", list(ZOO))
def test_restore_and_strict_load_round_trip(name: str) -> None:
    model = build(name)
    compress_(model, RankRatio(0.25))
    state = model.state_dict()
    fresh = build(name)
    assert restore_factored_(fresh, state)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(run(name, fresh), run(name, model), rtol=0, atol=0)


@pytest.mark.parametrize("name", [name for name, entry in ZOO.items() if entry.tied_head])
def test_tied_head_default_is_no_bigger_than_excluding_it_by_hand(name: str) -> None:
    model, by_hand = build(name), build(name)
    default = compress_(model, RankRatio(0.25))
    excluded = compress_(by_hand, RankRatio(0.25), exclude=ZOO[name].tied_head)
    assert default.model_params_after <= excluded.model_params_after
    head = model.get_submodule(ZOO[name].tied_head)
    assert any(head.weight is p for m in model.modules() if m is not head for p in m.parameters(recurse=False))
