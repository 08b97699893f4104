"""Packed checkpoints: save -> load round trips, determinism, and every integrity check.

Logit comparisons are exact (`torch.equal`), not approximate: the checkpoint stores the
quantized payloads losslessly and the dense tensors (embeddings, norms, biases) as
float16. The in-memory reference model therefore gets (a) every quantized linear's
weight replaced by `dequantize(qt)` (the very function the loaded `PVQLinear` calls) and
(b) every dense tensor rounded to float16 and back (exact in float32). Both models then
hold bit-identical float32 tensors, run the same architecture from the same config and
the same ops (`nn.Linear.forward` is `F.linear`), so their logits are bit-identical; any
tolerance would hide a format bug (a wrong scale dtype, a swapped tensor, a lost bias).
"""

from __future__ import annotations

import copy
import json
import pickle
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import pvq  # noqa: E402
from pvq.codec import code_bits, decode, encode, pack_codes, pulses_for_bits, search, unpack_codes  # noqa: E402
from pvq.codec.errors import CodecError  # noqa: E402
from pvq.formats import (  # noqa: E402
    CheckpointError,
    CheckpointIntegrityError,
    CheckpointVersionError,
    LayerCodecError,
    LayerDecodeError,
    PVQLinear,
    is_checkpoint,
    load_checkpoint,
    load_quantized,
    read_manifest,
    save_checkpoint,
    verify_checkpoint,
)
from pvq.quant import METHODS, Method, QuantizedTensor, get_method  # noqa: E402

HAS_PVQ = (Path(pvq.__file__).parent / "quant" / "pvq.py").exists()
needs_pvq = pytest.mark.skipif(not HAS_PVQ, reason="pvq.quant.pvq not present")


# =========================================================================== helpers


def tiny_llama(tie: bool = True, bias: bool = False, seed: int = 0) -> torch.nn.Module:
    """A random 2-block Llama (hidden 64, 4 heads, 2 kv heads, mlp 128, vocab 256)."""
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=256,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attention_bias=bias,
        mlp_bias=bias,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # make norms and biases matter: random, not 1 / 0
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.05)
    return model


def decoder_linears(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def quantize_in_memory(model: torch.nn.Module, method: str = "rtn", config=None) -> dict[str, QuantizedTensor]:
    """Quantize every decoder linear (weight only, no Hessian), put the dequantized weights
    into the model and round every other float tensor to float16, as the checkpoint will."""
    m = get_method(method)
    if config is None:
        config = m.config_class(bits=4, group_size=32) if method == "rtn" else m.config_class()
    quantized = {}
    with torch.no_grad():
        for name in decoder_linears(model):
            linear = model.get_submodule(name)
            qt = m.quantize(linear.weight.detach(), None, config)
            linear.weight.copy_(m.dequantize(qt))
            quantized[name] = qt
        skip = {f"{n}.weight" for n in quantized}
        for key, value in model.state_dict().items():
            if key not in skip and value.is_floating_point():
                value.copy_(value.to(torch.float16).to(value.dtype))
    return quantized


def input_ids(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 11), generator=g)


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def write_manifest(root: Path, manifest: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=2))


def rewrite_safetensors(root: Path, fname: str, edit) -> None:
    """Apply `edit` to the tensors of a file, rewrite it and record its new size and
    checksum in the manifest (a consistent but semantically broken checkpoint)."""
    import hashlib

    path = root / fname
    if fname == "dense.safetensors":
        from safetensors.torch import load, save
    else:
        from safetensors.numpy import load, save
    tensors = dict(load(path.read_bytes()))
    edit(tensors)
    data = save(tensors)
    path.write_bytes(data)
    manifest = read_json(root / "manifest.json")
    manifest["files"][fname] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    write_manifest(root, manifest)


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(254)}
    vocab.update({"[UNK]": 254, "[PAD]": 255})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


# ---- a throwaway codec-based method whose decoder lets CodecError through unwrapped


def _toy_quantize(weight, hessian=None, config=None):
    D, bits = 8, 2.0
    K = pulses_for_bits(D, bits)
    W = weight.detach().double().numpy()
    R, C = W.shape
    groups = W.reshape(-1, D)
    points = search(groups, K)
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    gains = (groups * unit).sum(axis=1).astype(np.float16)
    nbits = code_bits(D, K)
    return QuantizedTensor(
        method="toy",
        shape=(R, C),
        tensors={"codes": pack_codes(encode(points, K), nbits), "gains": gains},
        meta={"D": D, "K": K, "code_bits": nbits, "code_order": "row-major"},
    )


def _toy_dequantize(qt):
    R, C = qt.shape
    D, K, nbits = qt.meta["D"], qt.meta["K"], qt.meta["code_bits"]
    points = decode(unpack_codes(qt.tensors["codes"], R * C // D, nbits), D, K).astype(np.float64)
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    return torch.from_numpy((unit * qt.tensors["gains"].astype(np.float64)[:, None]).reshape(R, C).astype(np.float32))


@pytest.fixture
def toy_method(monkeypatch):
    mod = types.ModuleType("pvq.quant._toy_formats")
    mod.CONFIG, mod.quantize, mod.dequantize = dict, _toy_quantize, _toy_dequantize
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(METHODS, "toy", Method("toy", "_toy_formats"))
    return get_method("toy")


# =========================================================================== fixtures


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tied tiny Llama quantized with RTN, saved once; tests copy it before breaking it."""
    model = tiny_llama(tie=True)
    quantized = quantize_in_memory(model)
    root = tmp_path_factory.mktemp("ckpt") / "tied"
    manifest = save_checkpoint(root, model, quantized, source={"model": "tiny-llama"}, settings={"method": "rtn"})
    ids = input_ids()
    return {"root": root, "model": model, "quantized": quantized, "manifest": manifest, "ids": ids, "logits": logits(model, ids)}


@pytest.fixture
def ckpt(saved, tmp_path) -> Path:
    """A private copy of the saved checkpoint, free to corrupt."""
    dst = tmp_path / "copy"
    shutil.copytree(saved["root"], dst)
    return dst


# =========================================================================== round trips


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_rtn_round_trip_logits_exact(tmp_path, tie):
    model = tiny_llama(tie=tie, seed=3)
    quantized = quantize_in_memory(model)
    ids = input_ids()
    ref = logits(model, ids)
    manifest = save_checkpoint(tmp_path / "ck", model, quantized)
    assert manifest["tied_embeddings"] is tie
    assert ("lm_head.weight" in manifest["tied"]) is tie
    assert ("lm_head.weight" in manifest["dense"]) is (not tie)
    for mode in ("load", "fly"):
        loaded, tok, man = load_checkpoint(tmp_path / "ck", mode=mode)
        assert tok is None and man == manifest
        assert not loaded.training
        linears = [m for m in loaded.modules() if isinstance(m, PVQLinear)]
        assert len(linears) == 14 and all(m.mode == mode for m in linears)
        assert not any(isinstance(m, torch.nn.Linear) and ".layers." in n for n, m in loaded.named_modules())
        emb, head = loaded.get_input_embeddings().weight, loaded.get_output_embeddings().weight
        assert (emb is head) is tie
        assert torch.equal(logits(loaded, ids), ref), mode


def test_bias_is_stored_dense_and_used(tmp_path):
    model = tiny_llama(tie=False, bias=True, seed=4)
    quantized = quantize_in_memory(model)
    ids = input_ids()
    ref = logits(model, ids)
    manifest = save_checkpoint(tmp_path / "ck", model, quantized)
    assert "model.layers.0.self_attn.q_proj.bias" in manifest["dense"]
    assert "model.layers.1.mlp.down_proj.bias" in manifest["dense"]
    for mode in ("load", "fly"):
        loaded, _, _ = pvq.load(tmp_path / "ck", mode=mode)
        q_proj = loaded.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj, PVQLinear) and q_proj.bias is not None
        assert torch.equal(q_proj.bias, model.model.layers[0].self_attn.q_proj.bias)
        assert torch.equal(logits(loaded, ids), ref)


@needs_pvq
@pytest.mark.parametrize("gain", ["fp16", "beta"])
def test_pvq_round_trip_logits_exact(tmp_path, gain):
    m = get_method("pvq")
    config = m.config_class(group_size=16, shape_bits=3.0, gain=gain, use_hessian=False)
    model = tiny_llama(tie=True, seed=5)
    quantized = quantize_in_memory(model, "pvq", config)
    ids = input_ids()
    ref = logits(model, ids)
    manifest = save_checkpoint(tmp_path / "ck", model, quantized, settings={"method": "pvq", "gain": gain})
    layer = manifest["layers"]["model.layers.0.self_attn.q_proj"]
    assert layer["method"] == "pvq" and layer["meta"]["code_order"] == "row-major"
    assert layer["tensors"]["codes"]["dtype"] == "uint8"
    for mode in ("load", "fly"):
        loaded, _, _ = load_checkpoint(tmp_path / "ck", mode=mode)
        assert torch.equal(logits(loaded, ids), ref), mode


def test_load_and_fly_layers_agree_and_fly_decodes_every_call(saved, monkeypatch):
    rtn = sys.modules[get_method("rtn").dequantize.__module__]
    calls = []
    real = rtn.dequantize
    monkeypatch.setattr(rtn, "dequantize", lambda qt: calls.append(1) or real(qt))
    fly, _, _ = load_checkpoint(saved["root"], mode="fly", check_decode=False)
    assert not calls  # nothing decoded at load
    layer = fly.model.layers[0].mlp.up_proj
    assert "weight" not in dict(layer.named_buffers())
    x = torch.randn(3, 5, 64)
    y1, y2 = layer(x), layer(x)
    assert len(calls) == 2  # one decode per forward, nothing cached
    qt = saved["quantized"]["model.layers.0.mlp.up_proj"]
    eager = PVQLinear(qt, mode="load")
    assert torch.equal(y1, y2) and torch.equal(y1, eager(x))
    assert torch.equal(eager.weight, real(qt))


def test_pvqlinear_keeps_stored_arrays(saved):
    qt = saved["quantized"]["model.layers.1.self_attn.o_proj"]
    layer = PVQLinear(qt, mode="load", name="o_proj")
    assert layer.stored_bytes == qt.stored_bytes and layer.bits_per_weight == qt.bits_per_weight
    assert "method=rtn" in repr(layer) and "bits_per_weight=4.625" in repr(layer)
    assert set(layer.state_dict()) == set()  # stored arrays are non-persistent buffers
    layer.to(torch.bfloat16)  # casts the weight, never the stored float16 scales
    assert layer.weight.dtype == torch.bfloat16
    assert layer.stored_tensors()["scales"].dtype == torch.float16
    layer.half()
    back = layer.quantized_tensor()
    assert back.method == qt.method and back.shape == qt.shape and back.meta == qt.meta
    assert set(back.tensors) == set(qt.tensors)
    for name, arr in qt.tensors.items():
        assert back.tensors[name].dtype == arr.dtype and np.array_equal(back.tensors[name], arr)
    layer.set_mode("fly")
    assert "weight" not in layer._buffers
    layer.set_mode("load", dtype=torch.float32)
    assert torch.equal(layer.weight, get_method("rtn").dequantize(qt))


# =========================================================================== manifest + stats


def test_manifest_layout_and_measured_bits(saved):
    root, manifest = saved["root"], saved["manifest"]
    assert read_json(root / "manifest.json") == manifest == verify_checkpoint(root)
    assert manifest["format"] == "pvq-checkpoint" and manifest["format_version"] == 1
    assert manifest["model_type"] == "llama" and manifest["config"]["hidden_size"] == 64
    assert manifest["source"] == {"model": "tiny-llama"} and manifest["settings"] == {"method": "rtn"}
    assert sorted(manifest["files"]) == ["blocks-000.safetensors", "blocks-001.safetensors", "dense.safetensors"]
    assert sorted(p.name for p in root.iterdir()) == sorted([*manifest["files"], "manifest.json"])
    assert sorted(manifest["layers"]) == sorted(saved["quantized"])
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"} and manifest["tied_embeddings"]
    for name, layer in manifest["layers"].items():
        block = int(name.split(".")[2])
        assert {t["file"] for t in layer["tensors"].values()} == {f"blocks-{block:03d}.safetensors"}
        assert layer["tensors"]["codes"]["key"] == f"{name}.codes"
    # dense: everything except the quantized weights; float16; lm_head stored once (tied)
    model_keys = set(saved["model"].state_dict())
    assert set(manifest["dense"]) | set(manifest["tied"]) == model_keys - {f"{n}.weight" for n in saved["quantized"]}
    assert {e["dtype"] for e in manifest["dense"].values()} == {"float16"}
    # measured bits: the bytes actually stored in the block files
    stored = 0
    for fname in ("blocks-000.safetensors", "blocks-001.safetensors"):
        stored += sum(a.nbytes for a in safetensors_numpy.load_file(str(root / fname)).values())
    weights = sum(r * c for r, c in (layer["shape"] for layer in manifest["layers"].values()))
    stats = manifest["stats"]
    assert stats["quantized_bytes"] == stored == sum(q.stored_bytes for q in saved["quantized"].values())
    assert stats["quantized_weights"] == weights == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)  # q,o; k,v; mlp
    assert stats["bits_per_weight"] == stored * 8 / weights
    assert stats["bits_per_weight"] == pytest.approx(4 + (16 + 4) / 32)  # 4-bit codes + fp16 scale + 4-bit zero per 32
    assert stats["total_bytes"] == stats["quantized_bytes"] + stats["dense_bytes"]
    assert stats["file_bytes"] == sum(f["bytes"] for f in manifest["files"].values())


def test_dense_float16_overflow_falls_back_to_bfloat16(tmp_path):
    model = tiny_llama(tie=False, seed=6)
    quantized = quantize_in_memory(model)
    with torch.no_grad():
        model.model.norm.weight[3] = 1e6  # beyond float16's 65504
        model.model.norm.weight.copy_(model.model.norm.weight.to(torch.bfloat16).float())
    ids = input_ids()
    ref = logits(model, ids)
    manifest = save_checkpoint(tmp_path / "ck", model, quantized)
    assert manifest["dense"]["model.norm.weight"]["dtype"] == "bfloat16"
    assert manifest["dense"]["model.layers.0.input_layernorm.weight"]["dtype"] == "float16"
    loaded, _, _ = load_checkpoint(tmp_path / "ck")
    assert loaded.model.norm.weight[3].item() == 999424.0  # 1e6 in bfloat16, not inf
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight)
    assert torch.equal(logits(loaded, ids), ref)


def test_save_is_deterministic_and_a_fixed_point(saved, tmp_path):
    tok = word_tokenizer()
    a = save_checkpoint(tmp_path / "a", saved["model"], saved["quantized"], tokenizer=tok, report={"ppl": 12.5})
    b = save_checkpoint(tmp_path / "b", saved["model"], saved["quantized"], tokenizer=tok, report={"ppl": 12.5})
    assert a == b
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*"))
    assert files_a == files_b
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    # the same bytes as the checkpoint saved without tokenizer/report, for the tensor files
    for fname in saved["manifest"]["files"]:
        assert (tmp_path / "a" / fname).read_bytes() == (saved["root"] / fname).read_bytes()
    # saving a loaded model (PVQLinear layers collected from the model) gives the same tensor files
    loaded, _, _ = load_checkpoint(saved["root"], mode="fly")
    c = save_checkpoint(tmp_path / "c", loaded)
    assert c["files"] == saved["manifest"]["files"] and c["layers"] == saved["manifest"]["layers"]


def test_tokenizer_and_report_travel_with_the_checkpoint(saved, tmp_path):
    tok = word_tokenizer()
    manifest = save_checkpoint(tmp_path / "ck", saved["model"], saved["quantized"], tokenizer=tok, report={"wikitext2_ppl": 9.75})
    assert manifest["tokenizer"]["files"] and all(f in manifest["files"] for f in manifest["tokenizer"]["files"])
    assert read_json(tmp_path / "ck" / "report.json") == {"wikitext2_ppl": 9.75}
    model, tok2, _ = load_checkpoint(tmp_path / "ck")
    assert tok2 is not None and tok2("w1 w7 nope")["input_ids"] == tok("w1 w7 nope")["input_ids"] == [1, 7, 254]
    # tokenizer files are checksummed too
    tfile = tmp_path / "ck" / "tokenizer.json"
    tfile.write_text(tfile.read_text().replace('"w7"', '"w8"', 1).replace('"w8": 8', '"w7": 8', 1))
    with pytest.raises(CheckpointIntegrityError, match="tokenizer.json"):
        load_checkpoint(tmp_path / "ck")


def test_load_quantized_returns_the_payloads(saved):
    got = load_quantized(saved["root"])
    assert sorted(got) == sorted(saved["quantized"])
    for name, qt in saved["quantized"].items():
        assert got[name].shape == qt.shape and got[name].meta == qt.meta
        for t, arr in qt.tensors.items():
            assert got[name].tensors[t].dtype == arr.dtype and np.array_equal(got[name].tensors[t], arr)


def test_no_pickle_on_save_or_load(saved, tmp_path, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("pickle used")

    for mod, attr in ((pickle, "load"), (pickle, "loads"), (torch, "load"), (torch, "save")):
        monkeypatch.setattr(mod, attr, forbidden)
    save_checkpoint(tmp_path / "ck", saved["model"], saved["quantized"])
    model, _, _ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(logits(model, saved["ids"]), saved["logits"])


# =========================================================================== atomic save


def test_overwrite_rules(saved, tmp_path):
    dst = tmp_path / "ck"
    save_checkpoint(dst, saved["model"], saved["quantized"])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(dst, saved["model"], saved["quantized"])
    save_checkpoint(dst, saved["model"], saved["quantized"], settings={"run": 2}, overwrite=True)
    assert read_manifest(dst)["settings"] == {"run": 2}
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a pvq checkpoint"):
        save_checkpoint(other, saved["model"], saved["quantized"], overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "notes"]  # no temporary leftovers


def test_interrupted_save_leaves_nothing(saved, tmp_path):
    class Exploding:
        def save_pretrained(self, directory):
            (Path(directory) / "tokenizer.json").write_text("{}")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ck", saved["model"], saved["quantized"], tokenizer=Exploding())
    assert list(tmp_path.iterdir()) == []
    # and an interrupted overwrite keeps the old checkpoint intact
    save_checkpoint(tmp_path / "ck", saved["model"], saved["quantized"])
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ck", saved["model"], saved["quantized"], tokenizer=Exploding(), overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_save_rejects_bad_layers(saved, tmp_path):
    model, q = saved["model"], saved["quantized"]
    qt = q["model.layers.0.self_attn.q_proj"]
    with pytest.raises(CheckpointError, match="not a module"):
        save_checkpoint(tmp_path / "a", model, {"model.layers.0.self_attn.q_proj.weight": qt})
    with pytest.raises(CheckpointError, match=r"shape \(64, 64\).*\(32, 64\)"):
        save_checkpoint(tmp_path / "b", model, {"model.layers.0.self_attn.k_proj": qt})
    with pytest.raises(CheckpointError, match="tied"):
        head_qt = get_method("rtn").quantize(model.lm_head.weight.detach(), None, get_method("rtn").config_class(bits=4, group_size=32))
        save_checkpoint(tmp_path / "c", model, {**q, "lm_head": head_qt})
    assert not any(tmp_path.iterdir())


# =========================================================================== integrity errors


def test_truncated_file(ckpt):
    path = ckpt / "blocks-001.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointIntegrityError, match=r"'blocks-001.safetensors' has \d+ bytes, the manifest records"):
        load_checkpoint(ckpt)


def test_flipped_byte_fails_checksum(ckpt):
    path = ckpt / "dense.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # inside the tensor data: still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match="'dense.safetensors' fails its checksum"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointIntegrityError, match="dense.safetensors"):
        verify_checkpoint(ckpt)


def test_flipped_byte_in_a_block_fails_checksum(ckpt):
    path = ckpt / "blocks-000.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x80
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match="'blocks-000.safetensors' fails its checksum"):
        load_checkpoint(ckpt, mode="fly")


def test_missing_file(ckpt):
    (ckpt / "blocks-000.safetensors").unlink()
    with pytest.raises(CheckpointIntegrityError, match="'blocks-000.safetensors' is missing"):
        load_checkpoint(ckpt)


def test_missing_manifest(ckpt):
    (ckpt / "manifest.json").unlink()
    assert not is_checkpoint(ckpt)
    with pytest.raises(CheckpointIntegrityError, match="no manifest.json"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("format_version", 4, "format_version 4 is newer than this pvq"),
        ("format_version", "1", "format_version '1' is not a valid version"),
        ("format", "gguf", "format 'gguf' is not 'pvq-checkpoint'"),
    ],
)
def test_unknown_format_or_version(ckpt, field, value, message):
    manifest = read_json(ckpt / "manifest.json")
    manifest[field] = value
    write_manifest(ckpt, manifest)
    with pytest.raises(CheckpointVersionError, match=message):
        pvq.load(ckpt)


def test_manifest_missing_a_layer_tensor(ckpt):
    manifest = read_json(ckpt / "manifest.json")
    del manifest["layers"]["model.layers.1.mlp.gate_proj"]["tensors"]["zeros"]
    write_manifest(ckpt, manifest)
    with pytest.raises(CheckpointError, match=r"'blocks-001.safetensors' holds tensors the manifest does not list: \['model.layers.1.mlp.gate_proj.zeros'\]"):
        load_checkpoint(ckpt)


def test_layer_tensor_missing_everywhere(ckpt):
    """Manifest and file agree (checksums updated) but the layer lacks a tensor its method needs."""
    rewrite_safetensors(ckpt, "blocks-001.safetensors", lambda t: t.pop("model.layers.1.mlp.gate_proj.scales"))
    manifest = read_json(ckpt / "manifest.json")
    del manifest["layers"]["model.layers.1.mlp.gate_proj"]["tensors"]["scales"]
    write_manifest(ckpt, manifest)
    with pytest.raises(LayerDecodeError, match=r"layer 'model.layers.1.mlp.gate_proj' \(rtn\).*scales"):
        load_checkpoint(ckpt)


def test_shape_mismatch_manifest_vs_file(ckpt):
    manifest = read_json(ckpt / "manifest.json")
    manifest["layers"]["model.layers.0.self_attn.v_proj"]["tensors"]["scales"]["shape"] = [2, 32]
    write_manifest(ckpt, manifest)
    with pytest.raises(CheckpointError, match=r"layer 'model.layers.0.self_attn.v_proj' tensor 'scales': shape mismatch, the manifest records \[2, 32\] but 'blocks-000.safetensors' holds \[32, 2\]"):
        load_checkpoint(ckpt)


def test_dtype_mismatch_manifest_vs_file(ckpt):
    manifest = read_json(ckpt / "manifest.json")
    manifest["dense"]["model.norm.weight"]["dtype"] = "bfloat16"
    write_manifest(ckpt, manifest)
    with pytest.raises(CheckpointError, match="'model.norm.weight': dtype mismatch"):
        load_checkpoint(ckpt)


def test_every_tensor_needs_a_value(ckpt):
    manifest = read_json(ckpt / "manifest.json")
    del manifest["tied"]["lm_head.weight"]  # the head would silently stay uninitialised
    write_manifest(ckpt, manifest)
    with pytest.raises(CheckpointError, match=r"no value for 1 tensor\(s\) of the rebuilt model: \['lm_head.weight'\]"):
        load_checkpoint(ckpt)


def test_dense_tensor_missing_everywhere(ckpt):
    rewrite_safetensors(ckpt, "dense.safetensors", lambda t: t.pop("model.layers.0.input_layernorm.weight"))
    manifest = read_json(ckpt / "manifest.json")
    del manifest["dense"]["model.layers.0.input_layernorm.weight"]
    write_manifest(ckpt, manifest)
    with pytest.raises(CheckpointError, match=r"\['model.layers.0.input_layernorm.weight'\]"):
        load_checkpoint(ckpt)


def test_layer_not_in_architecture(ckpt):
    manifest = read_json(ckpt / "manifest.json")
    manifest["layers"]["model.layers.7.mlp.up_proj"] = manifest["layers"].pop("model.layers.1.mlp.up_proj")
    write_manifest(ckpt, manifest)
    with pytest.raises(CheckpointError, match="'model.layers.7.mlp.up_proj' of the checkpoint is not a module"):
        load_checkpoint(ckpt)


def test_file_names_cannot_escape_the_directory(ckpt):
    manifest = read_json(ckpt / "manifest.json")
    manifest["files"]["../dense.safetensors"] = manifest["files"]["dense.safetensors"]
    write_manifest(ckpt, manifest)
    with pytest.raises(CheckpointError, match="not a plain relative file name"):
        load_checkpoint(ckpt)


def test_remote_code_is_never_loaded(ckpt):
    manifest = read_json(ckpt / "manifest.json")
    manifest["model_type"] = "evil_remote_arch"
    manifest["config"]["model_type"] = "evil_remote_arch"
    manifest["config"]["auto_map"] = {"AutoModelForCausalLM": "someone/repo--modeling.Evil"}
    write_manifest(ckpt, manifest)
    with pytest.raises(CheckpointError, match="never load remote code"):
        load_checkpoint(ckpt)


# =========================================================================== codes out of range


def _all_ones_codes(quantized: dict[str, QuantizedTensor], name: str) -> dict[str, QuantizedTensor]:
    """A copy of `quantized` whose layer `name` has every code bit set (past N(D, K))."""
    broken = dict(quantized)
    qt = copy.copy(quantized[name])
    qt.tensors = {**qt.tensors, "codes": np.full_like(qt.tensors["codes"], 0xFF)}
    broken[name] = qt
    return broken


def test_toy_codes_out_of_range_name_the_layer(tmp_path, toy_method):
    model = tiny_llama(tie=True, seed=7)
    quantized = {n: toy_method.quantize(model.get_submodule(n).weight.detach(), None, None) for n in decoder_linears(model)}
    name = "model.layers.1.self_attn.k_proj"
    save_checkpoint(tmp_path / "ok", model, quantized)
    load_checkpoint(tmp_path / "ok", mode="fly")  # the toy method itself round-trips
    save_checkpoint(tmp_path / "bad", model, _all_ones_codes(quantized, name))  # saving never decodes
    for mode in ("load", "fly"):
        with pytest.raises(LayerCodecError, match=rf"layer '{name}' \(toy\): cannot decode the stored codes: .*out of range") as info:
            load_checkpoint(tmp_path / "bad", mode=mode)
        assert isinstance(info.value, CodecError)
    # fly without the load-time check: the forward that decodes the layer names it
    fly, _, _ = load_checkpoint(tmp_path / "bad", mode="fly", check_decode=False)
    with pytest.raises(LayerCodecError, match=rf"layer '{name}'"):
        logits(fly, input_ids())


@needs_pvq
def test_pvq_codes_out_of_range_name_the_layer(tmp_path):
    m = get_method("pvq")
    model = tiny_llama(tie=True, seed=8)
    quantized = quantize_in_memory(model, "pvq", m.config_class(group_size=16, shape_bits=3.0, use_hessian=False))
    name = "model.layers.0.mlp.down_proj"
    save_checkpoint(tmp_path / "bad", model, _all_ones_codes(quantized, name))
    for mode in ("load", "fly"):
        with pytest.raises(LayerDecodeError, match=rf"layer '{name}' \(pvq\).*out of range"):
            load_checkpoint(tmp_path / "bad", mode=mode)
