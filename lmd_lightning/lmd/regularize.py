"""LMD-guided regularization of the metric maps I_dist and O_dist (LMD.md sections 4 and 6).

Two penalties per factored layer that carries metric maps, summed over layers and scaled by λ:

- "identity": ‖I_dist − 1‖²_F + ‖O_dist − 1‖²_F keeps the maps near the Eckart–Young solution
  (LMD Eq. 4). With `orthogonality=True` it adds a gauge term that is zero at the canonical form:
  ‖UᵀU − 1‖² + ‖VᵀV − 1‖² for parametrization "svd", ‖UᵀU − VᵀV‖² for "balanced" (U√s, V√s).
- "laplacian" (LMD Eq. 5–7 as read in LMD.md section 4): on p of the layer's input rows x (a
  random subset of the batch's rows; for a conv, of its unfolded patches) build the symmetric
  kNN graph A (k neighbours, 0/1 weights), D = diag(A·1), L = D − A. With the latent codes
  Z = x·V·I_distᵀ (p × r, i.e. zᵢ = I_dist·Vᵀxᵢ) the input term is the Dirichlet energy
      tr(ZᵀL_in Z) / tr(ZᵀD_in Z) = ½Σᵢⱼ Aᵢⱼ‖zᵢ − zⱼ‖² / Σᵢ dᵢ‖zᵢ‖²,
  a generalized Rayleigh quotient in [0, 2]: 0 exactly when Z is constant on each connected
  component of the graph, and invariant to Z's scale. The output term is the same quotient for
  the codes that enter U, w = O_dist·diag(s)·I_dist·Vᵀx, on the graph L_out built on the
  layer's outputs. x, V, s and the outputs are detached: the penalty shapes I_dist and O_dist
  only, the task loss trains everything. Cost per layer: O(p²·(fan_in + out)) for the graphs
  and O(p²·r) for the quadratic forms, every `every_n_steps` optimizer steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lmd_lightning.checks import check_bool, check_int, check_number
from lmd_lightning.layers.base import FactoredModule
from lmd_lightning.truncate.calibration import layer_rows, output_rows

__all__ = ["REGULARIZERS", "Regularizer", "identity_penalty", "knn_graph", "laplacian_penalty", "smoothness"]

REGULARIZERS = ("identity", "laplacian")


@dataclass(frozen=True)
class Regularizer:
    """Settings of LMDCompression's `regularizer=`: which penalty, how strong, how often.

    Args:
        kind: "identity" or "laplacian" (see the module docstring for the formulas).
        lmd_lambda: λ ≥ 0, the penalty's weight next to the task loss. 0 measures and logs it only.
        every_n_steps: apply it on every this-many optimizer steps (with weight λ on those steps).
        orthogonality: "identity" only: add the gauge term on U and V.
        points: rows of the batch the Laplacian graphs are built on (p; cost grows as p²).
        k: neighbours per point in the kNN graphs.
    """

    kind: str = "identity"
    lmd_lambda: float = 0.01
    every_n_steps: int = 1
    orthogonality: bool = False
    points: int = 128
    k: int = 10

    def __post_init__(self) -> None:
        if self.kind not in REGULARIZERS:
            raise ValueError(f"`regularizer` must be one of {REGULARIZERS}, a Regularizer or None, got {self.kind!r}")
        check_number(self.lmd_lambda, "lmd_lambda", 0, finite=True)
        for name, low in (("every_n_steps", 1), ("points", 3), ("k", 1)):
            check_int(getattr(self, name), name, low, owner="Regularizer")
        if self.k >= self.points:
            raise ValueError(f"Regularizer `k` ({self.k}) must be smaller than `points` ({self.points})")
        check_bool(self.orthogonality, "orthogonality", owner="Regularizer")
        if self.orthogonality and self.kind != "identity":
            raise ValueError("Regularizer `orthogonality=True` goes with kind='identity' only")

    @staticmethod
    def of(regularizer: str | Regularizer | None) -> Regularizer | None:
        if regularizer is None or isinstance(regularizer, Regularizer):
            return regularizer
        if isinstance(regularizer, str):
            return Regularizer(kind=regularizer)
        raise ValueError(f"`regularizer` must be one of {REGULARIZERS}, a Regularizer or None, got {regularizer!r}")


def identity_penalty(layer: FactoredModule, orthogonality: bool = False) -> Tensor:
    """‖I_dist − 1‖² + ‖O_dist − 1‖² (+ the gauge term on U, V): zero right after truncation."""
    eye = torch.eye(layer.rank, dtype=layer.U.dtype, device=layer.U.device)
    penalty = (layer.I_dist - eye).square().sum() + (layer.O_dist - eye).square().sum()
    if orthogonality:
        UtU, VtV = layer.U.mT @ layer.U, layer.V.mT @ layer.V
        if layer.s is None:  # balanced: both Gram matrices equal diag(s) at the canonical form
            penalty = penalty + (UtU - VtV).square().sum()
        else:
            penalty = penalty + (UtU - eye).square().sum() + (VtV - eye).square().sum()
    return penalty


def knn_graph(points: Tensor, k: int) -> Tensor:
    """Symmetric 0/1 adjacency (p, p) of the k-nearest-neighbour graph (Euclidean, no self loops)."""
    p = points.shape[0]
    k = min(k, p - 1)
    distances = torch.cdist(points, points)
    distances.fill_diagonal_(math.inf)
    neighbours = distances.topk(k, largest=False).indices  # (p, k)
    A = torch.zeros(p, p, dtype=points.dtype, device=points.device)
    A.scatter_(1, neighbours, 1.0)
    return torch.maximum(A, A.mT)


def smoothness(codes: Tensor, adjacency: Tensor) -> Tensor:
    """tr(ZᵀLZ)/tr(ZᵀDZ) with L = D − A: in [0, 2], zero iff Z is constant on connected components."""
    degree = adjacency.sum(1)
    quadratic = (codes * (degree[:, None] * codes - adjacency @ codes)).sum()  # tr(Zᵀ(D − A)Z)
    scale = (degree[:, None] * codes.square()).sum()
    return quadratic / scale.clamp_min(torch.finfo(codes.dtype).tiny)


def laplacian_penalty(layer: FactoredModule, inputs: Tensor, outputs: Tensor, k: int) -> Tensor:
    """The input plus the output term for `inputs` (p, fan_in) and `outputs` (p, out), both detached rows."""
    x = inputs.detach().to(layer.U.dtype)
    latent = x @ layer.V.detach()  # (p, r): Vᵀx
    codes = latent @ layer.I_dist.mT  # Z = I_dist·Vᵀx
    spectrum = layer.s.detach() if layer.s is not None else None
    scaled = codes if spectrum is None else codes * spectrum
    entering_U = scaled @ layer.O_dist.mT  # w = O_dist·diag(s)·I_dist·Vᵀx
    graph_in = knn_graph(x, k)
    graph_out = knn_graph(outputs.detach().to(layer.U.dtype), k)
    return smoothness(codes, graph_in) + smoothness(entering_U, graph_out)


class RegularizerRun:
    """Applies a Regularizer inside a Lightning fit, from the callback's hooks.

    On a due step, forward hooks keep `points` rows of each map-carrying layer's input and output
    (a private generator picks them: the global RNG is untouched). After each backward the penalty's
    gradient is added to `.grad` of the maps — taken with `torch.autograd.grad`, so DDP's reducer is
    not involved; it is averaged over processes by the caller's `reduce`, divided by the number of
    accumulated batches and multiplied by the AMP loss scale, exactly as the task loss's gradient is.
    """

    def __init__(self, settings: Regularizer, seed: int = 0) -> None:
        self.settings, self.seed = settings, seed
        self.generator: torch.Generator | None = None  # made at first use: ddp_spawn pickles the callback
        self._handles: list[Any] = []
        self._rows: dict[str, tuple[Tensor, Tensor]] = {}
        self.layers: dict[str, FactoredModule] = {}  # the map-carrying layers of the step under way
        self.last_value: float | None = None

    def due(self, step: int) -> bool:
        return step % self.settings.every_n_steps == 0

    def arm(self, layers: dict[str, FactoredModule]) -> None:
        """This step's layers; for the Laplacian, start capturing their inputs' and outputs' rows."""
        self.disarm()
        self.layers = layers
        if self.settings.kind != "laplacian":
            return
        for name, layer in layers.items():
            self._handles.append(layer.register_forward_hook(self._capture(name)))

    def _capture(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if name in self._rows or not module.training:
                return
            x, y = layer_rows(module, args[0].detach()), output_rows(module, output.detach())
            if self.generator is None:
                self.generator = torch.Generator().manual_seed(self.seed)
            chosen = torch.randperm(x.shape[0], generator=self.generator)[: self.settings.points].to(x.device)
            self._rows[name] = (x[chosen].float(), y[chosen].float())

        return hook

    def disarm(self) -> None:
        """Remove the hooks and forget captured rows (also after a step whose backward was skipped)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def penalty(self, layers: dict[str, FactoredModule]) -> Tensor | None:
        """λ-free penalty summed over layers, or None when nothing was captured."""
        total = None
        for name, layer in layers.items():
            if self.settings.kind == "identity":
                term = identity_penalty(layer, self.settings.orthogonality)
            elif name in self._rows and self._rows[name][0].shape[0] > self.settings.k:
                term = laplacian_penalty(layer, *self._rows[name], self.settings.k)
            else:
                continue
            total = term if total is None else total + term
        return total

    def add_gradients(
        self,
        layers: dict[str, FactoredModule],
        scale: float,
        loss_scale: float | None,
        reduce: Callable[[Tensor], Tensor],
    ) -> float | None:
        """Add ∂(λ·penalty·scale·loss_scale)/∂θ to the maps' (with orthogonality also U's and V's) gradients.

        The Laplacian's gradients depend on each process's batch: they are averaged with one
        `reduce` call over a flat buffer, made on every process whatever it captured (zeros where
        it has nothing), so that processes never disagree on the collectives they run. The identity
        penalty depends on the parameters only, which DDP keeps equal: it needs no reduce.
        """
        self.disarm()
        value = self.penalty(layers)
        self._rows.clear()
        self.last_value = None if value is None else float(value.detach())
        if self.settings.lmd_lambda == 0:
            return self.last_value  # measured and logged, not applied
        params = [p for layer in layers.values() for p in self._targets(layer) if p.requires_grad]
        grads: list[Tensor | None] = [None] * len(params)
        if value is not None and value.requires_grad:
            objective = value * (self.settings.lmd_lambda * scale * (1.0 if loss_scale is None else float(loss_scale)))
            grads = list(torch.autograd.grad(objective, params, allow_unused=True))
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        if self.settings.kind == "laplacian" and grads:
            flat = reduce(torch.cat([g.reshape(-1) for g in grads]))
            grads = list(flat.split([g.numel() for g in grads]))
        for param, grad in zip(params, grads):
            grad = grad.reshape(param.shape).to(param.dtype)
            if param.grad is None:
                param.grad = grad.detach().clone()
            else:
                param.grad.add_(grad)
        return self.last_value

    def _targets(self, layer: FactoredModule) -> list[nn.Parameter]:
        params = [layer.I_dist, layer.O_dist]
        if self.settings.kind == "identity" and self.settings.orthogonality:
            params += [layer.U, layer.V]
        return params
