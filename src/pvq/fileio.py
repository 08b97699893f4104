"""Durable files, shared by the work directory and the checkpoint writer: digests, fsync,
renames into place, and whether a process that left a temporary file still runs. Imports
nothing of pvq, so every layer can use it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["fsync_dir", "fsync_file", "process_alive", "replace_durably", "sha256_file"]


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
