"""Tests for Beta-quantile gain quantization (paper section 3.4)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from pvq.codec.errors import CodecError
from pvq.codec.gain import BetaGainQuantizer, beta_gain_parameters


def gaussian_rows(rows: int, group_size: int, num_groups: int, seed: int):
    """Group gains (R, G) and squared row norms (R,) of i.i.d. Gaussian rows."""
    # ||w_g||^2 of D i.i.d. standard normals is chi-square(D): sample it directly.
    energies = np.random.default_rng(seed).chisquare(group_size, (rows, num_groups))
    return np.sqrt(energies), np.sum(energies, axis=1)


def normalised_gain_mse(quantizer: BetaGainQuantizer, gains, row_norm_sq) -> float:
    decoded = quantizer.decode(quantizer.encode(gains, row_norm_sq), row_norm_sq)
    return float(np.mean((decoded - gains) ** 2 / row_norm_sq[:, None]))


def test_beta_parameters_use_the_corrected_formula():
    assert beta_gain_parameters(16, 8) == (8.0, 56.0)  # (D/2, D(G-1)/2), not G(D-1)/2 = 60
    assert beta_gain_parameters(1, 2) == (0.5, 0.5)
    assert BetaGainQuantizer(4, 16, 3).beta_parameters == (2.0, 30.0)


def test_energies_follow_the_corrected_beta_law():
    group_size, num_groups = 4, 16  # corrected b = 30, the paper's misprint gives 24
    weights = np.random.default_rng(20).standard_normal((4000, num_groups * group_size))
    first_group = weights[:, :group_size]  # one group per row: independent samples
    energies = np.sum(first_group**2, axis=1) / np.sum(weights**2, axis=1)
    a, b = beta_gain_parameters(group_size, num_groups)
    assert stats.kstest(energies, stats.beta(a, b).cdf).pvalue > 1e-3
    misprint = num_groups * (group_size - 1) / 2
    assert stats.kstest(energies, stats.beta(a, misprint).cdf).pvalue < 1e-6


def test_indices_are_uniform_on_gaussian_rows():
    gains, row_norm_sq = gaussian_rows(8000, 16, 8, seed=21)
    indices = BetaGainQuantizer(16, 8, 3).encode(gains, row_norm_sq)[:, 0]
    counts = np.bincount(indices, minlength=8)
    assert stats.chisquare(counts).pvalue > 1e-3


@pytest.mark.parametrize("bits", [1, 4, 9])
def test_encode_is_floor_of_cdf_times_cells(bits):
    quantizer = BetaGainQuantizer(8, 4, bits)
    gains, row_norm_sq = gaussian_rows(500, 8, 4, seed=22)
    indices = quantizer.encode(gains, row_norm_sq)
    a, b = quantizer.beta_parameters
    cdf = stats.beta(a, b).cdf(gains**2 / row_norm_sq[:, None])
    expected = np.clip(np.floor(cdf * 2**bits), 0, 2**bits - 1)
    np.testing.assert_array_equal(indices, expected)
    assert indices.dtype == (np.uint8 if bits <= 8 else np.uint16)


def test_quantile_codebook_is_the_cell_middle_quantile():
    quantizer = BetaGainQuantizer(16, 8, 3)
    a, b = quantizer.beta_parameters
    expected = np.sqrt(stats.beta(a, b).ppf((np.arange(8) + 0.5) / 8))
    np.testing.assert_allclose(quantizer.codebook, expected, rtol=1e-12)


@pytest.mark.parametrize("group_size, num_groups, bits", [(16, 8, 2), (1, 2, 2), (128, 32, 3)])
def test_centroid_codebook_matches_numerical_integration(group_size, num_groups, bits):
    quantizer = BetaGainQuantizer(group_size, num_groups, bits, reconstruction="centroid")
    law = stats.beta(*quantizer.beta_parameters)
    edges = np.concatenate(([0.0], quantizer.thresholds, [1.0]))
    expected = [
        integrate.quad(lambda u: np.sqrt(u) * law.pdf(u), lo, hi, epsabs=1e-14, limit=200)[0]
        / (law.cdf(hi) - law.cdf(lo))
        for lo, hi in zip(edges[:-1], edges[1:])
    ]
    np.testing.assert_allclose(quantizer.codebook, expected, rtol=1e-7)


@pytest.mark.parametrize("reconstruction", ["quantile", "centroid"])
def test_codebook_values_lie_in_their_cells(reconstruction):
    quantizer = BetaGainQuantizer(32, 16, 10, reconstruction)
    gain_edges = np.sqrt(np.concatenate(([0.0], quantizer.thresholds, [1.0])))
    codebook = quantizer.codebook
    assert codebook.size == 2**10
    assert np.all(np.diff(codebook) > 0)
    assert np.all((gain_edges[:-1] <= codebook) & (codebook <= gain_edges[1:]))


@pytest.mark.parametrize("reconstruction", ["quantile", "centroid"])
def test_error_decreases_with_bits(reconstruction):
    gains, row_norm_sq = gaussian_rows(3000, 16, 8, seed=23)
    errors = [
        normalised_gain_mse(BetaGainQuantizer(16, 8, bits, reconstruction), gains, row_norm_sq)
        for bits in range(1, 9)
    ]
    # Equiprobable cells are wide in the tails, so a bit buys ~2.4x here, not the 4x
    # of an MSE-optimal quantizer; demand at least 2x.
    assert all(later < earlier / 2 for earlier, later in zip(errors, errors[1:]))


@pytest.mark.parametrize("group_size, num_groups", [(16, 8), (128, 32), (2, 4)])
def test_centroid_beats_the_paper_quantile_midpoint(group_size, num_groups):
    gains, row_norm_sq = gaussian_rows(20000, group_size, num_groups, seed=24)
    for bits in (1, 2, 3, 4):
        quantile = BetaGainQuantizer(group_size, num_groups, bits, "quantile")
        centroid = BetaGainQuantizer(group_size, num_groups, bits, "centroid")
        assert normalised_gain_mse(centroid, gains, row_norm_sq) < normalised_gain_mse(
            quantile, gains, row_norm_sq
        )


def test_decode_scales_the_codebook_by_the_row_norm():
    quantizer = BetaGainQuantizer(16, 4, 4, "centroid")
    indices = np.array([[0, 5, 15, 7], [3, 3, 3, 3]], dtype=np.uint8)
    row_norm_sq = np.array([4.0, 0.25])
    expected = quantizer.codebook[indices] * np.array([[2.0], [0.5]])
    np.testing.assert_array_equal(quantizer.decode(indices, row_norm_sq), expected)


@settings(max_examples=50, deadline=None)
@given(
    group_size=st.integers(1, 64),
    num_groups=st.integers(2, 32),
    bits=st.integers(1, 8),
    reconstruction=st.sampled_from(["quantile", "centroid"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_reencoding_a_decoded_gain_gives_the_same_index(
    group_size, num_groups, bits, reconstruction, seed
):
    quantizer = BetaGainQuantizer(group_size, num_groups, bits, reconstruction)
    gains, row_norm_sq = gaussian_rows(20, group_size, num_groups, seed)
    indices = quantizer.encode(gains, row_norm_sq)
    assert indices.max() < 2**bits
    decoded = quantizer.decode(indices, row_norm_sq)
    np.testing.assert_array_equal(quantizer.encode(decoded, row_norm_sq), indices)


def test_energies_above_one_and_zero_gains_are_clipped_to_the_end_cells():
    quantizer = BetaGainQuantizer(8, 4, 3)
    indices = quantizer.encode(np.array([[0.0, 3.0, 1.0, 1.0]]), np.array([4.0]))
    assert indices[0, 0] == 0 and indices[0, 1] == 7


def test_one_million_gains_round_trip():
    """A layer-sized batch (its speed is bench/codec_throughput.py's to measure, not a test's)."""
    quantizer = BetaGainQuantizer(128, 32, 8, "centroid")
    gains, row_norm_sq = gaussian_rows(31250, 128, 32, seed=25)  # 1e6 gains
    decoded = quantizer.decode(quantizer.encode(gains, row_norm_sq), row_norm_sq)
    assert decoded.shape == gains.shape and np.isfinite(decoded).all()
    assert np.abs(decoded - gains).mean() < np.abs(gains).mean()  # a quantizer, not noise


@pytest.mark.parametrize(
    "args",
    [(16, 8, 0), (16, 8, 17), (16, 8, 2.0), (0, 8, 4), (16, 1, 4), (16, 8, 4, "median")],
)
def test_constructor_rejects_bad_parameters(args):
    with pytest.raises(CodecError):
        BetaGainQuantizer(*args)


@pytest.mark.parametrize(
    "gains, row_norm_sq, fragment",
    [
        (np.array([[1.0, -0.5]]), np.array([2.0]), "-0.5"),
        (np.array([[1.0, np.nan]]), np.array([2.0]), "nan"),
        (np.array([[1.0, np.inf]]), np.array([2.0]), "inf"),
        (np.array([[1.0, 1.0, 1.0]]), np.array([3.0]), "shape"),
        (np.array([1.0, 1.0]), np.array([2.0]), "shape"),
        (np.array([[1.0, 1.0]]), np.array([0.0]), "row_norm_sq"),
        (np.array([[1.0, 1.0]]), np.array([np.inf]), "row_norm_sq"),
        (np.array([[1.0, 1.0]]), np.array([2.0, 2.0]), "shape"),
        (np.array([["a", "b"]]), np.array([2.0]), "dtype"),
    ],
)
def test_encode_rejects_bad_input(gains, row_norm_sq, fragment):
    with pytest.raises(CodecError, match=fragment):
        BetaGainQuantizer(4, 2, 3).encode(gains, row_norm_sq)


@pytest.mark.parametrize(
    "indices, row_norm_sq, fragment",
    [
        (np.array([[0, 8]]), np.array([2.0]), "index 8"),
        (np.array([[-1, 0]]), np.array([2.0]), "index -1"),
        (np.array([[0.0, 1.0]]), np.array([2.0]), "integer"),
        (np.array([[0, 1, 2]]), np.array([2.0]), "shape"),
        (np.array([[0, 1]]), np.array([-1.0]), "row_norm_sq"),
    ],
)
def test_decode_rejects_bad_input(indices, row_norm_sq, fragment):
    with pytest.raises(CodecError, match=fragment):
        BetaGainQuantizer(4, 2, 3).decode(indices, row_norm_sq)


# ------------------------------------------------------------------ empirical codebook


def test_empirical_codebook_is_lloyd_max_fixed_point():
    from pvq.codec.gain import empirical_gain_codebook, nearest_level

    rng = np.random.default_rng(3)
    values = np.abs(rng.standard_t(df=3, size=20_000))
    levels = empirical_gain_codebook(values, 3)
    assert levels.shape == (8,) and np.all(np.diff(levels) > 0)
    idx = nearest_level(values, levels)
    for i in range(8):  # each level is the mean of its cell
        assert levels[i] == pytest.approx(values[idx == i].mean(), rel=1e-9)
    # lower MSE than the equal-probability (quantile) levels it starts from
    quantile_levels = np.quantile(values, (np.arange(8) + 0.5) / 8)
    mse = lambda lv: np.mean((values - lv[nearest_level(values, lv)]) ** 2)  # noqa: E731
    assert mse(levels) < 0.9 * mse(quantile_levels)


def test_empirical_codebook_bad_input():
    from pvq.codec.gain import empirical_gain_codebook

    with pytest.raises(CodecError):
        empirical_gain_codebook(np.array([]), 4)
    with pytest.raises(CodecError):
        empirical_gain_codebook(np.array([1.0, np.nan]), 4)
    with pytest.raises(CodecError):
        empirical_gain_codebook(np.ones(10), 0)
