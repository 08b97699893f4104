"""Every supported family, as a tiny random model built from its transformers config (no
downloads): quantize (pvq and gptq) -> save -> load gives the in-memory quantized model's
logits exactly; the fused rotation keeps the float model's function (or is refused with
the obstacle named); the pipeline calls each kind of block with its own arguments."""

from __future__ import annotations

import pytest
import torch
from conftest import printable_char_tokenizer

from pvq.formats import QuantizedLinear, load_checkpoint, save_checkpoint
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
}
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
    result = oneshot(model, None, Recipe(method=method, config=config), windows=windows(), progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == len(result.quantized) == model.config.num_hidden_layers * len(adapter.linear_names)
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
        with pytest.raises(UnsupportedArchitectureError, match="cannot rotate .*(1 \\+ w|fused into self_attn.qkv_proj)"):
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
    from pvq.pipeline.quantize_model import block_kinds, capture_block_inputs

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
