"""A swap never leaves a model that cannot run: one forward and backward, and nothing left behind.

Models read their children in ways no swap can foresee (a private attribute, a fused kernel's
`.weight`, a shape check), so after a swap the callback and `compress_(..., check=...)` run one
step and go back to the dense layers if it raises. The step leaves no trace: gradients, buffers
(BatchNorm statistics) and the random state are as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ModelCheckError", "check_step", "cuda_devices", "eager", "output_loss"]


def eager() -> Any:
    """A context in which torch.compile'd modules run eagerly, so that forward hooks on their submodules fire.

    Calibration hooks each layer; a compiled graph would run past them. Without `set_stance` (torch < 2.6)
    it is a no-op, and a compiled layer reports that it received no calibration input.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def cuda_devices(model: nn.Module) -> list[int]:
    """The CUDA device indices `model`'s parameters are on: what torch.random.fork_rng must fork."""
    return sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})


class ModelCheckError(RuntimeError):
    """The compressed model failed its check step; `module` names where (the innermost module in the traceback)."""

    def __init__(self, module: str, error: BaseException) -> None:
        self.module, self.error = module, error
        super().__init__(
            f"the compressed model fails a forward/backward step in `{module}`: {type(error).__name__}: {error}"
        )


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for value in out.values() for t in _tensors(value)]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors(item)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [t for f in dataclasses.fields(out) for t in _tensors(getattr(out, f.name))]
    return []


def output_loss(out: Any) -> Tensor | None:
    """Something to backpropagate from a step's output: its `loss` if it has one, else the sum of its tensors."""
    if isinstance(out, Mapping) and isinstance(out.get("loss"), Tensor):
        return out["loss"]
    floats = [t for t in _tensors(out) if t.is_floating_point() and t.requires_grad]
    return sum(t.float().sum() for t in floats) if floats else None


def _where(model: nn.Module, error: BaseException) -> str:
    """The innermost module of `model` whose method is in the traceback; the model's class name if none is."""
    names = {id(module): name for name, module in model.named_modules()}
    where = None
    tb = error.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if id(owner) in names:
            where = names[id(owner)]
        tb = tb.tb_next
    return where or type(model).__name__


def check_step(model: nn.Module, step: Callable[[], Any]) -> None:
    """Run `step()` (a forward pass of `model`) and a backward from its output; raise ModelCheckError if either fails.

    Whatever happens, `model`'s gradients, buffers and the global random state are left as they were.
    """
    grads = {param: param.grad for param in model.parameters()}
    for param in grads:
        param.grad = None  # the step's backward must not add into the tensors kept here
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    try:
        with torch.random.fork_rng(devices=cuda_devices(model)):
            loss = output_loss(step())
            if loss is not None:
                loss.backward()
    except Exception as err:
        raise ModelCheckError(_where(model, err), err) from err
    finally:
        for param in model.parameters():
            param.grad = grads.get(param)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in buffers and buffers[name].shape == buffer.shape:
                    buffer.copy_(buffers[name])
