"""Errors raised by the codec for bad input (never silent garbage)."""

from pvq.errors import PVQError


class CodecError(PVQError, ValueError):
    """Input the PVQ codec cannot represent: a wrong shape, a point off the pyramid,
    a code out of range, a truncated stream, non-finite values, or D/K out of range."""
