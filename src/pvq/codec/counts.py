"""Exact sizes of the PVQ codebook: N(D, K) = |P(D, K)|, the number of integer points
of L1 norm exactly K in D dimensions, and what follows from it (pulses for a bit budget,
code widths).

Recurrence (the paper's eq. 5 has a typo; this is the correct one, Fischer 1986):
    N(D, K) = N(D-1, K) + N(D, K-1) + N(D-1, K-1),  N(d, 0) = 1,  N(0, k>0) = 0.
Python integers are exact at any size; `WordTables` holds the same numbers as
little-endian uint64 limbs for the vectorised encoder/decoder.
"""

from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass
from functools import lru_cache

import numba as nb
import numpy as np

from .errors import CodecError

# Limits the codec promises to handle (issue: D up to 1024, K up to 4096). Larger values
# work for the big-integer functions but the word tables grow as D*K*bits.
MAX_DIMENSION = 1 << 16
MAX_PULSES = 1 << 16
# Refuse word tables above this many bytes (both tables together) with a clear error.
MAX_TABLE_BYTES = 8 << 30


def check_dimension_pulses(D: int, K: int) -> None:
    """Raise CodecError unless D and K are integers in the supported range."""
    for name, value, upper in (("D", D, MAX_DIMENSION), ("K", K, MAX_PULSES)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise CodecError(f"{name} must be an integer, got {value!r}")
        if value < 0 or value > upper:
            raise CodecError(f"{name}={value} out of range [0, {upper}]")
    if D == 0 and K > 0:
        raise CodecError(f"P(0, {K}) is empty: a 0-dimensional vector cannot hold {K} pulses")


@lru_cache(maxsize=4096)
def pyramid_count(D: int, K: int) -> int:
    """N(D, K), exact, by the closed form sum_j 2^j C(D, j) C(K-1, j-1).

    The closed form (j = number of nonzero coordinates: choose them, their signs, and a
    composition of K into j positive parts) is independent of the recurrence used for
    the tables, so each checks the other in the tests.
    """
    if isinstance(D, bool) or isinstance(K, bool):
        raise CodecError("D and K must be integers, not booleans")
    D, K = int(D), int(K)
    if D < 0 or K < 0:
        raise CodecError(f"D={D} and K={K} must be non-negative")
    if K == 0:
        return 1
    return sum((1 << j) * math.comb(D, j) * math.comb(K - 1, j - 1) for j in range(1, min(D, K) + 1))


def count_table(D: int, K: int) -> list[list[int]]:
    """Exact table T[d][k] = N(d, k) for 0 <= d <= D, 0 <= k <= K (Python ints)."""
    for name, value in (("D", D), ("K", K)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise CodecError(f"{name} must be a non-negative integer, got {value!r}")
    table = [[0] * (K + 1) for _ in range(D + 1)]
    for d in range(D + 1):
        table[d][0] = 1
    for d in range(1, D + 1):
        prev, row = table[d - 1], table[d]
        for k in range(1, K + 1):
            row[k] = prev[k] + row[k - 1] + prev[k - 1]
    return table


def cumulative_table(counts: list[list[int]]) -> list[list[int]]:
    """V[d][k] = sum_{i=1..k} N(d, i) (paper Appendix C, eq. 11), from a count table."""
    out = []
    for row in counts:
        acc, vrow = 0, [0]
        for n in row[1:]:
            acc += n
            vrow.append(acc)
        out.append(vrow)
    return out


def code_bits(D: int, K: int) -> int:
    """Bits needed to store one code of P(D, K): ceil(log2 N(D, K)) (0 when N = 1)."""
    check_dimension_pulses(D, K)
    return (pyramid_count(D, K) - 1).bit_length()


def pulses_for_bits(D: int, bits: float, max_pulses: int = MAX_PULSES) -> int:
    """Largest K with log2 N(D, K) <= bits * D (fractional bits allowed, e.g. 2.5).

    The comparison is exact: N(D, K) <= 2^(bits*D) is tested as
    N^q <= 2^p for bits*D = p/q when bits*D is not an integer.
    """
    check_dimension_pulses(D, 0)
    if D == 0:
        raise CodecError("D must be at least 1")
    if not math.isfinite(bits) or bits < 0:
        raise CodecError(f"bits={bits!r} must be a finite non-negative number")
    if D == 1:
        # N(1, K) = 2 for every K >= 1 ({+K, -K}): more pulses buy nothing, so the
        # useful answer is the smallest K reaching that count.
        return 1 if bits >= 1 else 0
    budget = bits * D

    def fits(K: int) -> bool:
        # log2 N <= bits*D, decided in floating point unless too close to call, then exactly.
        n = pyramid_count(D, K)
        shift = max(0, n.bit_length() - 60)
        log2n = shift + math.log2(n >> shift)
        if abs(log2n - budget) > 1e-9 * max(1.0, budget):
            return log2n <= budget
        exact = Fraction(bits).limit_denominator(1 << 16) * D  # N <= 2^(p/q) <=> N^q <= 2^p
        return n ** exact.denominator <= (1 << exact.numerator)

    if not fits(0):  # N(D,0) = 1 always fits (log2 1 = 0)
        raise CodecError("internal: N(D,0) must fit any budget")
    # N(D, K) grows with K: exponential then binary search.
    lo, hi = 0, 1
    while hi <= max_pulses and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, max_pulses + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def words_for_bits(bits: int) -> int:
    """Number of 64-bit limbs for an unsigned integer of `bits` bits (at least 1)."""
    return max(1, (bits + 63) // 64)


@nb.njit(cache=True)
def _fill_word_tables(counts: np.ndarray, cumul: np.ndarray) -> None:
    """counts[d,k,:] = N(d,k) and cumul[d,k,:] = V(d,k) as little-endian uint64 limbs,
    by the recurrence with multi-word addition (carry = wrapped sum < an addend)."""
    D1, K1, W = counts.shape
    one = np.uint64(1)
    zero = np.uint64(0)
    for d in range(D1):
        counts[d, 0, 0] = one
    for d in range(1, D1):
        for k in range(1, K1):
            carry = zero
            for w in range(W):
                a = counts[d - 1, k, w]
                s = a + counts[d, k - 1, w]
                c1 = s < a
                t = s + counts[d - 1, k - 1, w]
                c2 = t < s
                u = t + carry
                c3 = u < t
                counts[d, k, w] = u
                carry = np.uint64(c1) + np.uint64(c2) + np.uint64(c3)
    for d in range(D1):
        for k in range(1, K1):
            carry = zero
            for w in range(W):
                a = cumul[d, k - 1, w]
                s = a + counts[d, k, w]
                c1 = s < a
                u = s + carry
                c2 = u < s
                cumul[d, k, w] = u
                carry = np.uint64(c1) + np.uint64(c2)


@dataclass(frozen=True)
class WordTables:
    """N(d, k) and V(d, k) for 0 <= d <= D, 0 <= k <= K as uint64 limbs, shape (D+1, K+1, W).

    W limbs hold N(D, K) itself; every table entry the encoder and decoder read
    (rows d <= D-1) is below N(D, K), so W limbs suffice for all codes and partial sums.
    Entries of row D of V may be larger; they are kept modulo 2^(64W) and never read.
    """

    D: int
    K: int
    words: int
    counts: np.ndarray
    cumulative: np.ndarray
    total: int  # N(D, K) as a Python int

    @property
    def total_words(self) -> np.ndarray:
        """N(D, K) as limbs (shape (W,)), the exclusive upper bound of valid codes."""
        return self.counts[self.D, self.K]


def table_bytes(D: int, K: int) -> int:
    """Memory the two word tables of P(D, K) take."""
    return 2 * (D + 1) * (K + 1) * 8 * words_for_bits(pyramid_count(D, K).bit_length())


@lru_cache(maxsize=64)
def word_tables(D: int, K: int) -> WordTables:
    """Word tables for P(D, K), built once per (D, K) and cached (read-only arrays)."""
    check_dimension_pulses(D, K)
    if D == 0:
        raise CodecError("D must be at least 1")
    total = pyramid_count(D, K)
    words = words_for_bits(total.bit_length())
    size = table_bytes(D, K)
    if size > MAX_TABLE_BYTES:
        raise CodecError(
            f"the count tables for D={D}, K={K} would take {size / 2**30:.1f} GiB "
            f"(limit {MAX_TABLE_BYTES / 2**30:.0f} GiB): use a smaller group size or fewer pulses"
        )
    counts = np.zeros((D + 1, K + 1, words), dtype=np.uint64)
    cumul = np.zeros_like(counts)
    _fill_word_tables(counts, cumul)
    for arr in (counts, cumul):
        arr.flags.writeable = False
    return WordTables(D=D, K=K, words=words, counts=counts, cumulative=cumul, total=total)
