"""`python -m benchmarks.run --suite all --quick`: every benchmark runs and writes its tables.

Timings are never asserted; sizes, counts and the tables' structure are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import bench_charlm, bench_quality, bench_zoo, run
from benchmarks.common import RESULTS

QUICK_FILES = {
    "quality_quick.md",
    "figures/quality_quick_mlp.png",
    "training_cost_quick.md",
    "callback_overhead_quick.md",
    "overheads_quick.md",
    "svd_speed_quick.md",
    "memory_quick.md",
    "scaling_quick.md",
    "factored_speed_quick.md",
    "lmd_quick.md",
    "convergence_quick.md",
    "trigger_quick.md",
    "parametrization_quick.md",
    "zoo_quick.md",
    "attention_speed_quick.md",
    "charlm_quick.md",
    "allocation_quick.md",
}


def rows(name: str) -> dict[str, list[str]]:
    """First cell → the other cells, for every table row of a result file (header rows included)."""
    lines = (RESULTS / name).read_text().splitlines()
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("| ")]
    return {row[0]: row[1:] for row in cells}


def count(cell: str) -> float:
    return float(cell.split()[0].replace(",", "").rstrip("×"))


@pytest.fixture(scope="module")
def written() -> set[str]:
    return {path.removeprefix("results/") for path in run.main(["--suite", "all", "--quick"])}


@pytest.mark.slow
def test_quick_suite_writes_every_table_with_the_machine_header(written: set[str]) -> None:
    assert QUICK_FILES <= written
    for name in QUICK_FILES - {"figures/quality_quick_mlp.png"}:
        text = (RESULTS / name).read_text()
        assert "torch " in text and "threads:" in text and "reproduce: `python -m benchmarks." in text, name
    assert (RESULTS / "figures/quality_quick_mlp.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_quick_quality_table_has_every_contender_at_the_sizes_it_promises(written: set[str]) -> None:
    table = rows("quality_quick.md")
    assert set(bench_quality.ORDER) <= set(table)
    params = {name: count(table[name][0]) for name in bench_quality.ORDER}
    assert params["dense"] == 551_434  # the recipe's MLP, 40→512×3→10
    budget = params[bench_quality.BUDGET_RUN]
    assert budget < 0.25 * params["dense"]  # GlobalBudget(params=0.2) of the targeted layers
    assert params["one-shot SVD after training (weight)"] == params["one-shot SVD after training (data)"] == budget
    assert abs(params["ModelPruning (L1, equal params)"] - budget) < 0.01 * budget  # non-zero weights after pruning
    assert abs(params["small dense (equal params)"] - budget) < 0.01 * budget  # the narrowed width's count
    assert table["ModelPruning (L1, equal params)"][3] == table[bench_quality.BUDGET_RUN][3]  # pruned at its epoch
    # one-shot truncation is timed with the dense training it starts from
    assert count(table["one-shot SVD after training (weight)"][6]) >= count(table["dense"][6])


@pytest.mark.slow
def test_quick_cost_memory_and_scaling_tables_show_the_factored_side_smaller(written: set[str]) -> None:
    cost = rows("training_cost_quick.md")
    assert count(cost["compress at convergence + fine-tune"][0]) < count(cost["dense"][0]) == 7434  # 40→64→64→10
    # memory: one row per (contender, epoch), all starting with the width
    memory = (RESULTS / "memory_quick.md").read_text().splitlines()
    lines = [line.split("|")[1:-1] for line in memory if line.startswith("| 256")]
    by = {(cells[1].strip(), cells[2].strip()[0]): cells for cells in lines}
    dense_params, factored_params = (count(by[key][3]) for key in (("dense", "1"), ("factored r = width/4", "1")))
    assert factored_params < 0.6 * dense_params == 0.6 * count(by[("dense", "0")][3])
    for cells in lines:  # Adam keeps two moments per parameter
        assert count(cells[6]) == pytest.approx(2 * count(cells[4]), abs=0.1)
    scaling = rows("scaling_quick.md")
    dense_mib, factored_mib = (float(x) for x in scaling["512 (64)"][0].split(" → "))
    assert factored_mib == pytest.approx(dense_mib / 4, abs=0.06)  # r = n/8 keeps a quarter (0.1 MiB printed)


@pytest.mark.slow
def test_quick_lmd_table_compares_the_truncations_at_one_budget(written: set[str]) -> None:
    table = rows("lmd_quick.md")
    assert {"weight (Eckart–Young)", "data, independent", "data, sequential", "maps + laplacian λ=1 ✓"} <= set(table)
    params = {name: count(cells[0]) for name, cells in table.items() if name != "variant"}
    # the same GlobalBudget(params=0.2) for every variant: each ends near 20% of the 546k targeted parameters
    assert all(100_000 < value < 125_000 for value in params.values()), params


@pytest.mark.slow
def test_quick_zoo_table_shows_each_model_smaller_with_its_reasons(written: set[str]) -> None:
    table = rows("zoo_quick.md")
    assert set(bench_zoo.QUICK) <= set(table)
    for name in bench_zoo.QUICK:
        before, after = (count(side) for side in table[name][0].split("→"))
        assert after < before
    assert table["gpt2-lm"][2] == "HFConv1D ×8" and "tied to the token embedding" in table["gpt2-lm"][3]
    assert "MultiheadAttention" not in table["nn.Transformer"][3]  # its projections are reachable
    assert table["conv1d-cnn"][3].startswith("grouped/depthwise conv")


@pytest.mark.slow
def test_quick_attention_and_charlm_tables_have_every_contender(written: set[str]) -> None:
    attention = (RESULTS / "attention_speed_quick.md").read_text()
    for name in ("nn.MultiheadAttention", "split, dense projections", "rank d/4 = 64", "rank d/8 = 32"):
        assert f"| 256 | {name}" in attention or f"| 256 | factored, {name}" in attention, name
    params = {
        line.split("|")[2].strip(): count(line.split("|")[3]) for line in attention.splitlines() if "| 256 |" in line
    }
    assert params["nn.MultiheadAttention"] == params["split, dense projections"] == 4 * 256 * 256 + 4 * 256
    assert params["factored, rank d/8 = 32"] < params["factored, rank d/4 = 64"] < params["nn.MultiheadAttention"]
    charlm = rows("charlm_quick.md")
    assert set(bench_charlm.CONTENDERS) <= set(charlm)
    assert count(charlm["callback, GlobalBudget(params=0.3)"][0]) < count(charlm["dense"][0])


@pytest.mark.slow
def test_quick_allocation_table_compares_at_equal_parameters(written: set[str]) -> None:
    lines = (RESULTS / "allocation_quick.md").read_text().splitlines()
    table = [[c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("| ")][1:]
    by = {(row[0], row[1]): count(row[2]) for row in table}
    for budget in ("0.5", "0.25", "0.125"):
        loss = by[("GlobalBudget, loss metric (default)", budget)]
        # every GlobalBudget keeps the same share; uniform rank is the smallest rank with at least as many
        assert by[("GlobalBudget, weight", budget)] <= by[("dense", "1")] * float(budget) + 1024
        assert loss <= by[("uniform rank", budget)] <= loss * 1.1


def test_bench_recipes_only_runs_the_studies_named_and_refuses_others() -> None:
    from benchmarks.bench_recipes import CURVE_STUDIES, _only

    chosen = _only(CURVE_STUDIES, "budget_loss, energy_weight")
    assert list(chosen) == ["budget_loss", "energy_weight"] and chosen["budget_loss"] == CURVE_STUDIES["budget_loss"]
    with pytest.raises(
        SystemExit, match=r"--only 'nope': not studies of this set; it has energy_weight, budget_loss, "
    ):
        _only(CURVE_STUDIES, "nope")


def test_the_curves_figure_labels_every_contenders_knob() -> None:
    from benchmarks.recipe_curves import knob

    row = {"run": "recipe=mnist1d_auto compression=none model.widths=[90,90,90]"}
    assert knob(row) == "model.widths=[90,90,90]"
    assert knob({"run": "trigger=epoch compression=ratio compression.ratio=0.06"}) == "compression.ratio=0.06"
    assert knob({"run": "compression=stable_rank compression.multiplier=0.5"}) == "compression.multiplier=0.5"
    assert knob({"run": "+callbacks=pruning callbacks.pruning.amount=0.75"}) == "callbacks.pruning.amount=0.75"


def test_curve_rows_count_what_each_model_keeps_against_the_widest(tmp_path: Path) -> None:
    """Pruned runs count their nonzero weights; every ratio is to the 3×512's parameters, small dense ones too."""
    from benchmarks.bench_recipes import CURVE_STUDIES, curve_rows

    own = {"small_dense": (137_000, 137_000, 137_000), "pruning": (551_434, 551_434, 139_018)}
    for folder in CURVE_STUDIES:
        before, params, nonzero = own.get(folder, (551_434, 110_000, 109_990))
        (tmp_path / folder / "0").mkdir(parents=True)
        row = {"params_before": before, "params": params, "nonzero_params": nonzero, "val_acc": 0.8}
        (tmp_path / folder / "0" / "results.json").write_text(json.dumps(row))
    series = curve_rows(tmp_path)
    assert list(series) == list(CURVE_STUDIES)
    (pruned,), (small,), (energy,) = series["pruning"], series["small_dense"], series["energy_weight"]
    assert pruned["params"] == 139_018 and pruned["compression_ratio"] == pytest.approx(551_434 / 139_018)
    assert small["compression_ratio"] == pytest.approx(551_434 / 137_000)
    assert energy["params"] == 110_000 and energy["compression_ratio"] == pytest.approx(551_434 / 110_000)


def test_the_digits_table_counts_pruned_weights_and_lists_every_contender(tmp_path: Path) -> None:
    """--set digits' table sizes rows as the curves do: a pruned run by its nonzero weights, ratios to the 3×512."""
    from benchmarks.bench_recipes import DIGITS_STUDIES, table

    for folder in DIGITS_STUDIES:
        before, params, nonzero = (563_722, 563_722, 140_930) if folder == "pruning" else (563_722, 112_744, 112_744)
        (tmp_path / folder / "0").mkdir(parents=True)
        row = {"params_before": before, "params": params, "nonzero_params": nonzero, "val_acc": 0.97}
        (tmp_path / folder / "0" / "results.json").write_text(json.dumps(row))
    rows = {
        line.split(" | ")[0].strip("| "): line for line in table(tmp_path, DIGITS_STUDIES, widest=True).splitlines()[2:]
    }
    assert set(rows) == set(DIGITS_STUDIES) >= {"cuttlefish", "pufferfish", "pruning", "small_dense", "uniform_weight"}
    assert "| 140,930 | 4.00× |" in rows["pruning"]
    assert "| 112,744 | 5.00× |" in rows["cuttlefish"]


def test_latencies_feed_each_model_inputs_of_its_width() -> None:
    """The digits models take 64 pixels, MNIST-1D's 40 values: each is timed on inputs it accepts."""
    from benchmarks.bench_quality import latencies

    timed = latencies({"digits": torch.nn.Linear(64, 10)}, "mlp", features=64)
    assert list(timed) == ["digits"] and timed["digits"] > 0
    with pytest.raises(RuntimeError):
        latencies({"digits": torch.nn.Linear(64, 10)}, "mlp")  # 40 values into 64 inputs


def _first_setting(overrides: tuple[str, ...]) -> list[str]:
    """A study's overrides with each sweep cut to its first value (`a=1,2` → `a=1`; lists kept whole)."""
    first = []
    for override in overrides:
        key, _, value = override.partition("=")
        if value.startswith("["):
            value = value.split("],")[0] + ("]" if "]," in value else "")
        elif "," in value:
            value = value.split(",")[0]
        first.append(f"{key}={value}")
    return first


@pytest.mark.parametrize("studies_name", ["CNN_STUDIES", "TRANSFORMER_STUDIES"])
def test_the_contender_sets_compose_and_name_real_layers(studies_name: str) -> None:
    """Every study of --set cnn and --set transformer composes; Pufferfish's dense first layer is a module of the model;
    the small dense models are smaller; the one-shot cuts are one round without the guard, the ladders are not."""
    import fnmatch

    from hydra.utils import instantiate

    from benchmarks import bench_recipes
    from benchmarks.recipe_curves import knob
    from tests.test_configs import compose_config

    studies = getattr(bench_recipes, studies_name)
    assert set(studies) >= {"dense", "auto", "pufferfish", "cuttlefish", "pruning", "small_dense", "uniform_weight"}
    sizes = {}
    for name, overrides in studies.items():
        cfg = compose_config(overrides=tuple(_first_setting(overrides)))
        model = instantiate(cfg.model)
        sizes[name] = sum(p.numel() for p in model.parameters())
        modules = {n for n, _ in model.named_modules()}
        excluded = cfg.callback.exclude
        for pattern in [excluded] if isinstance(excluded, str) else list(excluded):
            assert fnmatch.filter(modules, pattern), f"{name}: exclude {pattern!r} matches no module"
        if name.startswith("auto"):
            assert cfg.callback.rounds == "auto" and cfg.callback.guard.max_drop == 0.01
        elif name not in ("dense", "pruning", "small_dense"):
            assert cfg.callback.rounds == 1 and cfg.callback.guard.max_drop is None, name
        else:
            assert cfg.compression is None, name  # trained dense: the baselines
    assert sizes["pufferfish"] == sizes["dense"] and sizes["small_dense"] < sizes["dense"] / 1.9
    small = _first_setting(studies["small_dense"])
    assert knob({"run": " ".join(small)}) == small[-1]  # the latency table names each small model by its size
