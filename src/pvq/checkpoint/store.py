"""pvq checkpoints: Hugging Face model directories, plus an integrity index.

Layout of a checkpoint directory (all but the two ``pvq_*`` files are written by
transformers' ``save_pretrained`` and read by its ``from_pretrained``)::

    config.json              the architecture; ``quantization_config`` is the
                             `PVQQuantizationConfig` (method, config, layers, overrides,
                             rotation and activation-quantization records, format version)
    generation_config.json
    model.safetensors        the state_dict: every quantized layer's payload buffers
                             ("<layer>.codes", "<layer>.scales", ...; integers), every other
                             tensor in float16 (bfloat16 where float16 would overflow);
                             or model-0000i-of-0000n.safetensors + model.safetensors.index.json
                             with ``max_shard_size``
    tokenizer files          when a tokenizer is given
    pvq_index.json           sha256 and size of every file above (`verify_checkpoint`)
    pvq_report.json          the run's report (timings, proxy losses); not in the index, so
                             everything the index covers is byte-identical across seeded runs

Nothing is pickled and nothing in a checkpoint is executed: safetensors + JSON only,
architectures come from the installed transformers (no remote code). Saving is atomic (a
temporary sibling directory, every file fsync'd, renamed into place).
"""

from __future__ import annotations


import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

from pvq.fileio import fsync_dir, fsync_file, process_alive, sha256_file
from pvq.memory import release_freed_memory

from pvq.checkpoint.index import FORMAT, FORMAT_VERSION, INDEX_FILE, LEGACY_MANIFEST, OWN_UNINDEXED, QUANT_METHOD, REPORT_FILE, _dumps, is_legacy_checkpoint, read_index, verified_by_caller, verify_checkpoint
from pvq.runtime.errors import CheckpointError
from pvq.checkpoint.hf import (    bits_per_weight,
    ready_to_save,
    register_with_transformers,
)
from pvq.runtime.embedding import QuantizedEmbedding
from pvq.runtime.linear import QuantizedLinear

__all__ = [
    "check_destination",
    "checkpoint_stats",
    "is_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "partial_path",
    "shard_size_bytes",
]


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory holding a pvq model (config.json with a pvq quantization_config,
    or a pvq integrity index: such a directory is loaded, and so checked, as a pvq checkpoint
    whatever its config.json says)."""
    config = Path(path) / "config.json"
    if (Path(path) / INDEX_FILE).is_file():
        return True
    if not config.is_file():
        return False
    try:
        qc = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError, RecursionError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def checkpoint_stats(model: torch.nn.Module) -> dict[str, Any]:
    """Measured sizes of a pvq model in memory: quantized layers, their weights and stored
    bytes, bits per weight, and the dense (float) tensors (tied ones once)."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    tables = [m for m in model.modules() if isinstance(m, QuantizedEmbedding)]  # embedding, untied head
    seen, dense_bytes, dense_values = set(), 0, 0
    payload = {id(getattr(m, t)) for m in [*layers, *tables] for t in m.payload_spec}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in payload or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        dense_bytes += t.numel() * t.element_size()
        dense_values += t.numel()
    return {
        "quantized_layers": len(layers),
        "quantized_weights": sum(m.in_features * m.out_features for m in layers),
        "quantized_bytes": sum(m.stored_bytes for m in layers),
        "quantized_embedding_bytes": sum(m.stored_bytes for m in tables),
        "bits_per_weight": bits_per_weight(model) if layers else None,
        "dense_values": dense_values,
        "dense_bytes_in_memory": dense_bytes,
    }


# =========================================================================== save


def check_destination(path: Path, overwrite: bool) -> bool:
    """True when an existing checkpoint at `path` is to be replaced. A destination that
    cannot be created (under a file, or in a folder this process may not write) is refused
    now, before the work whose result it would hold."""
    if not path.exists() and not path.is_symlink():
        ancestor = path.absolute().parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise CheckpointError(f"{path} cannot be created: {ancestor} is a file, not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise CheckpointError(f"{path} cannot be created: folder {ancestor} is not writable")
        return False
    if not path.is_dir() or path.is_symlink():
        raise CheckpointError(f"{path} exists and is not a directory; refusing to overwrite it")
    if not any(path.iterdir()):
        return True
    if not (is_checkpoint(path) or is_legacy_checkpoint(path)):
        raise CheckpointError(f"{path} is a non-empty directory that is not a pvq checkpoint; refusing to overwrite it")
    if not overwrite:
        raise CheckpointError(f"{path} already holds a pvq checkpoint; pass overwrite=True (--overwrite) to replace it")
    foreign = _foreign_files(path)
    if foreign:
        raise CheckpointError(f"{path} holds files pvq did not write ({', '.join(foreign[:5])}"
                              f"{', ...' if len(foreign) > 5 else ''}); refusing to replace it: move them first")
    return True


def _foreign_files(path: Path) -> list[str]:
    """Files in the checkpoint directory `path` that its index (or pvq 0.1 manifest) does not list."""
    listed: set[str] = {*OWN_UNINDEXED, LEGACY_MANIFEST}
    for name in (INDEX_FILE, LEGACY_MANIFEST):  # both list their files under "files"
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError, RecursionError):
            listed |= set(json.loads((path / name).read_text(encoding="utf-8")).get("files", {}))
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.relative_to(path).as_posix() not in listed)


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


def partial_path(path: Path) -> Path:
    """The sibling a save of `path` is staged in (``.NAME.partial-PID-*``: a later save of
    `path` removes it if this process is killed)."""
    return path.parent / f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"


def _remove_stale_partials(path: Path) -> None:
    """Delete what a killed save of `path` left behind (``.NAME.partial-PID-*`` and
    ``.NAME.old-PID-*`` siblings whose process no longer runs), with a warning."""
    import logging

    for p in path.parent.glob(f".{path.name}.*-*-*"):
        kind, _, rest = p.name[len(path.name) + 2:].partition("-")
        pid = rest.partition("-")[0]
        if kind not in ("partial", "old") or not pid.isdigit() or not p.is_dir() or p.is_symlink():
            continue
        if process_alive(int(pid)):
            continue  # that save is still running
        logging.getLogger(__name__).warning("removing %s, left by an interrupted save of %s", p, path)
        shutil.rmtree(p, ignore_errors=True)


def shard_size_bytes(size: int | str) -> int:
    """Bytes of a shard-size limit as transformers takes it (an int, or "500MB", "2GB", "1GiB");
    CheckpointError for anything else, so a bad value fails before the work, not at the save."""
    import re

    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), flags=re.IGNORECASE)
        if not m:
            raise CheckpointError(f"max_shard_size {size!r} is not a size such as 500MB or 2GB")
        unit = (m.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}.get(unit)
        if scale is None:
            raise CheckpointError(f"max_shard_size {size!r}: unknown unit {m.group(2)!r}")
        value = int(float(m.group(1)) * scale)
    if value < 1:
        raise CheckpointError(f"max_shard_size must be positive, got {size!r}")
    return value


def save_checkpoint(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    report: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write the pvq model `model` (see `pvq.checkpoint.quantized_model`) as a Hugging Face
    directory at `path` with its integrity index; returns the index. `extra_files`
    (name -> text, e.g. the recipe) are written beside the model and covered by the index.

    The directory is assembled next to `path` and renamed into place at the end. An
    existing checkpoint at `path` is replaced only with ``overwrite=True``; any other
    non-empty directory or a file at `path` is refused. `max_shard_size` as transformers
    takes it ("2GB", bytes); None: transformers' default.
    """
    path = Path(path)
    if max_shard_size is not None:
        shard_size_bytes(max_shard_size)
    replace_existing = check_destination(path, overwrite)
    ready_to_save(model)  # fails before any file is written (save_pretrained checks again: it may be called alone)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(path)
    tmp = partial_path(path)
    tmp.mkdir()
    try:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
        model.save_pretrained(str(tmp), **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, text in (extra_files or {}).items():
            if "/" in name or name.startswith(".") or (tmp / name).exists():
                raise CheckpointError(f"extra file {name!r}: not a plain file name, or one the model already wrote")
            (tmp / name).write_text(text, encoding="utf-8")
        names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        clash = [n for n in names if n in (INDEX_FILE, REPORT_FILE)]
        if clash:
            raise CheckpointError(f"save_pretrained wrote {clash}, which collide with pvq's own files")
        files = {}
        for name in names:
            fsync_file(tmp / name)
            files[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
        from pvq.version import __version__

        index = {"format": FORMAT, "format_version": FORMAT_VERSION, "pvq_version": __version__, "files": files}
        (tmp / INDEX_FILE).write_bytes(_dumps(index))
        fsync_file(tmp / INDEX_FILE)
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
            fsync_file(tmp / REPORT_FILE)
        fsync_dir(tmp)
        _move_into_place(tmp, path, replace_existing)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(path.parent)
    return index


# =========================================================================== verify + load


def load_checkpoint(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = torch.float32,
    device_map: Any = None,
    verify: bool = True,
    check_decode: bool = True,
    load_tokenizer: bool = True,
    layout: str = "packed",
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Load a pvq checkpoint: (model in eval mode, tokenizer or None, info).

    `verify`: check every file against the integrity index first (a directory without
    one is refused; ``verify=False`` loads it unchecked). The model comes from
    ``transformers.AutoModelForCausalLM.from_pretrained`` (offline, no remote code): only
    the packed payloads of the quantized layers are held. `check_decode`: decode each
    quantized layer once while loading, so a damaged payload fails here naming the layer
    and not in the middle of a generation. `dtype`: of the dense tensors and the compute
    ("auto" or None: the dtype config.json records); `device` or a transformers `device_map`.
    `layout`: "packed" (as stored), "int8" or "int4" (PVQ layers transcoded for speed, at
    1 + 4/D or about 0.5 + 4/D bytes per weight, their packed payload released:
    `pvq.runtime.compute_layout`), or "auto" (int4 where it holds every PVQ layer, else
    packed; info["layout"] says which).
    info: {"quantization_config", "index" (None unverified), "stats"}.
    """
    from pvq.runtime.compute_layout import LAYOUTS, apply_layout

    if layout not in LAYOUTS:
        raise CheckpointError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    root = Path(path)
    if is_legacy_checkpoint(root):
        read_index(root)  # raises the conversion message
    index = verify_checkpoint(root) if verify else None
    if not verify and not is_checkpoint(root):
        raise CheckpointError(f"{root} is not a pvq checkpoint (no pvq quantization_config in config.json)")
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    register_with_transformers()
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    kwargs["dtype"] = "auto" if dtype is None else dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    with verified_by_caller(root):  # verified above (or deliberately not): no second hashing on the way in
        model, loading = AutoModelForCausalLM.from_pretrained(str(root), output_loading_info=True, **kwargs)
    problems = {k: v for k, v in loading.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise CheckpointError(f"{root}: the stored tensors do not match the model: "
                              + "; ".join(f"{k.replace('_', ' ')}: {sorted(map(str, v))[:6]}" for k, v in problems.items()))
    if device_map is None:
        model.to(device)
    model.eval()
    stats = checkpoint_stats(model)
    layout = apply_layout(model, layout)  # a compute layout decodes (and so checks) every PVQ layer
    if check_decode:
        for module in model.modules():
            if isinstance(module, QuantizedLinear) and not module.payload_released:
                module.check_decode()
    release_freed_memory()
    tokenizer = None
    if load_tokenizer and any((root / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - damaged tokenizer files raise many types
            raise CheckpointError(f"{root}: the tokenizer files cannot be loaded: {type(e).__name__}: {e}") from None
    info = {
        "quantization_config": model.config.quantization_config.to_dict(),
        "index": index,
        "stats": stats,
        "layout": layout,
    }
    return model, tokenizer, info
