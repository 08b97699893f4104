"""Kernels of `QuantizedLinear`: how a forward turns the stored payload and x into y.

`select_kernel(layer, x)` is the one place a kernel is chosen (by method, layout,
device, dtype and batch); the first registered kernel whose ``supports`` accepts the
call runs, and ``dequantize`` (decode the whole weight of this one layer, then
`F.linear`) is the always-correct fallback. Faster kernels register themselves with
`register_kernel`; what a layer last ran is in ``layer.last_kernel``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .linear import QuantizedLinear

__all__ = ["DECODED", "DEQUANTIZE", "KERNELS", "Kernel", "decoded_weights", "register_kernel", "select_kernel"]


@dataclass(frozen=True)
class Kernel:
    name: str
    supports: Callable[["QuantizedLinear", torch.Tensor], bool]
    forward: Callable[["QuantizedLinear", torch.Tensor], torch.Tensor]


class _Workspace:
    """One reusable weight buffer per (device, dtype), grown to the largest layer seen:
    a decoded weight that must change dtype or device lands here instead of in a fresh
    allocation, so a model holds at most one decoded layer per (device, dtype)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def weight_like(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if weight.dtype == x.dtype and weight.device == x.device:
            return weight
        key = (str(x.device), x.dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < weight.numel():
            buf = torch.empty(weight.numel(), dtype=x.dtype, device=x.device)
            self._buffers[key] = buf
        out = buf[: weight.numel()].view(weight.shape)
        out.copy_(weight)
        return out


WORKSPACE = _Workspace()


def _dequantize_forward(layer: "QuantizedLinear", x: torch.Tensor) -> torch.Tensor:
    weight = WORKSPACE.weight_like(layer.dequantize(), x)
    bias = None if layer.bias is None else layer.bias.to(dtype=x.dtype, device=x.device)
    return F.linear(x, weight, bias)


#: Decode the layer's whole weight (host codec, float32), then `F.linear` in x's dtype.
DEQUANTIZE = Kernel("dequantize", lambda layer, x: True, _dequantize_forward)

def _decoded_forward(layer: "QuantizedLinear", x: torch.Tensor) -> torch.Tensor:
    weight = layer._decoded_weight
    if weight.dtype != x.dtype or weight.device != x.device:
        weight = layer._decoded_weight = weight.to(device=x.device, dtype=x.dtype)
    bias = None if layer.bias is None else layer.bias.to(dtype=x.dtype, device=x.device)
    return F.linear(x, weight, bias)


#: Inside `decoded_weights(model)`: the weight decoded once, kept for the block's duration.
DECODED = Kernel("decoded", lambda layer, x: getattr(layer, "_decoded_weight", None) is not None, _decoded_forward)

#: Registered kernels, tried in order before the fallback.
KERNELS: list[Kernel] = [DECODED]


@contextlib.contextmanager
def decoded_weights(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Decode every quantized layer of `model` once and keep the float weights until the
    block ends: for evaluation loops that run many forwards (perplexity, tasks, sweeps),
    at the memory cost of the float model. Outside it the model holds packed data only."""
    from .linear import QuantizedLinear

    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    try:
        for layer in layers:
            layer._decoded_weight = layer.dequantize()
        yield model
    finally:
        for layer in layers:
            layer._decoded_weight = None


def register_kernel(kernel: Kernel, *, first: bool = False) -> None:
    """Add a kernel (tried before the ones registered earlier when `first`)."""
    if any(k.name == kernel.name for k in KERNELS):
        raise ValueError(f"a kernel named {kernel.name!r} is already registered")
    KERNELS.insert(0, kernel) if first else KERNELS.append(kernel)


def select_kernel(layer: "QuantizedLinear", x: torch.Tensor) -> Kernel:
    for kernel in KERNELS:
        if kernel.supports(layer, x):
            return kernel
    return DEQUANTIZE
