from __future__ import annotations

import copy
import importlib.util
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from lmd_lightning import FactoredLinear, FixedRank, compress_, restore_factored_
from lmd_lightning.cli.exporter import FORMATS, STATE_DICT_FORMAT, check_destination, export_model

SUFFIX = {"torchscript": ".pt", "onnx": ".onnx", "state_dict": ".ckpt", "exported_program": ".pt2"}


def tiny_mlp() -> nn.Sequential:
    # Dropout makes the export's eval mode visible in the outputs.
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def tiny_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(16 * 6 * 6, 10)
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], set[str]]] = {
    # factory, example input shape, layers FixedRank(4) must factor (the 4×32 head does not save)
    "mlp": (tiny_mlp, (3, 16), {"0", "3"}),
    "cnn": (tiny_cnn, (2, 3, 8, 8), {"0", "2", "4"}),
}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def compressed(kind: str) -> tuple[nn.Module, torch.Tensor, int]:
    """A compressed model in train mode, an example input and the dense model's parameter count."""
    factory, shape, factored = MODELS[kind]
    model = factory()
    dense = n_params(model)
    report = compress_(model, FixedRank(4))
    assert {layer.name for layer in report.compressed} == factored
    return model.train(), torch.randn(shape), dense


def reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    copied = copy.deepcopy(model).eval()
    with torch.no_grad():
        return copied(x)


def reload(format: str, path: Path, x: torch.Tensor, rebuild: Callable[[], nn.Module]) -> tuple[torch.Tensor, int]:
    """The artefact's outputs and stored weight count, read back independently of export_model."""
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            loaded = torch.jit.load(str(path))
        return loaded(x), n_params(loaded)
    if format == "exported_program":
        program = torch.export.load(str(path))
        names = program.graph_signature.parameters
        return program.module()(x), sum(program.state_dict[name].numel() for name in names)
    if format == "onnx":
        onnx, ort = pytest.importorskip("onnx"), pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        weights = [t for t in onnx.load(str(path)).graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
        return torch.from_numpy(out), sum(math.prod(t.dims) for t in weights)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["format"] == STATE_DICT_FORMAT
    fresh = rebuild()
    restore_factored_(fresh, checkpoint["state_dict"])
    fresh.load_state_dict(checkpoint["state_dict"])
    return fresh.eval()(x), n_params(fresh)


def needs(format: str) -> None:
    if format == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxscript")


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_export_reloads_equal_and_stays_factored(kind: str, format: str, tmp_path: Path) -> None:
    needs(format)
    model, x, dense = compressed(kind)
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    path = tmp_path / f"model{SUFFIX[format]}"
    rebuild = MODELS[kind][0] if format == "state_dict" else None
    result = export_model(model, path, format, x, rebuild=rebuild)

    assert path.is_file() and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    with torch.no_grad():
        out, stored = reload(format, path, x, MODELS[kind][0])
    torch.testing.assert_close(out, reference(model, x), atol=1e-4, rtol=1e-4)
    if format in ("exported_program", "onnx"):
        bigger = torch.randn(7, *x.shape[1:])
        with torch.no_grad():
            out, _ = reload(format, path, bigger, MODELS[kind][0])
        torch.testing.assert_close(out, reference(model, bigger), atol=1e-4, rtol=1e-4)
        assert "dynamic batch" in result.note
    assert stored == result.params == n_params(model) < dense
    assert result.verified and result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    assert result.factored_layers == len(MODELS[kind][2]) and result.format == format and result.path == path
    assert model.training and all(m.training for m in model.modules())
    assert {name: p for name, p in model.named_parameters()}.keys() == before.keys()
    for name, param in model.named_parameters():
        assert param is before[name][0] and torch.equal(param, before[name][1])


def test_example_batch_of_one_is_reported_as_fixed(tmp_path: Path) -> None:
    model, _, _ = compressed("mlp")
    result = export_model(model, tmp_path / "m.pt2", "exported_program", torch.randn(1, 16))
    assert "batch fixed at 1" in result.note


def test_state_dict_without_rebuild_compares_tensors(tmp_path: Path) -> None:
    model, x, _ = compressed("cnn")
    result = export_model(model, tmp_path / "m.ckpt", "state_dict", x)
    assert result.verified and result.max_abs_diff is None and "tensor for tensor" in result.note
    checkpoint = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert checkpoint["ranks"] == {"0": 4, "2": 4, "4": 4} and checkpoint["input_shape"] == [2, 3, 8, 8]
    assert checkpoint["state_dict"].keys() == model.state_dict().keys()


def test_torchscript_deprecation_becomes_one_note(tmp_path: Path) -> None:
    model, x, _ = compressed("mlp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_model(model, tmp_path / "m.pt", "torchscript", x)
    assert not [w for w in caught if "`torch.jit." in str(w.message)]
    with warnings.catch_warnings(record=True) as probe:
        warnings.simplefilter("always")
        torch.jit.trace(nn.Linear(2, 2), torch.randn(1, 2))
    torch_deprecates = any(issubclass(w.category, DeprecationWarning) for w in probe)
    assert ("TorchScript is deprecated" in result.note) == torch_deprecates


def perturbed(model: nn.Module) -> nn.Module:
    wrong = copy.deepcopy(model).eval()
    with torch.no_grad():
        for param in wrong.parameters():
            param.add_(1.0)
    return wrong


def densified(model: nn.Module) -> nn.Module:
    dense = copy.deepcopy(model).eval()
    for name, child in dense.named_children():
        if isinstance(child, FactoredLinear):
            setattr(dense, name, child.to_linear())
    return dense


def patch_load(monkeypatch: pytest.MonkeyPatch, format: str, replacement: nn.Module, x: torch.Tensor) -> None:
    """Make the export's reload return `replacement` instead of what was written."""
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(replacement, (x,))
        monkeypatch.setattr(torch.jit, "load", lambda *args, **kwargs: traced)
    else:
        program = torch.export.export(replacement, (x,))
        monkeypatch.setattr(torch.export, "load", lambda *args, **kwargs: program)


@pytest.mark.parametrize("format", ["torchscript", "exported_program"])
def test_mismatch_raises_and_writes_nothing(format: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, _ = compressed("mlp")
    patch_load(monkeypatch, format, perturbed(model), x)
    with pytest.raises(RuntimeError, match=r"max abs difference \d"):
        export_model(model, tmp_path / f"m{SUFFIX[format]}", format, x)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("format", ["torchscript", "exported_program"])
def test_densified_artefact_is_rejected(format: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, _ = compressed("mlp")
    patch_load(monkeypatch, format, densified(model), x)
    with pytest.raises(RuntimeError, match="differ from the factored model's"):
        export_model(model, tmp_path / f"m{SUFFIX[format]}", format, x)
    assert list(tmp_path.iterdir()) == []


def test_densified_onnx_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    needs("onnx")
    model, x, _ = compressed("mlp")
    real = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda module, *args, **kwargs: real(densified(module), *args, **kwargs))
    with pytest.raises(RuntimeError, match=r"dense size \(numel: extra count\) \{512: 1, 1024: 1\}"):
        export_model(model, tmp_path / "m.onnx", "onnx", x)
    assert list(tmp_path.iterdir()) == []


def test_failed_export_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, _ = compressed("mlp")
    path = tmp_path / "m.pt2"
    path.write_bytes(b"previous")
    patch_load(monkeypatch, "exported_program", perturbed(model), x)
    with pytest.raises(RuntimeError, match="does not match"):
        export_model(model, path, "exported_program", x)
    assert path.read_bytes() == b"previous" and list(tmp_path.iterdir()) == [path]


class ScaledLinear(nn.Module):
    """Stands in for a layer with LMD metric maps: y = gain·(W x), foldable into W."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 4)
        self.register_buffer("gain", torch.full((4, 1), 3.0))
        self.folded = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain.T * self.linear(x)

    def fold_(self) -> None:
        self.linear.weight.mul_(self.gain)
        self.linear.bias.mul_(self.gain[:, 0])
        self.gain.fill_(1.0)
        self.folded = True


def test_fold_hook_runs_on_a_copy(tmp_path: Path) -> None:
    model, x = ScaledLinear(), torch.randn(2, 8)
    weight = model.linear.weight.detach().clone()
    result = export_model(model, tmp_path / "m.ckpt", "state_dict", x, rebuild=ScaledLinear)
    assert result.verified and "folded 1 module(s)" in result.note
    assert not model.folded and torch.equal(model.gain, torch.full((4, 1), 3.0))
    assert torch.equal(model.linear.weight, weight)
    state = torch.load(tmp_path / "m.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(state["gain"], torch.ones(4, 1)) and torch.equal(state["linear.weight"], 3.0 * weight)


def test_fold_that_changes_the_function_is_caught(tmp_path: Path) -> None:
    class BadFold(ScaledLinear):
        def fold_(self) -> None:
            self.gain.fill_(1.0)

    with pytest.raises(RuntimeError, match="does not match"):
        export_model(BadFold(), tmp_path / "m.pt2", "exported_program", torch.randn(2, 8))
    assert list(tmp_path.iterdir()) == []


def test_submodule_modes_are_given_back(tmp_path: Path) -> None:
    model, x, _ = compressed("mlp")
    model[2].eval()  # a frozen Dropout inside a training model keeps its own flag
    export_model(model, tmp_path / "m.pt2", "exported_program", x)
    assert model.training and not model[2].training


@pytest.mark.parametrize("package", ["onnx", "onnxruntime"])
def test_onnx_needs_its_runtime_to_verify(package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(ImportError, match=f"needs {package}: pip install onnx onnxscript onnxruntime"):
        export_model(tiny_mlp(), tmp_path / "m.onnx", "onnx", torch.randn(2, 16))
    assert not (tmp_path / "m.onnx").exists()


def test_destination_is_checked_under_the_callers_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`output` must end in .pt2 for format='exported_program'"):
        check_destination(tmp_path / "m.pt", "exported_program", arg="output")
    with pytest.raises(ValueError, match="`output` must name a file in an existing directory"):
        check_destination(tmp_path / "no" / "m.pt", "state_dict", arg="output")
    assert check_destination(str(tmp_path / "m.pt"), "state_dict") == tmp_path / "m.pt"


def test_str_is_one_line(tmp_path: Path) -> None:
    model, x, _ = compressed("mlp")
    text = str(export_model(model, tmp_path / "m.pt2", "exported_program", x))
    assert "\n" not in text and text.startswith(f"exported_program → {tmp_path / 'm.pt2'}: verified")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"format": "tflite"}, ValueError, r"`format` must be one of \('torchscript', 'onnx'"),
        ({"example_input": [1.0]}, TypeError, "`example_input` must be a torch.Tensor, got list"),
        ({"model": "mlp"}, TypeError, "`model` must be a torch.nn.Module, got str"),
        ({"atol": -1.0}, ValueError, "`atol` must be a float >= 0, got -1.0"),
        ({"rtol": float("nan")}, ValueError, "`rtol` must be a float >= 0, got nan"),
        ({"rebuild": tiny_mlp}, ValueError, "`rebuild` must be None or, with format='state_dict' only"),
        ({"path": "missing/m.pt2"}, ValueError, "`path` must name a file in an existing directory"),
        ({"path": "m.pt"}, ValueError, "`path` must end in .pt2 for format='exported_program'"),
        ({"path": 3}, TypeError, "`path` must be a str or os.PathLike, got int"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, error: type[Exception], match: str, tmp_path: Path) -> None:
    arguments = {"model": tiny_mlp(), "path": "m.pt2", "format": "exported_program"}
    arguments["example_input"] = torch.randn(2, 16)
    arguments.update(kwargs)
    if isinstance(arguments["path"], str):
        arguments["path"] = tmp_path / arguments["path"]
    with pytest.raises(error, match=match):
        export_model(**arguments)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("format", ["torchscript", "exported_program", "state_dict"])
@pytest.mark.parametrize("fold", [True, False])
def test_metric_maps_fold_on_export_unless_disabled(tmp_path: Path, format: str, fold: bool) -> None:
    torch.manual_seed(0)
    model = tiny_mlp()
    compress_(model, FixedRank(4), metric_maps=True)
    with torch.no_grad():
        for layer in (model[0], model[3]):
            layer.I_dist.add_(0.1 * torch.randn_like(layer.I_dist))
            layer.O_dist.add_(0.1 * torch.randn_like(layer.O_dist))
    x = torch.randn(3, 16)
    path = tmp_path / f"m{SUFFIX[format]}"
    rebuild = tiny_mlp if format == "state_dict" else None
    result = export_model(model, path, format, x, rebuild=rebuild, fold=fold)
    assert result.verified and result.factored_layers == 2
    assert ("folded 2 module(s)" in result.note) == fold
    assert model[0].has_metric_maps  # the user's model keeps its maps
    if format == "state_dict":
        state = torch.load(path, weights_only=True)["state_dict"]
        assert ("0.I_dist" in state) == (not fold)


def test_export_fold_must_be_a_bool(tmp_path: Path) -> None:
    model, x, _ = compressed("mlp")
    with pytest.raises(TypeError, match="`fold` must be a bool, got 'no'"):
        export_model(model, tmp_path / "m.pt2", "exported_program", x, fold="no")


def test_exported_program_of_factored_attention_and_a_joint_tie(tmp_path) -> None:
    """torch.export of a split nn.MultiheadAttention, and of a head sharing its embedding's factors."""
    from lmd_lightning import FixedRank, compress_
    from lmd_lightning.cli.exporter import export_model
    from lmd_lightning.layers import FactoredMultiheadAttention

    class TiedEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 32)
            layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 1)
            self.head = nn.Linear(32, 50, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(self.embed(tokens)))

    torch.manual_seed(0)
    model = TiedEncoder()
    compress_(model, FixedRank(8), tied="joint")
    assert isinstance(model.encoder.layers[0].self_attn, FactoredMultiheadAttention)
    assert model.head.U is model.embed.U
    result = export_model(model, tmp_path / "tied.pt2", "exported_program", torch.randint(0, 50, (2, 6)))
    assert result.verified and result.params == sum(p.numel() for p in model.parameters())
