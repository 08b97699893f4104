"""Packed checkpoints (safetensors + JSON manifest) and the `PVQLinear` module that runs them.

    save_checkpoint(path, model, quantized, tokenizer=..., source=..., settings=..., report=...)
    model, tokenizer, manifest = load_checkpoint(path, mode="load" | "fly", device=..., dtype=...)
"""

from .checkpoint import (
    DENSE_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    is_checkpoint,
    load_checkpoint,
    load_quantized,
    read_manifest,
    save_checkpoint,
    verify_checkpoint,
)
from .errors import (
    CheckpointActQuantError,
    CheckpointError,
    CheckpointIntegrityError,
    CheckpointRotationError,
    CheckpointVersionError,
    LayerCodecError,
    LayerDecodeError,
)
from .modules import MODES, PVQLinear, dequantize_layer

__all__ = [
    "DENSE_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MODES",
    "CheckpointActQuantError",
    "CheckpointError",
    "CheckpointIntegrityError",
    "CheckpointRotationError",
    "CheckpointVersionError",
    "LayerCodecError",
    "LayerDecodeError",
    "PVQLinear",
    "dequantize_layer",
    "is_checkpoint",
    "load_checkpoint",
    "load_quantized",
    "read_manifest",
    "save_checkpoint",
    "verify_checkpoint",
]
