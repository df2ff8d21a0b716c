"""Per-layer LMD analysis: how much rank each layer has, and how much its data needs.

For every Linear / Conv2d / factored layer, on the matrix (out, fan_in):
- the singular spectrum σ₁ ≥ σ₂ ≥ … and the Eckart–Young error curve ‖W − W_r‖_F/‖W‖_F for every r;
- the stable rank Σσᵢ²/σ₁² (Cuttlefish's measure) and the effective rank exp(H(σ/Σσ)) (Roy & Vetterli);
- the rank each of a set of policies would choose (policies see all layers at once, as in compress_);
- with data: the intrinsic dimension of the layer's inputs by TwoNN (Facco et al. 2017): with
  r₁, r₂ each point's distances to its two nearest neighbours, μ = r₂/r₁ follows a Pareto law of
  exponent d, so d̂ = n / Σ log μᵢ (the maximum-likelihood form). This is an estimate of the
  paper's latent dimension n′, the rank the layer would need to carry its inputs' manifold.
Inputs are captured with forward hooks on a few batches (conv inputs as unfolded patches), at most
`max_points` rows per layer, chosen at random with a private generator.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmd_lightning.checks import check_int, check_module
from lmd_lightning.layers.base import FactoredModule
from lmd_lightning.layers.svd import singular_values
from lmd_lightning.truncate.budget import GlobalBudget
from lmd_lightning.truncate.calibration import Calibration, DataMetric, layer_rows, layer_weight
from lmd_lightning.truncate.policies import EffectiveRank, EnergyRank, ErrorBound, LayerSpectrum, RankPolicy
from lmd_lightning.truncate.targets import FilterFn, Patterns, find_targets

__all__ = [
    "Analysis",
    "DEFAULT_POLICIES",
    "LayerAnalysis",
    "analyze",
    "effective_rank",
    "figures",
    "log_tensorboard",
    "stable_rank",
    "two_nn",
]

DEFAULT_POLICIES: tuple[RankPolicy, ...] = (
    EnergyRank(0.7),
    EnergyRank(0.9),
    ErrorBound(0.1),
    EffectiveRank(),
    GlobalBudget(params=0.5),
)


def stable_rank(s: Tensor) -> float:
    """Σσᵢ²/σ₁²: between 1 and the rank, insensitive to tiny singular values."""
    s2 = s.double().square()
    return float(s2.sum() / s2[0]) if len(s2) and float(s2[0]) > 0 else 0.0


def effective_rank(s: Tensor) -> float:
    """exp of the entropy of σ/Σσ (Roy & Vetterli 2007)."""
    s = s.double()
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def two_nn(points: Tensor) -> float | None:
    """TwoNN intrinsic dimension (maximum likelihood) of `points` (n, D); None with fewer than 3 distinct points."""
    x = points.double()
    distances = torch.cdist(x, x)
    distances.fill_diagonal_(math.inf)
    nearest = distances.topk(2, largest=False).values  # (n, 2): r₁ ≤ r₂
    r1, r2 = nearest[:, 0], nearest[:, 1]
    keep = (r1 > 0) & torch.isfinite(r2)  # duplicates have no defined ratio
    mu = (r2[keep] / r1[keep]).log()
    if int(keep.sum()) < 3 or float(mu.sum()) <= 0:
        return None
    return float(keep.sum()) / float(mu.sum())


@dataclass
class LayerAnalysis:
    name: str
    kind: str
    shape: tuple[int, int]  # (out, fan_in)
    rank: int  # what the layer holds now: min(out, fan_in) dense, r factored
    params: int
    stable_rank: float
    effective_rank: float
    policy_ranks: dict[str, int]
    spectrum: list[float]
    error_curve: list[float]  # relative Eckart–Young error at rank r = 1, 2, …
    intrinsic_dim: float | None = None  # TwoNN of the layer's inputs, with data
    input_points: int = 0


@dataclass
class Analysis:
    layers: list[LayerAnalysis] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"policies": self.policies, "layers": [asdict(layer) for layer in self.layers]}

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def table(self) -> str:
        header = ["layer", "shape", "rank", "stable", "effective", *self.policies, "input ID (TwoNN)"]
        rows = []
        for layer in self.layers:
            ident = "—" if layer.intrinsic_dim is None else f"{layer.intrinsic_dim:.1f} ({layer.input_points} pts)"
            rows.append(
                [
                    layer.name,
                    f"{layer.shape[0]}×{layer.shape[1]}",
                    str(layer.rank),
                    f"{layer.stable_rank:.1f}",
                    f"{layer.effective_rank:.1f}",
                    *(str(layer.policy_ranks[p]) for p in self.policies),
                    ident,
                ]
            )
        widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in [header, *rows]]
        return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])

    def __str__(self) -> str:
        return self.table()


def _label(policy: RankPolicy) -> str:
    """A short column name: `EnergyRank(energy=0.7)`, `EffectiveRank`."""
    kind = type(policy).__name__
    return f"{kind}({policy.knob}={policy.knob_value:g})" if policy.knob else kind


def _spectrum(module: nn.Module, name: str) -> Tensor:
    if isinstance(module, FactoredModule):
        return module.singular_values().detach().cpu()
    return singular_values(layer_weight(module), name).detach().cpu()


def _input_rows(
    model: nn.Module, modules: list[nn.Module], calibration: Calibration, max_points: int
) -> dict[nn.Module, Tensor]:
    """Up to `max_points` input rows per module, sampled evenly from every calibration batch."""
    per_batch = -(-max_points // len(calibration.batches))  # ceil: the total reaches max_points
    generator = torch.Generator().manual_seed(0)
    rows: dict[nn.Module, list[Tensor]] = {module: [] for module in modules}

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        x = layer_rows(module, args[0].detach())
        chosen = torch.randperm(x.shape[0], generator=generator)[:per_batch].to(x.device)
        rows[module].append(x[chosen].float().cpu())

    calibration.run(model, {module: hook for module in modules})
    return {module: torch.cat(parts)[:max_points] for module, parts in rows.items() if parts}


@torch.no_grad()
def analyze(
    model: nn.Module,
    calibration: Iterable[Any] | None = None,
    *,
    policies: Sequence[RankPolicy] = DEFAULT_POLICIES,
    include: Patterns = None,
    exclude: Patterns = None,
    filter_fn: FilterFn | None = None,
    batches: int | None = 8,
    max_points: int = 2000,
) -> Analysis:
    """Analyze every Linear / Conv2d / factored layer of `model`; with `calibration` batches, also its inputs.

    `calibration` is an iterable of batches fed as by `compress_(metric="data")` (a tensor, the
    first item of a tuple, or keywords). Dense and compressed models alike; nothing is changed.
    """
    check_module(model)
    if not policies or not all(isinstance(p, RankPolicy) for p in policies):
        raise TypeError(f"`policies` must be a non-empty sequence of RankPolicy, got {policies!r}")
    check_int(max_points, "max_points", 3)
    targets = [t for t in find_targets(model, include, exclude, filter_fn) if t.skip_reason is None]
    if not targets:
        raise ValueError("`analyze` found no Linear, Conv2d or factored layer to analyze")
    spectra, layers = {}, []
    for target in targets:
        module, weight = target.module, layer_weight(target.module)
        s = _spectrum(module, target.name)
        spectra[target.name] = s
        tail = s.double().square().flip(0).cumsum(0).flip(0)  # Σ_{i≥r} σᵢ²
        norm2 = float(tail[0]) if len(tail) else 0.0
        curve = [math.sqrt(float(t) / norm2) if norm2 > 0 else 0.0 for t in [*tail[1:], torch.tensor(0.0)]]
        layers.append(
            LayerAnalysis(
                name=target.name,
                kind=type(module).__name__,
                shape=tuple(weight.shape),
                rank=module.rank if isinstance(module, FactoredModule) else min(weight.shape),
                params=sum(p.numel() for p in module.parameters(recurse=False)),
                stable_rank=stable_rank(s),
                effective_rank=effective_rank(s),
                policy_ranks={},
                spectrum=[float(v) for v in s],
                error_curve=curve,
            )
        )
    views = []  # what compress_ shows the policies, so that the ranks are the ones it would choose
    for target, layer in zip(targets, layers):
        factored = isinstance(target.module, FactoredModule)
        cost_now = layer.rank * sum(layer.shape) if factored else layer.shape[0] * layer.shape[1]
        bias = 0 if target.module.bias is None else target.module.bias.numel()
        views.append(
            LayerSpectrum(layer.name, layer.shape, spectra[layer.name], layer.rank, sum(layer.shape), cost_now, bias)
        )
    names = [_label(policy) for policy in policies]
    if len(set(names)) != len(names):
        raise ValueError(f"`policies` must differ from each other, got {names}")
    for name, policy in zip(names, policies):
        for layer, rank in zip(layers, policy.choose(views)):
            layer.policy_ranks[name] = int(rank)
    if calibration is not None:
        run = (
            calibration
            if isinstance(calibration, Calibration)
            else Calibration(calibration, DataMetric(batches=batches))
        )
        rows = _input_rows(model, [t.module for t in targets], run, max_points)
        for target, layer in zip(targets, layers):
            if target.module in rows:
                layer.input_points = rows[target.module].shape[0]
                layer.intrinsic_dim = two_nn(rows[target.module])
    return Analysis(layers, names)


MAX_LAYERS_PLOTTED = 12


def figures(analysis: Analysis) -> dict[str, Any]:
    """Matplotlib figures: spectra with the policies' ranks and the input ID, error curves, ranks side by side."""
    from matplotlib.figure import Figure

    layers = analysis.layers[:MAX_LAYERS_PLOTTED]
    cols = min(3, len(layers))
    rows = math.ceil(len(layers) / cols)
    spectra = Figure(figsize=(4.2 * cols, 3.2 * rows))
    colors = ["tab:red", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink"]
    for index, layer in enumerate(layers):
        ax = spectra.add_subplot(rows, cols, index + 1)
        ax.semilogy(range(1, len(layer.spectrum) + 1), [max(v, 1e-12) for v in layer.spectrum], color="tab:blue")
        for color, (policy, rank) in zip(colors, layer.policy_ranks.items()):
            ax.axvline(rank, color=color, linestyle="--", linewidth=1, label=f"{policy}: {rank}")
        if layer.intrinsic_dim is not None:
            ax.axvline(layer.intrinsic_dim, color="black", linestyle=":", label=f"input ID {layer.intrinsic_dim:.1f}")
        ax.set_title(f"{layer.name} ({layer.shape[0]}×{layer.shape[1]})", fontsize=9)
        ax.set_xlabel("i")
        ax.set_ylabel("σᵢ")
        ax.legend(fontsize=6, loc="upper right")
    spectra.tight_layout()

    curves = Figure(figsize=(6, 4))
    ax = curves.add_subplot()
    for layer in layers:
        ax.plot(range(1, len(layer.error_curve) + 1), layer.error_curve, label=layer.name)
    ax.set_xscale("log")
    ax.set_xlabel("rank r")
    ax.set_ylabel("‖W − W_r‖_F / ‖W‖_F")
    ax.set_title("Eckart–Young error curves")
    ax.legend(fontsize=7)
    curves.tight_layout()

    ranks = Figure(figsize=(max(6, 1.1 * len(layers)), 4))
    ax = ranks.add_subplot()
    measures = {
        "rank held": [l.rank for l in layers],
        "stable rank": [l.stable_rank for l in layers],
        "effective rank": [l.effective_rank for l in layers],
        "input ID (TwoNN)": [l.intrinsic_dim or 0.0 for l in layers],
    }
    width = 0.8 / len(measures)
    for offset, (label, values) in enumerate(measures.items()):
        ax.bar([i + offset * width for i in range(len(layers))], values, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(layers))], [l.name for l in layers], rotation=30, fontsize=7)
    ax.set_yscale("log")
    ax.set_title("Rank held vs rank measures vs the inputs' intrinsic dimension")
    ax.legend(fontsize=7)
    ranks.tight_layout()
    return {"lmd_analysis/spectra": spectra, "lmd_analysis/error_curves": curves, "lmd_analysis/ranks": ranks}


def log_tensorboard(analysis: Analysis, log_dir: str | Path) -> Path:
    """Write the figures, the scalars per layer and the spectra as histograms to a TensorBoard run."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    try:
        for tag, figure in figures(analysis).items():
            writer.add_figure(tag, figure, 0)
        for layer in analysis.layers:
            writer.add_histogram(f"lmd_analysis/singular_values/{layer.name}", torch.tensor(layer.spectrum), 0)
            writer.add_scalar(f"lmd_analysis/stable_rank/{layer.name}", layer.stable_rank, 0)
            writer.add_scalar(f"lmd_analysis/effective_rank/{layer.name}", layer.effective_rank, 0)
            if layer.intrinsic_dim is not None:
                writer.add_scalar(f"lmd_analysis/input_intrinsic_dim/{layer.name}", layer.intrinsic_dim, 0)
    finally:
        writer.close()
    return Path(log_dir)
