"""The one root of every error pvq raises for input a user can fix.

Each subsystem keeps its own class (`CodecError`, `QuantizationError`, `CheckpointError`,
...) with a message that names the file, layer or option at fault; all of them derive
from `PVQError`, so the CLI (and a notebook) can catch one class and print one line.
This module imports nothing, so every layer of the package can use it.
"""

from __future__ import annotations

__all__ = ["GenerationError", "PVQError"]


class PVQError(Exception):
    """Bad input, damaged files or settings pvq cannot work with (the message says which)."""


class GenerationError(PVQError, ValueError):
    """A prompt, template or length the model cannot generate from (`pvq.generate`, `pvq.chat_template`)."""
