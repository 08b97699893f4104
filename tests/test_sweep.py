"""`pvq sweep` (pvq.sweep) and `pvq plot gains` (pvq.eval.gains) on a tiny random Llama."""

from __future__ import annotations

import csv
import json

import numpy as np
import re

import pytest
from conftest import cli_error, write_texts

import pvq.sweep as sweep
from pvq.cli import main
from pvq.codec import CodecError, beta_gain_density, beta_gain_parameters, normalised_group_gains
from pvq.eval.gains import GainPlotError, default_gain_layers, layer_gains
from pvq.models import tiny_llama
from pvq.methods import get_method
from pvq.sweep import SweepError, SweepOptions, method_config, plan_points, run_sweep

TEXT = "the quick brown fox jumps over the lazy dog. " * 200


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from conftest import save_tiny_model

    root = tmp_path_factory.mktemp("tiny-sweep")
    save_tiny_model(root / "model")
    write_texts(root, TEXT, 3000)
    tasks = root / "tasks" / "mosaicml-gauntlet"
    tasks.mkdir(parents=True)
    (tasks / "arc_easy.jsonl").write_text("".join(
        json.dumps({"query": f"Question: what is {q}?", "choices": ["a fox", "a dog", "the sky"], "gold": g}) + "\n"
        for q, g in (("quick", 0), ("lazy", 1), ("blue", 2))))
    (tasks / "lambada_openai.jsonl").write_text(json.dumps({"context": "the quick brown", "continuation": "fox"}) + "\n")
    return root


def _opts(tiny_dir, out, **kw) -> SweepOptions:
    base = dict(model=str(tiny_dir / "model"), methods=["rtn", "pvq"], bits=[3, 4], out=str(out), group_size=32,
                calib_text=str(tiny_dir / "calib.txt"), calib_windows=2, calib_seqlen=32, batch_size=2,
                eval_text=str(tiny_dir / "wiki.test.raw"), eval_seqlen=64, eval_windows=3, progress=False,
                finetune=None)  # one-shot points only, unless a test asks for fine-tuning
    base.update(kw)
    return SweepOptions(**base)


def test_bits_mean_what_the_docs_say():
    opts = SweepOptions(group_size=64)
    rtn = get_method("rtn")
    cfg = method_config("rtn", 3, opts)
    assert cfg["bits"] == 3 and cfg["group_size"] == 64
    assert rtn.nominal_bits_per_weight(rtn.config_class(**cfg)) == pytest.approx(3 + 19 / 64)
    pvq = get_method("pvq")
    for bits in (2, 3, 4):
        cfg = method_config("pvq", bits, opts)
        assert cfg["group_size"] == 16 and cfg["gain"] == "empirical" and cfg["gain_bits"] == 4
        nominal = pvq.nominal_bits_per_weight(pvq.config_class(**cfg))
        assert bits + 0.25 - 1 / 16 <= nominal <= bits + 0.25  # code_bits(D, K) <= bits * D
    gptvq = get_method("gptvq")
    for bits in (2, 3, 4):
        cfg = method_config("gptvq", bits, opts)
        config = gptvq.config_class(**cfg)
        side = gptvq.nominal_bits_per_weight(config) - bits
        assert 0 < side <= 0.25 and side > 0.25 * (1 - config.group_columns / config.group_size) - 1e-12
        assert config.seed == opts.seed  # the k-means++ seed is the sweep's --seed, as in `pvq quantize`
    assert method_config("gptvq", 3, SweepOptions(seed=7))["seed"] == 7


def test_bad_methods_and_bits_are_refused(tiny_dir, tmp_path, capsys):
    with pytest.raises(SweepError, match="unknown method 'foo'; a sweep takes: rtn, gptq, pvq, gptvq"):
        plan_points(SweepOptions(methods=["rtn", "foo"]))
    with pytest.raises(SweepError, match=r"rtn: bits must be an integer in 2..8, got 2.5"):
        plan_points(SweepOptions(methods=["rtn"], bits=[2.5]))
    assert re.search("unknown methods 'fp4', 'awq'", cli_error(capsys, ["sweep", str(tiny_dir / "model"), "--methods", "fp4,awq", "--out", str(tmp_path / "s")]))
    assert re.search("unknown task 'no_such_task': neither local", cli_error(capsys, ["sweep", str(tiny_dir / "model"), "--methods", "rtn", "--tasks", "no_such_task", "--out", str(tmp_path / "s")]))


def test_sweep_writes_reports_and_reuses_points(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    opts = _opts(tiny_dir, out, tasks=["arc_easy", "lambada_openai"], tasks_dir=str(tiny_dir / "tasks"), limit=2)
    rows = run_sweep(opts)
    assert [r["point"] for r in rows] == ["float", "rtn-3b", "rtn-4b", "pvq-3b", "pvq-4b"]
    for name in ("results.csv", "results.md", "ppl_vs_bpw.png", "acc_vs_bpw.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "ppl_vs_bpw.png").read_bytes()[:4] == b"\x89PNG"
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [r["point"] for r in table] == [r["point"] for r in rows]
    by = {r["point"]: r for r in rows}
    assert by["float"]["bpw_measured"] == 16
    # rtn 3 bits, a float16 scale and 3-bit zero per 32 columns: 3 + 19/32 exactly
    assert by["rtn-3b"]["bpw_measured"] == pytest.approx(3 + 19 / 32)
    assert by["pvq-3b"]["bpw_measured"] < by["pvq-4b"]["bpw_measured"]
    assert by["pvq-3b"]["mean_proxy_loss"] is not None and by["rtn-3b"]["mean_proxy_loss"] is None  # Hessian vs not
    assert by["rtn-4b"]["tasks"]["arc_easy"]["items"] == 2 and "acc_norm" in by["rtn-4b"]["tasks"]["arc_easy"]["metrics"]
    assert 0 <= by["pvq-4b"]["avg_acc"] <= 1
    assert "| pvq-3b | pvq | 3 |" in (out / "results.md").read_text()
    assert not any(p.name.endswith(".work") for p in (out / "points").iterdir())

    # a rerun with the same settings loads no model and rewrites no point
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()}

    def no_model(*a, **k):
        raise AssertionError("a finished point was recomputed")

    monkeypatch.setattr(sweep, "load_model", no_model)
    again = run_sweep(opts)
    assert again == rows
    assert {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()} == mtimes


def test_changed_settings_are_not_silently_reused(tiny_dir, tmp_path):
    out = tmp_path / "sweep"
    opts = _opts(tiny_dir, out, methods=["rtn"], bits=[4], float_point=False)
    first = run_sweep(opts)[0]
    with pytest.raises(SweepError, match=r"point rtn-4b .* different settings \(eval\.windows: kept 3, now 2\)"):
        run_sweep(_opts(tiny_dir, out, methods=["rtn"], bits=[4], float_point=False, eval_windows=2))
    with pytest.raises(SweepError, match=r"config\.group_size: kept 32, now 64"):
        run_sweep(_opts(tiny_dir, out, methods=["rtn"], bits=[4], float_point=False, group_size=64))
    redone = run_sweep(_opts(tiny_dir, out, methods=["rtn"], bits=[4], float_point=False, eval_windows=2,
                             redo_changed=True))[0]
    assert redone["eval_windows"] == 2 and first["eval_windows"] == 3


def test_interrupted_sweep_resumes(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    opts = _opts(tiny_dir, out, methods=["rtn", "gptq"], bits=[3, 4], float_point=False)
    real = sweep.run_point
    calls = []

    def interrupted(point, *args, **kwargs):
        calls.append(point.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(point, *args, **kwargs)

    monkeypatch.setattr(sweep, "run_point", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(opts)
    done = sorted(p.name for p in (out / "points").glob("*.json"))
    assert done == ["rtn-3b.json", "rtn-4b.json"]
    mtimes = {p: (out / "points" / p).stat().st_mtime_ns for p in done}

    calls.clear()
    monkeypatch.setattr(sweep, "run_point", lambda point, *a, **k: (calls.append(point.name), real(point, *a, **k))[1])
    rows = run_sweep(opts)
    assert calls == ["gptq-3b", "gptq-4b"]
    assert [r["point"] for r in rows] == ["rtn-3b", "rtn-4b", "gptq-3b", "gptq-4b"]
    assert {p: (out / "points" / p).stat().st_mtime_ns for p in done} == mtimes
    assert (out / "results.md").is_file() and not (out / "acc_vs_bpw.png").exists()


def test_cli_sweep(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["sweep", str(tiny_dir / "model"), "--methods", "rtn", "--bits", "4", "--group-size", "32",
                 "--out", str(out), "--eval-text", str(tiny_dir / "wiki.test.raw"), "--eval-seqlen", "64",
                 "--eval-windows", "2", "--device", "cpu", "--fast"]) == 0
    text = capsys.readouterr().out
    assert "| rtn-4b | rtn | 4 |" in text and "| float | float |" in text
    assert (out / "points" / "rtn-4b.json").is_file() and (out / "ppl_vs_bpw.png").is_file()


# ----------------------------------------------------------------------------- gains


def test_normalised_gains_and_the_beta_density():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((400, 256))
    D = 16
    g = normalised_group_gains(W, D)
    assert g.shape == (400, 16)
    np.testing.assert_allclose((g**2).sum(axis=1), 1.0, rtol=1e-12)
    # Gaussian rows: u = g^2 follows Beta(D/2, D(G-1)/2); compare the empirical CDF
    from scipy.stats import beta as beta_law

    a, b = beta_gain_parameters(D, 16)
    u = np.sort((g**2).ravel())
    ks = np.max(np.abs(np.arange(1, u.size + 1) / u.size - beta_law.cdf(u, a, b)))
    assert ks < 0.02
    # both densities integrate to 1, and the gain's is the energy's after u = g^2
    x = np.linspace(0, 1, 200001)
    assert np.trapezoid(beta_gain_density(x, D, 16), x) == pytest.approx(1, abs=1e-4)
    assert np.trapezoid(beta_gain_density(x, D, 16, squared=False), x) == pytest.approx(1, abs=1e-4)
    cdf_g = beta_law.cdf(x**2, a, b)
    np.testing.assert_allclose(np.gradient(cdf_g, x)[1000:-1000],
                               beta_gain_density(x, D, 16, squared=False)[1000:-1000], atol=1e-3)
    # an all-zero row has no gains
    W[3] = 0
    assert normalised_group_gains(W, D).shape == (399, 16)
    with pytest.raises(CodecError, match="do not split into >= 2 groups of 24"):
        normalised_group_gains(W, 24)


def test_layer_gains_have_the_documented_normalisation():
    model = tiny_llama(seed=0, layers=3)
    names = default_gain_layers(model)
    assert names[0] == "model.layers.0.self_attn.q_proj" and names[-1] == "model.layers.2.mlp.down_proj"
    assert len(names) == 12
    gains = layer_gains(model, 16, names)
    for lg in gains:
        W = model.get_submodule(lg.name).weight.detach().double().numpy()
        assert lg.gains.shape == (W.shape[0], W.shape[1] // 16)
        np.testing.assert_allclose((lg.gains**2).sum(axis=1), 1.0, rtol=1e-12)
        # group g of row r is columns g*16 .. g*16+15
        assert lg.gains[5, 2] == pytest.approx(np.linalg.norm(W[5, 32:48]) / np.linalg.norm(W[5]))
    with pytest.raises(GainPlotError, match=r"in_features 64 does not split into >= 2 groups of 48"):
        layer_gains(model, 48, ["model.layers.0.self_attn.q_proj"])
    with pytest.raises(GainPlotError, match="model has no layer 'model.layers.9.mlp.up_proj'"):
        layer_gains(model, 16, ["model.layers.9.mlp.up_proj"])


@pytest.mark.parametrize("extra", [[], ["--rotate", "--quantity", "gain"]])
def test_cli_plot_gains_writes_a_png(tiny_dir, tmp_path, capsys, extra):
    out = tmp_path / "gains.png"
    assert main(["plot", "gains", str(tiny_dir / "model"), "--pvq-group-size", "16", "--out", str(out), *extra]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "model.layers.1.mlp.down_proj" in capsys.readouterr().out
    assert re.search("does not split into >= 2 groups of 64", cli_error(capsys, ["plot", "gains", str(tiny_dir / "model"), "--pvq-group-size", "64", "--out", str(out)]))


def test_which_methods_need_calibration():
    from pvq.methods import QuantizationError, uses_hessian

    assert not uses_hessian("rtn", {"bits": 3})
    assert uses_hessian("gptq", {}) and uses_hessian("gptvq", {})
    assert uses_hessian("pvq", {}) and not uses_hessian("pvq", {"use_hessian": False})
    assert not uses_hessian("pvq", get_method("pvq").config_class(use_hessian=False))
    with pytest.raises(QuantizationError, match="unknown method 'awq'"):
        uses_hessian("awq", {})


def test_sweep_adds_a_fine_tuned_point_beside_each_one_shot_point(tiny_dir, tmp_path, monkeypatch):
    # by default every quantized point has a fine-tuned twin; finetune None (--fast): one-shot points only
    assert [p.name for p in plan_points(SweepOptions(methods=["rtn"], bits=[3]))] == ["float", "rtn-3b", "rtn-3b-ft"]
    assert [p.name for p in plan_points(SweepOptions(methods=["rtn"], bits=[3], finetune=None))] == ["float", "rtn-3b"]
    out = tmp_path / "ft"
    plain = run_sweep(_opts(tiny_dir, out, methods=["rtn", "pvq"], bits=[3], calib_windows=3))
    calls = []
    real_oneshot = sweep.oneshot
    monkeypatch.setattr(sweep, "oneshot", lambda *a, **k: calls.append(a[2]) or real_oneshot(*a, **k))
    ft = {"steps": 2, "eval_every": 1, "val_windows": 1}
    opts = _opts(tiny_dir, out, methods=["rtn", "pvq", "gptq"], bits=[3], calib_windows=3, finetune=ft)
    assert [p.name for p in plan_points(opts)] == ["float", "rtn-3b", "rtn-3b-ft", "pvq-3b", "pvq-3b-ft", "gptq-3b",
                                                   "gptq-3b-ft"]
    rows = {r["point"]: r for r in run_sweep(opts)}
    # the one-shot points of the plain sweep are kept; gptq's pair comes from one quantization
    assert [(r.method, r.finetune is not None) for r in calls] == [("rtn", True), ("pvq", True), ("gptq", True)]
    for r in plain:
        assert rows[r["point"]] == r
    assert rows["gptq-3b"]["finetuned"] is False and "finetune_seconds" not in rows["gptq-3b"]
    for name in ("rtn-3b-ft", "pvq-3b-ft", "gptq-3b-ft"):
        point = json.loads((out / "points" / f"{name}.json").read_text())
        assert point["settings"]["finetune"] == ft and point["settings"]["calibration"]["windows"] == 3
        assert point["row"]["finetuned"] is True and point["row"]["finetune_kept"] in ("tuned", "one-shot")
        assert point["row"]["finetune_seconds"] > 0
        assert point["row"]["bpw_measured"] == rows[name[:-3]]["bpw_measured"]  # the same bytes
    # the one-shot twin of a fine-tuned run equals a plain sweep of it
    alone = {r["point"]: r for r in run_sweep(_opts(tiny_dir, tmp_path / "alone", methods=["gptq"], bits=[3],
                                                        calib_windows=3, float_point=False))}
    assert alone["gptq-3b"]["ppl"] == rows["gptq-3b"]["ppl"]
    assert "finetune" not in json.loads((out / "points" / "float.json").read_text())["settings"]
    assert "finetune" not in json.loads((out / "points" / "gptq-3b.json").read_text())["settings"]
    text = (out / "results.md").read_text()
    assert "| gptq-3b-ft | gptq |" in text and "finetune_seconds" in text
    assert (out / "ppl_vs_bpw.png").read_bytes()[:4] == b"\x89PNG"
