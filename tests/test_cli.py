"""The lmd-* commands: every recipe for a few batches, fine-tuning a checkpoint, a multirun and its report.

Recipes run in-process through `experiment.train` (what `lmd-train` calls) with a composed
config; the console scripts themselves run as subprocesses for --help, --cfg, errors and -m.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_configs import compose_config
from test_export import reload

from lmd_lightning.cli.commands import recipe_dir
from lmd_lightning.cli.experiment import CONFIG_KEY, ConfigError, export, finetune, load_model, train
from lmd_lightning.cli.tradeoff import RESULTS_FILE

BIN = Path(sys.executable).parent
TINY = (  # two epochs of a few batches, compression forced at epoch 1
    "trainer.max_epochs=2",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "trigger=epoch",
    "callback.guard.sweep_points=3",
    "callback.guard.batches=2",
)
SMALL = {  # the ladder's recipe on its usual data size would generate 20,000 samples; its tolerance keeps the rung
    "mnist1d_auto": ("data.num_samples=1000", "callback.guard.max_drop=1.0")
}
OFFLINE = {  # recipes whose data needs a download: the same models on synthetic data of the same shape
    "mnist_lenet300": ("data=synthetic", "data.input_shape=[1,28,28]", "data.n=300"),
    "cifar10_resnet": (
        "data=synthetic",
        "data.input_shape=[3,32,32]",
        "data.n=120",
        "data.batch_size=16",
        "model.width=8",
        "trainer=cpu",
    ),
}


def run_train(tmp_path: Path, *overrides: str) -> dict:
    cfg = compose_config(overrides=(*TINY, *overrides), output_dir=tmp_path)
    return train(cfg)


def scalars(log_dir: str) -> dict[str, list[float]]:
    events = EventAccumulator(log_dir).Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(path.stem for path in recipe_dir().glob("*.yaml")))
def test_every_recipe_trains_compresses_and_logs(recipe: str, tmp_path: Path) -> None:
    results = run_train(tmp_path, f"recipe={recipe}", *OFFLINE.get(recipe, ()), *SMALL.get(recipe, ()))
    assert results["compressed_epochs"] == [1] and results["failure"] is None
    # After a few batches the weights are near their random init, with flat spectra: a policy may
    # rightly keep a layer dense (break-even), so fewer parameters is checked where ranks were cut.
    assert results["params"] <= results["params_before"] and (results["params"] < results["params_before"]) == any(
        layer["rank"] is not None for layer in results["reports"][-1]["layers"]
    )
    assert json.loads((tmp_path / RESULTS_FILE).read_text())["params"] == results["params"]
    assert Path(results["checkpoint"]).is_file()
    logged = scalars(results["log_dir"])
    # The summary's accuracies are the ones the run logged: the last validation, and the one test.
    assert results["val_acc"] == pytest.approx(logged["val_acc"][-1], abs=1e-6)
    assert [results["test_acc"]] == pytest.approx(logged["test_acc"], abs=1e-6)
    for layer, rank in results["ranks"].items():
        assert logged[f"lmd/rank/{layer}"] == [rank]
    assert logged["lmd/params"] == [results["params"]]
    if recipe == "mnist1d_auto":  # the ladder validates its rung after fine-tuning instead of sweeping
        assert logged["lmd/ladder/kept"] == [1.0] and results["ladder"][0]["decision"] == "kept"
    else:
        assert "lmd/sweep/val_acc" in logged


def test_dense_baseline_and_csv_logger(tmp_path: Path) -> None:
    results = run_train(tmp_path, "data=synthetic", "compression=none", "logger=csv")
    assert results["params"] == results["params_before"] and "ranks" not in results
    header = (Path(results["log_dir"]) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val_acc", "val_loss", "epoch"} <= set(header)


def test_model_pruning_baseline_through_extra_callbacks(tmp_path: Path) -> None:
    """+callbacks=pruning adds Lightning's ModelPruning: 3/4 of the weights zeroed at epoch 0's end, kept at zero."""
    results = run_train(
        tmp_path,
        "data=synthetic",
        "compression=none",
        "logger=none",
        "+callbacks=pruning",
        "callbacks.pruning.amount=0.75",
        "callbacks.pruning.apply_pruning._args_=[0]",
    )
    state = torch.load(results["checkpoint"], weights_only=False)["state_dict"]
    weights = sum(v.numel() for k, v in state.items() if k.endswith(".weight"))
    biases = sum(v.numel() for k, v in state.items() if k.endswith(".bias"))
    assert results["params"] == results["params_before"] == weights + biases  # the tensors stay dense
    assert results["nonzero_params"] == weights - round(0.75 * weights) + biases
    assert sum(int(v.count_nonzero()) for v in state.values()) == results["nonzero_params"]  # after epoch 1 too


def test_extra_callbacks_must_be_lightning_callbacks(tmp_path: Path) -> None:
    cfg = compose_config(overrides=(*TINY, "data=synthetic", "compression=none"), output_dir=tmp_path)
    cfg.callbacks = [{"_target_": "pytorch_lightning.callbacks.LearningRateMonitor"}]
    with pytest.raises(ConfigError, match=r"`callbacks` must map names to callback configs, got '- _target_: pyt"):
        train(cfg)
    with pytest.raises(ConfigError, match=r"`callbacks.seven`: Cannot instantiate config of type int"):
        run_train(tmp_path, "data=synthetic", "compression=none", "+callbacks.seven=7")
    with pytest.raises(ConfigError, match=r"`callbacks.odd` built a OrderedDict, not a Lightning Callback"):
        run_train(tmp_path, "data=synthetic", "compression=none", "+callbacks.odd._target_=collections.OrderedDict")


def test_default_epoch_criterion_through_lmd_train(tmp_path: Path) -> None:
    """The default trigger is the epoch-mean criterion; loosened for a smoke run, it fires before the forced epoch."""
    tiny = [o for o in TINY if o != "trigger=epoch"]
    overrides = (*tiny, "data=synthetic", "logger=none", "trigger.min_steps=4", "trigger.rel_tol=0.99")
    extra = ("callback.every_n_steps=1", "trainer.max_epochs=6", "callback.max_epochs=5")
    cfg = compose_config(overrides=(*overrides, *extra), output_dir=tmp_path)
    assert cfg.trigger.criterion == "epoch" and cfg.trigger.rel_tol == 0.99
    results = train(cfg)
    assert results["compressed_epochs"][0] < 5 and "epoch-mean ‖g‖" in results["reports"][0]["trigger"]


def test_grad_norm_trigger_through_lmd_train(tmp_path: Path) -> None:
    """The step criterion, with a monitor quick enough for a smoke run: it fires before the forced epoch."""
    tiny = [o for o in TINY if o != "trigger=epoch"]
    cfg = compose_config(
        overrides=(
            *tiny,
            "data=synthetic",
            "logger=none",
            "trigger.criterion=step",
            "trigger.min_steps=4",
            "trigger.window=2",
            "trigger.patience=1",
            "trigger.plateau_tol=0.9",
            "callback.every_n_steps=1",
            "trainer.max_epochs=4",
            "callback.max_epochs=3",
        ),
        output_dir=tmp_path,
    )
    assert cfg.trigger._target_ == "lmd_lightning.ConvergenceMonitor"
    results = train(cfg)
    assert results["compressed_epochs"][0] < 3 and "‖∇L‖ EMA" in results["reports"][0]["trigger"]


def test_stable_rank_trigger_through_lmd_train(tmp_path: Path) -> None:
    """The Cuttlefish switch from the command line: trigger=stable_rank with its scaled-stable-rank policy."""
    tiny = [o for o in TINY if o != "trigger=epoch"]
    cfg = compose_config(
        overrides=(
            *tiny,
            "data=synthetic",
            "logger=none",
            "trigger=stable_rank",
            "compression=stable_rank",
            "trigger.tol=0.9",
            "trigger.patience=1",
            "trainer.max_epochs=4",
            "callback.max_epochs=3",
        ),
        output_dir=tmp_path,
    )
    results = train(cfg)
    # the first measurement starts epoch 1, the first change (< 90%) epoch 2
    assert results["compressed_epochs"] == [2] and "stable ranks changed" in results["reports"][0]["trigger"]
    assert "scales={'net." in results["reports"][0]["policy"]


def test_finetune_a_checkpoint_and_compress_it_further(tmp_path: Path) -> None:
    first = run_train(tmp_path / "train", "data=synthetic", "logger=none", "compression=fixed", "compression.rank=32")
    checkpoint = torch.load(first["checkpoint"], weights_only=True)
    assert checkpoint[CONFIG_KEY]["model"]["_target_"].endswith("MLPClassifier")  # what lmd-finetune rebuilds
    cfg = compose_config(
        "finetune",
        (
            f"ckpt_path={first['checkpoint']}",
            "compression=fixed",
            "compression.rank=8",
            "logger=none",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=2",
            "+trainer.limit_val_batches=1",
            "test=false",
            "trainer.enable_progress_bar=false",
            "+model.optimizer.lr=0.0001",
        ),
        output_dir=tmp_path / "finetune",
    )
    second = finetune(cfg)
    assert second["params_before"] == first["params"]  # it started from the compressed model
    assert set(second["ranks"].values()) == {8} and second["params"] < first["params"]
    recorded = torch.load(second["checkpoint"], weights_only=True)[CONFIG_KEY]["model"]
    assert recorded["optimizer"]["lr"] == 0.0001 and recorded["widths"] == [512, 512, 512]  # merged, not replaced
    plain = compose_config(
        "finetune",
        (
            f"ckpt_path={second['checkpoint']}",
            "logger=none",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=2",
            "test=false",
        ),
        output_dir=tmp_path / "again",
    )
    third = finetune(plain)
    assert third["params"] == third["params_before"] == second["params"] and "ranks" not in third


@pytest.mark.parametrize("compression", ["fixed", "none"])
def test_resume_a_compressed_run(compression: str, tmp_path: Path) -> None:
    """lmd-train ckpt_path=… picks a compressed run up where it stopped, with or without the callback."""
    first = run_train(tmp_path / "a", "data=synthetic", "logger=none", "compression=fixed", "compression.rank=8")
    resumed = run_train(
        tmp_path / "b",
        "data=synthetic",
        "logger=none",
        f"compression={compression}",
        "compression.rank=8" if compression == "fixed" else "test=true",
        f"ckpt_path={first['checkpoint']}",
        "trainer.max_epochs=3",
    )
    assert resumed["params"] == first["params"]  # the factored structure came back before the weights
    state = torch.load(resumed["checkpoint"], weights_only=True)
    assert state["epoch"] == 2 and state["state_dict"]["net.fc1.U"].shape[1] == 8
    cnn = compose_config(
        overrides=(*TINY, "data=synthetic", "model=cnn1d", f"ckpt_path={first['checkpoint']}"),
        output_dir=tmp_path / "c",
    )
    with pytest.raises(ConfigError, match="`ckpt_path` holds a lmd_lightning.models.MLPClassifier, but the config"):
        train(cnn)


def test_finetune_needs_a_model_for_foreign_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, path)
    cfg = compose_config("finetune", (f"ckpt_path={path}",), output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"not written by lmd-train.*\+model=NAME"):
        finetune(cfg)
    missing = compose_config("finetune", (f"ckpt_path={tmp_path / 'nope.ckpt'}",), output_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="`ckpt_path` must name a checkpoint file"):
        finetune(missing)


def command(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / name), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_console_scripts_help_and_cfg(tmp_path: Path) -> None:
    shown = command("lmd-train", "--help", cwd=tmp_path)
    assert shown.returncode == 0 and "recipe: cifar10_resnet" in shown.stdout and "compression:" in shown.stdout
    job = command("lmd-train", "--cfg", "job", "recipe=mnist1d_cnn", "compression.params=0.3", cwd=tmp_path)
    assert job.returncode == 0 and "CNN1DClassifier" in job.stdout and "params: 0.3" in job.stdout
    expected = {  # each command's own summary line and the keys it requires
        "lmd-finetune": ("lmd-finetune ckpt_path=PATH: rebuild a checkpoint's factored model", "ckpt_path: ???"),
        "lmd-export": ("lmd-export ckpt_path=PATH format=torchscript|onnx|state_dict|exported_program", "format: "),
        "lmd-analyze": ("lmd-analyze", "ckpt_path: ???"),
    }
    for name, lines in expected.items():
        shown = command(name, "--help", cwd=tmp_path)
        assert shown.returncode == 0 and all(line in shown.stdout for line in lines), (name, shown.stdout[:500])
    assert "usage: lmd-report" in command("lmd-report", "--help", cwd=tmp_path).stdout


def test_console_script_errors_are_clear(tmp_path: Path) -> None:
    unknown = command("lmd-train", "recipe=nope", cwd=tmp_path)
    assert unknown.returncode != 0 and "recipe" in unknown.stderr and "mnist1d_mlp" in unknown.stderr
    negative = command("lmd-train", "recipe=mnist1d_mlp", "compression.energy=-0.5", "data=synthetic", cwd=tmp_path)
    assert negative.returncode == 2 and negative.stderr.strip().splitlines()[-1] == (
        "lmd-train: error: `compression`: `energy` must be a float in (0, 1), got -0.5"
    )
    no_ckpt = command("lmd-finetune", cwd=tmp_path)
    assert no_ckpt.returncode == 2 and no_ckpt.stderr.strip().endswith(
        "lmd-finetune: error: `ckpt_path` is required: e.g. ckpt_path=outputs/train/<date_time>/checkpoints/last.ckpt"
    )
    ddp_sweep = command("lmd-train", "-m", "trainer=ddp", "seed=0,1", "data=synthetic", cwd=tmp_path)
    assert ddp_sweep.returncode == 2 and "`trainer.strategy`='ddp' cannot run inside a multirun" in ddp_sweep.stderr


@pytest.mark.slow
def test_multirun_then_report(tmp_path: Path) -> None:
    sweep = command(
        "lmd-train",
        "-m",
        "recipe=mnist1d_mlp",
        "compression.energy=0.5,0.95",
        "data=synthetic",
        "logger=none",
        *TINY,
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob(f"*/{RESULTS_FILE}"))]
    assert len(results) == 2 and results[0]["params"] < results[1]["params"]  # job 0: energy 0.5 keeps less
    shown = command("lmd-report", "sweep", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    table = (tmp_path / "sweep" / "report.md").read_text()
    assert "compression.energy=0.5" in table and "compression.energy=0.95" in table
    assert (tmp_path / "sweep" / "tradeoff.png").stat().st_size > 1000


def test_trained_model_layers_are_factored(tmp_path: Path) -> None:
    results = run_train(tmp_path, "data=synthetic", "logger=none", "compression=fixed", "compression.rank=4")
    checkpoint = torch.load(results["checkpoint"], weights_only=True)
    factored = {k.rsplit(".", 1)[0]: v.shape[1] for k, v in checkpoint["state_dict"].items() if k.endswith(".U")}
    assert factored == results["ranks"] == {"net.fc1": 4, "net.fc2": 4, "net.fc3": 4}


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("trained")
    results = train(
        compose_config(
            overrides=(*TINY, "data=synthetic", "logger=none", "compression=fixed", "compression.rank=8"),
            output_dir=root,
        )
    )
    return results["checkpoint"]


@pytest.mark.parametrize("format", ["torchscript", "exported_program", "state_dict", "onnx"])
def test_export_formats_stay_factored_and_match(format: str, trained_checkpoint: str, tmp_path: Path) -> None:
    if format == "onnx":
        pytest.importorskip("onnxruntime")
    output = (
        tmp_path
        / {"torchscript": "m.ts.pt", "exported_program": "m.pt2", "state_dict": "m.pt", "onnx": "m.onnx"}[format]
    )
    cfg = compose_config(
        "export", (f"ckpt_path={trained_checkpoint}", f"format={format}", f"output={output}"), output_dir=tmp_path
    )
    result = export(cfg)
    assert result.verified and result.path == output and output.is_file() and result.factored_layers == 3
    model, model_cfg, _ = load_model(cfg)
    assert result.params == sum(p.numel() for p in model.parameters())
    # An independent reload of the file (not export's own check), on a batch size the export never saw.
    x = torch.randn(5, 40)
    fresh = lambda: instantiate(model_cfg, optimizer=None, scheduler=None, _convert_="all")  # noqa: E731
    with torch.no_grad():
        out, stored = reload(format, output, x, fresh)
        torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
    assert stored == result.params


def test_export_command_and_bad_format(trained_checkpoint: str, tmp_path: Path) -> None:
    done = command(
        "lmd-export",
        f"ckpt_path={trained_checkpoint}",
        "format=exported_program",
        f"output={tmp_path / 'm.pt2'}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "m.pt2").is_file() and "verified" in done.stdout
    cfg = compose_config("export", (f"ckpt_path={trained_checkpoint}", "format=tflite"), output_dir=tmp_path)
    with pytest.raises(ConfigError, match="`format` must be one of .*'torchscript'.*got 'tflite'"):
        export(cfg)
    wrong = compose_config(
        "export",
        (f"ckpt_path={trained_checkpoint}", "format=exported_program", f"output={tmp_path / 'm.pt'}"),
        output_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="`output` must end in .pt2"):
        export(wrong)


def test_export_verifies_on_the_example_input(trained_checkpoint: str, tmp_path: Path) -> None:
    cfg = compose_config(
        "export",
        (f"ckpt_path={trained_checkpoint}", "format=state_dict", "verify_on=example", f"output={tmp_path / 'm.pt'}"),
        output_dir=tmp_path,
    )
    result = export(cfg)
    assert result.verified and result.max_abs_diff == 0.0
    model, model_cfg, _ = load_model(cfg)
    x = torch.randn(3, 40)
    fresh = lambda: instantiate(model_cfg, optimizer=None, scheduler=None, _convert_="all")  # noqa: E731
    with torch.no_grad():
        out, stored = reload("state_dict", tmp_path / "m.pt", x, fresh)
        torch.testing.assert_close(out, model(x), atol=0.0, rtol=0.0)  # the same tensors: bit for bit
    assert stored == result.params


@pytest.mark.ddp
def test_ddp_run_through_the_command(tmp_path: Path) -> None:
    """trainer=ddp: Lightning re-launches lmd-train for rank 1 into the same run dir; rank 0 writes the results."""
    done = command(
        "lmd-train",
        "recipe=mnist1d_mlp",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "data=synthetic",
        "logger=none",
        *TINY,
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.suffix == ".log") == [
        "train.log",
        "train_ddp_process_1.log",
    ]
    results = [json.loads(p.read_text()) for p in tmp_path.rglob(RESULTS_FILE)]
    assert len(results) == 1 and results[0]["compressed_epochs"] == [1] and results[0]["params"] < 551_434
