"""Quantized layers and the kernels that run them: `QuantizedLinear` and the quantized
embedding and head (built empty from their method's payload spec, so a layer's
`state_dict` is what a checkpoint stores), the kernel registry (`kernels`: one kernel
chosen per layer), the CPU kernels (C, numba), the Triton kernels and the compute layouts.
Nothing here reads or writes files: that is `pvq.checkpoint`.
"""

from pvq.runtime.errors import (
    CheckpointActQuantError,
    CheckpointError,
    CheckpointIntegrityError,
    CheckpointRotationError,
    CheckpointVersionError,
    LayerCodecError,
    LayerDecodeError,
    LayerInputError,
)
from pvq.runtime.kernels import KERNELS, Kernel, register_kernel, select_kernel
from pvq.runtime.linear import decoded_weights, tuned_weights
from pvq.runtime.linear import QuantizedLinear, replace_linear

__all__ = [
    "KERNELS",
    "CheckpointActQuantError",
    "CheckpointError",
    "CheckpointIntegrityError",
    "CheckpointRotationError",
    "CheckpointVersionError",
    "Kernel",
    "LayerCodecError",
    "LayerDecodeError",
    "LayerInputError",
    "QuantizedLinear",
    "decoded_weights",
    "register_kernel",
    "replace_linear",
    "select_kernel",
    "tuned_weights",
]
