"""Packed checkpoints: a directory of safetensors files and one JSON manifest.

Layout of a checkpoint directory::

    manifest.json            what is stored and how to rebuild it (below)
    blocks-000.safetensors   quantized payloads of decoder block 0, keys "<layer>.<tensor>"
    blocks-001.safetensors   ... one file per decoder block
    quantized-extra.safetensors   quantized layers outside a numbered block (if any)
    dense.safetensors        every other tensor of the model's state_dict (embeddings,
                             norms, biases, an untied head), float16 (bfloat16 where a
                             value would overflow float16), tied tensors stored once
    report.json              the run's report, when one is given
    tokenizer files          when a tokenizer is given (tokenizer.save_pretrained)

``manifest.json`` (sorted keys)::

    format: "pvq-checkpoint", format_version: 1 (2 for a rotated model, 3 with activation
            quantization), pvq_version, created_by
    model_type, config          model.config as a dict; rebuilds the architecture offline
    rotation: (only when rotated) the record of `pvq.rotation` (kind, seed, sizes, every rotation's
             construction and digest, the online transforms); the stored weights are the
             rotated ones, and loading rebuilds the online transforms from the record
    act_quant: (only when the activations are quantized) the record of
             `pvq.quant.activations` (kind "simulated-activation-quantization", the
             ActQuantConfig, the layers whose inputs are quantized, bits per value);
             loading rebuilds the quantizers (simulated quantization in the forward pass)
    source, settings            what was quantized, with which method and settings
    layers: {layer name: {method, shape [R, C], meta, proxy_loss, stored_bytes, bits_per_weight,
             tensors: {tensor name: {file, key, dtype, shape}}}}
    dense:  {state_dict key: {file, key, dtype, shape, source_dtype}}
    tied:   {state_dict key: key of the dense entry it shares its tensor with}
    tied_embeddings: bool
    files:  {file name: {sha256, bytes}}      every other file of the checkpoint
    tokenizer: {files: [...]} | null,  report: "report.json" | null
    stats:  {quantized_layers, quantized_weights, quantized_bytes, bits_per_weight,
             dense_tensors, dense_weights, dense_bytes, total_bytes, file_bytes}

A rotated checkpoint is written as format_version 2 so that a reader from before
rotations refuses it instead of building the model without its online transforms; an
unrotated one stays version 1 (byte-identical to before). A checkpoint with activation
quantization is version 3, so that an older reader refuses it instead of running it
with float activations. A recorded rotation that cannot be rebuilt (unknown kind or
size, a seed or digest that does not reproduce the recorded rotation) fails the load
with `CheckpointRotationError`; a recorded activation quantization that cannot be
rebuilt with `CheckpointActQuantError`.

``bits_per_weight`` is measured: the stored bytes of all quantized arrays x 8 over the
number of quantized weights. The order of the codes inside each stream is the method's
(``meta``, e.g. ``code_order``). Nothing is pickled and nothing in a checkpoint is ever
executed: safetensors + JSON only, architectures come from transformers itself (no
remote code). Saving is atomic (a temporary sibling directory renamed into place) and
deterministic (the same model and payloads give the same bytes: sorted keys, fixed
safetensors metadata, no timestamps).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import re
import secrets
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from pvq.models.loading import sha256_file
from pvq.models.adapters import UnsupportedArchitectureError
from pvq.quant import QuantizedTensor, get_method
from pvq.quant.activations import ActQuantError, ActQuantizer, act_quant_of, install_act_quant_record
from pvq.rotation import OnlineHadamard, RotationError, install_rotation, rotation_of

from .errors import (
    CheckpointActQuantError,
    CheckpointError,
    CheckpointIntegrityError,
    CheckpointRotationError,
    CheckpointVersionError,
)
from .modules import MODES, PVQLinear, dequantize_layer

__all__ = [
    "DENSE_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "is_checkpoint",
    "load_checkpoint",
    "load_quantized",
    "read_manifest",
    "save_checkpoint",
    "verify_checkpoint",
]

FORMAT = "pvq-checkpoint"
FORMAT_VERSION = 3  # the newest version written and read (see the module docstring)
BASE_FORMAT_VERSION = 1
ROTATION_FORMAT_VERSION = 2
ACT_QUANT_FORMAT_VERSION = 3
MANIFEST_FILE = "manifest.json"
DENSE_FILE = "dense.safetensors"
REPORT_FILE = "report.json"
EXTRA_BLOCK_FILE = "quantized-extra.safetensors"
# One key only: safetensors writes its metadata map in hash order, so two keys would come
# out in a different order from save to save and break byte-identical checkpoints.
# The safetensors files themselves did not change with version 2: their tag stays /1.
_SAFETENSORS_METADATA = {"format": f"{FORMAT}/{BASE_FORMAT_VERSION}"}
_FP16_MAX = float(torch.finfo(torch.float16).max)
_NUMPY_DTYPES = {
    "float64", "float32", "float16", "int64", "uint64", "int32", "uint32", "int16", "uint16", "int8", "uint8", "bool",
}
_TORCH_DTYPES = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
_DENSE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# =========================================================================== helpers


def _sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _jsonable(obj: Any, where: str, *, strict: bool) -> Any:
    """A JSON-ready copy of obj: numpy scalars/arrays to Python, tuples to lists.

    strict: non-finite floats raise (layer meta must round-trip exactly); otherwise they
    become the strings "nan" / "inf" / "-inf".
    """
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{where}: keys must be strings, got {k!r}")
            out[k] = _jsonable(v, f"{where}.{k}", strict=strict)
        return out
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]", strict=strict) for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist(), where, strict=strict)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, (Path, PurePosixPath)):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return _torch_dtype_name(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        if strict:
            raise CheckpointError(f"{where}: non-finite value {obj!r} cannot be stored")
        return str(obj)
    raise CheckpointError(f"{where}: value of type {type(obj).__name__} is not JSON-serialisable")


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2, allow_nan=False, ensure_ascii=False) + "\n").encode("utf-8")


def _check_relative_name(name: str, what: str) -> None:
    p = PurePosixPath(name)
    if not name or "\\" in name or p.is_absolute() or any(part in ("", ".", "..") for part in name.split("/")):
        raise CheckpointError(f"{what} {name!r} is not a plain relative file name inside the checkpoint")


def _block_file(layer: str) -> str:
    """File of a quantized layer: its first numeric name component is its decoder block."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", layer)
    return f"blocks-{int(m.group(1)):03d}.safetensors" if m else EXTRA_BLOCK_FILE


def _identity(t: torch.Tensor) -> tuple:
    """Key under which tensors that are the same storage view compare equal (tied weights)."""
    if t.device.type == "meta" or t.numel() == 0:
        return ("object", id(t))
    return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _dense_tensor(name: str, value: torch.Tensor, dense_dtype: torch.dtype) -> torch.Tensor:
    """The tensor to store for a dense entry: floats in dense_dtype (float16 falls back to
    bfloat16 where a finite value would overflow; a bfloat16 source stays bfloat16, which
    float16 could not hold losslessly), everything else unchanged."""
    if value.device.type == "meta":
        raise CheckpointError(f"tensor {name!r} is on the meta device (has no value) and cannot be saved")
    t = value.detach().to("cpu")
    if not t.is_floating_point():
        return t.contiguous().clone()
    if dense_dtype == torch.float16:
        if t.dtype == torch.bfloat16:
            return t.contiguous().clone()
        finite = torch.isfinite(t)
        if bool((t[finite].abs() > _FP16_MAX).any()):
            return t.to(torch.bfloat16).contiguous()
    return t.to(dense_dtype).contiguous()


def _write_file(root: Path, name: str, data: bytes) -> dict[str, Any]:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": _sha256_bytes(data), "bytes": len(data)}


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory holding a pvq checkpoint manifest."""
    manifest = Path(path) / MANIFEST_FILE
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


# =========================================================================== save


def _collect_quantized(model: torch.nn.Module, quantized: dict[str, QuantizedTensor] | None) -> dict[str, QuantizedTensor]:
    out = dict(quantized or {})
    for name, module in model.named_modules():
        if isinstance(module, PVQLinear) and name not in out:
            out[name] = module.quantized_tensor()
    return out


def _check_layer(model: torch.nn.Module, name: str, qt: QuantizedTensor) -> None:
    if not isinstance(qt, QuantizedTensor):
        raise CheckpointError(f"quantized[{name!r}] is a {type(qt).__name__}, not a QuantizedTensor")
    try:
        module = model.get_submodule(name)
    except AttributeError:
        hint = " (give the module name, without '.weight')" if name.endswith(".weight") else ""
        raise CheckpointError(f"quantized layer {name!r} is not a module of the model{hint}") from None
    if isinstance(module, PVQLinear):
        out_f, in_f = module.out_features, module.in_features
    elif isinstance(module, torch.nn.Linear):
        out_f, in_f = module.out_features, module.in_features
    else:
        raise CheckpointError(f"quantized layer {name!r} is a {type(module).__name__}, not a torch.nn.Linear")
    shape = tuple(int(s) for s in qt.shape)
    if shape != (out_f, in_f):
        raise CheckpointError(f"quantized layer {name!r} has shape {shape}, the model's linear is {(out_f, in_f)}")
    get_method(qt.method)  # unknown method -> QuantizationError naming the known ones
    if not qt.tensors:
        raise CheckpointError(f"quantized layer {name!r} stores no tensors")
    for tname, arr in qt.tensors.items():
        if not isinstance(tname, str) or not tname or "/" in tname:
            raise CheckpointError(f"quantized layer {name!r}: bad tensor name {tname!r}")
        if not isinstance(arr, np.ndarray):
            raise CheckpointError(f"quantized layer {name!r}: tensor {tname!r} is a {type(arr).__name__}, not a numpy array")
        if arr.dtype.name not in _NUMPY_DTYPES:
            raise CheckpointError(f"quantized layer {name!r}: tensor {tname!r} has dtype {arr.dtype}, which cannot be stored")


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    quantized: dict[str, QuantizedTensor] | None = None,
    *,
    tokenizer: Any = None,
    source: dict | None = None,
    settings: dict | None = None,
    report: dict | None = None,
    overwrite: bool = False,
    dense_dtype: str = "float16",
    rotation: dict | None = None,
    act_quant: dict | None = None,
) -> dict[str, Any]:
    """Write `model` with the linears named in `quantized` stored packed; returns the manifest.

    `quantized` maps module names (``model.layers.0.self_attn.q_proj``) to their
    `QuantizedTensor`; `PVQLinear` modules already in the model are stored as well. The
    weights of those linears in `model` are never read; every other entry of the
    model's state_dict is stored dense (`dense_dtype`: float16 by default, bfloat16 for
    tensors float16 cannot hold, or "bfloat16" / "float32").

    The directory is assembled next to `path` and renamed into place at the end. An
    existing checkpoint at `path` is replaced only with ``overwrite=True``; any other
    non-empty directory or a file at `path` is refused.

    `rotation`: the model's rotation record; by default the one `pvq.rotation.rotate_model`
    attached to the model (None for an unrotated model).

    `act_quant`: the model's activation-quantization record; by default the one
    `pvq.quant.activations.install_act_quant` attached to the model (None: float activations).
    """
    path = Path(path)
    if dense_dtype not in _DENSE_DTYPES:
        raise CheckpointError(f"dense_dtype must be one of {sorted(_DENSE_DTYPES)}, got {dense_dtype!r}")
    replace_existing = _check_destination(path, overwrite)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise CheckpointError("model has no transformers config (model.config); cannot record its architecture")

    if rotation is None:
        rotation = rotation_of(model)
    if rotation is None and any(isinstance(m, OnlineHadamard) for m in model.modules()):
        raise CheckpointError("the model has online Hadamard transforms but no rotation record; it cannot be rebuilt on load")
    rotation = _jsonable(rotation, "rotation", strict=True) if rotation is not None else None
    if act_quant is None:
        act_quant = act_quant_of(model)
    if act_quant is None and any(isinstance(m, ActQuantizer) for m in model.modules()):
        raise CheckpointError("the model has activation quantizers but no activation quantization record; it cannot be rebuilt on load")
    act_quant = _jsonable(act_quant, "act_quant", strict=True) if act_quant is not None else None

    layers_qt = _collect_quantized(model, quantized)
    for name in sorted(layers_qt):
        _check_layer(model, name, layers_qt[name])

    # ---- dense tensors: the state_dict minus quantized weights, tied tensors once
    state = model.state_dict(keep_vars=True)
    quantized_keys = {f"{name}.weight" for name in layers_qt}
    groups: dict[tuple, list[str]] = {}
    for key, value in state.items():
        groups.setdefault(_identity(value), []).append(key)
    tied: dict[str, str] = {}
    canonical_keys: list[str] = []
    for keys in groups.values():
        stored_q = [k for k in keys if k in quantized_keys]
        if stored_q and len(keys) > 1:
            others = [k for k in keys if k not in stored_q]
            raise CheckpointError(
                f"quantized weight {stored_q[0]!r} is tied to {', '.join(repr(k) for k in keys if k != stored_q[0])}; "
                "quantizing a tied weight is not supported" + (f" (untie {others[0]!r} first)" if others else "")
            )
        if stored_q:
            continue
        canonical_keys.append(keys[0])
        for alias in keys[1:]:
            tied[alias] = keys[0]
    dense_tensors: dict[str, torch.Tensor] = {}
    dense_entries: dict[str, dict[str, Any]] = {}
    for key in canonical_keys:
        value = state[key]
        t = _dense_tensor(key, value, _DENSE_DTYPES[dense_dtype])
        dense_tensors[key] = t
        dense_entries[key] = {
            "file": DENSE_FILE,
            "key": key,
            "dtype": _torch_dtype_name(t.dtype),
            "shape": list(t.shape),
            "source_dtype": _torch_dtype_name(value.dtype),
        }
    tied_embeddings = _embeddings_tied(model)

    # ---- quantized payloads, one file per decoder block
    files_payload: dict[str, dict[str, np.ndarray]] = {}
    layer_entries: dict[str, dict[str, Any]] = {}
    q_weights = q_bytes = 0
    for name in sorted(layers_qt):
        qt = layers_qt[name]
        fname = _block_file(name)
        payload = files_payload.setdefault(fname, {})
        tensors = {}
        for tname in sorted(qt.tensors):
            arr = np.ascontiguousarray(qt.tensors[tname])
            key = f"{name}.{tname}"
            if key in payload:
                raise CheckpointError(f"two quantized tensors map to the same key {key!r}")
            payload[key] = arr
            tensors[tname] = {"file": fname, "key": key, "dtype": arr.dtype.name, "shape": list(arr.shape)}
        R, C = (int(s) for s in qt.shape)
        proxy = None if qt.proxy_loss is None or not math.isfinite(float(qt.proxy_loss)) else float(qt.proxy_loss)
        layer_entries[name] = {
            "method": qt.method,
            "shape": [R, C],
            "meta": _jsonable(qt.meta, f"layer {name!r} meta", strict=True),
            "tensors": tensors,
            "proxy_loss": proxy,
            "stored_bytes": qt.stored_bytes,
            "bits_per_weight": qt.bits_per_weight,
        }
        q_weights += R * C
        q_bytes += qt.stored_bytes

    from safetensors.numpy import save as np_save
    from safetensors.torch import save as torch_save

    blobs: dict[str, bytes] = {}
    for fname in sorted(files_payload):
        blobs[fname] = np_save(dict(sorted(files_payload[fname].items())), metadata=_SAFETENSORS_METADATA)
    blobs[DENSE_FILE] = torch_save(dict(sorted(dense_tensors.items())), metadata=_SAFETENSORS_METADATA)
    if report is not None:
        blobs[REPORT_FILE] = _dumps(_jsonable(report, "report", strict=False))

    dense_bytes = int(sum(t.numel() * t.element_size() for t in dense_tensors.values()))
    import pvq

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": (ACT_QUANT_FORMAT_VERSION if act_quant is not None
                           else ROTATION_FORMAT_VERSION if rotation is not None else BASE_FORMAT_VERSION),
        "pvq_version": pvq.__version__,
        "created_by": f"pvq {pvq.__version__} (pvq.formats.save_checkpoint)",
        "model_type": getattr(config, "model_type", None),
        "config": json.loads(config.to_json_string(use_diff=False)),
        "source": _jsonable(source or {}, "source", strict=False),
        "settings": _jsonable(settings or {}, "settings", strict=False),
        "layers": layer_entries,
        "dense": dense_entries,
        "tied": dict(sorted(tied.items())),
        "tied_embeddings": tied_embeddings,
        "report": REPORT_FILE if report is not None else None,
        "tokenizer": None,
        "stats": {
            "quantized_layers": len(layer_entries),
            "quantized_weights": q_weights,
            "quantized_bytes": q_bytes,
            "bits_per_weight": (q_bytes * 8 / q_weights) if q_weights else None,
            "dense_tensors": len(dense_entries),
            "dense_weights": int(sum(t.numel() for t in dense_tensors.values())),
            "dense_bytes": dense_bytes,
            "total_bytes": q_bytes + dense_bytes,
        },
    }
    if rotation is not None:  # absent (not null) when unrotated: version 1 manifests are unchanged
        manifest["rotation"] = rotation
    if act_quant is not None:  # likewise absent for float activations
        manifest["act_quant"] = act_quant
    if not manifest["model_type"]:
        raise CheckpointError("model.config has no model_type; cannot record the architecture")

    # ---- write into a temporary sibling, then rename into place
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        files: dict[str, dict[str, Any]] = {}
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
            tok_files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
            clash = [f for f in tok_files if f in blobs or f == MANIFEST_FILE]
            if clash:
                raise CheckpointError(f"tokenizer.save_pretrained wrote {clash}, which collide with checkpoint files")
            for f in tok_files:
                files[f] = {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size}
            manifest["tokenizer"] = {"files": tok_files}
        for fname in sorted(blobs):
            files[fname] = _write_file(tmp, fname, blobs[fname])
        manifest["files"] = dict(sorted(files.items()))
        manifest["stats"]["file_bytes"] = int(sum(f["bytes"] for f in files.values()))
        _write_file(tmp, MANIFEST_FILE, _dumps(manifest))
        _fsync_dir(tmp)
        _move_into_place(tmp, path, replace_existing)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(path.parent)
    return manifest


def _embeddings_tied(model: torch.nn.Module) -> bool:
    try:
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    w_in, w_out = getattr(inp, "weight", None), getattr(out, "weight", None)
    return isinstance(w_in, torch.Tensor) and isinstance(w_out, torch.Tensor) and _identity(w_in) == _identity(w_out)


def _check_destination(path: Path, overwrite: bool) -> bool:
    """True when an existing checkpoint at `path` is to be replaced."""
    if not path.exists() and not path.is_symlink():
        return False
    if not path.is_dir() or path.is_symlink():
        raise CheckpointError(f"{path} exists and is not a directory; refusing to overwrite it")
    if not any(path.iterdir()):
        return True
    if not is_checkpoint(path):
        raise CheckpointError(f"{path} is a non-empty directory that is not a pvq checkpoint; refusing to overwrite it")
    if not overwrite:
        raise FileExistsError(f"{path} already holds a pvq checkpoint; pass overwrite=True to replace it")
    return True


def _move_into_place(tmp: Path, path: Path, replace_existing: bool) -> None:
    if not replace_existing:
        os.replace(tmp, path)  # fails if something appeared at `path` meanwhile
        return
    old = path.parent / f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


# =========================================================================== read + verify


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise CheckpointError(f"invalid manifest: {msg}")


def _check_tensor_entry(entry: Any, where: str, files: dict) -> None:
    _require(isinstance(entry, dict), f"{where} is not an object")
    for field in ("file", "key", "dtype", "shape"):
        _require(field in entry, f"{where} lacks {field!r}")
    _require(isinstance(entry["file"], str) and entry["file"] in files, f"{where} names file {entry.get('file')!r}, which is not in 'files'")
    _require(isinstance(entry["key"], str), f"{where} key is not a string")
    _require(entry["dtype"] in _TORCH_DTYPES or entry["dtype"] in _NUMPY_DTYPES, f"{where} has unknown dtype {entry['dtype']!r}")
    _require(
        isinstance(entry["shape"], list) and all(isinstance(s, int) and s >= 0 for s in entry["shape"]),
        f"{where} shape {entry['shape']!r} is not a list of sizes",
    )


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and validate ``manifest.json`` of the checkpoint at `path` (files are not read)."""
    root = Path(path)
    mpath = root / MANIFEST_FILE
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory (a pvq checkpoint is a directory)")
    if not mpath.is_file():
        raise CheckpointIntegrityError(f"{root} has no {MANIFEST_FILE}; it is not a pvq checkpoint")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointIntegrityError(f"{mpath} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointVersionError(f"{mpath}: format {fmt!r} is not {FORMAT!r}")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointVersionError(f"{mpath}: format_version {version!r} is not a valid version")
    if version > FORMAT_VERSION:
        raise CheckpointVersionError(
            f"{mpath}: format_version {version} is newer than this pvq ({FORMAT_VERSION} at most); upgrade pvq to read it"
        )
    for field, kind in (("config", dict), ("layers", dict), ("dense", dict), ("files", dict), ("model_type", str)):
        _require(isinstance(manifest.get(field), kind), f"{field!r} missing or not a {kind.__name__}")
    files = manifest["files"]
    for fname, info in files.items():
        _check_relative_name(fname, "file")
        _require(
            isinstance(info, dict) and isinstance(info.get("sha256"), str) and isinstance(info.get("bytes"), int),
            f"files[{fname!r}] needs sha256 and bytes",
        )
    for name, layer in manifest["layers"].items():
        where = f"layer {name!r}"
        _require(isinstance(layer, dict), f"{where} is not an object")
        for field in ("method", "shape", "meta", "tensors"):
            _require(field in layer, f"{where} lacks {field!r}")
        _require(
            isinstance(layer["shape"], list) and len(layer["shape"]) == 2 and all(isinstance(s, int) and s > 0 for s in layer["shape"]),
            f"{where} shape {layer['shape']!r} is not [rows, columns]",
        )
        _require(isinstance(layer["meta"], dict), f"{where} meta is not an object")
        _require(isinstance(layer["tensors"], dict) and layer["tensors"], f"{where} lists no tensors")
        for tname, entry in layer["tensors"].items():
            _check_tensor_entry(entry, f"{where} tensor {tname!r}", files)
    for key, entry in manifest["dense"].items():
        _check_tensor_entry(entry, f"dense tensor {key!r}", files)
    tied = manifest.get("tied") or {}
    _require(isinstance(tied, dict), "'tied' is not an object")
    for alias, target in tied.items():
        _require(target in manifest["dense"], f"tied {alias!r} -> {target!r}, which is not a dense entry")
        _require(alias not in manifest["dense"], f"tied {alias!r} is also a dense entry")
    _require(manifest.get("rotation") is None or isinstance(manifest["rotation"], dict), "'rotation' is not an object or null")
    if manifest.get("rotation") is not None and version < 2:
        raise CheckpointVersionError(f"{mpath}: a rotated model needs format_version 2, the manifest says {version}")
    _require(manifest.get("act_quant") is None or isinstance(manifest["act_quant"], dict), "'act_quant' is not an object or null")
    if manifest.get("act_quant") is not None and version < ACT_QUANT_FORMAT_VERSION:
        raise CheckpointVersionError(
            f"{mpath}: activation quantization needs format_version {ACT_QUANT_FORMAT_VERSION}, the manifest says {version}"
        )
    tok = manifest.get("tokenizer")
    if tok is not None:
        _require(isinstance(tok, dict) and isinstance(tok.get("files"), list), "'tokenizer' must hold a list of files")
        for f in tok["files"]:
            _require(f in files, f"tokenizer file {f!r} is not in 'files'")
    if manifest.get("report") is not None:
        _require(manifest["report"] in files, f"report {manifest['report']!r} is not in 'files'")
    return manifest


def _check_present(root: Path, manifest: dict) -> None:
    """Every listed file exists with its recorded size (fast: no hashing)."""
    for fname, info in manifest["files"].items():
        p = root / fname
        if not p.is_file():
            raise CheckpointIntegrityError(f"checkpoint file {fname!r} is missing from {root}")
        size = p.stat().st_size
        if size != info["bytes"]:
            raise CheckpointIntegrityError(
                f"checkpoint file {fname!r} has {size} bytes, the manifest records {info['bytes']} (truncated or altered)"
            )


def _check_digest(fname: str, digest: str, info: dict) -> None:
    if digest != info["sha256"]:
        raise CheckpointIntegrityError(
            f"checkpoint file {fname!r} fails its checksum: sha256 {digest}, the manifest records {info['sha256']} (corrupted)"
        )


def _read_verified(root: Path, fname: str, manifest: dict) -> bytes:
    """The bytes of a listed file, checked against its recorded size and sha256."""
    info = manifest["files"][fname]
    try:
        data = (root / fname).read_bytes()
    except FileNotFoundError:
        raise CheckpointIntegrityError(f"checkpoint file {fname!r} is missing from {root}") from None
    if len(data) != info["bytes"]:
        raise CheckpointIntegrityError(
            f"checkpoint file {fname!r} has {len(data)} bytes, the manifest records {info['bytes']} (truncated or altered)"
        )
    _check_digest(fname, _sha256_bytes(data), info)
    return data


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Validate the manifest and every file's size and sha256; returns the manifest."""
    root = Path(path)
    manifest = read_manifest(root)
    _check_present(root, manifest)
    for fname, info in manifest["files"].items():
        _check_digest(fname, sha256_file(root / fname), info)
    return manifest


def _parse_safetensors(fname: str, data: bytes, framework: str) -> dict:
    try:
        if framework == "np":
            from safetensors.numpy import load
        else:
            from safetensors.torch import load
        return load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointIntegrityError(f"checkpoint file {fname!r} is not a readable safetensors file: {e}") from None


def _dtype_name(value: np.ndarray | torch.Tensor) -> str:
    return _torch_dtype_name(value.dtype) if isinstance(value, torch.Tensor) else value.dtype.name


def _take(stored: dict, fname: str, entry: dict, where: str):
    key = entry["key"]
    if key not in stored:
        raise CheckpointError(f"{where}: key {key!r} is not in {fname!r}")
    value = stored[key]
    if list(value.shape) != list(entry["shape"]):
        raise CheckpointError(
            f"{where}: shape mismatch, the manifest records {list(entry['shape'])} but {fname!r} holds {list(value.shape)} under {key!r}"
        )
    if _dtype_name(value) != entry["dtype"]:
        raise CheckpointError(
            f"{where}: dtype mismatch, the manifest records {entry['dtype']} but {fname!r} holds {_dtype_name(value)} under {key!r}"
        )
    return value


def _load_files(root: Path, manifest: dict, entries: list[tuple[Any, str, dict]], framework: str) -> dict[Any, Any]:
    """Values of (id, label for errors, tensor entry) triples, by id; every file read is
    verified and must hold exactly the keys the manifest lists for it."""
    by_file: dict[str, list[tuple[Any, str, dict]]] = {}
    for ident, label, entry in entries:
        by_file.setdefault(entry["file"], []).append((ident, label, entry))
    out: dict[str, Any] = {}
    for fname in sorted(by_file):
        stored = _parse_safetensors(fname, _read_verified(root, fname, manifest), framework)
        listed = {e["key"] for _, _, e in by_file[fname]}
        unlisted = sorted(set(stored) - listed)
        if unlisted:
            raise CheckpointError(f"{fname!r} holds tensors the manifest does not list: {unlisted[:8]}")
        for ident, label, entry in by_file[fname]:
            out[ident] = _take(stored, fname, entry, label)
    return out


def _layer_qts(root: Path, manifest: dict) -> dict[str, QuantizedTensor]:
    entries = [
        ((name, tname), f"layer {name!r} tensor {tname!r}", entry)
        for name, layer in manifest["layers"].items()
        for tname, entry in layer["tensors"].items()
    ]
    dense_files = {e["file"] for e in manifest["dense"].values()}
    clash = dense_files & {e["file"] for _, _, e in entries}
    if clash:
        raise CheckpointError(f"invalid manifest: files {sorted(clash)} hold both quantized and dense tensors")
    values = _load_files(root, manifest, entries, "np")
    out = {}
    for name in sorted(manifest["layers"]):
        layer = manifest["layers"][name]
        tensors = {}
        for tname in sorted(layer["tensors"]):
            arr = values[(name, tname)]
            tensors[tname] = arr if arr.flags.writeable else arr.copy()
        out[name] = QuantizedTensor(
            method=layer["method"],
            shape=(int(layer["shape"][0]), int(layer["shape"][1])),
            tensors=tensors,
            meta=copy.deepcopy(layer["meta"]),
            proxy_loss=layer.get("proxy_loss"),
        )
    return out


def load_quantized(path: str | os.PathLike) -> dict[str, QuantizedTensor]:
    """The checkpoint's quantized layers as `QuantizedTensor`s (verified, not decoded)."""
    root = Path(path)
    manifest = read_manifest(root)
    _check_present(root, manifest)
    return _layer_qts(root, manifest)


# =========================================================================== load


def _build_model(manifest: dict, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = manifest["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(
            f"model_type {model_type!r} is not an architecture of the installed transformers; "
            "checkpoints never load remote code"
        )
    config_dict = {k: v for k, v in manifest["config"].items() if k != "auto_map"}
    config = CONFIG_MAPPING[model_type].from_dict(config_dict)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            no_init_weights = contextlib.nullcontext
    # Skipping random initialisation is only a speed-up: every tensor gets its stored
    # value below, and a tensor that does not is an error.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    return model


def _set_tensor(model: torch.nn.Module, key: str, value: torch.Tensor | torch.nn.Parameter) -> None:
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr in owner._parameters:
        owner._parameters[attr] = value
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:  # pragma: no cover - keys come from the model's own state_dict
        raise CheckpointError(f"model has no parameter or buffer {key!r}")


def load_checkpoint(
    path: str | os.PathLike,
    mode: str = "load",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    load_tokenizer: bool = True,
    check_decode: bool = True,
    act_quant: bool = True,
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Rebuild the model stored at `path`: returns (model in eval mode, tokenizer or None, manifest).

    mode: ``"load"`` dequantizes every quantized linear once; ``"fly"`` keeps only the
    packed arrays and decodes on every forward (`check_decode`: decode each layer once
    while loading anyway, so that a corrupt payload fails here and not mid-generation).
    Every file is checked against its recorded size and sha256 before use; the
    architecture comes from the installed transformers (``from_config``, offline, no
    remote code); every parameter and buffer of the rebuilt model must receive a
    stored value. A recorded activation quantization is rebuilt (simulated quantization of
    the linears' inputs in the forward pass); `act_quant=False` leaves it out (float
    activations, e.g. to measure the weights alone).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    root = Path(path)
    manifest = read_manifest(root)
    _check_present(root, manifest)

    qts = _layer_qts(root, manifest)
    dense = _load_files(root, manifest, [(key, f"dense tensor {key!r}", e) for key, e in manifest["dense"].items()], "pt")

    model = _build_model(manifest, dtype)
    # ---- rotation: the online transforms (the stored weights are already rotated)
    if manifest.get("rotation") is not None:
        try:
            install_rotation(model, manifest["rotation"])
        except (RotationError, UnsupportedArchitectureError) as e:
            raise CheckpointRotationError(f"checkpoint {root}: the recorded rotation cannot be rebuilt: {e}") from e
    # ---- quantized linears -> PVQLinear
    for name, qt in qts.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"layer {name!r} of the checkpoint is not a module of the rebuilt {manifest['model_type']} model") from None
        if not isinstance(module, torch.nn.Linear):
            raise CheckpointError(f"layer {name!r} is a {type(module).__name__} in the rebuilt model, not a torch.nn.Linear")
        if (module.out_features, module.in_features) != tuple(qt.shape):
            raise CheckpointError(
                f"layer {name!r}: stored shape {tuple(qt.shape)}, the rebuilt model's linear is {(module.out_features, module.in_features)}"
            )
        # A bias is a dense entry ("<layer>.bias"); the placeholder is replaced below.
        bias = torch.empty(module.out_features, dtype=dtype) if module.bias is not None else None
        decoded = dequantize_layer(qt, name) if (mode == "load" or check_decode) else None
        new = PVQLinear(qt, bias=bias, mode=mode, dtype=dtype, name=name, decoded=decoded if mode == "load" else None)
        del decoded
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    # ---- activation quantizers (no state of their own)
    if act_quant and manifest.get("act_quant") is not None:
        try:
            install_act_quant_record(model, manifest["act_quant"])
        except ActQuantError as e:
            raise CheckpointActQuantError(f"checkpoint {root}: the recorded activation quantization cannot be rebuilt: {e}") from e

    # ---- dense tensors (tied ones share one tensor), every key covered
    tied = manifest.get("tied") or {}
    expected = model.state_dict(keep_vars=True)
    provided = set(dense) | set(tied)
    missing = sorted(set(expected) - provided)
    if missing:
        raise CheckpointError(
            f"the checkpoint has no value for {len(missing)} tensor(s) of the rebuilt model: {missing[:12]}"
            + (" ..." if len(missing) > 12 else "")
        )
    unexpected = sorted(provided - set(expected))
    if unexpected:
        raise CheckpointError(f"the checkpoint stores tensors the rebuilt model does not have: {unexpected[:12]}")
    assigned: dict[str, torch.Tensor] = {}
    for key in sorted(dense):
        old = expected[key]
        value = dense[key]
        if list(value.shape) != list(old.shape):
            raise CheckpointError(f"dense tensor {key!r}: stored shape {list(value.shape)}, the rebuilt model has {list(old.shape)}")
        value = value.to(dtype) if value.is_floating_point() else value.to(old.dtype)
        if isinstance(old, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=old.requires_grad)
        assigned[key] = value
        _set_tensor(model, key, value)
    for alias, target in sorted(tied.items()):
        _set_tensor(model, alias, assigned[target])
    # Sharing in the rebuilt model must be exactly the recorded one.
    final = model.state_dict(keep_vars=True)
    owner = {key: tied.get(key, key) for key in final}
    seen: dict[tuple, str] = {}
    for key, value in final.items():
        ident = _identity(value)
        if ident in seen and owner[seen[ident]] != owner[key]:
            raise CheckpointError(f"the rebuilt model shares {seen[ident]!r} and {key!r}, which the checkpoint stores separately")
        seen.setdefault(ident, key)
    if bool(manifest.get("tied_embeddings")) != _embeddings_tied(model):
        raise CheckpointError(
            f"tied_embeddings is {manifest.get('tied_embeddings')} in the manifest but the rebuilt model's embeddings "
            f"are {'tied' if _embeddings_tied(model) else 'untied'}"
        )

    model.to(device)
    model.eval()
    tokenizer = None
    if load_tokenizer and manifest.get("tokenizer"):
        tokenizer = _load_tokenizer(root, manifest)
    return model, tokenizer, manifest


def _load_tokenizer(root: Path, manifest: dict) -> Any:
    files = manifest["files"]
    for fname in manifest["tokenizer"]["files"]:
        _check_digest(fname, sha256_file(root / fname), files[fname])
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(root), local_files_only=True, trust_remote_code=False)
