"""The main job's settings, described once: `pvq quantize`'s flags, the recipe file
(`--recipe recipe.yaml`, YAML or JSON) and the `recipe.yaml` stored in every checkpoint
are all read through the table `QUANTIZE_OPTIONS`.

A recipe holds the same fields as the flags (the flag without its dashes, `-` or `_`:
``shape_bits: 3.25``); its values override the defaults, and flags given on the
command line override the recipe. A method's options belong to that method alone
(`--shape-bits` is PVQ's; `--group-size` is the scalar group size of rtn and gptq; PVQ's
dimension is `--pvq-group-size`): giving one for another method is an error, as is an
option whose switch is off (`--rotate-seed` without `--rotate`). The stored recipe holds
every field that decides the checkpoint, defaults included, and none that only says
where to write (`--out`, `--work-dir`, `--overwrite`, `--device`, `--max-shard-size`), so
``pvq quantize --recipe CKPT/recipe.yaml --out NEW`` quantizes the same model again.

A recipe is data, not authority: the fields that choose where pvq writes, what it replaces
or which safety check it skips (`out`, `work_dir`, `overwrite`, `ignore_memory_check`)
are refused in a recipe (they are command-line flags only). A recipe file is at most 1 MiB,
YAML anchors and aliases are refused (no "billion laughs"), nesting is bounded, and every
value goes through its flag's own check; messages quote a short excerpt of a bad value.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pvq.errors import PVQError
from pvq.fileio import nesting_depth, read_utf8

__all__ = ["Option", "OptionConflictError", "QUANTIZE_OPTIONS", "RecipeFileError", "add_quantize_options",
           "read_recipe_file", "recipe_text", "resolve_quantize_options"]


class RecipeFileError(PVQError, ValueError):
    """A recipe file that cannot be read, or a field or value it cannot hold."""


class OptionConflictError(PVQError, ValueError):
    """An option given for another method, or with its switch off."""


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


POSITIVE, NONNEGATIVE, SEQLEN = count(1), count(0), count(2)
#: the largest seed: torch.Generator.manual_seed takes 64 bits and the job derives seed + 1;
#: 32 bits keep a seed exact in every JSON reader and numpy's legacy seeding
MAX_SEED = 2**32 - 1
#: an argparse type: a seed, 0..2**32-1 (--seed, --rotate-seed; the same check for recipes)
SEED = count(0, MAX_SEED, "2**32-1")


@dataclass(frozen=True)
class Option:
    """One setting of the main job: a flag, a recipe field, a JobOptions input."""

    dest: str
    default: Any
    help: str
    type: Callable[[str], Any] | None = None  # None with a bool default: an on/off switch
    choices: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None  # None: every method
    # (dest, value it must have, "!none" for anything but "none", "!default" for anything but its default)
    requires: tuple[str, Any] | None = None
    group: str = "job"
    stored: bool = True  # part of the checkpoint's recipe.yaml
    # a recipe may hold it; False: a command-line flag only (where to write, what to
    # replace, which safety check to skip: a recipe is data, not authority)
    in_recipe: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")

    @property
    def switch(self) -> bool:
        return isinstance(self.default, bool) and self.type is None


_PVQ, _SCALAR, _HESSIAN = ("pvq",), ("rtn", "gptq"), ("pvq", "gptq", "gptvq")

QUANTIZE_OPTIONS: tuple[Option, ...] = (
    Option("model", "smollm2-135m", "hub id, local directory, .gguf file, or the demo alias smollm2-135m"),
    Option("method", "pvq", "quantization method", choices=("pvq", "gptq", "gptvq", "rtn")),
    Option("out", "pvq-out", "checkpoint directory to write", stored=False, in_recipe=False),
    Option("overwrite", False, "replace an existing checkpoint at --out", stored=False, in_recipe=False),
    Option("max_shard_size", None, "largest safetensors shard, e.g. 2GB or 500MB (default: transformers' 50GB)",
           stored=False),
    Option("work_dir", None, "resumable state (default: <out>.work); a rerun continues there", stored=False,
           in_recipe=False),
    Option("device", "auto", "compute device for one block at a time (auto: cuda if present)", stored=False),
    Option("stream", False, "read the model block by block from its safetensors shards: the float model is never "
           "held whole (a local directory; needs --calib-text)", stored=False),
    Option("dry_run", False, "print the predicted peak memory and disk use, then stop", stored=False),
    Option("ignore_memory_check", False, "run even when the predicted peak memory exceeds what is available",
           stored=False, in_recipe=False),
    # pvq
    Option("pvq_group_size", 16, "PVQ dimension D: weights per group along the input", POSITIVE, methods=_PVQ,
           group="pvq"),
    Option("shape_bits", 3.0, "PVQ shape bits per weight, fractional allowed", number(above=0), methods=_PVQ,
           group="pvq"),
    Option("gain", "empirical", "PVQ gain storage: float16, Beta-quantile indices, or per-layer fitted levels",
           choices=("fp16", "beta", "empirical"), methods=_PVQ, group="pvq"),
    Option("gain_bits", 4, "bits per PVQ gain index (beta, empirical)", POSITIVE, methods=_PVQ, group="pvq"),
    Option("gain_escapes", 0, "PVQ beta/empirical gains: per row, this many groups beyond the top gain level keep "
           "an exact float16 gain", NONNEGATIVE, methods=_PVQ, group="pvq"),
    Option("enumeration", "auto", "PVQ code order: split (fast kernels; codes up to 53 bits), fischer, or auto "
           "(split where it fits)", choices=("auto", "split", "fischer"), methods=_PVQ, group="pvq"),
    Option("no_hessian", False, "plain PVQ: no Hessian error feedback", methods=_PVQ, group="pvq"),
    Option("no_refine", False, "skip the Hessian-weighted shape refinement", methods=_PVQ, group="pvq"),
    # rtn / gptq
    Option("bits", 4, "integer bits per weight", count(2), methods=_SCALAR, group="scalar"),
    Option("group_size", 128, "input columns per float16 scale and zero point (-1: one per output row)", integer,
           methods=_SCALAR, group="scalar"),
    Option("act_order", False, "gptq: process columns by descending Hessian diagonal", methods=("gptq",),
           group="scalar"),
    # gptvq
    Option("vq_dim", 2, "vector dimension d (consecutive input columns per vector)", integer, choices=(1, 2, 4),
           methods=("gptvq",), group="gptvq"),
    Option("vq_bits", 3.0, "index bits per weight (2^(bits*d) centroids per codebook; bits*d an integer)",
           number(above=0), methods=("gptvq",), group="gptvq"),
    Option("vq_group_size", 4096, "weights sharing one codebook (a multiple of --vq-columns); codebooks cost "
           "(8*K*d + 16) / group size bits per weight", POSITIVE, methods=("gptvq",), group="gptvq"),
    Option("vq_columns", 256, "columns per codebook block", POSITIVE, methods=("gptvq",), group="gptvq"),
    Option("no_codebook_update", False, "skip the least-squares codebook update after assignment",
           methods=("gptvq",), group="gptvq"),
    Option("kmeans_iters", 10, "EM iterations of the codebook initialisation", NONNEGATIVE, methods=("gptvq",),
           group="gptvq"),
    Option("vq_init", "kpp", "k-means initialisation (kpp: seeded k-means++; mahalanobis: the paper's)",
           choices=("kpp", "mahalanobis"), methods=("gptvq",), group="gptvq"),
    Option("vq_assignment", "diag", "Hessian-weighted lookup: diagonal (paper) or the full d x d block metric",
           choices=("diag", "block"), methods=("gptvq",), group="gptvq"),
    # every Hessian method
    Option("percdamp", 0.01, "Hessian damping, fraction of its mean diagonal", number(minimum=0), methods=_HESSIAN,
           group="hessian"),
    Option("calib_text", None, "calibration text file (default: text sampled from the model itself, seeded)",
           methods=_HESSIAN, group="hessian"),
    Option("calib_windows", 32, "calibration windows (paper: 128)", POSITIVE, methods=_HESSIAN, group="hessian"),
    Option("calib_seqlen", 512, "tokens per calibration window (paper: 2048)", SEQLEN, methods=_HESSIAN,
           group="hessian"),
    Option("compute_dtype", "float32", "dtype of the calibration forwards (Hessians accumulate in float32+)",
           choices=("float32", "bfloat16", "float16"), methods=_HESSIAN, group="hessian"),
    Option("batch_size", 8, "calibration windows per forward", POSITIVE, methods=_HESSIAN, group="hessian"),
    Option("offload_activations", False, "keep the calibration activations in the work directory, one file per "
           "batch, instead of in memory", methods=_HESSIAN, group="hessian", stored=False),
    Option("seed", 0, "seed of the sampled calibration text and of gptvq's k-means", SEED),
    # quality: bit allocation and fine-tuning
    Option("target_bpw", None, "bits per weight over the quantized linears, allocated per layer: each layer's "
           "setting (PVQ shape bits, scalar bits, VQ index bits) chosen from its measured distortion (default: "
           "the same setting for every layer)", number(above=0), group="quality"),
    Option("finetune", False, "after quantizing, fine-tune the continuous parameters (gains, scales, codebooks, "
           "norms) towards the float model's next-token distributions on the calibration windows; codes and "
           "sizes stay as they are", group="quality"),
    Option("finetune_steps", 60, "fine-tuning optimizer steps at most (early stopping on held-out windows)",
           POSITIVE, requires=("finetune", True), group="quality"),
    Option("finetune_lr", 2e-3, "Adam learning rate, relative to each trained tensor's RMS", number(above=0),
           requires=("finetune", True), group="quality"),
    Option("finetune_batch", 2, "calibration windows per fine-tuning step", POSITIVE, requires=("finetune", True),
           group="quality"),
    Option("finetune_val_windows", 4, "calibration windows held out for early stopping (the last ones)", POSITIVE,
           requires=("finetune", True), group="quality"),
    Option("embed_bits", 8, "store the token embedding (and the head: a tied one from the same table) "
           "round-to-nearest at this many bits, 4..8, with a float16 scale and zero point per --embed-group-size "
           "columns (0: keep them as dense float16 tensors)", NONNEGATIVE, group="quality"),
    Option("embed_group_size", 64, "columns per scale of the quantized embedding", POSITIVE,
           requires=("embed_bits", "!default"), group="quality"),
    # rotation
    Option("rotate", False, "rotate the float model first (fused randomized Hadamard, online Hadamard before "
           "down_proj); recorded in the checkpoint and rebuilt on load", group="rotation"),
    Option("rotate_seed", 0, "seed of the rotation's random signs", SEED, requires=("rotate", True),
           group="rotation"),
    # activation quantization (simulated)
    Option("act_method", "none", "quantize the inputs of every quantized linear layer: round-to-nearest or PVQ",
           choices=("none", "rtn", "pvq"), group="act"),
    Option("act_bits", 4.0, "rtn: integer bits per value (2..8); pvq: shape bits per value, fractional allowed",
           number(above=0), requires=("act_method", "!none"), group="act"),
    Option("act_group_size", 64, "values per group D along each token's input (a divisor of every layer's input "
           "width; -1: one group per token)", integer, requires=("act_method", "!none"), group="act"),
    Option("act_gain", "fp16", "pvq gains: one float16 per group, or Beta-quantile indices with a float16 norm "
           "per token", choices=("fp16", "beta"), requires=("act_method", "pvq"), group="act"),
    Option("act_gain_bits", 8, "bits per pvq 'beta' gain index", POSITIVE, requires=("act_method", "pvq"),
           group="act"),
    Option("act_search", "paper", "pvq shape search (paper: projection and rounding, the fastest)",
           choices=("paper", "greedy", "refined"), requires=("act_method", "pvq"), group="act"),
    Option("act_asymmetric", False, "rtn: min-max grid with a zero point (default symmetric)",
           requires=("act_method", "rtn"), group="act"),
    Option("act_clip", 1.0, "rtn: clip ratio of the range the grid spans", number(above=0),
           requires=("act_method", "rtn"), group="act"),
    Option("act_encode", False, "pvq: go through the real encoder and decoder in the forward pass (same result, "
           "slower)", requires=("act_method", "pvq"), group="act"),
    # evaluation
    Option("no_eval", False, "skip perplexity and agreement with the float model", group="eval"),
    Option("eval_text", None, "WikiText-2 raw test file (default: $PVQ_WIKITEXT2_TEST, else the datasets cache or "
           "hub, else ../shared/assets/...)", requires=("no_eval", False), group="eval"),
    Option("eval_seqlen", 512, "tokens per evaluation window", SEQLEN, requires=("no_eval", False), group="eval"),
    Option("eval_windows", 40, "perplexity windows (0: all)", NONNEGATIVE, requires=("no_eval", False),
           group="eval"),
)

OPTIONS_BY_DEST = {o.dest: o for o in QUANTIZE_OPTIONS}

_GROUPS = {
    "job": "the job",
    "pvq": "pvq (--method pvq)",
    "scalar": "rtn and gptq (--method rtn | gptq)",
    "gptvq": "gptvq (--method gptvq)",
    "hessian": "calibration (pvq, gptq, gptvq: every method that uses a Hessian)",
    "quality": "bit allocation and fine-tuning (any method)",
    "rotation": "rotation (any method)",
    "act": "activation quantization (simulated / fake quantization: each linear's input is quantized per token "
           "and dequantized in float in the forward pass; the weights are calibrated with float activations)",
    "eval": "evaluation after saving (loads the checkpoint back)",
}


def _display(value: Any) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _help(o: Option) -> str:
    """The option's help with its default (unless the help already says it); argparse
    %-formats help strings, so a literal % is doubled."""
    text = o.help if "default" in o.help else f"{o.help} (default: {_display(o.default)})"
    return text.replace("%", "%%")


def add_quantize_options(parser: argparse.ArgumentParser) -> None:
    """Every option of the table as a flag (default None: `resolve_quantize_options` knows
    which were given), in one group per method and concern; --help shows each default."""
    groups = {key: parser.add_argument_group(title) for key, title in _GROUPS.items()}
    parser.add_argument("--recipe", default=None,
                        help="YAML or JSON file of these settings (field names: the flags without dashes); flags "
                             "override it; every checkpoint holds the recipe that made it (CKPT/recipe.yaml)")
    for o in QUANTIZE_OPTIONS:
        where = groups[o.group]
        shown = _help(o)
        if o.dest == "model":
            parser.add_argument("model", nargs="?", default=None, help=shown)
        elif o.switch:
            where.add_argument(o.flag, action="store_const", const=True, default=None, help=shown)
        else:
            where.add_argument(o.flag, type=o.type or str, default=None, help=shown, choices=o.choices)


def add_act_options(parser: argparse.ArgumentParser) -> None:
    """The activation-quantization options with their defaults (for `pvq eval`)."""
    g = parser.add_argument_group(_GROUPS["act"])
    for o in QUANTIZE_OPTIONS:
        if o.group == "act":
            shown = _help(o)
            if o.switch:
                g.add_argument(o.flag, action="store_true", help=shown)
            else:
                g.add_argument(o.flag, type=o.type or str, default=o.default, choices=o.choices, help=shown)


def _convert(o: Option, value: Any, where: str) -> Any:
    """A recipe value checked as its flag would be (RecipeFileError naming field and file):
    the flag's own argparse type, so a recipe and a command line obey one set of rules."""
    if not o.in_recipe:
        raise RecipeFileError(f"{where}: field {o.dest!r} is not taken from a recipe (a recipe cannot choose where "
                              f"pvq writes, what it replaces or which check it skips); pass {o.flag} on the "
                              "command line instead")
    if o.switch:
        if not isinstance(value, bool):
            raise RecipeFileError(f"{where}: field {o.dest!r} must be true or false, got {excerpt(value)}")
        return value
    if value is None:
        if o.default is None:
            return None
        raise RecipeFileError(f"{where}: field {o.dest!r} needs a value")
    if isinstance(value, (dict, list, bool)):
        raise RecipeFileError(f"{where}: field {o.dest!r} must be a single value, got {excerpt(value)}")
    try:
        converted = o.type(str(value)) if o.type is not None else str(value)
    except argparse.ArgumentTypeError as e:
        raise RecipeFileError(f"{where}: field {o.dest!r}: {e}") from None
    if o.choices is not None and converted not in o.choices:
        raise RecipeFileError(f"{where}: field {o.dest!r} must be one of {', '.join(map(str, o.choices))}, "
                              f"got {excerpt(value)}")
    return converted


#: a recipe file larger than this is refused unread (a real one is a few hundred bytes)
MAX_RECIPE_BYTES = 1 << 20
#: mappings and lists nested deeper than this are refused (a recipe is one flat mapping)
MAX_RECIPE_DEPTH = 8


def _load_yaml(text: str, where: str) -> Any:
    """safe_load, after a pass over the parser's events that refuses anchors and aliases
    (a few hundred bytes of nested aliases expand to gigabytes) and deep nesting, before
    any node is built."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        depth = 0
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                line = event.start_mark.line + 1
                raise RecipeFileError(f"{where}: YAML anchors and aliases are not allowed in a recipe (line {line}); "
                                      "write each value out")
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_RECIPE_DEPTH:
                    raise RecipeFileError(f"{where}: nested deeper than {MAX_RECIPE_DEPTH} levels (line "
                                          f"{event.start_mark.line + 1}); a recipe is a flat mapping of field: value")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        return yaml.safe_load(text)
    except RecipeFileError:
        raise
    except (yaml.YAMLError, ValueError) as e:  # ValueError: e.g. an integer of more digits than Python converts
        raise RecipeFileError(f"{where}: not valid YAML: {shorten(e)}") from None
    finally:
        loader.dispose()


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """The fields of a YAML or JSON recipe file, each checked as its flag would be."""
    p = Path(path)
    where = f"--recipe {path}"
    if p.is_file() and p.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeFileError(f"{where}: {p.stat().st_size} bytes, more than a recipe may hold "
                              f"({MAX_RECIPE_BYTES} bytes)")
    text = read_utf8(p, RecipeFileError, "recipe file")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except RecursionError:
            raise RecipeFileError(f"{where}: nested deeper than {MAX_RECIPE_DEPTH} levels; a recipe is a flat "
                                  "mapping of field: value") from None
        except ValueError as e:  # json.JSONDecodeError, or an integer of more digits than Python converts
            raise RecipeFileError(f"{where}: not valid JSON: {shorten(e)}") from None
        if nesting_depth(data, MAX_RECIPE_DEPTH) > MAX_RECIPE_DEPTH:
            raise RecipeFileError(f"{where}: nested deeper than {MAX_RECIPE_DEPTH} levels; a recipe is a flat "
                                  "mapping of field: value")
    else:
        data = _load_yaml(text, where)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeFileError(f"{where}: expected a mapping of field: value, got {type(data).__name__}")
    fields: dict[str, Any] = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in OPTIONS_BY_DEST:
            raise RecipeFileError(f"{where}: unknown field {excerpt(key)} (fields are the flags of pvq quantize "
                                  "without dashes, e.g. shape_bits)")
        fields[dest] = _convert(OPTIONS_BY_DEST[dest], value, where)
    return fields


def _active(o: Option, values: dict[str, Any]) -> bool:
    """Whether an option applies under these values (its method, its switch)."""
    if o.methods is not None and values["method"] not in o.methods:
        return False
    if o.requires is not None:
        dest, wanted = o.requires
        if wanted == "!none":
            return values[dest] != "none"
        if wanted == "!default":
            return values[dest] != OPTIONS_BY_DEST[dest].default
        return values[dest] == wanted
    return True


def resolve_quantize_options(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < the recipe file < the flags given. A flag that does not apply to the
    chosen method or switch is refused, naming both; so is a recipe field that does not
    apply within the recipe itself; a recipe field a flag makes moot is dropped."""
    recipe = read_recipe_file(args.recipe) if getattr(args, "recipe", None) else {}
    given = {o.dest: getattr(args, o.dest) for o in QUANTIZE_OPTIONS if getattr(args, o.dest, None) is not None}
    values = {**_defaults(), **recipe}
    from_recipe = dict(values)  # a recipe must hold together on its own
    values.update(given)
    for dest, against in [*((d, from_recipe) for d in recipe), *((d, values) for d in given)]:
        o = OPTIONS_BY_DEST[dest]
        if _active(o, against) or (o.switch and against[dest] is False):
            continue
        where = o.flag if against is values else f"field {dest!r} of --recipe {args.recipe}"
        if o.methods is not None and against["method"] not in o.methods:
            raise OptionConflictError(f"{where} is an option of --method {' or '.join(o.methods)}, but the method "
                                      f"is {against['method']}")
        raise OptionConflictError(f"{where} has no effect {_requirement(o)}")
    # a recipe field that a flag made moot (--no-eval over eval_windows, --method over
    # another method's fields) is dropped: the flag wins
    for dest in recipe:
        if dest not in given and not _active(OPTIONS_BY_DEST[dest], values):
            values[dest] = OPTIONS_BY_DEST[dest].default
    return values


def _requirement(o: Option) -> str:
    dest, wanted = o.requires
    flag = "--" + dest.replace("_", "-")
    if wanted == "!none":
        return f"without {flag} ({', '.join(c for c in OPTIONS_BY_DEST[dest].choices if c != 'none')})"
    if wanted == "!default":
        return f"without {flag}"
    if wanted is True:
        return f"without {flag}"
    if wanted is False:
        return f"with {flag}"
    return f"unless {flag} is {wanted}"


def recipe_text(values: dict[str, Any]) -> str:
    """The stored recipe (YAML): every field that applies and decides the checkpoint."""
    import yaml

    fields = {o.dest: values[o.dest] for o in QUANTIZE_OPTIONS if o.stored and _active(o, values)}
    header = ("# pvq quantize recipe: reproduce this checkpoint with\n"
              "#   pvq quantize --recipe recipe.yaml --out NEW_DIR\n")
    return header + yaml.safe_dump(fields, sort_keys=False, allow_unicode=True)


# Each method's config fields (pvq.quant's config classes) and the option that sets each;
# "!" marks a field set by the negation of an on/off option (use_hessian <- not no_hessian).
# method_config reads this table one way, values_from_recipe the other.
_CONFIG_FIELDS: dict[str, dict[str, str]] = {
    "pvq": {"group_size": "pvq_group_size", "shape_bits": "shape_bits", "gain": "gain", "gain_bits": "gain_bits",
            "gain_escapes": "gain_escapes", "enumeration": "enumeration", "use_hessian": "!no_hessian",
            "percdamp": "percdamp", "hessian_refine": "!no_refine"},
    "gptvq": {"dim": "vq_dim", "bits": "vq_bits", "group_size": "vq_group_size", "group_columns": "vq_columns",
              "codebook_update": "!no_codebook_update", "kmeans_iters": "kmeans_iters", "init": "vq_init",
              "assignment": "vq_assignment", "percdamp": "percdamp", "seed": "seed"},
    "rtn": {"bits": "bits", "group_size": "group_size"},
    "gptq": {"bits": "bits", "group_size": "group_size", "act_order": "act_order", "percdamp": "percdamp"},
}
_ACT_FIELDS = {"method": "act_method", "bits": "act_bits", "group_size": "act_group_size",
               "symmetric": "!act_asymmetric", "clip_ratio": "act_clip", "gain": "act_gain",
               "gain_bits": "act_gain_bits", "search_method": "act_search", "encode": "act_encode"}
# Recipe fields that are options of the same name
_RECIPE_OPTIONS = ("rotate", "rotate_seed", "seed", "calib_text", "calib_windows", "calib_seqlen", "compute_dtype",
                   "batch_size")


def _defaults() -> dict[str, Any]:
    return {o.dest: o.default for o in QUANTIZE_OPTIONS}


def _to_fields(table: dict[str, str], values: dict[str, Any]) -> dict[str, Any]:
    return {field: (not values[dest[1:]]) if dest.startswith("!") else values[dest] for field, dest in table.items()}


def _from_fields(table: dict[str, str], fields: dict[str, Any], values: dict[str, Any]) -> None:
    for field, dest in table.items():
        if dest.startswith("!"):
            values[dest[1:]] = not fields[field]
        else:
            values[dest] = fields[field]


def method_config(values: dict[str, Any]) -> dict[str, Any]:
    """The chosen method's config fields (pvq.quant's config classes) from the settings."""
    return _to_fields(_CONFIG_FIELDS[values["method"]], values)


def default_method_config(method: str) -> dict[str, Any]:
    """The config fields `pvq quantize --method METHOD` uses when no option is given (an
    unknown method: {}, left to the method registry to refuse)."""
    if method not in _CONFIG_FIELDS:
        return {}
    return method_config({**_defaults(), "method": method})


_FINETUNE_FIELDS = {"steps": "finetune_steps", "lr": "finetune_lr", "batch": "finetune_batch",
                    "val_windows": "finetune_val_windows"}


def embedding_config(values: dict[str, Any]) -> dict[str, Any] | None:
    """RTN config fields of the quantized embedding (None: kept dense)."""
    if not values["embed_bits"]:
        return None
    return {"bits": values["embed_bits"], "group_size": values["embed_group_size"]}


def finetune_config(values: dict[str, Any]) -> dict[str, Any] | None:
    """pvq.finetune.FinetuneConfig fields from the settings (None: no fine-tuning)."""
    return _to_fields(_FINETUNE_FIELDS, values) if values["finetune"] else None


def act_config(values: dict[str, Any]) -> dict[str, Any] | None:
    """ActQuantConfig fields from the settings (None: float activations)."""
    if values["act_method"] == "none":
        return None
    fields = _to_fields(_ACT_FIELDS, values)
    if fields["method"] == "rtn" and float(fields["bits"]).is_integer():
        fields["bits"] = int(fields["bits"])
    return fields


def values_from_recipe(recipe: dict[str, Any], model: str | None) -> dict[str, Any] | None:
    """The settings `pvq quantize` would need to make what a `pvq.oneshot.Recipe` (as
    `Recipe.to_dict()`) makes, or None when some part of it has no flag (a config field or
    dense dtype the CLI does not set, calibration given as text or tokens, no model id):
    the field tables read backwards, checked by mapping forwards again."""
    from dataclasses import asdict

    from pvq.quant import get_method
    from pvq.quant.activations import ActQuantConfig

    m = recipe.get("method")
    if model is None or m not in _CONFIG_FIELDS or recipe.get("dense_dtype", "float16") != "float16":
        return None
    values = {**_defaults(), "model": str(model), "method": m, **{k: recipe[k] for k in _RECIPE_OPTIONS}}
    values["target_bpw"] = recipe.get("target_bpw")
    embeddings = recipe.get("embeddings")
    if embeddings is None:  # dense (also a recipe written before the field existed)
        values["embed_bits"] = 0
    else:
        if set(embeddings) - {"bits", "group_size"}:
            return None
        values["embed_bits"] = embeddings.get("bits")
        values["embed_group_size"] = embeddings.get("group_size", values["embed_group_size"])
    method = get_method(m)
    try:
        finetune = recipe.get("finetune")
        if finetune is not None:
            from pvq.finetune import FinetuneConfig

            defaults = asdict(FinetuneConfig())
            if {k: v for k, v in {**defaults, **finetune}.items() if k not in _FINETUNE_FIELDS} != \
                    {k: v for k, v in defaults.items() if k not in _FINETUNE_FIELDS}:
                return None  # a fine-tuning field no flag sets
            values["finetune"] = True
            _from_fields(_FINETUNE_FIELDS, {**defaults, **finetune}, values)
        config = method.make_config(recipe["config"])
        _from_fields(_CONFIG_FIELDS[m], asdict(config), values)
        act = None if recipe.get("act") is None else ActQuantConfig(**recipe["act"])
        if act is not None:
            _from_fields(_ACT_FIELDS, asdict(act), values)
        mapped = act_config(values)
        same = (method.make_config(method_config(values)) == config
                and (act is None) == (mapped is None) and (act is None or ActQuantConfig(**mapped) == act))
    except Exception:  # noqa: BLE001 - a value no flag takes: not expressible
        return None
    return values if same else None
