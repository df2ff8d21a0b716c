"""export_model: write a compressed model still factored, reload it, and prove it matches.

- "exported_program": torch.export → `.pt2`, the format to prefer on current torch.
- "torchscript": torch.jit.trace → `.pt`; deprecated in torch (2.13 warns), still supported.
- "onnx": torch.onnx's torch.export-based exporter; needs onnx, onnxscript and onnxruntime
  (which runs the file to compare its outputs).
- "state_dict": torch.save of weights and metadata, for `torch.load(weights_only=True)`,
  `restore_factored_(fresh_model, sd)` and `load_state_dict(sd)`.

Factored layers are exported as they run, two thin matmuls (or convs), never as the dense
U·diag(s)·Vᵀ, and the artefact's weights are checked for it. Files are written into a hidden
directory beside `path` and moved in only after the reloaded artefact matched the model.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import lmd_lightning
from lmd_lightning.checks import check_bool, check_choice, check_module, check_number
from lmd_lightning.layers.base import FactoredModule
from lmd_lightning.truncate.restore import restore_factored_

__all__ = ["FORMATS", "STATE_DICT_FORMAT", "SUFFIXES", "ExportResult", "check_destination", "export_model"]

FORMATS = ("torchscript", "onnx", "state_dict", "exported_program")
SUFFIXES = {"torchscript": ".ts.pt", "onnx": ".onnx", "state_dict": ".pt", "exported_program": ".pt2"}
STATE_DICT_FORMAT = "lmd_lightning.state_dict"  # the "format" tag inside a state_dict export
_ONNX_INSTALL = 'pip install onnx onnxscript onnxruntime (or pip install "lmd-lightning[export]")'
_ONNX_FLOATS = frozenset({1, 10, 11, 16})  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


@dataclass(frozen=True)
class ExportResult:
    """What `export_model` wrote and how it was checked."""

    path: Path
    format: str
    max_abs_diff: float | None  # max |artefact − model| on example_input; None when outputs were not compared
    verified: bool  # the reloaded artefact reproduces the model (the note says how this was shown)
    params: int  # numel of the weights stored in the artefact
    factored_layers: int  # factored layers (any kind) exported as factors
    note: str  # how it was verified, plus anything to know (deprecation, static batch, folding)

    def __str__(self) -> str:
        diff = "outputs not compared" if self.max_abs_diff is None else f"max |Δ| {self.max_abs_diff:.2e}"
        status = "verified" if self.verified else "NOT verified"
        return (
            f"{self.format} → {self.path}: {status} ({diff}), {self.params:,} params, "
            f"{self.factored_layers} factored layer{'' if self.factored_layers == 1 else 's'}; {self.note}"
        )


@dataclass
class _Check:
    """What a writer found when it read its own file back."""

    outputs: list[Tensor] | None  # the artefact's outputs on example_input; None when it could not be run
    params: int  # numel of the weights the artefact stores
    notes: list[str] = field(default_factory=list)
    bit_exact: bool = False  # every stored tensor equals the model's: verified without running it


def export_model(
    model: nn.Module,
    path: str | Path,
    format: str,
    example_input: Tensor,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    rebuild: Callable[[], nn.Module] | None = None,
    fold: bool = True,
) -> ExportResult:
    """Export `model` in eval mode to `path` as `format`, then reload it and compare outputs.

    Outputs on `example_input` must agree as in torch.testing: |artefact − model| ≤ atol + rtol·|model|.
    With `fold=True`, modules with a `fold_()` method have it called on a deep copy first: LMD
    metric maps (I_dist, O_dist) merge into the factors, so the artefact runs the plain product.
    The artefact is compared with the unfolded model, so a fold that changes the function is caught.
    `rebuild` (state_dict only) makes a fresh dense model of the same architecture, used to compare
    outputs; without it the reloaded state dict is compared tensor for tensor.
    For a dynamic batch dimension (exported_program, onnx) give an example batch of at least 2.
    Raises RuntimeError, leaving `path` as it was, when the artefact differs or is no longer factored.
    """
    path = _validate(model, path, format, example_input, atol, rtol, rebuild)
    check_bool(fold, "fold")
    writer = partial(_write_state_dict, rebuild=rebuild) if format == "state_dict" else _WRITERS[format]
    with _eval_mode(model), torch.no_grad():
        expected = _flatten(model(example_input))
        target, folded = _folded(model) if fold else (model, 0)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            check = writer(target, staging / path.name, example_input)
            max_abs_diff = _verify(check, expected, atol, rtol)
            for file in sorted(staging.iterdir()):
                os.replace(file, path.parent / file.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    notes = check.notes + ([f"folded {folded} module(s) with fold_()"] if folded else [])
    if max_abs_diff is not None:
        notes.insert(0, f"outputs match within atol={atol:g}, rtol={rtol:g}")
    factored = sum(isinstance(module, FactoredModule) for module in target.modules())
    verified = max_abs_diff is not None or check.bit_exact
    return ExportResult(path, format, max_abs_diff, verified, check.params, factored, "; ".join(notes))


def _validate(
    model: nn.Module, path: str | Path, format: str, x: Tensor, atol: float, rtol: float, rebuild: Callable | None
) -> Path:
    check_module(model)
    check_choice(format, "format", FORMATS)
    if not isinstance(x, Tensor):
        raise TypeError(f"`example_input` must be a torch.Tensor, got {type(x).__name__}")
    for name, value in (("atol", atol), ("rtol", rtol)):
        check_number(value, name, 0, kind="float")
    if rebuild is not None and (format != "state_dict" or not callable(rebuild)):
        raise ValueError(f"`rebuild` must be None or, with format='state_dict' only, a callable; got {rebuild!r}")
    return check_destination(path, format)


def check_destination(path: str | Path, format: str, arg: str = "path") -> Path:
    """`path` as a Path, if `format` can be written there and its packages are installed; `arg` names it in errors."""
    check_choice(format, "format", FORMATS)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`{arg}` must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir() or not path.parent.is_dir():
        raise ValueError(f"`{arg}` must name a file in an existing directory, got {str(path)!r}")
    if format == "exported_program" and path.suffix != ".pt2":
        # torch.export.load warns on any other suffix today, and says it will refuse it.
        raise ValueError(f"`{arg}` must end in .pt2 for format='exported_program', got {str(path)!r}")
    if format == "onnx":  # onnxruntime too: an export is only kept once its outputs have been compared
        missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
        if missing:
            raise ImportError(f"format='onnx' needs {' and '.join(missing)}: {_ONNX_INSTALL}")
    return path


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the export; afterwards every submodule gets its own flag back, not the root's."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _folds(module: nn.Module) -> bool:
    """Whether `fold_()` would change it: factored layers only with metric maps, others if they have one."""
    if isinstance(module, FactoredModule):
        return module.has_metric_maps
    return callable(getattr(module, "fold_", None))


def _folded(model: nn.Module) -> tuple[nn.Module, int]:
    """A deep copy with every `fold_()` applied, or the model itself when nothing folds."""
    if not any(_folds(module) for module in model.modules()):
        return model, 0
    folded = copy.deepcopy(model)
    folding = [module for module in folded.modules() if _folds(module)]
    for module in folding:
        module.fold_()
    return folded, len(folding)


def _flatten(output: Any) -> list[Tensor]:
    """The output's tensors in order: a tensor, tuples/lists and mappings (Hugging Face ModelOutput) of them."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [tensor for item in output for tensor in _flatten(item)]
    if isinstance(output, Mapping):
        return [tensor for item in output.values() if item is not None for tensor in _flatten(item)]
    raise TypeError(f"the model's output must be a Tensor or a tuple/list/mapping of them, got {type(output).__name__}")


def _verify(check: _Check, expected: list[Tensor], atol: float, rtol: float) -> float | None:
    """The max abs difference to the model's outputs; RuntimeError when beyond atol/rtol."""
    if check.outputs is None:
        return None
    actual = [tensor.detach().cpu().double() for tensor in check.outputs]
    expected = [tensor.detach().cpu().double() for tensor in expected]
    if [a.shape for a in actual] != [e.shape for e in expected]:
        shapes = [[tuple(t.shape) for t in tensors] for tensors in (actual, expected)]
        raise RuntimeError(f"the reloaded artefact returns shapes {shapes[0]}, the model {shapes[1]}")
    diffs = [float((a - e).abs().max()) if a.numel() else 0.0 for a, e in zip(actual, expected)]
    if not all(torch.allclose(a, e, rtol=rtol, atol=atol) for a, e in zip(actual, expected)):
        raise RuntimeError(
            f"the reloaded artefact does not match the model: max abs difference {max(diffs):.3e} "
            f"(atol={atol:g}, rtol={rtol:g}); `path` left as it was"
        )
    return max(diffs, default=0.0)


def _check_same_parameters(stored: Mapping[str, torch.Size], model: nn.Module) -> int:
    """The artefact must hold the factored model's parameters, name for name and shape for shape.

    A parameter shared by several modules (a head tied to its embedding) may be stored under any or
    all of its names; it counts once.
    """
    aliases = {name: param for name, param in model.named_parameters(remove_duplicate=False)}
    expected = {name: tuple(param.shape) for name, param in model.named_parameters()}
    got = {name: tuple(shape) for name, shape in stored.items()}
    held = [aliases[name] for name in got if name in aliases and tuple(aliases[name].shape) == got[name]]
    distinct = {id(param) for param in aliases.values()}
    if len(held) != len(got) or {id(param) for param in held} != distinct:
        differing = sorted(set(got.items()) ^ set(expected.items()))
        raise RuntimeError(f"the artefact's parameters differ from the factored model's (densified?): {differing[:8]}")
    return sum(param.numel() for param in {id(param): param for param in held}.values())


def _check_not_densified(shapes: list[tuple[int, ...]], model: nn.Module) -> None:
    """No stored tensor may be a factored layer's dense product: one of out·fan_in elements the model lacks.

    ONNX folds constants (U·s into one tensor) and lifts forward-made ones, so names and counts cannot match.
    """
    dense_sizes = {m.U.shape[0] * m.V.shape[0] for m in model.modules() if isinstance(m, FactoredModule)}
    own = Counter(tensor.numel() for tensor in [*model.parameters(), *model.buffers()])
    stored = Counter(math.prod(shape) for shape in shapes)
    extra = {size: stored[size] - own[size] for size in sorted(dense_sizes) if stored[size] > own[size]}
    if extra:
        raise RuntimeError(f"the artefact holds tensors of a factored layer's dense size (numel: extra count) {extra}")


@contextmanager
def _jit_deprecations() -> Iterator[list[str]]:
    """torch.jit's deprecation warnings become one note; every other warning passes through."""
    found: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
    finally:
        for warning in caught:
            message = str(warning.message)
            if issubclass(warning.category, DeprecationWarning) and "`torch.jit." in message:
                found.append(message)
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _write_torchscript(model: nn.Module, file: Path, x: Tensor) -> _Check:
    with _jit_deprecations() as deprecated:
        # A LightningModule's own to_torchscript traces without its `trainer` property raising.
        to_torchscript = getattr(model, "to_torchscript", None)
        if callable(to_torchscript):
            traced = to_torchscript(method="trace", example_inputs=x)
        else:
            traced = torch.jit.trace(model, (x,))
        torch.jit.save(traced, str(file))
        loaded = torch.jit.load(str(file), map_location=x.device)
        outputs = _flatten(loaded(x))
    params = _check_same_parameters({name: p.shape for name, p in loaded.named_parameters()}, model)
    notes = [f"TorchScript is deprecated in torch {torch.__version__}; prefer exported_program"] if deprecated else []
    return _Check(outputs, params, notes)


def _dynamic_batch(x: Tensor) -> tuple[dict[int, Any]] | None:
    """Dim 0 dynamic where possible: Dim.AUTO keeps it static, not failing, when the model fixes it."""
    auto = getattr(torch.export.Dim, "AUTO", None)
    return ({0: auto},) if auto is not None and x.dim() > 0 else None


def _batch_note(dynamic: bool, x: Tensor) -> str:
    fixed = f"batch fixed at {x.shape[0] if x.dim() else 'scalar'} (by the model, or an example batch of 1)"
    return "dynamic batch dimension" if dynamic else fixed


def _write_exported_program(model: nn.Module, file: Path, x: Tensor) -> _Check:
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=_dynamic_batch(x)), str(file))
    loaded = torch.export.load(str(file))
    names = loaded.graph_signature.parameters
    params = _check_same_parameters({name: loaded.state_dict[name].shape for name in names}, model)
    # Only dim 0 was marked dynamic, so any range constraint is the batch's.
    return _Check(_flatten(loaded.module()(x)), params, [_batch_note(bool(loaded.range_constraints), x)])


def _write_onnx(model: nn.Module, file: Path, x: Tensor) -> _Check:
    import onnx

    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False, dynamic_shapes=_dynamic_batch(x))
    program.save(str(file))  # weights go to `<name>.data` beside it only past ONNX's 2 GB limit
    onnx.checker.check_model(str(file))
    graph = onnx.load(str(file), load_external_data=False).graph
    shapes = [tuple(t.dims) for t in graph.initializer if t.data_type in _ONNX_FLOATS]
    _check_not_densified(shapes, model)
    batch = graph.input[0].type.tensor_type.shape.dim
    notes = [_batch_note(len(batch) > 0 and batch[0].HasField("dim_param"), x), "onnx.checker passed"]
    params = sum(math.prod(shape) for shape in shapes)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})
    return _Check([torch.from_numpy(output) for output in outputs], params, notes)


def _write_state_dict(model: nn.Module, file: Path, x: Tensor, rebuild: Callable[[], nn.Module] | None) -> _Check:
    state = model.state_dict()
    metadata = {
        "lmd_lightning_version": lmd_lightning.__version__,  # read at call time: the package is imported by then
        "torch_version": str(torch.__version__),  # a plain str: TorchVersion does not load with weights_only
        "ranks": {name: m.rank for name, m in model.named_modules() if isinstance(m, FactoredModule)},
        "input_shape": list(x.shape),
    }
    torch.save({"state_dict": state, "format": STATE_DICT_FORMAT, **metadata}, file)
    loaded = torch.load(file, map_location="cpu", weights_only=True)["state_dict"]
    if loaded.keys() != state.keys() or not all(torch.equal(loaded[k], v.cpu()) for k, v in state.items()):
        raise RuntimeError("the reloaded state dict differs from the model's")
    params = sum(param.numel() for param in model.parameters())
    if rebuild is None:
        return _Check(None, params, ["reloaded state dict equals the model's tensor for tensor"], bit_exact=True)
    fresh = rebuild()
    if not isinstance(fresh, nn.Module):
        raise TypeError(f"`rebuild` must return a torch.nn.Module, got {type(fresh).__name__}")
    rebuilt = restore_factored_(fresh, loaded)
    fresh.load_state_dict(loaded)
    outputs = _flatten(fresh.to(x.device).eval()(x))
    return _Check(outputs, params, [f"rebuilt {len(rebuilt)} factored layers with restore_factored_"])


_WRITERS: dict[str, Callable[[nn.Module, Path, Tensor], _Check]] = {
    "torchscript": _write_torchscript,
    "onnx": _write_onnx,
    "exported_program": _write_exported_program,
}
