"""The reference kernels. Serve: every method, every device, every batch.

`DEQUANTIZE` decodes the layer's whole weight and runs `F.linear` (the always-correct
fallback); `DECODED` and `TUNED` run inside `decoded_weights` / `tuned_weights`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pvq.runtime.kernels.base import Kernel, needs_grad
from pvq.runtime.workspace import WORKSPACE

if TYPE_CHECKING:
    from pvq.runtime.linear import QuantizedLinear


def _dequantize_forward(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    weight = layer.dequantize()  # a fresh tensor: a backward pass may hold it
    weight = weight.to(x.device, x.dtype) if needs_grad(x) else WORKSPACE.weight_like(weight, x)
    bias = None if layer.bias is None else layer.bias.to(dtype=x.dtype, device=x.device)
    return F.linear(x, weight, bias)


#: Decode the layer's whole weight (host codec, float32), then `F.linear` in x's dtype.
DEQUANTIZE = Kernel("dequantize", lambda layer, x: True, _dequantize_forward, differentiable=True)


def _decoded_forward(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    weight = layer._decoded_weight
    if weight.dtype != x.dtype or weight.device != x.device:
        weight = layer._decoded_weight = weight.to(device=x.device, dtype=x.dtype)
    bias = None if layer.bias is None else layer.bias.to(dtype=x.dtype, device=x.device)
    return F.linear(x, weight, bias)


#: Inside `decoded_weights(model)`: the weight decoded once, kept for the block's duration.
DECODED = Kernel("decoded", lambda layer, x: getattr(layer, "_decoded_weight", None) is not None, _decoded_forward,
                 differentiable=True)


def _tuned_forward(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    return layer._tuned_weight.linear(x, layer.bias)


#: Inside `tuned_weights(model, ...)`: the weight built (differentiably) from its trainable
#: continuous arrays (`pvq.methods.TunableWeight`): what fine-tuning runs.
TUNED = Kernel("tuned", lambda layer, x: getattr(layer, "_tuned_weight", None) is not None, _tuned_forward,
               differentiable=True)
