"""Durable files, shared by the work directory and the checkpoint writer: digests, fsync,
renames into place, and whether a process that left a temporary file still runs. Imports
nothing of pvq, so every layer can use it."""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path

__all__ = ["as_os_error", "fsync_dir", "fsync_file", "process_alive", "replace_durably", "sha256_file"]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory (its entries: renames into it); a no-op where that is not possible."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """fsync `tmp`, rename it to `path`, fsync the directory: the new file or the old one, never a torn one."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def as_os_error(e: BaseException) -> OSError | None:
    """`e` as an OSError when it is one, or an I/O failure another library reported in its own
    type (safetensors' Rust writer: ``SafetensorError("... I/O error: No space left on
    device (os error 28) ...")``); None for any other exception."""
    if isinstance(e, OSError):
        return e
    text = str(e)
    if type(e).__name__ == "SafetensorError" and "I/O error" in text:
        m = re.search(r"\(os error (\d+)\)", text)
        code = int(m.group(1)) if m else errno.EIO
        return OSError(code, os.strerror(code))
    return None


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_utf8(path: str | os.PathLike, error: type[Exception], what: str) -> str:
    """The text of a UTF-8 file, or `error` saying "<what> not found: <path>" or that it
    cannot be read as UTF-8 text (one message shape for every text file a user gives)."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} not found: {p}")
    try:
        return p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise error(f"{what} {p} cannot be read as UTF-8 text: {e}") from None


def nesting_depth(data, stop_above: int | None = None) -> int:
    """How deeply lists and mappings nest in parsed JSON or YAML `data` (0: a scalar),
    without recursion, so a hostile document cannot exhaust the stack here; the walk stops
    once the depth exceeds `stop_above`."""
    deepest, stack = 0, [(data, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level + 1)
            if stop_above is not None and deepest > stop_above:
                break
            stack.extend((x, level + 1) for x in (item.values() if isinstance(item, dict) else item))
    return deepest
