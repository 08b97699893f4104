"""Quantized token embedding and output head (`pvq.runtime.embedding`): row lookups equal
the RTN reference decode, a tied head is served from the one stored payload, save/load
gives bit-identical logits through pvq.load and transformers, and the stored bytes shrink."""

from __future__ import annotations

import json

import numpy as np

import pytest
import torch
from conftest import printable_char_tokenizer, save_tiny_model, write_texts

import pvq  # noqa: F401  (registers the pvq quantizer with transformers)
from pvq.checkpoint import load_checkpoint, save_checkpoint
from pvq.runtime import QuantizedLinear
from pvq.runtime.embedding import QuantizedEmbedding, QuantizedHead, TiedHead, quantize_embeddings
from pvq.checkpoint.hf import bits_per_weight
from pvq.models import tiny_llama
from pvq.oneshot import Recipe, oneshot
from pvq.methods import get_method

IDS = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(5))


def _quantized(tied: bool, bits: int = 8, group_size: int = 32):
    model = tiny_llama(seed=0, tie_embeddings=tied)
    oneshot(model, None, Recipe(method="rtn", config={"bits": 4, "group_size": 32}, embeddings=None, finetune=None),
            progress=False)
    float_table = model.get_input_embeddings().weight.detach().clone()
    float_head = model.get_output_embeddings().weight.detach().clone()
    record = quantize_embeddings(model, {"bits": bits, "group_size": group_size})
    model.config.quantization_config.embeddings = record
    return model, float_table, float_head, record


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_rows_equal_the_rtn_reference_decode(bits):
    model, table, _, record = _quantized(True, bits=bits)
    emb = model.get_input_embeddings()
    assert isinstance(emb, QuantizedEmbedding) and record["tied"]
    ref = get_method("rtn").dequantize(get_method("rtn").quantize(table, None, get_method("rtn").make_config(
        {"bits": bits, "group_size": 32})))
    assert torch.equal(emb.dequantize(), ref)
    assert torch.equal(emb(IDS), ref[IDS])
    assert emb.stored_bytes < table.numel() * 2 * (bits + 1) / 16  # codes plus group scales/zeros
    err = float((ref - table).norm() / table.norm())
    assert err < {8: 0.01, 6: 0.04, 4: 0.15}[bits]


def test_tied_head_is_served_from_the_embedding_payload():
    model, table, _, _ = _quantized(True)
    head = model.get_output_embeddings()
    assert isinstance(head, TiedHead)
    keys = model.state_dict().keys()
    assert not any(k.startswith("lm_head.") for k in keys)  # stored once, under the embedding
    x = torch.randn(3, table.shape[1])
    want = x @ model.get_input_embeddings().dequantize().T
    assert torch.allclose(head(x), want, rtol=1e-5, atol=1e-5)
    assert head.last_kernel is not None
    assert bits_per_weight(model) == pytest.approx(4 + 2 * 16 / 32 / 2 + 4 / 32, rel=0.2)  # linears only


def test_untied_head_gets_a_payload_of_its_own_and_is_not_a_linear_in_the_statistics():
    model, _, head_weight, record = _quantized(False)
    assert not record["tied"]
    head = model.get_output_embeddings()
    assert isinstance(head, QuantizedHead) and isinstance(head.table, QuantizedEmbedding)
    assert not any(isinstance(m, QuantizedLinear) for m in head.modules())  # not a linear in the statistics
    ref = get_method("rtn").dequantize(get_method("rtn").quantize(head_weight, None, get_method("rtn").make_config(
        {"bits": 8, "group_size": 32})))
    assert torch.equal(head.dequantize(), ref)


@pytest.mark.parametrize("tied", [True, False])
def test_save_and_load_give_bit_identical_logits(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    model, _, _, record = _quantized(tied)
    with torch.no_grad():
        want = model(IDS).logits
    save_checkpoint(model, tmp_path / "ckpt", tokenizer=printable_char_tokenizer())
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["quantization_config"]["embeddings"] == record
    loaded, _, _ = load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, want)
    assert isinstance(loaded.get_input_embeddings(), QuantizedEmbedding)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"))
    with torch.no_grad():
        assert torch.equal(hf(IDS).logits, want)


def test_the_checkpoint_shrinks_by_the_embedding(tmp_path):
    plain = tiny_llama(seed=0, vocab=1024, hidden=64)
    oneshot(plain, None, Recipe(method="rtn", config={"bits": 4, "group_size": 32}, embeddings=None, finetune=None),
            progress=False)
    save_checkpoint(plain, tmp_path / "plain")
    packed = tiny_llama(seed=0, vocab=1024, hidden=64)
    oneshot(packed, None, Recipe(method="rtn", config={"bits": 4, "group_size": 32},
                                 embeddings={"bits": 8, "group_size": 64}, finetune=None), progress=False)
    assert isinstance(packed.get_input_embeddings(), QuantizedEmbedding)
    save_checkpoint(packed, tmp_path / "packed")
    size = lambda d: sum(f.stat().st_size for f in (tmp_path / d).glob("*.safetensors"))  # noqa: E731
    saved = size("plain") - size("packed")
    table = 1024 * 64
    assert saved == pytest.approx(table * 2 - (table + table // 64 * 3), rel=0.02)  # fp16 table -> 8-bit codes


def test_bad_settings_are_named():
    from pvq.methods import QuantizationError

    with pytest.raises(QuantizationError, match="embeddings"):
        Recipe(method="rtn", config={"bits": 4}, embeddings={"bits": 9}).check()
    with pytest.raises(QuantizationError, match="whole number of bytes"):
        QuantizedEmbedding(10, 12, {"bits": 3, "group_size": 4})
    # refused before any quantization: a group size that does not divide the width
    model = tiny_llama(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizationError, match="divisible|divide"):
        oneshot(model, None, Recipe(method="rtn", config={"bits": 4, "group_size": 32},
                                    embeddings={"bits": 8, "group_size": 48}, finetune=None), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_cli_stores_the_embedding_and_names_bad_options(tmp_path, capsys):
    from pvq.cli import main

    save_tiny_model(tmp_path / "model", seed=2)
    write_texts(tmp_path, "the quick brown fox jumps over the lazy dog. " * 60, 1500)
    out = tmp_path / "ckpt"
    assert main(["quantize", str(tmp_path / "model"), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--embed-bits", "6", "--embed-group-size", "32", "--out", str(out),
                 "--eval-text", str(tmp_path / "wiki.test.raw"), "--eval-seqlen", "48", "--eval-windows", "2",
                 "--device", "cpu", "--quiet", "--fast"]) == 0
    text = capsys.readouterr().out
    assert "embedding        'model.embed_tokens' round-to-nearest, 6 bits" in text and "tied head" in text
    report = json.loads((out / "job_report.json").read_text())
    assert report["embeddings"]["config"] == {"bits": 6, "group_size": 32}
    assert "embed_bits: 6" in (out / "recipe.yaml").read_text()
    loaded, _, _ = load_checkpoint(out)
    assert isinstance(loaded.get_input_embeddings(), QuantizedEmbedding)
    assert main(["quantize", str(tmp_path / "model"), "--embed-group-size", "32", "--out", str(tmp_path / "x")]) == 2
    assert "--embed-group-size has no effect without --embed-bits" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "model"), "--embed-bits", "3", "--out", str(tmp_path / "x")]) == 2
    assert "embeddings: bits must be in 4..8" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "model"), "--gain", "fp16", "--gain-escapes", "2",
                 "--out", str(tmp_path / "x")]) == 2
    assert "gain_escapes applies to codebook gains" in capsys.readouterr().err


def test_the_main_job_and_the_recipe_share_one_default():
    from pvq.runtime.embedding import DEFAULT_EMBEDDINGS
    from pvq.options import OPTIONS_BY_DEST

    assert Recipe(method="rtn").embeddings == DEFAULT_EMBEDDINGS
    assert {"bits": OPTIONS_BY_DEST["embed_bits"].default,
            "group_size": OPTIONS_BY_DEST["embed_group_size"].default} == DEFAULT_EMBEDDINGS


@pytest.mark.parametrize("rows,bits", [(256, 8), (250, 6), (77, 4)])
def test_a_table_quantized_in_chunks_has_the_bytes_of_one_piece(rows, bits):
    from pvq.runtime.embedding import quantize_table

    table = torch.randn(rows, 40, generator=torch.Generator().manual_seed(rows))
    config = get_method("rtn").make_config({"bits": bits, "group_size": 8})
    whole = get_method("rtn").quantize(table, None, config).tensors
    chunked = quantize_table(table, config, chunk_rows=16)
    assert set(chunked) == set(whole)
    for k in whole:
        assert chunked[k].dtype == whole[k].dtype and np.array_equal(chunked[k], whole[k]), k


def test_a_recipe_with_a_dense_embedding_maps_back_to_embed_bits_0():
    from pvq.options import values_from_recipe

    assert values_from_recipe(Recipe(method="pvq", embeddings=None).to_dict(), "m")["embed_bits"] == 0
    assert values_from_recipe(Recipe(method="pvq").to_dict(), "m")["embed_bits"] == 8
