"""Fast CPU decode of split-order PVQ codes as stored (D = 8, 16 or 32, every leaf tabulated).

Serves the default checkpoint layout (0.10x float32 bytes) at batch 1-2 (fused GEMV) and
the decode into a workspace for prefill. What makes it faster than `cpu_kernels.pvq_rows`
(same bits, same points; the tests compare the two and the reference decoder):

* compact tables, flattened per tree level: the root of P(D, K) always has K pulses, so
  its search reads one row of offsets (K + 2 int64); the 8-coordinate nodes read
  (K + 1) x (K + 2) offsets; the guides are uint8. Together about 20 KB for D=16, K=27,
  in L1; the P(4, k) leaf table is read where the codes land (97% in its first 90 KB);
* a code read with two aligned 64-bit loads (the stream viewed as uint64, no copy);
* per row, the gains of every group first (codebook x row norm, escapes applied), then
  one pass over the groups: three node splits, four leaf lookups, the dot product and
  the squared norm of the 16 integers, ``scale = float32(gain * inv_norm[||p||^2])`` (a table of 1/sqrt(n));
* the rows of a layer split over threads by the caller (`cpu_kernels`).

Codes out of range are never decoded (the first such flat index r*G + g is returned).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numba as nb
import numpy as np

from pvq.codec.split import GUIDE_BUCKETS, divmod_by_reciprocal, split_supported, split_tables

__all__ = ["FastPVQTables", "fast_pvq_supported", "fast_pvq_tables", "pvq_fast_rows"]

#: Group sizes with an unrolled fast decoder.
FAST_DIMS = (8, 16, 32)


def fast_pvq_supported(D: int, K: int) -> bool:
    """Whether (D, K) has a fast decoder: an unrolled size whose every leaf is tabulated."""
    if D not in FAST_DIMS or not split_supported(D, K):
        return False
    return split_tables(D, K).leaf_kmax >= K


@dataclass(frozen=True)
class FastPVQTables:
    """Per level (node length n = D, D/2, ..., 8), tables flattened by k:
    ``offs[lvl, k * S + kl]`` = Off(kl) of a node of k pulses (S = K + 2), ``divs`` and
    ``recs`` the divisors N(n - n/2, k - kl) and their float64 inverses, ``guide[lvl, k * 128 + j]``
    (uint8) the bucket's first kl and ``gscale[lvl, k]`` = 128 / N(n, k). Leaves: the 4 int8
    coordinates of P(4, k) code c packed in one uint32 at ``leaf32[lbase[k] + c]``."""

    offs: np.ndarray
    divs: np.ndarray
    recs: np.ndarray
    guide: np.ndarray
    gscale: np.ndarray
    lbase: np.ndarray
    leaf32: np.ndarray
    total: int
    inv_norm: np.ndarray


@lru_cache(maxsize=16)
def fast_pvq_tables(D: int, K: int) -> FastPVQTables:
    """The tables of P(D, K), built once per process and shared by every layer of that shape."""
    tb = split_tables(D, K)
    levels = []
    n = D
    while n >= 8:
        levels.append(int(tb.kind_of_length[n]))
        n //= 2
    S = K + 2
    L = len(levels)
    offs = np.zeros((L, (K + 1) * S), np.int64)
    divs = np.ones((L, (K + 1) * S), np.int64)
    recs = np.ones((L, (K + 1) * S), np.float64)
    guide = np.zeros((L, (K + 1) * tb.guide.shape[2]), np.uint8)
    gscale = np.zeros((L, K + 1), np.float64)
    for lvl, t in enumerate(levels):
        for k in range(K + 1):
            offs[lvl, k * S: k * S + K + 2] = tb.offsets[t, k]
            divs[lvl, k * S: k * S + K + 1] = tb.divisors[t, k]
            recs[lvl, k * S: k * S + K + 1] = tb.reciprocals[t, k]
            nb_ = tb.guide.shape[2]
            guide[lvl, k * nb_: (k + 1) * nb_] = tb.guide[t, k]
            gscale[lvl, k] = tb.guide_scale[t, k]
    if tb.leaf_points.dtype != np.int8:
        raise ValueError("the fast decoder reads int8 leaves (K <= 127)")
    leaf32 = np.ascontiguousarray(tb.leaf_points).view(np.uint32).reshape(-1)
    return FastPVQTables(offs, divs, recs, guide, gscale, tb.leaf_base.copy(), leaf32, int(tb.total), inv_norm_table(K))


@nb.njit(inline="always")
def _node(c, k, lvl, S, offs, divs, recs, guide, gscale):
    """(left pulses, left code, right code) of code c of a node of k pulses at tree level lvl."""
    row = k * S
    j = min(np.int64(np.float64(c) * gscale[lvl, k]), GUIDE_BUCKETS - 1)
    kl = np.int64(guide[lvl, k * GUIDE_BUCKETS + j])
    kl += np.int64(c >= offs[lvl, row + kl + 1])  # the guide is right or one short for most codes
    while c >= offs[lvl, row + kl + 1]:
        kl += 1
    while c < offs[lvl, row + kl]:
        kl -= 1
    q, r = divmod_by_reciprocal(c - offs[lvl, row + kl], divs[lvl, row + kl], recs[lvl, row + kl])
    return kl, q, r


@nb.njit(inline="always")
def _read_code(words, stream, bitpos, mask):
    """The code at stream bit `bitpos` (at most 56 bits wide): two aligned uint64 loads,
    bytes for the last word of the stream."""
    w = bitpos >> 6
    s = np.uint64(bitpos & 63)
    if w + 1 < words.shape[0]:
        v = (words[w] >> s) | ((words[w + 1] << np.uint64(1)) << (np.uint64(63) - s))
    else:
        byte = bitpos >> 3
        sh = np.uint64(bitpos & 7)
        v = np.uint64(0)
        for i in range(8):
            if byte + i < stream.shape[0]:
                v |= np.uint64(stream[byte + i]) << np.uint64(8 * i)
        v >>= sh
    return np.int64(v & mask)


@nb.njit(inline="always")
def read_bits(stream, bitpos, nbits):
    """The `nbits` (<= 56) bits at stream bit `bitpos` (little-endian bit order, `pvq.codec.pack_codes`)."""
    byte = bitpos >> 3
    shift = bitpos & 7
    v = np.uint64(0)
    for i in range((shift + nbits + 7) >> 3):
        v |= np.uint64(stream[byte + i]) << np.uint64(8 * i)
    return np.int64((v >> np.uint64(shift)) & ((np.uint64(1) << np.uint64(nbits)) - np.uint64(1)))


@nb.njit(inline="always")
def half_to_double(h):
    """An IEEE float16 (its int16 bits) as float64, exactly."""
    u = np.int64(h) & 0xFFFF
    sign = -1.0 if u & 0x8000 else 1.0
    e = (u >> 10) & 0x1F
    m = u & 0x3FF
    if e == 0:
        return sign * m * 2.0 ** -24
    if e == 31:
        return sign * np.inf if m == 0 else np.nan
    return sign * (1024 + m) * 2.0 ** (e - 25)


@nb.njit(inline="always")
def _row_gains(r, G, gain_mode, gains16, gidx, gbits, codebook, row_scale, esc_pos, esc_gain, gains):
    """gains[g] (float64) of row r: fp16 gains, or codebook[index] * row norm, escapes last."""
    if gain_mode == 0:
        for g in range(G):
            gains[g] = half_to_double(gains16[r, g])
    else:
        scale = row_scale[r]
        for g in range(G):
            gains[g] = codebook[read_bits(gidx, (r * G + g) * gbits, gbits)] * scale
    for k in range(esc_pos.shape[1]):
        pos = np.int64(esc_pos[r, k])
        if pos < G:
            gains[pos] = esc_gain[r, k]


@nb.njit(inline="always")
def _row_points(r, G, D, K, S, L, nbits, mask, words, stream, total, offs, divs, recs, guide, gscale, lbase, leaf32,
                ka, ca, kb, cb, pts32):
    """The points of row r's G codes into pts32 (G * D / 4 packed int8 quadruples), level by
    level: every node of a level is split before the next level starts, so the splits of
    many codes are in flight at once (one code's splits form a long dependency chain).
    Returns the first group whose code is out of range, or -1."""
    base = r * G * nbits
    for g in range(G):
        c = _read_code(words, stream, base + g * nbits, mask)
        if c >= total:
            return g
        ka[g] = K
        ca[g] = c
    n = G
    for lvl in range(L):
        for h in range(n):
            kl, cl, cr = _node(ca[h], ka[h], lvl, S, offs, divs, recs, guide, gscale)
            kb[2 * h] = kl
            cb[2 * h] = cl
            kb[2 * h + 1] = ka[h] - kl
            cb[2 * h + 1] = cr
        n *= 2
        ka, kb = kb, ka
        ca, cb = cb, ca
    for h in range(n):
        pts32[h] = leaf32[lbase[ka[h]] + ca[h]]
    return -1


@nb.njit(inline="always")
def _tree_scratch(G, D):
    n_leaves = G * D // 4
    return (np.empty(n_leaves, np.int64), np.empty(n_leaves, np.int64), np.empty(n_leaves, np.int64),
            np.empty(n_leaves, np.int64), np.empty(G, np.float64))


@nb.njit(inline="always")
def _group_scales(G, D, pts, gains, inv_norm, scales):
    """scales[g] = float32(gain * 1/sqrt(||p_g||^2)) of a row's groups (pts: its int8 points)."""
    for g in range(G):
        ss = np.int32(0)
        for i in range(D):
            v = np.int32(pts[g * D + i])
            ss += v * v
        scales[g] = np.float32(gains[g] * inv_norm[ss])


@nb.njit(cache=True, nogil=True, fastmath={"contract", "reassoc", "nsz"})
def pvq_fast_rows(lo, hi, x, words, stream, nbits, D, G, K, total, offs, divs, recs, guide, gscale, lbase, leaf32,
                  inv_norm, gain_mode, gains16, gidx, gbits, codebook, row_scale, esc_pos, esc_gain, out, weight, row0):
    """Rows lo..hi of a PVQ layer (D = 8, 16 or 32): ``out[b, r] = <W[r], x[b]>`` (weight
    empty) or ``weight[r - row0] = W[r]`` (float32), W[r, g*D + i] = p_i * float32(gain * inv_norm[||p||^2]).
    Returns the first flat index r*G + g of a code out of range, or -1."""
    B = x.shape[0]
    gemv = weight.shape[0] == 0
    mask = (np.uint64(1) << np.uint64(nbits)) - np.uint64(1)
    ka, ca, kb, cb, gains = _tree_scratch(G, D)
    pts32 = np.empty(G * D // 4, np.uint32)
    pts = pts32.view(np.int8)
    scales = np.empty(G, np.float32)
    acc = np.zeros(max(B, 1), np.float32)
    for r in range(lo, hi):
        bad = _row_points(r, G, D, K, K + 2, offs.shape[0], nbits, mask, words, stream, total, offs, divs, recs, guide,
                          gscale, lbase, leaf32, ka, ca, kb, cb, pts32)
        if bad >= 0:
            return r * G + bad
        _row_gains(r, G, gain_mode, gains16, gidx, gbits, codebook, row_scale, esc_pos, esc_gain, gains)
        _group_scales(G, D, pts, gains, inv_norm, scales)
        if not gemv:
            for g in range(G):
                for i in range(D):
                    weight[r - row0, g * D + i] = np.float32(pts[g * D + i]) * scales[g]
            continue
        acc[:] = 0.0
        for g in range(G):
            for b in range(B):
                d = np.float32(0.0)
                for i in range(D):
                    d += np.float32(pts[g * D + i]) * x[b, g * D + i]
                acc[b] += scales[g] * d
        for b in range(B):
            out[b, r] = acc[b]
    return -1


@nb.njit(cache=True, nogil=True)
def pvq_fast_points(lo, hi, words, stream, nbits, D, G, K, total, offs, divs, recs, guide, gscale, lbase, leaf32,
                    inv_norm, gain_mode, gains16, gidx, gbits, codebook, row_scale, esc_pos, esc_gain, points, scales):
    """Rows lo..hi decoded to the int8 compute layout: ``points[r]`` the pyramid points of
    the row's groups, ``scales[r]`` their scales (so that ``points * scales`` is bit for bit
    the weight `pvq_fast_rows` forms). Returns the first bad flat index or -1."""
    mask = (np.uint64(1) << np.uint64(nbits)) - np.uint64(1)
    ka, ca, kb, cb, gains = _tree_scratch(G, D)
    for r in range(lo, hi):
        bad = _row_points(r, G, D, K, K + 2, offs.shape[0], nbits, mask, words, stream, total, offs, divs, recs, guide,
                          gscale, lbase, leaf32, ka, ca, kb, cb, points[r].view(np.uint32))
        if bad >= 0:
            return r * G + bad
        _row_gains(r, G, gain_mode, gains16, gidx, gbits, codebook, row_scale, esc_pos, esc_gain, gains)
        _group_scales(G, D, points[r], gains, inv_norm, scales[r])
    return -1


@lru_cache(maxsize=16)
def inv_norm_table(K: int) -> np.ndarray:
    """``1 / sqrt(n)`` (float64) for n = 0..K*K: a point's scale is ``float32(gain * table[||p||^2])``
    in every fast kernel and layout (so they agree bit for bit; the reference decoder divides
    by the norm, which differs from this by at most an ulp of float64)."""
    n = np.arange(K * K + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(n)


def fast_stream_args(stream: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(words, stream): the packed code stream's whole 8-byte words viewed as uint64 (no
    copy; a copy only where the buffer is not 8-byte aligned) and the stream itself."""
    n = (stream.shape[0] // 8) * 8
    head = stream[:n]
    if head.ctypes.data % 8:
        head = head.copy()
    return head.view(np.uint64), stream
