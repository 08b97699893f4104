"""Model access: loading (hub id, local directory, .gguf, demo alias) and per-architecture
adapters describing where the decoder blocks and their linear layers are."""

from .adapters import (
    ADAPTERS,
    GEMMA,
    LLAMA,
    MIXTRAL,
    PHI3,
    QWEN2_MOE,
    ArchitectureAdapter,
    MoELayout,
    RotationLayout,
    UnsupportedArchitectureError,
    adapter_for,
    supported_model_types,
    tiny_llama,
)
from .loading import DEMO_MODELS, ModelLoadError, demo_model_path, load_model, resolve_spec, start_token_id

__all__ = [
    "ADAPTERS",
    "DEMO_MODELS",
    "GEMMA",
    "LLAMA",
    "MIXTRAL",
    "PHI3",
    "QWEN2_MOE",
    "ArchitectureAdapter",
    "MoELayout",
    "RotationLayout",
    "ModelLoadError",
    "UnsupportedArchitectureError",
    "adapter_for",
    "demo_model_path",
    "load_model",
    "resolve_spec",
    "start_token_id",
    "supported_model_types",
    "tiny_llama",
]
