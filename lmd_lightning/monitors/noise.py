"""The full-batch gradient ‖∇L‖², told apart from minibatch noise, from per-sample gradient norms.

A minibatch gradient is a sum of per-sample contributions, g = Σᵢ cᵢ (cᵢ = gᵢ/B for a mean loss).
With the samples drawn independently, E[cᵢ·cⱼ] = ‖∇L‖²/B² for i ≠ j, so

    ‖∇L‖² ≈ (‖g‖² − Σᵢ‖cᵢ‖²)·B/(B − 1)       tr(Σ) ≈ B·Σᵢ‖cᵢ‖² − ‖∇L‖²

are unbiased estimates of the full-batch gradient's squared norm and of the trace of the per-sample
gradient covariance Σ, from one ordinary step: ‖g‖² is the step's own gradient and Σᵢ‖cᵢ‖² comes
cheaply from each layer's input x and output gradient δ, which backpropagation has anyway (for a
Linear layer ‖cᵢ‖² = Σ_{t,s} (δᵢₜ·δᵢₛ)(xᵢₜ·xᵢₛ) over sample i's tokens; a convolution is a
Linear layer on its unfolded input). Both scale alike with the loss (mean or sum), so their ratio
does not depend on it.

`ConvergenceMonitor(noise_tol=…)` turns them into ρ = ‖∇L‖²/(tr(Σ)/N): the full-batch gradient in units of its own
sampling variance over a dataset of N samples. ρ ≫ 1 while the data agree on a direction; ρ ≈ 1
once the per-sample gradients are as good as independent (each sample fitted on its own).

Framework-free: torch only. `LMDCompression` arms a `PerSampleNorms` on the steps it measures.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmd_lightning.layers.base import qualified_name
from lmd_lightning.layers.hf_conv1d import HF_CONV1D

__all__ = ["PerSampleNorms", "measurable", "noise_estimates", "per_sample_squares"]

_COST_LIMIT = 1 << 31  # multiply-adds per layer and step above which a layer is left out


def _pairs(x: Tensor, d: Tensor) -> Tensor:
    """Σᵢ ‖Σₜ dᵢₜ xᵢₜᵀ‖² for x (B, T, n), d (B, T, m): the cheaper of the Gram and the explicit route."""
    b, t, n = x.shape
    m = d.shape[2]
    if t == 1:
        return (x.square().sum((1, 2)) * d.square().sum((1, 2))).sum()
    if t * (n + m) <= n * m:
        return ((x @ x.transpose(1, 2)) * (d @ d.transpose(1, 2))).sum()  # (B, T, T) Gram matrices
    return (d.transpose(1, 2) @ x).square().sum()  # (B, m, n) per-sample weight gradients


def _conv_unfold(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """(B, L, C_in·k) patches of a convolution's input, L its output positions."""
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)  # (B, C, 1, L)
        kernel, dilation = (1, module.kernel_size[0]), (1, module.dilation[0])
        padding, stride = (0, module.padding[0]), (1, module.stride[0])
    else:
        kernel, dilation, padding, stride = module.kernel_size, module.dilation, module.padding, module.stride
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)


def _linear_like(module: nn.Module) -> bool:
    """nn.Linear, or Hugging Face's Conv1D (a Linear layer with its weight stored transposed)."""
    return isinstance(module, nn.Linear) or qualified_name(type(module)) == HF_CONV1D


def measurable(module: nn.Module) -> bool:
    """Whether `per_sample_squares` covers this layer: Linear, Hugging Face Conv1D, and Conv1d/Conv2d
    with groups=1 and zero padding."""
    if _linear_like(module):
        return isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.requires_grad
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return (
            module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
            and module.weight.requires_grad
        )
    return False


def per_sample_squares(module: nn.Module, x: Tensor, grad_output: Tensor) -> Tensor | None:
    """Σᵢ ‖cᵢ‖² over the layer's weight and bias for one batch (a float64 0-dim tensor); None if too costly.

    `x` is the layer's input and `grad_output` the loss's gradient at its output, both with the
    batch first; a Linear layer's middle dimensions (tokens) all belong to their sample. The norm
    does not depend on how the weight is stored, so Hugging Face's Conv1D takes the Linear route.
    """
    x, d = x.detach(), grad_output.detach()
    if _linear_like(module):
        b = x.shape[0]
        x, d = x.reshape(b, -1, x.shape[-1]), d.reshape(b, -1, d.shape[-1])  # (B, T, n), (B, T, m)
    else:
        x = _conv_unfold(module, x)  # (B, L, C_in·k)
        d = d.flatten(2).transpose(1, 2)  # (B, L, C_out)
    b, t, n = x.shape
    m = d.shape[2]
    if b * min(t * t * (n + m), t * n * m) > _COST_LIMIT:
        return None
    x, d = x.double(), d.double()
    total = _pairs(x, d)
    if getattr(module, "bias", None) is not None and module.bias.requires_grad:
        total = total + d.sum(1).square().sum()
    return total


class PerSampleNorms:
    """Σᵢ‖cᵢ‖² over a model's measurable layers, accumulated over the backward passes while armed.

    `arm()` registers a forward hook on every layer of `layers`: it keeps the layer's input and
    puts a gradient hook on its output, which turns input and output gradient into
    `per_sample_squares` during the backward; `disarm()` removes them, so steps that are not
    measured pay nothing. `take()` returns the sum since the
    last `take()` (a float64 tensor on the layers' device, no host sync) and resets it.
    """

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers = {name: m for name, m in layers.items() if measurable(m)}
        self.skipped: set[str] = set()  # layers left out because their per-sample norms cost too much
        self._handles: list = []
        self._total: Tensor | None = None

    @classmethod
    def of(cls, model: nn.Module) -> PerSampleNorms:
        """Every measurable layer of `model` whose parameters no other module also uses.

        A tied weight (GPT-2's lm_head and token embedding) gets gradient from each of its uses,
        and only the hooked use's per-sample share would be counted, so tied layers are left out.
        """
        owners: dict[int, int] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        layers = {
            name: m for name, m in model.named_modules() if all(owners[id(p)] == 1 for p in m.parameters(recurse=False))
        }
        return cls(layers)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The parameters whose per-sample contributions are measured (weights and biases)."""
        for name, module in self.layers.items():
            if name in self.skipped:
                continue
            yield module.weight
            if getattr(module, "bias", None) is not None and module.bias.requires_grad:
                yield module.bias

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        if self.armed:
            return
        for name, module in self.layers.items():
            if name not in self.skipped:
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def forward_hook(module: nn.Module, inputs: tuple, output: object) -> None:
            if not (inputs and torch.is_tensor(inputs[0]) and torch.is_tensor(output) and output.requires_grad):
                return  # not a training forward (no_grad, or frozen below and above)
            x = inputs[0].detach()

            def backward_hook(grad: Tensor) -> None:  # the gradient at the output, before any in-place op after it
                value = per_sample_squares(module, x, grad)
                if value is None:
                    self.skipped.add(name)  # measured without it from the next step on
                    return
                self._total = value if self._total is None else self._total + value.to(self._total.device)

            output.register_hook(backward_hook)

        return forward_hook

    def take(self) -> Tensor | None:
        total, self._total = self._total, None
        return total


def noise_estimates(grad_sq: Tensor, per_sample_sq: Tensor, samples: int) -> Tensor:
    """[‖∇L‖², tr Σ] estimated from one step's ‖g‖², Σᵢ‖cᵢ‖² and its B samples (B ≥ 2), on their device."""
    signal = (grad_sq - per_sample_sq) * (samples / (samples - 1))
    return torch.stack([signal, samples * per_sample_sq - signal])
