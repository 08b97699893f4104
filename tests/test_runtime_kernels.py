"""Kernels of PVQ layers: CPU (numba) and Triton (through its interpreter) against the
reference decode-then-`F.linear`, damaged codes, fallbacks, and `pvq convert` re-encoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from conftest import printable_char_tokenizer

import pvq
from pvq.fileio import sha256_file
from pvq.checkpoint import INDEX_FILE, load_checkpoint, save_checkpoint
from pvq.runtime import LayerCodecError, QuantizedLinear, decoded_weights
from pvq.runtime.cpu_kernels import decoded_weight, gemv_max_rows
from pvq.runtime.kernels import DEQUANTIZE
from pvq.checkpoint.reencode import convert_checkpoint
from pvq.models import tiny_llama
from pvq.oneshot import Recipe, oneshot
from pvq.methods import get_method

#: Relative output error allowed between a kernel and the reference (float32 rounding
#: of the scale and another summation order).
TOLERANCE = 1e-5


def layer(D=16, gain="empirical", R=48, C=96, bias=True, enumeration="auto", seed=0):
    torch.manual_seed(seed)
    cfg = {"group_size": D, "shape_bits": 3.0, "gain": gain, "use_hessian": False, "enumeration": enumeration}
    qt = get_method("pvq").quantize(torch.randn(R, C), None, get_method("pvq").make_config(cfg))
    return QuantizedLinear.from_quantized(qt, cfg, torch.randn(R) if bias else None, name="test.linear")


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("D, gain", [(16, "empirical"), (16, "fp16"), (8, "beta"), (4, "fp16"), (12, "empirical")])
def test_cpu_kernels_match_the_reference(D, gain):
    lin = layer(D, gain)
    assert lin.layout["enumeration"] == "split"
    ref_w = lin.dequantize()
    assert rel(decoded_weight(lin), ref_w) < TOLERANCE
    assert gemv_max_rows(lin) == 2  # a small layer
    for rows, kernel in ((1, "pvq-cpu-gemv"), (2, "pvq-cpu-gemv"), (3, "pvq-cpu-decode-gemm"),
                         (40, "pvq-cpu-decode-gemm")):
        x = torch.randn(rows, lin.in_features)
        y = lin(x)
        assert lin.last_kernel == kernel
        assert rel(y, DEQUANTIZE.forward(lin, x)) < TOLERANCE
    # other dtypes and leading dimensions
    x = torch.randn(2, 3, lin.in_features, dtype=torch.bfloat16)
    y = lin(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, lin.out_features)


@pytest.mark.parametrize("gain", ["beta", "empirical"])
def test_cpu_kernels_apply_gain_escapes(gain):
    torch.manual_seed(1)
    W = torch.randn(48, 96) * torch.exp(1.5 * torch.randn(48, 6, 1)).repeat_interleave(16, dim=2).reshape(48, 96)
    cfg = {"group_size": 16, "shape_bits": 3.0, "gain": gain, "use_hessian": False, "gain_escapes": 2}
    qt = get_method("pvq").quantize(W, None, get_method("pvq").make_config(cfg))
    used = qt.tensors["escape_groups"] < 6
    assert 0 < used.sum() < used.size  # some slots used, some free
    lin = QuantizedLinear.from_quantized(qt, cfg, None, name="test.escapes")
    assert torch.equal(lin.dequantize(), get_method("pvq").dequantize(qt))
    assert rel(decoded_weight(lin), lin.dequantize()) < TOLERANCE
    for rows in (1, 5):
        x = torch.randn(rows, 96)
        assert rel(lin(x), DEQUANTIZE.forward(lin, x)) < TOLERANCE
    from pvq.runtime import triton_kernels
    assert "escapes" in triton_kernels.triton_refusal(lin)
    _the_triton_refusal_is_decided_once_per_layer_and_device(lin, triton_kernels)


def _the_triton_refusal_is_decided_once_per_layer_and_device(lin, triton_kernels):
    """What `select_kernel` asks the Triton kernels on every CUDA call is looked up, not
    recomputed (checked on CPU: the lookup does not depend on the device type)."""
    from unittest import mock

    from pvq.runtime.kernels.triton import triton_refusal_of

    lin.__dict__.pop("_triton_choice", None)
    with mock.patch.object(triton_kernels, "triton_refusal", wraps=triton_kernels.triton_refusal) as spy:
        first = triton_refusal_of(lin, torch.device("cpu"))
        assert triton_refusal_of(lin, torch.device("cpu")) == first == triton_kernels.triton_refusal(lin)
        assert spy.call_count == 2  # once for the cache, once in the comparison above
        triton_refusal_of(lin, torch.device("meta"))  # another device: decided again
        assert spy.call_count == 3


@pytest.mark.parametrize("method, config", [("rtn", {"bits": 3, "group_size": 32}),
                                            ("gptq", {"bits": 4, "group_size": 16, "act_order": True}),
                                            ("gptq", {"bits": 2, "group_size": -1, "act_order": False})])
def test_cpu_kernels_serve_grid_methods(method, config):
    m = get_method(method)
    W = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    X = torch.randn(200, 64, generator=torch.Generator().manual_seed(1))
    lin = QuantizedLinear.from_quantized(m.quantize(W, X.T @ X / 200, m.make_config(config)), config, torch.randn(40))
    ref_w = lin.dequantize()
    for rows, kernel in ((1, "pvq-cpu-gemv"), (2, "pvq-cpu-gemv"), (7, "pvq-cpu-decode-gemm")):
        x = torch.randn(rows, 64)
        y = lin(x)
        assert lin.last_kernel == kernel
        assert rel(y, torch.nn.functional.linear(x, ref_w, lin.bias)) < TOLERANCE
    stored = decoded_weight(lin)  # bit-identical to the reference, in stored column order
    perm = lin.payload().get("perm")
    assert torch.equal(stored, ref_w if perm is None else ref_w[:, torch.from_numpy(perm.astype(np.int64))])


def test_threads_split_rows_without_changing_results():
    lin = layer(R=512, C=256)
    x = torch.randn(3, 256)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lin(x)
        torch.set_num_threads(2)
        two = lin(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each output row is computed by one thread, same order


def test_fischer_layers_fall_back_with_one_warning(monkeypatch):
    from pvq.runtime.kernels import base

    monkeypatch.setattr(base, "_WARNED", set())  # once per process and reason: start afresh
    lin = layer(enumeration="fischer")
    x = torch.randn(1, lin.in_features)
    with pytest.warns(UserWarning, match="Fischer's order"):
        y = lin(x)
    assert lin.last_kernel == "dequantize" and torch.equal(y, DEQUANTIZE.forward(lin, x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lin(x)  # once per reason


@pytest.mark.parametrize("rows", [1, 40])
def test_damaged_codes_are_caught_like_the_reference_decoder(rows):
    lin = layer()
    lin.codes[6:12] = 255  # all-ones bits: a code of row 0 beyond N(16, 27) (48-bit codes can hold 2^48 - 1)
    x = torch.randn(rows, lin.in_features)
    with pytest.raises(LayerCodecError, match="out of range"):
        lin(x)
    with pytest.raises(LayerCodecError, match="out of range"):
        lin.dequantize()


def test_triton_kernels_match_the_reference_in_the_interpreter():
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    script = textwrap.dedent("""
        import torch
        import pvq  # noqa: F401
        from pvq.methods import get_method
        from pvq.runtime import QuantizedLinear, LayerCodecError
        from pvq.runtime import triton_kernels as tk
        torch.manual_seed(0)
        for D, gain in ((16, "empirical"), (16, "fp16"), (8, "beta"), (4, "fp16")):
            cfg = {"group_size": D, "shape_bits": 3.0, "gain": gain, "use_hessian": False}
            qt = get_method("pvq").quantize(torch.randn(24, 64), None, get_method("pvq").make_config(cfg))
            lin = QuantizedLinear.from_quantized(qt, cfg, None)
            assert tk.triton_refusal(lin) is None
            ref = lin.dequantize()
            w = tk.triton_decode(lin)
            assert float((w - ref).norm() / ref.norm()) < 1e-5, (D, gain)
            x = torch.randn(3, 64)
            y = tk.triton_gemv(lin, x)
            assert float((y - x @ ref.T).norm() / (x @ ref.T).norm()) < 1e-5, (D, gain)
        lin.codes[0:4] = 255
        try:
            tk.triton_decode(lin)
        except LayerCodecError:
            print("damaged: caught")
        fischer = QuantizedLinear.from_quantized(
            get_method("pvq").quantize(torch.randn(8, 32), None, get_method("pvq").make_config(
                {"group_size": 16, "use_hessian": False, "enumeration": "fischer"})),
            {"group_size": 16, "use_hessian": False, "enumeration": "fischer"}, None)
        assert "Fischer" in tk.triton_refusal(fischer)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "damaged: caught" in out.stdout and out.stdout.strip().endswith("ok")


def _tiny_fischer_checkpoint(path):
    model = tiny_llama(seed=0)
    config = {"group_size": 16, "shape_bits": 3.0, "gain": "empirical", "enumeration": "fischer"}
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    oneshot(model, None, Recipe(method="pvq", config=config, batch_size=2, finetune=None), windows=windows,
            progress=False)
    save_checkpoint(model, path, tokenizer=printable_char_tokenizer())
    return model


def _logits(model):
    x = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), decoded_weights(model):
        return model(x).logits


def test_convert_reencodes_fischer_checkpoints_including_format_4(tmp_path):
    old = tmp_path / "old"
    model = _tiny_fischer_checkpoint(old)
    expected = _logits(model)
    # make it a format-4 directory, as pvq wrote before the split order existed
    cfg_path = old / "config.json"
    cfg = json.loads(cfg_path.read_text())
    qc = cfg["quantization_config"]
    qc["format_version"] = 4
    del qc["config"]["enumeration"]
    cfg_path.write_text(json.dumps(cfg, indent=2))
    index = json.loads((old / INDEX_FILE).read_text())
    index["format_version"] = 4
    index["files"]["config.json"].update(sha256=sha256_file(cfg_path), bytes=cfg_path.stat().st_size)
    (old / INDEX_FILE).write_text(json.dumps(index))
    v4, _, _ = load_checkpoint(old)
    assert {m.layout["enumeration"] for m in v4.modules() if isinstance(m, QuantizedLinear)} == {"fischer"}
    assert torch.equal(_logits(v4), expected)
    new = tmp_path / "new"
    _, changed = convert_checkpoint(old, new)
    assert len(changed) == 14
    converted, _, _ = load_checkpoint(new)
    qc = json.loads((new / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 5 and qc["config"]["enumeration"] == "split"
    assert {m.layout["enumeration"] for m in converted.modules() if isinstance(m, QuantizedLinear)} == {"split"}
    assert torch.equal(_logits(converted), expected)  # same points, other codes: identical weights
    x = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast = converted(x).logits
        with decoded_weights(converted):
            slow = converted(x).logits
    assert rel(fast, slow) < 1e-4
    with pytest.raises(pvq.runtime.CheckpointError, match="NEW must differ"):
        convert_checkpoint(new, new)


def test_enumeration_setting():
    pvq_method = get_method("pvq")
    assert pvq_method.make_config({"group_size": 16}).code_order == "split"
    assert pvq_method.make_config({"group_size": 64, "shape_bits": 3.0}).code_order == "fischer"  # 192-bit codes
    with pytest.raises(pvq.methods.QuantizationError, match="enumeration='split' keeps codes below 2\\^53"):
        pvq_method.make_config({"group_size": 64, "enumeration": "split"})
    with pytest.raises(pvq.methods.QuantizationError, match="enumeration must be one of"):
        pvq_method.make_config({"enumeration": "zigzag"})
    # both orders store the same points
    a, b = layer(enumeration="split"), layer(enumeration="fischer")
    assert torch.equal(a.dequantize(), b.dequantize()) and not torch.equal(a.codes, b.codes)


def test_inputs_a_layer_cannot_take_are_named():
    from pvq.runtime.errors import LayerInputError

    lin = layer()
    for x, message in ((torch.ones(2, lin.in_features, dtype=torch.long), "expects a floating-point input, got torch.int64"),
                       (torch.randn(2, lin.in_features + 1), r"expects inputs of width 96, got shape \(2, 97\)"),
                       (torch.randn(2, lin.in_features, device="meta"), "input on meta but the packed payload is on cpu")):
        with pytest.raises(LayerInputError, match=message):
            lin(x)
    # every float dtype is served, computed in the input's dtype
    x = torch.randn(3, lin.in_features)
    for dtype in (torch.float64, torch.bfloat16):
        out = lin(x.to(dtype))
        assert out.dtype == dtype and rel(out.float(), lin(x)) < 1e-2
