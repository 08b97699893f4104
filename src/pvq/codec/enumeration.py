"""Fischer's enumeration of the pyramid P(D, K): a bijection onto [0, N(D, K)).

Order (paper Appendix B, Algorithms 2 and 3): the first coordinate decides the block,
0 first, then +1, -1, +2, -2, ...; the block of value x_1 holds the codes of the
remaining D-1 coordinates with K-|x_1| pulses, N(D-1, K-|x_1|) of them, recursively.

Two implementations of the same map:
- `encode_reference` / `decode_reference`: Python big integers, the paper's algorithms
  line by line (Algorithm 3 with its fix: the offset skips the +j block before a -j).
  Slow; kept as the specification the tests compare against.
- `encode` / `decode`: whole batches in numba over fixed-width little-endian uint64
  limbs. Both use the cumulative table V of Appendix C, so a coordinate costs one pass
  over its limbs whatever its magnitude: encoding adds the beginning of the coordinate's
  block; decoding finds the block from float64 approximations of the remainder and of V
  (redone exactly when too close to call), then subtracts its beginning. See the comment
  above `_LANES`. A code of W limbs is a row of a (B, W) uint64 array; `words_to_ints` /
  `ints_to_words` convert to Python ints.

Over 500 lines because the slow big-integer reference sits beside the fast paths it
specifies (int64 numba, table-driven batches), as everywhere in the codec.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numba as nb
import numpy as np

from .counts import WordTables, check_dimension_pulses, count_table, word_tables
from .errors import CodecError

# --------------------------------------------------------------------------------------
# Reference: the paper's pseudocode over Python integers.


def _check_point(point: Sequence[int], K: int) -> list[int]:
    p = [int(v) for v in point]
    norm = sum(abs(v) for v in p)
    if norm != K:
        raise CodecError(f"point has L1 norm {norm}, not K={K}: it is not on the pyramid P({len(p)}, {K})")
    return p


def encode_reference(point: Sequence[int], K: int, counts: list[list[int]] | None = None) -> int:
    """Code of one pyramid point, Algorithm 2 of the paper verbatim (big integers)."""
    x = _check_point(point, K)
    D = len(x)
    check_dimension_pulses(D, K)
    N = counts if counts is not None else count_table(D, K)
    c, i, d, k = 0, 0, D, K
    while k != 0:
        m = abs(x[i])
        negative = 1 if x[i] < 0 else 0
        if m == 1:
            c += N[d - 1][k] + negative * N[d - 1][k - 1]
        elif m > 1:
            c += N[d - 1][k] + 2 * sum(N[d - 1][k - j] for j in range(1, m)) + negative * N[d - 1][k - m]
        k -= m
        d -= 1
        i += 1
    return c


def decode_reference(code: int, D: int, K: int, counts: list[list[int]] | None = None) -> list[int]:
    """Pyramid point of one code, Algorithm 3 of the paper with its fix (big integers).

    The pseudocode's `cb` in line 11 is read as the running offset z, and the loop
    advances i, d and k after each coordinate, which the listing leaves implicit.
    """
    check_dimension_pulses(D, K)
    N = counts if counts is not None else count_table(D, K)
    c = int(code)
    if c < 0 or c >= N[D][K]:
        raise CodecError(f"code {c} out of range [0, N({D},{K}) = {N[D][K]})")
    x = [0] * D
    z, i, d, k = 0, 0, D, K
    while k > 0:
        if c == z:
            # The smallest code of the remaining coordinates: zeros, then +k last.
            x[D - 1] = k
            k = 0
            break
        if c < z + N[d - 1][k]:
            x[i] = 0
        else:
            z += N[d - 1][k]
            j = 1
            while c >= z + 2 * N[d - 1][k - j]:
                z += 2 * N[d - 1][k - j]
                j += 1
            if c < z + N[d - 1][k - j]:
                x[i] = j
            else:
                x[i] = -j
                z += N[d - 1][k - j]  # the line Fischer's original listing misses
        k -= abs(x[i])
        d -= 1
        i += 1
    return x


# --------------------------------------------------------------------------------------
# The vectorised codec: one block formula per coordinate, whatever its magnitude.
#
# At a coordinate with d = r+1 coordinates and k pulses left, the code c of the suffix
# lies in [0, N(r+1, k)), split into blocks in Fischer's order 0, +1, -1, +2, -2, ...;
# the block of +-m holds N(r, k-m) codes. Name a block by j = k - |x| (pulses left after
# it) and s = [x <= 0], so x = 0 is (j, s) = (k, 1), and let
#     V'(r, j) = V(r, j) + 1 = N(r, 0) + ... + N(r, j),   V'(r, -1) = 0
# (V is the cumulative table of Appendix C). Since N(r+1, k) = N(r, k) + 2 V'(r, k-1):
#
# - Encoding: the block (j, s) begins at c = N(r+1, k) - V'(r, j) - V'(r, j-s), which is
#   Appendix C's N(r,k) + 2 (V(r,k-1) - V(r,j)) [+ N(r,j) for x < 0], and 0 for x = 0.
#   A code is the sum of these over the coordinates: one pass over the limbs with three
#   table rows per nonzero coordinate, constant work whatever |x| is.
#
# - Decoding counts codes from the top of the range instead, e = N(r+1, k) - 1 - c. In
#   that order the blocks run -k, +k, -(k-1), ..., +1, 0, the block (j, s) begins at
#   e = V'(r, j-1) + V'(r, j-s), and what remains after it, e - V'(r, j-1) - V'(r, j-s),
#   is the e of the suffix in P(r, j). So
#       j = the smallest j with e < 2 V'(r, j),   s = [e < V'(r, j) + V'(r, j-1)],
#   and one pass over the limbs subtracts two table rows. The compares are made on
#   float64 copies of e and of 2 V' ("guides"): a few float compares almost always
#   decide; one closer than the float error bound is redone exactly (`_exact_step`).
#
# Limbs are little-endian uint64; a carry is detected by the wrapped sum being smaller
# than an addend. Every value handled at a coordinate is below N(r+1, k) < 2^(64 w) with
# w = limbs[r+1, k], so the arithmetic there only touches w limbs (sums wrap modulo
# 2^(64 w) and come out exact).

# Decoding interleaves this many codes: the coordinates of one code form a chain of
# dependent decisions, so the core overlaps the chains of several codes.
_LANES = 8
# Guided search for j: the block sizes within 4 * _COARSE + 3 pulses are found without
# a data-dependent branch (coarse steps of 4, then single steps); rarer larger
# magnitudes continue in a loop.
_COARSE = 3
# Left padding of the rows of 2 V' guides: j = -1 reads 2 V'(r, -1) = 0 and lower j read
# -inf, so a search can never step below j = -1 (which the error checks reject).
_PAD = 16
# Float guides are exact below 2^52. Above, a guide and the float of a remainder read
# from its limbs are within 2^-50 S of the truth, S = 2 V'(r, k) >= N(r+1, k) the scale
# of the coordinate: a decision closer than _REL * S to a boundary is redone exactly.
# Values from 2^960 up have inf guides (float64 ends at 2^1024), which no decision
# trusts. See `_decode_words` for _LAG_REL.
_EXACT_FLOAT = 2.0**52
_REL = 2.0**-40
_LAG_REL = 2.0**-44
_FLOAT_LIMBS = 15


@nb.njit(inline="always")
def _ix(i):
    """Unsigned index: numba then skips its negative-index wraparound code."""
    return np.uint64(i)


@nb.njit(cache=True)
def _fill_guides(counts, cumul, limbs, v2, pw):
    """limbs[d, k] = limbs of N(d, k); v2[d, j + _PAD] ~ 2 V'(d, j) in float64 from the
    top three limbs of V(d, j) (relative error < 2^-50, exact below 2^52, inf from 2^960
    up) with the pads of `_PAD`; pw[w + 2] = 2^(64 w), pw[0] = pw[1] = 0 (`_approx`)."""
    D1, K1, W = counts.shape
    for w in range(W + 2):
        pw[w] = 0.0 if w < 2 else (2.0 ** (64 * (w - 2)) if w - 2 <= _FLOAT_LIMBS else np.inf)
    for d in range(D1):
        for j in range(_PAD - 1):
            v2[d, j] = -np.inf
        v2[d, _PAD - 1] = 0.0
        for k in range(K1):
            top = W - 1
            while top > 0 and counts[d, k, top] == 0:
                top -= 1
            limbs[d, k] = top + 1
            top = W - 1
            while top > 0 and cumul[d, k, top] == 0:
                top -= 1
            f = np.inf
            if top < _FLOAT_LIMBS:
                f = 0.0
                for w in range(top, max(top - 3, -1), -1):
                    f += float(cumul[d, k, w]) * pw[w + 2]
            v2[d, k + _PAD] = 2.0 * f + 2.0


@lru_cache(maxsize=16)
def _guides(D: int, K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(limbs, v2, pw) of `_fill_guides` for P(D, K), cached like the word tables."""
    tables = word_tables(D, K)
    limbs = np.empty((D + 1, K + 1), dtype=np.uint8)
    v2 = np.empty((D + 1, K + 1 + _PAD))
    pw = np.empty(tables.words + 2)
    _fill_guides(tables.counts, tables.cumulative, limbs, v2, pw)
    for arr in (limbs, v2, pw):
        arr.flags.writeable = False
    return limbs, v2, pw


@nb.njit(inline="always")
def _approx(rem, l, pw, W):
    """float64 of rem[l] (< 2^(64 W)) from its top three limbs; rem[l, :2] are zero pads."""
    return (
        float(rem[l, _ix(W + 1)]) * pw[_ix(W + 1)]
        + float(rem[l, _ix(W)]) * pw[_ix(W)]
        + float(rem[l, _ix(W - 1)]) * pw[_ix(W - 1)]
    )


# Exact multi-limb helpers on rem[l] (limb w at rem[l, w + 2]) for `_exact_step`.


@nb.njit(inline="always")
def _compare(rem, l, table, d, k, W, half):
    """Sign of (rem[l] >> half) - table[d, k]: -1, 0 or 1."""
    for w in range(W - 1, -1, -1):
        a = rem[l, w + 2]
        if half:
            a = (a >> np.uint64(1)) | (rem[l, w + 3] << np.uint64(63))
        t = table[d, k, w]
        if a != t:
            return -1 if a < t else 1
    return 0


@nb.njit(inline="always")
def _subtract(rem, l, table, d, k, borrow, W):
    """rem[l] -= table[d, k] + borrow (no underflow; borrow 0, 1 or 2)."""
    for w in range(W):
        a = rem[l, w + 2]
        t = table[d, k, w]
        s = a - t
        b1 = a < t
        u = s - borrow
        b2 = s < borrow
        rem[l, w + 2] = u
        borrow = np.uint64(b1) + np.uint64(b2)


@nb.njit(cache=True)
def _exact_step(rem, l, counts, cumul, r, k, W):
    """x at the coordinate of row r with k pulses, decided on the exact W-limb e in rem[l],
    which it reduces to the e of the suffix (module comment above)."""
    # j: smallest j with e < 2 V'(r, j) = 2 V(r, j) + 2, i.e. floor(e / 2) <= V(r, j).
    j = k
    while j > 0 and _compare(rem, l, cumul, r, j - 1, W, True) <= 0:
        j -= 1
    if j > 0:  # e -= 2 V'(r, j-1)
        _subtract(rem, l, cumul, r, j - 1, np.uint64(1), W)
        _subtract(rem, l, cumul, r, j - 1, np.uint64(1), W)
    # e is now in [0, 2 N(r, j)): the block -(k-j) comes first, then +(k-j).
    if _compare(rem, l, counts, r, j, W, False) < 0:
        return j - k
    _subtract(rem, l, counts, r, j, np.uint64(0), W)
    return k - j


@nb.njit(inline="always")
def _leave_block(rem, l, cumul, r, ja, jb, borrow, W):
    """rem[l] -= V(r, ja) + V(r, jb) + borrow over W limbs (borrow 0, 1 or 2)."""
    for w in range(W):
        uw = _ix(w)
        a = rem[l, uw + _ix(2)]
        v1 = cumul[r, ja, uw]
        v2 = cumul[r, jb, uw]
        d1 = a - v1
        b1 = a < v1
        d2 = d1 - v2
        b2 = d1 < v2
        d3 = d2 - borrow
        b3 = d2 < borrow
        borrow = np.uint64(b1) + np.uint64(b2) + np.uint64(b3)
        rem[l, uw + _ix(2)] = d3


@nb.njit(inline="always")
def _enter_block(acc, counts, cumul, r, k, ja, jb, borrow, W):
    """acc += N(r+1, k) - V(r, ja) - V(r, jb) - borrow over W limbs (borrow 0, 1 or 2)."""
    carry = np.uint64(0)
    for w in range(W):
        uw = _ix(w)
        a = acc[uw]
        n = counts[r + _ix(1), k, uw]
        t = a + n
        c1 = t < a
        t2 = t + carry
        c2 = t2 < t
        carry = np.uint64(c1 | c2)
        v1 = cumul[r, ja, uw]
        v2 = cumul[r, jb, uw]
        d1 = t2 - v1
        b1 = t2 < v1
        d2 = d1 - v2
        b2 = d1 < v2
        d3 = d2 - borrow
        b3 = d2 < borrow
        borrow = np.uint64(b1) + np.uint64(b2) + np.uint64(b3)
        acc[uw] = d3


# The limb loops above run over a width known only at run time. Dispatching on it to
# copies with a constant width lets LLVM unroll them completely (no loop branches,
# carries in registers); widths up to 8 limbs (512-bit codes) get their own copy.


@nb.njit(inline="always")
def _leave_block_any(rem, l, cumul, r, ja, jb, borrow, W):
    if W == 1:
        _leave_block(rem, l, cumul, r, ja, jb, borrow, 1)
    elif W == 2:
        _leave_block(rem, l, cumul, r, ja, jb, borrow, 2)
    elif W == 3:
        _leave_block(rem, l, cumul, r, ja, jb, borrow, 3)
    elif W == 4:
        _leave_block(rem, l, cumul, r, ja, jb, borrow, 4)
    elif W == 5:
        _leave_block(rem, l, cumul, r, ja, jb, borrow, 5)
    elif W == 6:
        _leave_block(rem, l, cumul, r, ja, jb, borrow, 6)
    elif W == 7:
        _leave_block(rem, l, cumul, r, ja, jb, borrow, 7)
    elif W == 8:
        _leave_block(rem, l, cumul, r, ja, jb, borrow, 8)
    else:
        _leave_block(rem, l, cumul, r, ja, jb, borrow, W)


@nb.njit(inline="always")
def _enter_block_any(acc, counts, cumul, r, k, ja, jb, borrow, W):
    if W == 1:
        _enter_block(acc, counts, cumul, r, k, ja, jb, borrow, 1)
    elif W == 2:
        _enter_block(acc, counts, cumul, r, k, ja, jb, borrow, 2)
    elif W == 3:
        _enter_block(acc, counts, cumul, r, k, ja, jb, borrow, 3)
    elif W == 4:
        _enter_block(acc, counts, cumul, r, k, ja, jb, borrow, 4)
    elif W == 5:
        _enter_block(acc, counts, cumul, r, k, ja, jb, borrow, 5)
    elif W == 6:
        _enter_block(acc, counts, cumul, r, k, ja, jb, borrow, 6)
    elif W == 7:
        _enter_block(acc, counts, cumul, r, k, ja, jb, borrow, 7)
    elif W == 8:
        _enter_block(acc, counts, cumul, r, k, ja, jb, borrow, 8)
    else:
        _enter_block(acc, counts, cumul, r, k, ja, jb, borrow, W)


@nb.njit(cache=True)
def _encode_words(points, K, counts, cumul, limbs, codes):
    """codes[b] = Fischer code of points[b] (rows of L1 norm K); codes has shape (B, W).

    Adds the block beginnings N(r+1, k) - V'(r, j) - V'(r, j-s) of the nonzero
    coordinates back to front: after coordinate i the sum is the code of the suffix,
    below N(r+1, k_i), so each addition only touches limbs[r+1, k_i] limbs. A first pass
    lists the nonzero coordinates, so the sum itself has no data-dependent branch.
    """
    B, D = points.shape
    W = codes.shape[1]
    where = np.empty(D, dtype=np.int64)  # indices of the nonzero coordinates
    pulses = np.empty(D, dtype=np.int64)  # pulses left before each of them
    acc = np.zeros(W, dtype=np.uint64)
    for b in range(B):
        k = K
        n = 0
        for i in range(D):
            x = points[b, i]
            where[n] = i
            pulses[n] = k
            n += x != 0
            k -= x if x > 0 else -x
        acc[:] = 0
        for q in range(n - 1, -1, -1):
            i = where[q]
            k = pulses[q]
            x = points[b, i]
            neg = x < 0
            j = k - (-x if neg else x)
            js = j - np.int64(neg)
            # V'(r, j) + V'(r, js) = V(r, j) + V(r, max(js, 0)) + [1 + (js >= 0)]
            borrow = np.uint64(1) + np.uint64(js >= 0)
            r = D - 1 - i
            width = limbs[_ix(r + 1), _ix(k)]
            _enter_block_any(acc, counts, cumul, _ix(r), _ix(k), _ix(j), _ix(max(js, 0)), borrow, width)
        codes[b, :] = acc


@nb.njit(inline="always")
def _decide(v2, r, k, e, tol):
    """Block (j, s) of a remainder known as e (float) to within tol, at row r with k
    pulses: j = smallest j with e < 2 V'(r, j), s = [e < V'(r, j) + V'(r, j-1)].

    Returns (j, s, 2 V'(r, j), 2 V'(r, j-1), ok). ok is False when a compare that fixed
    (j, s) was closer than tol, or a guide is inf or NaN: then (j, s) must not be used.
    """
    # Count the j' < k with e < 2 V'(r, j'), which are those >= j as V' grows: coarse
    # steps of 4 below k, then single steps. The pads stop the counts at j = -1.
    top = k + _PAD
    coarse = 0
    for g in range(1, _COARSE + 1):
        coarse += e < v2[r, _ix(top - 4 * g)]
    top -= 4 * coarse
    fine = 0
    for q in range(1, 4):
        fine += e < v2[r, _ix(top - q)]
    j = top - fine - _PAD
    if coarse == _COARSE:  # |x| beyond the window (rare): go on one by one
        while e < v2[r, _ix(j - 1 + _PAD)]:
            j -= 1
    hi = v2[r, _ix(j + _PAD)]
    lo = v2[r, _ix(j - 1 + _PAD)]
    mid = 0.5 * (hi + lo)
    neg = e < mid
    ok = (hi - e > tol) & (e - lo >= tol) & (abs(mid - e) >= tol)
    return j, neg, hi, lo, ok


@nb.njit(cache=True)
def _decode_words(codes, K, counts, cumul, limbs, v2, pw, points):
    """points[b] = pyramid point of codes[b] (all below N(D, K)); shape (B, D).

    Decodes _LANES codes side by side, coordinate by coordinate, on e = N - 1 - c (module
    comment above): float guides pick (j, s), one pass over the limbs subtracts the
    block's beginning; a decision too close to call takes `_exact_step` instead.

    The float of the next e is not read back from the limbs just written, which would
    chain each decision behind the previous limb pass. It is the float of this e (its
    limbs were written one step earlier) minus the float of the block's beginning,
    within 2^-47 S of the truth; the next decision allows for that (_LAG_REL S) and,
    only when too close to call, reads the limbs instead.
    """
    B, D = points.shape
    W = codes.shape[1]
    total = counts[D, K]
    rem = np.zeros((_LANES, W + 3), dtype=np.uint64)  # limb w of lane l at [l, w + 2]
    pulses = np.empty(_LANES, dtype=np.int64)
    approx = np.empty(_LANES)  # e of each lane as float64 ...
    tols = np.empty(_LANES)  # ... and its error bound
    for b0 in range(0, B, _LANES):
        nl = min(_LANES, B - b0)
        for l in range(nl):
            borrow = np.uint64(1)
            for w in range(W):  # e = N(D, K) - 1 - code
                a = total[w]
                t = codes[b0 + l, w]
                s = a - t
                b1 = a < t
                u = s - borrow
                b2 = s < borrow
                rem[l, w + 2] = u
                borrow = np.uint64(b1 | b2)
            pulses[l] = K
            approx[l] = np.nan  # the first decision reads the limbs
            tols[l] = 0.0
        for i in range(D - 1):
            r = _ix(D - 1 - i)
            alive = 0
            # The limb passes of this coordinate all take the widest lane's width (the
            # others' extra limbs are zeros): the width dispatch then repeats across the
            # lanes and is predicted, where per-lane widths would often mispredict.
            width = 1
            for l in range(nl):
                width = max(width, limbs[r + _ix(1), _ix(pulses[l])])
            for l in range(nl):
                ul = _ix(l)
                k = pulses[ul]
                w_e = limbs[r + _ix(1), _ix(k)]  # e < N(r+1, k) < 2^(64 w_e)
                exact_e = _approx(rem, ul, pw, w_e)
                j, neg, hi, lo, ok = _decide(v2, r, k, approx[ul], tols[ul])
                scale = v2[r, _ix(k + _PAD)]  # S = 2 V'(r, k)
                if not ok:
                    tol = scale * _REL if scale >= _EXACT_FLOAT else 0.0
                    j, neg, hi, lo, ok = _decide(v2, r, k, exact_e, tol)
                if ok:
                    # e -= V'(r, j-1) + V'(r, j-s), in limbs and (approximately) in float
                    js = j - np.int64(neg)
                    borrow = np.uint64(j >= 1) + np.uint64(js >= 0)
                    _leave_block_any(rem, ul, cumul, r, _ix(max(j - 1, 0)), _ix(max(js, 0)), borrow, width)
                    approx[ul] = exact_e - 0.5 * (lo + (lo if neg else hi))
                    x = k - j
                    points[b0 + l, i] = -x if neg else x
                    k = j
                else:
                    x = _exact_step(rem, l, counts, cumul, r, k, w_e)
                    points[b0 + l, i] = x
                    k -= abs(x)
                    approx[ul] = _approx(rem, ul, pw, limbs[r, _ix(k)])
                tols[ul] = scale * _LAG_REL if scale >= _EXACT_FLOAT else 0.0
                pulses[ul] = k
                alive |= k
            if alive == 0:
                break  # the remaining coordinates of these codes are all 0
        # The last coordinate takes what is left: e = 1 is +k, e = 0 is -k.
        for l in range(nl):
            k = pulses[l]
            points[b0 + l, D - 1] = k if rem[l, 2] == 1 else -k


@nb.njit(cache=True)
def _l1_norms(points):
    """np.abs(points).sum(axis=1) in one pass (int64, wrapping as numpy does)."""
    B, D = points.shape
    norms = np.empty(B, dtype=np.int64)
    for b in range(B):
        n = 0
        for i in range(D):
            x = points[b, i]
            n += x if x >= 0 else -x
        norms[b] = n
    return norms


@nb.njit(cache=True)
def _first_code_not_below(codes, bound):
    """Index of the first row of codes (B, W) that is >= bound (W,), or -1."""
    B, W = codes.shape
    for b in range(B):
        ge = True
        for w in range(W - 1, -1, -1):
            if codes[b, w] != bound[w]:
                ge = codes[b, w] > bound[w]
                break
        if ge:
            return b
    return -1


# --------------------------------------------------------------------------------------
# Conversions between Python ints and limb arrays.


def ints_to_words(values: Sequence[int], words: int) -> np.ndarray:
    """Python ints -> (B, words) little-endian uint64 limbs. Negative or too wide: CodecError."""
    out = np.zeros((len(values), words), dtype=np.uint64)
    nbytes = 8 * words
    buf = bytearray()
    for idx, v in enumerate(values):
        v = int(v)
        if v < 0:
            raise CodecError(f"code at index {idx} is negative ({v})")
        if v.bit_length() > 64 * words:
            raise CodecError(f"code at index {idx} needs {v.bit_length()} bits, more than {64 * words}")
        buf += v.to_bytes(nbytes, "little")
    if values:
        out[:] = np.frombuffer(bytes(buf), dtype="<u8").reshape(len(values), words)
    return out


def words_to_ints(codes: np.ndarray) -> list[int]:
    """(B, W) uint64 limbs -> Python ints."""
    codes = np.ascontiguousarray(codes, dtype="<u8")
    raw = codes.tobytes()
    step = 8 * codes.shape[1]
    return [int.from_bytes(raw[i : i + step], "little") for i in range(0, len(raw), step)]


# --------------------------------------------------------------------------------------
# Public batch API.


def _as_point_batch(points: np.ndarray) -> tuple[np.ndarray, bool]:
    arr = np.asarray(points)
    single = arr.ndim == 1
    if single:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise CodecError(f"points must be a 1-D vector or a 2-D batch (B, D), got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and arr.size and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        elif arr.size == 0:
            arr = arr.astype(np.int64)
        else:
            raise CodecError(f"points must be integers (pyramid points), got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64), single


def encode(points: np.ndarray, K: int, D: int | None = None) -> np.ndarray:
    """Codes of a batch of pyramid points.

    points: (B, D) integers with sum |p| = K per row (a 1-D point is a batch of one);
    `D`, when given, is checked against the points' length.
    Returns (B, W) uint64 limbs (W = `word_tables(D, K).words`), little-endian.
    """
    arr, _ = _as_point_batch(points)
    if D is not None and arr.shape[1] != D:
        raise CodecError(f"points have length {arr.shape[1]}, expected {D}")
    B, D = arr.shape
    check_dimension_pulses(D, K)
    if D == 0:
        raise CodecError("points have dimension 0")
    norms = _l1_norms(arr)
    bad = np.flatnonzero(norms != K)
    if bad.size:
        b = int(bad[0])
        raise CodecError(
            f"{bad.size} of {B} points are not on the pyramid P({D}, {K}); "
            f"first: row {b} has L1 norm {int(norms[b])}"
        )
    tables = word_tables(D, int(K))
    return _encode_with(arr, tables)


def _encode_with(points: np.ndarray, tables: WordTables) -> np.ndarray:
    codes = np.empty((points.shape[0], tables.words), dtype=np.uint64)
    limbs = _guides(tables.D, tables.K)[0]
    _encode_words(points, tables.K, tables.counts, tables.cumulative, limbs, codes)
    return codes


def decode(codes: np.ndarray, D: int, K: int) -> np.ndarray:
    """Pyramid points (B, D) int32 of codes given as (B, W) uint64 limbs.

    A 1-D integer array is read as single-limb codes (allowed when W == 1). Codes
    outside [0, N(D, K)) raise CodecError naming the first offending row.
    """
    check_dimension_pulses(D, K)
    if D == 0:
        raise CodecError("D must be at least 1")
    tables = word_tables(int(D), int(K))
    arr = np.asarray(codes)
    if arr.ndim == 1:
        if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
            raise CodecError(f"code at index {int(np.argmin(arr))} is negative ({int(arr.min())})")
        arr = arr[:, None]
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise CodecError(f"codes must be a (B, W) array of unsigned limbs, got shape {arr.shape} dtype {arr.dtype}")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise CodecError("codes contain negative limbs")
    if arr.shape[1] != tables.words:
        raise CodecError(f"codes have {arr.shape[1]} limbs per code, P({D},{K}) needs {tables.words}")
    work = np.array(arr, dtype=np.uint64, order="C")  # a writable copy: one compiled kernel type
    bad = _first_code_not_below(work, np.ascontiguousarray(tables.total_words))
    if bad >= 0:
        value = words_to_ints(work[bad : bad + 1])[0]
        raise CodecError(f"code at row {bad} is {value}, out of range [0, N({D},{K}) = {tables.total})")
    points = np.zeros((work.shape[0], D), dtype=np.int32)  # trailing zeros are not written
    _decode_words(work, tables.K, tables.counts, tables.cumulative, *_guides(int(D), int(K)), points)
    return points
