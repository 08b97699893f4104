"""Issue 30: codes that learn during fine-tuning, the teacher kept top-k, a diverging run
keeping the last good model, and where the calibration text comes from."""

import contextlib
import copy

import numpy as np
import pytest
import torch

from pvq.calibrate.finetune import _topk_kl, finetune, teacher_targets
from pvq.codec import unpack_codes
from pvq.methods import get_method
from pvq.models import tiny_llama
from pvq.oneshot import Recipe, oneshot
from pvq.runtime import QuantizedLinear

MOVABLE = [
    ("pvq", {"group_size": 16, "shape_bits": 2.0, "gain": "empirical"}),
    ("pvq", {"group_size": 8, "shape_bits": 2.0, "gain": "fp16"}),
    ("gptq", {"bits": 3, "group_size": 32, "act_order": True}),
    ("rtn", {"bits": 2, "group_size": 32}),
    ("gptvq", {"dim": 2, "bits": 2.0, "group_size": 256, "group_columns": 32}),
]


def _layer(method, fields, seed=0):
    torch.manual_seed(seed)
    W, X = torch.randn(48, 128), torch.randn(512, 128)
    m = get_method(method)
    config = m.make_config(fields)
    return m, config, m.quantize(W, X.T @ X if m.needs_hessian(config) else None, config)


def _curvature(shape, seed, scale=1.0):
    return scale * torch.rand(shape, generator=torch.Generator().manual_seed(seed + 20))


@pytest.mark.parametrize("method,fields", MOVABLE, ids=[m + str(i) for i, (m, _) in enumerate(MOVABLE)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_code_moves_are_valid_codes_with_the_predicted_quadratic_change(method, fields, seed):
    m, config, qt = _layer(method, fields, seed)
    tw = m.tunable(qt)
    W0 = tw().detach().clone()
    grad = torch.randn(qt.shape, generator=torch.Generator().manual_seed(seed + 10))
    curvature = _curvature(qt.shape, seed, scale=float(grad.abs().mean() / W0.abs().mean()))
    F = curvature
    delta, moved = tw.code_moves(grad, curvature)
    groups = tw.code_groups()
    assert delta.shape == (groups.shape[0],) and moved.shape == groups.shape and moved.dtype == groups.dtype
    finite = torch.isfinite(delta)
    assert finite.any() and (delta[finite] < 0).all()  # only moves the model says lower the loss
    # apply every proposed move, one group at a time on a copy, and check it is what was predicted
    rows = torch.nonzero(finite)[:, 0][:40].tolist()
    for r in rows:
        t2 = m.tunable(qt)
        t2.code_groups()[r] = moved[r]
        t2.codes_changed = True
        dW = t2().detach() - W0
        assert torch.count_nonzero(dW.reshape(-1)) > 0
        expected = float((grad * dW).sum() + 0.5 * (F * dW * dW).sum())
        assert expected == pytest.approx(float(delta[r]), rel=1e-3, abs=1e-5)
    # the curvature term matters: with ten times the curvature, fewer moves are predicted to help
    stiff, _ = tw.code_moves(grad, curvature * 10)
    assert int(torch.isfinite(stiff).sum()) < int(finite.sum())
    # all of them at once: the payload is valid codes of the same spec, and decodes to the tuned weight
    tw.code_groups()[finite] = moved[finite]
    tw.codes_changed = True
    payload = tw.payload()
    spec = m.payload_spec(config, qt.shape)
    for k, s in spec.items():
        assert s.matches(payload[k]), k
    again = copy.copy(qt)
    again.tensors = payload
    assert torch.allclose(m.dequantize(again), tw().detach(), rtol=0, atol=1e-5)
    if method == "pvq":  # still points of the same pyramid: |p|_1 = K, one pulse moved
        K = int(qt.meta["pulses"])
        p = tw.code_groups().to(torch.int64)
        assert (p.abs().sum(dim=1) == K).all()
        before = m.tunable(qt).code_groups().to(torch.int64)
        changed = (p != before).any(dim=1)
        assert ((p - before).abs().sum(dim=1)[changed] <= 2).all()
    if method in ("rtn", "gptq"):
        bits = int(qt.meta["bits"])
        codes = unpack_codes(payload["codes"], qt.shape[0] * qt.shape[1], bits)
        assert codes.max() <= (1 << bits) - 1


def test_unmoved_codes_give_the_stored_bytes_back():
    for method, fields in MOVABLE:
        m, config, qt = _layer(method, fields)
        tw = m.tunable(qt)
        tw.codes_changed = True  # encoded again, unchanged: the same bytes
        for k, v in tw.payload().items():
            assert np.array_equal(v, qt.tensors[k]), (method, k)


def _tiny(method="pvq", fields=None, seed=0):
    torch.manual_seed(seed)
    model = tiny_llama(seed=seed, init_std=0.08)
    reference = copy.deepcopy(model)
    text = torch.randint(2, 200, (120,)).repeat(8)
    windows = torch.stack([text[s:s + 48] for s in torch.randint(0, text.numel() - 48, (10,)).tolist()])
    fields = fields or {"group_size": 16, "shape_bits": 1.5, "gain": "fp16"}
    oneshot(model, None, Recipe(method=method, config=fields, calib_windows=10, calib_seqlen=48, finetune=None),
            windows=windows, progress=False)
    return model, reference, windows


def _payloads(model):
    return {n: {k: np.array(v) for k, v in m.payload().items()} for n, m in model.named_modules()
            if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize("method,fields", [MOVABLE[1], MOVABLE[2], MOVABLE[4]], ids=["pvq", "gptq", "gptvq"])
def test_finetuning_moves_codes_only_when_the_held_out_kl_falls(method, fields):
    model, reference, windows = _tiny(method, fields)
    before = _payloads(model)
    sizes = {n: m.stored_bytes for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    settings = {"steps": 12, "eval_every": 3, "patience": 4, "lr": 3e-3, "val_windows": 2, "code_fraction": 0.05,
                "teacher_topk": 256}
    report = finetune(model, reference, windows, settings, progress=False)
    assert report.code_rounds >= 1 and report.code_groups > 0
    rounds = [h for h in report.history if "val_kl_codes" in h]
    assert len(rounds) == report.code_rounds
    assert report.code_rounds_kept == sum(h["val_kl_codes"] < h["val_kl"] for h in rounds)
    for h in rounds:  # the line search: fewer moves each try, every try but the last one refused
        moved = [m for m, _ in h["code_tries"]]
        assert moved == sorted(moved, reverse=True) and all(v >= h["val_kl"] for _, v in h["code_tries"][:-1])
    assert report.val_kl_stored <= report.val_kl_before
    after = _payloads(model)
    moved = 0
    for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)):
        assert layer.stored_bytes == sizes[name]
        for k, spec in layer.payload_spec.items():
            assert spec.matches(after[name][k])
        codes_key = "indices" if method == "gptvq" else "codes"
        moved += not np.array_equal(after[name][codes_key], before[name][codes_key])
        get_method(method).dequantize(layer.quantized_tensor())  # decodes: valid codes
    assert (moved > 0) == (report.codes_moved > 0)
    if report.code_rounds_kept:
        assert report.codes_moved > 0 and report.kept == "tuned"


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_code_updates_resume_to_the_same_bytes(tmp_path, schedule):
    settings = {"steps": 9, "eval_every": 3, "patience": 5, "lr": 1e-2, "val_windows": 2, "code_fraction": 0.05,
                "schedule": schedule}
    model, reference, windows = _tiny()
    whole = finetune(model, reference, windows, settings, work_dir=tmp_path / "a", progress=False)
    expected = _payloads(model)

    class Stop(Exception):
        pass

    def stop_at_5(step, loss):
        if step == 5:
            raise Stop

    model, reference, windows = _tiny()
    with pytest.raises(Stop):
        finetune(model, reference, windows, settings, work_dir=tmp_path / "b", progress=False, on_step=stop_at_5)
    model, reference, windows = _tiny()
    resumed = finetune(model, reference, windows, settings, work_dir=tmp_path / "b", progress=False)
    assert resumed.resumed_from == 3 and resumed.code_rounds == whole.code_rounds
    assert resumed.codes_moved == whole.codes_moved and resumed.val_kl_stored == whole.val_kl_stored
    got = _payloads(model)
    for name in expected:
        for k in expected[name]:
            assert np.array_equal(got[name][k], expected[name][k]), (name, k)


def test_topk_kl_is_a_lower_bound_equal_at_full_k():
    torch.manual_seed(0)
    model = tiny_llama(seed=0, init_std=0.2)
    student = tiny_llama(seed=1, init_std=0.2)
    ids = torch.randint(2, 200, (2, 24))
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), dim=-1)
        logq = torch.log_softmax(student(ids).logits.float(), dim=-1)
        full = float((logp.exp() * (logp - logq)).sum(-1).mean())
        values = [float(_topk_kl(student(ids).logits, teacher_targets(model, ids, k))) for k in (1, 4, 32, 256)]
    assert all(0 <= v <= full + 1e-6 for v in values)
    assert values == sorted(values)  # a finer partition never lowers it
    assert values[-1] == pytest.approx(full, rel=1e-4)


def test_a_diverging_run_keeps_the_last_good_model_and_says_so():
    model, reference, windows = _tiny()
    before = _payloads(model)
    teacher = teacher_targets(reference, windows, 16)
    teacher.logp[:-2] = float("nan")  # the training windows' targets: the loss is NaN at the first step
    report = finetune(model, teacher, windows, {"steps": 6, "eval_every": 2, "val_windows": 2}, progress=False)
    assert report.diverged is not None and "step 1" in report.diverged and "kept" in report.diverged
    assert report.steps == 0 and report.kept == "one-shot"
    assert "the loss became nan" in report.describe()
    for name, arrays in _payloads(model).items():
        for k, v in arrays.items():
            assert np.array_equal(v, before[name][k]), (name, k)


def test_calibration_sources_are_described(monkeypatch, tmp_path):
    from conftest import SHARED, printable_char_tokenizer

    from pvq.calibrate import calibration as cal

    tok = printable_char_tokenizer()
    model = tiny_llama(seed=0)
    path = tmp_path / "calib.txt"
    path.write_text("some calibration text. " * 200)
    windows, where = cal.calibration_data(tok, path, 3, 16, 0)
    assert windows.shape == (3, 16) and where == f"calibration text file {path}"
    windows, where = cal.calibration_data(tok, "sampled", 2, 8, 0, model=model, progress=False)
    assert windows.shape == (2, 8) and where.startswith("sampled from the model") and "as asked" in where
    # nothing reachable: sampled, and the description says why
    monkeypatch.setattr(cal, "_wikitext2_text", lambda: None)
    windows, where = cal.calibration_data(tok, None, 2, 8, 0, model=model, progress=False)
    assert where.startswith("sampled from the model") and "no WikiText-2" in where
    monkeypatch.undo()
    if (SHARED / "assets/wikitext-2/tokenized/valid.txt").is_file():
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        windows, where = cal.calibration_data(tok, None, 4, 32, 0, model=model, progress=False)
        assert windows.shape == (4, 32) and where.startswith("WikiText-2")
    else:
        pytest.skip(f"shared assets not found at {SHARED}: the WikiText-2 route is not checked")


def test_the_sampled_fisher_estimates_the_curvature_of_the_mean_loss():
    """The curvature behind the code moves: labels sampled from the model make
    L * sum_t (dL/dy_t)^2 x_t^2 an estimate of the diagonal Gauss-Newton of the mean
    per-token loss, sum_t,y p(y) (d(-log p_t(y))/dW)^2 / L, but for the cross-position
    terms it drops (as K-FAC does); checked weight by weight against that sum computed
    exactly, every label of every position: the same profile, the total within a bound."""
    from pvq.calibrate.finetune import FinetuneConfig, _curvature, _Trainable
    from pvq.runtime import tuned_weights

    model, _, windows = _tiny()
    window = windows[:1, :6]
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = _Trainable(model, FinetuneConfig(code_fraction=0.1), torch.device("cpu"))
    name = sorted(trainable.movable)[0]
    tw = trainable.movable[name]
    W = tw().detach().clone().requires_grad_(True)
    build = tw.build
    tw.build = lambda: W
    exact = torch.zeros_like(W)
    with tuned_weights(model, trainable.tunables):
        logp = torch.log_softmax(model(window, use_cache=False).logits[0].float(), dim=-1)
        L, V = logp.shape
        for t in range(L):
            for y in range(V):
                (grad,) = torch.autograd.grad(-logp[t, y], W, retain_graph=True)
                exact += logp[t, y].detach().exp() * grad.pow(2)
    exact /= L
    tw.build = build
    estimate = _curvature(model, trainable, window.repeat(300, 1), torch.device("cpu"), seed=0)[name]
    assert estimate.shape == exact.shape and tw.fisher is None
    # measured: 0.74 of the total (the cross-position terms are positive here), correlation 0.991
    assert 0.6 < float(estimate.sum() / exact.sum()) < 1.2
    assert torch.corrcoef(torch.stack([estimate.reshape(-1), exact.reshape(-1)]))[0, 1] > 0.97


def test_training_in_bfloat16_autocast_keeps_float32_parameters_and_figures_and_repeats_its_bytes():
    from pvq.calibrate.finetune import FinetuneConfig, FinetuneError, training_autocast

    assert isinstance(training_autocast("float32", torch.device("cpu")), type(contextlib.nullcontext()))
    with training_autocast("bfloat16", torch.device("cpu")):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with pytest.raises(FinetuneError, match="precision"):
        FinetuneConfig(precision="float8")
    assert FinetuneConfig().precision == "float32"  # the default: reproducible bytes
    settings = {"steps": 4, "eval_every": 2, "val_windows": 2, "precision": "bfloat16"}
    model, reference, windows = _tiny()
    report = finetune(model, reference, windows, settings, progress=False)
    assert report.val_kl_stored <= report.val_kl_before
    again, reference, windows = _tiny()
    finetune(again, reference, windows, settings, progress=False)
    first, second = _payloads(model), _payloads(again)  # the same bytes twice
    assert all(np.array_equal(first[n][k], second[n][k]) for n in first for k in first[n])
    assert all(isinstance(h["val_kl"], float) for h in report.history)
    for layer in (m for m in model.modules() if isinstance(m, QuantizedLinear)):
        get_method("pvq").dequantize(layer.quantized_tensor())  # the stored payload decodes


def test_the_cosine_schedule_decays_from_the_base_rate_and_changes_the_result():
    from pvq.calibrate.finetune import FinetuneConfig, FinetuneError, lr_factor

    for steps in (1, 2, 10, 60):
        factors = [lr_factor("cosine", k, steps) for k in range(steps)]
        assert factors[0] == 1.0 and all(0 < f <= 1 for f in factors)
        assert all(a > b for a, b in zip(factors, factors[1:]))
        assert all(lr_factor("constant", k, steps) == 1.0 for k in range(steps))
    assert lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    with pytest.raises(FinetuneError, match="schedule"):
        FinetuneConfig(schedule="linear")
    # states and sweep points recorded before the option existed still match the constant default
    from pvq.calibrate.finetune import recorded_settings
    assert "schedule" not in recorded_settings(FinetuneConfig()) and "lr" in recorded_settings(FinetuneConfig())
    assert recorded_settings({"schedule": "cosine", "lr": 1e-3}) == {"schedule": "cosine", "lr": 1e-3}
    results = []
    for schedule in ("constant", "cosine"):
        model, reference, windows = _tiny()
        finetune(model, reference, windows, {"steps": 4, "eval_every": 2, "val_windows": 2, "lr": 1e-2,
                                             "schedule": schedule}, progress=False)
        results.append(_payloads(model))
    assert any(not np.array_equal(results[0][n][k], results[1][n][k]) for n in results[0] for k in results[0][n])


@pytest.mark.parametrize("positions", [1, 63, 64, 150])
def test_the_chunked_kl_gives_the_whole_log_softmax_value_and_gradient(positions):
    """_topk_kl computes its gradient KL_CHUNK positions at a time (memory); the value and
    the gradient are those of autograd through the whole (positions, vocabulary) loss."""
    from pvq.calibrate.finetune import KL_CHUNK, TeacherTargets, _log_rest, _position_kl

    assert KL_CHUNK == 64
    g = torch.Generator().manual_seed(positions)
    V, k = 300, 16
    logits = 3 * torch.randn(2, positions, V, generator=g)
    top, idx = torch.log_softmax(2 * torch.randn(2, positions, V, generator=g), -1).topk(k, -1)
    teacher = TeacherTargets(idx.int(), top, _log_rest(top.double()).float())
    chunked = logits.clone().requires_grad_(True)
    whole = logits.clone().requires_grad_(True)
    value = _topk_kl(chunked, teacher)
    value.backward()
    expected = _position_kl(whole.reshape(-1, V), idx.reshape(-1, k), top.reshape(-1, k), teacher.rest.reshape(-1)).mean()
    expected.backward()
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    torch.testing.assert_close(chunked.grad, whole.grad, rtol=1e-5, atol=1e-9)
    with torch.no_grad():
        assert float(_topk_kl(logits, teacher)) == float(value)


def test_the_teacher_is_taken_only_on_the_windows_the_steps_read():
    """teacher_rows lists the windows a fine-tuning reads; the teacher taken on those alone
    gives the same fine-tuned bytes as the teacher taken on all, and the others stay NaN."""
    from pvq.calibrate.finetune import FinetuneConfig, FinetuneError, teacher_rows

    settings = {"steps": 3, "eval_every": 3, "val_windows": 2, "batch": 2}
    model, reference, windows = _tiny()
    rows = teacher_rows(windows.shape[0], FinetuneConfig(**settings))
    assert rows[-2:] == [8, 9] and len(rows) == len(set(rows)) and len(rows) < windows.shape[0]
    partial = teacher_targets(reference, windows, 64, rows=rows)
    unread = [i for i in range(windows.shape[0]) if i not in rows]
    assert torch.isnan(partial.logp[unread]).all() and not torch.isnan(partial.logp[rows]).any()
    full = teacher_targets(reference, windows, 64)
    assert torch.equal(partial.logp[rows], full.logp[rows]) and torch.equal(partial.index[rows], full.index[rows])
    again = copy.deepcopy(model)
    finetune(model, partial, windows, settings, progress=False)
    finetune(again, full, windows, settings, progress=False)
    first, second = _payloads(model), _payloads(again)
    assert all(np.array_equal(first[n][k], second[n][k]) for n in first for k in first[n])
    assert teacher_rows(3, FinetuneConfig(val_windows=4)) == [0, 1, 2]  # too few windows: finetune refuses later
    longer = {**settings, "steps": 12}  # reads windows the partial targets lack: refused before any step
    with pytest.raises(FinetuneError, match="lack window"):
        finetune(model, partial, windows, longer, progress=False)
