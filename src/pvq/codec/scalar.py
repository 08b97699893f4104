"""Scalar baselines: grouped uniform round-to-nearest and the Lloyd-Max Gaussian quantizer.

Both quantize the last axis in groups of ``group_size`` consecutive values with one
scale per group. The scale is cast to ``scale_dtype`` *before* it is used, so the
reconstruction is exactly what a decoder holding the stored scale would produce.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.linalg import solve_banded
from scipy.special import ndtr, ndtri

from pvq.codec.errors import CodecError

__all__ = [
    "uniform_rtn",
    "uniform_rtn_bits_per_value",
    "lloyd_max_gaussian",
    "lloyd_max_quantize",
    "gaussian_quantizer_mse",
]

MAX_UNIFORM_BITS = 16
MAX_LLOYD_BITS = 10
LLOYD_TOLERANCE = 1e-12
LLOYD_MAX_ITERATIONS = 10_000


def _check_bits(bits: int, max_bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise CodecError(f"bits must be an integer, got {bits!r}")
    if not 1 <= bits <= max_bits:
        raise CodecError(f"bits must be in 1..{max_bits}, got {bits}")
    return int(bits)


def _grouped(x: np.ndarray, group_size: int) -> np.ndarray:
    """Validate ``x`` and view it as float64 with shape (..., num_groups, group_size)."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise CodecError(f"group_size must be an integer, got {group_size!r}")
    if group_size < 1:
        raise CodecError(f"group_size must be >= 1, got {group_size}")
    values = np.asarray(x)
    if values.ndim == 0:
        raise CodecError("x must have at least one axis, got a scalar")
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise CodecError(f"x must be a real numeric array, got dtype {values.dtype}")
    length = values.shape[-1]
    if length % group_size != 0:
        raise CodecError(
            f"last axis of length {length} is not divisible by group_size {group_size}"
        )
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise CodecError("x contains non-finite values (nan or inf)")
    return values.reshape(*values.shape[:-1], length // group_size, group_size)


def _stored_scale(scale: np.ndarray, scale_dtype: np.dtype) -> np.ndarray:
    """Round scales to their storage precision; refuse scales the dtype cannot hold."""
    if not np.issubdtype(np.dtype(scale_dtype), np.floating):
        raise CodecError(f"scale_dtype must be a floating dtype, got {np.dtype(scale_dtype)}")
    with np.errstate(over="ignore"):
        stored = scale.astype(scale_dtype)
    if not np.all(np.isfinite(stored)):
        worst = float(scale[~np.isfinite(stored)].max())
        raise CodecError(
            f"group scale {worst:.6g} overflows scale_dtype {np.dtype(scale_dtype).name}"
        )
    return stored.astype(np.float64)


def uniform_rtn(
    x: np.ndarray, bits: int, group_size: int, scale_dtype: np.dtype = np.float16
) -> np.ndarray:
    """Symmetric uniform round-to-nearest quantization of the last axis, per group.

    Convention (symmetric mid-rise grid, all ``2**bits`` codes used): the code is the
    signed integer ``q`` in ``[-2**(bits-1), 2**(bits-1) - 1]`` and the reconstruction
    is ``step * (q + 1/2)``. The step is ``2 * absmax / (2**bits - 1)`` so the outer
    levels are ``±absmax`` of the group; this step is the stored per-group scale, cast to
    ``scale_dtype``, and that rounded value is used to quantize and dequantize. For ``bits=1`` this is ``{-s, +s}`` with
    ``s = absmax``. Cells are half-open, ``[q*step, (q+1)*step)``, so an exact 0 decodes
    to ``+step/2``. An all-zero group (or one whose step underflows to 0) decodes to 0.

    Returns the dequantized array, float64, same shape as ``x``.
    """
    bits = _check_bits(bits, MAX_UNIFORM_BITS)
    groups = _grouped(x, group_size)
    absmax = np.max(np.abs(groups), axis=-1, keepdims=True)
    step = _stored_scale(2.0 * absmax / (2**bits - 1), scale_dtype)
    safe_step = np.where(step > 0, step, 1.0)
    lowest, highest = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    # Cell q is [q*step, (q+1)*step), so the code is floor(x/step); clipping absorbs the
    # absmax value itself and any excess caused by rounding the step down in storage.
    codes = np.clip(np.floor(groups / safe_step), lowest, highest)
    dequantized = np.where(step > 0, (codes + 0.5) * step, 0.0)
    return dequantized.reshape(np.shape(x))


def uniform_rtn_bits_per_value(bits: int, group_size: int, scale_bits: int = 16) -> float:
    """Storage cost of :func:`uniform_rtn` (also of :func:`lloyd_max_quantize`) per value."""
    bits = _check_bits(bits, MAX_UNIFORM_BITS)
    if group_size < 1:
        raise CodecError(f"group_size must be >= 1, got {group_size}")
    if scale_bits < 0:
        raise CodecError(f"scale_bits must be >= 0, got {scale_bits}")
    return bits + scale_bits / group_size


def _normal_pdf(t: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * t * t) / np.sqrt(2.0 * np.pi)


def _normal_mass(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """P(lower < Z < upper) for standard normal Z, without cancellation in the tails."""
    # Work on the side of 0 where the cell lies, so both CDF values are small tails.
    upper_tail = lower >= 0
    return np.where(
        upper_tail, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower)
    )


def _lloyd_update(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Lloyd step (cells at the midpoints, levels to the cell means) and its slopes.

    Returns the new levels and d(new level)/d(lower edge), d(new level)/d(upper edge).
    """
    thresholds = 0.5 * (levels[1:] + levels[:-1])
    lower = np.concatenate(([-np.inf], thresholds))
    upper = np.concatenate((thresholds, [np.inf]))
    mass = _normal_mass(lower, upper)
    pdf_lower, pdf_upper = _normal_pdf(lower), _normal_pdf(upper)
    # E[Z | lower < Z < upper] = (pdf(lower) - pdf(upper)) / mass, exact for N(0, 1).
    means = (pdf_lower - pdf_upper) / mass
    # Moving an edge moves the mean by pdf(edge) * (distance edge-to-mean) / mass; at an
    # infinite edge the pdf is exactly 0, so the slope is 0 (avoid inf * 0).
    finite_lower = np.where(np.isfinite(lower), lower, 0.0)
    finite_upper = np.where(np.isfinite(upper), upper, 0.0)
    slope_lower = pdf_lower * (means - finite_lower) / mass
    slope_upper = pdf_upper * (finite_upper - means) / mass
    return means, slope_lower, slope_upper


@lru_cache(maxsize=None)
def _lloyd_max_tables(bits: int) -> tuple[np.ndarray, np.ndarray]:
    num_levels = 2**bits
    # Equiprobable start: already close, and symmetric, so the iteration stays symmetric.
    levels = ndtri((np.arange(num_levels) + 0.5) / num_levels)
    for _ in range(LLOYD_MAX_ITERATIONS):
        updated, slope_lower, slope_upper = _lloyd_update(levels)
        change = np.max(np.abs(updated - levels))
        if change < LLOYD_TOLERANCE:
            levels = updated
            break
        # Plain Lloyd steps converge in O(levels^2) steps; a Newton step on the fixed
        # point T(c) = c (T has a tridiagonal Jacobian) reaches the same point in a few.
        # Accept it only if it keeps the levels increasing and shrinks the residual.
        diagonal = 0.5 * (slope_lower + slope_upper) - 1.0
        banded = np.zeros((3, num_levels))
        banded[0, 1:] = 0.5 * slope_upper[:-1]  # d T_i / d c_{i+1}
        banded[1] = diagonal
        banded[2, :-1] = 0.5 * slope_lower[1:]  # d T_i / d c_{i-1}
        newton = levels - solve_banded((1, 1), banded, updated - levels)
        if np.all(np.diff(newton) > 0):
            newton_change = np.max(np.abs(_lloyd_update(newton)[0] - newton))
            if newton_change < change:
                levels = newton
                continue
        levels = updated
    else:
        raise CodecError(f"Lloyd-Max iteration for {bits} bits did not converge")
    thresholds = 0.5 * (levels[1:] + levels[:-1])
    thresholds.flags.writeable = False
    levels.flags.writeable = False
    return thresholds, levels


def lloyd_max_gaussian(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """MSE-optimal scalar quantizer for N(0, 1) with ``2**bits`` levels (Lloyd-Max).

    Returns ``(thresholds, levels)``: ``2**bits - 1`` increasing decision thresholds and
    ``2**bits`` increasing reconstruction levels. Computed once per ``bits`` (cached) as
    the fixed point of the Lloyd iteration with exact Gaussian conditional means,
    accelerated by Newton steps, until a Lloyd step moves no level by 1e-12 or more.
    ``bits`` must be in 1..10.
    """
    bits = _check_bits(bits, MAX_LLOYD_BITS)
    thresholds, levels = _lloyd_max_tables(bits)
    return thresholds.copy(), levels.copy()


def gaussian_quantizer_mse(thresholds: np.ndarray, levels: np.ndarray) -> float:
    """Exact MSE of a scalar quantizer applied to N(0, 1) (closed form per cell)."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    levels = np.asarray(levels, dtype=np.float64)
    if levels.ndim != 1 or thresholds.shape != (levels.size - 1,):
        raise CodecError(
            f"need 1-D levels and one fewer thresholds, got shapes {levels.shape} "
            f"and {thresholds.shape}"
        )
    edges = np.concatenate(([-np.inf], thresholds, [np.inf]))
    lower, upper = edges[:-1], edges[1:]
    mass = _normal_mass(lower, upper)
    # Per cell: E[(Z - c)^2; cell] = E[Z^2; cell] - 2c E[Z; cell] + c^2 P(cell), with
    # E[Z; cell] = pdf(lo) - pdf(hi) and E[Z^2; cell] = P(cell) + lo pdf(lo) - hi pdf(hi).
    def z_pdf(t: np.ndarray) -> np.ndarray:
        return np.where(np.isfinite(t), np.where(np.isfinite(t), t, 0.0) * _normal_pdf(t), 0.0)

    first_moment = _normal_pdf(lower) - _normal_pdf(upper)
    second_moment = mass + z_pdf(lower) - z_pdf(upper)
    return float(np.sum(second_moment - 2 * levels * first_moment + levels**2 * mass))


def lloyd_max_quantize(
    x: np.ndarray, bits: int, group_size: int, scale_dtype: np.dtype = np.float16
) -> np.ndarray:
    """Quantize the last axis per group with the Lloyd-Max N(0, 1) codebook.

    Each group of ``group_size`` values is divided by its RMS (stored in
    ``scale_dtype``, and that rounded value is used), mapped to the nearest Lloyd-Max
    level for ``bits`` (1..10) bits, and scaled back. An all-zero group decodes to 0.
    Returns float64, same shape as ``x``.
    """
    bits = _check_bits(bits, MAX_LLOYD_BITS)
    groups = _grouped(x, group_size)
    thresholds, levels = _lloyd_max_tables(bits)
    rms = np.sqrt(np.mean(groups**2, axis=-1, keepdims=True))
    scale = _stored_scale(rms, scale_dtype)
    safe_scale = np.where(scale > 0, scale, 1.0)
    codes = np.searchsorted(thresholds, groups / safe_scale)
    dequantized = np.where(scale > 0, levels[codes] * scale, 0.0)
    return dequantized.reshape(np.shape(x))
