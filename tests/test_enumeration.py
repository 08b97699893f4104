import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import enumerate_pyramid
from pvq.codec.counts import count_table, pulses_for_bits, pyramid_count, word_tables
from pvq.codec.enumeration import (
    decode,
    decode_reference,
    encode,
    encode_reference,
    ints_to_words,
    words_to_ints,
)
from pvq.codec.errors import CodecError


@pytest.mark.parametrize("D", range(1, 7))
def test_exhaustive_bijection_small(D):
    """Every point of P(D,K), D,K <= 6: codes are exactly 0..N-1, both ways, both impls."""
    for K in range(0, 7):
        points = enumerate_pyramid(D, K)
        N = pyramid_count(D, K)
        assert len(points) == N
        table = count_table(D, K)
        ref_codes = [encode_reference(p, K, table) for p in points]
        assert sorted(ref_codes) == list(range(N))
        for p, c in zip(points, ref_codes):
            assert decode_reference(c, D, K, table) == p
        arr = np.array(points, dtype=np.int64).reshape(len(points), D)
        codes = encode(arr, K)
        assert words_to_ints(codes) == ref_codes
        np.testing.assert_array_equal(decode(codes, D, K), arr)
        # decode of every integer in range hits every point once
        all_codes = ints_to_words(list(range(N)), word_tables(D, K).words)
        decoded = decode(all_codes, D, K)
        assert len({tuple(r) for r in decoded.tolist()}) == N


def test_enumeration_order_is_fischers():
    # 0 first, then +1, -1, +2, -2, ... in the first coordinate (Appendix B).
    D, K = 2, 2
    order = [decode_reference(c, D, K) for c in range(pyramid_count(D, K))]
    assert order == [[0, 2], [0, -2], [1, 1], [1, -1], [-1, 1], [-1, -1], [2, 0], [-2, 0]]


def _random_codes(rng, D, K, count):
    N = pyramid_count(D, K)
    W = word_tables(D, K).words
    return [int.from_bytes(rng.bytes(8 * W + 8), "little") % N for _ in range(count)]


@given(
    D=st.integers(1, 256),
    K=st.integers(0, 1024),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_random_sizes(D, K, seed):
    rng = np.random.default_rng(seed)
    ints = _random_codes(rng, D, K, 8)
    ints += [0, pyramid_count(D, K) - 1]  # the extremes
    W = word_tables(D, K).words
    points = decode(ints_to_words(ints, W), D, K)
    assert points.shape == (len(ints), D)
    assert np.all(np.abs(points).sum(axis=1) == K)
    assert words_to_ints(encode(points, K)) == ints


@pytest.mark.parametrize("D,bits", [(16, 3), (32, 3.5), (128, 3), (128, 4), (200, 2.5)])
def test_vectorised_equals_big_integer_reference(D, bits):
    K = pulses_for_bits(D, bits)
    rng = np.random.default_rng(D)
    table = count_table(D, K)
    ints = _random_codes(rng, D, K, 64)
    points = decode(ints_to_words(ints, word_tables(D, K).words), D, K)
    for c, p in zip(ints, points.tolist()):
        assert decode_reference(c, D, K, table) == p
        assert encode_reference(p, K, table) == c


def test_single_limb_1d_codes_accepted():
    codes = np.arange(pyramid_count(3, 2), dtype=np.int64)
    pts = decode(codes, 3, 2)
    assert words_to_ints(encode(pts, 2)) == codes.tolist()


@pytest.mark.slow
def test_largest_supported_size():
    D, K = 1024, 4096
    rng = np.random.default_rng(7)
    ints = _random_codes(rng, D, K, 4)
    points = decode(ints_to_words(ints, word_tables(D, K).words), D, K)
    assert words_to_ints(encode(points, K)) == ints
    assert decode_reference(ints[0], D, K) == points[0].tolist()


# ---------------------------------------------------------------- bad input


def test_code_out_of_range():
    N = pyramid_count(4, 3)
    with pytest.raises(CodecError, match="out of range"):
        decode(np.array([0, N], dtype=np.uint64), 4, 3)
    with pytest.raises(CodecError, match="out of range"):
        decode_reference(N, 4, 3)
    with pytest.raises(CodecError, match="out of range"):
        decode_reference(-1, 4, 3)


def test_negative_code():
    with pytest.raises(CodecError, match="negative"):
        decode(np.array([3, -1]), 4, 3)
    with pytest.raises(CodecError, match="negative"):
        ints_to_words([5, -2], 1)


def test_multiword_code_out_of_range():
    D, K = 128, 187
    N = pyramid_count(D, K)
    W = word_tables(D, K).words
    with pytest.raises(CodecError, match="row 1"):
        decode(ints_to_words([N - 1, N, 0], W), D, K)


def test_wrong_limb_count():
    with pytest.raises(CodecError, match="limbs"):
        decode(np.zeros((2, 3), dtype=np.uint64), 4, 3)


def test_point_off_pyramid():
    with pytest.raises(CodecError, match="L1 norm 4"):
        encode(np.array([[1, 1, 1], [2, 1, 1]]), 3)
    with pytest.raises(CodecError, match="not on the pyramid"):
        encode_reference([1, 0, 1], 3)


def test_point_wrong_shape_or_dtype():
    with pytest.raises(CodecError, match="shape"):
        encode(np.zeros((2, 2, 2), dtype=np.int64), 0)
    with pytest.raises(CodecError, match="integers"):
        encode(np.array([[0.5, 2.5]]), 3)
    with pytest.raises(CodecError):
        encode(np.zeros((1, 0), dtype=np.int64), 0)


def test_wrong_length_point():
    with pytest.raises(CodecError, match="length 3, expected 4"):
        encode(np.array([[1, 1, 1]]), 3, D=4)
