"""Per-architecture adapters: where things are inside a causal LM, as data.

An adapter names, for one family of Hugging Face causal LMs, the module paths the
layer-by-layer quantizer needs:

- `blocks`: the `nn.ModuleList` of decoder blocks (quantized one at a time);
- `pre_block`: the modules that must sit on the compute device to produce the first
  block's inputs (the token embedding and, for RoPE models, the rotary embedding);
- `embedding`, `final_norm`, `head`: kept in floating point (not quantized);
- `sequential`: the linear layers of one block, relative to the block, in groups. Groups
  are quantized in order; the layers inside a group see the same input and are quantized
  from the same Hessian pass, and each later group's inputs are recomputed through the
  already-quantized earlier groups.

Adding an architecture is adding one `ArchitectureAdapter` value to `ADAPTERS`.
"""

from __future__ import annotations

from pvq.errors import PVQError

from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedArchitectureError(PVQError, ValueError):
    """The model's architecture has no adapter (or does not look like its adapter says)."""


@dataclass(frozen=True)
class ArchitectureAdapter:
    name: str
    model_types: tuple[str, ...]
    blocks: str
    pre_block: tuple[str, ...]
    embedding: str
    final_norm: str
    head: str
    sequential: tuple[tuple[str, ...], ...]

    # -- lookups ---------------------------------------------------------------------------
    @property
    def linear_names(self) -> tuple[str, ...]:
        """All quantized linears of a block, relative to the block, in quantization order."""
        return tuple(name for group in self.sequential for name in group)

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks}.{index}"

    def layer_name(self, block_index: int, linear: str) -> str:
        """Full module name of one linear, e.g. `model.layers.3.self_attn.q_proj`."""
        return f"{self.blocks}.{block_index}.{linear}"

    def quantized_layer_names(self, model: nn.Module) -> list[str]:
        n = len(self.get_blocks(model))
        return [self.layer_name(i, lin) for i in range(n) for lin in self.linear_names]

    def validate(self, model: nn.Module) -> None:
        """Raise UnsupportedArchitectureError if the model lacks a module this adapter names."""
        missing = []
        for path in (self.blocks, *self.pre_block, self.embedding, self.final_norm, self.head):
            try:
                model.get_submodule(path)
            except AttributeError:
                missing.append(path)
        if missing:
            raise UnsupportedArchitectureError(
                f"model {type(model).__name__} does not have the modules the {self.name!r} adapter expects: "
                f"{', '.join(missing)}"
            )
        blocks = self.get_blocks(model)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise UnsupportedArchitectureError(f"{self.blocks} is not a non-empty ModuleList of decoder blocks")
        for lin in self.linear_names:
            try:
                mod = blocks[0].get_submodule(lin)
            except AttributeError:
                raise UnsupportedArchitectureError(
                    f"decoder block {self.block_prefix(0)} has no module {lin!r} (adapter {self.name!r})"
                ) from None
            if not isinstance(mod, nn.Linear):
                raise UnsupportedArchitectureError(
                    f"{self.block_prefix(0)}.{lin} is {type(mod).__name__}, not nn.Linear (adapter {self.name!r})"
                )


LLAMA = ArchitectureAdapter(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    blocks="model.layers",
    pre_block=("model.embed_tokens", "model.rotary_emb"),
    embedding="model.embed_tokens",
    final_norm="model.norm",
    head="lm_head",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

ADAPTERS: dict[str, ArchitectureAdapter] = {mt: a for a in (LLAMA,) for mt in a.model_types}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for `model` (by `model.config.model_type`), checked against the model."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"unsupported architecture: model_type {model_type!r} ({type(model).__name__}); "
            f"supported model types: {', '.join(supported_model_types())}"
        )
    adapter = ADAPTERS[model_type]
    adapter.validate(model)
    return adapter


def tiny_llama(
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 256,
    max_positions: int = 512,
    tie_embeddings: bool = True,
    init_std: float = 0.02,
    dtype: torch.dtype = torch.float32,
):
    """A small random LlamaForCausalLM for tests, identical for identical arguments.

    The global torch RNG is left untouched (the weights are drawn inside `fork_rng`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        initializer_range=init_std,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.to(dtype)
    model.eval()
    return model
