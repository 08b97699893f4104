"""The settings schema: every setting that decides a quantized model is one dataclass field,
declared once with its default, its range (the argparse type its flag and a recipe file
check it with) and its help.

* Each method's config class (`pvq.methods`: PVQConfig, RTNConfig, GPTQConfig, GPTVQConfig),
  `ActQuantConfig` and `FinetuneConfig` declare their own fields.
* `RunSettings`: calibration, seed, rotation and the fine-tuning switch, shared by a recipe,
  the main job and a sweep; `EvalSettings`: the evaluation after quantizing (job, sweep).
* `pvq.oneshot.Recipe` (RunSettings + method, config, activations, bit allocation,
  embeddings), `pvq.jobs.JobOptions` (Recipe + EvalSettings + where to write and run) and
  `pvq.sweep.SweepOptions` (RunSettings + EvalSettings + the grid) inherit these fields
  instead of copying them.
* `pvq.options` turns the fields into `pvq quantize`'s flags, recipe-file fields and the
  stored recipe.yaml, and into `pvq sweep`'s flags; so `pvq quantize`, `pvq.quantize`,
  `oneshot(model, tok, Recipe())` and an empty recipe file make the same checkpoint.

A field becomes a flag when its `setting(...)` has a help text. `option` names the flag when
it differs from the field (PVQConfig.group_size is --pvq-group-size); `negate` marks a field
set by the negation of a switch (use_hessian <- --no-hessian); a field with an `option` and
no help takes its value from a flag declared elsewhere (GPTVQConfig.seed <- --seed);
`option_default` is the flag's default where the field holds a structure the flag only
switches on (Recipe.act None <- --act-method none).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING, dataclass
from typing import Any, Callable

__all__ = ["COMPUTE_DTYPE_NAMES", "DEFAULT_MODEL", "EvalSettings", "FIELD_DEFAULT", "HESSIAN_METHODS", "MAX_SEED",
           "NONNEGATIVE", "NONNEGATIVE_NUMBER", "POSITIVE", "RunSettings", "SEED", "SEQLEN", "Setting", "count",
           "default_of", "excerpt", "integer", "like", "number", "numbers", "percdamp_field", "setting", "setting_of",
           "shorten", "words"]


def shorten(text: str, limit: int = 200) -> str:
    """`text` on one line, cut to about `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else f"{text[:limit - 3]}... ({len(text)} characters)"


def excerpt(value: Any, limit: int = 80) -> str:
    """repr(value), cut to about `limit` characters: what an error message quotes of a value."""
    return shorten(repr(value), limit)


def integer(text: str) -> int:
    """An argparse type: an integer."""
    try:
        return int(str(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {excerpt(text)}") from None


def count(minimum: int, maximum: int | None = None, shown: str | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum (and <= maximum, written `shown` in messages)."""
    def parse(text: str) -> int:
        value = integer(text)
        if maximum is None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {excerpt(value)}")
        if maximum is not None and not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be in {minimum}..{shown or maximum}, got {excerpt(value)}")
        return value
    parse.__name__ = f"integer >= {minimum}" if maximum is None else f"integer in {minimum}..{shown or maximum}"
    return parse


def number(minimum: float | None = None, above: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite number (>= minimum, > above)."""
    def parse(text: str) -> float:
        try:
            value = float(str(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {excerpt(text)}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {excerpt(text)}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value:g}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be greater than {above}, got {value:g}")
        return value
    parse.__name__ = "number"
    return parse


def words(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated words (empty ones dropped)."""
    return tuple(w.strip() for w in str(text).split(",") if w.strip())


def numbers(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated numbers."""
    try:
        return tuple(float(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {excerpt(text)}") from None


POSITIVE, NONNEGATIVE, SEQLEN = count(1), count(0), count(2)
#: the largest seed: torch.Generator.manual_seed takes 64 bits and the job derives seed + 1;
#: 32 bits keep a seed exact in every JSON reader and numpy's legacy seeding
MAX_SEED = 2**32 - 1
#: an argparse type: a seed, 0..2**32-1 (--seed, --rotate-seed; the same check for recipes)
SEED = count(0, MAX_SEED, "2**32-1")
#: an argparse type: a finite number >= 0
NONNEGATIVE_NUMBER = number(minimum=0)
#: the methods that collect calibration Hessians (their flags: the "calibration" group)
HESSIAN_METHODS = ("pvq", "gptq", "gptvq")
#: the model `pvq quantize` and `pvq sweep` take when none is named
DEFAULT_MODEL = "smollm2-135m"
#: dtypes of the calibration forwards
COMPUTE_DTYPE_NAMES = ("float32", "bfloat16", "float16")


class _FieldDefault:
    """The default of `Setting.option_default`: the flag's default is the field's."""

    def __repr__(self) -> str:
        return "FIELD_DEFAULT"


FIELD_DEFAULT = _FieldDefault()


@dataclass(frozen=True)
class Setting:
    """How one dataclass field is offered as a flag and a recipe field (see the module docstring)."""

    help: str | None = None  # None: no flag of its own
    type: Callable[[str], Any] | None = None  # None with a bool default: an on/off switch
    option: str | None = None  # the flag's dest when it is not the field's name
    negate: bool = False  # the field is the negation of the switch
    choices: tuple | None = None
    group: str | None = None  # the help group (default: the owner's)
    methods: tuple[str, ...] | None = None  # only these methods take the flag (default: the owner's)
    # (dest, value it must have, "!none" for anything but "none", "!default" for anything but its default)
    requires: tuple[str, Any] | None = None
    stored: bool = True  # part of the checkpoint's recipe.yaml
    in_recipe: bool = True  # a recipe file may hold it (False: where to write, what to replace, checks to skip)
    # the flag's default where it differs from the field's (a structure the flag switches on)
    option_default: Any = FIELD_DEFAULT


_KEY = "pvq_setting"


def setting(default: Any = MISSING, help: str | None = None, type: Callable[[str], Any] | None = None, *,
            default_factory: Any = MISSING, **how: Any) -> Any:
    """A dataclass field with its default and, with `help`, its flag (`Setting`'s fields as keywords)."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={_KEY: Setting(help=help, type=type, **how)})


def setting_of(f: dataclasses.Field) -> Setting | None:
    """The `Setting` of a dataclass field (None: a plain field)."""
    return f.metadata.get(_KEY)


def _field(cls: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


def field_default(f: dataclasses.Field) -> Any:
    """The default value of dataclass field `f` (its factory called where it has one)."""
    return f.default_factory() if f.default is MISSING else f.default


def default_of(cls: type, name: str) -> Any:
    """The default of field `name` of dataclass `cls`."""
    return field_default(_field(cls, name))


def like(cls: type, name: str) -> Any:
    """A new field with the default and setting of `cls`'s field `name` (GPTQ's bits and group
    size are RTN's: one declaration, one flag)."""
    f = _field(cls, name)
    return dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)


_PERCDAMP = Setting(help="Hessian damping, fraction of its mean diagonal", type=NONNEGATIVE_NUMBER, group="hessian")


def percdamp_field() -> Any:
    """The Hessian damping field of every Hessian method (one flag, --percdamp)."""
    return dataclasses.field(default=0.01, metadata={_KEY: _PERCDAMP})


@dataclass(kw_only=True)
class RunSettings:
    """Calibration, seed, rotation and fine-tuning: what a recipe, the main job and a sweep
    share (calib_text None: text sampled from the float model, seeded; finetune: fields of
    `pvq.calibrate.finetune.FinetuneConfig`, by default {} (its defaults), None: no fine-tuning,
    which `--fast` asks for)."""

    calib_text: str | None = setting(None, "calibration text file, or 'sampled': text sampled from the model itself, "
                                     "seeded (default: WikiText-2 where reachable: the datasets cache's train split, "
                                     "../shared's validation text, the hub; else sampled)", methods=HESSIAN_METHODS,
                                     group="hessian")
    calib_windows: int = setting(32, "calibration windows (paper: 128)", POSITIVE, methods=HESSIAN_METHODS,
                                 group="hessian")
    calib_seqlen: int = setting(512, "tokens per calibration window (paper: 2048)", SEQLEN, methods=HESSIAN_METHODS,
                                group="hessian")
    compute_dtype: str = setting("float32", "dtype of the calibration forwards (Hessians accumulate in float32+)",
                                 choices=COMPUTE_DTYPE_NAMES, methods=HESSIAN_METHODS, group="hessian")
    batch_size: int = setting(8, "calibration windows per forward", POSITIVE, methods=HESSIAN_METHODS,
                              group="hessian")
    seed: int = setting(0, "seed of the sampled calibration text and of gptvq's k-means", SEED)
    rotate: bool = setting(False, "rotate the float model first (fused randomized Hadamard, online Hadamard before "
                           "down_proj); recorded in the checkpoint and rebuilt on load", group="rotation")
    rotate_seed: int = setting(0, "seed of the rotation's random signs", SEED, requires=("rotate", True),
                               group="rotation")
    finetune: dict[str, Any] | None = setting(
        default_factory=dict, help="one-shot: skip the fine-tuning that by default follows the quantization (the "
        "gains, scales, codebooks and norms, and with --finetune-code-fraction the codes, trained towards the float "
        "model's next-token distributions on the calibration windows; sizes stay as they are)",
        option="fast", option_default=False, group="quality")


@dataclass(kw_only=True)
class EvalSettings:
    """The evaluation after quantizing (the main job and a sweep); eval_windows None or 0: all.
    It runs after the checkpoint is written and decides nothing in it: not part of the stored
    recipe.yaml (a checkpoint's bytes do not depend on whether or how it was evaluated)."""

    eval_text: str | None = setting(None, "WikiText-2 raw test file (default: $PVQ_WIKITEXT2_TEST, else the datasets "
                                    "cache or hub, else ../shared/assets/...)", requires=("no_eval", False),
                                    group="eval", stored=False)
    eval_seqlen: int = setting(512, "tokens per evaluation window", SEQLEN, requires=("no_eval", False), group="eval",
                               stored=False)
    eval_windows: int | None = setting(40, "perplexity windows (0: all)", NONNEGATIVE, requires=("no_eval", False),
                                       group="eval", stored=False)
