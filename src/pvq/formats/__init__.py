"""pvq models as standard artifacts: quantized layers that own their packed data, Hugging
Face directories that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

    model = quantized_model(model, quantized, method, config)   # in memory, after the pipeline
    save_checkpoint(model, path, tokenizer=..., max_shard_size=...)
    model, tokenizer, info = load_checkpoint(path, device=..., dtype=...)
    verify_checkpoint(path); convert_legacy(old, new)
"""

from .checkpoint import (
    FORMAT,
    INDEX_FILE,
    REPORT_FILE,
    check_destination,
    checkpoint_stats,
    is_checkpoint,
    is_legacy_checkpoint,
    load_checkpoint,
    read_index,
    save_checkpoint,
    shard_size_bytes,
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
from .hf import (
    FORMAT_VERSION,
    QUANT_METHOD,
    PVQHfQuantizer,
    PVQQuantizationConfig,
    dense_state_dict,
    quantized_model,
    register_with_transformers,
)
from .kernels import KERNELS, Kernel, decoded_weights, register_kernel, select_kernel, tuned_weights
from .legacy import convert_legacy
from .linear import QuantizedLinear, replace_linear

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "KERNELS",
    "QUANT_METHOD",
    "REPORT_FILE",
    "CheckpointActQuantError",
    "CheckpointError",
    "CheckpointIntegrityError",
    "CheckpointRotationError",
    "CheckpointVersionError",
    "Kernel",
    "LayerCodecError",
    "LayerDecodeError",
    "PVQHfQuantizer",
    "PVQQuantizationConfig",
    "QuantizedLinear",
    "check_destination",
    "checkpoint_stats",
    "convert_legacy",
    "decoded_weights",
    "dense_state_dict",
    "is_checkpoint",
    "is_legacy_checkpoint",
    "load_checkpoint",
    "quantized_model",
    "read_index",
    "register_kernel",
    "register_with_transformers",
    "replace_linear",
    "save_checkpoint",
    "select_kernel",
    "shard_size_bytes",
    "tuned_weights",
    "verify_checkpoint",
]
