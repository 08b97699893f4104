"""The command line as a user meets it: --help shows every default, options are grouped
per method and refused for another method, recipe files (flags override them; every
checkpoint stores the recipe that reproduces it), --quiet, and one-line errors."""

from __future__ import annotations

import json
import re

import pytest
from conftest import cli_error, save_tiny_model, write_texts

from pvq.cli import build_parser, main
from pvq.options import QUANTIZE_OPTIONS, read_recipe_file, resolve_quantize_options

TEXT = "the quick brown fox jumps over the lazy dog. " * 200


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_model(root / "model")
    return write_texts(root, TEXT, eval_chars=4000)


def _resolve(argv):
    return resolve_quantize_options(build_parser().parse_args(["quantize", *argv]))


def test_help_shows_every_default_and_the_method_groups(capsys):
    assert main(["quantize", "--help"]) == 0
    raw = capsys.readouterr().out
    entries = {}  # flag -> its help entry (the lines up to the next option)
    for chunk in re.split(r"\n(?=  -)", raw):
        flag = chunk.split()[0].rstrip(",")
        entries[flag] = " ".join(chunk.split())
    for o in QUANTIZE_OPTIONS:
        if o.dest != "model":
            assert "default" in entries[o.flag], entries[o.flag]
    text = " ".join(raw.split())
    for group in ("pvq (--method pvq)", "rtn and gptq", "gptvq (--method gptvq)", "calibration"):
        assert group in text
    for command in ("eval", "sweep", "generate", "snr"):
        assert main([command, "--help"]) == 0
        assert "(default: " in capsys.readouterr().out


def test_a_flag_belongs_to_one_method():
    v = _resolve([])
    assert (v["method"], v["pvq_group_size"], v["group_size"], v["shape_bits"]) == ("pvq", 16, 128, 3.0)
    assert _resolve(["--method", "gptq", "--group-size", "64"])["group_size"] == 64
    for argv, message in (
        (["--method", "gptq", "--shape-bits", "3"], "--shape-bits is an option of --method pvq, but the method is gptq"),
        (["--group-size", "64"], "--group-size is an option of --method rtn or gptq, but the method is pvq"),
        (["--method", "rtn", "--calib-windows", "4"], "--calib-windows is an option of --method pvq or gptq or gptvq"),
        (["--method", "rtn", "--act-order"], "--act-order is an option of --method gptq"),
        (["--rotate-seed", "3"], "--rotate-seed has no effect without --rotate"),
        (["--no-eval", "--eval-windows", "3"], "--eval-windows has no effect with --no-eval"),
        (["--act-bits", "4"], "--act-bits has no effect without --act-method"),
        (["--act-method", "rtn", "--act-gain", "beta"], "--act-gain has no effect unless --act-method is pvq"),
        (["--fast", "--finetune-steps", "3"], "--finetune-steps has no effect with --fast"),
    ):
        with pytest.raises(Exception, match=re.escape(message)):
            _resolve(argv)


def test_recipe_file_then_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: gptq\nbits: 3\ngroup-size: 32\nact_order: true\n")
    v = _resolve(["--recipe", str(recipe), "--bits", "2"])
    assert (v["method"], v["bits"], v["group_size"], v["act_order"]) == ("gptq", 2, 32, True)
    # a flag that makes recipe fields moot wins over them (another method, --no-eval)
    recipe.write_text("method: gptq\nbits: 3\neval_windows: 5\n")
    v = _resolve(["--recipe", str(recipe), "--method", "pvq", "--no-eval"])
    assert (v["method"], v["bits"], v["no_eval"], v["eval_windows"]) == ("pvq", 4, True, 40)
    as_json = tmp_path / "r.json"
    as_json.write_text(json.dumps({"method": "pvq", "shape_bits": 2.5}))
    assert read_recipe_file(as_json) == {"method": "pvq", "shape_bits": 2.5}
    # a recipe written when fine-tuning was opt-in (finetune: true|false) reads as fast: false|true
    for old, fast in (("true", False), ("false", True)):
        recipe.write_text(f"method: gptq\nfinetune: {old}\n")
        assert read_recipe_file(recipe)["fast"] is fast and _resolve(["--recipe", str(recipe)])["fast"] is fast


@pytest.mark.parametrize("content,message", [
    ("method: [pvq\n", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping of field: value, got list"),
    ("shape_bits: 3\nbanana: 1\n", "unknown field 'banana'"),
    ("shape_bits: lots\n", "field 'shape_bits': expected a number, got 'lots'"),
    ("calib_windows: 0\n", "field 'calib_windows': must be at least 1, got 0"),
    ("method: awq\n", "field 'method' must be one of rtn, gptq, pvq, gptvq"),
    ("rotate: 1\n", "field 'rotate' must be true or false"),
    ("method: gptq\nshape_bits: 3\n", "field 'shape_bits' of --recipe .* is an option of --method pvq"),
])
def test_bad_recipes_are_one_line(env, tmp_path, capsys, content, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(content)
    out = tmp_path / "o"
    line = cli_error(capsys, ["quantize", str(env / "model"), "--recipe", str(recipe), "--out", str(out)])
    assert re.search(message, line), line
    assert not out.exists()


def test_bad_command_lines_are_one_line(env, tmp_path, capsys):
    model = str(env / "model")
    for argv, message in (
        (["quantize", model, "--shape-bits", "x"], "argument --shape-bits: expected a number, got 'x'"),
        (["quantize", model, "--calib-windows", "0"], "must be at least 1, got 0"),
        (["quantize", model, "--shape-bits", "nan"], "expected a finite number"),
        (["quantize", model, "--method", "awq"], "invalid choice: 'awq'"),
        (["quantize", model, "--recipe", str(tmp_path / "none.yaml")], "recipe file not found: .*none.yaml"),
        (["quantize", str(tmp_path / "no-such-model"), "--method", "rtn", "--group-size", "32", "--out",
          str(tmp_path / "o")], "no-such-model"),
        (["eval", model, "--limit", "-3"], "must be at least 1"),
        (["quantize", model, "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["quantize", model, "--method", "rtn", "--group-size", "32", "--out", str(env / "calib.txt" / "o")],
         "cannot be created: .*calib.txt is a file"),
    ):
        err = cli_error(capsys, argv)
        assert re.search(message, err), (argv, err)


def test_checkpoint_recipe_reproduces_it_byte_for_byte(env, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["quantize", str(env / "model"), "--method", "gptq", "--bits", "3", "--group-size", "32",
                 "--calib-text", str(env / "calib.txt"), "--calib-windows", "2", "--calib-seqlen", "32",
                 "--no-eval", "--out", str(first), "--quiet", "--fast"]) == 0
    captured = capsys.readouterr()
    assert "bits/weight" in captured.out and captured.err == ""  # --quiet: the report, nothing else
    index = json.loads((first / "pvq_index.json").read_text())
    assert "recipe.yaml" in index["files"]  # covered by the integrity index
    stored = read_recipe_file(first / "recipe.yaml")
    assert stored["method"] == "gptq" and stored["bits"] == 3 and stored["model"] == str(env / "model")
    assert "out" not in stored and "shape_bits" not in stored  # where to write, and other methods' options
    assert stored["fast"] is True  # the one-shot model asked for
    assert main(["quantize", "--recipe", str(first / "recipe.yaml"), "--out", str(second), "--quiet"]) == 0
    again = json.loads((second / "pvq_index.json").read_text())
    assert again["files"] == index["files"]
    line = cli_error(capsys, ["quantize", "--recipe", str(first / "recipe.yaml"), "--out", str(second)])
    assert "already holds a pvq checkpoint" in line


def test_an_unsupported_architecture_is_refused_before_any_work(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=64)).save_pretrained(
        tmp_path / "gpt2")
    line = cli_error(capsys, ["quantize", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o")])
    assert re.search(r"model_type 'gpt2'.*supported model types: gemma2, .*llama", line), line
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.work").exists()
