"""Shape search: map real vectors to points of the pyramid P(D, K).

The pyramid is ``P(D, K) = {p in Z^D : sum_i |p_i| = K}`` and the spherical code
is ``p / ||p||_2``.  The *shape search* maps each row ``x`` of a batch to a point
``p`` of ``P(D, K)`` maximising the cosine ``<x, p> / (||x|| ||p||)``.  Since the
best point always has the signs of ``x``, this is the same as maximising::

    f(y) = <a, y> / ||y||_2      with a = |x|, y in Z_{>=0}^D, sum(y) = K

and then setting ``p = sign(x) * y``.  All methods here work on ``a`` and put the
signs back at the end.

Methods
-------
``search_paper``
    Section 2.5 / Algorithm 1 of van der Ouderaa et al. (2024), "Pyramid Vector
    Quantization for LLMs".  The printed pseudocode is garbled; we implement the
    prose: project onto the L1 sphere of radius K and round to nearest,
    ``y = round(K a / ||a||_1)``; while ``sum(y) != K`` change the element with
    the largest rounding deviation ``dev_i = y_i - K a_i / ||a||_1`` by one pulse:
    if the sum is too large decrement the ``y_i > 0`` with the largest ``dev_i``,
    if it is too small increment the element with the most negative ``dev_i``;
    the deviation of the changed element is updated (the others are unchanged).
    Rounding is half-up (``floor(t + 0.5)``), not numpy's half-to-even.  Every
    ``|dev_i| <= 1/2`` after rounding and an element that has been changed once
    ends on the other side of zero, so each element changes at most once and the
    loop runs ``|sum(y) - K| <= D/2`` times.  (Up to ties this is the
    largest-remainder rounding of ``K a / ||a||_1``: the ``K - sum(floor(t))``
    entries with the largest fractional parts are rounded up.)

``search_greedy``
    Opus/CELT ``op_pvq_search`` (celt/vq.c), in float64: if ``K > D/2`` a
    pre-search projection ``y_i = floor((K + 0.8) a_i / ||a||_1)`` (as in the
    float build of Opus: ``K + e`` with ``e < 1`` means ``sum(y) <= K`` in exact
    arithmetic; a guard removes pulses from the largest ``y_i`` should rounding
    ever give more), then the remaining pulses are placed one at a time at the
    ``i`` maximising ``(Rxy + a_i)^2 / (Ryy + 2 y_i + 1)`` (``Rxy = <a, y>``,
    ``Ryy = <y, y>``), compared by cross-multiplication, first index on ties.
    After the projection at most ``D`` pulses are left, so Opus's "pulsesLeft >
    N + 3" safety branch cannot trigger and is not needed.

``search_refined`` (default)
    Greedy, then steepest-ascent local search over single-pulse moves (take one
    pulse from ``i`` with ``y_i > 0``, put it on ``j != i``) while the best move
    increases ``f`` by more than a relative ``1e-12`` (so no cycling), at most
    ``max_iter`` (default ``4 D``) moves.  The best move is found exactly, in
    ``O(D G + G^2)`` per move rather than ``O(D^2)``: with
    ``c = Rxy - a_i + a_j`` and ``q = Ryy - 2 y_i + 2 y_j + 2`` the moved
    objective ``c^2 / q`` (``c >= 0``) depends on ``(i, j)`` only through
    ``(y_i, a_i, y_j, a_j)``, decreasing in ``a_i`` and increasing in ``a_j``,
    so per pair of *values* ``(y_i, y_j)`` only the smallest-``a`` holder of
    ``y_i`` and the largest-``a`` holder of ``y_j`` need be tried.  ``G`` is the
    number of distinct values of ``y`` (at most ``D`` and about ``sqrt(2K)``).
    The result is never worse than ``search_greedy``'s.  ``start="paper"`` starts
    from ``search_paper``'s point instead (cheaper start, same shape SNR on
    Gaussian data in bench/search_quality.py, no never-worse-than-greedy bound).

``brute_force_search``
    Exhaustive optimum for small pyramids (test oracle).  Refuses pyramids with
    more than ``BRUTE_FORCE_MAX_POINTS`` points.  See its docstring.

Conventions (all methods)
-------------------------
* Output ``int32``, ``sum |p_i| = K`` exactly; ``p_i < 0`` only where
  ``x_i < 0`` and ``p_i > 0`` only where ``x_i > 0``, except for an all-zero row
  (``+K`` on index 0; for ``K = 0`` all zeros).  The heuristics never put pulses on
  ``x_i == 0`` when the row has a nonzero entry (that is never optimal either).
* ``|x|`` is scaled by ``1 / max|x_i|`` per row first, so tiny or huge finite
  values neither underflow nor overflow (an entry below ~1e-308 times the row's
  maximum becomes 0 and gets no pulses).
* ``0 <= K <= MAX_K`` (2^24), ``D >= 1``; a 1-D ``x`` is one vector and gives a
  1-D result; any real numeric dtype (computed in float64).
* Deterministic: fixed tie-breaks (first index), single-threaded kernels.

Over 500 lines because every search (projection, greedy, refined) keeps its slow
reference beside its fast numba path, as everywhere in the codec.
"""

from __future__ import annotations

import operator
from typing import Iterator

import numpy as np
from numba import njit

from .counts import pyramid_count
from .errors import CodecError

__all__ = [
    "BRUTE_FORCE_MAX_POINTS",
    "MAX_K",
    "METHODS",
    "brute_force_search",
    "iter_pyramid",
    "search",
    "search_greedy",
    "search_paper",
    "search_refined",
]

#: Methods accepted by :func:`search`.
METHODS = ("paper", "greedy", "refined", "brute")

#: :func:`brute_force_search` refuses pyramids with more points than this.
BRUTE_FORCE_MAX_POINTS = 2_000_000

#: Largest K accepted (keeps ``sum y_i^2 <= K^2`` exact in float64 and ``p`` in int32).
MAX_K = 1 << 24

_REFINE_REL_TOL = 1e-12


# --------------------------------------------------------------------------- kernels


@njit(cache=True)
def _magnitudes(xrow, a):
    """a <- |x| / max|x|; returns sum(a) (0.0 for an all-zero row)."""
    D = xrow.shape[0]
    m = 0.0
    for i in range(D):
        v = abs(xrow[i])
        if v > m:
            m = v
    if m == 0.0:
        for i in range(D):
            a[i] = 0.0
        return 0.0
    s = 0.0
    for i in range(D):
        a[i] = abs(xrow[i]) / m
        s += a[i]
    return s


@njit(cache=True)
def _store_signed(xrow, y, outrow):
    for i in range(xrow.shape[0]):
        if xrow[i] < 0.0:
            outrow[i] = -y[i]
        else:
            outrow[i] = y[i]


@njit(cache=True, inline="always")
def _trivial_row(S, K, y):
    """Zero y; True when that is the whole answer: K = 0 (the origin), or a zero row (all
    K pulses on the first coordinate, the convention of every search)."""
    for i in range(y.shape[0]):
        y[i] = 0
    if K == 0:
        return True
    if S == 0.0:
        y[0] = K
        return True
    return False


@njit(cache=True)
def _paper_row(a, S, K, y):
    D = a.shape[0]
    if _trivial_row(S, K, y):
        return
    dev = np.empty(D, np.float64)
    scale = K / S
    total = 0
    for i in range(D):
        t = scale * a[i]
        yi = np.int64(np.floor(t + 0.5))
        y[i] = yi
        dev[i] = yi - t
        total += yi
    while total > K:
        best = -1
        for i in range(D):
            if y[i] > 0 and (best < 0 or dev[i] > dev[best]):
                best = i
        y[best] -= 1
        dev[best] -= 1.0
        total -= 1
    while total < K:
        best = -1
        for i in range(D):
            if a[i] > 0.0 and (best < 0 or dev[i] < dev[best]):
                best = i
        y[best] += 1
        dev[best] += 1.0
        total += 1


@njit(cache=True)
def _greedy_row(a, S, K, y):
    D = a.shape[0]
    if _trivial_row(S, K, y):
        return
    total = 0
    if K > D // 2:
        # Opus pre-search: project on the pyramid, K + 0.8 < K + 1 => sum <= K.
        scale = (K + 0.8) / S
        for i in range(D):
            yi = np.int64(np.floor(scale * a[i]))
            y[i] = yi
            total += yi
        while total > K:  # guard against rounding; unreachable in exact arithmetic
            j = 0
            for i in range(1, D):
                if y[i] > y[j]:
                    j = i
            y[j] -= 1
            total -= 1
    rxy = 0.0
    ryy = 0.0
    for i in range(D):
        if y[i] != 0:
            rxy += a[i] * y[i]
            ryy += float(y[i]) * float(y[i])
    for _ in range(K - total):
        ryy += 1.0
        best = -1
        best_num = 0.0
        best_den = 1.0
        for j in range(D):
            if a[j] <= 0.0:
                continue
            r = rxy + a[j]
            num = r * r
            den = ryy + 2.0 * y[j]
            if best < 0 or best_den * num > den * best_num:
                best = j
                best_num = num
                best_den = den
        rxy += a[best]
        ryy = best_den
        y[best] += 1


@njit(cache=True)
def _refine_row(a, y, max_iter, rel_tol, ws):
    """Steepest-ascent single-pulse moves; returns the number of moves made.

    ``ws`` is an int64 workspace of shape (5, D) (reused across rows).
    """
    D = a.shape[0]
    elig = ws[0]
    ys = ws[1]
    vals = ws[2]
    add_best = ws[3]
    rem_best = ws[4]
    m = 0
    for i in range(D):
        if a[i] > 0.0:
            elig[m] = i
            m += 1
    if m <= 1:
        return 0
    moves = 0
    while moves < max_iter:
        # Rxy, Ryy and the groups of eligible entries by value of y (linear scan:
        # the number G of distinct values is small, at most min(D, ~sqrt(2K)))
        rxy = 0.0
        ryy = 0
        G = 0
        for k in range(m):
            i = elig[k]
            yi = y[i]
            ys[k] = yi
            if yi != 0:
                rxy += a[i] * yi
                ryy += yi * yi
            g = 0
            while g < G and vals[g] != yi:
                g += 1
            if g == G:
                vals[G] = yi
                add_best[G] = i
                rem_best[G] = i if yi > 0 else -1
                G += 1
            else:
                if a[i] > a[add_best[g]]:
                    add_best[g] = i
                if yi > 0 and a[i] < a[rem_best[g]]:
                    rem_best[g] = i
        # best move over pairs of values (u -> v): smallest-a holder of u gives,
        # largest-a holder of v takes
        best_i = -1
        best_j = -1
        best_c = 0.0
        best_q = 1.0
        best_s = -1.0
        for gr in range(G):
            i = rem_best[gr]
            if i < 0:
                continue
            base_c = rxy - a[i]
            base_q = ryy - 2 * vals[gr] + 2
            for ga in range(G):
                j = add_best[ga]
                if j == i:
                    continue
                c = base_c + a[j]
                q = float(base_q + 2 * vals[ga])
                s = c * c / q
                if s > best_s:
                    best_s = s
                    best_i = i
                    best_j = j
                    best_c = c
                    best_q = q
        if best_i < 0:
            break
        # accept only a strict (relative tol) improvement of c^2/q over rxy^2/ryy
        lhs = best_c * best_c * float(ryy)
        rhs = rxy * rxy * best_q
        if not (lhs > rhs * (1.0 + rel_tol)):
            break
        y[best_i] -= 1
        y[best_j] += 1
        moves += 1
    return moves


@njit(cache=True)
def _brute_row(a, K, y_best):
    """Exhaustive max of <a,y>/||y|| over compositions of K (reverse-lex order).

    The nonzero positions are kept on a stack (increasing index) with prefix sums
    of ``a_i y_i`` and ``y_i^2``, so each composition costs O(1) and ``<a,y>`` is
    always the same in-order sum over the nonzero entries (no drift).
    """
    D = a.shape[0]
    for i in range(D):
        y_best[i] = 0
    if K == 0:
        return
    L = min(D, K) + 2
    y = np.zeros(D, np.int64)
    pos = np.empty(L, np.int64)
    rpre = np.zeros(L + 1, np.float64)
    qpre = np.zeros(L + 1, np.int64)
    best_pos = np.empty(L, np.int64)
    best_val = np.empty(L, np.int64)
    best_n = 0
    y[0] = K
    pos[0] = 0
    rpre[1] = a[0] * K
    qpre[1] = K * K
    n = 1
    best_s = -1.0
    while True:
        s = rpre[n] / np.sqrt(float(qpre[n]))
        if s > best_s:
            best_s = s
            best_n = n
            for k in range(n):
                best_pos[k] = pos[k]
                best_val[k] = y[pos[k]]
        # successor: t = y[D-1]; y[D-1] = 0; i = rightmost nonzero before D-1;
        # y[i] -= 1; y[i+1] = t + 1
        t = 0
        if pos[n - 1] == D - 1:
            t = y[D - 1]
            y[D - 1] = 0
            n -= 1
        if n == 0:
            break
        i = pos[n - 1]
        y[i] -= 1
        if y[i] == 0:
            n -= 1
        else:
            rpre[n] = rpre[n - 1] + a[i] * y[i]
            qpre[n] = qpre[n - 1] + y[i] * y[i]
        j = i + 1
        y[j] = t + 1
        pos[n] = j
        rpre[n + 1] = rpre[n] + a[j] * y[j]
        qpre[n + 1] = qpre[n] + y[j] * y[j]
        n += 1
    for k in range(best_n):
        y_best[best_pos[k]] = best_val[k]


@njit(cache=True)
def _search_kernel(x, K, start_paper, max_iter, rel_tol, out):
    """Start each row at the paper's or the greedy point, then (max_iter > 0) refine it
    by single-pulse moves; returns the number of moves made."""
    B, D = x.shape
    a = np.empty(D, np.float64)
    y = np.empty(D, np.int64)
    ws = np.empty((5, D), np.int64)
    total_moves = 0
    for b in range(B):
        S = _magnitudes(x[b], a)
        if start_paper:
            _paper_row(a, S, K, y)
        else:
            _greedy_row(a, S, K, y)
        if max_iter > 0 and K > 0 and S > 0.0:
            total_moves += _refine_row(a, y, max_iter, rel_tol, ws)
        _store_signed(x[b], y, out[b])
    return total_moves


@njit(cache=True)
def _brute_kernel(x, K, out):
    B, D = x.shape
    a = np.empty(D, np.float64)
    y = np.empty(D, np.int64)
    for b in range(B):
        _magnitudes(x[b], a)
        _brute_row(a, K, y)
        _store_signed(x[b], y, out[b])


# --------------------------------------------------------------------------- helpers


def _nonnegative_index(value, name: str, kind: str) -> int:
    """`value` as an int >= 0 (anything `operator.index` takes), else CodecError naming `name`."""
    try:
        n = operator.index(value)
    except TypeError:
        raise CodecError(f"{name} must be {kind}, got {value!r}") from None
    if n < 0:
        raise CodecError(f"{name} must be >= 0, got {n}")
    return n


def _check_K(K) -> int:
    if isinstance(K, (bool, np.bool_)):
        raise CodecError(f"K must be a non-negative integer, got bool {K!r}")
    k = _nonnegative_index(K, "K", "a non-negative integer")
    if k > MAX_K:
        raise CodecError(f"K = {k} exceeds the supported maximum {MAX_K}")
    return int(k)


def _prepare(x, K):
    """Validate; returns (x as C-contiguous float64 (B, D), K, was_1d)."""
    k = _check_K(K)
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise CodecError(f"x must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim == 1:
        was_1d = True
        arr = arr[None, :]
    elif arr.ndim == 2:
        was_1d = False
    else:
        raise CodecError(f"x must be 1-D (one vector) or 2-D (B, D), got shape {arr.shape}")
    if arr.shape[1] < 1:
        raise CodecError(f"x must have dimension D >= 1, got shape {np.shape(x)}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        raise CodecError(f"x row {row} contains non-finite values (NaN or inf)")
    return arr, k, was_1d


def _finish(out, was_1d):
    return out[0] if was_1d else out


# --------------------------------------------------------------------------- public API


def search_paper(x, K) -> np.ndarray:
    """Paper's Algorithm 1 (L1 projection, round, fix the sum one pulse at a time)."""
    arr, k, was_1d = _prepare(x, K)
    out = np.zeros(arr.shape, np.int32)
    _search_kernel(arr, np.int64(k), True, np.int64(0), _REFINE_REL_TOL, out)
    return _finish(out, was_1d)


def search_greedy(x, K) -> np.ndarray:
    """Opus/CELT ``op_pvq_search``: floor projection then greedy pulse placement."""
    arr, k, was_1d = _prepare(x, K)
    out = np.zeros(arr.shape, np.int32)
    _search_kernel(arr, np.int64(k), False, np.int64(0), _REFINE_REL_TOL, out)
    return _finish(out, was_1d)


def search_refined(x, K, max_iter: int | None = None, start: str = "greedy") -> np.ndarray:
    """Greedy + steepest-ascent single-pulse local search (the default method).

    ``max_iter`` bounds the number of accepted moves per row (default ``4 * D``).
    ``start`` is the starting point: ``"greedy"`` (default; the result is then never
    worse than :func:`search_greedy`) or ``"paper"`` (the paper's projection; cheaper
    to compute, needs a few more moves, and on Gaussian data reaches the same shape
    SNR - see bench/search_quality.py - but without the never-worse-than-greedy
    guarantee).
    """
    if start not in ("greedy", "paper"):
        raise CodecError(f"start must be 'greedy' or 'paper', got {start!r}")
    arr, k, was_1d = _prepare(x, K)
    D = arr.shape[1]
    if max_iter is None:
        it = 4 * D
    else:
        it = _nonnegative_index(max_iter, "max_iter", "an integer")
    out = np.zeros(arr.shape, np.int32)
    _search_kernel(arr, np.int64(k), start == "paper", np.int64(it), _REFINE_REL_TOL, out)
    return _finish(out, was_1d)


def brute_force_search(x, K) -> np.ndarray:
    """Exhaustive optimum (test oracle); refuses pyramids with > 2e6 points.

    Exhaustive over ``P(D, K)`` by the reduction ``<x, p> <= <|x|, |p|>`` (equality
    iff the signs of ``p`` match ``x`` where ``x_i != 0``): the maximum cosine over
    all signed points equals the maximum over the ``C(K+D-1, D-1)`` magnitude
    patterns ``y`` with the signs of ``x`` put back (``+`` where ``x_i == 0``).
    Patterns are enumerated in reverse-lexicographic order (``(K,0,...,0)``
    first), ties keep the first, which is also the first maximiser in the order of
    :func:`iter_pyramid`.  The refusal threshold applies to ``|P(D, K)|``.
    """
    arr, k, was_1d = _prepare(x, K)
    D = arr.shape[1]
    n = pyramid_count(D, k)
    if n > BRUTE_FORCE_MAX_POINTS:
        raise CodecError(
            f"brute force refused: |P({D}, {k})| = {n} > {BRUTE_FORCE_MAX_POINTS} points"
        )
    out = np.zeros(arr.shape, np.int32)
    _brute_kernel(arr, np.int64(k), out)
    return _finish(out, was_1d)


_DISPATCH = {
    "paper": search_paper,
    "greedy": search_greedy,
    "refined": search_refined,
    "brute": brute_force_search,
}


def search(x, K, method: str = "refined") -> np.ndarray:
    """Map rows of ``x`` ((B, D) or (D,)) to points of P(D, K) of maximal cosine.

    ``method``: ``"refined"`` (default), ``"greedy"``, ``"paper"`` or ``"brute"``.
    Returns an ``int32`` array of the shape of ``x``; raises ``CodecError`` on bad
    input (wrong ndim, D < 1, non-finite values, K not a non-negative integer).
    """
    fn = _DISPATCH.get(method) if isinstance(method, str) else None
    if fn is None:
        raise CodecError(f"unknown search method {method!r}; expected one of {METHODS}")
    return fn(x, K)


def iter_pyramid(D: int, K: int) -> Iterator[tuple[int, ...]]:
    """All points of P(D, K) as tuples (self-contained recursive generator).

    Order: coordinate 0 by magnitude from K down to 0, ``+v`` before ``-v``, then
    recursively the rest.  Yields ``|P(D, K)|`` points.
    """
    D = operator.index(D)
    K = operator.index(K)
    if D < 0 or K < 0:
        raise CodecError(f"need D >= 0 and K >= 0, got D={D}, K={K}")

    def rec(d: int, k: int) -> Iterator[tuple[int, ...]]:
        if d == 0:
            if k == 0:
                yield ()
            return
        for v in range(k, -1, -1):
            for s in ((v,) if v == 0 else (v, -v)):
                for rest in rec(d - 1, k - v):
                    yield (s,) + rest

    return rec(D, K)
