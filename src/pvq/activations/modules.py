"""Activation quantizers in a model: `ActQuantizer` (the module placed before each quantized
linear's input), installing and removing them, and the record a checkpoint stores to
rebuild them."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any
import torch
from torch import nn
from pvq.methods.base import is_int
from pvq.methods.input_transforms import attach_input_transform, detach_input_transform
from pvq.activations.config import ActQuantConfig, ActQuantError, QUANTIZER_ATTRIBUTE, RECORD_KIND, RECORD_VERSION, _MODEL_ATTRIBUTE, _divisors_hint
from pvq.activations.quantizers import fake_quantize


class _SharedInput:
    """One-entry cache shared by the quantizers of a model: layers fed the very same
    tensor (q/k/v, gate/up) quantize it once. Keyed on identity and version counter."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.x = None
        self.version = None
        self.config = None
        self.out = None

    def get(self, x: torch.Tensor, config: ActQuantConfig):
        if self.x is not x or self.config != config:
            return None
        try:
            if x._version != self.version:
                return None
        except RuntimeError:  # inference tensors have no version counter
            return None
        return self.out

    def put(self, x: torch.Tensor, config: ActQuantConfig, out: torch.Tensor) -> None:
        try:
            version = x._version
        except RuntimeError:
            self.clear()
            return
        self.x, self.version, self.config, self.out = x, version, config, out


class ActQuantizer(nn.Module):
    """Simulated (fake) quantization of a layer's input: ``forward(x)`` returns
    `fake_quantize(x, config)`. Holds no parameters or buffers. ``calls``, ``values`` and
    ``seconds`` count the work done (cache hits excluded)."""

    def __init__(self, config: ActQuantConfig, name: str | None = None) -> None:
        super().__init__()
        if not isinstance(config, ActQuantConfig):
            raise ActQuantError(f"config must be an ActQuantConfig, got {type(config).__name__}")
        self.config = config
        self.layer_name = name
        self.shared: _SharedInput | None = None
        self.calls = 0
        self.values = 0
        self.seconds = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            hit = self.shared.get(x, self.config)
            if hit is not None:
                return hit
        t0 = time.perf_counter()
        try:
            out = fake_quantize(x, self.config)
        except ActQuantError as e:
            where = f"input of {self.layer_name!r}" if self.layer_name else "activations"
            raise ActQuantError(f"{where}: {e}") from None
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.values += x.numel()
        if self.shared is not None:
            self.shared.put(x, self.config, out)
        return out

    def extra_repr(self) -> str:
        return f"simulated (fake) quantization: {self.config.describe()}"


def act_quant_of(model: nn.Module) -> dict[str, Any] | None:
    """The activation-quantization record of a model (JSON-ready), or None."""
    return getattr(model, _MODEL_ATTRIBUTE, None)


def _input_width(module: nn.Module, name: str) -> int:
    width = getattr(module, "in_features", None)
    if not isinstance(module, nn.Module) or not is_int(width):
        raise ActQuantError(f"{name!r} is a {type(module).__name__}, not a linear layer with in_features")
    return int(width)


def check_act_quant(model: nn.Module, config: ActQuantConfig, layer_names: Iterable[str]) -> dict[int, float]:
    """Check that every named layer exists and takes inputs the config can quantize;
    returns {input width: bits per value}. ActQuantError naming the layer and the fix."""
    if not isinstance(config, ActQuantConfig):
        raise ActQuantError(f"config must be an ActQuantConfig, got {type(config).__name__}")
    names = list(layer_names)
    if not names:
        raise ActQuantError("no layers to quantize the activations of")
    widths: dict[str, int] = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ActQuantError(f"layer {name!r} is not a module of the model") from None
        widths[name] = _input_width(module, name)
    out: dict[int, float] = {}
    for name, width in widths.items():
        if width in out:
            continue
        try:
            out[width] = config.bits_per_value(width)
        except ActQuantError as e:
            if config.group_size != -1 and width % config.group_size:
                raise ActQuantError(
                    f"activation group size {config.group_size} does not divide the input width {width} of {name!r}; "
                    f"use --act-group-size {_divisors_hint(widths.values(), config.group_size)}"
                ) from None
            raise ActQuantError(f"{name!r} (input width {width}): {e}") from None
    return out


def install_act_quant(model: nn.Module, config: ActQuantConfig, layer_names: Iterable[str]) -> dict[str, Any]:
    """Quantize the inputs of the named linears (simulated, see the module docstring);
    returns the record, also attached to the model. Install after weight quantization:
    the calibration Hessians of `pvq.calibrate` are collected from float activations
    (QuaRot does the same), and a model that already has quantizers is refused."""
    if act_quant_of(model) is not None or any(isinstance(m, ActQuantizer) for m in model.modules()):
        raise ActQuantError("the model already quantizes its activations; remove_act_quant(model) first")
    names = sorted(set(layer_names))
    bpv = check_act_quant(model, config, names)
    shared = _SharedInput()
    for name in names:
        module = model.get_submodule(name)
        quantizer = ActQuantizer(config, name)
        quantizer.shared = shared
        attach_input_transform(module, QUANTIZER_ATTRIBUTE, quantizer)
    record = {
        "kind": RECORD_KIND,
        "version": RECORD_VERSION,
        "config": config.to_dict(),
        "layers": names,
        "bits_per_value": {str(w): v for w, v in sorted(bpv.items())},
        "weights_calibrated_with": "float activations",
    }
    setattr(model, _MODEL_ATTRIBUTE, record)
    return record


def remove_act_quant(model: nn.Module) -> None:
    """Undo `install_act_quant` (the model computes with float activations again)."""
    for module in list(model.modules()):
        if isinstance(module._modules.get(QUANTIZER_ATTRIBUTE), ActQuantizer):
            detach_input_transform(module, QUANTIZER_ATTRIBUTE)
    if hasattr(model, _MODEL_ATTRIBUTE):
        delattr(model, _MODEL_ATTRIBUTE)


def install_act_quant_record(model: nn.Module, record: dict[str, Any]) -> None:
    """Rebuild the activation quantizers a record describes (e.g. from a checkpoint)."""
    if not isinstance(record, dict):
        raise ActQuantError(f"activation quantization record is a {type(record).__name__}, not an object")
    if record.get("kind") != RECORD_KIND:
        raise ActQuantError(f"unknown activation quantization kind {record.get('kind')!r} (this pvq builds {RECORD_KIND!r})")
    version = record.get("version")
    if not is_int(version) or version < 1:
        raise ActQuantError(f"activation quantization record version {version!r} is not a valid version")
    if version > RECORD_VERSION:
        raise ActQuantError(f"activation quantization record version {version} is newer than this pvq ({RECORD_VERSION}); upgrade pvq")
    layers = record.get("layers")
    if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
        raise ActQuantError("activation quantization record lacks its list of layers")
    config = ActQuantConfig.from_dict(record.get("config"))
    rebuilt = install_act_quant(model, config, layers)
    recorded = record.get("bits_per_value")
    if recorded is not None and recorded != rebuilt["bits_per_value"]:
        remove_act_quant(model)
        raise ActQuantError(f"activation quantization record says {recorded} bits per value, the rebuilt quantizers {rebuilt['bits_per_value']}")
    setattr(model, _MODEL_ATTRIBUTE, dict(record))


def act_quant_summary(record: dict[str, Any] | None) -> str | None:
    """One line describing an activation-quantization record (None: float activations)."""
    if record is None:
        return None
    config = ActQuantConfig.from_dict(record["config"])
    bpv = ", ".join(f"{v:.4f} at width {w}" for w, v in record.get("bits_per_value", {}).items())
    return (f"simulated (fake) quantization, {config.describe()}; bits/value {bpv}; inputs of "
            f"{len(record['layers'])} linear layers; weights calibrated with float activations")
