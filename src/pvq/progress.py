"""Progress bars for long phases, and the one switch that silences them (`--quiet`).

Every bar pvq draws comes from `progress_bar` (tqdm, with its ETA); a caller's own
`enabled=False` and the process-wide `set_progress(False)` both turn a bar off. This
module imports nothing of pvq, so every layer can use it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["progress_bar", "progress_enabled", "set_progress"]

_ENABLED = True


def set_progress(enabled: bool) -> None:
    """Draw progress bars (True, the default) or none anywhere in this process."""
    global _ENABLED
    _ENABLED = bool(enabled)


def progress_enabled() -> bool:
    return _ENABLED


def progress_bar(iterable: Any = None, *, enabled: bool = True, **kwargs: Any):
    """A tqdm bar over `iterable` (or a manual one with `total=`), off when either switch is."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not (enabled and _ENABLED), **kwargs)
