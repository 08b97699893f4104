"""Fischer's enumeration of the pyramid P(D, K): a bijection onto [0, N(D, K)).

Order (paper Appendix B, Algorithms 2 and 3): the first coordinate decides the block,
0 first, then +1, -1, +2, -2, ...; the block of value x_1 holds the codes of the
remaining D-1 coordinates with K-|x_1| pulses, N(D-1, K-|x_1|) of them, recursively.

Two implementations of the same map:
- `encode_reference` / `decode_reference`: Python big integers, the paper's algorithms
  line by line (Algorithm 3 with its fix: the offset skips the +j block before a -j).
  Slow; kept as the specification the tests compare against.
- `encode` / `decode`: whole batches in numba over fixed-width little-endian uint64
  limbs. Encoding uses the cumulative table V of Appendix C, so every coordinate costs
  O(W) whatever its magnitude; decoding walks the magnitude blocks, O(W) per pulse.
  A code of W limbs is a row of a (B, W) uint64 array; `words_to_ints` / `ints_to_words`
  convert to Python ints.
"""

from __future__ import annotations

from collections.abc import Sequence

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
# Multi-word helpers (numba). Limbs are little-endian uint64; carries are detected by
# the wrapped sum being smaller than an addend.


@nb.njit(cache=True, inline="always")
def _add_row(acc, b, table, d, k, W):
    """acc[b] += table[d, k]."""
    carry = np.uint64(0)
    for w in range(W):
        a = acc[b, w]
        s = a + table[d, k, w]
        c1 = s < a
        t = s + carry
        c2 = t < s
        acc[b, w] = t
        carry = np.uint64(c1 | c2)


@nb.njit(cache=True, inline="always")
def _sub_row(acc, b, table, d, k, W):
    """acc[b] -= table[d, k] (caller guarantees no underflow)."""
    borrow = np.uint64(0)
    for w in range(W):
        a = acc[b, w]
        t = table[d, k, w]
        s = a - t
        b1 = a < t
        u = s - borrow
        b2 = s < borrow
        acc[b, w] = u
        borrow = np.uint64(b1 | b2)


@nb.njit(cache=True, inline="always")
def _less_than_row(acc, b, table, d, k, W):
    """acc[b] < table[d, k]."""
    for w in range(W - 1, -1, -1):
        a = acc[b, w]
        t = table[d, k, w]
        if a != t:
            return a < t
    return False


@nb.njit(cache=True, inline="always")
def _half_less_than_row(acc, b, table, d, k, W):
    """floor(acc[b] / 2) < table[d, k], i.e. acc[b] < 2 * table[d, k]."""
    for w in range(W - 1, -1, -1):
        a = acc[b, w] >> np.uint64(1)
        if w + 1 < W:
            a |= acc[b, w + 1] << np.uint64(63)
        t = table[d, k, w]
        if a != t:
            return a < t
    return False


@nb.njit(cache=True)
def _encode_words(points, K, counts, cumul, row_words, codes):
    """codes[b] = Fischer code of points[b]; codes zero-initialised, shape (B, W).

    Runs back to front: after coordinate i the sum is the code of the suffix
    (x_i, ..., x_{D-1}) in P(D-i, k_i), below N(D-i, k_i), so each step's additions
    only touch row_words[D-1-i] limbs.
    """
    B, D = points.shape
    W = codes.shape[1]
    span = np.zeros((1, W), dtype=np.uint64)
    pulses_left = np.empty(D, dtype=np.int64)  # k_i: pulses before coordinate i
    for b in range(B):
        k = K
        last = -1
        for i in range(D):
            pulses_left[i] = k
            x = points[b, i]
            if x != 0:
                last = i
                k -= x if x > 0 else -x
        for i in range(last, -1, -1):
            x = points[b, i]
            m = x if x >= 0 else -x
            if m == 0:
                continue
            k = pulses_left[i]
            r = D - 1 - i  # row d-1 of the paper, d = D - i coordinates left
            w_r = row_words[r]
            # c += N(r, k) + 2 (V(r, k-1) - V(r, k-m)) + [x < 0] N(r, k-m)   (App. C)
            _add_row(codes, b, counts, r, k, w_r)
            if m > 1:
                for w in range(w_r):
                    span[0, w] = cumul[r, k - 1, w]
                _sub_row(span, 0, cumul, r, k - m, w_r)
                for _ in range(2):
                    carry = np.uint64(0)
                    for w in range(w_r):
                        a = codes[b, w]
                        s = a + span[0, w]
                        c1 = s < a
                        t = s + carry
                        c2 = t < s
                        codes[b, w] = t
                        carry = np.uint64(c1 | c2)
            if x < 0:
                _add_row(codes, b, counts, r, k - m, w_r)


@nb.njit(cache=True)
def _decode_words(codes, K, counts, row_words, points):
    """points[b] = pyramid point of codes[b]; points zero-initialised, shape (B, D).
    Destroys `codes` (used as the running remainder, below N(D-i, k_i) at coordinate i,
    so each step works on row_words[D-1-i] limbs)."""
    B, D = points.shape
    for b in range(B):
        k = K
        for i in range(D):
            if k == 0:
                break
            r = D - 1 - i
            W = row_words[r]
            if _less_than_row(codes, b, counts, r, k, W):
                continue  # x_i = 0
            _sub_row(codes, b, counts, r, k, W)
            m = 1
            # Blocks +m, -m hold N(r, k-m) codes each; skip whole pairs while past them.
            while not _half_less_than_row(codes, b, counts, r, k - m, W):
                _sub_row(codes, b, counts, r, k - m, W)
                _sub_row(codes, b, counts, r, k - m, W)
                m += 1
            if _less_than_row(codes, b, counts, r, k - m, W):
                points[b, i] = m
            else:
                _sub_row(codes, b, counts, r, k - m, W)
                points[b, i] = -m
            k -= m


@nb.njit(cache=True)
def _encode_one_word(points, K, counts, cumul, codes):
    """Single-limb specialisation of `_encode_words` (codes below 2^64): plain uint64 sums."""
    B, D = points.shape
    for b in range(B):
        k = K
        c = np.uint64(0)
        for i in range(D):
            if k == 0:
                break
            x = points[b, i]
            m = x if x >= 0 else -x
            if m == 0:
                continue
            r = D - 1 - i
            c += counts[r, k] + np.uint64(2) * (cumul[r, k - 1] - cumul[r, k - m])
            if x < 0:
                c += counts[r, k - m]
            k -= m
        codes[b] = c


@nb.njit(cache=True)
def _decode_one_word(codes, K, counts, points):
    """Single-limb specialisation of `_decode_words`."""
    B, D = points.shape
    for b in range(B):
        c = codes[b]
        k = K
        for i in range(D):
            if k == 0:
                break
            r = D - 1 - i
            n = counts[r, k]
            if c < n:
                continue
            c -= n
            m = 1
            n = counts[r, k - m]
            while (c >> np.uint64(1)) >= n:  # c >= 2n without overflowing 2n
                c -= n
                c -= n
                m += 1
                n = counts[r, k - m]
            if c < n:
                points[b, i] = m
            else:
                c -= n
                points[b, i] = -m
            k -= m


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
    norms = np.abs(arr).sum(axis=1)
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
    B = points.shape[0]
    if tables.words == 1:
        flat = np.zeros(B, dtype=np.uint64)
        _encode_one_word(points, tables.K, tables.counts[:, :, 0], tables.cumulative[:, :, 0], flat)
        return flat[:, None]
    codes = np.zeros((B, tables.words), dtype=np.uint64)
    _encode_words(points, tables.K, tables.counts, tables.cumulative, tables.row_words, codes)
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
    work = np.array(arr, dtype=np.uint64, order="C")  # decoding consumes its copy
    bad = _first_code_not_below(work, np.ascontiguousarray(tables.total_words))
    if bad >= 0:
        value = words_to_ints(work[bad : bad + 1])[0]
        raise CodecError(f"code at row {bad} is {value}, out of range [0, N({D},{K}) = {tables.total})")
    points = np.zeros((work.shape[0], D), dtype=np.int32)
    if tables.words == 1:
        _decode_one_word(work[:, 0].copy(), tables.K, tables.counts[:, :, 0], points)
    else:
        _decode_words(work, tables.K, tables.counts, tables.row_words, points)
    return points
