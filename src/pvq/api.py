"""The Python API for notebooks: quantize a model in memory, then save it.

    import pvq
    model = pvq.quantize("smollm2-135m", method="pvq", config={"shape_bits": 3})
    pvq.save(model, "pvq-out")          # Hugging Face directory + tokenizer + integrity index

`quantize` is `pvq.oneshot.oneshot` (llm-compressor's ``oneshot`` idea) with the model,
recipe and calibration data given in whatever form is at hand; `save` is
`pvq.checkpoint.save_checkpoint`. The saved directory is what
``transformers.AutoModelForCausalLM.from_pretrained`` (after ``import pvq``) and
`pvq.load` read. Plain ``model.save_pretrained(dir)`` also writes a loadable model (the
same config and tensors) but neither the tokenizer nor ``pvq_index.json``: transformers
then loads it with an "unverified" warning and `pvq.load` only with ``verify=False``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pvq.errors import PVQError
from pvq.fileio import read_utf8

__all__ = ["APIError", "quantize", "save"]

#: where a model loaded by `quantize` from a string keeps its tokenizer (`save` writes it)
TOKENIZER_ATTRIBUTE = "pvq_tokenizer"
#: where `quantize` keeps the `pvq quantize` settings that reproduce the model (`save` writes them)
RECIPE_ATTRIBUTE = "pvq_recipe"


class APIError(PVQError, ValueError):
    """Arguments of `pvq.quantize` / `pvq.save` that cannot work."""


def _recipe(recipe_or_kwargs: Any, kwargs: dict[str, Any]):
    from pvq.oneshot import Recipe

    # the recipe's own fields first, then the calibration, seed, rotation and fine-tuning it shares
    known = sorted((f.name for f in dataclasses.fields(Recipe)), key=lambda n: n not in vars(Recipe)["__annotations__"])
    if recipe_or_kwargs is None:
        fields: dict[str, Any] = {}
    elif isinstance(recipe_or_kwargs, Recipe):
        fields = {name: getattr(recipe_or_kwargs, name) for name in known}
    elif isinstance(recipe_or_kwargs, dict):
        fields = dict(recipe_or_kwargs)
    else:
        raise APIError(f"the recipe must be a pvq.oneshot.Recipe or a dict of its fields, got "
                       f"{type(recipe_or_kwargs).__name__}")
    fields.update(kwargs)
    unknown = sorted(str(k) for k in fields if k not in known)
    if unknown:
        raise APIError(f"unknown recipe field(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    # the config fields left out take the config class's defaults, which are `pvq quantize`'s
    # (pvq.settings), so that the API and the CLI make the same model from the same words
    given = fields.get("config")
    if given is not None and not isinstance(given, dict):
        raise APIError(f"recipe field config must be a dict of the method's config fields, got "
                       f"{type(given).__name__}")
    fields["config"] = dict(given or {})
    recipe = Recipe(**fields)
    recipe.check()
    return recipe


def _model(model_or_id: Any, tokenizer: Any):
    if isinstance(model_or_id, nn.Module):
        if not hasattr(model_or_id, "config"):
            raise APIError(f"the model must be a transformers causal LM (a PreTrainedModel with a config), got "
                           f"{type(model_or_id).__name__}")
        return model_or_id, tokenizer, False
    if isinstance(model_or_id, (str, os.PathLike)):
        from pvq.models import load_model

        model, loaded_tokenizer, _ = load_model(model_or_id, device="cpu")
        return model, tokenizer if tokenizer is not None else loaded_tokenizer, True
    raise APIError(f"the model must be an nn.Module or a hub id, directory, .gguf file or demo alias, got "
                   f"{type(model_or_id).__name__}")


def _existing_file(text: str) -> bool:
    if len(text) > 4096 or "\n" in text:
        return False
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def _looks_like_a_path(text: str) -> bool:
    """A single word with a path separator or a text file's suffix: a file name, not calibration text."""
    return (len(text) < 4096 and not any(c.isspace() for c in text)
            and ("/" in text or os.sep in text or Path(text).suffix.lower() in (".txt", ".raw", ".text", ".md")))


def _read_text(path: Path) -> str:
    return read_utf8(path, APIError, "calibration text file")


def _calibration_text(calibration: Any) -> str:
    """The text a calibration argument gives (a text, a list of texts, a path to a text file)."""
    if isinstance(calibration, os.PathLike):
        return _read_text(Path(calibration))
    if isinstance(calibration, str):
        if _existing_file(calibration) or _looks_like_a_path(calibration):
            return _read_text(Path(calibration))
        if not calibration.strip():
            raise APIError("the calibration text is empty")
        return calibration
    if isinstance(calibration, (list, tuple)):
        if not calibration or not all(isinstance(t, str) for t in calibration):
            raise APIError("a calibration list must be a non-empty list of strings (texts)")
        if not any(t.strip() for t in calibration):
            raise APIError("the calibration texts are all empty")
        return "\n\n".join(calibration)
    raise APIError(f"calibration must be None, a text, a list of texts, a path to a text file or a LongTensor of "
                   f"token windows [n, seqlen], got {type(calibration).__name__}")


def _calibration(calibration: Any, recipe) -> str | torch.Tensor | None:
    """The calibration text or token windows the argument gives, checked before any model is
    loaded (None: the recipe's own calibration)."""
    if calibration is None:
        return None
    if recipe.calib_text is not None:
        raise APIError("calibration given twice: as calibration= and as the recipe's calib_text; give one")
    if isinstance(calibration, torch.Tensor):
        if calibration.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise APIError(f"calibration windows must be integer token ids, got a {calibration.dtype} tensor")
        if calibration.ndim != 2 or calibration.shape[0] < 1 or calibration.shape[1] < 2:
            raise APIError(f"calibration windows must be a tensor [n >= 1, seqlen >= 2], got shape "
                           f"{tuple(calibration.shape)}")
        return calibration.to(torch.long).cpu()
    return _calibration_text(calibration)


def _windows(calibration: str | torch.Tensor | None, recipe, model: nn.Module, tokenizer: Any) -> torch.Tensor | None:
    """The calibration windows for `oneshot` (None: the recipe's own, or the method needs none)."""
    if calibration is None or not recipe.needs_calibration():
        return None
    if isinstance(calibration, torch.Tensor):
        positions = getattr(model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and calibration.shape[1] > positions:
            raise APIError(f"calibration windows of {calibration.shape[1]} tokens are longer than the model's "
                           f"{positions} positions")
        vocab = getattr(model.config, "vocab_size", None)
        if int(calibration.min()) < 0 or (isinstance(vocab, int) and int(calibration.max()) >= vocab):
            raise APIError(f"calibration token ids must lie in [0, {vocab}), got "
                           f"{int(calibration.min())}..{int(calibration.max())}")
        return calibration
    if tokenizer is None:
        raise APIError("a calibration text needs a tokenizer to encode it: pass tokenizer=")
    from pvq.calibrate import encode_text, windows_from_ids

    return windows_from_ids(encode_text(tokenizer, calibration), recipe.calib_windows, recipe.calib_seqlen,
                            recipe.seed, source="the calibration text")


def quantize(
    model_or_id: Any,
    recipe_or_kwargs: Any = None,
    *,
    calibration: Any = None,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    work_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Quantize a causal LM and return it in memory (its quantized linears are
    `QuantizedLinear`s holding the packed payloads).

    model_or_id: a transformers causal LM (quantized in place and returned) or a string:
    hub id, local directory, .gguf file or demo alias (`pvq.models.load_model`; its
    tokenizer is loaded with it and kept as ``model.pvq_tokenizer`` for `save`).
    recipe_or_kwargs: a `pvq.oneshot.Recipe`, a dict of its fields, or None; fields given
    as keyword arguments (``method="pvq", config={"shape_bits": 3}, rotate=True``, ...)
    are added on top. Unknown fields raise APIError naming them.
    calibration: None (the recipe's: its calib_text file, else text sampled from the model,
    seeded), a text, a list of texts (joined with blank lines), a path to a text file
    (``calib_windows`` windows of ``calib_seqlen`` tokens are drawn from the tokenized
    text, seeded), or an integer tensor of token windows [n, seqlen] used as they are.
    tokenizer: encodes a calibration text (needed for one when the model is a module).
    device: where each block is quantized (None or "auto": cuda when present, else cpu).
    work_dir: keeps finished blocks on disk so that a rerun resumes (None: nothing kept).
    """
    from pvq.oneshot import oneshot, resolve_device

    recipe = _recipe(recipe_or_kwargs, kwargs)
    device = resolve_device(device)
    if work_dir is not None:
        if not isinstance(work_dir, (str, os.PathLike)):
            raise APIError(f"work_dir must be a path or None, got {type(work_dir).__name__}")
        if recipe.needs_calibration():
            from pvq.calibrate.workdir import check_claimable

            check_claimable(Path(work_dir))  # absent, empty or pvq's own (WorkDirError otherwise)
    calibration = _calibration(calibration, recipe)  # bad input fails before a model is loaded
    model, tokenizer, loaded_here = _model(model_or_id, tokenizer)
    positions = getattr(model.config, "max_position_embeddings", None)
    if (isinstance(positions, int) and recipe.calib_seqlen > positions and recipe.needs_calibration()
            and not isinstance(calibration, torch.Tensor)):
        raise APIError(f"calib_seqlen {recipe.calib_seqlen} is longer than the model's {positions} positions")
    windows = _windows(calibration, recipe, model, tokenizer)
    oneshot(model, tokenizer, recipe, windows=windows, device=device,
            work_dir=str(work_dir) if work_dir is not None else None, progress=progress)
    if recipe.method is not None:
        from pvq.checkpoint.hf import refresh_records

        refresh_records(model)  # config.quantization_config records the rotation and activation quantizers
    if loaded_here and tokenizer is not None:
        setattr(model, TOKENIZER_ATTRIBUTE, tokenizer)
    # what `pvq quantize` would need to make this model again (save writes it as recipe.yaml);
    # None when the recipe holds something no flag sets (calibration given as data, a module)
    from pvq.options import values_from_recipe

    setattr(model, RECIPE_ATTRIBUTE, values_from_recipe(
        recipe.to_dict(), str(model_or_id) if loaded_here and calibration is None else None))
    return model


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the quantized `model` as a pvq checkpoint directory at `path` (see
    `pvq.checkpoint.save_checkpoint`: transformers' files, the tokenizer, the integrity index
    `pvq.load` verifies); returns the index. tokenizer: None takes the one `quantize`
    loaded with the model, if any. A model `quantize` loaded from a hub id, directory or
    file, with the recipe's own calibration, also gets `recipe.yaml`: the `pvq quantize`
    settings that make it again (`pvq quantize --recipe DIR/recipe.yaml --out NEW`)."""
    from pvq.checkpoint import save_checkpoint

    if not isinstance(model, nn.Module):
        raise APIError(f"save needs the quantized model (an nn.Module), got {type(model).__name__}")
    if tokenizer is None:
        tokenizer = getattr(model, TOKENIZER_ATTRIBUTE, None)
    values = getattr(model, RECIPE_ATTRIBUTE, None)
    extra = None
    if values is not None:
        from pvq.checkpoint.index import RECIPE_FILE
        from pvq.options import recipe_text

        extra = {RECIPE_FILE: recipe_text(values)}
    return save_checkpoint(model, path, tokenizer=tokenizer, max_shard_size=max_shard_size, overwrite=overwrite,
                           extra_files=extra)
