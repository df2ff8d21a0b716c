"""The MNIST-1D recipes' expected results: knob sweeps chosen on validation, dense baselines, 3 seeds.

    python -m benchmarks.bench_recipes [--out DIR] [--aggregate-only]
    python -m benchmarks.bench_recipes --set auto     # the mnist1d_auto recipe (about 10 minutes)
    python -m benchmarks.bench_recipes --set curves   # one-shot sweeps on its data and schedule (about 25 minutes)
    python -m benchmarks.bench_recipes --set mlp1024  # the default recipe on the MLP-1024 (about 25 minutes)
    python -m benchmarks.bench_recipes --set switch   # the same cuts made early (about 30 minutes)
    python -m benchmarks.bench_recipes --set digits   # digits_mlp on scikit-learn's real digits (about 10 minutes)
    python -m benchmarks.bench_recipes --set cnn      # every contender on mnist1d_cnn (about 35 minutes)
    python -m benchmarks.bench_recipes --set transformer  # every contender on mnist1d_transformer (about 60 minutes)

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
DIGITS_READING = """

Reading (of the committed run, 2026-12-04, AMD EPYC 2-core VM; 359 validation digits, so one digit is
0.28 points and one seed's sampling error about ±0.9). The ‖∇L‖ trigger fires at epoch 7 of 40, when the
dense model is at val 95.8 ± 0.6, 1.6 points below its final 97.4 ± 0.3. **Two contenders beat the
ladder here.** The loss-metric ladder (`auto`) ends at 6.79× (8.95×, 2.52×, 8.91×) at val 97.2 ± 0.0,
test 97.4 ± 0.6 (dense 98.1 ± 0.3): seeds 0 and 2 kept the 2.1×, 4.4× and 8.9× rungs and rolled back
17.4× (94.4 and 95.0 against bars of 97.0 and 97.2); seed 1 rolled back 4.4× (94.4 against 97.1) and the
bisected 3.0× (95.7), and kept 2.5×. Seed 1's rungs did not lose their accuracy in the cut (re-run with
a CSV logger): the 4.4× rung validated 96.7 and 97.2 in its first two epochs; from its fourth its
training loss, down to 2·10⁻⁴, rose a hundredfold and validation fell to 93.3 by its sixth; the 3.0×
rung validated 97.2 in its first epoch and ended at 95.0 as its training loss rose to 2·10⁻². That is
Adam at a constant rate near zero training loss (the dense run of the seed shows no such rise), and
the ladder judged the rungs' end states as it should.
One-shot `GlobalBudget(0.1)` in the loss metric, cut once at the
trigger, holds 9.34× at val 97.4 ± 0.2 (test 97.9 ± 0.2), and Pufferfish's recipe (`RankRatio(0.03)`
at epoch 11, first layer dense) 8.04× at 97.4 ± 0.2 (test 98.0 ± 0.4): both are smaller than the
ladder's mean and at least as accurate (97.4 against 97.2, within noise); the ladder's two good seeds
(8.95×, 8.91×) come near them, its third (2.52×) does not. The ladder is above the
others: uniform rank (7.53× at 95.9 ± 0.4), Cuttlefish (8.82× at 95.0 ± 0.7; 4.70× at 96.1), the
weight metric's EnergyRank (3.77× at 95.7) and mnist1d_auto's EnergyRank floor as a ladder
(`auto_energy`, 3.32× at 96.8 ± 0.6). ModelPruning holds 97.4 at 3.97× and 96.8 at 7.85× and 15.98× in
nonzero weights, but its masked models run at dense speed (the latency table below), where factored
models of the ladder's size or smaller take under half of dense's time. Digits are easy for a small
model: a dense 3×90 MLP (24.4× fewer parameters than the 3×512) reaches 96.7 ± 0.3, within a point.
The same commands moved from the previous run (ladder 6.06× at 97.5 ± 0.3, dense 97.5 ± 0.3,
GlobalBudget(0.1) 9.32× at 97.6): the ladder's keep-or-roll-back decisions fall within a point of
sampling noise, so its size varies by seed (2.5× to 9.0×) where one-shot's does not. Cost: the
ladder's fits took 10–13 s, dense's 7–8 s (and 21 s for the run's first fit).
"""


def contender_studies(recipe: str, first_layer: str, pufferfish_epoch: int, prune_epoch: int, small: str) -> dict:
    """The ladders, dense and every contender of --set curves for `recipe`, each one-shot cut fine-tuned to the end.

    `first_layer` stays dense under Pufferfish (as in its hybrid networks), which switches at
    `pufferfish_epoch` (80/300 of the epochs); ModelPruning prunes at the end of `prune_epoch`, where the
    recipe's trigger cuts; `small` is the override sweep of the narrower dense models trained from scratch.
    """
    one_shot = (f"recipe={recipe}", "callback.rounds=1", "callback.guard.max_drop=null")
    ladder = (f"recipe={recipe}", "callback.rounds=auto", "callback.guard.max_drop=0.01")
    return {
        "dense": (f"recipe={recipe}", "compression=none"),
        "auto": (*ladder, "compression=ladder", "metric=loss"),  # GlobalBudget(0.05) as the floor, loss metric
        "auto_energy": (*ladder, "compression=energy_floor", "metric=weight"),  # mnist1d_auto's: EnergyRank(0.4)
        "energy_weight": (*one_shot, "compression=energy", "compression.energy=0.5,0.7,0.8,0.9", "metric=weight"),
        "budget_loss": (*one_shot, "compression=budget", "compression.params=0.5,0.25,0.125,0.06", "metric=loss"),
        "uniform_weight": (*one_shot, "compression=uniform", "compression.params=0.5,0.25,0.125,0.06", "metric=weight"),
        "pufferfish": (
            *one_shot,
            "trigger=epoch",
            f"callback.min_epochs={pufferfish_epoch}",
            "compression=ratio",
            "compression.ratio=0.25,0.125,0.06,0.03",
            f'callback.exclude=[{first_layer},"*head"]',
            "metric=weight",
        ),
        "cuttlefish": (
            *one_shot,
            "trigger=stable_rank",
            "compression=stable_rank",
            "compression.multiplier=1.0,0.5,0.25,0.125",
            "metric=weight",
        ),
        "pruning": (
            f"recipe={recipe}",
            "compression=none",
            "+callbacks=pruning",
            "callbacks.pruning.amount=0.5,0.75,0.875,0.94",
            f"callbacks.pruning.apply_pruning._args_=[{prune_epoch}]",
        ),
        "small_dense": (f"recipe={recipe}", "compression=none", small),
    }


DIGITS_STUDIES = {  # --set digits: scikit-learn's real 8×8 digits, the ladders, one-shot sweeps and every contender
    # the contenders of --set curves on these data; the trigger fires at epoch 7 of 40 here, so ModelPruning prunes
    # at the end of epoch 7
    **contender_studies(
        "digits_mlp", "net.fc1", 11, 7, "model.widths=[256,256,256],[180,180,180],[128,128,128],[90,90,90]"
    ),
    # the first sweeps on these data, under digits_mlp's own guard and rounds
    "energy_weight": (
        "recipe=digits_mlp",
        "compression=energy",
        "compression.energy=0.5,0.6,0.7,0.8,0.9",
        "metric=weight",
    ),
    "budget_loss": ("recipe=digits_mlp", "compression=budget", "compression.params=0.1,0.25,0.5", "metric=loss"),
}


# --set cnn: the MNIST-1D CNN recipe (40 epochs, forced cut at 26)
CNN_STUDIES = contender_studies(
    "mnist1d_cnn", "net.conv1", 11, 25, "model.channels=[22,22,22],[16,16,16],[11,11,11],[8,8,8]"
)
# --set transformer: the MNIST-1D transformer recipe (40 epochs; the same trigger, forced at 26)
TRANSFORMER_STUDIES = contender_studies("mnist1d_transformer", "net.embed", 11, 25, "model.dim=44,32,24,16")


AUTO_STUDIES = {  # --set auto: the ladder against the dense model, same data and seeds (one-shot: --set curves)
    "auto": ("recipe=mnist1d_auto",),
    "auto_loss": ("recipe=mnist1d_auto", "compression=ladder", "metric=loss"),  # GlobalBudget(0.05), loss metric
    "dense": ("recipe=mnist1d_auto", "compression=none"),
}
AUTO_READING = """

Reading (of the committed run, 2026-12-03, AMD EPYC 2-core VM; the ladder holds each rung to the best
value validated so far, the dense reference or a kept rung's, `Ladder.bar`). The ladder ended at 5.90×
(5.89×, 5.86×, 5.93×) at val 84.8 ± 0.3 against dense's 84.6 ± 0.3 (test 84.5 ± 0.3 against
84.7 ± 0.2), in one run with no knob chosen. In every seed the 8.1× step lost 1.6–2.8 points and was
rolled back, the bisected 5.9× rung held and then raised the bar (84.4–84.8), and the 6.9× rung fell
a point or more below that raised bar and was rolled back (with the bar fixed at the dense reference,
the previous rule, it was kept: 6.58× at val 84.1 ± 0.5). Against one-shot (recipes_curves.md, the same
data, schedule and seeds): EnergyRank's curve passes through 3.6× at 85.4 and 6.3× at 84.5, about 84.6
at 5.9×, so the ladder's point lies on that curve (0.2 above, within the spread) and above the loss
metric's GlobalBudget curve (3.92× at 84.1). The same ladder with GlobalBudget(0.05) in the loss metric
ended at 4.75× at val 84.0 ± 0.5. Cost: the ladder's fit took 44 ± 5 s against dense's 53 ± 2 s (0.83×),
full validations of every rung included. (The dense runs are those of the previous commit's
measurement, whose code path did not change.)
"""
ONE_SHOT = ("recipe=mnist1d_auto", "callback.rounds=1", "callback.guard.max_drop=null")
WIDE = ("recipe=mnist1d_auto", "model.widths=[1024,1024,1024]")
PUFFERFISH = (*ONE_SHOT, "trigger=epoch", "callback.min_epochs=16", "compression=ratio")
MLP1024_STUDIES = {  # --set mlp1024: the default recipe on the MLP-1024 (40-1024-1024-1024-10)
    "auto": WIDE,
    "dense": (*WIDE, "compression=none"),
    "one_shot": (*ONE_SHOT, "model.widths=[1024,1024,1024]", "compression=energy", "compression.energy=0.7"),
    "one_shot_rank32": (*ONE_SHOT, "model.widths=[1024,1024,1024]", "compression=fixed", "compression.rank=32"),
}
MLP1024_INTRO = (
    "Accuracies in %, mean ± std over seeds 0, 1, 2, on `mnist1d_large`. The mnist1d_auto recipe "
    "(AdamW 1e-3, weight decay 0, cosine over 60 epochs, the ‖∇L‖ trigger forced at 26, rounds=auto down "
    "to EnergyRank(0.4) in the weight metric, max_drop 0.01) with `model.widths=[1024,1024,1024]`: 2.2M "
    "parameters. `one_shot` cuts once at the trigger with EnergyRank(0.7), the best one-shot setting on "
    "the 512-wide MLP (recipes_curves.md). Fit time is `trainer.fit`'s wall time on this machine.\n\n"
)
MLP1024_READING = """

Reading (of the committed run, 2026-12-03, AMD EPYC 2-core VM; the ladder holds each rung to the best
value validated so far). **The issue's goal, ≥ 12× at ≥ dense validation accuracy, is not met by the
ladder:** it ended at 8.67× (7.22×, 7.48×, 11.31×) at val 86.8 ± 0.5 against dense's 87.2 ± 0.2. The
full step to about 11× lost 1.5–2 points after its six epochs in two seeds and was rolled back. It is
met one-shot by hand: `FixedRank(32)` at the trigger (12.06×, the issue's hand switch) reached val
87.5 ± 0.3 / test 87.3 ± 0.6, above dense, where one-shot EnergyRank(0.6) at 14.0× reached only 86.2
(EnergyRank cuts the 40-input first layer to rank 18–23; uniform rank keeps it at 32). A ladder over
`UniformRank` did worse (4.2×): its first rung, 2.1× with every layer at once cut to the same rank, was
still recovering when judged and was rolled back in two seeds of three. One-shot EnergyRank(0.7): 7.86× at
87.6 ± 0.6. Cost: the ladder's fit took about 0.6× dense's. (dense, one_shot and one_shot_rank32 are runs
of the same commands from the previous measurement and from the UniformRank study.)
"""
CURVE_READING = """

Reading (of the committed run, 2026-12-03, AMD EPYC 2-core VM; every choice on validation, test once).
**The ladder's point (5.90× at val 84.8 ± 0.3) is on or above five of the seven contenders and below
two.**
- **Cuttlefish wins.** Its stable-rank switch fires at epochs 9–10, and its ranks at multiplier 1.0
  reached 5.40× at 85.8 ± 0.3, 1.0 point above the ladder at a similar size (10.0× at 83.9 ± 0.4 at
  0.5). recipes_switch.md shows that the switch time, not the ranks, is the difference: EnergyRank(0.7)
  made at epochs 9–10 reached 85.7 at 5.72×, and the ladder started at epoch 10 reached 7.76× at 84.9.
- **ModelPruning wins in nonzero weights, not in size or speed:** global L1 at epoch 21 kept 84.6 ± 0.7 at
  7.85× fewer nonzero weights and 83.1 at 16×, but its dense tensors run a batch as fast as dense's (within
  5% in the latency table below), where the ladder's model runs about 4× faster.
- Level with the ladder: EnergyRank's own curve (about 84.6 at 5.9×, interpolated; 0.7 at 6.30× reached
  84.5 ± 0.4).
- Below it: uniform rank (3.94× at 84.4, 7.69× at 83.9, about 84.1 at 5.9×), Pufferfish with its first
  layer dense (3.49× at 84.5, 6.08× at 84.0), the loss metric's GlobalBudget (3.92× at 84.1, 7.57× at
  82.9) and small dense MLPs trained from scratch (3.81× at 80.3, 7.42× at 78.5): factoring a trained
  wide model beats training a narrow one by 4–6 points at equal parameters.
- Pufferfish's share of full rank applied to every layer collapses (65.9 at 2.0×): it cuts the 40-input
  first layer to rank 10, which is why Pufferfish leaves its first layers dense.
- EnergyRank(0.8) ended 0.8 points above dense (85.4 ± 0.1 against 84.6 ± 0.3) at 3.6×.
"""
CURVE_STUDIES = {  # --set curves: one-shot policies swept over their knob on mnist1d_auto's data and schedule
    "energy_weight": (*ONE_SHOT, "compression=energy", "compression.energy=0.5,0.6,0.7,0.8", "metric=weight"),
    "budget_loss": (*ONE_SHOT, "compression=budget", "compression.params=0.5,0.25,0.125,0.06", "metric=loss"),
    "uniform_weight": (*ONE_SHOT, "compression=uniform", "compression.params=0.5,0.25,0.125,0.06", "metric=weight"),
    # Pufferfish (Wang et al., 2021): a fixed share of each layer's rank, switched at 80/300 of the epochs
    # (16 of 60), the first layer left dense as in its hybrid networks; ratio_all_layers cuts it too
    "pufferfish": (
        *PUFFERFISH,
        "compression.ratio=0.25,0.125,0.06,0.03",
        'callback.exclude=[net.fc1,"*head"]',
        "metric=weight",
    ),
    "ratio_all_layers": (*PUFFERFISH, "compression.ratio=0.25,0.125,0.06,0.03", "metric=weight"),
    # Cuttlefish (Wang et al., 2023): the switch when every layer's stable rank settles, ranks from it
    "cuttlefish": (
        *ONE_SHOT,
        "trigger=stable_rank",
        "compression=stable_rank",
        "compression.multiplier=1.0,0.5,0.25,0.125",
        "metric=weight",
    ),
    # Lightning's ModelPruning: global L1 of every weight (the head too) at the end of epoch 21, where the
    # trigger fires; counted by its nonzero weights, timed as the dense tensors it leaves
    "pruning": (
        "recipe=mnist1d_auto",
        "compression=none",
        "+callbacks=pruning",
        "callbacks.pruning.amount=0.5,0.75,0.875,0.94",
        "callbacks.pruning.apply_pruning._args_=[21]",
    ),
    # a dense MLP trained from scratch at about 3.8x, 7.4x, 13.9x and 26x fewer parameters than 3x512
    "small_dense": (
        "recipe=mnist1d_auto",
        "compression=none",
        "model.widths=[256,256,256],[180,180,180],[128,128,128],[90,90,90]",
    ),
}
SWITCH_STUDIES = {  # --set switch: the same cuts made early (epochs 8–10) instead of at the ‖∇L‖ trigger (20–25)
    "energy_early": (*ONE_SHOT, "trigger=stable_rank", "compression=energy", "compression.energy=0.7", "metric=weight"),
    "auto_epoch10": ("recipe=mnist1d_auto", "trigger=epoch", "callback.min_epochs=10"),
    "mlp1024_auto_epoch10": (*WIDE, "trigger=epoch", "callback.min_epochs=10"),
    "mlp1024_uniform_epoch10": (*WIDE, "trigger=epoch", "callback.min_epochs=10", "compression=uniform_floor"),
    "mlp1024_rank32_early": (
        *ONE_SHOT,
        "model.widths=[1024,1024,1024]",
        "trigger=stable_rank",
        "compression=fixed",
        "compression.rank=32",
        "metric=weight",
    ),
    "mlp1024_cuttlefish": (
        *ONE_SHOT,
        "model.widths=[1024,1024,1024]",
        "trigger=stable_rank",
        "compression=stable_rank",
        "compression.multiplier=1.0,0.5",
        "metric=weight",
    ),
}
SWITCH_INTRO = (
    "Accuracies in %, mean ± std over seeds 0, 1, 2, on `mnist1d_large`, the mnist1d_auto recipe (AdamW, "
    "cosine over 60 epochs; `mlp1024_*`: `model.widths=[1024,1024,1024]`). Each study moves the cut earlier "
    "than the recipe's ‖∇L‖ trigger, which fires at epochs 20–25, next to the dense validation plateau (val "
    "84.7 at epoch 21, 84.8 at 23 in seed 0): `energy_early` is one-shot EnergyRank(0.7) at Cuttlefish's "
    "stable-rank switch (epochs 9–10), `auto_epoch10` the default ladder started at epoch 10 "
    "(`trigger=epoch callback.min_epochs=10`), `mlp1024_cuttlefish` Cuttlefish's switch and ranks on the "
    "MLP-1024, `mlp1024_uniform_epoch10` the ladder over UniformRank(0.05) from epoch 10, `mlp1024_rank32_early` "
    "FixedRank(32) at Cuttlefish's switch. The same cuts at the trigger are in "
    "recipes_curves.md, recipes_auto.md and recipes_mlp1024.md.\n\n"
)
SWITCH_READING = """

Reading (of the committed run, 2026-12-03, AMD EPYC 2-core VM). **When the cut is made matters more
than how the ranks are allocated here.** The same EnergyRank(0.7) cut reached val 85.7 ± 0.3 at 5.72×
made at epochs 9–10, against 84.5 ± 0.4 at 6.30× made at the ‖∇L‖ trigger (recipes_curves.md); the
default ladder started at epoch 10 ended at 7.76× (7.83×, 7.61×, 7.83×) at val 84.9 ± 0.1 / test
85.2 ± 0.1, against 5.90× at 84.8 ± 0.3 from the trigger (recipes_auto.md): 1.3× smaller at the same
validation accuracy, on Cuttlefish's curve (5.40× at 85.8, 10.0× at 83.9) and pruning's (7.85× at
84.6). On the MLP-1024 Cuttlefish's early switch is the best point measured: multiplier 1.0, 9.37× at
val 88.8 ± 0.5 / test 88.9 ± 0.6, 1.6 points above dense (87.2 ± 0.2); 0.5, 17.6× at 84.2. The ladder
from epoch 10 reached 10.62× at val 86.8 ± 0.3, below dense and below Cuttlefish: its second cut, at
epoch 18, is the one it keeps, and one early cut trained for 50 epochs did better than two. The
ladder over UniformRank from epoch 10 (`compression=uniform_floor`), the only ladder to hold dense: 9.34× in
every seed (2.1×, 4.4×, 9.3× kept, 19.3× rolled back, no rung left to bisect) at val 87.2 ± 0.2 /
test 87.9 ± 0.3, level with dense, short of the goal's 12×. The
issue's hand switch, FixedRank(32), made at Cuttlefish's epochs 8–9, reached 12.06× at val 87.8 ± 0.4 /
test 88.0 ± 0.2 (87.5 ± 0.3 made at the trigger): ≥ 12× at ≥ dense validation accuracy, one-shot. The
recipe keeps the ‖∇L‖ trigger (the mission's criterion, and at the plateau here); what this says is
that a factored model trained from before the plateau generalises better than one cut after it.
"""
COLUMNS = ("params", "compression_ratio", "monitor_before", "monitor_after_truncation", "val_acc", "test_acc")


def run(out: Path, studies: dict[str, tuple[str, ...]]) -> None:
    lmd_train = str(Path(sys.executable).parent / "lmd-train")
    for folder, overrides in studies.items():
        target = out / folder
        shutil.rmtree(target, ignore_errors=True)
        command = [lmd_train, "-m", *overrides, SEEDS, *COMMON, f"hydra.sweep.dir={target}"]
        subprocess.run(command, check=True)


def table(out: Path, studies: dict[str, tuple[str, ...]] = STUDIES, widest: bool = False) -> str:
    """One row per setting over seeds; `widest`: sizes as in `curve_rows` (pruning's nonzero weights, ratios to
    the widest model)."""
    series = curve_rows(out, studies) if widest else {folder: collect(out / folder)[0] for folder in studies}
    lines = [
        "| study | run | seeds | params | ratio | val acc at the swap (dense) | right after truncation "
        "| val acc, final | test acc, final | compressed at epoch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for folder, rows in series.items():
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


def curve_rows(out: Path, studies: dict[str, tuple[str, ...]] = CURVE_STUDIES) -> dict[str, list[dict]]:
    """Each curve study's runs, with `params` what a model keeps (pruning: its nonzero weights) and the ratio
    taken against the widest model's parameters, so that a small dense MLP has its ratio to the 3×512."""
    series = {folder: collect(out / folder)[0] for folder in studies}
    reference = max(row["params_before"] for rows in series.values() for row in rows)
    for folder, rows in series.items():
        for row in rows:
            row["params"] = row["nonzero_params"] if folder == "pruning" else row["params"]
            row["compression_ratio"] = reference / row["params"]
    return series


def curve_table(out: Path) -> str:
    lines = [
        "| study | run | seeds | params | ratio | val acc, final | test acc, final |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for folder, rows in curve_rows(out).items():
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
    "reference is where each ladder's bar starts (a kept rung that beats it raises the bar). "
    "The ratio is the mean of the seeds' ratios. Fit time "
    "is `trainer.fit`'s wall time on this machine (training, compression, validation). `ladder from epoch` "
    "lists each seed's rung epochs.\n\n"
)
CURVE_INTRO = (
    "Accuracies in %, mean ± std over seeds 0, 1, 2, on `mnist1d_large`, with the mnist1d_auto recipe's model, "
    "optimizer and schedule (AdamW, cosine over 60 epochs, the ‖∇L‖ trigger forced at epoch 26; it fired, "
    "compressing at epochs 20–25), each run truncated once and fine-tuned to the end; the knob is in the run "
    "column. The contenders: `uniform_weight`, one rank for every layer; `pufferfish`, `RankRatio` (a share of "
    "each layer's full rank) at epoch 16 of 60 (Pufferfish's 80/300) with the first layer dense as in its hybrid "
    "networks, and `ratio_all_layers` without that; `cuttlefish`, the stable-rank switch and ranks; `pruning`, "
    "Lightning's ModelPruning (global L1 of every weight at the end of epoch 21), counted by its nonzero weights; "
    "`small_dense`, narrower MLPs trained dense from scratch. Ratios are to the 3×512's 551,434 parameters. With "
    "the `--set auto` runs (the ladder and dense) these are the curves of README's Recipes section.\n\n"
)
DIGITS_INTRO = (
    "Accuracies in %, mean ± std over seeds 0, 1, 2 (the model's initialisation; the data split and "
    "shuffle are fixed). scikit-learn's digits: 1,797 real 8×8 images, stratified 1,079 train / 359 val / "
    "359 test. The digits_mlp recipe (3×512 MLP, Adam 1e-3, 40 epochs, the default ‖∇L‖ trigger, forced "
    "at 26), EnergyRank swept in the weight metric and GlobalBudget in the loss metric, the ladder "
    '(`rounds="auto"`) over GlobalBudget(0.05) in the loss metric (`auto`) and over EnergyRank(0.4) in the '
    "weight metric (`auto_energy`), and the contenders of the MNIST-1D curves on the same data and seeds: "
    "uniform rank, Pufferfish (RankRatio at epoch 11, its first layer dense), Cuttlefish (its stable-rank "
    "switch and ranks), Lightning's ModelPruning (global L1 at epoch 7, sizes in nonzero weights) and small "
    "dense MLPs (ratios to the 3×512). Every one-shot run cuts once and fine-tunes to epoch 40.\n\n"
)


def _curves_body(out: Path, auto: Path) -> str:
    body = CURVE_INTRO + curve_table(out) + CURVE_READING
    if not auto.is_dir():
        return body + f"\n(No figure: the `--set auto` runs were not found in {auto}; pass --auto-out.)\n"
    figure = RESULTS / "figures" / "mnist1d_auto_curves.png"
    series = curve_rows(out)
    series.update({folder: collect(auto / folder)[0] for folder in AUTO_STUDIES})
    latency = curve_figure(series, figure, "mnist1d_auto: one-shot curves, the ladders and dense")
    return (
        f"{body}\n![validation accuracy against parameters and CPU latency](figures/{figure.name})\n\n"
        "CPU latency of each setting's models (the mean over seeds of the median ms per forward of a batch "
        f"of 256, measured on their checkpoints by the aggregation), with the ladders and dense of {auto.name}:\n\n"
        f"{latency}\n"
    )


_CONTENDERS = (
    'the ladder (`rounds="auto"`, max_drop 0.01) over GlobalBudget(0.05) in the loss metric (`auto`) and over '
    "EnergyRank(0.4) in the weight metric (`auto_energy`), and one-shot cuts fine-tuned to epoch 40: EnergyRank "
    "(weight metric), GlobalBudget (loss metric), uniform rank, Pufferfish (RankRatio at epoch 11 of 40, its "
    "80/300, with {first} dense), Cuttlefish (its stable-rank switch and ranks), Lightning's ModelPruning (global "
    "L1 of every weight at the end of epoch 25, sizes in nonzero weights) and smaller dense models trained from "
    "scratch ({small}; ratios to the recipe's model). The classifier head stays dense throughout (`*head`).\n\n"
)
CNN_INTRO = (
    "Accuracies in %, mean ± std over seeds 0, 1, 2, on MNIST-1D (3,600 train / 400 val / 1,000 test: one "
    "validation sample is 0.25 points). The mnist1d_cnn recipe: three 1×5 convolutions of 32 channels, Adam 2e-3, "
    "40 epochs, the ‖∇L‖ trigger forced at epoch 26. Studies: "
    + _CONTENDERS.format(first="the 1-channel first convolution", small="3×22 down to 3×8 channels")
)
CNN_READING = """

Reading (of the committed run, 2026-12-04, AMD EPYC 2-core VM; 400 validation samples, so one is 0.25
points and one seed's sampling error about ±2.3). The ‖∇L‖ trigger does not fire on this recipe (Adam at
a constant rate) and is forced at epoch 26, where dense is at val 79.2 ± 0.5, 2.5 points below its final
81.7 ± 2.2 (test 83.2 ± 1.8); Cuttlefish's stable-rank switch fires at epochs 7, 8 and 12. **The CNN
compresses little at dense accuracy, and the ladder is not above every contender.** The EnergyRank-floor
ladder (`auto_energy`) ends at 2.29× (2.06×, 2.46×, 2.37×) at val 81.4 ± 0.5, test 82.7 ± 1.1; level,
within noise, with Pufferfish (`RankRatio(0.25)` at epoch 11: 2.45× at 81.5 ± 0.9, test 83.4 ± 1.7) and
Cuttlefish (multiplier 1: 2.25× at 81.9 ± 2.3), and above EnergyRank one-shot (2.65× at 80.1, 2.14× at
79.1), the small dense models (1.98× at 78.6 ± 0.9) and ModelPruning at its size (1.98× at 81.2 in
nonzero weights). Uniform rank at 0.25 is 1.2 points below it with 21% fewer parameters (2.90× at 80.2 ±
1.2), so the two are on one curve. The loss-metric ladder (`auto`) ends larger and lower, 1.80× (1.59×,
2.27×, 1.55×) at 80.4 ± 2.1, below uniform rank at 0.5 (1.77× at 81.7 ± 1.8), Pufferfish and
`auto_energy`. Its rungs are decided by 1–3 points, 4–12 of 400 samples: in seed 0 the same
7,242-parameter cut was rolled back twice, at 76.8 two epochs after the trigger and at 80.3 eight epochs
later, the second time against a bar raised to 81.25 by an earlier rung's validation (a rung that beats
the bar raises it, so on a metric this noisy the bar climbs to a lucky maximum). Beyond 3× every factored
contender and small dense model loses 5 points or more (Pufferfish 0.125: 76.2 at 3.56×; Cuttlefish 0.5:
76.1 at 3.30×; small dense 3×16: 70.3; GlobalBudget 0.125: 67.5; uniform 0.125: 53.5); only ModelPruning
holds 80.2 ± 1.7 at 3.90× in nonzero weights (0.875: 70.3). Speed: on this CPU the factored convolutions
(a 1×5 convolution into r channels, then a 1×1) are slower than the dense ones at this size, 2.7–4.1 ms
per batch of 256 against dense's 2.4 (the ladders 3.2–3.5), while pruned models run at dense speed and
the small dense models in 1.1–1.9 ms. Cost: the ladders' fits took 32 ± 2 and 31 ± 2 s against dense's 31
± 6 s (two runs at a time, one thread each): the rungs run inside the recipe's 40 epochs and cost no
extra time here.
"""
TRANSFORMER_INTRO = (
    "Accuracies in %, mean ± std over seeds 0, 1, 2, on MNIST-1D (3,600 train / 400 val / 1,000 test: one "
    "validation sample is 0.25 points). The mnist1d_transformer recipe: a 2-block pre-norm transformer of width "
    "64 over patches of 4 samples (q, k, v, proj, fc1, fc2 separate Linear layers), AdamW 1e-3, 40 epochs, the "
    "‖∇L‖ trigger forced at epoch 26. Studies: "
    + _CONTENDERS.format(first="the patch embedding", small="width 44 down to 16")
)
TRANSFORMER_READING = """

Reading (of the committed run, 2026-12-04, AMD EPYC 2-core VM; 400 validation samples, one is 0.25
points, one seed's sampling error about ±2.3). The ‖∇L‖ trigger does not fire (AdamW at a constant rate)
and is forced at epoch 26, where dense is at val 84.6 ± 2.1; it ends at 85.0 ± 0.8 (test 85.8 ± 1.0).
**Here the loss-metric ladder is on or above every factored contender's curve.** `auto` ends at 3.78× (3
of 5 rungs kept in every seed) at val 85.2 ± 1.3, test 85.3 ± 0.6, level with dense; at its size one-shot
GlobalBudget(0.25) in the loss metric holds 83.7 ± 1.8 (3.71×), uniform rank 82.8 ± 1.5 (3.93×) and
Pufferfish (`RankRatio(0.125)` at epoch 11) 82.6 ± 2.6 (3.93×). The weight metric fails on this model:
one-shot EnergyRank falls to 56.1 at 3.21× and 76.6 at 1.88×, and the EnergyRank-floor ladder
(`auto_energy`) rolls back most rungs and ends at 1.04× (84.1 ± 2.8), the recipe's own 1.04×
(recipes_mnist1d.md). Cuttlefish switches at epochs 8–9 and keeps dense accuracy only at its own ranks
(1.11×, 85.3); below them it collapses (57.6 at 1.73×). **Two contenders win beyond the ladder's size.**
ModelPruning holds 84.6 ± 1.4 at 3.69× and 84.2 ± 1.3 at 6.69× in nonzero weights, level with the ladder
at its size and 0.8 points below dense at 1.8 times its compression, but its masked models run at dense
speed (22–23 ms a batch of 256 against dense's 21.6). Small dense transformers trained from scratch reach
83.2 ± 0.8 at width 24 (6.60×), 1.8 points below dense, in 11.8 ms; at the ladder's size (width 32,
3.82×) they are 3 points below it (82.2 ± 1.3). The ladder's model runs in 19.6 ms (0.90× dense's). Cost:
the ladder's fits took 96 ± 5 s against dense's 85 ± 7 s (1.13×; two runs at a time, one thread each):
its five rungs of two epochs, their validations and the roll-backs are inside the recipe's 40 epochs.
"""


def _contender_body(stem: str, studies: dict, title: str, intro: str, reading: str, features: int = 40):
    """A --set's page from its runs' folder: the table (sizes as in `curve_rows`), the reading, the figure and
    the latency table."""

    def body(out: Path) -> str:
        figure = RESULTS / "figures" / f"{stem}_curves.png"
        latency = curve_figure(curve_rows(out, studies), figure, title, features=features)
        ladders = {folder: studies[folder] for folder in studies if folder.startswith("auto") or folder == "dense"}
        return (
            f"{intro}{table(out, studies, widest=True)}\n\nThe ladders' rungs and cost against dense in the same "
            f"runs (fit time is `trainer.fit`'s wall time on this machine):\n\n{auto_table(out, ladders)}{reading}\n"
            f"![validation accuracy against parameters and CPU latency](figures/{figure.name})\n\n"
            "CPU latency of each setting's models (the mean over seeds of the median ms per forward of a batch "
            f"of 256, measured on their checkpoints by the aggregation):\n\n{latency}\n"
        )

    return body


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
        "switch": (
            SWITCH_STUDIES,
            "recipes_switch",
            "When to cut: early against at the ‖∇L‖ trigger (mnist1d_auto data)",
            lambda out: SWITCH_INTRO + table(out, SWITCH_STUDIES) + SWITCH_READING,
        ),
        "digits": (
            DIGITS_STUDIES,
            "recipes_digits",
            "scikit-learn digits: the ladders against every contender on a second real data set",
            _contender_body(
                "digits",
                DIGITS_STUDIES,
                "scikit-learn digits: one-shot curves, the ladders and dense",
                DIGITS_INTRO,
                DIGITS_READING,
                features=64,
            ),
        ),
        "cnn": (
            CNN_STUDIES,
            "recipes_cnn",
            "The MNIST-1D CNN: the ladders against every contender",
            _contender_body(
                "cnn", CNN_STUDIES, "mnist1d_cnn: one-shot curves, the ladders and dense", CNN_INTRO, CNN_READING
            ),
        ),
        "transformer": (
            TRANSFORMER_STUDIES,
            "recipes_transformer",
            "The MNIST-1D transformer: the ladders against every contender",
            _contender_body(
                "transformer",
                TRANSFORMER_STUDIES,
                "mnist1d_transformer: one-shot curves, the ladders and dense",
                TRANSFORMER_INTRO,
                TRANSFORMER_READING,
            ),
        ),
    }


def _only(studies: dict[str, tuple[str, ...]], names: str) -> dict[str, tuple[str, ...]]:
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in studies]
    if unknown or not wanted:
        raise SystemExit(f"--only {names!r}: not studies of this set; it has {', '.join(studies)}")
    return {name: studies[name] for name in wanted}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="where the runs go (default: outputs/bench_recipes[_SET])"
    )
    parser.add_argument("--aggregate-only", action="store_true", help="only re-read runs already in --out")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated studies of the set to (re-)run; the others' runs already in --out are re-read",
    )
    parser.add_argument(
        "--set",
        choices=("mnist1d", "auto", "curves", "mlp1024", "switch", "digits", "cnn", "transformer"),
        default="mnist1d",
        help="which studies",
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
        chosen = studies if args.only is None else _only(studies, args.only)
        run(out, chosen)
    command = "python -m benchmarks.bench_recipes" + ("" if args.set == "mnist1d" else f" --set {args.set}")
    print(write_result(name, title, body(out), command).read_text())


if __name__ == "__main__":
    main()
