"""The checkpoints of pvq 0.1 (format versions 1-3): read once, to convert them.

`convert_legacy(old, new)` (``pvq convert OLD NEW``) reads such a directory with every
check it always had (manifest, sizes, sha256, shapes, dtypes) and writes the same model
as a format-4 Hugging Face directory (`pvq.checkpoint.store`): the payloads are copied
bit for bit after checking that each layer's stored settings are the ones its recorded
method config gives for its shape. `pvq.load` refuses a legacy directory with a message
naming that command. What follows is the old layout, for reference.

Packed checkpoints: a directory of safetensors files and one JSON manifest.

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
             `pvq.activations` (kind "simulated-activation-quantization", the
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

Over 500 lines because it is a whole reader of a retired format (manifest, checks, tensors,
model building) kept in one module so that it can be removed in one piece.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from pvq.fileio import sha256_file
from pvq.methods import QuantizationError, QuantizedTensor

from pvq.checkpoint.index import _regular_file
from pvq.runtime.errors import (
    CheckpointActQuantError,
    CheckpointError,
    CheckpointIntegrityError,
    CheckpointRotationError,
    CheckpointVersionError,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST_FILE", "convert_legacy", "load_quantized", "read_manifest"]

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






def _check_relative_name(name: str, what: str) -> None:
    p = PurePosixPath(name)
    if not name or "\\" in name or p.is_absolute() or any(part in ("", ".", "..") for part in name.split("/")):
        raise CheckpointError(f"{what} {name!r} is not a plain relative file name inside the checkpoint")




def _identity(t: torch.Tensor) -> tuple:
    """Key under which tensors that are the same storage view compare equal (tied weights)."""
    if t.device.type == "meta" or t.numel() == 0:
        return ("object", id(t))
    return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
















def _embeddings_tied(model: torch.nn.Module) -> bool:
    try:
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    w_in, w_out = getattr(inp, "weight", None), getattr(out, "weight", None)
    return isinstance(w_in, torch.Tensor) and isinstance(w_out, torch.Tensor) and _identity(w_in) == _identity(w_out)






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
        p = _regular_file(root, fname)  # no symbolic link followed out of the directory
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
    data = _regular_file(root, fname).read_bytes()
    if len(data) != info["bytes"]:
        raise CheckpointIntegrityError(
            f"checkpoint file {fname!r} has {len(data)} bytes, the manifest records {info['bytes']} (truncated or altered)"
        )
    _check_digest(fname, _sha256_bytes(data), info)
    return data




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

    from pvq.checkpoint.load_checks import check_model_config

    model_type = manifest["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(
            f"model_type {model_type!r} is not an architecture of the installed transformers; "
            "checkpoints never load remote code"
        )
    config = check_model_config({**manifest["config"], "model_type": model_type}, "the manifest's config")
    # every tensor the config asks for must have its stored shape, checked on a skeleton
    # (no memory) before the float model is allocated
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    stored = {**{f"{k}.weight": e.get("shape") for k, e in manifest["layers"].items()},
              **{k: e.get("shape") for k, e in manifest["dense"].items()}}
    for key, tensor in skeleton.state_dict().items():
        if key in stored and list(tensor.shape) != list(stored[key]):
            raise CheckpointError(f"the manifest's config gives {key} the shape {list(tensor.shape)}, "
                                  f"the stored tensor is {stored[key]}")
    del skeleton
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




def _load_tokenizer_listed(root: Path, manifest: dict) -> Any:
    """The tokenizer from the files the manifest lists only (verified, copied aside), so that
    an unlisted file in the directory cannot change it."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for fname in manifest["tokenizer"]["files"]:
            _check_relative_name(fname, "tokenizer file")
            dst = Path(tmp) / fname
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(_read_verified(root, fname, manifest))
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)


def _load_tokenizer(root: Path, manifest: dict) -> Any:
    files = manifest["files"]
    for fname in manifest["tokenizer"]["files"]:
        _check_digest(fname, sha256_file(root / fname), files[fname])
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(root), local_files_only=True, trust_remote_code=False)


# =========================================================================== convert


def _check_sizes(manifest: dict) -> None:
    """The recorded config's layer count and embedding shape must be those of the stored
    tensors (a config asking for a huge model fails here, not in the allocator)."""
    from pvq.checkpoint.index import stored_block_count

    config = manifest["config"]
    blocks = stored_block_count([*manifest["layers"], *manifest["dense"]], manifest["model_type"])
    if blocks is not None and config.get("num_hidden_layers") != blocks:
        raise CheckpointError(f"the manifest's config says num_hidden_layers {config.get('num_hidden_layers')!r}, "
                              f"the stored tensors hold {blocks} decoder blocks")
    emb = next((e["shape"] for k, e in manifest["dense"].items() if k.endswith("embed_tokens.weight")), None)
    want = [config.get("vocab_size"), config.get("hidden_size")]
    if emb is not None and list(emb) != want:
        raise CheckpointError(f"the manifest's config says vocab_size x hidden_size {want}, the stored embedding is {emb}")


def convert_legacy(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
) -> dict[str, Any]:
    """Rewrite the pvq 0.1 checkpoint `src` as a format-4 checkpoint at `dst`; returns its index.

    Every file of `src` is verified first. The method and config come from the
    manifest's settings; each layer's stored meta must agree with the layout they give
    for its shape (else CheckpointError naming the layer and field), and every layer must
    decode, before anything is written. The float model is built once on the host from the
    recorded config (a one-time cost of its float size)."""
    from pvq.methods import get_method
    from pvq.activations import ActQuantError, install_act_quant_record
    from pvq.rotation import RotationError, install_rotation

    from pvq.checkpoint.store import check_destination, save_checkpoint
    from pvq.checkpoint.hf import quantized_model

    root = Path(src)
    if root.resolve() == Path(dst).resolve():
        raise CheckpointError(f"pvq convert writes a new directory: NEW must differ from OLD ({root})")
    check_destination(Path(dst), overwrite)  # refused before the work (save_checkpoint checks again, and writes atomically)
    manifest = read_manifest(root)
    _check_present(root, manifest)
    settings = manifest.get("settings") or {}
    method, config = settings.get("method"), settings.get("config")
    if not manifest["layers"]:
        raise CheckpointError(f"{root} holds no quantized layer; load the float model directly instead")
    if not isinstance(method, str) or not isinstance(config, dict):
        raise CheckpointError(f"{root}: the manifest's settings do not record the method and its config; cannot convert")
    if method == "pvq" and "enumeration" not in config:
        config = {**config, "enumeration": "fischer"}  # pvq 0.1 stored Fischer codes only
    try:
        method_obj = get_method(method)
        config_obj = method_obj.make_config(config)
    except QuantizationError as e:
        raise CheckpointError(f"{root}: recorded settings: {e}") from None
    qts = _layer_qts(root, manifest)
    for name, qt in qts.items():
        if qt.method != method:
            raise CheckpointError(f"layer {name!r} was stored by {qt.method}, the settings say {method}")
        try:
            layout = method_obj.layout(config_obj, qt.shape)
        except QuantizationError as e:
            raise CheckpointError(f"layer {name!r}: {e}") from None
        for key, value in layout.items():
            if key in ("act_order", "enumeration") and key not in qt.meta:
                continue
            if qt.meta.get(key) != value:
                raise CheckpointError(
                    f"layer {name!r}: stored meta {key}={qt.meta.get(key)!r}, the recorded {method} config gives {value!r}"
                )
    _check_sizes(manifest)  # before the float model is built from the recorded config
    dense = _load_files(root, manifest, [(key, f"dense tensor {key!r}", e) for key, e in manifest["dense"].items()], "pt")
    model = _build_model(manifest, torch.float32)
    if manifest.get("rotation") is not None:
        try:
            install_rotation(model, manifest["rotation"])
        except (RotationError, ValueError) as e:
            raise CheckpointRotationError(f"checkpoint {root}: the recorded rotation cannot be rebuilt: {e}") from e
    expected = model.state_dict()
    tied = manifest.get("tied") or {}
    values = dict(dense)
    for alias, target in tied.items():
        values[alias] = dense[target]
    missing = sorted(set(expected) - set(values) - {f"{n}.weight" for n in qts})
    unexpected = sorted(set(values) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{root}: stored tensors do not match the rebuilt model (missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]})")
    with torch.no_grad():
        for key, value in values.items():
            if list(value.shape) != list(expected[key].shape):
                raise CheckpointError(f"dense tensor {key!r}: stored shape {list(value.shape)}, the model has "
                                      f"{list(expected[key].shape)}")
            expected[key].copy_(value.to(expected[key].dtype))
    quantized_model(model, qts, method, config_obj)
    from pvq.runtime.linear import QuantizedLinear

    for module in model.modules():  # a payload that does not decode is refused before anything is written
        if isinstance(module, QuantizedLinear):
            module.check_decode()
    if manifest.get("act_quant") is not None:
        try:
            install_act_quant_record(model, manifest["act_quant"])
        except ActQuantError as e:
            raise CheckpointActQuantError(f"checkpoint {root}: the recorded activation quantization cannot be rebuilt: {e}") from e
    tokenizer = _load_tokenizer_listed(root, manifest) if manifest.get("tokenizer") else None
    return save_checkpoint(model, dst, tokenizer=tokenizer, overwrite=overwrite, max_shard_size=max_shard_size,
                           report={"converted_from": str(root), "legacy_format_version": manifest["format_version"]})
