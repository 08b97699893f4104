"""Issue 15: fine-tuning of the continuous parameters (codes fixed) and the per-layer bit
allocation under a budget, on tiny models."""

import copy
import itertools
import json

import numpy as np
import pytest
import torch
from conftest import save_tiny_model, write_texts

from pvq.calibrate.finetune import FinetuneError, finetune
from pvq.runtime import QuantizedLinear
from pvq.models import tiny_llama
from pvq.oneshot import Recipe, oneshot
from pvq.calibrate.allocation import solve_allocation, stored_bits
from pvq.methods import QuantizationError, get_method

#: every method and gain format, with the arrays that are codes (never trained)
SETTINGS = [
    ("rtn", {"bits": 3, "group_size": 32}, {"codes", "zeros"}),
    ("gptq", {"bits": 3, "group_size": 32, "act_order": True}, {"codes", "zeros", "perm"}),
    ("pvq", {"group_size": 16, "shape_bits": 2.0, "gain": "fp16"}, {"codes"}),
    ("pvq", {"group_size": 16, "shape_bits": 2.0, "gain": "beta"}, {"codes", "gain_indices"}),
    ("pvq", {"group_size": 16, "shape_bits": 2.0, "gain": "empirical"}, {"codes", "gain_indices"}),
    ("pvq", {"group_size": 16, "shape_bits": 2.0, "gain": "beta", "gain_escapes": 2},
     {"codes", "gain_indices", "escape_groups"}),
    ("gptvq", {"dim": 2, "bits": 2.0, "group_size": 256, "group_columns": 32}, {"indices"}),
]


def _ids(settings):
    return [f"{m}-{c.get('gain', '')}{'-escapes' if c.get('gain_escapes') else ''}" for m, c, _ in settings]


@pytest.mark.parametrize("method,fields,codes", SETTINGS, ids=_ids(SETTINGS))
def test_tunable_weight_is_the_decoded_weight_and_gives_the_payload_back(method, fields, codes):
    torch.manual_seed(0)
    W, X = torch.randn(64, 128), torch.randn(512, 128)
    m = get_method(method)
    config = m.make_config(fields)
    qt = m.quantize(W, X.T @ X if m.needs_hessian(config) else None, config)
    tw = m.tunable(qt)
    assert torch.allclose(tw(), m.dequantize(qt), rtol=0, atol=1e-6)
    same = tw.payload()
    assert set(same) == set(qt.tensors)
    for k in qt.tensors:  # untrained: the stored arrays bit for bit
        assert same[k].dtype == qt.tensors[k].dtype and np.array_equal(same[k], qt.tensors[k]), k
    # trained: a gradient step moves the continuous arrays only, same spec, codes untouched
    loss = (tw() - W).pow(2).sum()
    loss.backward()
    with torch.no_grad():
        for p in tw.parameters():
            p -= 1e-3 * p.grad / (p.grad.abs().max() + 1e-12) * p.abs().max()
    moved = tw.payload()
    spec = m.payload_spec(config, (64, 128))
    for k, s in spec.items():
        assert s.matches(moved[k]), k
    for k in codes:
        assert np.array_equal(moved[k], qt.tensors[k]), k
    assert any(not np.array_equal(moved[k], qt.tensors[k]) for k in set(qt.tensors) - codes)
    assert (tw() - W).pow(2).sum() < loss  # the step lowered the error it was taken on


def _quantized_tiny(method="pvq", fields=None, seed=0):
    torch.manual_seed(seed)
    model = tiny_llama(seed=seed, init_std=0.08)
    reference = copy.deepcopy(model)
    text = torch.randint(2, 200, (120,)).repeat(8)  # held-out windows resemble the training ones
    windows = torch.stack([text[s:s + 48] for s in torch.randint(0, text.numel() - 48, (10,)).tolist()])
    fields = fields or {"group_size": 16, "shape_bits": 1.5, "gain": "fp16"}
    oneshot(model, None, Recipe(method=method, config=fields, calib_windows=10, calib_seqlen=48, finetune=None),
            windows=windows,
            progress=False)
    return model, reference, windows


def _kl(model, reference, ids) -> float:
    """Mean KL(reference || model) per token, the teacher's log-probabilities as fine-tuning holds them."""
    with torch.no_grad():
        logq = torch.log_softmax(model(ids).logits, -1)
        logp = torch.log_softmax(reference(ids).logits, -1).half().float()
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


def _payloads(model):
    return {n: {k: v.copy() for k, v in m.payload().items()} for n, m in model.named_modules()
            if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize("method,fields,codes", [SETTINGS[1], SETTINGS[2], SETTINGS[4], SETTINGS[6]],
                         ids=_ids([SETTINGS[1], SETTINGS[2], SETTINGS[4], SETTINGS[6]]))
def test_finetuning_lowers_the_kl_and_never_changes_codes_or_sizes(method, fields, codes):
    model, reference, windows = _quantized_tiny(method, fields)
    before = _payloads(model)
    sizes = {n: m.stored_bytes for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    calib_before = _kl(model, reference, windows[:-2])
    # the whole vocabulary kept (k = V = 256): the top-k KL is the KL, so _kl can check it
    report = finetune(model, reference, windows, {"steps": 12, "eval_every": 4, "patience": 3, "lr": 3e-3,
                                                  "val_windows": 2, "teacher_topk": 256}, progress=False)
    assert report.kept == "tuned"
    assert report.val_kl_stored < report.val_kl_before, report.history  # held out: kept only if it improved
    assert _kl(model, reference, windows[:-2]) < 0.97 * calib_before  # the calibration loss, as stored
    after = _payloads(model)
    for name, arrays in before.items():
        layer = model.get_submodule(name)
        assert layer.stored_bytes == sizes[name]
        for k in codes:
            assert np.array_equal(after[name][k], arrays[k]), (name, k)
        for k, spec in layer.payload_spec.items():
            assert spec.matches(after[name][k])
    assert any(not np.array_equal(after[n][k], before[n][k]) for n in before for k in before[n])
    # the model as stored: its held-out KL is the one reported
    assert _kl(model, reference, windows[-2:]) == pytest.approx(report.val_kl_stored, rel=1e-3)


def test_interrupted_finetuning_resumes_to_the_same_bytes(tmp_path):
    settings = {"steps": 10, "eval_every": 3, "patience": 5, "lr": 1e-2, "val_windows": 2}
    model, reference, windows = _quantized_tiny()
    whole = finetune(model, reference, windows, settings, work_dir=tmp_path / "a", progress=False)
    expected = _payloads(model)
    dense = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    model, reference, windows = _quantized_tiny()

    class Stop(Exception):
        pass

    def stop_at_7(step, loss):
        if step == 7:
            raise Stop

    with pytest.raises(Stop):
        finetune(model, reference, windows, settings, work_dir=tmp_path / "b", progress=False, on_step=stop_at_7)
    model, reference, windows = _quantized_tiny()  # a fresh process: the one-shot model again
    resumed = finetune(model, reference, windows, settings, work_dir=tmp_path / "b", progress=False)
    assert resumed.resumed_from == 6 and resumed.steps == whole.steps == 10
    assert resumed.best_step == whole.best_step and resumed.val_kl_stored == whole.val_kl_stored
    got = _payloads(model)
    for name in expected:
        for k in expected[name]:
            assert np.array_equal(got[name][k], expected[name][k]), (name, k)
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, dense[k]), k
    # a finished state is reused as it is; other settings start afresh
    model, reference, windows = _quantized_tiny()
    again = finetune(model, reference, windows, settings, work_dir=tmp_path / "b", progress=False)
    assert again.resumed_from == 10 and again.val_kl_stored == whole.val_kl_stored
    model, reference, windows = _quantized_tiny()
    other = finetune(model, reference, windows, {**settings, "lr": 5e-3}, work_dir=tmp_path / "b", progress=False)
    assert other.resumed_from == 0


def test_finetuning_refuses_bad_settings():
    model, reference, windows = _quantized_tiny()
    with pytest.raises(FinetuneError, match="needs at least one more"):
        finetune(model, reference, windows[:2], {"val_windows": 2}, progress=False)
    with pytest.raises(FinetuneError, match="lr must be a positive number"):
        finetune(model, reference, windows, {"lr": 0}, progress=False)
    with pytest.raises(FinetuneError, match="unknown finetune field"):
        finetune(model, reference, windows, {"epochs": 3}, progress=False)
    with pytest.raises(QuantizationError, match="unknown finetune field"):
        Recipe(method="rtn", finetune={"epochs": 3}).check()
    with pytest.raises(QuantizationError, match="target_bpw 40"):
        Recipe(method="pvq", target_bpw=40).check()
    with pytest.raises(QuantizationError, match="positive number"):
        Recipe(method="gptq", target_bpw=float("nan")).check()
    # neither can run on a streamed model; said before anything is read
    assert "fine-tuning" in Recipe(method="pvq", finetune={}).stream_obstacle(windows_given=True)
    assert "bit allocation" in Recipe(method="pvq", target_bpw=3.0, finetune=None).stream_obstacle(windows_given=True)
    assert Recipe(method="pvq", finetune=None).stream_obstacle(windows_given=True) is None


def _optimum(costs, distortions, budget):
    names = sorted(costs)
    best = None
    for combo in itertools.product(*(range(len(costs[n])) for n in names)):
        c = sum(costs[n][k] for n, k in zip(names, combo))
        d = sum(distortions[n][k] for n, k in zip(names, combo))
        if c <= budget and (best is None or d < best):
            best = d
    return best


def test_solve_allocation_meets_the_budget_at_the_exhaustive_optimum():
    rng = np.random.default_rng(0)
    worst = 1.0
    for trial in range(40):
        costs, distortions = {}, {}
        for n in range(5):
            bits = np.sort(rng.choice(np.arange(1, 40), size=5, replace=False))
            scale = rng.lognormal(0, 2)
            costs[f"l{n}"] = [int(b * 100) for b in bits]
            distortions[f"l{n}"] = [float(scale * 2.0 ** (-0.4 * b)) for b in bits]
        budget = int(rng.uniform(sum(min(c) for c in costs.values()), sum(max(c) for c in costs.values())))
        choice = solve_allocation(costs, distortions, budget)
        assert sum(costs[n][k] for n, k in choice.items()) <= budget
        got = sum(distortions[n][k] for n, k in choice.items())
        worst = max(worst, got / _optimum(costs, distortions, budget))
    assert worst < 1.01  # the dynamic program: the knapsack optimum up to its budget units
    with pytest.raises(Exception, match="below the cheapest"):
        solve_allocation({"a": [10, 20]}, {"a": [1.0, 0.5]}, 5)


@pytest.mark.parametrize("method,fields,target", [
    ("pvq", {"group_size": 16, "shape_bits": 3.0, "gain": "empirical"}, 2.5),
    ("gptq", {"bits": 3, "group_size": 32}, 3.3),
])
def test_allocation_meets_its_budget_and_round_trips(method, fields, target, tmp_path):
    import transformers

    import pvq

    torch.manual_seed(0)
    model = tiny_llama(seed=1, layers=4, hidden=128, intermediate=256, heads=4, kv_heads=2)
    windows = torch.randint(2, 200, (6, 48))
    result = oneshot(model, None, Recipe(method=method, config=fields, calib_windows=6, calib_seqlen=48,
                                         target_bpw=target), windows=windows, progress=False,
                     work_dir=str(tmp_path / "work"))
    alloc = result.allocation
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    measured = sum(m.stored_bytes for m in layers) * 8 / sum(m.in_features * m.out_features for m in layers)
    assert measured == pytest.approx(alloc.bits_per_weight, abs=1e-12)
    assert target * (1 - 0.005) <= measured <= target, alloc.describe()
    assert len(alloc.histogram()) > 1  # layers got different settings
    for name, config in alloc.configs.items():
        layer = model.get_submodule(name)
        assert layer.config == config and layer.stored_bytes * 8 == stored_bits(method, config, (layer.out_features,
                                                                                                 layer.in_features))
    pvq.save(model, tmp_path / "ckpt")
    overrides = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]["layer_overrides"]
    assert overrides
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = windows[:1]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    # the allocation is kept in the work directory and reused
    again = tiny_llama(seed=1, layers=4, hidden=128, intermediate=256, heads=4, kv_heads=2)
    result2 = oneshot(again, None, Recipe(method=method, config=fields, calib_windows=6, calib_seqlen=48,
                                          target_bpw=target), windows=windows, progress=False,
                      work_dir=str(tmp_path / "work"))
    assert {n: c for n, c in result2.allocation.configs.items()} == alloc.configs


def test_cli_quantize_with_finetune_and_target_bpw(tmp_path, capsys):
    from pvq.cli import main

    root = tmp_path
    save_tiny_model(root / "model", seed=2)
    write_texts(root, "the quick brown fox jumps over the lazy dog. " * 120, 2000)
    out = root / "ckpt"
    assert main(["quantize", str(root / "model"), "--out", str(out), "--calib-text", str(root / "calib.txt"),
                 "--calib-windows", "6", "--calib-seqlen", "48", "--eval-text", str(root / "wiki.test.raw"),
                 "--eval-seqlen", "48", "--eval-windows", "2", "--device", "cpu", "--target-bpw", "2.6",
                 "--finetune-steps", "4", "--finetune-val-windows", "2", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "bit allocation   target 2.6" in text and "fine-tuning      4 steps" in text
    report = json.loads((out / "job_report.json").read_text())
    assert report["allocation"]["bits_per_weight"] <= 2.6 and report["finetune"]["steps"] == 4
    assert report["bits_per_weight_measured"] == pytest.approx(report["allocation"]["bits_per_weight"])
    recipe = (out / "recipe.yaml").read_text()
    assert "target_bpw: 2.6" in recipe and "fast: false" in recipe and "finetune_steps: 4" in recipe
    # fine-tuning options with --fast (one-shot) are refused, naming the switch
    assert main(["quantize", str(root / "model"), "--fast", "--finetune-steps", "3", "--out", str(root / "x")]) == 2
    assert "--finetune-steps has no effect with --fast" in capsys.readouterr().err
