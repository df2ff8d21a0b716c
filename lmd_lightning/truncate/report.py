"""CompressionReport: what `compress_` did to each layer, and why it left a layer dense."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["CompressionReport", "LayerReport", "count_label"]


@dataclass
class LayerReport:
    """One targeted layer. `rank` is None when the layer stays dense; `reason` then says why."""

    name: str
    kind: str  # class name before compression: Linear, Conv2d, FactoredLinear, FactoredConv2d
    shape: tuple[int, ...]  # weight shape: (out, in) or (out, in, kh, kw)
    full_rank: int  # min(out, in·kh·kw)
    rank_before: int | None  # None for a dense layer
    rank: int | None  # rank after compression; None when left dense
    params_before: int
    params_after: int
    macs_before: int  # multiply-adds per sample (convs: per output position)
    macs_after: int
    relative_error: float | None = None  # ‖W − W_r‖_F / ‖W‖_F of this truncation
    energy: float | None = None  # Σ_{i≤r} σᵢ² / Σ σᵢ²
    method: str | None = None  # "exact" or "randomized" SVD
    reason: str | None = None  # why the layer was left as it was

    @property
    def changed(self) -> bool:
        return self.rank is not None and self.rank != self.rank_before


@dataclass
class CompressionReport:
    """Per-layer results plus totals over the targeted layers and the whole model."""

    layers: list[LayerReport]
    model_params_before: int
    model_params_after: int
    policy: str
    notes: list[str] = field(default_factory=list)
    # Layer name → full singular spectrum, where the policy needed it (not part of to_dict()).
    spectra: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def macs_before(self) -> int:
        return sum(layer.macs_before for layer in self.layers)

    @property
    def macs_after(self) -> int:
        return sum(layer.macs_after for layer in self.layers)

    @property
    def compression_ratio(self) -> float:
        """Parameters before / after over the whole model."""
        return self.model_params_before / max(self.model_params_after, 1)

    @property
    def layer_ratio(self) -> float:
        """Parameters before / after over the targeted layers only."""
        return self.params_before / max(self.params_after, 1)

    @property
    def compressed(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.changed]

    @property
    def dense(self) -> list[LayerReport]:
        return [layer for layer in self.layers if not layer.changed]

    def ranks(self) -> dict[str, int]:
        """Layer name → rank, for every layer that is factored after this call."""
        return {layer.name: layer.rank for layer in self.layers if layer.rank is not None}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: plain ints, floats, strings and lists."""
        layers = [{**asdict(layer), "shape": list(layer.shape)} for layer in self.layers]
        totals = {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "compression_ratio": self.compression_ratio,
            "layer_ratio": self.layer_ratio,
        }
        return {"policy": self.policy, "layers": layers, "totals": totals, "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionReport:
        """The report back from `to_dict()` (as the callback keeps it in checkpoints), without spectra."""
        layers = [LayerReport(**{**layer, "shape": tuple(layer["shape"])}) for layer in data["layers"]]
        totals = data["totals"]
        return cls(layers, totals["model_params_before"], totals["model_params_after"], data["policy"], data["notes"])

    def __str__(self) -> str:
        header = ("layer", "kind", "shape", "rank", "params", "MACs", "rel.err", "energy", "note")
        rows = [header] + [_row(layer) for layer in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        lines.append(
            f"targeted layers: {_n(self.params_before)} → {_n(self.params_after)} params "
            f"({self.layer_ratio:.2f}×), {_n(self.macs_before)} → {_n(self.macs_after)} MACs/sample"
        )
        lines.append(
            f"whole model: {_n(self.model_params_before)} → {_n(self.model_params_after)} params "
            f"({self.compression_ratio:.2f}×); policy {self.policy}"
        )
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _n(count: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


def _row(layer: LayerReport) -> tuple[str, ...]:
    rank = "dense" if layer.rank is None else str(layer.rank)
    before = "" if layer.rank_before is None else f"{layer.rank_before}→"
    return (
        layer.name,
        layer.kind,
        "×".join(str(d) for d in layer.shape),
        f"{before}{rank}/{layer.full_rank}",
        f"{_n(layer.params_before)}→{_n(layer.params_after)}",
        f"{_n(layer.macs_before)}→{_n(layer.macs_after)}",
        "" if layer.relative_error is None else f"{layer.relative_error:.4f}",
        "" if layer.energy is None else f"{layer.energy:.4f}",
        layer.reason or "",
    )


def count_label(value: float, _: Any = None) -> str:
    """Parameter counts as figure tick labels: 1, 2 and 5 per decade as 20k, 500k, 1M; the other ticks unlabelled."""
    digits = f"{value:.0e}"
    if digits[0] not in "125":
        return ""
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:g}{unit}"
    return f"{value:g}"
