"""The loading contract: what every route into a checkpoint checks before transformers builds
a model, and after it loaded one.

`pvq.load`, `pvq verify/eval/generate/chat/convert` and plain ``from_pretrained`` after
``import pvq`` all pass here, because `guard_from_pretrained` wraps transformers'
``PreTrainedModel.from_pretrained`` (once, when pvq registers its quantizer):

- before (`check_directory`, a local directory): config.json is read by pvq first (a regular
  file of bounded size and nesting), names an architecture of the installed transformers
  (no remote code), builds a valid config, and asks only for rope types that exist and
  sizes that are positive integers; a directory with a pvq integrity index is verified
  against it (a config.json without a pvq ``quantization_config``, or with one spelled
  otherwise, is refused there); a shard index names only plain files of the directory.
- after (`refuse_unquantized_payload`): a model that came back with pvq payload tensors
  unread and their layers' weights missing (a pvq checkpoint whose quantization_config
  was removed: transformers would return a randomly initialised model) is refused.

The quantizer itself then checks every stored payload's shapes, dtypes and values
(`PackedPayload.check_payload`) and decodes each quantized linear once.
"""

from __future__ import annotations

import contextvars
import functools
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any


from pvq.checkpoint.index import _VERIFIED, INDEX_FILE, QUANT_METHOD, read_json_file, verify_checkpoint
from pvq.methods.base import is_int
from pvq.runtime.errors import CheckpointError, CheckpointIntegrityError

__all__ = ["check_directory", "check_generation_config", "check_model_config", "checked_directory",
           "guard_from_pretrained", "read_config", "refuse_unquantized_payload"]

MAX_PARAMETERS = 1 << 44  # ~17.6T: a config asking for more is not a model, whatever its fields say
SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "max_position_embeddings", "head_dim", "moe_intermediate_size", "num_experts",
               "num_local_experts", "num_experts_per_tok", "shared_expert_intermediate_size")
SHARD_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
_TOKEN_ID_BOUND = 1 << 31
# generation_config.json fields and what they must hold (None is always allowed)
_COUNTS = ("max_length", "max_new_tokens", "min_length", "min_new_tokens", "top_k", "num_beams", "num_beam_groups",
           "num_return_sequences", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "num_assistant_tokens",
           "prompt_lookup_num_tokens", "max_matching_ngram_size", "assistant_lookbehind", "target_lookbehind",
           "max_cache_len")
_NON_NEGATIVE = ("temperature", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
                 "encoder_repetition_penalty", "max_time", "assistant_confidence_threshold", "top_h")
_REALS = ("length_penalty", "diversity_penalty")
_FLAGS = ("do_sample", "use_cache", "output_attentions", "output_hidden_states", "output_scores", "output_logits",
          "return_dict_in_generate", "remove_invalid_values", "renormalize_logits")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "forced_bos_token_id",
              "forced_eos_token_id")
_TOKEN_ID_LISTS = ("suppress_tokens", "begin_suppress_tokens")

# the stored arrays of pvq's methods (`payload_spec`s); with the layer's weight missing, their
# presence means a pvq checkpoint read as a float one
PAYLOAD_NAMES = frozenset({"codes", "gains", "gain_indices", "row_norms", "gain_codebook", "escape_groups",
                           "escape_gains", "scales", "zeros", "perm", "indices", "codebooks", "codebook_scales"})


def _generation_config_problem(config: dict) -> str | None:
    """What is wrong with the fields of a parsed generation_config.json, or None."""
    import math

    def show(v: Any) -> str:
        text = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else repr(v)
        return text if len(text) <= 60 else text[:57] + "..."

    def token_id(v: Any) -> bool:
        return is_int(v) and -_TOKEN_ID_BOUND < v < _TOKEN_ID_BOUND

    for key, value in config.items():
        if value is None:
            continue
        if key in _COUNTS and not (is_int(value) and 0 <= value < _TOKEN_ID_BOUND):
            return f"{key} must be a count (an integer from 0 to 2^31), got {show(value)}"
        if key in _NON_NEGATIVE + _REALS:
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or (key in _NON_NEGATIVE and value < 0):
                kind = "a non-negative number" if key in _NON_NEGATIVE else "a finite number"
                return f"{key} must be {kind}, got {show(value)}"
        if key in _FLAGS and not isinstance(value, bool):
            return f"{key} must be true or false, got {show(value)}"
        if key in _TOKEN_IDS and not (token_id(value) or (
                isinstance(value, list) and 0 < len(value) <= 4096 and all(token_id(v) for v in value))):
            return f"{key} must be a token id (an integer) or a list of them, got {show(value)}"
        if key in _TOKEN_ID_LISTS and not (isinstance(value, list) and len(value) <= 1 << 20
                                           and all(token_id(v) for v in value)):
            return f"{key} must be a list of token ids, got {show(value)}"
    return None


def check_generation_config(root: Path) -> None:
    """Refuse, in one line naming the file, a generation_config.json that transformers would
    load into something that cannot generate, or reject with an error that does not name the
    file: not JSON, not an object, nested without end, a count that is negative or not an
    integer, a temperature that is not a number, token ids that are not integers. A directory
    without the file passes; a link is the integrity check's to refuse."""
    path = Path(root) / GENERATION_CONFIG
    if path.is_symlink() or not path.is_file():
        return
    config = read_json_file(path, GENERATION_CONFIG, constants=False)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not a {type(config).__name__}")
    problem = _generation_config_problem(config)
    if problem is None:
        from transformers import GenerationConfig
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its warnings (flags greedy search ignores) come again at the load
        try:
            GenerationConfig.from_dict(dict(config)).validate()
        except Exception as e:  # noqa: BLE001 - transformers' checks raise ValueError, TypeError, ...
            problem = f"transformers refuses it: {' '.join(str(e).split())[:200]}"
        finally:
            hf_logging.set_verbosity(verbosity)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")


def read_config(root: Path) -> dict[str, Any]:
    config = read_json_file(root / "config.json", "config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{root / 'config.json'} is not a JSON object")
    return config


def _rope_types(rope: Any) -> list[Any]:
    """The rope_type values of a rope_parameters / rope_scaling entry (flat, or one per layer type)."""
    if not isinstance(rope, dict):
        return []
    if "rope_type" in rope or "type" in rope:
        return [rope.get("rope_type", rope.get("type"))]
    return [t for v in rope.values() for t in _rope_types(v)]


def check_model_config(config: dict[str, Any], where: str) -> Any:
    """The transformers config `config` (a dict from config.json) builds, or CheckpointError
    naming `where` and the field: a known architecture, no remote code, rope types that
    exist, sizes that are positive integers and a model of plausible size. Returns the
    config object."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{where}: model_type {str(model_type)[:60]!r} is not an architecture of the installed "
                              "transformers (checkpoints never load remote code)")
    texts = [config] + [v for k, v in config.items() if k.endswith("_config") and isinstance(v, dict)
                        and k != "quantization_config"]
    for text in texts:
        for field in SIZE_FIELDS:
            value = text.get(field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 1 << 31:
                raise CheckpointError(f"{where}: {field} must be a positive integer below 2**31, got {str(value)[:60]}")
        for key in ("rope_parameters", "rope_scaling"):
            for rope_type in _rope_types(text.get(key)):
                if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
                    raise CheckpointError(f"{where}: {key} asks for rope_type {str(rope_type)[:60]!r}; the installed "
                                          f"transformers knows default, {', '.join(sorted(ROPE_INIT_FUNCTIONS))}")
        hidden, inter = text.get("hidden_size") or 0, text.get("intermediate_size") or 0
        layers, vocab = text.get("num_hidden_layers") or 0, text.get("vocab_size") or 0
        experts = max(text.get("num_experts") or 0, text.get("num_local_experts") or 0, 1)
        estimate = 2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * inter * experts)
        if estimate > MAX_PARAMETERS:
            raise CheckpointError(f"{where}: its sizes describe a model of about {estimate:.3g} parameters; refusing to build it")
    try:
        return CONFIG_MAPPING[model_type].from_dict({k: v for k, v in config.items() if k != "auto_map"})
    except Exception as e:  # noqa: BLE001 - transformers' validators raise many types
        message = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{where}: not a valid {model_type} config: {type(e).__name__}: {message}") from None


def _check_shard_index(root: Path) -> None:
    path = root / SHARD_INDEX
    if not (path.exists() or path.is_symlink()):
        return
    index = read_json_file(path, SHARD_INDEX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointIntegrityError(f"{path}: 'weight_map' must be an object of tensor name -> shard file")
    for name in set(weight_map.values()):
        plain = isinstance(name, str) and name and "/" not in name and "\\" not in name and name not in (".", "..") \
            and not PurePosixPath(name).is_absolute()
        if not plain or (root / name).is_symlink() or not (root / name).is_file():
            raise CheckpointIntegrityError(f"{path} names shard {str(name)[:80]!r}, which is not a file of {root}")


def check_directory(root: Path) -> None:
    """The checks before transformers reads anything of the local directory `root` (module docstring)."""

    root = Path(root)
    index = root / INDEX_FILE
    if (index.exists() or index.is_symlink()) and _VERIFIED.get() != root.resolve():
        verify_checkpoint(root)  # every file against its checksum; refuses a config without a pvq quantization_config
    if not (root / "config.json").exists() and not (root / "config.json").is_symlink():
        return  # transformers says what is missing
    if (root / "config.json").is_symlink():
        return  # no pvq index (verify_checkpoint refuses links): a float model in a hub cache snapshot, whose files are links
    config = read_config(root)
    qc = config.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if isinstance(method, str) and method != QUANT_METHOD and method.strip().lower() == QUANT_METHOD:
        raise CheckpointError(f"{root / 'config.json'}: quant_method is {method!r}, not {QUANT_METHOD!r}; "
                              "transformers would skip it and load random weights")
    _check_shard_index(root)
    check_model_config(config, str(root / "config.json"))
    check_generation_config(root)


def refuse_unquantized_payload(model: Any, loading_info: dict[str, Any], where: str) -> None:
    """CheckpointError if transformers left pvq payload tensors unread while the weights of
    their layers were initialised at random (see the module docstring)."""
    missing = {str(k) for k in loading_info.get("missing_keys") or ()}
    stray = sorted(str(k) for k in loading_info.get("unexpected_keys") or ()
                   if "." in str(k) and str(k).rsplit(".", 1)[1] in PAYLOAD_NAMES
                   and f"{str(k).rsplit('.', 1)[0]}.weight" in missing)
    if stray:
        raise CheckpointError(f"{where} holds quantized payload tensors ({', '.join(stray[:3])}"
                              f"{', ...' if len(stray) > 3 else ''}) but its config.json has no pvq quantization_config; "
                              "refusing to return a model with randomly initialised layers")


def _local_directory(path: Any, subfolder: Any) -> Path | None:
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return None
    root = Path(path)
    return root / subfolder if isinstance(subfolder, str) and subfolder else root


_GUARDED = False
_CHECKED: contextvars.ContextVar[Path | None] = contextvars.ContextVar("pvq_checked_directory", default=None)


def checked_directory() -> Path | None:
    """The directory the guard around the ``from_pretrained`` now running has checked (None: none)."""
    return _CHECKED.get()


def _guarded(original):
    """`original` (a from_pretrained function) running the contract around itself, once per
    call chain (the Auto classes call the model class's from_pretrained in turn)."""

    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        root = _local_directory(pretrained_model_name_or_path, kwargs.get("subfolder"))
        if root is not None and _CHECKED.get() == root.resolve():
            return original(cls, pretrained_model_name_or_path, *args, **kwargs)
        if root is not None:
            check_directory(root)
        wants_info = bool(kwargs.get("output_loading_info"))
        kwargs["output_loading_info"] = True
        token = _CHECKED.set(root.resolve() if root is not None else None)
        try:
            model, info = original(cls, pretrained_model_name_or_path, *args, **kwargs)
        finally:
            _CHECKED.reset(token)
        refuse_unquantized_payload(model, info, str(pretrained_model_name_or_path))
        return (model, info) if wants_info else model

    return from_pretrained


def guard_from_pretrained() -> None:
    """Make transformers' ``from_pretrained`` (the model classes' and the Auto classes')
    run the loading contract on local directories (once; `pvq.checkpoint.hf.register_with_transformers`
    calls it). Hub names are checked after the download, by the quantizer and
    `refuse_unquantized_payload` only."""
    global _GUARDED
    if _GUARDED:
        return
    from transformers import PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    for owner in (PreTrainedModel, _BaseAutoModelClass):
        owner.from_pretrained = classmethod(_guarded(owner.from_pretrained.__func__))
    _GUARDED = True
