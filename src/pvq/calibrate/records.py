"""What the sequential quantization reports: `LayerReport` per layer, `QuantizeResult` per
run, `PipelineError` for input it cannot work with, `jsonable` for what goes into JSON."""

from __future__ import annotations

from pvq.errors import PVQError
import dataclasses
import json
from dataclasses import dataclass
from typing import Any


class PipelineError(PVQError, RuntimeError):
    """Settings or model state the pipeline cannot work with."""


@dataclass
class LayerReport:
    name: str  # full module name, e.g. model.layers.3.mlp.down_proj
    block: int
    group: int
    shape: tuple[int, int]
    proxy_loss: float | None
    bits_per_weight: float
    seconds: float  # quantize + dequantize time of this layer
    resumed: bool = False  # loaded from the work directory instead of computed
    tokens: int | None = None  # calibration token vectors routed to the layer (None: no Hessian)
    force_routed: bool = False  # an expert whose Hessian came from every token of its block (too few routed)
    expert: int | None = None  # the expert the layer belongs to (mixture-of-experts blocks)


class QuantizeResult(dict):
    """{full layer name: QuantizedTensor}, in quantization order, with the per-layer
    `report` (list of LayerReport), `block_seconds` (per block; None for resumed blocks)
    and `resumed_blocks` (how many blocks came from the work directory)."""

    def __init__(self) -> None:
        super().__init__()
        self.report: list[LayerReport] = []
        self.block_seconds: list[float | None] = []
        self.resumed_blocks: int = 0

    @property
    def measured_bits_per_weight(self) -> float:
        """Bytes stored for all the quantized layers x 8 / their weight count."""
        weights = sum(qt.shape[0] * qt.shape[1] for qt in self.values())
        return sum(qt.stored_bytes for qt in self.values()) * 8 / weights

    def experts_summary(self) -> dict[str, Any] | None:
        """Per expert (block, index): the calibration tokens the router sent it and whether its
        Hessians were force-routed; None for a model without experts."""
        experts: dict[str, dict[str, Any]] = {}
        for r in self.report:
            if r.expert is not None:
                key = r.name.rsplit(".", 1)[0]  # model.layers.3.mlp.experts.5
                entry = experts.setdefault(key, {"block": r.block, "expert": r.expert, "tokens": r.tokens,
                                                 "force_routed": False})
                entry["force_routed"] |= r.force_routed
        if not experts:
            return None
        tokens = [e["tokens"] for e in experts.values() if e["tokens"] is not None]
        return {"experts": len(experts), "min_tokens": min(tokens, default=None), "max_tokens": max(tokens, default=None),
                "force_routed": sorted(k for k, e in experts.items() if e["force_routed"]), "per_expert": experts}

    @property
    def mean_proxy_loss(self) -> float | None:
        """Mean of the layers' proxy losses (None when no layer has one: no Hessian)."""
        losses = [r.proxy_loss for r in self.report if r.proxy_loss is not None]
        return sum(losses) / len(losses) if losses else None


def jsonable(obj) -> Any:
    """A JSON-safe copy (dataclasses as dicts, unknown objects as strings, sorted keys)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    return json.loads(json.dumps(obj, sort_keys=True, default=str))
