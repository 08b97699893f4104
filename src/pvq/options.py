"""The main job's settings as flags: `pvq quantize`'s flags, the recipe file (`--recipe
recipe.yaml`, YAML or JSON) and the `recipe.yaml` stored in every checkpoint are all read
through the table `QUANTIZE_OPTIONS`, which is made from the dataclasses that declare the
settings once (`pvq.settings`: JobOptions and its Recipe, each method's config class,
ActQuantConfig, FinetuneConfig): a flag's default, range and help are its field's. `pvq
sweep`'s flags come from SweepOptions the same way (`add_setting_options`).

A recipe holds the same fields as the flags (the flag without its dashes, `-` or `_`:
``shape_bits: 3.25``); its values override the defaults, and flags given on the
command line override the recipe. A method's options belong to that method alone
(`--shape-bits` is PVQ's; `--group-size` is the scalar group size of rtn and gptq; PVQ's
dimension is `--pvq-group-size`): giving one for another method is an error, as is an
option whose switch is off (`--rotate-seed` without `--rotate`). The stored recipe holds
every field that decides the checkpoint, defaults included, and none that only says
where to write (`--out`, `--work-dir`, `--overwrite`, `--device`, `--max-shard-size`) or
how to evaluate it afterwards (`--no-eval`, `--eval-*`), so ``pvq quantize --recipe
CKPT/recipe.yaml --out NEW`` quantizes the same model again, and the CLI, `pvq.quantize` +
`pvq.save` and `oneshot` with a `Recipe()` write the same bytes.

A recipe is data, not authority: the fields that choose where pvq writes, what it replaces
or which safety check it skips (`out`, `work_dir`, `overwrite`, `ignore_memory_check`)
are refused in a recipe (they are command-line flags only). A recipe file is at most 1 MiB,
YAML anchors and aliases are refused (no "billion laughs"), nesting is bounded, and every
value goes through its flag's own check; messages quote a short excerpt of a bad value.

Over 500 lines because it is every way settings arrive as text: the flag table, recipe
files (with their size, nesting and alias checks) and the stored recipe.yaml.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Callable

from pvq.errors import PVQError
from pvq.fileio import nesting_depth, read_utf8
from pvq.settings import (  # noqa: F401 - the argparse types, re-exported (pvq.options was their home)
    FIELD_DEFAULT,
    MAX_SEED,
    NONNEGATIVE,
    POSITIVE,
    SEED,
    SEQLEN,
    RunSettings,
    excerpt,
    field_default,
    setting_of,
    shorten,
)

__all__ = ["Option", "OptionConflictError", "QUANTIZE_OPTIONS", "RecipeFileError", "add_quantize_options",
           "add_setting_options", "read_recipe_file", "recipe_text", "resolve_quantize_options", "setting_options",
           "settings_from_values"]


class RecipeFileError(PVQError, ValueError):
    """A recipe file that cannot be read, or a field or value it cannot hold."""


class OptionConflictError(PVQError, ValueError):
    """An option given for another method, or with its switch off."""


@dataclass(frozen=True)
class Option:
    """One setting of the main job: a flag, a recipe field, a JobOptions input (made from a
    dataclass field's `pvq.settings.Setting`; see `setting_options`)."""

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
#: the help group of each method's own options (a method not named here gets a group of its own)
_METHOD_GROUPS = {"pvq": "pvq", "rtn": "scalar", "gptq": "scalar", "gptvq": "gptvq"}


def _option(f, owner_methods: tuple[str, ...] | None = None, owner_group: str = "job") -> Option | None:
    """The Option of dataclass field `f` (None: the field has no flag of its own)."""
    s = setting_of(f)
    if s is None or s.help is None:
        return None
    if s.option_default is not FIELD_DEFAULT:
        default = s.option_default
    else:
        default = field_default(f)
        default = (not default) if s.negate else default
    return Option(s.option or f.name, default, s.help, s.type, s.choices, s.methods or owner_methods, s.requires,
                  s.group or owner_group, s.stored, s.in_recipe)


def _field_table(cls: type) -> dict[str, str]:
    """{field: the option that sets it} of a config class; "!" marks a field set by the
    negation of an on/off option (use_hessian <- not no_hessian)."""
    table = {}
    for f in dataclass_fields(cls):
        s = setting_of(f)
        if s is not None and (s.help is not None or s.option is not None):
            table[f.name] = ("!" if s.negate else "") + (s.option or f.name)
    return table


def setting_options(cls: type) -> list[Option]:
    """The Options of a settings dataclass's fields that have a flag (JobOptions, SweepOptions),
    with FinetuneConfig's when it has a `finetune` field."""
    from pvq.calibrate.finetune import FinetuneConfig

    found = [o for o in map(_option, dataclass_fields(cls)) if o is not None]
    if "finetune" in {f.name for f in dataclass_fields(cls)}:
        found += [o for o in (_option(f, owner_group="quality") for f in dataclass_fields(FinetuneConfig))
                  if o is not None]
    return found


def _merge(found: dict[str, Option], o: Option, method: str) -> None:
    """Add method-config option `o` of `method`; one flag shared by several methods
    (--percdamp, --bits) must be declared alike by each (pvq.settings.percdamp_field, like)."""
    if o.dest not in found:
        found[o.dest] = o
        return
    have = found[o.dest]
    if (have.default, have.help, have.type, have.choices, have.requires, have.group) != \
            (o.default, o.help, o.type, o.choices, o.requires, o.group):
        raise RuntimeError(f"option {o.flag} is declared differently by the config classes of "
                           f"{', '.join(have.methods)} and {method}")
    found[o.dest] = Option(**{**have.__dict__, "methods": (*have.methods, method)})


def _build_options() -> tuple[tuple[Option, ...], dict[str, dict[str, str]], dict[str, str], dict[str, str]]:
    """QUANTIZE_OPTIONS and the field tables, all read from the dataclasses that declare the
    settings: JobOptions (the job, its Recipe, RunSettings, EvalSettings), each method's
    config class, FinetuneConfig and ActQuantConfig."""
    from pvq.runtime.embedding import DEFAULT_EMBEDDINGS
    from pvq.jobs import JobOptions
    from pvq.methods import METHODS
    from pvq.activations import ActQuantConfig

    options = setting_options(JobOptions)
    # the embedding's two flags stand for Recipe.embeddings (RTN fields, DEFAULT_EMBEDDINGS)
    options += [
        Option("embed_bits", DEFAULT_EMBEDDINGS["bits"], "store the token embedding (and the head: a tied one from "
               "the same table) round-to-nearest at this many bits, 4..8, with a float16 scale and zero point per "
               "--embed-group-size columns (0: keep them as dense float16 tensors)", NONNEGATIVE, group="quality"),
        Option("embed_group_size", DEFAULT_EMBEDDINGS["group_size"], "columns per scale of the quantized embedding",
               POSITIVE, requires=("embed_bits", "!default"), group="quality"),
    ]
    options += [o for o in (_option(f, owner_group="act") for f in dataclass_fields(ActQuantConfig)) if o is not None]
    config_options: dict[str, Option] = {}
    config_fields: dict[str, dict[str, str]] = {}
    for name in sorted(METHODS, key=lambda m: list(_METHOD_GROUPS).index(m) if m in _METHOD_GROUPS else 99):
        cls = METHODS[name].config_class
        group = _METHOD_GROUPS.get(name, name)
        _GROUPS.setdefault(group, f"{name} (--method {name})")
        config_fields[name] = _field_table(cls)
        for f in dataclass_fields(cls):
            o = _option(f, (name,), group)
            if o is not None:
                _merge(config_options, o, name)
    options += config_options.values()
    order = list(_GROUPS)
    first = ("model", "method")  # the job group opens with them

    def key(item):
        i, o = item
        return order.index(o.group), first.index(o.dest) if o.dest in first else len(first), i

    table = tuple(o for _, o in sorted(enumerate(options), key=key))
    dests = [o.dest for o in table]
    if len(set(dests)) != len(dests):
        raise RuntimeError(f"a flag is declared twice: {sorted(d for d in dests if dests.count(d) > 1)}")
    for name, fields_ in config_fields.items():
        for dest in fields_.values():
            if dest.lstrip("!") not in dests:
                raise RuntimeError(f"{name} config field set by --{dest.lstrip('!')}, which no setting declares")
    from pvq.calibrate.finetune import FinetuneConfig

    return table, config_fields, _field_table(ActQuantConfig), _field_table(FinetuneConfig)


QUANTIZE_OPTIONS, _CONFIG_FIELDS, _ACT_FIELDS, _FINETUNE_FIELDS = _build_options()
OPTIONS_BY_DEST = {o.dest: o for o in QUANTIZE_OPTIONS}
# Recipe fields that are options of the same name (calibration, seed, rotation)
_RECIPE_OPTIONS = tuple(o.dest for o in map(_option, dataclass_fields(RunSettings)) if o and o.dest != "fast")


def _display(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(_display(v) for v in value) or "none"
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _help(o: Option) -> str:
    """The option's help with its default (unless the help already says it); argparse
    %-formats help strings, so a literal % is doubled."""
    text = o.help if "default" in o.help else f"{o.help} (default: {_display(o.default)})"
    return text.replace("%", "%%")


def _add_flag(where, o: Option, default: Any, switch_const: Any = True) -> None:
    """One option as a flag on `where` (a parser or group): a switch stores `switch_const`,
    any other flag its typed value; `default` is what an absent flag leaves."""
    if o.switch:
        where.add_argument(o.flag, action="store_const", const=switch_const, default=default, help=_help(o))
    else:
        where.add_argument(o.flag, type=o.type or str, default=default, choices=o.choices, help=_help(o))


def add_quantize_options(parser: argparse.ArgumentParser) -> None:
    """Every option of the table as a flag (default None: `resolve_quantize_options` knows
    which were given), in one group per method and concern; --help shows each default."""
    groups = {key: parser.add_argument_group(title) for key, title in _GROUPS.items()}
    parser.add_argument("--recipe", default=None,
                        help="YAML or JSON file of these settings (field names: the flags without dashes); flags "
                             "override it; every checkpoint holds the recipe that made it (CKPT/recipe.yaml)")
    for o in QUANTIZE_OPTIONS:
        if o.dest == "model":
            parser.add_argument("model", nargs="?", default=None, help=_help(o))
        else:
            _add_flag(groups[o.group], o, None)


def add_act_options(parser: argparse.ArgumentParser) -> None:
    """The activation-quantization options with their defaults (for `pvq eval`)."""
    g = parser.add_argument_group(_GROUPS["act"])
    for o in QUANTIZE_OPTIONS:
        if o.group == "act":
            _add_flag(g, o, False if o.switch else o.default)


def add_setting_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """The flags of a settings dataclass (`pvq sweep`: SweepOptions) with their defaults, in the
    same groups as `pvq quantize`'s; `settings_from_values(cls, vars(args))` reads them back."""
    groups: dict[str, Any] = {}
    for o in setting_options(cls):
        if o.dest == "model":
            parser.add_argument("model", nargs="?", default=o.default, help=_help(o))
            continue
        if o.group not in groups:
            groups[o.group] = parser if o.group == "job" else parser.add_argument_group(_GROUPS[o.group])
        _add_flag(groups[o.group], o, o.default, switch_const=not o.default)


def settings_from_values(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of settings dataclass `cls` (JobOptions, SweepOptions) from
    option values: each field that has a flag; config, act, finetune and embeddings built
    from their options; eval_windows 0 is None (all)."""
    names = {f.name for f in dataclass_fields(cls)}
    built = {"config": method_config, "act": act_config, "finetune": finetune_config, "embeddings": embedding_config}
    out: dict[str, Any] = {}
    for f in dataclass_fields(cls):
        s = setting_of(f)
        if f.name in built:
            out[f.name] = built[f.name](values)
        elif s is not None and s.help is not None:
            value = values[s.option or f.name]
            out[f.name] = (not value) if s.negate else value
    if "eval_windows" in names:
        out["eval_windows"] = out["eval_windows"] or None
    return out


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
    if "finetune" in data and isinstance(data["finetune"], bool) and "fast" not in data:
        data = dict(data)  # a recipe written when fine-tuning was opt-in (finetune: true|false)
        data["fast"] = not data.pop("finetune")
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
    """The chosen method's config fields (pvq.methods's config classes) from the settings."""
    return _to_fields(_CONFIG_FIELDS[values["method"]], values)


def default_method_config(method: str) -> dict[str, Any]:
    """The config fields `pvq quantize --method METHOD` uses when no option is given (an
    unknown method: {}, left to the method registry to refuse)."""
    if method not in _CONFIG_FIELDS:
        return {}
    return method_config({**_defaults(), "method": method})


def embedding_config(values: dict[str, Any]) -> dict[str, Any] | None:
    """RTN config fields of the quantized embedding (None: kept dense)."""
    if not values["embed_bits"]:
        return None
    return {"bits": values["embed_bits"], "group_size": values["embed_group_size"]}


def finetune_config(values: dict[str, Any]) -> dict[str, Any] | None:
    """pvq.calibrate.finetune.FinetuneConfig fields from the settings (None: no fine-tuning)."""
    return None if values["fast"] else _to_fields(_FINETUNE_FIELDS, values)


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

    from pvq.methods import get_method
    from pvq.activations import ActQuantConfig

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
        values["fast"] = finetune is None
        if finetune is not None:
            from pvq.calibrate.finetune import FinetuneConfig

            defaults = asdict(FinetuneConfig())
            if {k: v for k, v in {**defaults, **finetune}.items() if k not in _FINETUNE_FIELDS} != \
                    {k: v for k, v in defaults.items() if k not in _FINETUNE_FIELDS}:
                return None  # a fine-tuning field no flag sets
            values["fast"] = False
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
