"""The kernel registry of `QuantizedLinear`: how a forward turns the stored payload and x
into y. One file per kernel family declares what it serves (`reference`, `cpu`, `triton`);
`base` says what a kernel is.

`select_kernel(layer, x)` is the one place a kernel is chosen (by method, layout,
device, dtype and batch); the first registered kernel whose ``supports`` accepts the
call runs, and ``dequantize`` (decode the whole weight of this one layer, then
`F.linear`) is the always-correct fallback. PVQ layers in the split order run the CPU
kernels (`cpu_kernels`: fused decode-GEMV up to `gemv_max_rows(layer)` tokens, else decode into
a workspace + GEMM) or on CUDA the Triton ones (`triton_kernels`); a PVQ layout they do
not take falls back with one warning per reason. Faster kernels register themselves with
`register_kernel`; what a layer last ran is in ``layer.last_kernel``. While a
gradient must reach x, only kernels declared differentiable run (the reference ones).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pvq.runtime.kernels.base import Kernel, needs_grad
from pvq.runtime.kernels.cpu import PVQ_CPU_DECODE_GEMM, PVQ_CPU_GEMV, cpu_kernel_for
from pvq.runtime.kernels.reference import DECODED, DEQUANTIZE, TUNED
from pvq.runtime.kernels.triton import PVQ_TRITON_DECODE_GEMM, PVQ_TRITON_GEMV

if TYPE_CHECKING:
    from pvq.runtime.linear import QuantizedLinear

__all__ = ["DECODED", "DEQUANTIZE", "TUNED", "KERNELS", "PVQ_CPU_DECODE_GEMM", "PVQ_CPU_GEMV", "PVQ_TRITON_DECODE_GEMM",
           "PVQ_TRITON_GEMV", "Kernel", "cpu_kernel_for", "register_kernel", "select_kernel"]


#: Registered kernels, tried in order before the fallback.
KERNELS: list[Kernel] = [TUNED, DECODED, PVQ_CPU_GEMV, PVQ_CPU_DECODE_GEMM, PVQ_TRITON_GEMV, PVQ_TRITON_DECODE_GEMM]


def register_kernel(kernel: Kernel, *, first: bool = False) -> None:
    """Add a kernel (tried before the ones registered earlier when `first`)."""
    if any(k.name == kernel.name for k in KERNELS):
        raise ValueError(f"a kernel named {kernel.name!r} is already registered")
    KERNELS.insert(0, kernel) if first else KERNELS.append(kernel)


def select_kernel(layer: QuantizedLinear, x: torch.Tensor) -> Kernel:
    grad = needs_grad(x)
    for kernel in KERNELS:
        if (kernel.differentiable or not grad) and kernel.supports(layer, x):
            return kernel
    return DEQUANTIZE
