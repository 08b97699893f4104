"""The CPU kernels. Serve: PVQ (split code order, every gain format), RTN and GPTQ
(4- and 8-bit in C or numba, other widths in numba), on CPU tensors.

A layer is served or not once per payload device (`cpu_kernel_for`); each call then only
chooses the fused decode-GEMV (few tokens) or decode into the workspace + GEMM (many).
The implementations are `pvq.runtime.cpu_kernels`, `pvq_fast`, `grid_fast`, `c_kernels`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pvq.runtime import cpu_kernels
from pvq.runtime.kernels.base import Kernel, _rows, _served, needs_grad

if TYPE_CHECKING:
    from pvq.runtime.linear import QuantizedLinear


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
    if needs_grad(x):  # they decode into a reused workspace: a backward pass would read the wrong weight
        return None
    device = layer._buffers[next(iter(layer.payload_spec))].device
    got = layer.__dict__.get("_cpu_choice")
    if got is None or got[0] != device:
        got = layer._cpu_choice = (device, cpu_kernels.serves(layer, device), cpu_kernels.gemv_max_rows(layer))
    if not got[1]:
        return None
    return PVQ_CPU_GEMV if x.numel() // layer.in_features <= got[2] else PVQ_CPU_DECODE_GEMM
