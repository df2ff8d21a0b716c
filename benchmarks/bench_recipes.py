"""The MNIST-1D recipes' expected results: knob sweeps chosen on validation, dense baselines, 3 seeds.

    python -m benchmarks.bench_recipes [--out DIR] [--aggregate-only]
    python -m benchmarks.bench_recipes --set auto     # the mnist1d_auto recipe (about 10 minutes)
    python -m benchmarks.bench_recipes --set curves   # one-shot sweeps on its data and schedule (about 25 minutes)
    python -m benchmarks.bench_recipes --set mlp1024  # the default recipe on the MLP-1024 (about 25 minutes)
    python -m benchmarks.bench_recipes --set digits   # digits_mlp on scikit-learn's real digits (about 10 minutes)

Runs `lmd-train -m …` for each study below (about 45 minutes on 2 CPU cores), then averages
over seeds with lmd-report's `over_seeds` and writes benchmarks/results/recipes_mnist1d.md.
The knob of each recipe's policy is chosen by the best mean *validation* accuracy; the test
column is reported once, for what was chosen and for the rest.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import RESULTS, write_result
from benchmarks.recipe_curves import curve_figure, knob, pct
from lmd_lightning.cli.tradeoff import collect, over_seeds

SEEDS = "seed=0,1,2"
COMMON = ("trainer.enable_progress_bar=false", "logger=none")
STUDIES = {  # folder: the multirun's overrides
    "mlp_energy": ("recipe=mnist1d_mlp", "compression.energy=0.5,0.6,0.7,0.8,0.9"),
    "cnn_budget": ("recipe=mnist1d_cnn", "compression.params=0.1,0.25,0.5"),
    "transformer": ("recipe=mnist1d_transformer",),
    "dense": ("recipe=mnist1d_mlp,mnist1d_cnn,mnist1d_transformer", "compression=none"),
}
RECIPES_READING = """

Reading (of the committed run, 2026-12-02, on an AMD EPYC 2-core VM; the earlier table came from an
Intel Xeon VM, whose kernels round differently, so compare within a machine). This run used the
default trigger, `ConvergenceMonitor(criterion="epoch")`. The same studies with
`trigger.criterion=step` on this machine: the MLP fired at epochs [25, 22, 22] against [25, 21, 21]
here; energy 0.5: 11.64×, val 68.6 ± 0.5, test 69.8 ± 1.8; 0.6: val 69.0 ± 1.3, test 70.8 ± 0.5; 0.7:
val 67.3 ± 1.8; 0.8: 67.7 ± 0.6; 0.9: 67.7 ± 0.9 (dense 66.6 at the swap); the CNN and the transformer
were forced at epoch 26 under both criteria, with identical numbers. So the switch moved the MLP's
trigger by at most one epoch and its accuracy within the spread. Chosen on validation: energy 0.5 and
0.6 tie at 68.5 here and the smaller model breaks the tie, hence mnist1d_mlp's `energy: 0.5` (the
step criterion would have picked 0.6 at 69.0); the five energies lie within 1.3 points, so the sweep
is flat within a seed's sampling error (±2.3 points on 400 samples). The CNN keeps params=0.5.
"""
DIGITS_STUDIES = {  # --set digits: scikit-learn's real 8×8 digits, the one-shot flow swept in two metrics
    "energy_weight": (
        "recipe=digits_mlp",
        "compression=energy",
        "compression.energy=0.5,0.6,0.7,0.8,0.9",
        "metric=weight",
    ),
    "budget_loss": ("recipe=digits_mlp", "compression=budget", "compression.params=0.1,0.25,0.5", "metric=loss"),
    "dense": ("recipe=digits_mlp", "compression=none"),
    "auto": (  # a ladder on these data: GlobalBudget(0.05) as the floor, loss metric (digits_mlp's), 1 point
        "recipe=digits_mlp",
        "compression=ladder",
        "metric=loss",
        "callback.rounds=auto",
        "callback.guard.max_drop=0.01",
    ),
    "auto_energy": (  # mnist1d_auto's ladder policy on these data: EnergyRank(0.4) as the floor, weight metric
        "recipe=digits_mlp",
        "compression=energy_floor",
        "metric=weight",
        "callback.rounds=auto",
        "callback.guard.max_drop=0.01",
    ),
}
DIGITS_READING = """

Reading (of the committed run, 2026-12-02, AMD EPYC 2-core VM). The ‖∇L‖ epoch-mean criterion fired
after epoch 6 in every run (compressed at 7 of 40): 1,079 training images are fitted within a few
epochs. Chosen on validation across both sweeps: GlobalBudget(params=0.25) in the loss metric, val
97.7 ± 0.4 against dense's 97.5 ± 0.3 at 3.92× fewer parameters, which the digits_mlp recipe uses;
params=0.1 was 0.1 points below it at 9.32× (test 97.8 ± 0.0 against dense's 98.1 ± 0.3). At
about the same size the weight metric's EnergyRank(0.5) (3.77×) lost 1.8 points of validation
accuracy (95.7 ± 0.4), and EnergyRank needed 0.8 (1.45×) to reach dense: here **the loss metric's
global allocation beats per-layer energy**, by 2 points at equal parameters. (EnergyRank and
GlobalBudget also differ in policy, not only in metric.) Re-run on 2026-12-03 with the ladder of
commit d707874 (a rung judged on the mean of its last three validations, bisection after a roll-back;
the one-shot rows did not change): the `auto` ladder (GlobalBudget(0.05) as the floor, loss metric,
max_drop 1 point) ended at 17.6×, 8.83× and 17.3× (14.58× mean), val 95.9 ± 0.6, test 96.8 ± 0.7;
`auto_energy`, mnist1d_auto's ladder policy (EnergyRank(0.4) as the floor, weight metric), at 3.24×,
3.35× and 8.75×, val 96.4 ± 0.3, test 96.6 ± 0.6. Both lie below one-shot GlobalBudget(0.1) (9.32× at
97.6 ± 0.4), and on these data the loss metric's ladder is the better of the two, the reverse of
MNIST-1D: the metric a recipe climbs in is a choice made on validation per data set, not a constant.
Why the ladders fall short here: the trigger fires at epoch 7 of 40, so the reference the rungs are
held to is the dense accuracy then (95.8 ± 0.6), 1.7 points below what dense reaches by epoch 40
(97.5); a rung within a point of that low bar passes, and the rungs cut at epochs 19–25 fine-tune for
less than half of what a one-shot cut at epoch 7 gets. Validation has 359 images: one image is 0.28
points.
"""
AUTO_STUDIES = {  # --set auto: the ladder against the dense model, same data and seeds (one-shot: --set curves)
    "auto": ("recipe=mnist1d_auto",),
    "auto_loss": ("recipe=mnist1d_auto", "compression=ladder", "metric=loss"),  # GlobalBudget(0.05), loss metric
    "dense": ("recipe=mnist1d_auto", "compression=none"),
}
AUTO_READING = """

Reading (of the committed run, 2026-12-03, AMD EPYC 2-core VM; commit d707874's ladder, which
bisects after a roll-back). The ladder kept what it promises: 6.58× fewer parameters on average
(6.92×, 5.86×, 6.97×) at val 84.1 ± 0.5 against dense's 84.6 ± 0.3 (test 84.2 ± 0.2 against
84.7 ± 0.2), within the one point it was allowed, in one run and with no knob chosen. In every seed
the second full step (about 8.2×) lost 1.6–1.9 points and was rolled back, and the bisecting rungs
found 5.9× and then 6.9×, which held in two seeds of three. The same ladder with GlobalBudget(0.05)
in the loss metric (the recipe's policy before) ended at 4.75× (4.36×, 3.65×, 6.24×) at val
84.0 ± 0.5: at equal validation accuracy the weight metric's per-layer energy went further, which is
why the recipe uses it (chosen on validation). Against one-shot (recipes_curves.md, the same data,
schedule and seeds): the ladder lies above the loss metric's GlobalBudget curve (3.92× at 84.1, 7.57×
at 82.9) and about 0.4 points below EnergyRank's (6.3× at 84.5, 9.6× at 83.1), whose best point needs
its knob swept over four runs. So auto is not on or above every curve here. Cost: the ladder's fit
took 40 ± 1 s against dense's 53 ± 2 s (0.76×), full validations of every rung included: the factored
phase from epoch 20–25 on is cheaper than the dense epochs it replaces. (Seed 2's auto run was re-run
alone, `lmd-train -m recipe=mnist1d_auto seed=2 … hydra.sweep.subdir=2`, because its first fit time,
113 s, shared the 2 cores with another job; its decisions and accuracies were the same.)
"""
ONE_SHOT = ("recipe=mnist1d_auto", "callback.rounds=1", "callback.guard.max_drop=null")
WIDE = ("recipe=mnist1d_auto", "model.widths=[1024,1024,1024]")
MLP1024_STUDIES = {  # --set mlp1024: the default recipe on the MLP-1024 (40-1024-1024-1024-10)
    "auto": WIDE,
    "dense": (*WIDE, "compression=none"),
    "one_shot": (*ONE_SHOT, "model.widths=[1024,1024,1024]", "compression=energy", "compression.energy=0.7"),
}
MLP1024_INTRO = (
    "Accuracies in %, mean ± std over seeds 0, 1, 2, on `mnist1d_large`. The mnist1d_auto recipe "
    "(AdamW 1e-3, weight decay 0, cosine over 60 epochs, the ‖∇L‖ trigger forced at 26, rounds=auto down "
    "to EnergyRank(0.4) in the weight metric, max_drop 0.01) with `model.widths=[1024,1024,1024]`: 2.2M "
    "parameters. `one_shot` cuts once at the trigger with EnergyRank(0.7), the best one-shot setting on "
    "the 512-wide MLP (recipes_curves.md). Fit time is `trainer.fit`'s wall time on this machine.\n\n"
)
MLP1024_READING = """

Reading (of the committed run, 2026-12-03, AMD EPYC 2-core VM). **The issue's goal, ≥ 12× at ≥ dense
validation accuracy, is not met.** The ladder ended at 7.22×, 9.22× and 11.31× (9.25× mean) at val
86.6 ± 0.5 against dense's 87.2 ± 0.2 (test 87.2 ± 0.5 against 87.4 ± 0.1), inside the one point it
allows but below dense. The rung at about 11× was within a point in one seed of three (kept at 85.7
against 86.5) and 1.2 points below in the other two; the next full step (about 20×) fell to 74%,
and its bisection (15.6×) to 77%: this MLP has a cliff between 11× and 16×. One-shot EnergyRank(0.7)
reached 7.86× at 87.6 ± 0.6, above dense and above the ladder. Cost: the ladder's fit took 93 ± 10 s
against dense's 155 ± 11 s (0.60×), one-shot's 96 ± 15 s.
"""
CURVE_READING = """

Reading (of the committed run, 2026-12-03, AMD EPYC 2-core VM). In this setting the weight metric's
per-layer EnergyRank is the better one-shot policy from 3.6× to 9.6×: 0.7 reached 6.3× at val
84.5 ± 0.4, against the loss metric's GlobalBudget at 3.92× and 84.1 ± 0.3 or 7.57× and 82.9 ± 0.4; at
about 14× the order reverses (GlobalBudget 0.06: 79.3, EnergyRank 0.5 at 13.3×: 76.4). EnergyRank(0.8)
ended 0.8 points above dense (85.4 ± 0.1 against 84.6 ± 0.3) at 3.6×. The knob a user would pick from
these curves on validation, the smallest model within one point of dense, is EnergyRank(0.7); the
ladder (recipes_auto.md) reached 6.58× at 84.1 ± 0.5 without the sweep, about 0.4 points below
EnergyRank's curve and above GlobalBudget's.
"""
CURVE_STUDIES = {  # --set curves: one-shot policies swept over their knob on mnist1d_auto's data and schedule
    "energy_weight": (*ONE_SHOT, "compression=energy", "compression.energy=0.5,0.6,0.7,0.8", "metric=weight"),
    "budget_loss": (*ONE_SHOT, "compression=budget", "compression.params=0.5,0.25,0.125,0.06", "metric=loss"),
}
COLUMNS = ("params", "compression_ratio", "monitor_before", "monitor_after_truncation", "val_acc", "test_acc")


def run(out: Path, studies: dict[str, tuple[str, ...]]) -> None:
    lmd_train = str(Path(sys.executable).parent / "lmd-train")
    for folder, overrides in studies.items():
        target = out / folder
        shutil.rmtree(target, ignore_errors=True)
        command = [lmd_train, "-m", *overrides, SEEDS, *COMMON, f"hydra.sweep.dir={target}"]
        subprocess.run(command, check=True)


def table(out: Path, studies: dict[str, tuple[str, ...]] = STUDIES) -> str:
    lines = [
        "| study | run | seeds | params | ratio | val acc at the swap (dense) | right after truncation "
        "| val acc, final | test acc, final | compressed at epoch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for folder in studies:
        rows, _ = collect(out / folder)
        for row in over_seeds(rows):
            lines.append(
                f"| {folder} | {row['run']} | {row['seeds']} | {row['params']:,} | {row['compression_ratio']:.2f}× "
                f"| {pct(row, 'monitor_before')} | {pct(row, 'monitor_after_truncation')} "
                f"| {pct(row, 'val_acc')} | {pct(row, 'test_acc')} | {row['compressed_epochs'] or '—'} |"
            )
    return "\n".join(lines)


def auto_table(out: Path, studies: dict[str, tuple[str, ...]] | None = None) -> str:
    lines = [
        "| study | seeds | params | ratio | dense reference (val) | val acc, final | test acc, final "
        "| fit time, s | rungs kept / tried | ladder from epoch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for folder in studies or AUTO_STUDIES:
        rows, _ = collect(out / folder)
        ladders = [row.get("ladder") or [] for row in rows]
        kept = ", ".join(f"{sum(r['decision'] == 'kept' for r in ladder)}/{len(ladder)}" for ladder in ladders)
        for row in over_seeds(rows):
            spread = f" ± {row['fit_seconds_std']:.0f}" if "fit_seconds_std" in row else ""
            lines.append(
                f"| {folder} | {row['seeds']} | {row['params']:,} | {row['compression_ratio']:.2f}× "
                f"| {pct(row, 'monitor_before')} | {pct(row, 'val_acc')} | {pct(row, 'test_acc')} "
                f"| {row['fit_seconds']:.0f}{spread} | {kept if folder.startswith('auto') else '—'} "
                f"| {row['compressed_epochs'] or '—'} |"
            )
    return "\n".join(lines)


def curve_table(out: Path) -> str:
    lines = [
        "| study | run | seeds | params | ratio | val acc, final | test acc, final |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for folder in CURVE_STUDIES:
        rows, _ = collect(out / folder)
        for row in over_seeds(rows):
            lines.append(
                f"| {folder} | {knob(row)} | {row['seeds']} | {row['params']:,} | {row['compression_ratio']:.2f}× "
                f"| {pct(row, 'val_acc')} | {pct(row, 'test_acc')} |"
            )
    return "\n".join(lines)


MNIST1D_INTRO = (
    "Accuracies in %, mean ± std over seeds 0, 1, 2. MNIST-1D: 3,600 train / 400 val / 1,000 test. 'At "
    "the swap' is the dense model's validation accuracy right before truncation; 'right after' is the "
    "truncated model before any fine-tuning. `compressed at epoch` lists each seed's swap epoch "
    "(0-based); the forced epoch is 26 of 40, so an earlier epoch means the ‖∇L‖ monitor fired.\n\n"
)
AUTO_INTRO = (
    "Accuracies in %, mean ± std over seeds 0, 1, 2, on `mnist1d_large` (12,800 train / 3,200 val / 4,000 "
    "test). `auto` is the mnist1d_auto recipe, lmd-train's default: the 3×512 MLP with AdamW (weight decay 0) "
    "and a cosine schedule over 60 epochs, the ‖∇L‖ trigger (forced at epoch 26), then rounds=auto with "
    "EnergyRank(0.4) as the floor in the weight metric and max_drop 0.01. `auto_loss` is the same ladder with "
    "GlobalBudget(params=0.05) in the loss metric; `dense` trains the same MLP for all 60 epochs. The dense "
    "reference is what each ladder's rungs were held to. The ratio is the mean of the seeds' ratios. Fit time "
    "is `trainer.fit`'s wall time on this machine (training, compression, validation). `ladder from epoch` "
    "lists each seed's rung epochs.\n\n"
)
CURVE_INTRO = (
    "Accuracies in %, mean ± std over seeds 0, 1, 2, on `mnist1d_large`, with the mnist1d_auto recipe's model, "
    "optimizer and schedule (AdamW, cosine over 60 epochs, the ‖∇L‖ trigger forced at epoch 26; it fired, "
    "compressing at epochs 20–25), each run truncated once and fine-tuned to the end; the knob is in the run "
    "column. With the `--set auto` runs (the ladder and dense) these are the curves of README's Recipes section.\n\n"
)
DIGITS_INTRO = (
    "Accuracies in %, mean ± std over seeds 0, 1, 2 (the model's initialisation; the data split and "
    "shuffle are fixed). scikit-learn's digits: 1,797 real 8×8 images, stratified 1,079 train / 359 val / "
    "359 test. The digits_mlp recipe (3×512 MLP, Adam 1e-3, 40 epochs, the default ‖∇L‖ trigger, forced "
    "at 26), EnergyRank swept in the weight metric and GlobalBudget in the loss metric.\n\n"
)


def _curves_body(out: Path, auto: Path) -> str:
    body = CURVE_INTRO + curve_table(out) + CURVE_READING
    if not auto.is_dir():
        return body + f"\n(No figure: the `--set auto` runs were not found in {auto}; pass --auto-out.)\n"
    figure = RESULTS / "figures" / "mnist1d_auto_curves.png"
    series = {folder: collect(out / folder)[0] for folder in CURVE_STUDIES}
    series.update({folder: collect(auto / folder)[0] for folder in AUTO_STUDIES})
    latency = curve_figure(series, figure, "mnist1d_auto: one-shot curves, the ladders and dense")
    return (
        f"{body}\n![validation accuracy against parameters and CPU latency](figures/{figure.name})\n\n"
        "CPU latency of each setting's models (the mean over seeds of the median ms per forward of a batch "
        f"of 256, measured on their checkpoints by the aggregation), with the ladders and dense of {auto.name}:\n\n"
        f"{latency}\n"
    )


def _sets(auto: Path) -> dict[str, tuple[dict[str, tuple[str, ...]], str, str, Callable[[Path], str]]]:
    """--set name → (its studies, result file, title, the body from the runs' folder)."""
    return {
        "mnist1d": (
            STUDIES,
            "recipes_mnist1d",
            "MNIST-1D recipes: sweeps, chosen settings, dense baselines",
            lambda out: MNIST1D_INTRO + table(out) + RECIPES_READING,
        ),
        "auto": (
            AUTO_STUDIES,
            "recipes_auto",
            "The mnist1d_auto recipe: the validated ladder against one-shot and dense",
            lambda out: AUTO_INTRO + auto_table(out) + AUTO_READING,
        ),
        "curves": (
            CURVE_STUDIES,
            "recipes_curves",
            "One-shot policies across their knob (mnist1d_auto data)",
            lambda out: _curves_body(out, auto),
        ),
        "mlp1024": (
            MLP1024_STUDIES,
            "recipes_mlp1024",
            "The default recipe on the MLP-1024",
            lambda out: MLP1024_INTRO + auto_table(out, MLP1024_STUDIES) + MLP1024_READING,
        ),
        "digits": (
            DIGITS_STUDIES,
            "recipes_digits",
            "scikit-learn digits: the one-shot flow on a second real data set",
            lambda out: DIGITS_INTRO + table(out, DIGITS_STUDIES) + DIGITS_READING,
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="where the runs go (default: outputs/bench_recipes[_SET])"
    )
    parser.add_argument("--aggregate-only", action="store_true", help="only re-read runs already in --out")
    parser.add_argument(
        "--set", choices=("mnist1d", "auto", "curves", "mlp1024", "digits"), default="mnist1d", help="which studies"
    )
    parser.add_argument(
        "--auto-out",
        type=Path,
        default=Path("outputs/bench_recipes_auto"),
        help="--set curves: the --set auto runs to draw with the curves",
    )
    args = parser.parse_args(argv)
    studies, name, title, body = _sets(args.auto_out)[args.set]
    out = args.out or Path("outputs/bench_recipes" + ("" if args.set == "mnist1d" else f"_{args.set}"))
    if not args.aggregate_only:
        run(out, studies)
    command = "python -m benchmarks.bench_recipes" + ("" if args.set == "mnist1d" else f" --set {args.set}")
    print(write_result(name, title, body(out), command).read_text())


if __name__ == "__main__":
    main()
