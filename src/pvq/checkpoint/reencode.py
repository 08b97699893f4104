"""Re-encode a pvq model's PVQ codes from Fischer's order into the split order.

Both orders are bijections of the same pyramid onto [0, N(D, K)), so the stored bits
per code, the payload spec and the decoded weights are unchanged; only the CPU and
GPU kernels need the split order (it decodes several times faster). `pvq convert`
applies this to checkpoints written before the split order existed (format 4, pvq 0.1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pvq.codec import pack_codes, split_supported, unpack_codes
from pvq.fileio import as_os_error
from pvq.methods import QuantizedTensor, get_method
from pvq.methods.pvq import decode_shapes, encode_shapes

from pvq.runtime.errors import CheckpointError, CheckpointIntegrityError
from pvq.checkpoint.hf import PVQQuantizationConfig
from pvq.checkpoint.index import RECIPE_FILE
from pvq.runtime.linear import QuantizedLinear, replace_linear

__all__ = ["convert_checkpoint", "reencode_split"]


def _splittable(method: str, config: dict[str, Any]) -> bool:
    if method != "pvq" or config.get("enumeration", "auto") == "split":
        return False
    cfg = get_method("pvq").make_config(config)
    return split_supported(int(cfg.group_size), cfg.pulses)


def reencode_split(model: nn.Module) -> list[str]:
    """Re-encode every Fischer-ordered PVQ layer whose codes fit the split codec, in place;
    returns their names. The model's quantization config records the new order."""
    qcfg = getattr(model.config, "quantization_config", None)
    if not isinstance(qcfg, PVQQuantizationConfig):
        raise CheckpointError("the model is not a pvq model (its config has no pvq quantization_config)")
    changed = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantizedLinear) or module.method != "pvq":
            continue
        lay = module.layout
        if lay["enumeration"] != "fischer" or not split_supported(lay["group_size"], lay["pulses"]):
            continue
        D, G, K, nbits = (int(lay[k]) for k in ("group_size", "num_groups", "pulses", "code_bits"))
        R = module.out_features
        tensors = {k: np.array(v) for k, v in module.payload().items()}
        points = decode_shapes(unpack_codes(tensors["codes"], R * G, nbits), D, K, "fischer")
        tensors["codes"] = pack_codes(encode_shapes(points, K, "split"), nbits)
        config = dataclasses.replace(module.config, enumeration="split")
        qt = QuantizedTensor("pvq", (R, module.in_features), tensors, {**lay, "enumeration": "split"})
        layer = QuantizedLinear.from_quantized(qt, config, module.bias, name=name).to(module.codes.device)
        replace_linear(model, name, layer)
        changed.append(name)
    if changed:
        d = qcfg.to_dict()
        if _splittable(d["method"], d["config"]):
            d["config"] = {**d["config"], "enumeration": "split"}
        for entry in d["layer_overrides"].values():
            if _splittable(entry.get("method", d["method"]), entry.get("config") or {}):
                entry["config"] = {**(entry.get("config") or {}), "enumeration": "split"}
        new = PVQQuantizationConfig(**d)
        model.config.quantization_config = new
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.quantization_config = new
    return changed




def _indexed_recipe(root: Path, index: dict[str, Any] | None) -> dict[str, str] | None:
    """{recipe.yaml: its text} when the verified checkpoint `root` lists one in its index
    (the bytes read are checked against the index again), else None."""
    entry = ((index or {}).get("files") or {}).get(RECIPE_FILE)
    if entry is None:
        return None
    try:
        data = (root / RECIPE_FILE).read_bytes()
    except OSError as e:
        raise CheckpointError(f"{root}/{RECIPE_FILE} cannot be read: {e}") from None
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise CheckpointIntegrityError(f"checkpoint file {RECIPE_FILE!r} of {root} changed after it was verified")
    try:
        return {RECIPE_FILE: data.decode("utf-8")}
    except UnicodeDecodeError:
        raise CheckpointError(f"{root}/{RECIPE_FILE} is not UTF-8 text; cannot carry it into the conversion") from None


def convert_checkpoint(old: str | os.PathLike, new: str | os.PathLike, *, overwrite: bool = False,
                       max_shard_size: int | str | None = None) -> tuple[dict[str, Any], list[str]]:
    """`pvq convert OLD NEW`: a pvq 0.1 directory or a pvq checkpoint of any readable
    format version, written at NEW in the current format with split-order PVQ codes.
    Returns (NEW's index, the re-encoded layers).

    NEW is refused before any work when it cannot be written (an existing checkpoint
    without `overwrite`, a foreign directory, a file). A pvq 0.1 source is converted into a
    temporary directory beside NEW first; the result is assembled beside NEW too and moved
    into place only when complete, so a conversion that fails (a damaged source found
    half-way, a full disk) leaves nothing at NEW, and an existing NEW replaced with
    `overwrite` stays as it was until then. The source's recipe.yaml (listed in its index)
    is carried over, indexed in NEW."""
    from pvq.checkpoint.store import (check_destination, load_checkpoint, partial_path, save_checkpoint,
                                      shard_size_bytes)
    from pvq.checkpoint.index import REPORT_FILE, is_legacy_checkpoint
    from pvq.checkpoint.legacy import convert_legacy

    src, dst = Path(old), Path(new)
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"pvq convert writes a new directory: NEW must differ from OLD ({src})")
    if max_shard_size is not None:
        shard_size_bytes(max_shard_size)
    existed = check_destination(dst, overwrite)
    stage = None
    try:
        report: dict[str, Any] = {}
        if is_legacy_checkpoint(src):
            stage = partial_path(dst)
            convert_legacy(src, stage, max_shard_size=max_shard_size)
            with contextlib.suppress(OSError, ValueError, TypeError, RecursionError):
                report = dict(json.loads((stage / REPORT_FILE).read_text(encoding="utf-8")))
            model, tokenizer, _ = load_checkpoint(stage, verify=False, check_decode=False)  # convert_legacy checked it
            extra = None
        else:
            model, tokenizer, info = load_checkpoint(src)
            extra = _indexed_recipe(src, info["index"])
        changed = reencode_split(model)
        index = save_checkpoint(model, dst, tokenizer=tokenizer, overwrite=overwrite, max_shard_size=max_shard_size,
                                report={**report, "converted_from": str(old), "reencoded_layers": len(changed)},
                                extra_files=extra)
    except Exception as e:  # a full disk, a folder that became unwritable: say what was left at NEW
        err = as_os_error(e)  # (safetensors reports a full disk as its own SafetensorError)
        if err is None:
            raise
        what = "the checkpoint there is unchanged" if existed else "nothing was written there"
        raise CheckpointError(f"converting {src} into {dst} failed ({err}); {what}") from e
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    return index, changed
