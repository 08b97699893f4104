"""The split enumeration of the pyramid P(D, K): a second bijection onto [0, N(D, K)),
chosen so that decoding is cheap per weight.

Any bijection stores the same bits; Fischer's (`pvq.codec.enumeration`) walks the D
coordinates one after the other, each step a multi-limb comparison against a table row.
The split order instead cuts the vector in two halves, as Opus/CELT splits long bands:

* D = 1: P(1, 0) = {(0)} has code 0; for k > 0, +k has code 0 and -k code 1.
* D > 1: left part L = D // 2 coordinates, right part D - L. The points are ordered by
  the pulses kl of the left part (0 first), then by the left part's code cl, then by the
  right part's code cr:

      code = Off(D, K, kl) + cl * N(D - L, K - kl) + cr,
      Off(D, K, kl) = sum_{j < kl} N(L, j) * N(D - L, K - j).

  A bijection by induction: for fixed kl the pairs (cl, cr) fill
  [Off(kl), Off(kl + 1)) exactly, and Off(K + 1) = N(D, K).

Decoding a node takes one search among at most K + 1 offsets and one integer division;
a D = 16 vector is 3 levels of splits down to pairs, and a pair P(2, k) decodes with a
few shifts (`_decode_pair`). The fast implementation keeps a whole code in one int64
below 2^53, so that a float64 reciprocal gives each quotient exactly after one
correction; it serves every (D, K) with N(D, K) <= 2^53 (`split_supported`); the reference
implementation (`split_encode_reference` / `split_decode_reference`, Python integers,
the recursion above verbatim) is the specification the tests compare against and works
for any size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numba as nb
import numpy as np

from .counts import check_dimension_pulses, count_table, pyramid_count
from .enumeration import _check_point
from .errors import CodecError

__all__ = [
    "SplitTables",
    "split_decode",
    "split_decode_many",
    "split_decode_reference",
    "split_encode",
    "split_encode_reference",
    "split_supported",
    "split_tables",
]

# --------------------------------------------------------------------------------------
# Reference: the recursion over Python integers.


def _offset(D: int, K: int, kl: int) -> int:
    L = D // 2
    return sum(pyramid_count(L, j) * pyramid_count(D - L, K - j) for j in range(kl))


def split_encode_reference(point: Sequence[int], K: int) -> int:
    """Split-order code of one pyramid point (Python integers, any size)."""
    p = list(point)
    check_dimension_pulses(len(p), K)
    if not p:
        raise CodecError("D must be at least 1")
    return _encode_ref(_check_point(p, K), K)


def _encode_ref(p: list[int], K: int) -> int:
    D = len(p)
    if D == 1:
        return 1 if p[0] < 0 else 0
    L = D // 2
    kl = sum(abs(v) for v in p[:L])
    cl = _encode_ref(p[:L], kl)
    cr = _encode_ref(p[L:], K - kl)
    return _offset(D, K, kl) + cl * pyramid_count(D - L, K - kl) + cr


def split_decode_reference(code: int, D: int, K: int) -> list[int]:
    """Pyramid point of one split-order code (Python integers, any size)."""
    check_dimension_pulses(D, K)
    if D == 0:
        raise CodecError("D must be at least 1")
    c = int(code)
    if c < 0 or c >= pyramid_count(D, K):
        raise CodecError(f"code {c} out of range [0, N({D},{K}) = {pyramid_count(D, K)})")
    return _decode_ref(c, D, K)


def _decode_ref(c: int, D: int, K: int) -> list[int]:
    if D == 1:
        return [0] if K == 0 else [K if c == 0 else -K]
    L = D // 2
    kl = 0
    while c >= _offset(D, K, kl + 1):
        kl += 1
    c -= _offset(D, K, kl)
    cl, cr = divmod(c, pyramid_count(D - L, K - kl))
    return _decode_ref(cl, L, kl) + _decode_ref(cr, D - L, K - kl)


# --------------------------------------------------------------------------------------
# Fast: one uint64 per code, the tree of splits flattened in preorder.

#: Codes of the fast codec stay below this (53-bit codes; wider pyramids use Fischer's order).
MAX_CODE = 1 << 53
#: Guide buckets per (node kind, k): where the search for the left part's pulses starts.
GUIDE_BUCKETS = 128
#: Most entries of the table of P(4, k) points (4 bytes each, k = 0..leaf_kmax).
MAX_LEAF_ENTRIES = 1 << 19
#: Dimensions with an unrolled decoder (4-coordinate leaves from the table); others walk the tree.
UNROLLED = (4, 8, 16, 32)


def split_supported(D: int, K: int) -> bool:
    """Whether the fast codec handles P(D, K): every code below 2^53 (exact in float64,
    which the decoder's divisions rely on) and |x_i| <= K fits int16."""
    return D >= 1 and K < 1 << 15 and pyramid_count(D, K) <= MAX_CODE


@dataclass(frozen=True)
class SplitTables:
    """Everything the fast split codec reads for P(D, K).

    The tree of splits in preorder: node n covers [start[n], start[n] + length[n]); a node
    of more than 2 coordinates has children left[n], right[n] (indices > n) and a table
    kind ``kind[n] = kind_of_length[length[n]]``; nodes of 1 or 2 coordinates are leaves
    decoded arithmetically. For kind t and k pulses, ``offsets[t, k, kl]`` is Off(kl),
    kl = 0..k+1, ``divisors[t, k, kl]`` is N(right length, k - kl), ``reciprocals`` its
    float64 inverse, and ``guide[t, k, j]`` the kl of the block holding code
    ``floor(j * N / GUIDE_BUCKETS)`` (``guide_scale[t, k] = GUIDE_BUCKETS / N``). The
    unrolled decoders (when leaf_kmax >= K) read 4-coordinate nodes from
    ``leaf_points[leaf_base[k] + code]`` (the same points, tabulated).
    """

    D: int
    K: int
    start: np.ndarray
    length: np.ndarray
    left: np.ndarray
    right: np.ndarray
    kind: np.ndarray
    kind_of_length: np.ndarray
    offsets: np.ndarray
    divisors: np.ndarray
    reciprocals: np.ndarray
    guide: np.ndarray
    guide_scale: np.ndarray
    leaf_kmax: int
    leaf_base: np.ndarray
    leaf_points: np.ndarray
    total: int

    @property
    def arrays(self) -> tuple:
        """What `split_decode_one` reads after (code, D, K), in its order (passed one by one:
        numba would count references on every access to arrays held in a tuple)."""
        return (self.start, self.length, self.left, self.right, self.kind, self.kind_of_length, self.offsets,
                self.divisors, self.reciprocals, self.guide, self.guide_scale, np.int64(self.leaf_kmax),
                self.leaf_base, self.leaf_points)


@lru_cache(maxsize=64)
def split_tables(D: int, K: int) -> SplitTables:
    check_dimension_pulses(D, K)
    if not split_supported(D, K):
        raise CodecError(f"the split codec keeps a code below 2^53; N({D},{K}) = {pyramid_count(D, K)} does not fit")
    cols: list[list[int]] = [[], [], [], [], []]
    kinds: dict[int, int] = {}

    def add(s: int, n: int) -> int:
        idx = len(cols[0])
        for col, v in zip(cols, (s, n, -1, -1, -1)):
            col.append(v)
        if n > 2:
            cols[4][idx] = kinds.setdefault(n, len(kinds))
            half = n // 2
            cols[2][idx] = add(s, half)
            cols[3][idx] = add(s + half, n - half)
        return idx

    add(0, D)
    if D in UNROLLED:
        kinds.setdefault(4, len(kinds))
    kind_of_length = np.full(D + 1 if D >= 4 else 5, -1, dtype=np.int64)
    T = len(kinds)  # none for D <= 2: no node is split
    offsets = np.zeros((T, K + 1, K + 2), dtype=np.int64)
    divisors = np.ones((T, K + 1, K + 1), dtype=np.int64)
    guide = np.zeros((T, K + 1, GUIDE_BUCKETS), dtype=np.int64)
    guide_scale = np.zeros((T, K + 1), dtype=np.float64)
    # every count here is at most N(D, K) < 2^53, so int64 holds the products and sums exactly
    counts = np.array(count_table(D, K), dtype=np.int64) if kinds else None
    buckets = np.arange(GUIDE_BUCKETS, dtype=np.int64)
    for n, t in kinds.items():
        kind_of_length[n] = t
        left, right = counts[n // 2], counts[n - n // 2]
        for k in range(K + 1):
            divisors[t, k, : k + 1] = right[k::-1]
            offs = np.concatenate(([0], np.cumsum(left[: k + 1] * right[k::-1])))
            offsets[t, k, : k + 2] = offs
            guide_scale[t, k] = GUIDE_BUCKETS / offs[-1]
            # the block kl holding code floor(j N / GUIDE_BUCKETS): the last offset <= it
            guide[t, k] = np.searchsorted(offs, buckets * offs[-1] // GUIDE_BUCKETS, side="right") - 1
    # the table of P(4, k) points for the unrolled decoders, as many k as fit
    reciprocals = 1.0 / divisors.astype(np.float64)
    leaf_kmax = -1
    leaf_base = np.zeros(K + 2, dtype=np.int64)
    entries = 0
    if D in UNROLLED:
        for k in range(K + 1):
            if entries + pyramid_count(4, k) > MAX_LEAF_ENTRIES:
                break
            leaf_base[k] = entries
            entries += pyramid_count(4, k)
            leaf_kmax = k
        leaf_base[leaf_kmax + 1] = entries  # so leaf_base[k + 1] - leaf_base[k] = N(4, k)
    leaf_points = np.zeros((max(entries, 1), 4), dtype=np.int8 if K <= 127 else np.int16)
    if entries:
        t4 = kind_of_length[4]
        _fill_leaf_table(leaf_kmax, leaf_base, t4, offsets, divisors, reciprocals, guide, guide_scale, leaf_points)
    as_arr = lambda v: np.asarray(v, dtype=np.int64)
    return SplitTables(D, K, *(as_arr(c) for c in cols), kind_of_length, offsets, divisors, reciprocals, guide,
                       guide_scale, leaf_kmax, leaf_base, leaf_points, pyramid_count(D, K))


@nb.njit(inline="always")
def _split_node(c, k, t, offsets, divisors, reciprocals, guide, guide_scale):
    """One inner node of kind t: (left pulses kl, left code, right code) of code c < Off(k + 1)."""
    # branch-free where the outcome is data-dependent (a mispredicted branch costs more
    # than the whole node): the guide is right or one short for almost every code
    j = min(np.int64(np.float64(c) * guide_scale[t, k]), guide.shape[2] - 1)
    kl = guide[t, k, j]
    kl += np.int64(c >= offsets[t, k, kl + 1])
    while c >= offsets[t, k, kl + 1]:
        kl += 1
    while c < offsets[t, k, kl]:
        kl -= 1
    q, r = divmod_by_reciprocal(c - offsets[t, k, kl], divisors[t, k, kl], reciprocals[t, k, kl])
    return kl, q, r


@nb.njit(inline="always")
def divmod_by_reciprocal(c, d, rec):
    """(c // d, c % d) for 0 <= c < 2^53 by the float reciprocal rec = 1/d: c is exact in
    float64 and the product is within 1 of the quotient, so one correction each way (no
    division, no loop)."""
    q = np.int64(np.float64(c) * rec)
    r = c - q * d
    low = np.int64(r < 0)
    q -= low
    r += low * d
    high = np.int64(r >= d)
    q += high
    r -= high * d
    return q, r


@nb.njit(inline="always")
def _decode_pair(c, k, out, pos):
    """P(2, k) in split order (1 + 1): (0, +-k), then (+-kl, +-(k-kl)) for kl = 1..k-1, then (+-k, 0)."""
    if k == 0:
        out[pos] = 0
        out[pos + 1] = 0
    elif c < 2:
        out[pos] = 0
        out[pos + 1] = k if c == 0 else -k
    elif c >= 4 * k - 2:
        out[pos] = k if c == 4 * k - 2 else -k
        out[pos + 1] = 0
    else:
        c -= 2
        kl = 1 + (c >> 2)
        out[pos] = kl if (c & 2) == 0 else -kl
        out[pos + 1] = (k - kl) if (c & 1) == 0 else kl - k


@nb.njit(cache=True)
def _fill_leaf_table(kmax, leaf_base, t4, offsets, divisors, reciprocals, guide, guide_scale, leaf_points):
    """leaf_points[leaf_base[k] + c] = the point of code c in P(4, k) (one split into pairs)."""
    out = np.zeros(4, np.int64)
    for k in range(kmax + 1):
        for c in range(leaf_base[k + 1] - leaf_base[k]):
            if k == 0:
                out[:] = 0
            else:
                kl, cl, cr = _split_node(c, k, t4, offsets, divisors, reciprocals, guide, guide_scale)
                _decode_pair(cl, kl, out, 0)
                _decode_pair(cr, k - kl, out, 2)
            for i in range(4):
                leaf_points[leaf_base[k] + c, i] = out[i]


@nb.njit(inline="always")
def _decode4(c, k, kl_, of, dv, rc, gd, gs, kmax, lb, lp, out, pos):
    """4 coordinates from the table (k <= kmax: the caller checks)."""
    e = lb[k] + c
    out[pos] = lp[e, 0]
    out[pos + 1] = lp[e, 1]
    out[pos + 2] = lp[e, 2]
    out[pos + 3] = lp[e, 3]


@nb.njit(inline="always")
def _decode8(c, k, kl_, of, dv, rc, gd, gs, kmax, lb, lp, out, pos):
    kl, cl, cr = _split_node(c, k, kl_[8], of, dv, rc, gd, gs)
    _decode4(cl, kl, kl_, of, dv, rc, gd, gs, kmax, lb, lp, out, pos)
    _decode4(cr, k - kl, kl_, of, dv, rc, gd, gs, kmax, lb, lp, out, pos + 4)


@nb.njit(inline="always")
def _decode16(c, k, kl_, of, dv, rc, gd, gs, kmax, lb, lp, out, pos):
    kl, cl, cr = _split_node(c, k, kl_[16], of, dv, rc, gd, gs)
    _decode8(cl, kl, kl_, of, dv, rc, gd, gs, kmax, lb, lp, out, pos)
    _decode8(cr, k - kl, kl_, of, dv, rc, gd, gs, kmax, lb, lp, out, pos + 8)


@nb.njit(inline="always")
def _decode32(c, k, kl_, of, dv, rc, gd, gs, kmax, lb, lp, out, pos):
    kl, cl, cr = _split_node(c, k, kl_[32], of, dv, rc, gd, gs)
    _decode16(cl, kl, kl_, of, dv, rc, gd, gs, kmax, lb, lp, out, pos)
    _decode16(cr, k - kl, kl_, of, dv, rc, gd, gs, kmax, lb, lp, out, pos + 16)


@nb.njit(inline="always")
def _decode_tree(code, K, start, length, left, right, kind, of, dv, rc, gd, gs, cs, ks, out):
    cs[0] = code
    ks[0] = K
    for n in range(start.shape[0]):
        c = cs[n]
        k = ks[n]
        ln = length[n]
        if ln == 2:
            _decode_pair(c, k, out, start[n])
        elif ln == 1:
            out[start[n]] = 0 if k == 0 else (k if c == 0 else -k)
        else:
            kl, cl, cr = _split_node(c, k, kind[n], of, dv, rc, gd, gs)
            cs[left[n]] = cl
            ks[left[n]] = kl
            cs[right[n]] = cr
            ks[right[n]] = k - kl


@nb.njit(inline="always")
def split_decode_many(codes, D, K, start, length, left, right, kind, kl_, of, dv, rc, gd, gs, kmax, lb, lp, cs, ks,
                      points):
    """Decode codes (n,) int64 (each < N(D, K)) into points (n, D); the arguments after K
    are `SplitTables.arrays`, cs/ks scratch of the tree's size.

    D = 4, 8, 16, 32 with every leaf in the table run unrolled (straight-line code),
    other D walk the tree; the order is the same. The choice is made once per call,
    outside the loop: a dispatch inside it costs numba's loop several times its work."""
    n = codes.shape[0]
    if kmax >= K and D == 16:
        for b in range(n):
            _decode16(codes[b], K, kl_, of, dv, rc, gd, gs, kmax, lb, lp, points[b], 0)
    elif kmax >= K and D == 8:
        for b in range(n):
            _decode8(codes[b], K, kl_, of, dv, rc, gd, gs, kmax, lb, lp, points[b], 0)
    elif kmax >= K and D == 32:
        for b in range(n):
            _decode32(codes[b], K, kl_, of, dv, rc, gd, gs, kmax, lb, lp, points[b], 0)
    elif kmax >= K and D == 4:
        for b in range(n):
            _decode4(codes[b], K, kl_, of, dv, rc, gd, gs, kmax, lb, lp, points[b], 0)
    else:
        for b in range(n):
            _decode_tree(codes[b], K, start, length, left, right, kind, of, dv, rc, gd, gs, cs, ks, points[b])


@nb.njit(cache=True)
def _split_decode_batch(codes, D, K, start, length, left, right, kind, kl_, of, dv, rc, gd, gs, kmax, lb, lp, points):
    nn = start.shape[0]
    cs = np.empty(nn, np.int64)
    ks = np.empty(nn, np.int64)
    split_decode_many(codes, D, K, start, length, left, right, kind, kl_, of, dv, rc, gd, gs, kmax, lb, lp, cs, ks,
                      points)


@nb.njit(cache=True)
def _split_encode_batch(points, start, length, left, right, kind, offsets, divisors, codes):
    nn = start.shape[0]
    cs = np.empty(nn, np.int64)
    ks = np.empty(nn, np.int64)
    for b in range(points.shape[0]):
        p = points[b]
        for n in range(nn - 1, -1, -1):  # children after their parent in preorder: go backwards
            ln = length[n]
            s = start[n]
            if ln == 1:
                ks[n] = abs(p[s])
                cs[n] = 1 if p[s] < 0 else 0
            elif ln == 2:
                # P(2, k): (0, +-k), then (+-kl, +-(k-kl)) for kl = 1..k-1, then (+-k, 0)
                a = p[s]
                b2 = p[s + 1]
                k = abs(a) + abs(b2)
                ks[n] = k
                if a == 0:
                    cs[n] = 0 if b2 >= 0 else 1
                elif b2 == 0:
                    cs[n] = 4 * k - 2 if a > 0 else 4 * k - 1
                else:
                    cs[n] = 2 + 4 * (abs(a) - 1) + (0 if a > 0 else 2) + (0 if b2 > 0 else 1)
            else:
                t = kind[n]
                kl = ks[left[n]]
                k = kl + ks[right[n]]
                ks[n] = k
                cs[n] = offsets[t, k, kl] + cs[left[n]] * divisors[t, k, kl] + cs[right[n]]
        codes[b] = cs[0]


def _as_points(points: np.ndarray, K: int) -> np.ndarray:
    arr = np.asarray(points)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise CodecError(f"points must be a (B, D) integer array, got shape {arr.shape} dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    norms = np.abs(arr).sum(axis=1)
    bad = np.flatnonzero(norms != K)
    if bad.size:
        raise CodecError(f"point at row {int(bad[0])} has L1 norm {int(norms[bad[0]])}, not K={K}")
    return arr


def split_encode(points: np.ndarray, K: int) -> np.ndarray:
    """Split-order codes (B,) uint64 of pyramid points (B, D)."""
    arr = _as_points(points, K)
    tb = split_tables(int(arr.shape[1]), int(K))
    codes = np.empty(arr.shape[0], dtype=np.int64)
    _split_encode_batch(arr, tb.start, tb.length, tb.left, tb.right, tb.kind, tb.offsets, tb.divisors, codes)
    return codes.view(np.uint64)


def split_decode(codes: np.ndarray, D: int, K: int) -> np.ndarray:
    """Pyramid points (B, D) int32 of split-order codes (B,) or (B, 1) uint64; codes
    outside [0, N(D, K)) raise CodecError naming the first offending row."""
    tb = split_tables(int(D), int(K))
    arr = np.asarray(codes)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise CodecError(f"codes must be a 1-D array of single-limb codes, got shape {arr.shape} dtype {arr.dtype}")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise CodecError(f"code at row {int(np.argmin(arr))} is negative ({int(arr.min())})")
    work = np.ascontiguousarray(arr, dtype=np.uint64)
    bad = np.flatnonzero(work >= np.uint64(tb.total))
    if bad.size:
        raise CodecError(f"code at row {int(bad[0])} is {int(work[bad[0]])}, out of range [0, N({D},{K}) = {tb.total})")
    work = work.view(np.int64)
    points = np.empty((work.shape[0], int(D)), dtype=np.int32)
    _split_decode_batch(work, np.int64(D), np.int64(K), *tb.arrays, points)
    return points
