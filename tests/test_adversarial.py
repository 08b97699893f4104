"""Hostile input, damaged state, interruptions: every case ends in one line and exit code 2
(or a PVQError in the API), with nothing half-written and nothing read outside a checkpoint.

One test per failure class; the checkpoint-format cases (tampered files, symlinks, unlisted
files, huge configs, non-finite tensors, codes out of range) are in test_formats.py, the
damaged work directory in test_pipeline.py. Keep adding cases here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from conftest import cli_error, printable_char_tokenizer, save_tiny_model  # noqa: E402
from pvq.errors import PVQError  # noqa: E402
from pvq.formats import save_checkpoint  # noqa: E402
from pvq.models import tiny_llama  # noqa: E402
from pvq.oneshot import Recipe, oneshot  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog. " * 60


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("adv")
    save_tiny_model(root / "model")
    (root / "calib.txt").write_text(TEXT)
    (root / "wiki.test.raw").write_text(" \n = Title = \n \n" + TEXT + "\n \n")
    model = tiny_llama(seed=0)
    oneshot(model, None, Recipe(method="rtn", config={"bits": 4, "group_size": 32}), progress=False)
    save_checkpoint(model, root / "ck", tokenizer=printable_char_tokenizer())
    return root


def quantize_args(env: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(env / "model"), "--out", str(out), "--method", "rtn", "--group-size", "32",
            "--calib-text", str(env / "calib.txt"), "--calib-windows", "2", "--calib-seqlen", "32",
            "--eval-text", str(env / "wiki.test.raw"), "--eval-seqlen", "32", "--eval-windows", "2", *extra]


BAD_QUANTIZE = [
    (["--device", "cuda:0"], "no CUDA device|only .* CUDA device"),
    (["--device", "tpu9"], "is not a device"),
    (["--group-size", "48"], "not divisible by group_size 48"),
    (["--bits", "12"], "bits must be in 2..8"),
    (["--calib-seqlen", "100000"], "--calib-seqlen 100000 is longer than the model's 512 positions"),
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
        oneshot(model, None, Recipe(method="rtn", config={"bits": 4, "group_size": 32}), progress=False)


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
