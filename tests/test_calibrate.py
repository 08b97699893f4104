import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from pvq.models import adapter_for, tiny_llama
from pvq.calibrate import (
    CalibrationError,
    PipelineError,
    WorkDirError,
    calibration_windows,
    capture_block_inputs,
    quantize_model,
    sample_windows,
    windows_from_ids,
)
from pvq.methods import QuantizedTensor
from pvq.methods import rtn
from pvq.methods.rtn import RTNConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


class CharTokenizer:
    """Bytes as token ids (vocab 256), like a tokenizer's __call__."""

    bos_token_id = 1

    def __call__(self, text, **kwargs):
        return {"input_ids": list(text.encode("utf-8"))}


def _windows(n=6, seqlen=16, seed=0, vocab=256):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


# -- calibration -----------------------------------------------------------------------------


def test_text_windows_are_seeded_non_overlapping_slices(tmp_path):
    rng = np.random.default_rng(0)
    text = "".join(chr(97 + int(c)) for c in rng.integers(0, 26, 1000))
    path = tmp_path / "calib.txt"
    path.write_text(text)
    ids = torch.tensor(list(text.encode()))
    a = calibration_windows(CharTokenizer(), path, n_windows=10, seqlen=50, seed=1)
    assert a.shape == (10, 50) and a.dtype == torch.long
    assert torch.equal(a, calibration_windows(CharTokenizer(), path, n_windows=10, seqlen=50, seed=1))
    assert not torch.equal(a, calibration_windows(CharTokenizer(), path, n_windows=10, seqlen=50, seed=2))
    starts = []
    for w in a:  # each window is a slice of the text
        (hit,) = [s for s in range(len(ids) - 49) if torch.equal(ids[s : s + 50], w)]
        starts.append(hit)
    assert len({s % 50 for s in starts}) == 1  # one random offset ...
    assert len(set(starts)) == 10  # ... and distinct, hence non-overlapping, slots
    # exactly the whole text: still possible, nothing to spare
    full = windows_from_ids(ids, 20, 50, seed=0)
    assert torch.equal(full.flatten().sort().values, ids.sort().values)


def test_too_short_text_says_how_many_tokens_and_what_was_asked(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 100)
    with pytest.raises(CalibrationError, match=r"has 100 tokens, too few for 3 non-overlapping windows of 50 tokens \(150"):
        calibration_windows(CharTokenizer(), path, n_windows=3, seqlen=50, seed=0)
    with pytest.raises(CalibrationError, match="not found"):
        calibration_windows(CharTokenizer(), tmp_path / "missing.txt", 1, 10, 0)
    with pytest.raises(CalibrationError, match="needs a text file or a model"):
        calibration_windows(CharTokenizer(), None, 1, 10, 0)


def test_windows_sampled_from_the_model_are_seeded():
    model = tiny_llama(seed=0)
    a = calibration_windows(CharTokenizer(), None, n_windows=3, seqlen=7, seed=5, model=model, batch_size=2)
    assert a.shape == (3, 7) and (a[:, 0] == 1).all() and int(a.max()) < 256
    assert torch.equal(a, sample_windows(model, 3, 7, seed=5, start_token=1, batch_size=2))
    assert not torch.equal(a, sample_windows(model, 3, 7, seed=6, start_token=1, batch_size=2))
    assert len(set(a[:, 1:].flatten().tolist())) > 8  # temperature 1 on a random model: varied


def test_calibration_data_takes_the_file_else_wikitext2_else_samples_and_says_which(tmp_path, monkeypatch):
    """calib_text: a file; None ("auto"): WikiText-2 where reachable (faked here), else text
    sampled from the model; "sampled": sampled always. Each with its one-line description."""
    from pvq.calibrate import calibration as calibration_module
    from pvq.calibrate import calibration_data, encode_text

    model, tok = tiny_llama(seed=0), CharTokenizer()
    text = "the quick brown fox jumps over the lazy dog. " * 20
    path = tmp_path / "calib.txt"
    path.write_text(text)
    windows, where = calibration_data(tok, path, 3, 16, 0, progress=False)
    assert torch.equal(windows, calibration_windows(tok, path, 3, 16, 0)) and where == f"calibration text file {path}"
    monkeypatch.setattr(calibration_module, "_wikitext2_text", lambda: (text, "WikiText-2 train (datasets cache)"))
    windows, where = calibration_data(tok, None, 3, 16, 0, model=model, progress=False)
    assert where == "WikiText-2 train (datasets cache)"
    assert torch.equal(windows, windows_from_ids(encode_text(tok, text), 3, 16, 0))
    sampled = calibration_windows(tok, None, 3, 16, 0, model=model, batch_size=2, progress=False)
    windows, where = calibration_data(tok, "sampled", 3, 16, 0, model=model, batch_size=2, progress=False)
    assert torch.equal(windows, sampled) and where.startswith("sampled from the model") and "as asked" in where
    monkeypatch.setattr(calibration_module, "_wikitext2_text", lambda: None)
    windows, where = calibration_data(tok, None, 3, 16, 0, model=model, batch_size=2, progress=False)
    assert torch.equal(windows, sampled) and "no WikiText-2 text was reachable" in where


# -- stand-in quantizer that shows the pipeline what it was given ------------------------------


@dataclass(frozen=True)
class GridConfig:
    step: float = 0.02


class RecordingGrid:
    """Rounds to a fixed grid and stores the Hessian it was handed (for checking)."""

    name = "recording-grid"
    config_class = GridConfig

    @staticmethod
    def quantize(weight, hessian, config):
        q = torch.round(weight / config.step).to(torch.int16)
        return QuantizedTensor("recording-grid", tuple(weight.shape), {"q": q.numpy(), "h": hessian.numpy()}, {"step": config.step})

    @staticmethod
    def dequantize(qt):
        return torch.from_numpy(qt.tensors["q"].astype(np.float32)) * qt.meta["step"]


def _reference_sequential(model, adapter, windows, method, config):
    """Slow, obvious implementation: a full model forward per group (all windows in one
    batch, float64 sums), quantizing in place."""
    hessians = {}
    for i, block in enumerate(adapter.get_blocks(model)):
        for group in adapter.block_groups(block):
            sums, handles = {}, []
            for lin in group:
                def hook(mod, inp, out, lin=lin):
                    x = inp[0].reshape(-1, inp[0].shape[-1]).double()
                    sums[lin] = x.T @ x
                handles.append(block.get_submodule(lin).register_forward_hook(hook))
            with torch.no_grad():
                model(input_ids=windows, use_cache=False)
            for h in handles:
                h.remove()
            for lin in group:
                H = (sums[lin] / windows.numel()).float()
                mod = block.get_submodule(lin)
                qt = method.quantize(mod.weight.detach().clone(), H, config)
                with torch.no_grad():
                    mod.weight.copy_(method.dequantize(qt))
                hessians[adapter.layer_name(i, lin)] = H
    return hessians


def test_hessians_are_the_sequential_ones_of_a_direct_computation():
    windows = _windows(n=5, seqlen=16)
    config = GridConfig(step=0.05)  # coarse: quantization visibly changes later inputs
    ref_model = tiny_llama(seed=0, init_std=0.1)
    float_model = copy.deepcopy(ref_model)
    ref = _reference_sequential(ref_model, adapter_for(ref_model), windows, RecordingGrid, config)

    model = tiny_llama(seed=0, init_std=0.1)
    result = quantize_model(model, adapter_for(model), windows, RecordingGrid(), config, batch_size=2, progress=False)
    assert list(result) == list(ref) and len(result) == 14
    for name, qt in result.items():
        H = torch.from_numpy(qt.tensors["h"])
        torch.testing.assert_close(H, ref[name], rtol=1e-5, atol=1e-7)
        assert qt.proxy_loss is not None and qt.proxy_loss > 0  # filled in by the pipeline
    for (k, a), b in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(a, b), k
    # the test can tell: the float model's Hessians of block 1 are different
    float_ref = {}
    blk = float_model.model.layers[1].mlp.down_proj
    def grab(module, inputs, output):
        float_ref["x"] = inputs[0].reshape(-1, 128).double()

    handle = blk.register_forward_hook(grab)
    with torch.no_grad():
        float_model(input_ids=windows)
    handle.remove()
    H_float = (float_ref["x"].T @ float_ref["x"] / windows.numel()).float()
    assert not torch.allclose(H_float, torch.from_numpy(result["model.layers.1.mlp.down_proj"].tensors["h"]), rtol=1e-3)


def test_block_inputs_are_the_embeddings_and_the_block_kwargs():
    model = tiny_llama(seed=0)
    windows = _windows(n=5)
    hidden, kwargs = capture_block_inputs(model, adapter_for(model), windows, 2, torch.device("cpu"), torch.float32)
    assert torch.equal(hidden, model.model.embed_tokens(windows).detach())
    block = model.model.layers[0]
    assert len(kwargs) == 3 and "position_embeddings" in kwargs[0].for_block(block)
    assert list(kwargs[0].by_kind) == [None]  # a family without layer kinds: one set of arguments
    out = block(hidden[:2], **kwargs[0].for_block(block))
    with torch.no_grad():
        full = model(input_ids=windows[:2], output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(out, full)


def test_rtn_end_to_end_changes_the_model_as_expected(caplog):
    windows = _windows(n=6, seqlen=16)
    float_model = tiny_llama(seed=0)
    with torch.no_grad():
        ref_logits = float_model(windows).logits
    deltas, losses = {}, {}
    for bits in (3, 8):
        model = tiny_llama(seed=0)
        with caplog.at_level(logging.INFO, logger="pvq.calibrate.quantize_model"):
            result = quantize_model(model, adapter_for(model), windows, "rtn", RTNConfig(bits=bits, group_size=32),
                                    batch_size=4, progress=False)
        assert len(result) == 14 and len(result.report) == 14 and result.resumed_blocks == 0
        for name, qt in result.items():
            assert qt.method == "rtn"
            weight = model.get_submodule(name).weight
            assert torch.equal(weight, rtn.dequantize(qt))  # the model holds the dequantized weights
            assert not torch.equal(weight, float_model.get_submodule(name).weight)
        rep = result.report[0]
        assert rep.name == "model.layers.0.self_attn.q_proj" and rep.shape == (64, 64) and rep.seconds >= 0
        assert rep.bits_per_weight == pytest.approx(bits + (16 + bits) / 32)
        # untouched: embedding, norms, head
        for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
            assert torch.equal(model.state_dict()[name], float_model.state_dict()[name])
        with torch.no_grad():
            deltas[bits] = float((model(windows).logits - ref_logits).abs().mean())
        losses[bits] = sum(r.proxy_loss for r in result.report)
    assert 0 < deltas[8] < deltas[3] / 10
    assert 0 < losses[8] < losses[3] / 100
    assert any("model.layers.1.mlp.down_proj: proxy loss" in r.getMessage() for r in caplog.records)


def test_bf16_compute_dtype_is_close_and_keeps_the_model_float32():
    windows = _windows(n=4, seqlen=16)
    config = RTNConfig(bits=3, group_size=32)
    a = tiny_llama(seed=0)
    ra = quantize_model(a, adapter_for(a), windows, "rtn", config, progress=False)
    b = tiny_llama(seed=0)
    rb = quantize_model(b, adapter_for(b), windows, "rtn", config, progress=False, compute_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in b.parameters())
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        if k.startswith("model.layers.0."):  # block 0's weights do not depend on the forwards
            assert torch.equal(va, vb), k
    for x, y in zip(ra.report, rb.report):
        assert y.proxy_loss == pytest.approx(x.proxy_loss, rel=0.05)


def _fail_at(monkeypatch, call):
    calls = {"n": 0}
    real = rtn.quantize

    def flaky(weight, hessian, config):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt("simulated interruption")
        return real(weight, hessian, config)

    monkeypatch.setattr(rtn, "quantize", flaky)
    return calls


def _files(d: Path):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_resume_after_an_interruption_gives_identical_bytes(tmp_path, monkeypatch):
    windows = _windows(n=6, seqlen=16)
    config = RTNConfig(bits=3, group_size=32)
    clean = tiny_llama(seed=0, layers=3)
    full = quantize_model(clean, adapter_for(clean), windows, "rtn", config, work_dir=tmp_path / "a", batch_size=4, progress=False)

    model = tiny_llama(seed=0, layers=3)
    pristine = copy.deepcopy(model.state_dict())
    with monkeypatch.context() as m:
        _fail_at(m, call=7 + 2)  # inside block 1 (k_proj)
        with pytest.raises(KeyboardInterrupt):
            quantize_model(model, adapter_for(model), windows, "rtn", config, work_dir=tmp_path / "b", batch_size=4, progress=False)
    state = (tmp_path / "b" / "state.json").read_text()
    assert '"blocks_done": 1' in state
    # the interrupted block was put back as it was
    for k, v in model.state_dict().items():
        if k.startswith("model.layers.1."):
            assert torch.equal(v, pristine[k]), k
    # resume in the same process with the same (partly quantized) model object ...
    resumed = quantize_model(model, adapter_for(model), windows, "rtn", config, work_dir=tmp_path / "b", batch_size=4, progress=False)
    assert resumed.resumed_blocks == 1 and [r.resumed for r in resumed.report] == [True] * 7 + [False] * 14
    # ... and with a freshly loaded one
    fresh = tiny_llama(seed=0, layers=3)
    with monkeypatch.context() as m:
        _fail_at(m, call=7 + 1)
        with pytest.raises(KeyboardInterrupt):
            quantize_model(fresh, adapter_for(fresh), windows, "rtn", config, work_dir=tmp_path / "c", batch_size=4, progress=False)
    fresh = tiny_llama(seed=0, layers=3)
    again = quantize_model(fresh, adapter_for(fresh), windows, "rtn", config, work_dir=tmp_path / "c", batch_size=4, progress=False)

    for other, other_model in ((resumed, model), (again, fresh)):
        assert list(other) == list(full)
        for name, qt in full.items():
            q2 = other[name]
            assert q2.meta == qt.meta and list(q2.meta) == list(qt.meta)
            assert q2.proxy_loss == qt.proxy_loss and q2.shape == qt.shape and q2.method == qt.method
            assert q2.tensors.keys() == qt.tensors.keys()
            for k in qt.tensors:
                assert q2.tensors[k].dtype == qt.tensors[k].dtype and q2.tensors[k].tobytes() == qt.tensors[k].tobytes()
        for (k, a), b in zip(clean.state_dict().items(), other_model.state_dict().values()):
            assert torch.equal(a, b), k
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(files_a) == [".pvq-workdir", "block_0000.json", "block_0000.safetensors", "block_0001.json",
                               "block_0001.safetensors", "block_0002.json", "block_0002.safetensors", "state.json"]
    for name in files_a:
        if name.endswith(".safetensors"):
            assert files_a[name] == files_b[name], name
    # a finished run is read back without quantizing anything
    with monkeypatch.context() as m:
        calls = _fail_at(m, call=1)
        done = quantize_model(tiny_llama(seed=0, layers=3), adapter_for(clean), windows, "rtn", config,
                              work_dir=tmp_path / "a", batch_size=4, progress=False)
        assert calls["n"] == 0 and done.resumed_blocks == 3 and list(done) == list(full)


def _interrupted_run(tmp_path, monkeypatch, name, windows, config, blocks_done):
    model = tiny_llama(seed=0, layers=3)
    with monkeypatch.context() as m:
        _fail_at(m, call=7 * blocks_done + 1)
        with pytest.raises(KeyboardInterrupt):
            quantize_model(model, adapter_for(model), windows, "rtn", config, work_dir=tmp_path / name, batch_size=4,
                           progress=False)
    return tmp_path / name


@pytest.mark.parametrize("damage", ["block", "block-json", "hidden", "state", "missing-block"])
def test_a_damaged_work_directory_is_detected_and_recomputed(tmp_path, monkeypatch, caplog, damage):
    """Flip a byte in a finished block, its JSON, the saved hidden states or the state file,
    then resume: the damage is reported, the damaged part recomputed, and the result is the
    same bytes as an undamaged run."""
    windows = _windows(n=6, seqlen=16)
    config = RTNConfig(bits=3, group_size=32)
    clean = tiny_llama(seed=0, layers=3)
    full = quantize_model(clean, adapter_for(clean), windows, "rtn", config, batch_size=4, progress=False)
    work = _interrupted_run(tmp_path, monkeypatch, "w", windows, config, blocks_done=2)

    def flip(path):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))

    if damage == "block":
        flip(work / "block_0000.safetensors")
    elif damage == "block-json":
        (work / "block_0001.json").write_text((work / "block_0001.json").read_text().replace('"group": 0', '"group": 1', 1))
    elif damage == "hidden":
        flip(work / "hidden.safetensors")
    elif damage == "state":
        (work / "state.json").write_text((work / "state.json").read_text().replace('"blocks_done": 2', '"blocks_done": 3'))
    else:
        (work / "block_0001.safetensors").unlink()
    model = tiny_llama(seed=0, layers=3)
    with caplog.at_level("WARNING"):
        again = quantize_model(model, adapter_for(model), windows, "rtn", config, work_dir=work, batch_size=4,
                               progress=False)
    assert any(w in caplog.text for w in ("does not match its recorded digest", "damaged", "not valid JSON")), caplog.text
    assert list(again) == list(full)
    for name, qt in full.items():
        assert all(again[name].tensors[k].tobytes() == qt.tensors[k].tobytes() for k in qt.tensors), name
    for (k, a), b in zip(clean.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_foreign_work_directory_is_refused(tmp_path):
    work = tmp_path / "mine"
    work.mkdir()
    (work / "thesis.tex").write_text("precious")
    m = tiny_llama(seed=0)
    with pytest.raises(WorkDirError, match="holds files pvq did not write"):
        quantize_model(m, adapter_for(m), _windows(n=2, seqlen=16), "rtn", RTNConfig(bits=3, group_size=32),
                       work_dir=work, progress=False)
    assert sorted(p.name for p in work.iterdir()) == ["thesis.tex"]


def test_resume_refuses_different_settings(tmp_path):
    windows = _windows(n=4, seqlen=16)
    work = tmp_path / "w"
    m = tiny_llama(seed=0)
    quantize_model(m, adapter_for(m), windows, "rtn", RTNConfig(bits=3, group_size=32), work_dir=work, progress=False)

    def run(model=None, win=windows, config=RTNConfig(bits=3, group_size=32), **kw):
        model = model if model is not None else tiny_llama(seed=0)
        return quantize_model(model, adapter_for(model), win, "rtn", config, work_dir=work, progress=False, **kw)

    with pytest.raises(WorkDirError, match=r"different settings \(config: saved .*'bits': 3.*now .*'bits': 4"):
        run(config=RTNConfig(bits=4, group_size=32))
    with pytest.raises(WorkDirError, match="same shape, different token ids"):
        run(win=_windows(n=4, seqlen=16, seed=9))
    with pytest.raises(WorkDirError, match="batch_size"):
        run(batch_size=3)
    with pytest.raises(WorkDirError, match="compute_dtype"):
        run(compute_dtype=torch.bfloat16)
    with pytest.raises(WorkDirError, match=r"different model \(.*block 0 weights differ"):
        run(model=tiny_llama(seed=1))
    res = run(model=tiny_llama(seed=1), resume=False)  # starts afresh
    assert res.resumed_blocks == 0 and len(res) == 14
    assert {p.suffix for p in work.iterdir() if p.name != ".pvq-workdir"} == {".json", ".safetensors"}  # no pickle


def test_bad_inputs_are_clear_errors():
    model = tiny_llama(seed=0)
    with pytest.raises(PipelineError, match="windows must be"):
        quantize_model(model, adapter_for(model), torch.zeros(5, dtype=torch.long), "rtn", progress=False)
    with pytest.raises(PipelineError, match="batch_size"):
        quantize_model(model, adapter_for(model), _windows(), "rtn", batch_size=0, progress=False)
    from pvq.methods import QuantizationError

    with pytest.raises(QuantizationError, match="unknown method"):
        quantize_model(model, adapter_for(model), _windows(), "nope", progress=False)


# -- the real model, two decoder layers ------------------------------------------------------




@pytest.mark.slow
def test_real_model_two_layer_slice(real_model, tmp_path):
    model, tokenizer, info = real_model
    assert info["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    windows = calibration_windows(tokenizer, SHARED / "assets/wikitext-2/tokenized/valid.txt", n_windows=4, seqlen=64, seed=0)
    with torch.no_grad():
        ref = model(windows).logits
    config = RTNConfig(bits=3, group_size=64)
    result = quantize_model(model, adapter_for(model), windows, "rtn", config, work_dir=tmp_path, batch_size=2, progress=False)
    assert len(result) == 14
    shapes = {r.name.split(".", 3)[-1]: r.shape for r in result.report[:7]}
    assert shapes["self_attn.k_proj"] == (192, 576) and shapes["mlp.down_proj"] == (576, 1536)
    assert all(r.proxy_loss > 0 and np.isfinite(r.proxy_loss) for r in result.report)
    with torch.no_grad():
        out = model(windows).logits
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)


def test_a_work_directory_saved_before_a_config_field_existed_still_resumes():
    """A config field added since (at its default) is no difference in the resume check."""
    from dataclasses import asdict

    from pvq.calibrate.resume import _with_current_defaults
    from pvq.methods import get_method

    now = asdict(get_method("pvq").make_config({"group_size": 16, "gain": "empirical"}))
    saved = {k: v for k, v in now.items() if k != "gain_escapes"}
    state = _with_current_defaults({"method": "pvq", "config": saved, "layer_configs": {"a": saved}})
    assert state["config"] == now and state["layer_configs"]["a"] == now
    other = _with_current_defaults({"method": "pvq", "config": {**saved, "gain_escapes": 2}})
    assert other["config"] != now
