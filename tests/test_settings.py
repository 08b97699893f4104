"""One settings schema (`pvq.settings`): every route to a checkpoint takes the same defaults.

`pvq quantize`, `pvq quantize --recipe <empty file>`, `pvq.quantize` + `pvq.save` and
`oneshot(Recipe())` + `save_checkpoint` write byte-identical checkpoints, and no flag's
default can drift from the field it sets.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import pytest
from conftest import save_tiny_model, write_texts

import pvq
from pvq.cli import main
from pvq.calibrate.finetune import FinetuneConfig
from pvq.runtime.embedding import DEFAULT_EMBEDDINGS
from pvq.jobs import JobOptions
from pvq.oneshot import Recipe
from pvq.options import (
    _ACT_FIELDS,
    _CONFIG_FIELDS,
    _FINETUNE_FIELDS,
    OPTIONS_BY_DEST,
    QUANTIZE_OPTIONS,
    default_method_config,
    setting_options,
)
from pvq.methods import METHODS, get_method
from pvq.activations import ActQuantConfig
from pvq.settings import EvalSettings, RunSettings, default_of, setting_of
from pvq.sweep import SweepOptions, method_config, plan_points

TEXT = "the quick brown fox jumps over the lazy dog. " * 80
# 6 windows: the default fine-tuning holds out 4 and trains on the other 2
CALIB = ("--calib-windows", "6", "--calib-seqlen", "32")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("settings")
    save_tiny_model(root / "model")
    return write_texts(root, TEXT, 2000)


def _files(directory: Path) -> dict[str, bytes]:
    """pvq_index.json and every file it lists, as bytes."""
    index = json.loads((directory / "pvq_index.json").read_text())
    return {"pvq_index.json": (directory / "pvq_index.json").read_bytes(),
            **{name: (directory / name).read_bytes() for name in index["files"]}}


def test_cli_api_oneshot_and_an_empty_recipe_write_the_same_checkpoint(env, tmp_path):
    from pvq.checkpoint import save_checkpoint
    from pvq.checkpoint.index import RECIPE_FILE
    from pvq.models import load_model
    from pvq.oneshot import oneshot
    from pvq.options import recipe_text, values_from_recipe

    model_id, calib = str(env / "model"), str(env / "calib.txt")
    common = ["--calib-text", calib, *CALIB, "--device", "cpu", "--no-eval", "--quiet"]
    # 1. the CLI with its defaults
    assert main(["quantize", model_id, "--out", str(tmp_path / "cli"), *common]) == 0
    # 2. the CLI with a recipe file that holds no field
    (tmp_path / "empty.yaml").write_text("# nothing: every default\n")
    assert main(["quantize", model_id, "--recipe", str(tmp_path / "empty.yaml"), "--out", str(tmp_path / "recipe"),
                 *common]) == 0
    # 3. the Python API
    calibration = dict(calib_text=calib, calib_windows=6, calib_seqlen=32)
    model = pvq.quantize(model_id, device="cpu", progress=False, **calibration)
    pvq.save(model, tmp_path / "api")
    # 4. oneshot with a bare Recipe, saved by pvq.checkpoint.save_checkpoint with the recipe.yaml
    #    `pvq.save` derives (the `pvq quantize` settings that remake it)
    model, tokenizer, _ = load_model(model_id, device="cpu")
    recipe = Recipe(**calibration)
    oneshot(model, tokenizer, recipe, device="cpu", progress=False)
    save_checkpoint(model, tmp_path / "oneshot", tokenizer=tokenizer,
                    extra_files={RECIPE_FILE: recipe_text(values_from_recipe(recipe.to_dict(), model_id))})

    reference = _files(tmp_path / "cli")
    assert RECIPE_FILE in reference and any(n.endswith(".safetensors") for n in reference)
    # the defaults fine-tune (FinetuneConfig's defaults), and the recipe says so
    from pvq.options import read_recipe_file

    assert read_recipe_file(tmp_path / "cli" / RECIPE_FILE)["fast"] is False
    tuned = json.loads((tmp_path / "cli" / "job_report.json").read_text())["finetune"]
    assert tuned and tuned["steps"] >= 1
    for route in ("recipe", "api", "oneshot"):
        files = _files(tmp_path / route)
        assert sorted(files) == sorted(reference), route
        different = [name for name in reference if files[name] != reference[name]]
        assert not different, f"{route}: {different} differ from the CLI's"
    # the checkpoint records every config field (loading never falls back on a default)
    qc = json.loads((tmp_path / "cli" / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "pvq" and qc["config"] == asdict(get_method("pvq").make_config(None))
    assert qc["config"]["group_size"] == 16 and qc["config"]["gain"] == "empirical"


def _defaults() -> dict:
    return {o.dest: o.default for o in QUANTIZE_OPTIONS}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_option_default_is_its_config_field_default(method):
    cls = get_method(method).config_class
    bare = asdict(cls())
    assert _CONFIG_FIELDS[method], method
    for field, dest in _CONFIG_FIELDS[method].items():
        option = OPTIONS_BY_DEST[dest.lstrip("!")]
        expected = (not bare[field]) if dest.startswith("!") else bare[field]
        assert option.default == expected, (method, field, option.flag)
        assert option.methods is None or method in option.methods
    # `pvq quantize --method M` with no option is M's bare config, every field
    assert default_method_config(method) == {k: bare[k] for k in _CONFIG_FIELDS[method]}
    assert get_method(method).make_config(default_method_config(method)) == cls()


def test_every_other_option_default_is_its_field_default():
    defaults = _defaults()
    for field, dest in _ACT_FIELDS.items():
        if field != "method":  # --act-method none: no ActQuantConfig at all
            bare = getattr(ActQuantConfig(), field)
            assert defaults[dest.lstrip("!")] == ((not bare) if dest.startswith("!") else bare), dest
    for field, dest in _FINETUNE_FIELDS.items():
        assert defaults[dest] == getattr(FinetuneConfig(), field), dest
    assert (defaults["embed_bits"], defaults["embed_group_size"]) == (DEFAULT_EMBEDDINGS["bits"],
                                                                      DEFAULT_EMBEDDINGS["group_size"])
    # the job's own fields: each flag's default is the JobOptions field's (the structures
    # a flag switches on, and the device the CLI resolves, excepted)
    job = JobOptions()
    switched = {"act": ("act_method", "none", None), "finetune": ("fast", False, {}),
                "device": ("device", "auto", "cpu")}
    for f in fields(JobOptions):
        s = setting_of(f)
        if s is None or s.help is None:
            continue
        dest = s.option or f.name
        if f.name in switched:
            assert (defaults[dest], getattr(job, f.name)) == switched[f.name][1:], f.name
        else:
            assert defaults[dest] == ((not getattr(job, f.name)) if s.negate else getattr(job, f.name)), f.name
    # Recipe, JobOptions and SweepOptions share RunSettings' fields; the job and sweep EvalSettings'
    for cls in (Recipe, JobOptions, SweepOptions):
        assert {f.name for f in fields(RunSettings)} <= {f.name for f in fields(cls)}
    for cls in (JobOptions, SweepOptions):
        assert {f.name for f in fields(EvalSettings)} <= {f.name for f in fields(cls)}
    recipe, sweep = Recipe(), SweepOptions()
    for f in fields(RunSettings):
        assert getattr(recipe, f.name) == getattr(sweep, f.name) == getattr(job, f.name)


def test_recipe_defaults_are_the_cli_defaults():
    from pvq.options import values_from_recipe

    values = values_from_recipe(Recipe().to_dict(), "m")
    assert values is not None
    assert {k: v for k, v in values.items() if k != "model"} == {k: v for k, v in _defaults().items() if k != "model"}
    assert Recipe().method_config() == get_method("pvq").make_config(None)


def test_the_sweep_varies_bits_and_takes_every_other_setting_from_the_configs():
    opts = SweepOptions(methods=["rtn", "gptq", "pvq", "gptvq"], bits=[3], float_point=False)
    assert opts.group_size == default_of(get_method("rtn").config_class, "group_size") == 128
    assert opts.pvq_group_size == default_of(get_method("pvq").config_class, "group_size")
    for point in plan_points(opts):
        bare = asdict(get_method(point.method).make_config(None))
        changed = {k for k, v in point.config.items() if bare[k] != v}
        # the bit width itself (and gptvq's codebook rows, sized from it)
        assert changed <= {"bits", "shape_bits", "group_size"}, (point.name, changed)
    pvq_point = method_config("pvq", 3.0, opts)
    assert pvq_point == asdict(get_method("pvq").make_config(None))  # 3 bits: the CLI's own PVQ


def test_sweep_flags_are_the_sweep_options_fields():
    from pvq.cli import build_parser

    args = build_parser().parse_args(["sweep"])
    for o in setting_options(SweepOptions):
        assert getattr(args, o.dest) == o.default, o.dest
    assert args.group_size == 128 and args.calib_windows == RunSettings().calib_windows


def test_a_method_field_flagged_as_a_job_setting_follows_the_recipe():
    """GPTVQ's k-means seed is the job's --seed on the command line; so it is in a Recipe."""
    from pvq.oneshot import Recipe

    assert Recipe(method="gptvq", seed=5).method_config().seed == 5
    assert Recipe(method="gptvq", seed=5, config={"seed": 7}).method_config().seed == 7  # given: kept
    assert Recipe(method="gptvq").method_config().seed == 0
    assert not hasattr(Recipe(method="pvq", seed=5).method_config(), "seed")
