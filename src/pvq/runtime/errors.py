"""Errors of the packed checkpoint format; each message names the file, layer or version at fault."""

from __future__ import annotations

from pvq.codec.errors import CodecError
from pvq.errors import PVQError

__all__ = [
    "CheckpointActQuantError",
    "CheckpointError",
    "CheckpointIntegrityError",
    "CheckpointRotationError",
    "CheckpointVersionError",
    "LayerCodecError",
    "LayerDecodeError",
    "LayerInputError",
]


class CheckpointError(PVQError, ValueError):
    """A checkpoint that cannot be written or read: bad manifest, missing values, wrong shapes."""


class CheckpointIntegrityError(CheckpointError):
    """A checkpoint file that is missing, truncated or altered (size or sha256 mismatch)."""


class CheckpointVersionError(CheckpointError):
    """A manifest of another format, or of a format version newer than this code reads."""


class CheckpointRotationError(CheckpointError):
    """A rotated checkpoint whose recorded rotation cannot be rebuilt (unknown kind or
    size, a seed or digest that does not reproduce the recorded rotation)."""


class CheckpointActQuantError(CheckpointError):
    """A checkpoint whose recorded activation quantization cannot be rebuilt (unknown kind
    or version, settings this pvq refuses, layers the model lacks)."""


class LayerDecodeError(CheckpointError):
    """A stored layer that cannot be turned back into its weight (the message names the layer)."""


class LayerCodecError(LayerDecodeError, CodecError):
    """The codec rejected a layer's stored codes (out of range, truncated stream, ...)."""


class LayerInputError(PVQError, ValueError):
    """An input a quantized layer cannot take: not floating point, the wrong width, or on
    another device than the layer's packed payload (the message names the layer and both)."""
