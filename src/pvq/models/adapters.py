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

- `block_kind`: the (dotted) block attribute that says which kind of layer a block is when kinds
  are called with different arguments (Gemma's sliding vs full attention: another mask,
  another rotary embedding); the pipeline captures the arguments of each kind;
- `rotation`: where the fused rotation acts inside a block (`RotationLayout`), or
  `rotation_refusal`: why this family cannot be rotated (named in the error);
- `moe`: where a mixture-of-experts block keeps its experts (`MoELayout`); its blocks'
  MLP groups are the experts' (and a shared expert's) linears instead of `sequential`'s,
  and `prepare` unfuses transformers' fused experts into one linear per expert.

Adding an architecture is adding one `ArchitectureAdapter` value to `ADAPTERS` (and its
tests: a tiny model from its config through quantize, save, load and rotation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pvq.errors import PVQError

from .moe import UnfusedExperts, num_experts, unfuse_experts


class UnsupportedArchitectureError(PVQError, ValueError):
    """The model's architecture has no adapter (or does not look like its adapter says)."""


@dataclass(frozen=True)
class RotationLayout:
    """Where the fused rotation acts inside one decoder block (paths relative to the block)."""

    input_norm: str
    attn_inputs: tuple[str, ...]  # read the input_norm output
    value: str  # rotated per KV head on its output side
    attn_output: str  # writes to the residual; rotated per attention head on its input side
    post_norm: str
    mlp_inputs: tuple[str, ...]  # read the post_norm output
    mlp_output: str  # writes to the residual; gets the online transform on its input


@dataclass(frozen=True)
class MoELayout:
    """Where a mixture-of-experts block keeps its experts (paths relative to the block).

    A block with experts at `experts` replaces the MLP groups of `sequential` (those from
    index `mlp_from` on) with, group k: `shared[k]` and every expert's `expert_groups[k]`;
    a block without (Qwen2-MoE's `mlp_only_layers`) keeps `sequential`. The router
    (`router`, not an nn.Linear) stays float."""

    experts: str
    router: str
    mlp_from: int
    expert_groups: tuple[tuple[str, ...], ...] = (("gate_up_proj",), ("down_proj",))
    shared: tuple[tuple[str, ...], ...] = ((), ())


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
    rotation: RotationLayout | None = None
    rotation_refusal: str | None = None  # why `rotation` is None
    block_kind: str | None = None  # dotted attribute of a block naming its kind, when kinds take other arguments
    moe: MoELayout | None = None

    # -- lookups ---------------------------------------------------------------------------
    def block_groups(self, block: nn.Module) -> tuple[tuple[str, ...], ...]:
        """The quantized linears of one block, relative to it, in quantization groups."""
        moe = self.moe
        n = None if moe is None else num_experts(block, moe.experts)
        if n is None:
            return self.sequential
        experts = tuple(
            shared + tuple(f"{moe.experts}.{e}.{lin}" for e in range(n) for lin in group)
            for shared, group in zip(moe.shared, moe.expert_groups))
        return self.sequential[:moe.mlp_from] + experts

    def block_linear_names(self, block: nn.Module) -> tuple[str, ...]:
        """All quantized linears of a block, relative to the block, in quantization order."""
        return tuple(name for group in self.block_groups(block) for name in group)

    def experts_of(self, block: nn.Module) -> UnfusedExperts | None:
        """The block's unfused experts (None: a dense block or a dense family)."""
        if self.moe is None:
            return None
        try:
            module = block.get_submodule(self.moe.experts)
        except AttributeError:
            return None
        return module if isinstance(module, UnfusedExperts) else None

    def prepare(self, model: nn.Module) -> nn.Module:
        """Make the model quantizable, in place and keeping its function: transformers' fused
        experts become one linear per expert (`pvq.models.moe`). Idempotent."""
        if self.moe is not None:
            unfuse_experts(model, self.get_blocks(model), self.moe.experts)
        return model

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks}.{index}"

    def layer_name(self, block_index: int, linear: str) -> str:
        """Full module name of one linear, e.g. `model.layers.3.self_attn.q_proj`."""
        return f"{self.blocks}.{block_index}.{linear}"

    def quantized_layer_names(self, model: nn.Module) -> list[str]:
        return [self.layer_name(i, lin) for i, block in enumerate(self.get_blocks(model))
                for lin in self.block_linear_names(block)]

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
        for i, block in enumerate(blocks):
            fused = self.moe is not None and num_experts(block, self.moe.experts) is not None \
                and self.experts_of(block) is None  # checked once `prepare` has unfused them
            for lin in self.block_linear_names(block):
                if not (fused and lin.startswith(self.moe.experts + ".")):
                    self.block_linear(block, i, lin)

    def block_linear(self, block: nn.Module, i: int, path: str) -> nn.Linear:
        """The nn.Linear at `path` of block i, else UnsupportedArchitectureError naming it."""
        try:
            mod = block.get_submodule(path)
        except AttributeError:
            raise UnsupportedArchitectureError(
                f"decoder block {self.block_prefix(i)} has no module {path!r} (adapter {self.name!r})") from None
        if not isinstance(mod, nn.Linear):
            raise UnsupportedArchitectureError(
                f"{self.block_prefix(i)}.{path} is {type(mod).__name__}, not nn.Linear (adapter {self.name!r})")
        return mod


_LLAMA_SEQUENTIAL = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_DECODER = dict(blocks="model.layers", pre_block=("model.embed_tokens", "model.rotary_emb"),
                embedding="model.embed_tokens", final_norm="model.norm", head="lm_head")

# Llama, Mistral, Qwen2/2.5 (attention biases) and Qwen3 (per-head q_norm/k_norm, applied to
# q and k after their projections: the residual rotation folded into q/k_proj's inputs and
# the per-head V/O rotation leave them as they are)
LLAMA = ArchitectureAdapter(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    sequential=_LLAMA_SEQUENTIAL,
    rotation=RotationLayout(
        input_norm="input_layernorm",
        attn_inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        value="self_attn.v_proj",
        attn_output="self_attn.o_proj",
        post_norm="post_attention_layernorm",
        mlp_inputs=("mlp.gate_proj", "mlp.up_proj"),
        mlp_output="mlp.down_proj",
    ),
    **_DECODER,
)

# Gemma 2 and Gemma 3 text: the Llama tree plus pre/post-feedforward norms, scaled
# embeddings, tied head, soft-capping (Gemma 2), and sliding-window layers whose mask (and,
# in Gemma 3, rotary embedding) differ from the full-attention layers'
GEMMA = ArchitectureAdapter(
    name="gemma",
    model_types=("gemma2", "gemma3_text"),
    sequential=_LLAMA_SEQUENTIAL,
    block_kind="self_attn.layer_type",
    rotation_refusal=(
        "its RMSNorms scale by (1 + w), and post_attention_layernorm / post_feedforward_layernorm normalise "
        "the attention and MLP outputs before the residual add, so no norm scale can be folded into a linear "
        "and a rotated residual stream would pass through a norm that does not commute with the rotation"),
    **_DECODER,
)

# Phi-3: q, k, v fused in one qkv_proj and gate, up in one gate_up_proj, quantized as stored
# (one layer each: their rows share the same input, so one Hessian serves the fused layer)
PHI3 = ArchitectureAdapter(
    name="phi3",
    model_types=("phi3",),
    sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    rotation_refusal=(
        "its value projection is fused into self_attn.qkv_proj (rows q | k | v), and the per-head V/O "
        "rotation needs v_proj as a layer of its own"),
    **_DECODER,
)

_MOE_ROTATION_REFUSAL = (
    "rotating a mixture-of-experts block is not implemented: its router (mlp.gate, a bare weight, not a "
    "linear layer) reads the residual stream and would have to be rotated with the experts' inputs, and every "
    "expert's down_proj would need its own online transform")

# Mixtral and Qwen3-MoE: the Llama attention, then top-k routed experts (transformers fuses
# them: unfused by `prepare`); every expert's gate_up_proj is quantized as stored (gate rows
# then up rows: one input, one Hessian), then every down_proj
MIXTRAL = ArchitectureAdapter(
    name="mixtral",
    model_types=("mixtral", "qwen3_moe"),
    sequential=_LLAMA_SEQUENTIAL,
    moe=MoELayout(experts="mlp.experts", router="mlp.gate", mlp_from=2),
    rotation_refusal=_MOE_ROTATION_REFUSAL,
    **_DECODER,
)

# Qwen2-MoE: the same plus a shared expert (a gated dense MLP quantized with the routed ones;
# its 1-row gate mlp.shared_expert_gate stays float) and dense blocks (mlp_only_layers)
QWEN2_MOE = ArchitectureAdapter(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    sequential=_LLAMA_SEQUENTIAL,
    moe=MoELayout(experts="mlp.experts", router="mlp.gate", mlp_from=2,
                  shared=(("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), ("mlp.shared_expert.down_proj",))),
    rotation_refusal=_MOE_ROTATION_REFUSAL,
    **_DECODER,
)

ADAPTERS: dict[str, ArchitectureAdapter] = {
    mt: a for a in (LLAMA, GEMMA, PHI3, MIXTRAL, QWEN2_MOE) for mt in a.model_types}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for_type(model_type: str | None, what: str = "") -> ArchitectureAdapter:
    """The description of a model type (from a config, before any model exists); `what`
    adds to the error, e.g. the model's class."""
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"unsupported architecture: model_type {model_type!r}{what}; supported model types: "
            f"{', '.join(supported_model_types())}")
    return ADAPTERS[model_type]


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for `model` (by `model.config.model_type`), checked against the model,
    which it prepares for quantization (fused experts unfused, in place: `prepare`)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = adapter_for_type(model_type, f" ({type(model).__name__})")
    adapter.validate(model)
    adapter.prepare(model)
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
