"""pvq checkpoints: Hugging Face model directories that ``transformers`` loads after
``import pvq``. `index` (the integrity index and the format's constants), `hf` (the
transformers quantizer and the quantization_config), `store` (save and load),
`load_checks` (the loading contract every route runs), `legacy` and `reencode` (pvq 0.1
checkpoints and old code orders, converted once). The layers they fill, and the errors
both raise (`CheckpointError`, ...), are `pvq.runtime`'s.

    model = quantized_model(model, quantized, method, config)   # in memory, after the pipeline
    save_checkpoint(model, path, tokenizer=..., max_shard_size=...)
    model, tokenizer, info = load_checkpoint(path, device=..., dtype=...)
    verify_checkpoint(path); convert_legacy(old, new)
"""

from pvq.checkpoint.hf import PVQHfQuantizer, PVQQuantizationConfig, dense_state_dict, quantized_model, register_with_transformers
from pvq.checkpoint.index import FORMAT_VERSION, QUANT_METHOD
from pvq.checkpoint.legacy import convert_legacy
from pvq.checkpoint.store import check_destination, checkpoint_stats, is_checkpoint, load_checkpoint, save_checkpoint, shard_size_bytes
from pvq.checkpoint.index import FORMAT, INDEX_FILE, REPORT_FILE, is_legacy_checkpoint, read_index, verify_checkpoint

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "QUANT_METHOD",
    "REPORT_FILE",
    "PVQHfQuantizer",
    "PVQQuantizationConfig",
    "check_destination",
    "checkpoint_stats",
    "convert_legacy",
    "dense_state_dict",
    "is_checkpoint",
    "is_legacy_checkpoint",
    "load_checkpoint",
    "quantized_model",
    "read_index",
    "register_with_transformers",
    "save_checkpoint",
    "shard_size_bytes",
    "verify_checkpoint",
]
