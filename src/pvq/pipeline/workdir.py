"""The resumable work directory of `quantize_model` (no pickle anywhere).

Layout (every file written to a temporary name in the same directory, then `os.replace`d,
so a crash leaves either the old or the new file, never a torn one):

    state.json                 settings, fingerprints, blocks_done (written last per block)
    block_0000.safetensors     arrays of every QuantizedTensor of block 0, keyed
                               "<layer name>/<array name>" (numpy safetensors)
    block_0000.json            per layer: method, shape, meta, proxy loss, bits per weight,
                               seconds, group; the array names
    hidden.safetensors         "hidden_states": outputs of the last finished block = the
                               inputs of the next one (n_windows, seqlen, hidden), in the
                               compute dtype; metadata after_block=<index>
"""

from __future__ import annotations

from pvq.errors import PVQError

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import save_file as torch_save_file

from pvq.quant import QuantizedTensor

STATE_FILE = "state.json"
HIDDEN_FILE = "hidden.safetensors"
FORMAT = "pvq-quantize-workdir"
VERSION = 1


class WorkDirError(PVQError, RuntimeError):
    """A work directory that cannot be resumed with the given settings."""


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = _tmp(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable (QuantizedTensor.meta must be JSON-able)")


def atomic_write_json(path: Path, obj: Any, sort_keys: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=sort_keys, default=_json_default) + "\n")


def block_paths(work_dir: Path, index: int) -> tuple[Path, Path]:
    return work_dir / f"block_{index:04d}.safetensors", work_dir / f"block_{index:04d}.json"


# -- fingerprints -------------------------------------------------------------------------------
def tensor_digest(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def module_digest(module: torch.nn.Module, skip_prefix: str | None = None) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a module's state_dict (shared
    tensors once), optionally leaving out entries under `skip_prefix`."""
    h = hashlib.sha256()
    seen: set[tuple[int, int]] = set()
    for name, t in module.state_dict().items():
        if skip_prefix is not None and (name == skip_prefix or name.startswith(skip_prefix + ".")):
            continue
        key = (t.data_ptr(), t.numel())
        if t.numel() and key in seen:
            h.update(f"{name}|shared".encode())
            continue
        seen.add(key)
        tensor_digest(h, name, t)
    return h.hexdigest()


def windows_digest(windows: torch.Tensor) -> str:
    h = hashlib.sha256()
    tensor_digest(h, "windows", windows.to(torch.int64))
    return h.hexdigest()


# -- QuantizedTensors ----------------------------------------------------------------------------
def save_block(work_dir: Path, index: int, layers: dict[str, QuantizedTensor], info: dict[str, dict]) -> None:
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    for name, qt in layers.items():
        for key, arr in qt.tensors.items():
            arr = np.asarray(arr)
            if arr.dtype == object:
                raise WorkDirError(f"{name}: array {key!r} has dtype object; QuantizedTensor arrays must be numeric")
            arrays[f"{name}/{key}"] = np.ascontiguousarray(arr)
        meta[name] = {
            "method": qt.method,
            "shape": list(qt.shape),
            "meta": qt.meta,
            "proxy_loss": qt.proxy_loss,
            "arrays": list(qt.tensors),
            **info.get(name, {}),
        }
    st_path, js_path = block_paths(work_dir, index)
    tmp = _tmp(st_path)
    np_save_file(arrays, str(tmp))
    os.replace(tmp, st_path)
    # insertion order kept (layers in quantization order, meta keys as the method wrote
    # them), so a resumed run hands downstream writers the very same dicts
    atomic_write_json(js_path, {"block": index, "layers": meta}, sort_keys=False)


def load_block(work_dir: Path, index: int) -> tuple[dict[str, QuantizedTensor], dict[str, dict]]:
    st_path, js_path = block_paths(work_dir, index)
    if not st_path.is_file() or not js_path.is_file():
        raise WorkDirError(f"work directory {work_dir} says block {index} is finished but {st_path.name} or {js_path.name} is missing")
    arrays = np_load_file(str(st_path))
    doc = json.loads(js_path.read_text(encoding="utf-8"))
    layers, info = {}, {}
    for name, m in doc["layers"].items():
        layers[name] = QuantizedTensor(
            method=m["method"],
            shape=tuple(m["shape"]),
            tensors={k: arrays[f"{name}/{k}"] for k in m["arrays"]},
            meta=m["meta"],
            proxy_loss=m["proxy_loss"],
        )
        info[name] = {k: v for k, v in m.items() if k not in ("method", "shape", "meta", "proxy_loss", "arrays")}
    return layers, info


# -- hidden states -------------------------------------------------------------------------------
def save_hidden(work_dir: Path, hidden: torch.Tensor, after_block: int) -> None:
    path = work_dir / HIDDEN_FILE
    tmp = _tmp(path)
    torch_save_file({"hidden_states": hidden.contiguous()}, str(tmp), metadata={"after_block": str(after_block)})
    os.replace(tmp, path)


def load_hidden(work_dir: Path, after_block: int) -> torch.Tensor:
    path = work_dir / HIDDEN_FILE
    if not path.is_file():
        raise WorkDirError(f"work directory {work_dir} has no {HIDDEN_FILE} (outputs of block {after_block}) to resume from")
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
        if md.get("after_block") != str(after_block):
            raise WorkDirError(
                f"{path} holds the outputs of block {md.get('after_block')}, but the state says block {after_block} "
                "was the last one finished"
            )
        return f.get_tensor("hidden_states")


# -- state ---------------------------------------------------------------------------------------
def read_state(work_dir: Path) -> dict | None:
    path = work_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise WorkDirError(f"{path} is not valid JSON ({e}); remove the work directory or pass resume=False") from e
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise WorkDirError(f"{path} is not a version-{VERSION} {FORMAT} state file")
    return state


def write_state(work_dir: Path, state: dict) -> None:
    atomic_write_json(work_dir / STATE_FILE, {"format": FORMAT, "version": VERSION, **state})


def clear(work_dir: Path) -> None:
    """Forget a previous run: the state file first, then its block and hidden files."""
    (work_dir / STATE_FILE).unlink(missing_ok=True)
    for p in work_dir.glob("block_*.*"):
        p.unlink()
    (work_dir / HIDDEN_FILE).unlink(missing_ok=True)
