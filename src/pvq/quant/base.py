"""What every quantization method returns, and the proxy loss they are judged by.

A method is a pair of pure functions in its own module (`rtn.py`, `gptq.py`, `pvq.py`):
    quantize(weight, hessian, config) -> QuantizedTensor
    dequantize(qt) -> torch.Tensor (float32, shape qt.shape)
`QuantizedTensor.tensors` holds exactly what a packed checkpoint stores for the layer
(numpy arrays: bit-packed codes as uint8, scales, gains, ...) and `meta` the JSON-able
settings needed to rebuild the weight from them. Bits per weight are measured from
these stored arrays, never computed from nominal settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


class QuantizationError(ValueError):
    """Input a quantizer cannot work with: non-finite weights, mismatched shapes,
    a layer width that is not a multiple of the group size, bad settings."""


@dataclass
class QuantizedTensor:
    method: str
    shape: tuple[int, int]  # (out_features, in_features)
    tensors: dict[str, np.ndarray]
    meta: dict[str, Any]
    proxy_loss: float | None = None  # tr((W - Q) H (W - Q)^T) when a Hessian was given
    extra: dict[str, Any] = field(default_factory=dict)  # diagnostics, never stored

    @property
    def stored_bytes(self) -> int:
        return int(sum(t.nbytes for t in self.tensors.values()))

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bytes * 8 / (self.shape[0] * self.shape[1])


def check_weight(weight: torch.Tensor, hessian: torch.Tensor | None = None) -> None:
    """Raise QuantizationError for a weight/Hessian pair no method can quantize."""
    if weight.ndim != 2:
        raise QuantizationError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).nonzero()[0].tolist()
        raise QuantizationError(f"weight has non-finite values (first at row {bad[0]}, column {bad[1]})")
    if hessian is not None:
        C = weight.shape[1]
        if tuple(hessian.shape) != (C, C):
            raise QuantizationError(f"Hessian shape {tuple(hessian.shape)} does not match in_features {C}")
        if not torch.isfinite(hessian).all():
            raise QuantizationError("Hessian has non-finite values")


def proxy_loss(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """Layer-wise proxy loss tr((W - Q) H (W - Q)^T) (paper eq. 1), in float64."""
    delta = (weight - quantized).double()
    return float(torch.einsum("ij,jk,ik->", delta, hessian.double(), delta))


def as_float32(weight: torch.Tensor) -> torch.Tensor:
    """The weight as contiguous CPU float32 (a view when it already is); refuses empty layers."""
    if weight.numel() == 0:
        raise QuantizationError(f"weight is empty (shape {tuple(weight.shape)})")
    return weight.detach().to(device="cpu", dtype=torch.float32).contiguous()


def check_config(config: Any, cls: type) -> Any:
    """`config` (None = ``cls()`` defaults) as an instance of `cls`, else QuantizationError."""
    if config is None:
        return cls()
    if not isinstance(config, cls):
        raise QuantizationError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    return config


def is_int(value) -> bool:
    """An integer that is not a bool (config fields: True is not a count)."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer))


def is_number(value) -> bool:
    """An int or float that is not a bool."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))
