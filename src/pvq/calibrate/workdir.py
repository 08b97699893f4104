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
    .pvq-workdir               marker: this directory is pvq's own (any other non-empty
                               directory is refused, never written into)

Integrity: every file is fsync'd before it is renamed into place, and the state file
records the sha256 of every block and hidden-state file next to its own digest
(``state_sha256``). On resume, a block file that does not match is discarded together
with every later block (they were computed from it) and recomputed; damaged hidden
states are recomputed by running the good blocks again; a damaged state file restarts
the run. Each is logged as a warning, and the result is the same bytes as an
undamaged run. A block whose digest was rewritten to match edited content is caught
too: before a finished block is trusted, its layers must have the method, shape, layout
and payload arrays the recorded settings give, and their dequantized weights must give
the digest the state recorded for the quantized block (``quantized_blocks``); else it is
discarded and recomputed like a damaged one.

A write that fails (a full disk: ENOSPC) raises WorkDirError naming the work directory;
its temporary file is removed, and a block whose files were not all written is deleted,
so the state file (written last) never lists a half-written block.
"""

from __future__ import annotations

from pvq.errors import PVQError

import contextlib
import errno
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

from pvq.fileio import as_os_error, process_alive, replace_durably, sha256_file
from pvq.methods import QuantizedTensor

STATE_FILE = "state.json"
HIDDEN_FILE = "hidden.safetensors"
MARKER_FILE = ".pvq-workdir"
FORMAT = "pvq-quantize-workdir"
VERSION = 1


class WorkDirError(PVQError, RuntimeError):
    """A work directory that cannot be resumed with the given settings."""


class WorkDirDamaged(WorkDirError):
    """A work-directory file whose bytes do not match the digest recorded for it."""


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def _writing(path: Path, work_dir: Path | None = None):
    """Yield the temporary name to write `path` through; an OSError meanwhile (ENOSPC, EDQUOT,
    EACCES, ...) removes that temporary file and becomes a WorkDirError naming the work
    directory (`work_dir`, default the file's folder) and the file."""
    work_dir = Path(work_dir) if work_dir is not None else path.parent
    tmp = _tmp(path)
    try:
        yield tmp
    except Exception as e:
        err = as_os_error(e)  # safetensors reports a full disk as its own SafetensorError
        if err is None:
            raise
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise write_error(work_dir, path, err) from e


def write_error(work_dir: Path, path: Path, e: OSError) -> WorkDirError:
    """The one-line error for a work-directory file that could not be written."""
    try:
        name = path.relative_to(work_dir).as_posix()
    except ValueError:
        name = str(path)
    reason = e.strerror or str(e) or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free space there (or give another --work-dir), then rerun the same command to resume"
    else:
        hint = "rerun the same command to resume once it can be written"
    return WorkDirError(f"work directory {work_dir}: cannot write {name}: {reason}; nothing half-written was kept; "
                        f"{hint}")


def atomic_write_text(path: Path, text: str, work_dir: Path | None = None) -> None:
    with _writing(path, work_dir) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        replace_durably(tmp, path)


def check_claimable(work_dir: Path) -> None:
    """WorkDirError unless `work_dir` is absent, empty, or pvq's own (marked)."""
    if work_dir.exists() or work_dir.is_symlink():
        if not work_dir.is_dir() or work_dir.is_symlink():
            raise WorkDirError(f"work directory {work_dir} exists and is not a directory")
        if not (work_dir / MARKER_FILE).is_file() and any(work_dir.iterdir()):
            raise WorkDirError(f"work directory {work_dir} holds files pvq did not write; refusing to use it "
                               "(give an empty or new --work-dir)")


def claim(work_dir: Path) -> None:
    """Make `work_dir` pvq's own: create it with a marker, or accept it when empty or already
    marked; any other existing directory (or a file) is refused and left untouched."""
    check_claimable(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    for tmp in work_dir.glob(".*.tmp*"):  # temporary files of a killed run (never renamed into place)
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)
    marker = work_dir / MARKER_FILE
    if not marker.is_file():
        atomic_write_text(marker, "pvq quantization work directory: resumable state, safe to delete\n")


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable (QuantizedTensor.meta must be JSON-able)")


def atomic_write_json(path: Path, obj: Any, sort_keys: bool = True, work_dir: Path | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=sort_keys, default=_json_default) + "\n", work_dir)


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
def save_block(work_dir: Path, index: int, layers: dict[str, QuantizedTensor], info: dict[str, dict]) -> dict[str, str]:
    """Write block `index`'s payloads and report; returns {file name: sha256} of both files."""
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
    try:
        with _writing(st_path, work_dir) as tmp:
            np_save_file(arrays, str(tmp))
            replace_durably(tmp, st_path)
        # insertion order kept (layers in quantization order, meta keys as the method wrote
        # them), so a resumed run hands downstream writers the very same dicts
        atomic_write_json(js_path, {"block": index, "layers": meta}, sort_keys=False)
        return {st_path.name: sha256_file(st_path), js_path.name: sha256_file(js_path)}
    except BaseException:
        remove_block(work_dir, index)  # never one file of the pair without the other
        raise


def remove_block(work_dir: Path, index: int) -> None:
    """Delete block `index`'s files (best effort: called while another error is raised)."""
    for p in block_paths(work_dir, index):
        with contextlib.suppress(OSError):
            p.unlink(missing_ok=True)


def load_block(work_dir: Path, index: int) -> tuple[dict[str, QuantizedTensor], dict[str, dict]]:
    st_path, js_path = block_paths(work_dir, index)
    if not st_path.is_file() or not js_path.is_file():
        raise WorkDirError(f"work directory {work_dir} says block {index} is finished but {st_path.name} or {js_path.name} is missing")
    try:
        arrays = np_load_file(str(st_path))
        doc = json.loads(js_path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("block") != index or not isinstance(doc.get("layers"), dict):
            raise ValueError(f"not the report of block {index}")
        layers, info = {}, {}
        for name, m in doc["layers"].items():
            if not isinstance(m.get("meta"), dict) or not isinstance(m.get("arrays"), list):
                raise ValueError(f"layer {name}: no meta object or array list")
            layers[name] = QuantizedTensor(
                method=m["method"],
                shape=tuple(int(s) for s in m["shape"]),
                tensors={k: arrays[f"{name}/{k}"] for k in m["arrays"]},
                meta=m["meta"],
                proxy_loss=m["proxy_loss"],
            )
            info[name] = {k: v for k, v in m.items() if k not in ("method", "shape", "meta", "proxy_loss", "arrays")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, UnicodeDecodeError) as e:
        # (safetensors' own error derives from Exception only: caught by name below)
        raise WorkDirDamaged(f"work directory {work_dir}: block {index} cannot be read ({type(e).__name__}: {e})") from None
    except Exception as e:  # noqa: BLE001 - safetensors_rust.SafetensorError on a damaged file
        if type(e).__name__ != "SafetensorError":
            raise
        raise WorkDirDamaged(f"work directory {work_dir}: block {index} cannot be read ({e})") from None
    return layers, info


# -- hidden states -------------------------------------------------------------------------------
def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write torch tensors as one safetensors file, atomically; returns the file's sha256."""
    with _writing(path) as tmp:
        torch_save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        replace_durably(tmp, path)
    return sha256_file(path)


def save_hidden(work_dir: Path, hidden: torch.Tensor, after_block: int) -> str:
    """Write the inputs of block after_block + 1; returns the file's sha256."""
    return atomic_save_tensors(work_dir / HIDDEN_FILE, {"hidden_states": hidden},
                               metadata={"after_block": str(after_block)})


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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WorkDirDamaged(f"{path} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
        raise WorkDirDamaged(f"{path} is not a version-{VERSION} {FORMAT} state file")
    recorded = state.pop("state_sha256", None)
    if recorded != _state_digest(state):
        raise WorkDirDamaged(f"{path} does not match its recorded digest (edited or damaged)")
    return state


def _state_digest(state: dict) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=_json_default).encode()).hexdigest()


def write_state(work_dir: Path, state: dict) -> None:
    body = {**{k: v for k, v in state.items() if k != "state_sha256"}, "format": FORMAT, "version": VERSION}
    atomic_write_json(work_dir / STATE_FILE, {**body, "state_sha256": _state_digest(body)}, work_dir=work_dir)


def intact(work_dir: Path, name: str, digests: dict[str, str]) -> bool:
    """Whether work-directory file `name` exists as a regular file with the recorded sha256."""
    path = work_dir / name
    return name in digests and path.is_file() and not path.is_symlink() and sha256_file(path) == digests[name]


def clear(work_dir: Path) -> None:
    """Forget a previous run: the state file first, then its block and hidden files."""
    (work_dir / STATE_FILE).unlink(missing_ok=True)
    for p in work_dir.glob("block_*.*"):
        p.unlink()
    remove_activations(work_dir)


def remove_activations(work_dir: Path) -> None:
    """Delete the saved block inputs (hidden.safetensors, or the offloaded batch files)."""
    (work_dir / HIDDEN_FILE).unlink(missing_ok=True)
    root = work_dir / ACTIVATIONS_DIR
    if root.is_dir() and not root.is_symlink():
        for folder in root.iterdir():
            if folder.is_dir() and not folder.is_symlink():
                for p in folder.iterdir():
                    p.unlink()
                folder.rmdir()
        root.rmdir()


def activations_intact(work_dir: Path, files: dict[str, str], generation: int, offloaded: bool) -> bool:
    """Whether the recorded inputs of block `generation` are there with their digests."""
    if not offloaded:
        return intact(work_dir, HIDDEN_FILE, files)
    prefix = f"{ACTIVATIONS_DIR}/{generation % 2}/"
    names = [k for k in files if k.startswith(prefix)]
    return bool(names) and all(intact(work_dir, k, files) for k in names)


def discard_from(work_dir: Path, first: int) -> None:
    """Delete the files of block `first` and every later block, and the hidden states."""
    for p in work_dir.glob("block_*.*"):
        try:
            index = int(p.name.split("_")[1].split(".")[0])
        except (IndexError, ValueError):
            continue
        if index >= first:
            p.unlink()
    remove_activations(work_dir)


# -- block inputs kept on disk (--offload-activations) -------------------------------------------
ACTIVATIONS_DIR = "activations"


class OffloadedActivations:
    """The hidden states entering a block for every calibration batch, one safetensors file
    per batch under `<work_dir>/activations/<g % 2>` (g: the block they enter), so that only
    the batch being computed is in memory. Indexed like the in-memory tensor, by the slice
    of a whole batch: `acts[b0:b1]` reads that batch's file, `acts[b0:b1] = x` writes it
    atomically. Two folders alternate: a block reads one and writes the other, and the
    folder the state file records is never written."""

    def __init__(self, work_dir: Path, generation: int, shape: tuple[int, ...], dtype: torch.dtype, fresh: bool):
        self.work_dir, self.generation, self.shape, self.dtype = Path(work_dir), generation, tuple(shape), dtype
        self.folder = self.work_dir / ACTIVATIONS_DIR / str(generation % 2)
        self.digests: dict[str, str] = {}
        if fresh:
            if self.folder.exists():
                for p in self.folder.iterdir():
                    p.unlink()
            self.folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _name(key: slice) -> str:
        return f"{key.start}-{key.stop}.safetensors"

    def relative(self, name: str) -> str:
        return f"{ACTIVATIONS_DIR}/{self.generation % 2}/{name}"

    def __getitem__(self, key: slice) -> torch.Tensor:
        with safe_open(str(self.folder / self._name(key)), framework="pt") as f:
            return f.get_tensor("hidden_states")

    def __setitem__(self, key: slice, value: torch.Tensor) -> None:
        path = self.folder / self._name(key)
        with _writing(path, self.work_dir) as tmp:
            torch_save_file({"hidden_states": value.to(self.dtype).contiguous()}, str(tmp))
            replace_durably(tmp, path)
        self.digests[self.relative(path.name)] = sha256_file(path)

    def empty_like(self) -> "OffloadedActivations":
        """The store of the next block's inputs (the other folder, emptied)."""
        return OffloadedActivations(self.work_dir, self.generation + 1, self.shape, self.dtype, fresh=True)

    @classmethod
    def recorded(cls, work_dir: Path, generation: int, shape, dtype, files: dict[str, str]) -> "OffloadedActivations":
        """The inputs of block `generation` as the state file records them; WorkDirDamaged
        when a batch file is missing or does not match its digest."""
        acts = cls(work_dir, generation, shape, dtype, fresh=False)
        prefix = f"{ACTIVATIONS_DIR}/{generation % 2}/"
        acts.digests = {k: v for k, v in files.items() if k.startswith(prefix)}
        if not acts.digests or not all(intact(work_dir, k, files) for k in acts.digests):
            raise WorkDirDamaged(f"work directory {work_dir}: the saved inputs of block {generation} are missing or "
                                 "do not match their recorded digests")
        return acts
