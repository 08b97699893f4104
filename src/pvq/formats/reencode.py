"""Re-encode a pvq model's PVQ codes from Fischer's order into the split order.

Both orders are bijections of the same pyramid onto [0, N(D, K)), so the stored bits
per code, the payload spec and the decoded weights are unchanged; only the CPU and
GPU kernels need the split order (it decodes several times faster). `pvq convert`
applies this to checkpoints written before the split order existed (format 4, pvq 0.1).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pvq.codec import pack_codes, split_supported, unpack_codes
from pvq.quant import QuantizedTensor, get_method
from pvq.quant.pvq import decode_shapes, encode_shapes

from .errors import CheckpointError
from .hf import PVQQuantizationConfig
from .linear import QuantizedLinear, replace_linear

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


def convert_checkpoint(old: str | os.PathLike, new: str | os.PathLike, *, overwrite: bool = False,
                       max_shard_size: int | str | None = None) -> tuple[dict[str, Any], list[str]]:
    """`pvq convert OLD NEW`: a pvq 0.1 directory or a pvq checkpoint of any readable
    format version, written at NEW in the current format with split-order PVQ codes.
    Returns (NEW's index, the re-encoded layers)."""
    from .checkpoint import is_legacy_checkpoint, load_checkpoint, save_checkpoint
    from .legacy import convert_legacy

    src, dst = Path(old), Path(new)
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"pvq convert writes a new directory: NEW must differ from OLD ({src})")
    if is_legacy_checkpoint(src):
        index = convert_legacy(src, dst, overwrite=overwrite, max_shard_size=max_shard_size)
        src, overwrite = dst, True
    model, tokenizer, _ = load_checkpoint(src)
    changed = reencode_split(model)
    if changed or src != dst:
        index = save_checkpoint(model, dst, tokenizer=tokenizer, overwrite=overwrite, max_shard_size=max_shard_size,
                                report={"converted_from": str(old), "reencoded_layers": len(changed)})
    return index, changed
