"""Bit packing: codes of exactly `bits` bits each, back to back, into a byte stream.

Layout: code b occupies stream bits [b*bits, (b+1)*bits), least significant bit first,
and stream bit j is bit (j % 8) of byte j // 8 (little-endian bit order). The stream
has ceil(B*bits / 8) bytes; the unused high bits of the last byte are zero.
"""

from __future__ import annotations

import numpy as np

from .counts import words_for_bits
from .errors import CodecError


def packed_size(count: int, bits: int) -> int:
    """Bytes of a stream holding `count` codes of `bits` bits."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits < 0:
        raise CodecError(f"bits per code must be a non-negative integer, got {bits!r}")


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack (B, W) uint64 limb codes (or a 1-D array of single-limb codes) into uint8.

    Raises CodecError if a code needs more than `bits` bits.
    """
    _check_bits(bits)
    arr = np.asarray(codes)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise CodecError(f"codes must be a (B, W) integer limb array, got shape {arr.shape} dtype {arr.dtype}")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise CodecError("codes must be non-negative")
    arr = np.ascontiguousarray(arr, dtype="<u8")
    B, W = arr.shape
    if bits > 64 * W:
        raise CodecError(f"{bits} bits per code do not fit in {W} limbs")
    if B == 0 or bits == 0:
        if bits == 0 and arr.any():
            raise CodecError("codes must all be 0 when bits per code is 0")
        return np.zeros(packed_size(B, bits), dtype=np.uint8)
    all_bits = np.unpackbits(arr.view(np.uint8).reshape(B, 8 * W), axis=1, bitorder="little")
    if all_bits[:, bits:].any():
        row = int(np.flatnonzero(all_bits[:, bits:].any(axis=1))[0])
        raise CodecError(f"code at row {row} needs more than {bits} bits")
    return np.packbits(all_bits[:, :bits].reshape(-1), bitorder="little")


def unpack_codes(stream: np.ndarray | bytes, count: int, bits: int) -> np.ndarray:
    """Inverse of `pack_codes`: (count, W) uint64 limbs with W = words_for_bits(bits).

    Raises CodecError if the stream is shorter than `count` codes need (truncated).
    """
    _check_bits(bits)
    if count < 0:
        raise CodecError(f"count must be non-negative, got {count}")
    buf = np.frombuffer(stream, dtype=np.uint8) if isinstance(stream, (bytes, bytearray, memoryview)) else np.asarray(stream)
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise CodecError(f"packed stream must be a 1-D uint8 array, got shape {buf.shape} dtype {buf.dtype}")
    need = packed_size(count, bits)
    if buf.size < need:
        raise CodecError(f"packed stream truncated: {buf.size} bytes, {need} needed for {count} codes of {bits} bits")
    W = words_for_bits(bits)
    if count == 0 or bits == 0:
        return np.zeros((count, W), dtype=np.uint64)
    flat = np.unpackbits(buf[:need], bitorder="little", count=count * bits).reshape(count, bits)
    padded = np.zeros((count, 64 * W), dtype=np.uint8)
    padded[:, :bits] = flat
    return np.packbits(padded, axis=1, bitorder="little").view("<u8").astype(np.uint64, copy=False)
