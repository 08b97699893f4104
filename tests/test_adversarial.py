"""Hostile input, damaged state, interruptions: every case ends in one line and exit code 2
(or a PVQError in the API), with nothing half-written and nothing read outside a checkpoint.

One test per failure class; the checkpoint-format cases (tampered files, symlinks, unlisted
files, huge configs, non-finite tensors, codes out of range) are in test_checkpoint.py, the
damaged work directory in test_calibrate.py. Keep adding cases here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from conftest import ADVERSARIAL_TEXT as TEXT  # noqa: E402
from conftest import adversarial_env, cli_error, printable_char_tokenizer  # noqa: E402
from pvq.errors import PVQError  # noqa: E402
from pvq.models import tiny_llama  # noqa: E402
from pvq.oneshot import Recipe, oneshot  # noqa: E402



@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return adversarial_env(tmp_path_factory.mktemp("adv"))


def quantize_args(env: Path, out: Path, *extra: str) -> list[str]:
    """rtn on the tiny model unless `extra` names another method (then with calibration
    options, which belong to the methods that use a Hessian); one-shot (--fast)."""
    method = extra[list(extra).index("--method") + 1] if "--method" in extra else "rtn"
    calib = [] if method == "rtn" else ["--calib-text", str(env / "calib.txt"), "--calib-windows", "2",
                                        "--calib-seqlen", "32"]
    return ["quantize", str(env / "model"), "--out", str(out), "--method", "rtn",
            *(["--group-size", "32"] if method in ("rtn", "gptq") else []), *calib,
            "--eval-text", str(env / "wiki.test.raw"), "--eval-seqlen", "32", "--eval-windows", "2", "--fast", *extra]


BAD_QUANTIZE = [
    (["--device", "cuda:0"], "no CUDA device|only .* CUDA device"),
    (["--device", "tpu9"], "is not a device"),
    (["--group-size", "48"], "not divisible by group_size 48"),
    (["--bits", "12"], "bits must be in 2..8"),
    (["--method", "gptq", "--calib-seqlen", "100000"], "--calib-seqlen 100000 is longer than the model's 512 positions"),
    (["--eval-text", "/nonexistent/wiki.test.raw"], "WikiText-2 raw test file not found"),
    (["--method", "gptq", "--calib-windows", "500", "--calib-seqlen", "64"], "too few for 500 non-overlapping windows"),
]


@pytest.mark.parametrize("extra,message", BAD_QUANTIZE)
def test_bad_quantize_options_fail_in_one_line_before_any_work(env, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    line = cli_error(capsys, quantize_args(env, out, *extra))
    assert __import__("re").search(message, line), line
    assert not out.exists() and not Path(f"{out}.work").exists() or not any(Path(f"{out}.work").glob("block_*"))


def test_bad_models_fail_in_one_line(env, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty").mkdir()
    for spec, message in ((str(tmp_path / "missing-dir/"), "does not exist"),
                          (str(tmp_path / "missing.gguf"), "GGUF file not found"),
                          (str(tmp_path / "notes.txt"), "not a .gguf file"),
                          ("nosuchmodel", "not in the Hugging Face cache"),
                          (str(tmp_path / "empty"), "could not load model")):
        assert message in cli_error(capsys, ["quantize", spec, "--out", str(tmp_path / "o"), "--no-eval"]), spec
        assert message in cli_error(capsys, ["generate", spec, "--prompt", "x"]), spec
    assert not (tmp_path / "o").exists()


def test_nothing_pvq_did_not_write_is_ever_deleted(env, tmp_path, capsys):
    # an existing folder of the user's: refused as --out, with --overwrite too, and as --work-dir
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    assert "not a pvq checkpoint" in cli_error(capsys, quantize_args(env, mine, "--overwrite"))
    assert "holds files pvq did not write" in cli_error(
        capsys, quantize_args(env, tmp_path / "o", "--work-dir", str(mine), "--method", "gptq"))
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    # a checkpoint holding a file of the user's is not replaced
    ck = tmp_path / "ck"
    shutil.copytree(env / "ck", ck)
    (ck / "my-notes.txt").write_text("mine")
    assert "files pvq did not write (my-notes.txt)" in cli_error(capsys, quantize_args(env, ck, "--overwrite"))
    assert (ck / "my-notes.txt").read_text() == "mine"


def test_outputs_that_cannot_be_written_are_refused_first(env, tmp_path, capsys):
    line = cli_error(capsys, ["eval", str(env / "ck"), "--eval-text", str(env / "wiki.test.raw"), "--seqlen", "32",
                              "--json", str(tmp_path / "no" / "such" / "dir" / "e.json")])
    assert "does not exist" in line
    assert "already holds a pvq checkpoint" in cli_error(capsys, quantize_args(env, env / "ck"))


def test_non_finite_weights_are_refused_at_quantize_time(tmp_path):
    model = tiny_llama(seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight[3, 4] = float("nan")  # a tensor that is not quantized
    with pytest.raises(PVQError, match="'model.embed_tokens.weight' has non-finite values"):
        oneshot(model, None, Recipe(method="rtn", config={"bits": 4, "group_size": 32}, finetune=None), progress=False)


def test_an_evaluation_that_yields_nan_is_an_error(tmp_path, capsys):
    model = tiny_llama(seed=0)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(tmp_path / "m")
    printable_char_tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "w.raw").write_text(" \n = T = \n \n" + TEXT + "\n \n")
    line = cli_error(capsys, ["eval", str(tmp_path / "m"), "--eval-text", str(tmp_path / "w.raw"), "--seqlen", "32"])
    assert "perplexity is nan" in line


def test_damaged_task_and_sweep_files_name_the_file(env, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    (tasks / "hellaswag").mkdir(parents=True)
    (tasks / "hellaswag" / "hellaswag_val_full.txt.bz2").write_bytes(b"BZh91AY&SY" + os.urandom(40))
    line = cli_error(capsys, ["eval", str(env / "model"), "--tasks", "hellaswag", "--tasks-dir", str(tasks),
                              "--no-ppl"])
    assert "hellaswag: cannot read its data under" in line
    points = tmp_path / "sweep" / "points"
    points.mkdir(parents=True)
    (points / "float.json").write_text(json.dumps({"settings": {}, "row": {"point": "float"}}))
    from pvq.sweep import SweepError, _read_point

    with pytest.raises(SweepError, match="is damaged"):
        _read_point(points / "float.json")
    (points / "float.json").write_text("[" * 100000)
    with pytest.raises(SweepError, match="cannot be read \\(RecursionError"):
        _read_point(points / "float.json")


def test_deeply_nested_config_json_is_one_line(env, tmp_path, capsys):
    bad = tmp_path / "ck"
    shutil.copytree(env / "ck", bad)
    (bad / "config.json").write_text('{"a": ' * 100000 + "1" + "}" * 100000)
    line = cli_error(capsys, ["verify", str(bad)])
    assert "config.json" in line


def test_verify_reports_an_interrupted_save(env, tmp_path, capsys):
    """A checkpoint directory that lost files (a copy interrupted half-way) names what is missing."""
    bad = tmp_path / "ck"
    shutil.copytree(env / "ck", bad)
    (bad / "tokenizer.json").unlink()
    assert "'tokenizer.json' is missing" in cli_error(capsys, ["verify", str(bad)])


def test_text_files_that_are_not_utf8_name_the_file(env, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 500)
    line = cli_error(capsys, quantize_args(env, tmp_path / "o", "--method", "gptq", "--calib-text", str(bad)))
    assert f"calibration text {bad} cannot be read as UTF-8" in line
    line = cli_error(capsys, ["eval", str(env / "model"), "--eval-text", str(bad), "--seqlen", "32"])
    assert f"{bad} cannot be read as UTF-8" in line


# --------------------------------------------------------------------------- found by an adversarial pass


def _reindexed_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of a checkpoint, edited by `edit(dst)`, with its index recomputed (a consistent tamper)."""
    import hashlib

    shutil.copytree(src, dst)
    edit(dst)
    index = json.loads((dst / "pvq_index.json").read_text())
    for name in list(index["files"]):
        data = (dst / name).read_bytes()
        index["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (dst / "pvq_index.json").write_text(json.dumps(index))
    return dst


def _edit_config(edit):
    def run(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        edit(config)
        (d / "config.json").write_text(json.dumps(config))
    return run


def _drop_tensor(key):
    def run(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(d / "model.safetensors")
        del tensors[key]
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return run


@pytest.mark.parametrize("edit,message", [
    (_edit_config(lambda c: c["quantization_config"]["layers"].remove("model.layers.0.self_attn.v_proj")),
     "do not match the model.*model.layers.0.self_attn.v_proj"),
    (_drop_tensor("model.embed_tokens.codes"), "missing: model.embed_tokens.codes"),
    (_drop_tensor("model.layers.0.input_layernorm.weight"), "missing: model.layers.0.input_layernorm.weight"),
    (_edit_config(lambda c: c["quantization_config"].update(dense_dtype=["float16"])), "dense_dtype must be one of"),
    (_edit_config(lambda c: c["quantization_config"].update(method=["rtn"])), "method must be a method name"),
    (_edit_config(lambda c: c["quantization_config"]["config"].update(group_size=10**20)), "larger than in_features"),
])
def test_consistently_tampered_checkpoints_are_refused(env, tmp_path, capsys, edit, message):
    bad = _reindexed_copy(env / "ck", tmp_path / "bad", edit)
    assert __import__("re").search(message, cli_error(capsys, ["verify", str(bad)]))
    with pytest.raises(PVQError, match=message):
        __import__("transformers").AutoModelForCausalLM.from_pretrained(bad)


def test_transformers_route_verifies_the_index(env, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(env / "ck", bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-3] ^= 1
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(PVQError, match="fails its checksum"):
        __import__("transformers").AutoModelForCausalLM.from_pretrained(bad)


def test_float_models_with_missing_or_damaged_files_are_refused(env, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    fm = tmp_path / "fm"
    shutil.copytree(env / "model", fm)
    tensors = load_file(fm / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, fm / "model.safetensors", metadata={"format": "pt"})
    assert "missing keys: ['model.layers.1.mlp.up_proj.weight']" in cli_error(
        capsys, ["quantize", str(fm), "--out", str(tmp_path / "o"), "--method", "rtn", "--group-size", "32", "--no-eval"])
    assert not (tmp_path / "o").exists()
    (fm / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert "could not load model" in cli_error(capsys, ["generate", str(fm), "--prompt", "hi"])
    for name, text in (("deep", '{"a": ' * 100000 + "1" + "}" * 100000), ("array", "[1, 2]"),
                       ("listtype", json.dumps({"model_type": ["llama"]}))):
        d = tmp_path / name
        shutil.copytree(env / "model", d)
        (d / "config.json").write_text(text)
        cli_error(capsys, ["generate", str(d), "--prompt", "hi"])  # one line, exit 2


@pytest.mark.parametrize("argv,message", [
    (["generate", "{ck}", "--prompt", ""], "encodes to no tokens"),
    (["generate", "{ck}", "--prompt", "hi", "--max-new-tokens", "100000000"], "exceed the model's 512 positions"),
    (["generate", "{ck}", "--prompt", "hi", "--threads", "-1"], None),
    (["eval", "{ck}", "--seqlen", "0"], None),
    (["eval", "{ck}", "--max-windows", "-1"], None),
    (["eval", "{ck}", "--batch-size", "0"], None),
])
def test_out_of_range_options(env, capsys, argv, message):
    argv = [a.replace("{ck}", str(env / "ck")) for a in argv]
    if message is None:  # argparse refuses the value, in the CLI's one-line form
        assert "must be at least" in cli_error(capsys, argv)
    else:
        assert message in cli_error(capsys, argv)


def test_quantize_options_checked_before_the_work(env, tmp_path, capsys):
    for extra, message in ((["--max-shard-size", "banana"], "not a size"), (["--max-shard-size", "0"], "must be positive"),
                           (["--work-dir", str(tmp_path / "same")], "must be separate directories")):
        out = tmp_path / "same"
        assert message in cli_error(capsys, quantize_args(env, out, "--method", "gptq", *extra))
        assert not out.exists()
    import time

    t0 = time.perf_counter()
    assert "larger than in_features" in cli_error(capsys, quantize_args(env, tmp_path / "o", "--group-size", str(10**20)))
    assert time.perf_counter() - t0 < 60


def test_per_row_groups_work_end_to_end(env, tmp_path, capsys):
    from pvq.cli import main

    assert main(quantize_args(env, tmp_path / "o", "--group-size", "-1")) == 0
    report = json.loads((tmp_path / "o" / "job_report.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert report["bits_per_weight_nominal"] > 4 and report["mean_proxy_loss"] is None  # RTN: no Hessian, no NaN


def test_a_foreign_manifest_is_not_a_checkpoint(env, tmp_path, capsys):
    web = tmp_path / "webapp"
    (web / "sub").mkdir(parents=True)
    (web / "manifest.json").write_text(json.dumps({"name": "app", "files": {"index.html": {}, "sub/app.js": {}}}))
    (web / "index.html").write_text("<html>")
    (web / "sub" / "app.js").write_text("1")
    assert "not a pvq checkpoint" in cli_error(capsys, quantize_args(env, web, "--overwrite"))
    assert sorted(p.relative_to(web).as_posix() for p in web.rglob("*") if p.is_file()) == [
        "index.html", "manifest.json", "sub/app.js"]


def test_legacy_conversion_reads_only_listed_regular_files(tmp_path, capsys):
    legacy = Path(__file__).parent / "data" / "legacy" / "v1-pvq"
    src = tmp_path / "old"
    shutil.copytree(legacy, src)
    (src / "chat_template.jinja").write_text("{{ evil }}")
    from pvq.checkpoint import convert_legacy

    index = convert_legacy(src, tmp_path / "new")
    assert "chat_template.jinja" not in index["files"] and not (tmp_path / "new" / "chat_template.jinja").exists()
    outside = tmp_path / "outside.safetensors"
    shutil.copy(src / "dense.safetensors", outside)
    (src / "dense.safetensors").unlink()
    os.symlink(outside, src / "dense.safetensors")
    assert "symbolic link" in cli_error(capsys, ["convert", str(src), str(tmp_path / "new2")])
    assert not (tmp_path / "new2").exists()


def test_second_adversarial_pass(env, tmp_path, capsys):
    """Cases a second pass found: a config that is not an object, garbage tokenizer files,
    converting a checkpoint onto itself."""
    bad = _reindexed_copy(env / "ck", tmp_path / "cfg", _edit_config(lambda c: c["quantization_config"].update(config=[4, 32])))
    assert "config must be an object" in cli_error(capsys, ["verify", str(bad)])
    bad = _reindexed_copy(env / "ck", tmp_path / "tok", lambda d: (d / "tokenizer.json").write_bytes(b"\x00garbage{{{"))
    assert "tokenizer files cannot be loaded" in cli_error(capsys, ["verify", str(bad)])
    bad = _reindexed_copy(env / "ck", tmp_path / "tokcfg", lambda d: (d / "tokenizer_config.json").write_text("[1, 2, 3]"))
    assert "tokenizer files cannot be loaded" in cli_error(capsys, ["verify", str(bad)])
    legacy = tmp_path / "leg"
    shutil.copytree(Path(__file__).parent / "data" / "legacy" / "v1-pvq", legacy)
    assert "NEW must differ from OLD" in cli_error(capsys, ["convert", str(legacy), str(legacy), "--overwrite"])
    assert (legacy / "manifest.json").is_file() and (legacy / "dense.safetensors").is_file()
