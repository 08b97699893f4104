"""Kernels of `QuantizedLinear`: how a forward turns the stored payload and x into y.

`select_kernel(layer, x)` is the one place a kernel is chosen (by method, layout,
device, dtype and batch); the first registered kernel whose ``supports`` accepts the
call runs, and ``dequantize`` (decode the whole weight of this one layer, then
`F.linear`) is the always-correct fallback. PVQ layers in the split order run the CPU
kernels (`cpu_kernels`: fused decode-GEMV up to `gemv_max_rows(layer)` tokens, else decode into
a workspace + GEMM) or on CUDA the Triton ones (`triton_kernels`); a PVQ layout they do
not take falls back with one warning per reason. Faster kernels register themselves with
`register_kernel`; what a layer last ran is in ``layer.last_kernel``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pvq.runtime import cpu_kernels
from pvq.runtime.workspace import WORKSPACE

if TYPE_CHECKING:
    from pvq.runtime.linear import QuantizedLinear

__all__ = ["DECODED", "DEQUANTIZE", "TUNED", "KERNELS", "PVQ_CPU_DECODE_GEMM", "PVQ_CPU_GEMV", "PVQ_TRITON_DECODE_GEMM",
           "PVQ_TRITON_GEMV", "Kernel", "register_kernel", "select_kernel"]


@dataclass(frozen=True)
class Kernel:
    name: str
    supports: Callable[[QuantizedLinear, torch.Tensor], bool]
    forward: Callable[[QuantizedLinear, torch.Tensor], torch.Tensor]


def _dequantize_forward(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    weight = WORKSPACE.weight_like(layer.dequantize(), x)
    bias = None if layer.bias is None else layer.bias.to(dtype=x.dtype, device=x.device)
    return F.linear(x, weight, bias)


#: Decode the layer's whole weight (host codec, float32), then `F.linear` in x's dtype.
DEQUANTIZE = Kernel("dequantize", lambda layer, x: True, _dequantize_forward)

def _decoded_forward(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    weight = layer._decoded_weight
    if weight.dtype != x.dtype or weight.device != x.device:
        weight = layer._decoded_weight = weight.to(device=x.device, dtype=x.dtype)
    bias = None if layer.bias is None else layer.bias.to(dtype=x.dtype, device=x.device)
    return F.linear(x, weight, bias)


#: Inside `decoded_weights(model)`: the weight decoded once, kept for the block's duration.
DECODED = Kernel("decoded", lambda layer, x: getattr(layer, "_decoded_weight", None) is not None, _decoded_forward)


def _tuned_forward(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    weight = layer._tuned_weight().to(x.dtype)
    return F.linear(x, weight, None if layer.bias is None else layer.bias.to(x.dtype))


#: Inside `tuned_weights(model, ...)`: the weight built (differentiably) from its trainable
#: continuous arrays (`pvq.methods.TunableWeight`): what fine-tuning runs.
TUNED = Kernel("tuned", lambda layer, x: getattr(layer, "_tuned_weight", None) is not None, _tuned_forward)

def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


_WARNED: set[str] = set()


def _served(refusal: str | None, kernels: str) -> bool:
    """True when `refusal` is None; else warn once per reason (the reference decode runs)."""
    if refusal is None:
        return True
    if refusal not in _WARNED:
        _WARNED.add(refusal)
        warnings.warn(f"pvq: {kernels} do not serve layers with {refusal}; using the slower reference decode",
                      stacklevel=5)
    return False


def _cpu_supports(layer: "QuantizedLinear", x: torch.Tensor) -> bool:
    if (layer.method not in cpu_kernels.CPU_METHODS or x.device.type != "cpu" or layer.codes.device.type != "cpu"
            or not x.is_floating_point()):
        return False
    return _served(cpu_kernels.refusal(layer), "the CPU kernels")


def _cpu_gemv_supports(layer: "QuantizedLinear", x: torch.Tensor) -> bool:
    return _rows(x) <= cpu_kernels.gemv_max_rows(layer) and _cpu_supports(layer, x)


def _cpu_gemm_supports(layer: "QuantizedLinear", x: torch.Tensor) -> bool:
    return _rows(x) > cpu_kernels.gemv_max_rows(layer) and _cpu_supports(layer, x)


#: PVQ, RTN and GPTQ on the CPU, few tokens: fused decode + multiply per output row, no whole weight built.
PVQ_CPU_GEMV = Kernel("pvq-cpu-gemv", _cpu_gemv_supports, cpu_kernels.forward_gemv)
#: PVQ, RTN and GPTQ on the CPU, many tokens: threaded decode into one reusable workspace, then `F.linear`.
PVQ_CPU_DECODE_GEMM = Kernel("pvq-cpu-decode-gemm", _cpu_gemm_supports, cpu_kernels.forward_decode_gemm)

def cpu_kernel_for(layer: "QuantizedLinear", x: torch.Tensor) -> Kernel | None:
    """The CPU kernel for this call when the layer is served by them (decided once per layer
    and payload device, then only the input and the row count are looked at), else None:
    `select_kernel` decides (and `QuantizedLinear._check_input` names a bad input)."""
    if x.device.type != "cpu" or x.ndim == 0 or x.shape[-1] != layer.in_features or not x.is_floating_point():
        return None
    if layer._tuned_weight is not None or layer._decoded_weight is not None:
        return None
    device = layer._buffers[next(iter(layer.payload_spec))].device
    got = layer.__dict__.get("_cpu_choice")
    if got is None or got[0] != device:
        served = (device.type == "cpu" and layer.method in cpu_kernels.CPU_METHODS
                  and cpu_kernels.refusal(layer) is None)
        got = layer._cpu_choice = (device, served, cpu_kernels.gemv_max_rows(layer))
    if not got[1]:
        return None
    return PVQ_CPU_GEMV if x.numel() // layer.in_features <= got[2] else PVQ_CPU_DECODE_GEMM


def _triton_supports(layer: "QuantizedLinear", x: torch.Tensor) -> bool:
    """CUDA input and layer, Triton importable, a layout the Triton decoder takes (else one warning)."""
    if layer.method != "pvq" or x.device.type != "cuda" or layer.codes.device != x.device or not x.is_floating_point():
        return False
    try:
        from pvq.runtime import triton_kernels
    except ImportError:
        return _served("Triton not installed (pip install triton)", "the GPU kernels")
    return _served(triton_kernels.triton_refusal(layer), "the GPU kernels")


def _triton_gemv(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    from pvq.runtime.triton_kernels import triton_gemv

    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
    out = triton_gemv(layer, x2)
    if layer.bias is not None:
        out += layer.bias.to(torch.float32)
    return out.reshape(*x.shape[:-1], layer.out_features).to(x.dtype)


def _triton_decode_gemm(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    from pvq.runtime.triton_kernels import triton_decode

    weight = WORKSPACE.device_buffer(layer.out_features * layer.in_features, x.device)
    weight = triton_decode(layer, weight.view(layer.out_features, layer.in_features))
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, WORKSPACE.weight_like(weight, x), bias)


#: Token rows up to which the Triton GEMV runs (not measured: no GPU was available).
TRITON_GEMV_MAX_ROWS = 16
#: PVQ on CUDA, few tokens: the fused Triton decode-GEMV.
PVQ_TRITON_GEMV = Kernel("pvq-triton-gemv",
                         lambda layer, x: _rows(x) <= TRITON_GEMV_MAX_ROWS and _triton_supports(layer, x),
                         _triton_gemv)
#: PVQ on CUDA, many tokens: Triton decode into a workspace, then `F.linear`.
PVQ_TRITON_DECODE_GEMM = Kernel("pvq-triton-decode-gemm",
                                lambda layer, x: _rows(x) > TRITON_GEMV_MAX_ROWS and _triton_supports(layer, x),
                                _triton_decode_gemm)

#: Registered kernels, tried in order before the fallback.
KERNELS: list[Kernel] = [TUNED, DECODED, PVQ_CPU_GEMV, PVQ_CPU_DECODE_GEMM, PVQ_TRITON_GEMV, PVQ_TRITON_DECODE_GEMM]


def register_kernel(kernel: Kernel, *, first: bool = False) -> None:
    """Add a kernel (tried before the ones registered earlier when `first`)."""
    if any(k.name == kernel.name for k in KERNELS):
        raise ValueError(f"a kernel named {kernel.name!r} is already registered")
    KERNELS.insert(0, kernel) if first else KERNELS.append(kernel)


def select_kernel(layer: QuantizedLinear, x: torch.Tensor) -> Kernel:
    for kernel in KERNELS:
        if kernel.supports(layer, x):
            return kernel
    return DEQUANTIZE
