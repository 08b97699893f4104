"""The integrity index and the format's constants: what every other module of
`pvq.checkpoint` reads, so it imports none of them.

``pvq_index.json`` lists every file of a checkpoint with its sha256 and size
(`verify_checkpoint`); a file it does not list is refused (transformers could read it),
names are plain relative names of regular files (no link followed). `verified_by_caller`
marks a directory the caller has verified, so that transformers' route does not hash it twice.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from pvq.errors import PVQError
from pvq.fileio import nesting_depth, sha256_file
from pvq.runtime.errors import CheckpointError, CheckpointIntegrityError, CheckpointVersionError

MAX_CONFIG_BYTES = 16 << 20  # config.json and shard indexes: far above any real one


MAX_JSON_DEPTH = 64

FORMAT = "pvq"


INDEX_FILE = "pvq_index.json"


REPORT_FILE = "pvq_report.json"
#: the settings that make a checkpoint again, as `pvq quantize` stores them
RECIPE_FILE = "recipe.yaml"


LEGACY_MANIFEST = "manifest.json"  # pvq 0.1 checkpoints (format versions 1-3)

QUANT_METHOD = "pvq"


#: 1-3: the manifest.json checkpoints of pvq 0.1 (`pvq convert`); 4: Hugging Face directories;
#: 5: PVQ configs record their code "enumeration" (4 is still read: its PVQ codes are Fischer's).
FORMAT_VERSION = 5

#: files pvq writes beside the indexed ones (reports: timings, outside the integrity index)
OWN_UNINDEXED = (INDEX_FILE, REPORT_FILE, "job_report.json")


def stored_block_count(names, model_type: str | None) -> int | None:
    """Decoder blocks that tensor or module names cover ("<blocks>.<i>...", the blocks path
    of the model type's description: 1 + the largest i), None when no name is inside a
    block: what a config's num_hidden_layers must equal. UnsupportedArchitectureError for a
    model type without a description."""
    from pvq.models.adapters import adapter_for_type

    pattern = re.compile(r"(?:^|\.)" + re.escape(adapter_for_type(model_type).blocks) + r"\.(\d+)\.")
    blocks = {int(m.group(1)) for n in names if (m := pattern.search(n))}
    return max(blocks) + 1 if blocks else None


#: A directory `pvq.load` has just verified itself (or was told not to verify): transformers'
#: route then does not hash it a second time.
_VERIFIED: contextvars.ContextVar[Path | None] = contextvars.ContextVar("pvq_verified", default=None)


@contextlib.contextmanager
def verified_by_caller(root: Path):
    """Inside it, loading `root` through transformers skips the quantizer's own integrity check."""
    token = _VERIFIED.set(Path(root).resolve())
    try:
        yield
    finally:
        _VERIFIED.reset(token)


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2, allow_nan=False, ensure_ascii=False) + "\n").encode("utf-8")


def is_legacy_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a pvq 0.1 checkpoint (a manifest.json of format "pvq-checkpoint")."""
    manifest = Path(path) / LEGACY_MANIFEST
    if not manifest.is_file() or manifest.is_symlink() or (Path(path) / "config.json").is_file():
        return False
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == "pvq-checkpoint"


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or "\\" in name or PurePosixPath(name).is_absolute() or any(
        part in ("", ".", "..") for part in name.split("/")
    ):
        raise CheckpointIntegrityError(f"{INDEX_FILE} lists {name!r}, which is not a plain relative file name")
    return name


def _regular_file(root: Path, name: str) -> Path:
    """root/name, refused unless it is a regular file (no symbolic link on the way) inside root."""
    p = root / name
    parts = PurePosixPath(name).parts
    for i in range(1, len(parts) + 1):
        q = root.joinpath(*parts[:i])
        if q.is_symlink():
            raise CheckpointIntegrityError(f"checkpoint file {name!r} is (or lies under) a symbolic link; refusing to follow it")
    if not p.is_file():
        raise CheckpointIntegrityError(f"checkpoint file {name!r} is missing from {root}")
    return p


def read_index(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and check ``pvq_index.json`` (the files themselves are not read)."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory (a pvq checkpoint is a directory)")
    if is_legacy_checkpoint(root):
        raise CheckpointVersionError(
            f"{root} is a pvq 0.1 checkpoint (manifest.json); convert it once with: pvq convert {root} NEW_DIR"
        )
    ipath = root / INDEX_FILE
    if ipath.is_symlink() or not ipath.is_file():
        raise CheckpointIntegrityError(f"{root} has no {INDEX_FILE} (not written by pvq, or damaged); cannot verify it")
    index = read_json_file(ipath, INDEX_FILE)
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CheckpointVersionError(f"{ipath}: format {index.get('format') if isinstance(index, dict) else None!r} is not {FORMAT!r}")
    version = index.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version not in (FORMAT_VERSION - 1, FORMAT_VERSION):
        raise CheckpointVersionError(
            f"{ipath}: format_version {version!r}; this pvq reads {FORMAT_VERSION - 1} and {FORMAT_VERSION}")
    files = index.get("files")
    if not isinstance(files, dict) or "config.json" not in files:
        raise CheckpointIntegrityError(f"{ipath}: 'files' must list every file of the checkpoint, config.json included")
    for name, info in files.items():
        _check_name(name)
        if not (isinstance(info, dict) and isinstance(info.get("sha256"), str) and isinstance(info.get("bytes"), int)
                and not isinstance(info.get("bytes"), bool)):
            raise CheckpointIntegrityError(f"{ipath}: entry {name!r} needs 'sha256' and 'bytes'")
    present = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())
    unlisted = [n for n in present if n not in files and n not in OWN_UNINDEXED and not _inert(n)]
    if unlisted:
        raise CheckpointIntegrityError(
            f"{root} holds files its index does not list ({', '.join(unlisted[:5])}{', ...' if len(unlisted) > 5 else ''}); "
            "transformers could read them, so the checkpoint is refused: remove them"
        )
    if not any(n.endswith(".safetensors") for n in files):
        raise CheckpointIntegrityError(f"{ipath} lists no safetensors file")
    return index


def _inert(name: str) -> bool:
    """Files a Hugging Face repository carries that no loader reads (README, licence, git attributes)."""
    base = PurePosixPath(name).name
    return "/" not in name and (base.lower().endswith(".md") or base.upper().startswith("LICENSE") or base == ".gitattributes")


def _check_config_against_files(root: Path, config: dict, files: dict) -> None:
    """Before anything is built: the embedding stored in the shards has the shape the config
    gives, and the config's layer count is the one the stored tensors cover (a config that
    asks for a huge model fails here, not in the allocator)."""
    from safetensors import safe_open

    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    shapes: dict[str, list[int]] = {}
    for name in files:
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(root / name), framework="pt") as f:
                    for key in f.keys():
                        shapes[key] = list(f.get_slice(key).get_shape())
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointIntegrityError(f"checkpoint file {name!r} is not a readable safetensors file: {e}") from None
    from pvq.models.adapters import adapter_for_type

    try:
        description = adapter_for_type(config.get("model_type"))
        blocks = stored_block_count(shapes, config.get("model_type"))
    except PVQError as e:
        raise CheckpointError(f"config.json: {e}") from None
    n_layers = text.get("num_hidden_layers")
    if blocks is not None and n_layers != blocks:
        raise CheckpointError(f"config.json says num_hidden_layers {n_layers!r}, the stored tensors hold "
                              f"{blocks} decoder blocks")
    emb = shapes.get(f"{description.embedding}.weight")
    if emb is None and {f"{description.embedding}.scales", f"{description.embedding}.codes"} <= set(shapes):  # a quantized embedding: rows x bit-packed codes
        record = (config.get("quantization_config") or {}).get("embeddings") or {}
        bits = (record.get("config") or {}).get("bits") if isinstance(record, dict) else None
        rows = shapes[f"{description.embedding}.scales"][0]
        codes = shapes[f"{description.embedding}.codes"][0]
        width = codes * 8 // (bits * rows) if isinstance(bits, int) and bits > 0 and rows else None
        emb = [rows, width]
    want = [text.get("vocab_size"), text.get("hidden_size")]
    if emb is not None and emb != want:
        raise CheckpointError(f"config.json says vocab_size x hidden_size {want}, the stored embedding is {emb}")


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check every file the index lists: a regular file inside the directory, of its
    recorded size and sha256 (CheckpointIntegrityError naming the file). Returns the index."""
    root = Path(path)
    index = read_index(root)
    for name, info in sorted(index["files"].items()):
        p = _regular_file(root, name)
        size = p.stat().st_size
        if size != info["bytes"]:
            raise CheckpointIntegrityError(
                f"checkpoint file {name!r} has {size} bytes, the index records {info['bytes']} (truncated or altered)"
            )
        digest = sha256_file(p)
        if digest != info["sha256"]:
            raise CheckpointIntegrityError(
                f"checkpoint file {name!r} fails its checksum: sha256 {digest}, the index records {info['sha256']} (corrupted)"
            )
    config = read_json_file(root / "config.json", "config.json")
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{root}/config.json has no pvq quantization_config; it is not a pvq checkpoint")
    _check_config_against_files(root, config, index["files"])
    return index


def read_json_file(path: Path, what: str, constants: bool = True) -> Any:
    """A JSON file pvq reads before transformers does: a regular file (no symbolic link),
    at most MAX_CONFIG_BYTES, nested at most MAX_JSON_DEPTH deep, NaN and Infinity only
    where `constants` (CheckpointIntegrityError naming the file otherwise)."""
    if path.is_symlink():
        raise CheckpointIntegrityError(f"{path} is a symbolic link; refusing to follow it")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointIntegrityError(f"{path} has {path.stat().st_size} bytes, more than a {what} can need "
                                       f"({MAX_CONFIG_BYTES})")

    def no_constant(name: str) -> float:
        raise ValueError(f"{name} is not a JSON number")

    try:
        value = json.loads(path.read_bytes().decode("utf-8"), **({} if constants else {"parse_constant": no_constant}))
    except RecursionError:
        value = None
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointIntegrityError(f"{path}: {what} is not valid JSON ({' '.join(str(e).split())[:120]})") from None
    else:
        if nesting_depth(value, MAX_JSON_DEPTH) <= MAX_JSON_DEPTH:
            return value
    raise CheckpointIntegrityError(f"{path}: {what} is nested too deeply (more than {MAX_JSON_DEPTH} levels)")
