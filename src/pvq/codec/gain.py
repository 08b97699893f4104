"""Gain (group scale) quantization by Beta quantiles (paper section 3.4, App. C.2).

A weight row w in R^(G*D) is cut into G groups of D values. For Gaussian w the
normalised group energy u_g = ||w_g||^2 / ||w||^2 follows Beta(D/2, D(G-1)/2).
(The paper's Theorem 3.1 prints the second parameter as G(D-1)/2; its own proof gives
D(G-1)/2 = (N-D)/2, the sum of the other G-1 groups' chi-square halves.)

Encoding makes the index uniform under the model: ``i = floor(CDF(u) * 2**b)``, clipped
to ``[0, 2**b - 1]``. Two reconstructions of a cell:

* ``"quantile"`` (the paper): u at the cell's middle quantile, ``PPF((i + 1/2) / 2**b)``.
* ``"centroid"`` (our improvement over the paper): the conditional mean of the *gain*
  ``sqrt(u)`` over the cell, ``E[sqrt(u) | u in cell i]``, which minimises the expected
  squared gain error for these cells under the Beta model. It has a closed form:
  ``E[sqrt(u) 1{u in cell}] = B(a+1/2, b) / B(a, b) * P_{Beta(a+1/2, b)}(cell)``.

Convention: ``codebook`` always holds normalised *gains* ``sqrt(u)`` (for both
reconstructions), and ``decode`` returns ``codebook[i] * sqrt(row_norm_sq)``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.special import betainc, betaincc, betaincinv, betaln

from pvq.codec.errors import CodecError

__all__ = [
    "beta_gain_parameters", "beta_gain_density", "BetaGainQuantizer", "GAIN_RECONSTRUCTIONS", "empirical_gain_codebook",
    "nearest_level", "normalised_group_gains",
]

MAX_GAIN_BITS = 16
GAIN_RECONSTRUCTIONS = ("quantile", "centroid")


def _check_positive_int(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise CodecError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise CodecError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def beta_gain_parameters(group_size: int, num_groups: int) -> tuple[float, float]:
    """Beta(a, b) law of u = ||w_g||^2 / ||w||^2 for Gaussian w: (D/2, D(G-1)/2)."""
    group_size = _check_positive_int(group_size, "group_size", 1)
    num_groups = _check_positive_int(num_groups, "num_groups", 2)
    return group_size / 2.0, group_size * (num_groups - 1) / 2.0


def normalised_group_gains(rows: np.ndarray, group_size: int) -> np.ndarray:
    """Normalised gains g = ||w_g|| / ||w|| of rows (R, G*D) cut into G groups of D
    consecutive values: shape (R, G), the squares of each row summing to 1, so that
    g^2 = u ~ Beta(D/2, D(G-1)/2) for Gaussian rows. Rows that are all zero are dropped
    (their gains are undefined)."""
    group_size = _check_positive_int(group_size, "group_size", 1)
    w = np.asarray(rows, dtype=np.float64)
    if w.ndim != 2:
        raise CodecError(f"rows must be a 2-D array (rows, columns), got shape {w.shape}")
    if w.shape[1] % group_size or w.shape[1] // group_size < 2:
        raise CodecError(f"{w.shape[1]} columns do not split into >= 2 groups of {group_size}")
    if not np.all(np.isfinite(w)):
        raise CodecError("rows must be finite")
    R, C = w.shape
    gains = np.linalg.norm(w.reshape(R, C // group_size, group_size), axis=2)
    norms = np.sqrt((gains**2).sum(axis=1))
    keep = norms > 0
    return gains[keep] / norms[keep, None]


def beta_gain_density(x: np.ndarray, group_size: int, num_groups: int, squared: bool = True) -> np.ndarray:
    """Density the Beta gain model gives to the normalised group energy u = g^2
    (``squared=True``: the Beta(D/2, D(G-1)/2) pdf at x) or to the normalised gain g
    itself (``squared=False``: the change of variables u = g^2, f_g(x) = 2 x f_u(x^2))."""
    from scipy.stats import beta as beta_law

    a, b = beta_gain_parameters(group_size, num_groups)
    x = np.asarray(x, dtype=np.float64)
    if squared:
        return beta_law.pdf(x, a, b)
    return 2.0 * x * beta_law.pdf(x * x, a, b)


@lru_cache(maxsize=64)
def _gain_tables(
    group_size: int, num_groups: int, bits: int, reconstruction: str
) -> tuple[np.ndarray, np.ndarray]:
    """(energy thresholds, gain codebook), computed once per configuration."""
    a, b = beta_gain_parameters(group_size, num_groups)
    num_cells = 2**bits
    # Cell i is [PPF(i / 2^b), PPF((i + 1) / 2^b)): counting thresholds <= u gives exactly
    # floor(CDF(u) * 2^b) clipped to [0, 2^b - 1], without evaluating the CDF per gain.
    thresholds = betaincinv(a, b, np.arange(1, num_cells) / num_cells)
    if reconstruction == "quantile":
        codebook = np.sqrt(betaincinv(a, b, (np.arange(num_cells) + 0.5) / num_cells))
    else:
        edges = np.concatenate(([0.0], thresholds, [1.0]))

        def cell_mass(shape_a: float) -> np.ndarray:
            # Difference of lower tails below the median, of upper tails above it, so
            # no cell's mass is lost to cancellation near CDF = 1.
            lower_tail = betainc(shape_a, b, edges)
            upper_tail = betaincc(shape_a, b, edges)
            return np.where(
                lower_tail[1:] <= 0.5,
                lower_tail[1:] - lower_tail[:-1],
                upper_tail[:-1] - upper_tail[1:],
            )

        gain_mass = np.exp(betaln(a + 0.5, b) - betaln(a, b)) * cell_mass(a + 0.5)
        energy_mass = cell_mass(a)
        lower_gain, upper_gain = np.sqrt(edges[:-1]), np.sqrt(edges[1:])
        with np.errstate(divide="ignore", invalid="ignore"):
            centroid = gain_mass / energy_mass
        # A cell whose mass underflows (possible only at extreme parameters and many
        # bits) falls back to its middle; rounding can never push a mean out of its cell.
        centroid = np.where(
            energy_mass > 0, centroid, 0.5 * (lower_gain + upper_gain)
        )
        codebook = np.clip(centroid, lower_gain, upper_gain)
    thresholds.flags.writeable = False
    codebook.flags.writeable = False
    return thresholds, codebook


def _first_bad(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


class BetaGainQuantizer:
    """Quantize group gains ||w_g|| of rows with ``num_groups`` groups of ``group_size``.

    ``encode(gains, row_norm_sq)`` gives indices in ``[0, 2**bits - 1]`` (uint8 for up to
    8 bits, else uint16); ``decode(indices, row_norm_sq)`` gives gains (float64). The
    energies are ``u = gains**2 / row_norm_sq``; ``row_norm_sq`` is whatever the decoder
    will also know (typically ||w||^2, possibly itself quantized). ``codebook`` holds the
    ``2**bits`` reconstructed normalised gains ``sqrt(u)``; ``thresholds`` the
    ``2**bits - 1`` cell boundaries in u.
    """

    def __init__(
        self, group_size: int, num_groups: int, bits: int, reconstruction: str = "quantile"
    ) -> None:
        self.group_size = _check_positive_int(group_size, "group_size", 1)
        self.num_groups = _check_positive_int(num_groups, "num_groups", 2)
        self.bits = _check_positive_int(bits, "bits", 1)
        if self.bits > MAX_GAIN_BITS:
            raise CodecError(f"bits must be in 1..{MAX_GAIN_BITS}, got {bits}")
        if reconstruction not in GAIN_RECONSTRUCTIONS:
            raise CodecError(
                f"reconstruction must be one of {GAIN_RECONSTRUCTIONS}, got {reconstruction!r}"
            )
        self.reconstruction = reconstruction
        self._thresholds, self._codebook = _gain_tables(
            self.group_size, self.num_groups, self.bits, reconstruction
        )
        self.index_dtype = np.dtype(np.uint8 if self.bits <= 8 else np.uint16)

    @property
    def beta_parameters(self) -> tuple[float, float]:
        return beta_gain_parameters(self.group_size, self.num_groups)

    @property
    def codebook(self) -> np.ndarray:
        """The ``2**bits`` reconstructed normalised gains sqrt(u), increasing (a copy)."""
        return self._codebook.copy()

    @property
    def thresholds(self) -> np.ndarray:
        """The ``2**bits - 1`` increasing cell boundaries in u = gain^2 / row_norm_sq."""
        return self._thresholds.copy()

    def _check_row_norm_sq(self, row_norm_sq: np.ndarray, num_rows: int) -> np.ndarray:
        norms = np.asarray(row_norm_sq, dtype=np.float64)
        if norms.shape != (num_rows,):
            raise CodecError(f"row_norm_sq must have shape ({num_rows},), got {norms.shape}")
        bad = ~(np.isfinite(norms) & (norms > 0))
        if np.any(bad):
            row = _first_bad(bad)[0]
            raise CodecError(
                f"row_norm_sq must be finite and > 0, got {norms[row]!r} at row {row}"
            )
        return norms

    def _check_table_shape(self, values: np.ndarray, name: str) -> None:
        if values.ndim != 2 or values.shape[1] != self.num_groups:
            raise CodecError(
                f"{name} must have shape (rows, {self.num_groups}), got {values.shape}"
            )

    def encode(self, gains: np.ndarray, row_norm_sq: np.ndarray) -> np.ndarray:
        """Indices of the cells holding u = gains**2 / row_norm_sq; gains shape (R, G)."""
        gains = np.asarray(gains)
        if not (np.issubdtype(gains.dtype, np.floating) or np.issubdtype(gains.dtype, np.integer)):
            raise CodecError(f"gains must be a real numeric array, got dtype {gains.dtype}")
        gains = gains.astype(np.float64)
        self._check_table_shape(gains, "gains")
        bad = ~(np.isfinite(gains) & (gains >= 0))
        if np.any(bad):
            where = _first_bad(bad)
            raise CodecError(f"gains must be finite and >= 0, got {gains[where]!r} at {where}")
        norms = self._check_row_norm_sq(row_norm_sq, gains.shape[0])
        energies = gains**2 / norms[:, None]
        # Thresholds <= u, i.e. floor(CDF(u) * 2^b); u >= 1 lands in the last cell.
        indices = np.searchsorted(self._thresholds, energies, side="right")
        return indices.astype(self.index_dtype)

    def decode(self, indices: np.ndarray, row_norm_sq: np.ndarray) -> np.ndarray:
        """Gains ``codebook[indices] * sqrt(row_norm_sq)`` (float64, shape (R, G))."""
        indices = np.asarray(indices)
        if not np.issubdtype(indices.dtype, np.integer):
            raise CodecError(f"indices must be an integer array, got dtype {indices.dtype}")
        self._check_table_shape(indices, "indices")
        bad = (indices < 0) | (indices >= self._codebook.size)
        if np.any(bad):
            where = _first_bad(bad)
            raise CodecError(
                f"index {int(indices[where])} at {where} is outside 0..{self._codebook.size - 1}"
            )
        norms = self._check_row_norm_sq(row_norm_sq, indices.shape[0])
        return self._codebook[indices] * np.sqrt(norms)[:, None]

    def __repr__(self) -> str:
        a, b = self.beta_parameters
        return (
            f"BetaGainQuantizer(group_size={self.group_size}, num_groups={self.num_groups}, "
            f"bits={self.bits}, reconstruction={self.reconstruction!r}, beta=({a:g}, {b:g}))"
        )


def empirical_gain_codebook(normalised_gains: np.ndarray, bits: int, iterations: int = 5000) -> np.ndarray:
    """MSE-optimal (Lloyd-Max) scalar codebook of 2^bits levels fitted to sample gains.

    For weights whose group gains do not follow the Beta law (unrotated LLM weights have
    heavy-tailed group energies: a quantile codebook leaves its top cell far too wide),
    one codebook per layer fitted to that layer's own normalised gains g/||row|| serves
    the tails. Starts from equal-probability quantiles, then alternates nearest-level
    assignment and cell means until no level moves by more than 1e-13 of the largest
    (each step is O(levels log n) on the sorted values); deterministic. Returns sorted
    float64 levels (storage, e.g. float16, is the caller's).
    """
    bits = _check_positive_int(bits, "bits", 1)
    if bits > MAX_GAIN_BITS:
        raise CodecError(f"bits must be <= {MAX_GAIN_BITS}, got {bits}")
    values = np.sort(np.asarray(normalised_gains, dtype=np.float64).reshape(-1))
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise CodecError("empirical gain codebook needs a non-empty set of finite gains")
    n = 2**bits
    levels = np.quantile(values, (np.arange(n) + 0.5) / n)
    prefix = np.concatenate(([0.0], np.cumsum(values)))
    for _ in range(iterations):
        edges = np.searchsorted(values, 0.5 * (levels[1:] + levels[:-1]), side="left")
        lo = np.concatenate(([0], edges))
        hi = np.concatenate((edges, [values.size]))
        count = hi - lo
        means = np.where(count > 0, (prefix[hi] - prefix[lo]) / np.maximum(count, 1), levels)
        moved = np.max(np.abs(means - levels))
        levels = means
        if moved <= 1e-13 * np.max(np.abs(levels)):
            break
    return np.sort(levels)


def nearest_level(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted `levels` for each value (ties to the lower)."""
    midpoints = 0.5 * (levels[1:] + levels[:-1])
    return np.searchsorted(midpoints, values, side="left")
