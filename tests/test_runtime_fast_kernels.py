"""The fast CPU kernels (`pvq_fast`, `grid_fast`), the int8 compute layout and `pvq chat`:
each kernel against the tree kernel it replaces and the reference decoder (decoded
weights bit for bit, outputs to float32 rounding), every layout through `pvq.load`."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import printable_char_tokenizer, scripted_input

from pvq.checkpoint import load_checkpoint, save_checkpoint
from pvq.runtime import CheckpointError, LayerCodecError, QuantizedLinear
from pvq.runtime import cpu_kernels
from pvq.runtime.cpu_kernels import cpu_state, decoded_weight, grid_rows, pvq_rows
from pvq.runtime import c_kernels
from pvq.runtime.compute_layout import Int4Weights, apply_layout, int8_refusal, transcode_int8
from pvq.runtime.kernels import DEQUANTIZE
from pvq.runtime.pvq_fast import fast_pvq_supported
from pvq.models import tiny_llama
from pvq.oneshot import Recipe, oneshot
from pvq.methods import get_method

TOLERANCE = 1e-5


def rel(a, b):
    return float((a - b).norm() / b.norm())


def pvq_layer(D=16, gain="empirical", R=40, C=96, escapes=0, shape_bits=None, seed=0, gain_bits=None):
    shape_bits = shape_bits or (1.5 if D == 32 else 3.0)  # D=32 codes must stay below 2^53
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(R, C, generator=g) * torch.exp(torch.randn(R, C // D, 1, generator=g)).repeat_interleave(D, 2).reshape(R, C)
    cfg = {"group_size": D, "shape_bits": shape_bits, "gain": gain, "use_hessian": False}
    if escapes:
        cfg["gain_escapes"] = escapes
    if gain_bits:
        cfg["gain_bits"] = gain_bits
    qt = get_method("pvq").quantize(W, None, get_method("pvq").make_config(cfg))
    return QuantizedLinear.from_quantized(qt, cfg, torch.randn(R, generator=g), name="test.fast")


def tree_state_outputs(lin, x):
    """The tree kernel's (`cpu_kernels.pvq_rows`) decoded weight and GEMV on the same layer."""
    state = cpu_kernels._pvq_tree_state(lin, ("tree",))
    R, C = lin.out_features, lin.in_features
    weight = np.zeros((R, C), np.float32)
    assert pvq_rows(0, R, cpu_kernels._EMPTY, *state.args, cpu_kernels._EMPTY, weight, np.int64(0)) == -1
    out = np.zeros((x.shape[0], R), np.float32)
    assert pvq_rows(0, R, x.numpy(), *state.args, out, cpu_kernels._EMPTY, np.int64(0)) == -1
    return torch.from_numpy(weight), torch.from_numpy(out)


@pytest.mark.parametrize("D, gain, escapes", [(16, "empirical", 0), (16, "fp16", 0), (8, "beta", 0),
                                              (32, "empirical", 0), (16, "empirical", 2), (8, "empirical", 1)])
def test_fast_pvq_kernel_matches_the_tree_kernel_and_the_reference(D, gain, escapes):
    lin = pvq_layer(D, gain, escapes=escapes)
    assert fast_pvq_supported(D, int(lin.layout["pulses"]))
    assert cpu_state(lin).name == "pvq-fast"
    x = torch.randn(2, lin.in_features)
    tree_w, tree_y = tree_state_outputs(lin, x)
    fast_w = decoded_weight(lin).clone()
    # the same points; the scale multiplies by a table of 1/sqrt(n) where the tree kernel divides
    assert rel(fast_w, tree_w) < 1e-7
    assert rel(fast_w, lin.dequantize()) < TOLERANCE
    y = lin(x) - lin.bias
    assert lin.last_kernel == "pvq-cpu-gemv"
    assert rel(y, tree_y) < TOLERANCE
    assert rel(lin(x), DEQUANTIZE.forward(lin, x)) < TOLERANCE


@pytest.mark.parametrize("gain_bits", [11, 14, 16])
def test_wide_gain_indices_spanning_three_bytes(gain_bits, monkeypatch):
    lin = pvq_layer(16, "beta", R=8, C=64, gain_bits=gain_bits)
    x = torch.randn(1, 64)
    ref_w, ref_y = lin.dequantize(), DEQUANTIZE.forward(lin, x)
    for backend in ("c", "numba"):
        monkeypatch.setattr(c_kernels, "_LIB", c_kernels._LIB if backend == "c" else None)
        lin._cpu_state = None
        assert rel(decoded_weight(lin), ref_w) < TOLERANCE
        assert rel(lin(x), ref_y) < TOLERANCE


def test_fast_pvq_kernel_threads_do_not_change_results(monkeypatch):
    lin = pvq_layer(R=64, C=128)
    x = torch.randn(1, 128)
    one = lin(x)
    monkeypatch.setattr(cpu_kernels, "_PARALLEL_MIN_SECONDS", 0.0)  # hand even this small layer to the pool
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = lin(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_layers_without_a_fast_decoder_keep_the_tree_kernel():
    lin = pvq_layer(D=12, R=8, C=48)
    assert cpu_state(lin).name == "pvq-tree"
    x = torch.randn(1, 48)
    assert rel(lin(x), DEQUANTIZE.forward(lin, x)) < TOLERANCE


@pytest.mark.parametrize("rows", [1, 40])
def test_fast_pvq_kernel_catches_damaged_codes(rows):
    lin = pvq_layer(R=8, C=64)
    lin.codes[6 * 5: 6 * 6] = 255  # code 5 (row 1, group 1) beyond N(16, 27) < 2^48
    with pytest.raises(LayerCodecError, match="row 1, group 1 is out of range"):
        lin(torch.randn(rows, 64))
    with pytest.raises(LayerCodecError, match="row 1, group 1 is out of range"):
        transcode_int8(lin)


@pytest.mark.parametrize("method, config", [("rtn", {"bits": 8, "group_size": 64}), ("rtn", {"bits": 4, "group_size": 32}),
                                            ("gptq", {"bits": 4, "group_size": 16, "act_order": True}),
                                            ("gptq", {"bits": 8, "group_size": -1, "act_order": False})])
def test_fast_grid_kernel_matches_the_bit_kernel_and_the_reference(method, config):
    m = get_method(method)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 128, generator=g)
    X = torch.randn(300, 128, generator=g)
    lin = QuantizedLinear.from_quantized(m.quantize(W, X.T @ X / 300, m.make_config(config)), config, None)
    state = cpu_state(lin)
    assert state.name == "grid-fast"
    lay, pay = lin.layout, lin.payload()
    slow_w = np.zeros((40, 128), np.float32)
    grid_rows(0, 40, cpu_kernels._EMPTY, pay["codes"], np.int64(lay["bits"]), np.int64(lay["group_size"]),
              np.int64(lay["num_groups"]), pay["scales"].view(np.int16), pay["zeros"], cpu_kernels._EMPTY, slow_w, np.int64(0))
    assert torch.equal(decoded_weight(lin), torch.from_numpy(slow_w))
    ref_w = lin.dequantize()
    for rows in (1, 2, 9):
        x = torch.randn(rows, 128, generator=g)
        assert rel(lin(x), torch.nn.functional.linear(x, ref_w)) < TOLERANCE


def test_decode_and_gemm_in_chunks_of_rows_gives_the_same_output(monkeypatch):
    lin = pvq_layer(R=40, C=96)
    x = torch.randn(7, 96)
    whole = lin(x)
    assert lin.last_kernel == "pvq-cpu-decode-gemm"
    monkeypatch.setattr(cpu_kernels, "DECODE_CHUNK_WEIGHTS", 96 * 6)  # chunks of 6 rows, the last one of 4
    whole_w = decoded_weight(lin).clone()
    assert torch.equal(decoded_weight(lin, 6, 12), whole_w[6:12])  # rows 6..11 alone, bit for bit
    assert rel(lin(x), whole) < TOLERANCE  # BLAS may block a narrower product differently


@pytest.mark.parametrize("D, gain, escapes", [(16, "empirical", 0), (8, "fp16", 0), (32, "beta", 0), (16, "empirical", 2)])
def test_compute_layout_holds_the_same_weights(D, gain, escapes):
    lin = pvq_layer(D, gain, escapes=escapes)
    x = torch.randn(3, lin.in_features)
    packed_w = decoded_weight(lin).clone()
    packed = {rows: lin(x[:rows]) for rows in (1, 3)}
    weights = transcode_int8(lin)
    assert weights.points.dtype == np.int8 and weights.scales.dtype == np.float32
    assert weights.nbytes == lin.out_features * lin.in_features * (1 + 4 / D)
    lin.release_payload(weights)
    assert lin.payload_released and lin.codes.numel() == 0
    assert cpu_state(lin).name == "int8"
    assert torch.equal(decoded_weight(lin), packed_w)  # bit for bit the packed layout's weight
    assert torch.equal(lin.dequantize(), packed_w)
    for rows in (1, 3):
        assert rel(lin(x[:rows]), packed[rows]) < TOLERANCE
    with pytest.raises(CheckpointError, match="compute layout.*layout='packed'"):
        lin.state_dict()


@pytest.mark.parametrize("layout", ["int8", "int4"])
def test_compute_layouts_run_on_the_numba_kernels_too(layout, monkeypatch):
    """Without the C kernels (no compiler, or PVQ_KERNELS=numba) a compute layout runs its
    numba kernel: the same weights as the C kernel forms."""
    from pvq.runtime.compute_layout import transcode

    lin = pvq_layer(16, "empirical")
    x = torch.randn(3, lin.in_features)
    lin.release_payload(transcode(lin, layout))
    c_w = decoded_weight(lin).clone()
    monkeypatch.setattr(c_kernels, "_LIB", None)
    lin._cpu_state = None
    assert cpu_state(lin).name == layout
    assert torch.equal(decoded_weight(lin), c_w)
    assert rel(lin(x[:1]), lin.dequantize() @ x[0] + lin.bias) < TOLERANCE


def test_compute_layout_refuses_layers_it_cannot_hold():
    lin = pvq_layer(D=8, shape_bits=6.0, R=4, C=32)  # K = 177 > 127, split order
    assert int(lin.layout["pulses"]) > 127
    assert "test.fast" in int8_refusal(lin) and "K=" in int8_refusal(lin)
    with pytest.raises(CheckpointError, match="test.fast.*compute layouts cannot hold"):
        transcode_int8(lin)


def test_load_in_each_layout(tmp_path):
    model = tiny_llama(seed=0)
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    oneshot(model, None, Recipe(method="pvq", config={"group_size": 16, "shape_bits": 3.0, "gain": "fp16"}, finetune=None),
            windows=windows, progress=False)
    save_checkpoint(model, tmp_path / "ckpt")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    packed, _, info = load_checkpoint(tmp_path / "ckpt")
    for layout in ("int8", "int4"):
        model, _, info8 = load_checkpoint(tmp_path / "ckpt", layout=layout)
        assert info["layout"] == "packed" and info8["layout"] == layout
        with torch.no_grad():
            for n in (1, 12):  # GEMV and decode + GEMM
                assert rel(model(ids[:, :n]).logits, packed(ids[:, :n]).logits) < 1e-4
        kinds = {m._cpu_state.name for m in model.modules() if isinstance(m, QuantizedLinear)}
        assert kinds == {layout}
    with pytest.raises(CheckpointError, match="layout must be one of packed, int8, int4"):
        load_checkpoint(tmp_path / "ckpt", layout="int2")
    with pytest.raises(ValueError, match="layout must be one of"):
        apply_layout(packed, "fp8")


def chat_setup():
    model = tiny_llama(seed=0)
    model.eval()
    tok = printable_char_tokenizer()
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>a:{% endif %}")
    return model, tok


def test_chat_keeps_the_cache_between_turns_and_matches_a_fresh_generation():
    from pvq.chat import Conversation

    model, tok = chat_setup()
    conv = Conversation(model, tok, max_new_tokens=5)
    first = conv.reply("hello")
    assert first["new_tokens"] == 5 and first["reused_tokens"] == 0
    second = conv.reply("more")
    assert second["reused_tokens"] > 0  # the first turn's prompt came from the KV cache
    # the reply equals a generation over the whole rendered history without a cache
    history = conv.messages[:-1]
    ids = tok.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        fresh = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                               pad_token_id=0)
    assert tok.decode(fresh[0, ids.shape[1]:], skip_special_tokens=True) == conv.messages[-1]["content"]


def test_chat_drops_old_turns_when_the_history_is_too_long():
    from pvq.chat import Conversation
    from pvq.generate import GenerationError

    model, tok = chat_setup()
    model.config.max_position_embeddings = 40
    conv = Conversation(model, tok, max_new_tokens=4)
    conv.reply("a" * 10)
    conv.reply("b" * 10)
    assert conv.dropped_turns >= 1 and conv.messages[0]["content"] != "a" * 10
    with pytest.raises(GenerationError, match="exceeds the model's 40 positions"):
        conv.reply("c" * 60)
    assert conv.messages[-1]["role"] == "assistant"  # the refused message is not kept


def test_chat_loop_ends_on_eof_and_refuses_tokenizers_without_a_template():
    from pvq.chat import run_chat
    from pvq.generate import GenerationError

    model, tok = chat_setup()
    lines = iter(["hi", "", "again"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out, err = io.StringIO(), io.StringIO()
    assert run_chat(model, tok, max_new_tokens=3, read=read, out=out, err=err) == 2
    assert err.getvalue().count("tokens/s") == 2
    tok.chat_template = None
    with pytest.raises(GenerationError, match="no chat template"):
        run_chat(model, tok, read=read, out=out, err=err)


def test_auto_layout_picks_int4_where_it_holds_every_layer():
    from pvq.runtime.compute_layout import resolve_layout

    model = tiny_llama(seed=0)
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    oneshot(model, None, Recipe(method="pvq", config={"group_size": 16, "shape_bits": 3.0, "gain": "fp16"}, finetune=None),
            windows=windows, progress=False)
    assert resolve_layout(model, "auto") == "int4"
    first = next(m for m in model.modules() if isinstance(m, QuantizedLinear))
    first.layout = dict(first.layout, enumeration="fischer")  # a layer the compute layouts cannot hold
    first._cpu_choice = None
    assert resolve_layout(model, "auto") == "packed"


def test_chat_command(tmp_path, monkeypatch, capsys):
    from conftest import save_tiny_model

    from pvq.cli import main

    d = save_tiny_model(tmp_path / "m")
    assert main(["chat", str(d), "--max-new-tokens", "3"]) == 2  # no chat template: one line, exit 2
    assert "no chat template" in capsys.readouterr().err
    _, tok = chat_setup()
    tok.save_pretrained(d)
    scripted_input(monkeypatch, ["hello", "again"])
    code = main(["chat", str(d), "--max-new-tokens", "3"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("tokens/s") == 2 and "from the cache" in err


def test_c_kernels_are_built_where_a_compiler_is():
    """The extension is optional at install (no compiler: the numba kernels run), so a C file
    that stops compiling would only show as skipped tests: where a compiler exists, it must be there."""
    import shutil

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine: the numba kernels serve")
    if c_kernels.os.environ.get("PVQ_KERNELS", "").lower() == "numba":
        pytest.skip("PVQ_KERNELS=numba")
    assert c_kernels.available(), "the C kernels were not built or are stale: reinstall pvq (pip install -e .)"
    assert c_kernels.simd() in ("avx2+fma", "portable C")


@pytest.mark.parametrize("rows", [1, 7])
def test_a_gradient_through_a_packed_layer_is_that_of_its_decoded_weight(rows, monkeypatch):
    """The CPU kernels decode into one reused workspace (overwritten by the next chunk or
    layer) outside autograd: while a gradient must reach x, the differentiable reference
    kernel serves, so the backward pass sees the layer's own weight."""
    monkeypatch.setattr(cpu_kernels, "DECODE_CHUNK_WEIGHTS", 48 * 6)  # several chunks per layer
    lin, other = pvq_layer(R=48, C=96), pvq_layer(R=40, C=48, seed=1)
    W = lin.dequantize()
    x = torch.randn(rows, 96, requires_grad=True)
    y = other(lin(x))  # the second layer overwrites the workspace before the backward pass
    assert lin.last_kernel == "dequantize"
    y.pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (torch.nn.functional.linear(torch.nn.functional.linear(x2, W, lin.bias), other.dequantize(), other.bias)
     .pow(2).sum().backward())
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no gradient asked: the fast kernels serve as before
        lin(x)
    assert lin.last_kernel.startswith("pvq-cpu")
