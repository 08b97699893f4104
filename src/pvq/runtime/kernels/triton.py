"""The Triton kernels. Serve: PVQ layers on CUDA in the split code order, where Triton is
installed (else one warning, and the reference kernel runs). The implementations are
`pvq.runtime.triton_kernels`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pvq.runtime.kernels.base import Kernel, _rows, _served
from pvq.runtime.workspace import WORKSPACE

if TYPE_CHECKING:
    from pvq.runtime.linear import QuantizedLinear


def triton_refusal_of(layer: "QuantizedLinear", device: torch.device) -> str | None:
    """Why the Triton kernels do not serve this layer on `device` (None: they do), decided once
    per layer and device: the layout checks and the import are not repeated on every call (a
    layer's layout never changes; a new payload keeps it)."""
    got = layer.__dict__.get("_triton_choice")
    if got is None or got[0] != device:
        try:
            from pvq.runtime import triton_kernels
        except ImportError:
            why = "Triton not installed (pip install triton)"
        else:
            why = triton_kernels.triton_refusal(layer)
        got = layer._triton_choice = (device, why)
    return got[1]


def _triton_supports(layer: "QuantizedLinear", x: torch.Tensor) -> bool:
    """CUDA input and layer, Triton importable, a layout the Triton decoder takes (else one warning)."""
    if layer.method != "pvq" or x.device.type != "cuda" or layer.codes.device != x.device or not x.is_floating_point():
        return False
    return _served(triton_refusal_of(layer, x.device), "the GPU kernels")


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
