"""Every supported family, as a tiny random model built from its transformers config (no
downloads): quantize (pvq and gptq) -> save -> load gives the in-memory quantized model's
logits exactly; the fused rotation keeps the float model's function (or is refused with
the obstacle named); the pipeline calls each kind of block with its own arguments."""

from __future__ import annotations

import pytest
import torch
from conftest import printable_char_tokenizer

from pvq.checkpoint import load_checkpoint, save_checkpoint
from pvq.runtime import QuantizedLinear
from pvq.models import UnsupportedArchitectureError, adapter_for
from pvq.oneshot import Recipe, oneshot
from pvq.rotation import rotate_model

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)

FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    # a sliding window shorter than the calibration windows: its layers need their own mask
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 8, "num_hidden_layers": 3}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 8, "num_hidden_layers": 3,
                                         "layer_types": ["sliding_attention", "full_attention",
                                                         "sliding_attention"]}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    # a shared expert, and block 1 dense (mlp_only_layers)
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 64, "mlp_only_layers": [1]}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                     "head_dim": 16}),
}
MOE = {"mixtral", "qwen2_moe", "qwen3_moe"}
ROTATABLE = {"llama", "mistral", "qwen2", "qwen3"}


def tiny(family: str, seed: int = 0):
    import transformers

    config_class, extra = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**COMMON, **extra})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
        for p in model.parameters():  # norms away from their initial values, so folding them matters
            p.data.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def windows(n=4, seqlen=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (n, seqlen), generator=g)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method,config", [("pvq", {"group_size": 16, "shape_bits": 3.0, "gain": "empirical"}),
                                           ("gptq", {"bits": 4, "group_size": 32})])
def test_quantize_save_load_is_exact(family, method, config, tmp_path):
    model = tiny(family)
    adapter = adapter_for(model)
    assert model.config.model_type in adapter.model_types
    result = oneshot(model, None, Recipe(method=method, config=config, finetune=None), windows=windows(),
                     progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == len(result.quantized) == len(adapter.quantized_layer_names(model))
    blocks = adapter.get_blocks(model)
    assert len(layers) == sum(len(adapter.block_linear_names(b)) for b in blocks)
    if family in MOE:  # every expert of every MoE block is a quantized layer; the router stays float
        experts = [adapter.experts_of(b) for b in blocks]
        assert sum(len(e) * 2 for e in experts if e is not None) == sum(".experts." in n for n in result.quantized)
        assert not isinstance(blocks[0].get_submodule("mlp.gate"), QuantizedLinear)
        if family == "qwen2_moe":
            assert experts[1] is None and isinstance(blocks[1].mlp.down_proj, QuantizedLinear)
            assert isinstance(blocks[0].mlp.shared_expert.down_proj, QuantizedLinear)
    ids = windows(2, 16, seed=1)
    expected = logits(model, ids)
    assert torch.isfinite(expected).all()
    save_checkpoint(model, tmp_path / "ck", tokenizer=printable_char_tokenizer())
    loaded, _, info = load_checkpoint(tmp_path / "ck")
    assert torch.equal(logits(loaded, ids), expected)
    assert info["quantization_config"]["method"] == method


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rotation_keeps_the_function_or_names_the_obstacle(family):
    model = tiny(family)
    ids = windows(2, 16, seed=2)
    before = logits(model, ids)
    if family not in ROTATABLE:
        with pytest.raises(UnsupportedArchitectureError,
                           match="cannot rotate .*(1 \\+ w|fused into self_attn.qkv_proj|router .* reads the residual)"):
            rotate_model(model, seed=0)
        return
    rotate_model(model, seed=0)
    after = logits(model, ids)
    assert float((after - before).norm() / before.norm()) < 1e-4


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_each_block_kind_gets_its_own_arguments(family):
    """Quantizing with a grid so fine that the weights barely move must track the float
    model: with block 0's sliding-window mask reused for the full-attention layer (the old
    capture), the replayed blocks would compute another function."""
    from pvq.calibrate.capture import block_kinds, capture_block_inputs

    model = tiny(family)
    adapter = adapter_for(model)
    kinds = block_kinds(adapter, adapter.get_blocks(model))
    assert len(set(kinds)) == 2
    hidden, arguments = capture_block_inputs(model, adapter, windows(), 2, torch.device("cpu"), torch.float32)
    assert set(arguments[0].by_kind) == set(kinds)
    # replaying the float blocks with the captured arguments reproduces the model's own last hidden state
    with torch.no_grad():
        h = hidden[:2]
        for block in adapter.get_blocks(model):
            out = block(h, **arguments[0].for_block(block))
            h = out[0] if isinstance(out, tuple) else out
        reference = model.model(input_ids=windows()[:2]).last_hidden_state
    assert torch.allclose(model.model.norm(h), reference, atol=1e-5)


def _never_route_to(router, expert: int):
    """Make a top-k router (Mixtral / Qwen-MoE) never choose `expert` (its logit set to -inf)."""
    def forward(hidden_states):
        logits = torch.nn.functional.linear(hidden_states.reshape(-1, router.hidden_dim), router.weight)
        logits[:, expert] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        top, index = torch.topk(probs, router.top_k, dim=-1)
        top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), index
    router.forward = forward


@pytest.mark.parametrize("family", sorted(MOE))
def test_an_expert_no_token_reaches_is_quantized_and_reported(family):
    """Expert 3 of block 0 gets no calibration token: it is force-routed for its Hessians
    (fewer routed tokens than the hidden size), quantized with finite values, and reported;
    the experts the router serves keep Hessians of their own tokens."""
    model = tiny(family)
    adapter = adapter_for(model)
    blocks = adapter.get_blocks(model)
    _never_route_to(blocks[0].mlp.gate, 3)
    calibration = windows(16, 32)  # 512 tokens: about 256 per served expert, above the hidden size (64)
    result = oneshot(model, None, Recipe(method="gptq", config={"bits": 4, "group_size": 32}, finetune=None),
                     windows=calibration, progress=False)
    summary = result.quantized.experts_summary()
    starved = "model.layers.0.mlp.experts.3"
    assert summary["per_expert"][starved]["tokens"] == 0
    assert summary["force_routed"] == [starved]
    assert summary["experts"] == sum(len(e) for b in blocks if (e := adapter.experts_of(b)) is not None)
    for lin in ("gate_up_proj", "down_proj"):
        layer = model.get_submodule(f"{starved}.{lin}")
        assert isinstance(layer, QuantizedLinear)
        weight = layer.dequantize()
        assert torch.isfinite(weight).all() and weight.abs().sum() > 0
        reports = [r for r in result.quantized.report if r.name == f"{starved}.{lin}"]
        assert reports[0].force_routed and reports[0].tokens == 0 and torch.isfinite(torch.tensor(reports[0].proxy_loss))
    served = [r for r in result.quantized.report if r.expert is not None and r.block == 0 and r.expert != 3]
    assert served and all(64 <= r.tokens < 512 and not r.force_routed for r in served)
    # the routed experts' token counts add up to top-k per token
    gate_up = [r.tokens for r in result.quantized.report if r.block == 0 and r.name.endswith("gate_up_proj")
               and r.expert is not None]
    assert sum(gate_up) == 512 * model.config.num_experts_per_tok


def test_force_routing_leaves_the_block_output_as_the_router_decides():
    from pvq.models.moe import UnfusedExperts

    model = tiny("mixtral")
    adapter = adapter_for(model)
    experts = adapter.experts_of(adapter.get_blocks(model)[0])
    assert isinstance(experts, UnfusedExperts)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 64, generator=g)
    index = torch.randint(0, 3, (40, 2), generator=g)  # expert 3 never chosen
    weights = torch.rand(40, 2, generator=g)
    with torch.no_grad():
        plain = experts(x, index, weights)
        experts.forced = frozenset({3, 1})
        forced = experts(x, index, weights)
        experts.forced = frozenset()
    assert torch.allclose(plain, forced, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", sorted(MOE))
def test_unfused_experts_compute_what_transformers_fused_ones_do(family):
    model = tiny(family)
    ids = windows(2, 16, seed=4)
    before = logits(model, ids)
    adapter_for(model)  # unfuses
    assert all(adapter_for(model).experts_of(b) is not None
               for i, b in enumerate(model.model.layers) if not (family == "qwen2_moe" and i == 1))
    assert torch.allclose(logits(model, ids), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_quantized_embedding_computes_what_its_decoded_table_does(family, tmp_path):
    """Every family with its embedding and head stored at 8 bits: the logits equal those of
    the same model with the decoded tables put back as float weights (Gemma's scaled
    embedding included), and save/load is exact."""
    from pvq.runtime.embedding import QuantizedEmbedding

    recipe = dict(method="rtn", config={"bits": 4, "group_size": 32}, finetune=None)
    model = tiny(family)
    oneshot(model, None, Recipe(**recipe, embeddings={"bits": 8, "group_size": 32}), progress=False)
    reference = tiny(family)
    oneshot(reference, None, Recipe(**recipe, embeddings=None), progress=False)
    emb = model.get_input_embeddings()
    assert isinstance(emb, QuantizedEmbedding)
    with torch.no_grad():
        reference.get_input_embeddings().weight.copy_(emb.dequantize())
        head = model.get_output_embeddings()
        if hasattr(head, "dequantize"):  # an untied head with its own payload
            reference.get_output_embeddings().weight.copy_(head.dequantize())
    ids = windows(2, 16, seed=1)
    expected = logits(model, ids)
    assert torch.allclose(expected, logits(reference, ids), rtol=1e-4, atol=1e-4)
    save_checkpoint(model, tmp_path / "ck", tokenizer=printable_char_tokenizer())
    loaded, _, _ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(logits(loaded, ids), expected)
