"""Hostile recipes and numeric options (issue 31): a recipe is data, not authority.

A recipe cannot say where to write, what to replace or which safety check to skip; YAML
anchors and aliases, oversized files and deep nesting are refused before anything is
built; every number goes through its flag's own check (seeds included); messages quote a
short excerpt of a bad value; a kept sweep point that holds another point's row is
refused. Every case: one line, exit code 2, nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from conftest import adversarial_env, cli_error  # noqa: E402
from pvq.errors import PVQError  # noqa: E402
from pvq.models import tiny_llama  # noqa: E402
from pvq.oneshot import Recipe, oneshot  # noqa: E402

HUGE_SEED = str(2**70)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return adversarial_env(tmp_path_factory.mktemp("adv-recipes"))


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """Run in an empty folder, so that a default output (pvq-out, sweep-out) would show."""
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    return here


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes (to show that nothing changed)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def recipe_args(env: Path, recipe: Path, *extra: str) -> list[str]:
    return ["quantize", str(env / "model"), "--recipe", str(recipe), *extra]


def write_recipe(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = "method: rtn\ngroup_size: 32\nno_eval: true\n"


def test_a_recipe_cannot_replace_a_checkpoint(env, tmp_path, cwd, capsys):
    """The found case: `out: <existing checkpoint>` and `overwrite: true` in a recipe
    replaced that checkpoint although the user typed neither flag."""
    ck = tmp_path / "ck"
    shutil.copytree(env / "ck", ck)
    before = tree(ck)
    recipe = write_recipe(tmp_path, f"{BASE}out: {ck}\noverwrite: true\n")
    line = cli_error(capsys, recipe_args(env, recipe))
    assert "field 'out' is not taken from a recipe" in line and "pass --out on the command line instead" in line
    assert tree(ck) == before and not Path(f"{ck}.work").exists()
    assert list(cwd.iterdir()) == []
    # with --out typed, `overwrite: true` from the recipe is refused just the same
    line = cli_error(capsys, recipe_args(env, write_recipe(tmp_path, f"{BASE}overwrite: true\n"), "--out", str(ck)))
    assert "field 'overwrite' is not taken from a recipe" in line and "pass --overwrite on the command line" in line
    assert tree(ck) == before and not Path(f"{ck}.work").exists()


@pytest.mark.parametrize("field,value", [("out", "elsewhere"), ("work_dir", "state"), ("work-dir", "state"),
                                         ("overwrite", "false"), ("ignore_memory_check", "true")])
def test_fields_that_say_where_to_write_are_command_line_only(env, tmp_path, cwd, capsys, field, value):
    out = tmp_path / "o"
    recipe = write_recipe(tmp_path, f"{BASE}{field}: {value}\n")
    line = cli_error(capsys, recipe_args(env, recipe, "--out", str(out)))
    flag = "--" + field.replace("_", "-")
    assert f"--recipe {recipe}: field '{field.replace('-', '_')}' is not taken from a recipe" in line, line
    assert f"pass {flag} on the command line instead" in line
    assert not out.exists() and not Path(f"{out}.work").exists() and list(cwd.iterdir()) == []
    as_json = tmp_path / "r.json"
    as_json.write_text(json.dumps({"method": "rtn", field: value}))
    assert "is not taken from a recipe" in cli_error(capsys, recipe_args(env, as_json, "--out", str(out)))
    assert not out.exists()


BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
seed: *i
"""


@pytest.mark.parametrize("text,where", [
    (BILLION_LAUGHS, "line 1"),
    (f"{BASE}calib_windows: &n 4\nbatch_size: *n\n", "line 4"),  # one anchor, one alias
    (f"{BASE}seed: &s 3\n", "line 4"),  # an anchor alone
])
def test_yaml_anchors_and_aliases_are_refused_before_anything_is_built(env, tmp_path, cwd, capsys, text, where):
    out = tmp_path / "o"
    recipe = write_recipe(tmp_path, text)
    assert len(BILLION_LAUGHS) < 600  # a few hundred bytes that would expand to 9**9 strings
    line = cli_error(capsys, recipe_args(env, recipe, "--out", str(out)))
    assert line.endswith(f"--recipe {recipe}: YAML anchors and aliases are not allowed in a recipe ({where}); "
                         "write each value out"), line
    assert "lol" not in line and len(line) < 300
    assert not out.exists() and list(cwd.iterdir()) == []


def test_recipe_size_and_nesting_are_bounded(env, tmp_path, cwd, capsys):
    out = tmp_path / "o"
    cases = [
        (write_recipe(tmp_path, BASE + "#" * (1 << 20) + "\n", "big.yaml"), "bytes, more than a recipe may hold "
                                                                            "(1048576 bytes)"),
        (write_recipe(tmp_path, "seed: " + "[" * 50 + "]" * 50 + "\n", "deep.yaml"), "nested deeper than 8 levels"),
        (write_recipe(tmp_path, '{"seed": ' + "[" * 100000 + "]" * 100000 + "}", "deep.json"),
         "nested deeper than 8 levels"),
        (write_recipe(tmp_path, '{"seed": ' + "[" * 20 + "]" * 20 + "}", "deep2.json"), "nested deeper than 8 levels"),
    ]
    for recipe, message in cases:
        line = cli_error(capsys, recipe_args(env, recipe, "--out", str(out)))
        assert f"--recipe {recipe}: " in line and message in line, line
        assert len(line) < 300
    assert not out.exists() and list(cwd.iterdir()) == []


@pytest.mark.parametrize("argv,message", [
    (["--seed", HUGE_SEED], f"argument --seed: must be in 0..2**32-1, got {HUGE_SEED}"),
    (["--rotate", "--rotate-seed", HUGE_SEED], f"argument --rotate-seed: must be in 0..2**32-1, got {HUGE_SEED}"),
    (["--seed", "-1"], "argument --seed: must be in 0..2**32-1, got -1"),
    (["--recipe", "seed: 1180591620717411303424\n"], "field 'seed': must be in 0..2**32-1, got 1180591620717411303424"),
    (["--recipe", "rotate: true\nrotate_seed: 4294967296\n"], "field 'rotate_seed': must be in 0..2**32-1, got "
                                                            "4294967296"),
    (["--recipe", "seed: 1.5e+30\n"], "field 'seed': expected an integer, got '1.5e+30'"),
    (["--recipe", "shape_bits: .inf\n"], "field 'shape_bits': expected a finite number, got 'inf'"),
    (["--recipe", "calib_windows: -3\n"], "field 'calib_windows': must be at least 1, got -3"),
])
def test_numbers_are_checked_by_the_flags_rules_in_flags_and_recipes(env, tmp_path, cwd, capsys, argv, message):
    out = tmp_path / "o"
    if argv[0] == "--recipe":
        argv = ["--recipe", str(write_recipe(tmp_path, argv[1]))]
    line = cli_error(capsys, ["quantize", str(env / "model"), "--method", "gptq", "--out", str(out), *argv])
    assert message in line, line
    assert not out.exists() and not Path(f"{out}.work").exists() and list(cwd.iterdir()) == []


def test_seeds_are_bounded_everywhere_they_are_taken(env, tmp_path, cwd, capsys):
    from pvq.cli import build_parser
    from pvq.options import MAX_SEED, resolve_quantize_options

    # the largest seed is taken, from a flag and from a recipe
    recipe = write_recipe(tmp_path, f"seed: {MAX_SEED}\n")
    v = resolve_quantize_options(build_parser().parse_args(["quantize", "--recipe", str(recipe)]))
    assert v["seed"] == MAX_SEED == 2**32 - 1
    out = tmp_path / "s"
    for argv in (["sweep", str(env / "model"), "--methods", "rtn", "--out", str(out), "--seed", HUGE_SEED],
                 ["sweep", str(env / "model"), "--methods", "rtn", "--out", str(out), "--rotate", "--rotate-seed",
                  HUGE_SEED],
                 ["snr", "--seed", HUGE_SEED]):
        assert "must be in 0..2**32-1" in cli_error(capsys, argv)
    assert not out.exists() and list(cwd.iterdir()) == []
    # the API: one PVQError naming the field, before any work
    model = tiny_llama(seed=0)
    for kw in ({"seed": 2**70}, {"rotate": True, "rotate_seed": 2**70}, {"seed": -1}):
        with pytest.raises(PVQError, match=r"must be an integer in 0\.\.2\*\*32-1"):
            oneshot(model, None, Recipe(method="rtn", config={"bits": 4, "group_size": 32}, finetune=None, **kw),
                    progress=False)
    with pytest.raises(PVQError, match=r"seed must be an integer in 0\.\.2\*\*32-1"):
        oneshot(model, None, Recipe(method="gptvq", config={"seed": 2**70}, finetune=None), progress=False)


@pytest.mark.parametrize("text", [
    "method: " + "y" * 5000 + "\n",
    "method: [" + ", ".join(["lol"] * 5000) + "]\n",
    "no_eval: " + "n" * 5000 + "\n",
    "x" * 5000 + ": 1\n",
    "seed: " + "9" * 4000 + "\n",
    "seed: " + "9" * 5000 + "\n",  # more digits than Python converts
    "method: [pvq\n" + "z" * 5000 + "\n",  # not valid YAML, with a long line
])
def test_messages_quote_a_short_excerpt_of_the_value(env, tmp_path, cwd, capsys, text):
    out = tmp_path / "o"
    recipe = write_recipe(tmp_path, text)
    line = cli_error(capsys, recipe_args(env, recipe, "--out", str(out)))
    assert f"--recipe {recipe}: " in line and len(line) < len(str(recipe)) + 400, line
    assert not out.exists() and list(cwd.iterdir()) == []
    # the same value given as a flag
    line = cli_error(capsys, ["quantize", str(env / "model"), "--seed", "9" * 5000, "--out", str(out)])
    assert "expected an integer" in line and len(line) < 400, line
    assert not out.exists()


def test_a_kept_sweep_point_holding_another_points_row_is_refused(env, tmp_path, capsys):
    """A kept point file whose row names another point (here: rtn-4b.json holding the
    row of rtn-3b, settings and all as a sweep writes them) was put in the table in place
    of the point it is filed as."""
    from pvq.cli import main
    from pvq.sweep import SweepOptions, plan_points, point_settings

    out = tmp_path / "sweep"
    argv = ["sweep", str(env / "model"), "--methods", "rtn", "--bits", "4", "--group-size", "32", "--no-float",
            "--out", str(out), "--eval-text", str(env / "wiki.test.raw"), "--eval-seqlen", "32", "--eval-windows", "2",
            "--device", "cpu", "--fast"]
    opts = SweepOptions(model=str(env / "model"), methods=["rtn"], bits=[4.0], out=str(out), group_size=32,
                        eval_text=str(env / "wiki.test.raw"), eval_seqlen=32, eval_windows=2, float_point=False,
                        finetune=None)
    (point,) = plan_points(opts)
    settings = point_settings(point, opts, [])
    points = out / "points"
    points.mkdir(parents=True)
    kept = points / "rtn-4b.json"
    row = {"point": "rtn-3b", "method": "rtn", "bits": 3.0, "bpw_nominal": 3.6, "bpw_measured": 3.6, "ppl": 1.5,
           "eval_windows": 2, "eval_seqlen": 32}
    for bad in (row, {**row, "point": "rtn-4b", "method": "gptq"}):
        kept.write_text(json.dumps({"settings": settings, "row": bad}))
        before = tree(out)
        line = cli_error(capsys, argv)
        assert f"kept point {kept} holds the row of another point" in line, line
        assert "delete it to recompute the point" in line
        assert tree(out) == before  # no results.csv, no plot, the file as it was
    # the same file holding its own row is kept (the settings are the sweep's own)
    kept.write_text(json.dumps({"settings": settings, "row": {**row, "point": "rtn-4b", "bits": 4.0}}))
    assert main(argv) == 0
    assert "| rtn-4b | rtn | 3 |" not in (out / "results.md").read_text()
    assert "| rtn-4b | rtn | 4 |" in (out / "results.md").read_text()
