"""The Python API (`pvq.quantize`, `pvq.save`): the README's example run verbatim on a tiny
model, calibration in every accepted form, and bad input."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import printable_char_tokenizer, save_tiny_model

import pvq
from pvq.runtime import QuantizedLinear
from pvq.models import load_model
from pvq.oneshot import Recipe

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = "the quick brown fox jumps over the lazy dog. " * 60
# one-shot (finetune None): these tests are about the API's forms, not the fine-tuning that follows by default
RTN = {"method": "rtn", "config": {"bits": 4, "group_size": 32}, "finetune": None}
GPTQ = {"method": "gptq", "config": {"bits": 4, "group_size": 32}, "calib_windows": 2, "calib_seqlen": 32,
        "finetune": None}


def readme_python_api_block() -> str:
    section = README.read_text(encoding="utf-8").split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the README's Python API section should hold one python block"
    return blocks[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("api") / "model", seed=3)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_the_readme_example_runs_on_a_tiny_model(tiny_dir, tmp_path):
    code = readme_python_api_block()
    line = 'MODEL, OUT = "smollm2-135m", "pvq-nb"'
    assert line in code, "the README example should name its model and output in one line the test can swap"
    out = tmp_path / "nb"
    namespace: dict = {}
    code = code.replace(line, f"MODEL, OUT = {str(tiny_dir)!r}, {str(out)!r}")
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own example, run as written

    model, same, reloaded, ids = namespace["model"], namespace["same"], namespace["reloaded"], namespace["ids"]
    assert (out / "pvq_index.json").is_file() and (out / "tokenizer.json").is_file()
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 2 * 7 and {m.method for m in layers} == {"pvq"}  # every linear of the 2 blocks
    assert model.config.quantization_config.config["shape_bits"] == 3
    assert {m.layout["enumeration"] for m in layers} == {"split"}  # the CPU kernels serve it
    assert namespace["info"]["index"] is not None  # pvq.load verified the directory
    expected = _logits(model, ids)
    assert torch.equal(expected, _logits(reloaded, ids)) and torch.equal(expected, _logits(same, ids))
    float_model = load_model(tiny_dir)[0]
    assert not torch.equal(expected, _logits(float_model, ids))  # it is quantized


def test_plain_save_pretrained_of_a_module_with_activation_quantization(tiny_dir, tmp_path):
    """A module in, quantized in place; plain save_pretrained records the activation quantizers
    installed after the weights, so transformers rebuilds the same model."""
    import transformers

    model = load_model(tiny_dir)[0]
    tok = printable_char_tokenizer()
    recipe = Recipe(**GPTQ, act={"method": "rtn", "bits": 8, "group_size": 32})
    out = pvq.quantize(model, recipe, calibration=TEXT, tokenizer=tok, device="cpu", progress=False)
    assert out is model
    model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "pvq_index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert reloaded.config.quantization_config.act_quant is not None
    ids = torch.tensor([[1, 5, 9, 20, 40, 41, 42]])
    assert torch.equal(_logits(model, ids), _logits(reloaded, ids))
    with pytest.raises(pvq.PVQError, match="no pvq_index.json"):
        pvq.load(tmp_path / "plain")
    assert torch.equal(_logits(model, ids), _logits(pvq.load(tmp_path / "plain", verify=False)[0], ids))
    # the same through pvq.oneshot directly (the quantizer refreshes the records on save_pretrained)
    from pvq.oneshot import oneshot

    direct = load_model(tiny_dir)[0]
    oneshot(direct, tok, recipe, windows=model_windows(tok), progress=False)
    assert direct.config.quantization_config.act_quant is None  # installed after the config was made
    direct.save_pretrained(tmp_path / "direct")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "direct")
    assert again.config.quantization_config.act_quant is not None
    assert torch.equal(_logits(direct, ids), _logits(again, ids)) and torch.equal(_logits(direct, ids), _logits(model, ids))


def model_windows(tok):
    from pvq.calibrate import encode_text, windows_from_ids

    return windows_from_ids(encode_text(tok, TEXT), GPTQ["calib_windows"], GPTQ["calib_seqlen"], 0)


def test_calibration_forms_give_the_windows_they_say(tiny_dir, tmp_path, monkeypatch):
    """A text, the same text as a file, as a list and as windows: the same calibration reaches
    the quantizer (equal models); without calibration and calib_text "sampled" the model's own
    samples (another model)."""
    import pvq.oneshot as oneshot_module

    tok = printable_char_tokenizer()
    seen = []
    real = oneshot_module.oneshot

    def spy(model, tokenizer, recipe, **kw):
        result = real(model, tokenizer, recipe, **kw)
        seen.append(result.windows)
        return result

    monkeypatch.setattr(oneshot_module, "oneshot", spy)
    (tmp_path / "calib.txt").write_text(TEXT)
    halves = [TEXT[: len(TEXT) // 2], TEXT[len(TEXT) // 2 :]]
    from pvq.calibrate import encode_text, windows_from_ids

    windows = windows_from_ids(encode_text(tok, "\n\n".join(halves)), 2, 32, 0)
    ids = torch.tensor([[1, 5, 9, 20, 40, 41, 42]])
    logits = {}
    for name, calibration in [("text", TEXT), ("path", str(tmp_path / "calib.txt")), ("pathlike", tmp_path / "calib.txt"),
                              ("list", halves), ("windows", windows), ("sampled", None)]:
        recipe = {**GPTQ, "calib_text": "sampled"} if name == "sampled" else GPTQ
        model = pvq.quantize(str(tiny_dir), recipe, calibration=calibration, tokenizer=tok, device="cpu",
                             progress=False)
        logits[name] = _logits(model, ids)
    expected_text = windows_from_ids(encode_text(tok, TEXT), 2, 32, 0)
    assert all(torch.equal(seen[i], expected_text) for i in range(3))
    assert torch.equal(seen[3], windows) and torch.equal(seen[4], windows)
    assert seen[5].shape == (2, 32) and not torch.equal(seen[5], expected_text)
    assert torch.equal(logits["text"], logits["path"]) and torch.equal(logits["text"], logits["pathlike"])
    assert torch.equal(logits["list"], logits["windows"])
    assert not torch.equal(logits["text"], logits["sampled"])


def test_recipe_forms_and_the_tokenizer_kept_for_save(tiny_dir, tmp_path):
    ids = torch.tensor([[1, 5, 9, 20, 40]])
    a = pvq.quantize(str(tiny_dir), RTN, device="cpu", progress=False)
    b = pvq.quantize(str(tiny_dir), Recipe(**RTN), device="cpu", progress=False)
    c = pvq.quantize(str(tiny_dir), device="cpu", progress=False, **RTN)
    d = pvq.quantize(str(tiny_dir), {"method": "rtn", "config": {"bits": 2, "group_size": 32}, "finetune": None},
                     config=RTN["config"],
                     device="cpu", progress=False)  # keywords override the dict
    assert all(torch.equal(_logits(a, ids), _logits(m, ids)) for m in (b, c, d))
    assert a.config.quantization_config.method == "rtn"
    first = pvq.quantize(str(tiny_dir), GPTQ, calibration=TEXT, work_dir=tmp_path / "wd", device="cpu", progress=False)
    resumed = pvq.quantize(str(tiny_dir), GPTQ, calibration=TEXT, work_dir=tmp_path / "wd", device="cpu", progress=False)
    assert any((tmp_path / "wd").iterdir()) and torch.equal(_logits(first, ids), _logits(resumed, ids))
    pvq.save(a, tmp_path / "ck")  # the tokenizer loaded with the model goes with it
    _, tokenizer, _ = pvq.load(tmp_path / "ck")
    assert tokenizer is not None and tokenizer("ab")["input_ids"] == a.pvq_tokenizer("ab")["input_ids"]


@pytest.mark.parametrize("kwargs,message", [
    ({"bogus": 1}, r"unknown recipe field\(s\) 'bogus'; known: method, config"),
    ({"recipe_or_kwargs": {"method": "rtn", "calib_window": 4}}, r"unknown recipe field\(s\) 'calib_window'"),
    ({"recipe_or_kwargs": "rtn"}, "the recipe must be a pvq.oneshot.Recipe or a dict of its fields, got str"),
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"config": {"shape_bitz": 3}}, r"pvq config has no field\(s\) 'shape_bitz'"),
    ({"act": {"method": "rtn", "bitz": 8}}, r"unknown act field\(s\) 'bitz'"),
    ({"calib_windows": 0}, "calib_windows must be a positive integer, got 0"),
    ({"dense_dtype": "int8"}, "dense_dtype must be one of"),
    ({"calibration": 42}, "calibration must be None, a text, a list of texts, a path to a text file or a LongTensor"),
    ({"calibration": ["text", 3]}, "a calibration list must be a non-empty list of strings"),
    ({"calibration": "missing/calib.txt"}, "calibration text file not found: missing/calib.txt"),
    ({"calibration": torch.zeros(2, 8)}, "calibration windows must be integer token ids, got a torch.float32 tensor"),
    ({"calibration": torch.zeros(16, dtype=torch.long)}, r"must be a tensor \[n >= 1, seqlen >= 2\], got shape \(16,\)"),
    ({"calibration": "some text", "calib_text": "calib.txt"}, "calibration given twice"),
    ({"device": "gpu"}, "device 'gpu' is not a device"),
    ({"work_dir": 3}, "work_dir must be a path or None, got int"),
])
def test_bad_input_fails_before_any_work(tmp_path, kwargs, message):
    """Each fails before a model is loaded: the model given does not exist."""
    with pytest.raises(pvq.PVQError, match=message) as info:
        pvq.quantize(str(tmp_path / "no-model"), **kwargs)
    assert "\n" not in str(info.value)


def test_bad_input_against_the_model(tiny_dir, tmp_path):
    model = load_model(tiny_dir)[0]
    with pytest.raises(pvq.PVQError, match="model must be an nn.Module or a hub id"):
        pvq.quantize(3.5, RTN)
    with pytest.raises(pvq.PVQError, match="a calibration text needs a tokenizer"):
        pvq.quantize(model, GPTQ, calibration=TEXT, progress=False)
    with pytest.raises(pvq.PVQError, match=r"calibration token ids must lie in \[0, 256\)"):
        pvq.quantize(model, GPTQ, calibration=torch.full((2, 32), 300), progress=False)
    with pytest.raises(pvq.PVQError, match="longer than the model's 512 positions"):
        pvq.quantize(model, GPTQ, calib_seqlen=1024, progress=False)
    with pytest.raises(pvq.PVQError, match="model path does not exist"):
        pvq.quantize("./no/such/model", RTN)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("not pvq's")
    with pytest.raises(pvq.PVQError, match="taken"):
        pvq.quantize(model, GPTQ, work_dir=tmp_path / "taken", progress=False)
    with pytest.raises(pvq.PVQError, match="save needs the quantized model"):
        pvq.save("model", "out")
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())  # untouched by the failures


def test_import_pvq_stays_cheap():
    import subprocess
    import sys

    code = "import sys, pvq; assert 'pvq.api' not in sys.modules and 'pvq.oneshot' not in sys.modules; pvq.quantize"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_checkpoint_saved_from_the_api_carries_the_recipe_that_remakes_it(tiny_dir, tmp_path, capsys):
    from pvq.cli import main
    from pvq.options import read_recipe_file

    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog. " * 50)
    model = pvq.quantize(str(tiny_dir), method="gptq", config={"bits": 3, "group_size": 32},
                         calib_text=str(calib), calib_windows=2, calib_seqlen=32,
                         act={"method": "rtn", "bits": 8, "group_size": 32}, finetune=None, progress=False)
    index = pvq.save(model, tmp_path / "api")
    assert "recipe.yaml" in index["files"]
    stored = read_recipe_file(tmp_path / "api" / "recipe.yaml")
    assert (stored["method"], stored["bits"], stored["act_method"], stored["act_bits"]) == ("gptq", 3, "rtn", 8.0)
    assert main(["quantize", "--recipe", str(tmp_path / "api" / "recipe.yaml"), "--no-eval", "--quiet",
                 "--out", str(tmp_path / "cli")]) == 0
    again = json.loads((tmp_path / "cli" / "pvq_index.json").read_text())["files"]
    weights = [n for n in index["files"] if n.endswith(".safetensors")]
    assert weights and all(again[n] == index["files"][n] for n in weights)  # the same bytes
    # a module (no id to load it from again) or calibration given as data: no recipe written
    tokens = torch.randint(0, 200, (2, 32))
    data_model = pvq.quantize(str(tiny_dir), method="rtn", config={"bits": 4, "group_size": 32},
                              calibration=tokens, finetune=None, progress=False)
    assert "recipe.yaml" not in pvq.save(data_model, tmp_path / "data")["files"]
