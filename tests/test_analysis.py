"""lmd_lightning.lmd.analysis and lmd-analyze: spectra, rank measures, policy ranks, input intrinsic dimension."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import TINY, command
from test_configs import compose_config
from torch import nn

from lmd_lightning import EnergyRank, FixedRank, GlobalBudget, compress_
from lmd_lightning.cli.experiment import ConfigError, train
from lmd_lightning.cli.experiment import analyze as analyze_command
from lmd_lightning.layers.svd import eckart_young_error
from lmd_lightning.lmd.analysis import analyze, effective_rank, stable_rank, two_nn


def test_rank_measures_on_known_spectra():
    assert stable_rank(torch.tensor([3.0, 1.0, 1.0])) == pytest.approx(11 / 9)
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert stable_rank(torch.zeros(3)) == 0.0 and effective_rank(torch.zeros(3)) == 0.0


@pytest.mark.parametrize("dim", [2, 5])
def test_two_nn_recovers_the_dimension_of_a_linear_manifold(dim):
    gen = torch.Generator().manual_seed(dim)
    points = torch.randn(3000, dim, generator=gen) @ torch.randn(dim, 30, generator=gen)
    assert two_nn(points) == pytest.approx(dim, rel=0.15)
    assert two_nn(torch.zeros(10, 3)) is None  # all duplicates: no ratios


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 6))


def test_analysis_matches_the_spectrum_the_error_and_what_compress_would_choose():
    model = mlp()
    policies = (EnergyRank(0.9), GlobalBudget(params=0.3))
    result = analyze(model, policies=policies)
    assert [layer.name for layer in result.layers] == ["0", "2", "4"]
    first = result.layers[0]
    s = torch.linalg.svdvals(model[0].weight.detach())
    torch.testing.assert_close(torch.tensor(first.spectrum), s)
    assert first.error_curve[4] == pytest.approx(eckart_young_error(s, 5) / float(s.norm()), rel=1e-5)
    assert first.error_curve[-1] == 0.0 and len(first.error_curve) == 20
    assert first.stable_rank == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-5)
    for policy, label in zip(policies, result.policies):
        copy = mlp()
        report = compress_(copy, policy)
        chosen = {layer.name: layer.rank for layer in report.layers if layer.rank is not None}
        for layer in result.layers:
            if layer.name in chosen:
                assert layer.policy_ranks[label] == chosen[layer.name]
    assert first.intrinsic_dim is None and "input ID" in result.table()


def test_analysis_of_a_compressed_model_with_data():
    model = mlp()
    compress_(model, FixedRank(5))
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(600, 3, generator=gen) @ torch.randn(3, 20, generator=gen)  # 3-dim inputs
    result = analyze(model, inputs.split(100), max_points=500)
    first = result.layers[0]
    assert first.kind == "FactoredLinear" and first.rank == 5 and len(first.spectrum) == 5
    assert first.input_points == 500 and first.intrinsic_dim == pytest.approx(3, rel=0.25)
    assert all(layer.intrinsic_dim is not None for layer in result.layers)
    assert json.loads(json.dumps(result.to_dict()))["layers"][0]["rank"] == 5


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"policies": []}, TypeError, "`policies` must be a non-empty sequence of RankPolicy"),
        ({"policies": [EnergyRank(0.9), EnergyRank(0.9)]}, ValueError, "`policies` must differ"),
        ({"max_points": 2}, ValueError, "`max_points` must be an int >= 3, got 2"),
        ({"include": "nope*"}, ValueError, "`include` pattern 'nope\\*' matches no layer that can be factored"),
    ],
)
def test_analysis_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        analyze(mlp(), **kwargs)


@pytest.fixture(scope="module")
def lmd_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny lmd-train run with every LMD option on: data metric, metric maps, Laplacian regularizer."""
    root = tmp_path_factory.mktemp("lmd")
    results = train(
        compose_config(
            overrides=(
                *TINY,
                "data=synthetic",
                "compression=fixed",
                "compression.rank=6",
                "metric=data",
                "metric.batches=2",
                "regularizer=laplacian",
                "regularizer.points=32",
                "regularizer.k=5",
                "callback.fold_maps=false",
            ),
            output_dir=root,
        )
    )
    assert results["ranks"] == {"net.fc1": 6, "net.fc2": 6, "net.fc3": 6}
    return results["checkpoint"]


def test_lmd_train_with_data_metric_and_laplacian_logs_and_keeps_maps(lmd_checkpoint: str):
    state = torch.load(lmd_checkpoint, weights_only=True)["state_dict"]
    assert state["net.fc1.I_dist"].shape == (6, 6)  # fold_maps=false: the checkpoint keeps them
    log_dir = Path(lmd_checkpoint).parents[1] / "tensorboard"
    tags = set()
    for events in log_dir.rglob("events.out.tfevents*"):
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert any(tag.startswith("lmd/reg/laplacian") for tag in tags)


def test_analyze_command_on_a_compressed_checkpoint(lmd_checkpoint: str, tmp_path: Path):
    cfg = compose_config("analyze", (f"ckpt_path={lmd_checkpoint}", "batches=2", "max_points=150"), output_dir=tmp_path)
    result = analyze_command(cfg)
    names = [layer.name for layer in result.layers]
    assert names == ["net.fc1", "net.fc2", "net.fc3", "net.head"]
    assert result.layers[0].rank == 6 and result.layers[0].input_points == 150
    assert all(layer.intrinsic_dim is not None and layer.intrinsic_dim > 0 for layer in result.layers)
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert saved["layers"][1]["name"] == "net.fc2" and math.isclose(
        saved["layers"][1]["stable_rank"], result.layers[1].stable_rank
    )
    events = next((tmp_path / "tensorboard").glob("events.out.tfevents*"))
    images = EventAccumulator(str(events), size_guidance={"images": 0}).Reload().Tags()["images"]
    assert set(images) == {"lmd_analysis/spectra", "lmd_analysis/error_curves", "lmd_analysis/ranks"}


def test_analyze_command_errors(lmd_checkpoint: str, tmp_path: Path):
    bad = compose_config("analyze", (f"ckpt_path={lmd_checkpoint}", "batches=0"), output_dir=tmp_path)
    with pytest.raises(ConfigError, match="`batches` must be an int >= 1, got 0"):
        analyze_command(bad)
    shown = command("lmd-analyze", "--help", cwd=tmp_path)
    assert shown.returncode == 0 and "intrinsic dimension" in shown.stdout
    missing = command("lmd-analyze", cwd=tmp_path)
    assert missing.returncode == 2 and "lmd-analyze: error: `ckpt_path` is required" in missing.stderr


def test_finetune_refuses_lmd_options_without_the_callback(lmd_checkpoint: str, tmp_path: Path):
    from lmd_lightning.cli.experiment import finetune

    cfg = compose_config(
        "finetune", (f"ckpt_path={lmd_checkpoint}", "regularizer=laplacian", "metric=data"), output_dir=tmp_path
    )
    with pytest.raises(ConfigError, match="`regularizer` and `metric` need the LMDCompression callback"):
        finetune(cfg)
