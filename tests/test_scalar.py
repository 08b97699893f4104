"""Tests for the scalar baselines: grouped uniform RTN and the Lloyd-Max Gaussian quantizer."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import truncnorm

from pvq.codec.errors import CodecError
from pvq.codec.scalar import (
    gaussian_quantizer_mse,
    lloyd_max_gaussian,
    lloyd_max_quantize,
    uniform_rtn,
    uniform_rtn_bits_per_value,
)


def snr_db(x: np.ndarray, y: np.ndarray) -> float:
    return 10 * math.log10(np.mean(x**2) / np.mean((x - y) ** 2))


# --- uniform RTN -------------------------------------------------------------------


def test_uniform_one_bit_is_plus_minus_absmax():
    x = np.array([[0.3, -2.0, 1.5, -0.1]])  # absmax 2 is exact in float16
    np.testing.assert_array_equal(uniform_rtn(x, 1, 4), [[2.0, -2.0, 2.0, -2.0]])


@settings(max_examples=60, deadline=None)
@given(
    x=arrays(np.float64, (3, 16), elements=st.floats(-100, 100, allow_subnormal=False)),
    bits=st.integers(1, 12),
    group_size=st.sampled_from([1, 2, 4, 8, 16]),
)
def test_uniform_is_nearest_point_of_its_grid(x, bits, group_size):
    y = uniform_rtn(x, bits, group_size, scale_dtype=np.float64)
    groups, out = x.reshape(3, -1, group_size), y.reshape(3, -1, group_size)
    absmax = np.abs(groups).max(axis=-1, keepdims=True)
    step = 2 * absmax / (2**bits - 1)
    nonzero = np.broadcast_to(absmax > 0, out.shape)
    assert np.all(out[~nonzero] == 0)
    if not nonzero.any():
        return
    codes = out[nonzero] / np.broadcast_to(step, out.shape)[nonzero] - 0.5
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-6)
    assert codes.min() >= -(2 ** (bits - 1)) - 1e-6 and codes.max() <= 2 ** (bits - 1) - 1 + 1e-6
    # Every input is within [-absmax, absmax], covered by the grid: error <= step / 2.
    err = np.abs(groups - out)
    assert np.all(err <= step / 2 * (1 + 1e-9) + 1e-12)


def test_uniform_uses_the_stored_float16_step():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 64)) * 0.0123
    y = uniform_rtn(x, 4, 32).reshape(4, 2, 32)
    absmax = np.abs(x.reshape(4, 2, 32)).max(axis=-1, keepdims=True)
    stored_step = (2 * absmax / 15).astype(np.float16).astype(np.float64)
    codes = y / stored_step - 0.5
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-9)
    # float16 storage really changes the result compared with an exact step.
    assert not np.allclose(uniform_rtn(x, 4, 32), uniform_rtn(x, 4, 32, np.float64), rtol=0, atol=1e-9)


def test_uniform_error_decreases_with_bits_and_keeps_shape():
    x = np.random.default_rng(2).standard_normal((2, 3, 128))
    snrs = [snr_db(x, uniform_rtn(x, b, 32)) for b in range(1, 9)]
    assert all(later > earlier + 3 for earlier, later in zip(snrs, snrs[1:]))
    assert uniform_rtn(x, 3, 32).shape == x.shape
    assert uniform_rtn(x, 3, 32).dtype == np.float64


def test_uniform_zero_group_decodes_to_zero():
    x = np.zeros((1, 8))
    x[0, 4:] = [1.0, -1.0, 0.5, 0.25]
    y = uniform_rtn(x, 3, 4)
    np.testing.assert_array_equal(y[0, :4], 0.0)


def test_bits_per_value():
    assert uniform_rtn_bits_per_value(4, 128) == 4.125
    assert uniform_rtn_bits_per_value(2, 64, scale_bits=32) == 2.5


@pytest.mark.parametrize(
    "x, bits, group_size, scale_dtype",
    [
        (np.ones((2, 8)), 0, 4, np.float16),
        (np.ones((2, 8)), 17, 4, np.float16),
        (np.ones((2, 8)), 2.0, 4, np.float16),
        (np.ones((2, 8)), 4, 3, np.float16),
        (np.ones((2, 8)), 4, 0, np.float16),
        (np.array([[1.0, np.nan, 0.0, 1.0]]), 4, 4, np.float16),
        (np.array([[1.0, np.inf, 0.0, 1.0]]), 4, 4, np.float16),
        (np.array([[1e6, 0.0, 0.0, 1.0]]), 4, 4, np.float16),  # step overflows float16
        (np.ones((2, 8)), 4, 4, np.int32),
        (np.float64(1.0), 4, 1, np.float16),
    ],
)
def test_uniform_rejects_bad_input(x, bits, group_size, scale_dtype):
    with pytest.raises(CodecError):
        uniform_rtn(x, bits, group_size, scale_dtype)


# --- Lloyd-Max ------------------------------------------------------------------------


def test_lloyd_max_one_bit():
    thresholds, levels = lloyd_max_gaussian(1)
    np.testing.assert_allclose(thresholds, [0.0], atol=1e-12)
    np.testing.assert_allclose(levels, [-math.sqrt(2 / math.pi), math.sqrt(2 / math.pi)], atol=1e-12)
    assert gaussian_quantizer_mse(thresholds, levels) == pytest.approx(1 - 2 / math.pi, abs=1e-12)


def test_lloyd_max_two_bits_matches_max_1960():
    thresholds, levels = lloyd_max_gaussian(2)
    np.testing.assert_allclose(levels, [-1.510, -0.4528, 0.4528, 1.510], atol=5e-4)
    np.testing.assert_allclose(thresholds, [-0.9816, 0.0, 0.9816], atol=5e-4)
    assert gaussian_quantizer_mse(thresholds, levels) == pytest.approx(0.1175, abs=1e-4)


@pytest.mark.parametrize("bits, known_mse", [(3, 0.03454), (4, 0.009497)])
def test_lloyd_max_known_distortions(bits, known_mse):
    assert gaussian_quantizer_mse(*lloyd_max_gaussian(bits)) == pytest.approx(known_mse, rel=1e-3)


@pytest.mark.parametrize("bits", [1, 3, 5, 8, 10])
def test_lloyd_max_satisfies_both_optimality_conditions(bits):
    thresholds, levels = lloyd_max_gaussian(bits)
    assert levels.size == 2**bits and thresholds.size == 2**bits - 1
    assert np.all(np.diff(levels) > 0)
    np.testing.assert_allclose(levels, -levels[::-1], atol=1e-12)  # symmetric
    np.testing.assert_allclose(thresholds, 0.5 * (levels[1:] + levels[:-1]), atol=1e-15)
    # Centroid condition, checked with scipy.stats independently of the module's formula.
    edges = np.concatenate(([-np.inf], thresholds, [np.inf]))
    np.testing.assert_allclose(truncnorm.mean(edges[:-1], edges[1:]), levels, atol=1e-9)


def test_lloyd_max_high_rate_limit():
    # Panter-Dite: MSE * 4^b rises to sqrt(3) pi / 2 for a Gaussian.
    scaled = [gaussian_quantizer_mse(*lloyd_max_gaussian(b)) * 4**b for b in (6, 8, 10)]
    limit = math.sqrt(3) * math.pi / 2
    assert scaled[0] < scaled[1] < scaled[2] < limit
    assert scaled[2] == pytest.approx(limit, rel=3e-3)


def test_lloyd_max_returns_copies():
    _, levels = lloyd_max_gaussian(2)
    levels[:] = 0
    assert lloyd_max_gaussian(2)[1][0] < -1.5


@pytest.mark.parametrize("bits", [0, 11, 1.5])
def test_lloyd_max_rejects_bad_bits(bits):
    with pytest.raises(CodecError):
        lloyd_max_gaussian(bits)


def test_lloyd_max_quantize_values_and_snr():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 1024)) * 0.02
    for bits in (1, 2, 3):
        y = lloyd_max_quantize(x, bits, 1024)
        _, levels = lloyd_max_gaussian(bits)
        rms = np.sqrt(np.mean(x**2, axis=1, keepdims=True)).astype(np.float16).astype(np.float64)
        # Every output is a Lloyd-Max level times the stored float16 RMS.
        ratio = y / rms
        assert np.all(np.min(np.abs(ratio[..., None] - levels), axis=-1) < 1e-12)
        expected = -10 * math.log10(gaussian_quantizer_mse(*lloyd_max_gaussian(bits)))
        assert snr_db(x, y) == pytest.approx(expected, abs=0.1)
    # Lloyd-Max beats uniform RTN at the same bits and group size on Gaussian data.
    assert snr_db(x, lloyd_max_quantize(x, 3, 128)) > snr_db(x, uniform_rtn(x, 3, 128))


def test_lloyd_max_quantize_rejects_bad_input():
    with pytest.raises(CodecError):
        lloyd_max_quantize(np.ones((2, 6)), 2, 4)
    with pytest.raises(CodecError):
        lloyd_max_quantize(np.array([[np.nan, 1.0]]), 2, 2)
    with pytest.raises(CodecError):
        lloyd_max_quantize(np.ones((2, 4)), 11, 4)
