"""Activation quantization (simulated / fake quantization of linear-layer inputs)."""

from __future__ import annotations

import itertools
import re
import json
import shutil

import numpy as np
import pytest
from conftest import cli_error, write_texts
import torch

pytest.importorskip("transformers")

from pvq.codec import decode, pulses_for_bits, search, unpack_codes
from pvq.codec.scalar import uniform_rtn
from pvq.checkpoint import load_checkpoint, quantized_model, save_checkpoint
from pvq.runtime import CheckpointActQuantError, QuantizedLinear
from pvq.models import adapter_for, tiny_llama
from pvq.calibrate import quantize_model
from pvq.activations import (
    QUANTIZER_ATTRIBUTE,
    ActQuantConfig,
    ActQuantError,
    ActQuantizer,
    act_quant_of,
    decode_activations,
    encode_activations,
    fake_quantize,
    install_act_quant,
    install_act_quant_record,
    remove_act_quant,
)
from pvq.rotation import OnlineHadamard, RandomizedHadamard, rotate_model


def _gauss(T=64, C=256, seed=0, dtype=torch.float32):
    return torch.randn(T, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _mse(a, b):
    return float((a.double() - b.double()).pow(2).mean())


# =========================================================================== RTN


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [16, 64, -1])
def test_rtn_symmetric_is_the_codec_uniform_rtn(bits, group):
    x = _gauss(16, 128, seed=bits) * 3
    got = fake_quantize(x.double(), ActQuantConfig("rtn", bits, group))
    want = uniform_rtn(x.double().numpy(), bits, 128 if group == -1 else group)
    assert np.array_equal(got.numpy(), want)


def test_rtn_asymmetric_matches_direct_formula():
    x = _gauss(8, 64, seed=1) + 0.7  # off-centre, so the zero point matters
    b, D, c = 4, 16, 0.9
    got = fake_quantize(x, ActQuantConfig("rtn", b, D, symmetric=False, clip_ratio=c))
    g = x.reshape(8, 4, D)
    lo = (g.amin(-1) * c).clamp(max=0)
    hi = (g.amax(-1) * c).clamp(min=0)
    scale = ((hi - lo) / (2**b - 1)).to(torch.float16)
    scale = torch.where(scale.float() < (hi - lo) / (2**b - 1), torch.nextafter(scale, torch.tensor(float("inf"), dtype=torch.float16)), scale)
    s = scale.float()[..., None]
    z = torch.round(-lo / scale.float()).clamp(0, 2**b - 1)[..., None]
    want = ((torch.round(g / s) + z).clamp(0, 2**b - 1) - z) * s
    assert torch.equal(got, want.reshape(8, 64))


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_decreases_with_bits(symmetric):
    x = _gauss(64, 128, seed=2)
    errs = [_mse(fake_quantize(x, ActQuantConfig("rtn", b, 32, symmetric=symmetric)), x) for b in range(2, 9)]
    assert all(e1 > 2.5 * e2 for e1, e2 in itertools.pairwise(errs)), errs


# =========================================================================== PVQ


@pytest.mark.parametrize("gain,search_method", [("fp16", "paper"), ("fp16", "refined"), ("beta", "greedy")])
def test_pvq_output_is_gain_times_pyramid_point(gain, search_method):
    T, C, D, bits = 12, 96, 32, 3.5
    config = ActQuantConfig("pvq", bits, D, gain=gain, gain_bits=6, search_method=search_method)
    K = pulses_for_bits(D, bits)
    x = _gauss(T, C, seed=3, dtype=torch.float64)
    y = fake_quantize(x, config)
    payload = encode_activations(x, config)
    points = decode(unpack_codes(payload.tensors["codes"], T * C // D, config.code_bits(D)), D, K)
    assert (np.abs(points).sum(axis=1) == K).all()  # on the pyramid P(D, K)
    assert np.array_equal(points, search(x.numpy().reshape(-1, D), K, search_method))  # the codec's search
    u = points / np.linalg.norm(points, axis=1, keepdims=True)
    groups = y.numpy().reshape(-1, D)
    gains = np.linalg.norm(groups, axis=1)
    assert np.allclose(groups, gains[:, None] * u, rtol=0, atol=1e-12)  # y = gain * p / ||p||
    if gain == "fp16":
        assert np.allclose(payload.tensors["gains"].astype(np.float64).reshape(-1), gains, rtol=1e-14, atol=0)
    # the least-squares gain of the shape, rounded to float16
    ls = (x.numpy().reshape(-1, D) * u).sum(axis=1)
    assert np.allclose(gains, ls, rtol=2e-2 if gain == "beta" else 1e-3, atol=0.2 if gain == "beta" else 0)


def test_pvq_per_token_determinism_and_shapes():
    config = ActQuantConfig("pvq", 4.0, 32)
    x = _gauss(2 * 5, 64, seed=4).reshape(2, 5, 64)
    y = fake_quantize(x, config)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y, fake_quantize(x.clone(), config))  # repeatable
    for b in range(2):
        for t in range(5):  # a token's result does not depend on the rest of the batch
            assert torch.equal(fake_quantize(x[b, t : t + 1], config)[0], y[b, t])
    assert torch.equal(fake_quantize(x.flip(1), config), y.flip(1))
    half = fake_quantize(x.to(torch.bfloat16), config)
    assert half.dtype == torch.bfloat16 and half.shape == x.shape
    assert fake_quantize(torch.zeros(0, 64), config).shape == (0, 64)
    assert torch.equal(fake_quantize(torch.zeros(3, 64), config), torch.zeros(3, 64))


@pytest.mark.parametrize("config", [
    ActQuantConfig("rtn", 4, 64), ActQuantConfig("rtn", 3, 32, symmetric=False, clip_ratio=0.9),
    ActQuantConfig("pvq", 4.0, 64), ActQuantConfig("pvq", 3.0, 32, gain="beta", gain_bits=5),
    ActQuantConfig("pvq", 2.5, -1),
])
def test_real_encode_decode_equals_simulated_and_bits_per_value(config):
    x = _gauss(40, 192, seed=5) * 2
    fake = fake_quantize(x, config)
    payload = encode_activations(x, config)
    assert torch.equal(decode_activations(payload).to(x.dtype), fake)
    if config.method == "pvq":
        assert torch.equal(fake_quantize(x, ActQuantConfig(**{**config.to_dict(), "encode": True})), fake)
    nominal = config.bits_per_value(192)
    assert nominal <= payload.bits_per_value <= nominal + 8 * len(payload.tensors) / x.numel()  # + byte padding


def test_bits_per_value_accounting():
    assert ActQuantConfig("rtn", 4, 128).bits_per_value(512) == 4 + 16 / 128  # 4.125
    assert ActQuantConfig("rtn", 4, 128, symmetric=False).bits_per_value(512) == 4 + 20 / 128
    assert ActQuantConfig("rtn", 4, -1).bits_per_value(576) == 4 + 16 / 576
    pvq = ActQuantConfig("pvq", 4.0, 128)
    assert pvq.pulses(128) == 386 and pvq.code_bits(128) == 512
    assert pvq.bits_per_value(512) == 4.125  # the paper's Table 3 setting: 4-bit shapes + fp16 gain per 128
    assert ActQuantConfig("pvq", 4.0, 192).bits_per_value(576) == (768 + 16) / 192
    beta = ActQuantConfig("pvq", 3.0, 32, gain="beta", gain_bits=4)
    assert beta.bits_per_value(256) == (beta.code_bits(32) + 4) / 32 + 16 / 256


def test_pvq_beats_rtn_on_rotated_activations_at_equal_bits():
    """~4.125 bits per value (D = 128: 4-bit codes / shapes + one float16 scale / gain),
    Gaussian rows and heavy-tailed rows after a randomized Hadamard rotation."""
    g = torch.Generator().manual_seed(6)
    gauss = torch.randn(256, 512, generator=g)
    # Student-t (3 degrees of freedom) from the seeded generator: torch.distributions draws
    # from the global generator, whose state depends on the tests run before this one
    t3 = torch.randn(256, 512, generator=g) / torch.randn(3, 256, 512, generator=g).pow(2).mean(0).sqrt()
    heavy = t3 * torch.rand(256, 1, generator=g).mul(4).exp()
    heavy = RandomizedHadamard.build(512, 0, "test").apply(heavy.double()).float()
    pvq = ActQuantConfig("pvq", 4.0, 128)
    assert pvq.bits_per_value(512) == 4.125
    for x in (gauss, heavy):
        e_pvq = _mse(fake_quantize(x, pvq), x)
        for clip in (1.0, 0.9, 0.8):
            rtn = ActQuantConfig("rtn", 4, 128, clip_ratio=clip)
            assert rtn.bits_per_value(512) == 4.125
            assert e_pvq < 0.75 * _mse(fake_quantize(x, rtn), x)


# =========================================================================== bad options


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="int4"), "activation method must be one of"),
    (dict(method="rtn", bits=1), r"rtn activation bits must be an integer in 2\.\.8"),
    (dict(method="rtn", bits=9), r"rtn activation bits must be an integer in 2\.\.8"),
    (dict(method="rtn", bits=4.5), r"rtn activation bits must be an integer"),
    (dict(method="pvq", bits=0), r"pvq activation shape bits must be in \(0, 8\]"),
    (dict(method="pvq", bits=8.5), r"pvq activation shape bits must be in \(0, 8\]"),
    (dict(method="pvq", bits=0.05, group_size=8), "buy no pulse for D=8"),
    (dict(group_size=1), "group_size must be an integer >= 2 or -1"),
    (dict(group_size=0), "group_size must be an integer >= 2 or -1"),
    (dict(method="rtn", clip_ratio=0), r"clip_ratio must be in \(0, 1\]"),
    (dict(gain="fp8"), "activation gain must be one of"),
    (dict(search_method="brute"), "search_method must be one of"),
])
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ActQuantError, match=message):
        ActQuantConfig(**kwargs)


def test_group_size_not_dividing_the_width_says_what_to_do():
    with pytest.raises(ActQuantError, match=r"does not divide the layer input width 576; use --act-group-size 96 or 144 "):
        fake_quantize(torch.zeros(2, 576), ActQuantConfig("rtn", 4, 128))
    model = tiny_llama(hidden=48, heads=4, kv_heads=2, intermediate=96)
    names = adapter_for(model).quantized_layer_names(model)
    with pytest.raises(ActQuantError, match=r"group size 32 does not divide the input width 48 of 'model\.layers\.0\..*"
                                            r"use --act-group-size 24 or 48 \(divisors of 48, 96\)"):
        install_act_quant(model, ActQuantConfig("pvq", 4.0, 32), names)
    assert act_quant_of(model) is None and not any(isinstance(m, ActQuantizer) for m in model.modules())
    with pytest.raises(ActQuantError, match="at least 2 groups per token"):
        install_act_quant(model, ActQuantConfig("pvq", 4.0, -1, gain="beta"), names)
    with pytest.raises(ActQuantError, match="not a module of the model"):
        install_act_quant(model, ActQuantConfig("rtn", 4, 16), ["model.layers.0.mlp.nope"])
    with pytest.raises(ActQuantError, match="non-finite"):
        fake_quantize(torch.full((1, 64), float("nan")), ActQuantConfig("pvq", 4.0, 32))


# =========================================================================== in a model


def _ids(batch=2, seqlen=24, seed=0):
    return torch.randint(0, 256, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def _round_dense_fp16(model, quantized_names):
    skip = {f"{n}.weight" for n in quantized_names}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key not in skip and value.is_floating_point():
                value.copy_(value.to(torch.float16).to(value.dtype))


def test_quantizers_see_every_linear_input_including_the_online_hadamard_output():
    model = tiny_llama(seed=1)
    rotate_model(model, seed=0)
    names = adapter_for(model).quantized_layer_names(model)
    install_act_quant(model, ActQuantConfig("rtn", 8, 16), names)
    seen, rotated = {}, {}
    for name in names:
        q = model.get_submodule(name).get_submodule(QUANTIZER_ATTRIBUTE)
        q.register_forward_hook(lambda m, a, o, name=name: seen.setdefault(name, a[0]))
    for i, layer in enumerate(model.model.layers):
        assert isinstance(layer.mlp.down_proj.input_rotation, OnlineHadamard)
        layer.mlp.down_proj.input_rotation.register_forward_hook(lambda m, a, o, i=i: rotated.setdefault(i, o))
    with torch.no_grad():
        model(_ids())
    assert set(seen) == set(names)
    # q/k/v and gate/up read one tensor and share one quantization of it
    for name in names:
        shares = name.endswith(("k_proj", "v_proj", "up_proj"))
        assert model.get_submodule(name).get_submodule(QUANTIZER_ATTRIBUTE).calls == (0 if shares else 1), name
        first = name.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
        assert seen[name] is seen[first]
    for i in range(len(model.model.layers)):
        assert seen[f"model.layers.{i}.mlp.down_proj"] is rotated[i]


@pytest.mark.parametrize("act", [ActQuantConfig("pvq", 4.0, 32), ActQuantConfig("rtn", 4, 16, clip_ratio=0.9),
                                 ActQuantConfig("pvq", 3.0, 16, gain="beta", gain_bits=6)])
def test_checkpoint_round_trip_with_act_quant_gives_equal_logits(tmp_path, act):
    model = tiny_llama(seed=0)
    rotate_model(model, seed=3)
    adapter = adapter_for(model)
    config = {"group_size": 16, "shape_bits": 3.0, "gain": "beta", "gain_bits": 4}
    result = quantize_model(model, adapter, _ids(4, 16, seed=3), "pvq", config, progress=False)
    quantized_model(model, dict(result), "pvq", config)
    ids = _ids()
    with torch.no_grad():
        weights_only = model(ids).logits
    record = install_act_quant(model, act, adapter.quantized_layer_names(model))
    with torch.no_grad():
        expected = model(ids).logits
    assert not torch.equal(expected, weights_only)
    save_checkpoint(model, tmp_path / "ck")
    qc = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert qc["act_quant"] == json.loads(json.dumps(record))
    loaded, _, info = load_checkpoint(tmp_path / "ck")
    assert act_quant_of(loaded) == info["quantization_config"]["act_quant"]
    down = loaded.model.layers[1].mlp.down_proj
    assert isinstance(down, QuantizedLinear) and isinstance(getattr(down, QUANTIZER_ATTRIBUTE), ActQuantizer)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    remove_act_quant(loaded)
    assert act_quant_of(loaded) is None
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, weights_only)
    remove_act_quant(model)
    assert act_quant_of(model) is None and not any(isinstance(m, ActQuantizer) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, weights_only)


def test_act_quant_record_errors(tmp_path):
    model = tiny_llama(seed=0)
    names = adapter_for(model).quantized_layer_names(model)
    result = quantize_model(model, adapter_for(model), _ids(2, 16, seed=3), "rtn", {"bits": 4, "group_size": 32},
                            progress=False)
    quantized_model(model, dict(result), "rtn", {"bits": 4, "group_size": 32})
    record = install_act_quant(model, ActQuantConfig("rtn", 4, 32), names)
    with pytest.raises(ActQuantError, match="already quantizes its activations"):
        install_act_quant(model, ActQuantConfig("rtn", 4, 32), names)
    save_checkpoint(model, tmp_path / "ck")

    def edited(name, edit):
        dst = tmp_path / name
        shutil.copytree(tmp_path / "ck", dst)
        config = json.loads((dst / "config.json").read_text())
        edit(config["quantization_config"])
        (dst / "config.json").write_text(json.dumps(config))
        return dst

    with pytest.raises(CheckpointActQuantError, match="unknown activation quantization kind"):
        load_checkpoint(edited("kind", lambda m: m["act_quant"].update(kind="int4-kernels")), verify=False)
    with pytest.raises(CheckpointActQuantError, match="newer than this pvq"):
        load_checkpoint(edited("ver", lambda m: m["act_quant"].update(version=99)), verify=False)
    with pytest.raises(CheckpointActQuantError, match="unknown activation quantization setting"):
        load_checkpoint(edited("cfg", lambda m: m["act_quant"]["config"].update(mystery=1)), verify=False)
    with pytest.raises(CheckpointActQuantError, match="does not divide"):
        load_checkpoint(edited("gs", lambda m: m["act_quant"]["config"].update(group_size=48)), verify=False)
    with pytest.raises(CheckpointActQuantError, match="not a module"):
        load_checkpoint(edited("layer", lambda m: m["act_quant"]["layers"].append("model.layers.9.mlp.down_proj")),
                        verify=False)
    fresh = tiny_llama(seed=0)
    install_act_quant_record(fresh, record)
    assert act_quant_of(fresh) == record


# =========================================================================== job and CLI

TEXT = "the quick brown fox jumps over the lazy dog. " * 100


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny_act")
    model = tiny_llama(seed=0)
    model.save_pretrained(root / "model")
    chars = sorted(set(TEXT + "\n= "))
    tok = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>").save_pretrained(root / "model")
    write_texts(root, TEXT, 2000)
    return root


def test_job_and_cli_with_act_quant(tiny_dir, tmp_path, capsys):
    from pvq.cli import main
    from pvq.jobs import JobOptions, format_report, run_quantize_job

    report = run_quantize_job(JobOptions(
        model=str(tiny_dir / "model"), method="rtn", config={"bits": 4, "group_size": 32}, out=str(tmp_path / "job"),
        calib_text=str(tiny_dir / "calib.txt"), calib_windows=2, calib_seqlen=32, batch_size=2, rotate=True,
        act={"method": "pvq", "bits": 4.0, "group_size": 32},
        eval_text=str(tiny_dir / "wiki.test.raw"), eval_seqlen=64, eval_windows=2, agreement_windows=1, finetune=None,
    ))
    assert report["bits_per_activation"] == ActQuantConfig("pvq", 4.0, 32).bits_per_value(64) == (128 + 16) / 32
    assert report["act_quant_seconds_in_ppl"] > 0
    text = format_report(report)
    assert "simulated (fake) quantization, pvq D=32" in text and "bits/activation  4.5000" in text
    qc = json.loads((tmp_path / "job" / "config.json").read_text())["quantization_config"]
    assert qc["act_quant"]["config"]["method"] == "pvq" and report["recipe"]["act"]["method"] == "pvq"

    common = ["--eval-text", str(tiny_dir / "wiki.test.raw"), "--eval-seqlen", "64", "--eval-windows", "2",
              "--device", "cpu", "--method", "rtn", "--group-size", "32", "--fast"]  # rtn one-shot: no calibration
    assert main(["quantize", str(tiny_dir / "model"), "--out", str(tmp_path / "bad"), "--act-method", "rtn",
                 "--act-group-size", "48", *common]) == 2
    assert re.search(r"does not divide the input width 64 .* --act-group-size", capsys.readouterr().err)
    assert not (tmp_path / "bad").exists()  # refused before quantizing
    assert main(["quantize", str(tiny_dir / "model"), "--out", str(tmp_path / "bad"), "--act-method", "rtn",
                 "--act-bits", "12", *common]) == 2
    assert "rtn activation bits must be an integer in 2..8" in capsys.readouterr().err
    assert main(["quantize", str(tiny_dir / "model"), "--out", str(tmp_path / "cli"), "--act-method", "rtn",
                 "--act-bits", "6", "--act-group-size", "16", *common]) == 0
    assert "activations      simulated (fake) quantization, rtn 6-bit symmetric D=16" in capsys.readouterr().out
    ev = ["--seqlen", "64", "--eval-text", str(tiny_dir / "wiki.test.raw")]
    assert main(["eval", str(tmp_path / "cli"), *ev, "--json", str(tmp_path / "e.json")]) == 0
    assert "activations: simulated (fake) quantization, rtn 6-bit" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["act_quant"]["config"]["bits"] == 6
    assert re.search("already records activation quantization", cli_error(capsys, ["eval", str(tmp_path / "cli"), *ev, "--act-method", "pvq"]))
    assert main(["eval", str(tiny_dir / "model"), *ev, "--act-method", "pvq", "--act-bits", "3", "--act-group-size", "32"]) == 0
    assert "float model\nactivations: simulated (fake) quantization, pvq D=32" in capsys.readouterr().out
