"""Hadamard transforms, the fused rotation of Llama-family models, and rotated checkpoints."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from pvq.checkpoint import load_checkpoint, quantized_model, save_checkpoint
from pvq.runtime import CheckpointError, CheckpointRotationError, CheckpointVersionError, QuantizedLinear
from pvq.models import UnsupportedArchitectureError, adapter_for, tiny_llama
from pvq.calibrate import quantize_model
from pvq.rotation import (
    OnlineHadamard,
    RandomizedHadamard,
    RotationError,
    RotationWarning,
    fwht,
    hadamard_factor,
    hadamard_matrix,
    hadamard_order_construction,
    hadamard_order_table,
    hadamard_transform,
    install_rotation,
    rotate_model,
    rotation_of,
)
from pvq.rotation.hadamard import _hadamard_np, _sylvester

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


# =========================================================================== Hadamard matrices


def _is_hadamard(H: np.ndarray) -> bool:
    K = H.shape[0]
    return H.shape == (K, K) and set(np.unique(H)) <= {-1, 1} and np.array_equal(H @ H.T, K * np.eye(K, dtype=H.dtype))


def test_every_claimed_order_up_to_400_is_hadamard():
    table = hadamard_order_table(400)
    assert {1, 2, 4, 8, 12, 20, 24, 28, 36, 40, 44, 52, 60, 108, 148} <= set(table)
    # multiples of 4 without a construction here (Hadamard matrices exist, other constructions)
    assert [K for K in range(4, 401, 4) if K not in table] == [
        92, 116, 156, 172, 184, 188, 232, 236, 260, 268, 292, 324, 356, 372, 376]
    assert all(K in (1, 2) or K % 4 == 0 for K in table)
    for K in table:
        assert _is_hadamard(_hadamard_np(K)), (K, table[K])


@pytest.mark.parametrize("K,how", [(344, "paley1(q=343)"), (28, "paley1(q=27)"), (52, "paley2(q=25)"),
                                   (36, "paley2(q=17)"), (12, "paley1(q=11)"), (148, "paley2(q=73)")])
def test_prime_power_paley_orders(K, how):
    assert hadamard_order_construction(K) == how
    assert _is_hadamard(_hadamard_np(K))


@pytest.mark.parametrize("n,K,M", [(576, 36, 16), (1536, 12, 128), (11008, 344, 32), (14336, 28, 512),
                                   (4096, 1, 4096), (5120, 20, 256), (13824, 108, 128), (18944, 148, 128),
                                   (896, 28, 32), (64, 1, 64), (2, 1, 2), (1, 1, 1)])
def test_real_model_sizes_factor_into_constructed_orders(n, K, M):
    K_, M_, how = hadamard_factor(n)
    assert (K_, M_) == (K, M) and how is not None and K * M == n


@pytest.mark.parametrize("n", [12, 24, 48, 576, 1536])
def test_hadamard_matrix_of_composite_order(n):
    H = hadamard_matrix(n)
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=H.dtype))


def test_orders_without_construction():
    assert hadamard_order_construction(6) is None and hadamard_order_construction(92) is None
    assert hadamard_factor(172) == (43, 4, None) and hadamard_factor(45) == (45, 1, None)
    with pytest.raises(RotationError, match="no Hadamard matrix of order 172"):
        hadamard_matrix(172)
    for bad in (0, -4, 2.5, True):
        with pytest.raises(RotationError, match="positive integer"):
            hadamard_factor(bad)


# =========================================================================== fast transform


@pytest.mark.parametrize("n", [1, 2, 8, 64, 1024])
def test_fwht_equals_dense_sylvester_product(n):
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    H = torch.from_numpy(_sylvester(n).astype(np.float64))
    assert torch.allclose(fwht(x), x @ H, atol=1e-10)
    assert torch.allclose(fwht(fwht(x)) / n, x, atol=1e-12)  # H H = n I


def test_fwht_needs_a_power_of_two():
    with pytest.raises(RotationError, match="power-of-two"):
        fwht(torch.zeros(4, 12))


@pytest.mark.parametrize("n", [12, 48, 576, 1536])
def test_kron_transform_equals_dense_product(n):
    K, _, _ = hadamard_factor(n)
    A = torch.from_numpy(_hadamard_np(K).astype(np.float64))
    x = torch.randn(7, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(hadamard_transform(x, A), x @ hadamard_matrix(n), atol=1e-9)


# =========================================================================== randomized rotations


@pytest.mark.parametrize("n", [16, 12, 96, 576, 1536])
def test_randomized_hadamard_is_orthogonal_and_fast_equals_dense(n):
    r = RandomizedHadamard.build(n, seed=5, label="t")
    R = r.matrix()
    assert torch.allclose(R @ R.T, torch.eye(n, dtype=R.dtype), atol=1e-12)
    H = hadamard_matrix(n)
    assert torch.equal(R * math.sqrt(n), r.signs[:, None] * H)  # diag(s) H / sqrt(n)
    x = torch.randn(4, 2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(r.apply(x), x @ R, atol=1e-12)
    x32 = x.float()
    assert r.apply(x32).dtype == torch.float32
    assert torch.allclose(r.apply(x32).double(), x @ R, atol=1e-5)


def test_randomized_hadamard_is_deterministic_in_seed_and_label():
    a, b = RandomizedHadamard.build(576, 3, "residual"), RandomizedHadamard.build(576, 3, "residual")
    assert torch.equal(a.signs, b.signs) and a.digest == b.digest
    c, d = RandomizedHadamard.build(576, 4, "residual"), RandomizedHadamard.build(576, 3, "other")
    assert not torch.equal(a.signs, c.signs) and not torch.equal(a.signs, d.signs)
    assert len({a.digest, c.digest, d.digest}) == 3
    # the signs are fixed by SHA-256 of (seed, label), not by a library's RNG stream
    assert a.signs[:16].tolist() == RandomizedHadamard.build(576, 3, "residual").signs[:16].tolist()
    assert set(a.signs.unique().tolist()) == {-1.0, 1.0} and 200 < int((a.signs > 0).sum()) < 376
    assert RandomizedHadamard.from_record(json.loads(json.dumps(a.record()))).digest == a.digest
    with pytest.raises(RotationError, match="seed must be a non-negative integer"):
        RandomizedHadamard.build(16, -1, "x")


def test_random_orthogonal_fallback_warns_and_is_orthogonal():
    with pytest.warns(RotationWarning, match="order 172"):
        r = RandomizedHadamard.build(172, 0, "fallback")
    assert r.construction == "random-orthogonal" and r.K == 43
    R = r.matrix()
    assert torch.allclose(R @ R.T, torch.eye(172, dtype=R.dtype), atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = RandomizedHadamard.from_record(r.record())  # rebuilt silently, same digest
    assert torch.equal(again.matrix(), R)
    with pytest.warns(RotationWarning):
        odd = RandomizedHadamard.build(45, 0, "odd")
    assert torch.allclose(odd.matrix() @ odd.matrix().T, torch.eye(45, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda r: r.update(seed=r["seed"] + 1), "recorded digest"),
        (lambda r: r.update(digest="0" * 64), "recorded digest"),
        (lambda r: r.update(n=100), "recorded K"),
        (lambda r: r.update(n=0), "not a positive integer"),
        (lambda r: r.pop("label"), "lacks label"),
        (lambda r: r.update(seed="zero"), "seed must be"),
    ],
)
def test_rotation_record_that_does_not_rebuild(edit, message):
    record = RandomizedHadamard.build(96, 1, "x").record()
    edit(record)
    with pytest.raises(RotationError, match=message):
        RandomizedHadamard.from_record(record)


# =========================================================================== fused rotation


def _llama(model_type="llama", hidden=64, heads=4, kv_heads=2, inter=128, tie=True, bias=False, seed=0,
           dtype=torch.float32, layers=2):
    """A random tiny model of the Llama family with random norms and biases (so they matter)."""
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  intermediate_size=inter, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=tie)
    if model_type == "llama":
        config = transformers.LlamaConfig(**common, attention_bias=bias, mlp_bias=bias)
    elif model_type == "mistral":
        config = transformers.MistralConfig(**common)
    else:
        config = transformers.Qwen2Config(**common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(1.0, 0.2)
                elif name.endswith(".bias"):
                    p.normal_(0.0, 0.05)
                else:
                    p.normal_(0.0, 0.08)
    return model


def _ids(n=2, t=13, seed=1):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize(
    "kind,kw",
    [
        ("llama", {}),
        ("llama", {"tie": False, "bias": True}),
        ("llama", {"hidden": 48, "heads": 4, "kv_heads": 4, "inter": 96}),  # Paley I (12), no GQA
        ("llama", {"hidden": 72, "heads": 3, "kv_heads": 1, "inter": 80}),  # Paley II (36), 20
        ("mistral", {}),
        ("qwen2", {"hidden": 48, "heads": 2, "kv_heads": 1, "inter": 96}),  # q/k/v biases, head_dim 24
    ],
)
def test_fused_rotation_preserves_logits(kind, kw):
    ids = _ids()
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 2e-5)):
        # transformers' RMSNorm computes in float32 even for a float64 model: ~1e-7 either way
        model = _llama(kind, dtype=dtype, **kw)
        ref = _logits(model, ids)
        tied_before = model.lm_head.weight is model.model.embed_tokens.weight
        emb_before = model.model.embed_tokens.weight.detach().clone()
        record = rotate_model(model, seed=7)
        out = _logits(model, ids)
        assert _rel(out, ref) < tol, (kind, kw, dtype, _rel(out, ref))
        assert record["untied_embeddings"] is tied_before and model.config.tie_word_embeddings is False
        assert model.lm_head.weight is not model.model.embed_tokens.weight
        assert not torch.allclose(model.model.embed_tokens.weight, emb_before)
        for name, p in model.named_parameters():
            if "norm" in name:
                assert torch.equal(p, torch.ones_like(p)), name
        assert all(isinstance(b.mlp.down_proj.input_rotation, OnlineHadamard) for b in model.model.layers)
        assert rotation_of(model) is record and record["seed"] == 7
        assert json.loads(json.dumps(record)) == record


def test_rotation_without_online_transform_and_determinism():
    ids = _ids()
    a, b = _llama(), _llama()
    ref = _logits(a, ids)
    rec_a = rotate_model(a, seed=3, online_down_proj=False)
    assert rec_a["online"] == {} and not any(isinstance(m, OnlineHadamard) for m in a.modules())
    assert _rel(_logits(a, ids), ref) < 2e-5
    rec_b = rotate_model(b, seed=3, online_down_proj=False)
    assert rec_a == rec_b
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(RotationError, match="already rotated"):
        rotate_model(a, seed=3)


def test_rotated_weights_are_incoherent():
    """A weight with one huge column (an outlier input channel) loses it after rotation."""
    model = _llama(tie=False)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[:, 5] *= 50
        model.model.layers[0].input_layernorm.weight.fill_(1.0)
    W = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    rotate_model(model, seed=0)
    Wr = model.model.layers[0].self_attn.q_proj.weight.detach()
    def peak(w):
        return float(w.abs().max() / w.pow(2).mean().sqrt())
    assert peak(Wr) < peak(W) / 3


# =========================================================================== bad input


def test_unsupported_architecture_is_named():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="model_type 'gpt2'"):
        rotate_model(gpt2)


def test_layernorm_instead_of_rmsnorm_is_refused():
    model = _llama()
    model.model.layers[1].post_attention_layernorm = torch.nn.LayerNorm(64)
    with pytest.raises(UnsupportedArchitectureError, match=r"model.layers.1.post_attention_layernorm \(LayerNorm\)"):
        rotate_model(model)
    assert rotation_of(model) is None


def test_missing_module_and_unknown_mlp_are_named():
    model = _llama()
    del model.model.layers[0].mlp.up_proj
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM.*no module 'mlp.up_proj'"):
        rotate_model(model)
    model = _llama()
    del model.model.layers[1].self_attn.o_proj  # every block is checked, not only the first
    with pytest.raises(UnsupportedArchitectureError, match="model.layers.1 has no module 'self_attn.o_proj'"):
        rotate_model(model)


def test_a_quantized_model_cannot_be_rotated():
    from pvq.methods import get_method

    model = _llama()
    m = get_method("rtn")
    lin = model.model.layers[0].mlp.down_proj
    qt = m.quantize(lin.weight.detach(), None, m.config_class(bits=4, group_size=32))
    model.model.layers[0].mlp.down_proj = QuantizedLinear.from_quantized(qt, {"bits": 4, "group_size": 32})
    with pytest.raises(UnsupportedArchitectureError, match="QuantizedLinear, not nn.Linear"):
        rotate_model(model)


# =========================================================================== pipeline + checkpoint


@pytest.mark.parametrize("method,config", [("rtn", {"bits": 4, "group_size": 16}),
                                           ("pvq", {"group_size": 16, "shape_bits": 3.0, "gain": "beta", "gain_bits": 4})])
def test_rotated_quantized_checkpoint_round_trip(tmp_path, method, config):
    model = _llama(hidden=48, heads=4, kv_heads=2, inter=96, tie=True)  # 48 = 12 * 4, 96 = 12 * 8
    ids = _ids()
    ref_float = _logits(model, ids)
    record = rotate_model(model, seed=11)
    result = quantize_model(model, adapter_for(model), _ids(4, 16, seed=3), method, config, progress=False)
    quantized_model(model, dict(result), method, config)
    expected = _logits(model, ids)
    cos = torch.nn.functional.cosine_similarity(expected.flatten(), ref_float.flatten(), dim=0)
    assert cos > 0.8  # quantized, but still the same model
    save_checkpoint(model, tmp_path / "ck")
    config_json = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config_json["quantization_config"]["rotation"] == record and config_json["tie_word_embeddings"] is False
    loaded, _, info = load_checkpoint(tmp_path / "ck")
    assert info["quantization_config"]["rotation"] == record and rotation_of(loaded) == record
    down = loaded.model.layers[1].mlp.down_proj
    assert isinstance(down, QuantizedLinear) and isinstance(down.input_rotation, OnlineHadamard)
    assert torch.equal(_logits(loaded, ids), expected)


def test_unrotated_checkpoint_records_no_rotation(tmp_path):
    model = _llama()
    result = quantize_model(model, adapter_for(model), _ids(2, 16, seed=3), "rtn", {"bits": 4, "group_size": 16},
                            progress=False)
    quantized_model(model, dict(result), "rtn", {"bits": 4, "group_size": 16})
    save_checkpoint(model, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]["rotation"] is None
    assert rotation_of(load_checkpoint(tmp_path / "ck")[0]) is None


@pytest.fixture(scope="module")
def rotated_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("rot") / "ck"
    model = _llama(hidden=48, heads=4, kv_heads=2, inter=96)
    rotate_model(model, seed=2)
    result = quantize_model(model, adapter_for(model), _ids(2, 16, seed=3), "rtn", {"bits": 4, "group_size": 16},
                            progress=False)
    quantized_model(model, dict(result), "rtn", {"bits": 4, "group_size": 16})
    save_checkpoint(model, root)
    return root


def _edit_manifest(src: Path, dst: Path, edit) -> Path:
    """A copy of the checkpoint with its quantization_config edited (loaded with verify=False)."""
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config["quantization_config"])
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return dst


@pytest.mark.parametrize(
    "edit,error,message",
    [
        (lambda m: m["rotation"].update(seed=3), CheckpointRotationError, "not rotation 'residual' of size 48 with seed 3"),
        (lambda m: m["rotation"]["online"]["model.layers.0.mlp.down_proj"].update(seed=9), CheckpointRotationError,
         "with seed 2"),
        (lambda m: m["rotation"]["v_o"][1].update(digest="f" * 64), CheckpointRotationError, "recorded digest"),
        (lambda m: [r.update(seed=5) for r in [m["rotation"]["residual"], *m["rotation"]["v_o"],
                                               *m["rotation"]["online"].values()]] and m["rotation"].update(seed=5),
         CheckpointRotationError, "cannot be rebuilt: recorded digest"),
        (lambda m: m["rotation"]["residual"].update(n=50), CheckpointRotationError, "size 48"),
        (lambda m: m["rotation"].update(intermediate_size=100), CheckpointRotationError, "intermediate_size 100"),
        (lambda m: m["rotation"].update(kind="spin"), CheckpointRotationError, "unknown rotation kind 'spin'"),
        (lambda m: m["rotation"]["online"].pop("model.layers.1.mlp.down_proj"), CheckpointRotationError,
         "one per layer"),
        (lambda m: m["rotation"].pop("v_o"), CheckpointRotationError, "lacks 'v_o'"),
        (lambda m: m.update(rotation=[1]), CheckpointError, "'rotation' must be an object"),
        (lambda m: m.update(format_version=2), CheckpointVersionError, "older pvq layout"),
    ],
)
def test_corrupted_rotation_record_fails_on_load(rotated_ckpt, tmp_path, edit, error, message):
    bad = _edit_manifest(rotated_ckpt, tmp_path / "bad", edit)
    with pytest.raises(error, match=message):
        load_checkpoint(bad, verify=False)


def test_install_rotation_checks_the_model():
    model = _llama()
    record = rotate_model(_llama(), seed=0)
    fresh = _llama()
    install_rotation(fresh, record)
    assert rotation_of(fresh) == record
    with pytest.raises(RotationError, match="already carries a rotation"):
        install_rotation(fresh, record)
    other = _llama(hidden=48, inter=96)
    with pytest.raises(RotationError, match="hidden_size 64, the model has 48"):
        install_rotation(other, record)
    with pytest.raises(RotationError, match="not an object"):
        install_rotation(model, None)


# =========================================================================== job + CLI


def test_quantize_job_with_rotation(tmp_path):
    from pvq.cli import build_parser
    from pvq.jobs import JobOptions, format_report, run_quantize_job

    text = "the quick brown fox jumps over the lazy dog. " * 100
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(text + "\n= "))
    vocab = {"<unk>": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    model = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "model")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>").save_pretrained(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(text)
    (tmp_path / "wiki.test.raw").write_text(" \n = Title = \n \n" + text[:2000] + "\n \n")
    args = build_parser().parse_args(["quantize", "--rotate", "--rotate-seed", "4"])
    assert args.rotate is True and args.rotate_seed == 4
    out = tmp_path / "ck"
    report = run_quantize_job(JobOptions(
        model=str(tmp_path / "model"), method="rtn", config={"bits": 4, "group_size": 32}, out=str(out),
        calib_text=str(tmp_path / "calib.txt"), calib_windows=2, calib_seqlen=32, batch_size=2,
        eval_text=str(tmp_path / "wiki.test.raw"), eval_seqlen=32, eval_windows=2, agreement_windows=1,
        rotate=True, rotate_seed=4, finetune=None,
    ))
    assert report["rotation"].startswith("randomized Hadamard, seed 4: residual 64 = 1x64 sylvester")
    assert "rotation" in format_report(report)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["rotation"]["seed"] == 4 and report["recipe"]["rotate"] is True and report["recipe"]["rotate_seed"] == 4
    assert math.isfinite(report["ppl_quantized"]) and report["top1_agreement"] > 0.5


# =========================================================================== the real model




@pytest.mark.slow
def test_real_model_rotation_preserves_logits(real_model, capsys):
    model, tokenizer, _ = real_model
    from pvq.eval.perplexity import wikitext2_test_text
    from pvq.calibrate import encode_text

    ids = encode_text(tokenizer, wikitext2_test_text())[:512].reshape(2, 256)
    ref = _logits(model, ids).double()
    record = rotate_model(model, seed=0)
    out = _logits(model, ids).double()
    max_rel = float((out - ref).abs().max() / ref.abs().max())
    per_token = float(((out - ref).norm(dim=-1) / ref.norm(dim=-1)).max())
    with capsys.disabled():
        print(f"\nsmollm2-135m rotated vs original, float32, {ids.numel()} tokens: max |dlogit| / max |logit| = "
              f"{max_rel:.3e}, max per-token relative L2 error = {per_token:.3e}; "
              f"residual {record['residual']['construction']} x{576 // record['residual']['K']}, "
              f"online {record['online']['model.layers.0.mlp.down_proj']['construction']}")
    assert record["hidden_size"] == 576 and record["residual"]["K"] == 36 and record["head_dim"] == 64
    assert record["intermediate_size"] == 1536 and record["untied_embeddings"] is True
    assert max_rel < 1e-3 and per_token < 1e-3
    assert torch.equal(out.argmax(-1), ref.argmax(-1)) or (out.argmax(-1) != ref.argmax(-1)).float().mean() < 0.01
