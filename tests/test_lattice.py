"""Tests for the E8 lattice quantizer: nearest point, theta-series counts, ball codebook."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pvq.codec.errors import CodecError
from pvq.codec.lattice import E8Codebook, e8_ball_count, e8_nearest, e8_shell_count
from pvq.codec.scalar import gaussian_quantizer_mse, lloyd_max_gaussian, lloyd_max_quantize


def is_e8_point(y: np.ndarray) -> np.ndarray:
    """Row-wise: all coordinates integers or all half-integers, with an even sum."""
    doubled = 2 * y
    integral = np.all(doubled == np.round(doubled), axis=-1)
    parity = np.mod(np.round(doubled), 2)
    same_coset = np.all(parity == parity[..., :1], axis=-1)
    even_sum = np.mod(np.round(np.sum(y, axis=-1) * 2), 4) == 0  # sum is an even integer
    return integral & same_coset & even_sum


def brute_force_nearest_distance(x: np.ndarray) -> float:
    """Squared distance from x to E8 by enumeration: the nearest point lies within the
    covering radius 1, so each coordinate is within 1 of x's (both cosets)."""
    best = math.inf
    for shift in (0.0, 0.5):
        choices = [np.arange(math.ceil(v - 1 - shift), math.floor(v + 1 - shift) + 1) + shift for v in x]
        candidates = np.array(list(itertools.product(*choices)))
        even = np.mod(np.sum(candidates - shift, axis=1), 2) == 0
        if np.any(even):
            best = min(best, float(np.min(np.sum((candidates[even] - x) ** 2, axis=1))))
    return best


def enumerate_e8_ball(max_half_norm: int) -> np.ndarray:
    """All E8 points of squared norm <= 2M by enumerating both cosets in a box."""
    bound = math.isqrt(2 * max_half_norm)
    integer_values = np.arange(-bound, bound + 1, dtype=float)
    half_values = np.arange(-bound - 0.5, bound + 1, 1.0)
    half_values = half_values[half_values**2 <= 2 * max_half_norm]
    points = []
    for values in (integer_values, half_values):
        grid = np.stack(np.meshgrid(*([values] * 8), indexing="ij"), axis=-1).reshape(-1, 8)
        keep = (np.sum(grid**2, axis=1) <= 2 * max_half_norm) & is_e8_point(grid)
        points.append(grid[keep])
    return np.concatenate(points)


# --- nearest point ---------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, (5, 8), elements=st.floats(-50, 50, allow_subnormal=False)))
def test_nearest_returns_lattice_points(x):
    y = e8_nearest(x)
    assert np.all(is_e8_point(y))
    # Covering radius of E8 is 1.
    assert np.all(np.sum((x - y) ** 2, axis=1) <= 1 + 1e-9)


def test_nearest_matches_brute_force():
    rng = np.random.default_rng(10)
    x = np.concatenate([rng.standard_normal((150, 8)) * 3, rng.uniform(-1, 1, (50, 8))])
    y = e8_nearest(x)
    found = np.sum((x - y) ** 2, axis=1)
    brute = np.array([brute_force_nearest_distance(row) for row in x])
    np.testing.assert_allclose(found, brute, rtol=0, atol=1e-12)


def test_nearest_is_translation_equivariant_and_fixes_lattice_points():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((300, 8)) * 2
    shifts = e8_nearest(rng.standard_normal((300, 8)) * 10)  # arbitrary lattice vectors
    np.testing.assert_array_equal(e8_nearest(x + shifts), e8_nearest(x) + shifts)
    np.testing.assert_array_equal(e8_nearest(shifts), shifts)


def test_nearest_keeps_batch_shape_and_breaks_ties_deterministically():
    x = np.random.default_rng(12).standard_normal((3, 4, 8))
    assert e8_nearest(x).shape == (3, 4, 8)
    np.testing.assert_array_equal(e8_nearest(x).reshape(-1, 8), e8_nearest(x.reshape(-1, 8)))
    # (1/4, ..., 1/4) is equidistant from 0 and (1/2, ..., 1/2): the integer coset wins.
    np.testing.assert_array_equal(e8_nearest(np.full(8, 0.25)), np.zeros(8))


@pytest.mark.parametrize(
    "x", [np.zeros(7), np.zeros((2, 9)), np.array([np.nan] + [0.0] * 7), np.float64(1.0)]
)
def test_nearest_rejects_bad_input(x):
    with pytest.raises(CodecError):
        e8_nearest(x)


# --- theta series ------------------------------------------------------------------------


def test_shell_and_ball_counts():
    assert [e8_shell_count(m) for m in range(5)] == [1, 240, 2160, 6720, 17520]
    assert [e8_ball_count(m) for m in range(3)] == [1, 241, 2401]


@pytest.mark.parametrize("max_half_norm", [0, 1, 2, 3])
def test_ball_count_matches_enumeration(max_half_norm):
    assert len(enumerate_e8_ball(max_half_norm)) == e8_ball_count(max_half_norm)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_counts_reject_bad_input(bad):
    with pytest.raises(CodecError):
        e8_shell_count(bad)
    with pytest.raises(CodecError):
        e8_ball_count(bad)


# --- ball codebook -----------------------------------------------------------------------


def test_for_rate_picks_the_largest_fitting_ball():
    codebook = E8Codebook.for_rate(2)
    assert (codebook.max_half_norm, codebook.size) == (5, 56881)
    assert codebook.rate == pytest.approx(math.log2(56881) / 8)
    assert E8Codebook.for_rate(1).size == 241
    for rate in (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0):
        codebook = E8Codebook.for_rate(rate)
        assert codebook.size <= 2 ** (8 * rate) < e8_ball_count(codebook.max_half_norm + 1)
        assert codebook.rate <= rate


@pytest.mark.parametrize("rate", [0.0, -1.0, 0.98, math.nan, 7.0])
def test_for_rate_rejects_bad_rates(rate):
    with pytest.raises(CodecError):
        E8Codebook.for_rate(rate)


@pytest.mark.parametrize("args", [(0,), (2, 0.0), (2, -1.0), (2, math.inf)])
def test_codebook_rejects_bad_parameters(args):
    with pytest.raises(CodecError):
        E8Codebook(*args)


def test_quantize_stays_in_codebook_and_is_exact_inside_the_ball():
    codebook = E8Codebook(2, scale=0.7)
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2000, 8)) * 1.2
    y = codebook.quantize(x)
    lattice = np.round(2 * y / codebook.scale) / 2
    np.testing.assert_allclose(lattice * codebook.scale, y, rtol=0, atol=1e-12)
    assert np.all(is_e8_point(lattice))
    assert np.all(np.sum(lattice**2, axis=1) <= codebook.squared_radius)
    unconstrained = e8_nearest(x / codebook.scale)
    inside = np.sum(unconstrained**2, axis=1) <= codebook.squared_radius
    assert 0 < inside.sum() < len(x)  # both branches exercised
    np.testing.assert_array_equal(lattice[inside], unconstrained[inside])


@pytest.mark.parametrize("max_half_norm, spread", [(1, 0.8), (2, 1.0), (3, 1.3)])
def test_overload_handling_is_close_to_exact_truncated_nearest(max_half_norm, spread):
    codebook = E8Codebook(max_half_norm)
    points = enumerate_e8_ball(max_half_norm)  # at most 9121 points: brute force is cheap
    x = np.random.default_rng(14).standard_normal((600, 8)) * spread
    overloaded = np.sum(e8_nearest(x) ** 2, axis=1) > codebook.squared_radius
    assert overloaded.mean() > 0.3
    ours = np.sum((codebook.quantize(x) - x) ** 2, axis=1)
    exact = np.array([np.min(np.sum((points - row) ** 2, axis=1)) for row in x])
    assert np.all(ours >= exact - 1e-12)
    # An approximation in principle; in practice (radial shrink + greedy moves along
    # the minimal vectors) it is within 0.5% of exact (the shrink alone is ~9% off here).
    assert ours.mean() <= 1.005 * exact.mean()


def test_fit_scale_finds_a_minimum_deterministically():
    samples = np.random.default_rng(15).standard_normal((3000, 8)) * 0.05
    codebook = E8Codebook.for_rate(1.5)
    assert codebook.fit_scale(samples) is codebook
    best = codebook.mean_squared_error(samples)
    fitted = codebook.scale
    for factor in (0.8, 0.95, 1.05, 1.25):
        assert E8Codebook(codebook.max_half_norm, fitted * factor).mean_squared_error(samples) >= best
    assert E8Codebook.for_rate(1.5).fit_scale(samples).scale == fitted
    # Not tied to unit variance: the scale follows the data.
    assert 0.02 < fitted < 0.2


def test_fit_scale_rejects_bad_samples():
    codebook = E8Codebook(2)
    for bad in (np.zeros((10, 8)), np.zeros((0, 8)), np.ones((4, 7)), np.full((2, 8), np.inf)):
        with pytest.raises(CodecError):
            codebook.fit_scale(bad)


def test_e8_beats_lloyd_max_at_two_bits_per_dimension():
    rng = np.random.default_rng(16)
    train, test = rng.standard_normal((4000, 8)), rng.standard_normal((4000, 8))
    codebook = E8Codebook.for_rate(2).fit_scale(train)
    e8_snr = 10 * math.log10(np.mean(test**2) / codebook.mean_squared_error(test))
    scalar_snr = -10 * math.log10(gaussian_quantizer_mse(*lloyd_max_gaussian(2)))  # 9.30 dB
    empirical = lloyd_max_quantize(test.reshape(1, -1), 2, test.size)
    empirical_snr = 10 * math.log10(np.mean(test**2) / np.mean((test.reshape(1, -1) - empirical) ** 2))
    assert codebook.rate < 2  # E8 wins while spending fewer bits
    assert e8_snr > scalar_snr + 0.4
    assert e8_snr > empirical_snr + 0.4
