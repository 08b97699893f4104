"""Fast CPU kernel of RTN / GPTQ layers (and the 8-bit embedding as the output head) with
4- or 8-bit codes, as stored.

Serves batch 1-2 (fused GEMV) and the decode into a workspace for prefill. A code is a
byte (8 bits) or a nibble (4 bits, the low one first: `pvq.codec.pack_codes`' little-endian
bit order), read with no bit loop; the per-group float16 scales and bit-packed zero points
are widened once per layer (`grid_fast_tables`: 8 bytes per group). Each weight is
``float32(code - zero) * float32(scale)`` exactly as `pvq.methods.rtn.grid_dequantize`;
the GEMV sums ``(code - zero) * x`` per group (vectorised over the group) and scales the
group's sum once, so outputs match the reference to float32 rounding.
Other widths keep `cpu_kernels.grid_rows`.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from pvq.codec import unpack_codes

__all__ = ["FAST_GRID_BITS", "grid_fast_rows", "grid_fast_tables"]

#: Code widths with a fast kernel.
FAST_GRID_BITS = (4, 8)


def grid_fast_tables(scales16: np.ndarray, zeros: np.ndarray, R: int, G: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 scales (R, G), int32 zero points (R, G)) of a layer's stored arrays."""
    z = unpack_codes(zeros, R * G, bits)[:, 0].astype(np.int32).reshape(R, G)
    return np.ascontiguousarray(scales16.astype(np.float32)), z


@nb.njit(cache=True, nogil=True, fastmath={"contract", "reassoc", "nsz"})
def grid_fast_rows(lo, hi, x, codes, bits, gs, G, scales, zeros, out, weight, row0):
    """Rows lo..hi (4- or 8-bit codes): ``out[b, r] = <W[r], x[b]>`` (weight empty) or
    ``weight[r] = W[r]``, W[r, g*gs + j] = float32(code - zero[r, g]) * scales[r, g]. Returns -1."""
    B = x.shape[0]
    C = G * gs
    gemv = weight.shape[0] == 0
    row = np.empty(C, np.float32)
    for r in range(lo, hi):
        # the row's integers (code - zero) as float32, then the groups
        if bits == 8:
            base = r * C
            for g in range(G):
                z = zeros[r, g]
                for j in range(gs):
                    row[g * gs + j] = np.float32(np.int32(codes[base + g * gs + j]) - z)
        else:
            base = (r * C) >> 1
            for g in range(G):
                z = zeros[r, g]
                for j in range(gs >> 1):
                    byte = np.int32(codes[base + ((g * gs) >> 1) + j])
                    row[g * gs + 2 * j] = np.float32((byte & 15) - z)
                    row[g * gs + 2 * j + 1] = np.float32((byte >> 4) - z)
        if not gemv:
            for g in range(G):
                s = scales[r, g]
                for j in range(gs):
                    weight[r - row0, g * gs + j] = row[g * gs + j] * s
            continue
        for b in range(B):
            a = np.float32(0.0)
            for g in range(G):
                d = np.float32(0.0)
                for j in range(gs):
                    d += row[g * gs + j] * x[b, g * gs + j]
                a += scales[r, g] * d
            out[b, r] = a
    return -1
