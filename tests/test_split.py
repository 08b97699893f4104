"""The split enumeration (`pvq.codec.split`): a bijection P(D, K) -> [0, N(D, K)),
fast codec = reference recursion, exhaustively for small (D, K) and on samples beyond."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import enumerate_pyramid
from hypothesis import assume, given
from hypothesis import strategies as st

from pvq.codec import (
    CodecError,
    pulses_for_bits,
    pyramid_count,
    search,
    split_decode,
    split_decode_reference,
    split_encode,
    split_encode_reference,
    split_supported,
)
from pvq.codec.split import MAX_CODE, split_tables


@pytest.mark.parametrize("D", range(1, 8))
def test_reference_is_a_bijection_and_fast_codec_equals_it(D):
    for K in range(7 if D < 6 else 5):
        N = pyramid_count(D, K)
        points = [split_decode_reference(c, D, K) for c in range(N)]
        assert sorted(map(tuple, points)) == sorted(map(tuple, enumerate_pyramid(D, K)))  # onto P(D, K), no repeats
        assert [split_encode_reference(p, K) for p in points] == list(range(N))
        fast = split_decode(np.arange(N, dtype=np.uint64), D, K)
        assert np.array_equal(fast, np.array(points, dtype=np.int32).reshape(N, D))
        assert np.array_equal(split_encode(fast, K), np.arange(N, dtype=np.uint64))


@pytest.mark.parametrize("D, bits", [(8, 3.0), (16, 3.0), (16, 3.25), (32, 1.5), (12, 3.0), (24, 2.0), (4, 4.0)])
def test_large_pyramids_sampled_against_the_reference(D, bits):
    K = pulses_for_bits(D, bits)
    assert split_supported(D, K)
    N = pyramid_count(D, K)
    rng = np.random.default_rng(D)
    codes = [0, N - 1, N // 2] + [int(c) for c in rng.integers(0, N, 200, dtype=np.uint64)]
    fast = split_decode(np.array(codes, dtype=np.uint64), D, K)
    for c, p in zip(codes, fast):
        assert split_decode_reference(c, D, K) == p.tolist()
        assert split_encode_reference(p.tolist(), K) == c
    assert np.array_equal(split_encode(fast, K), np.array(codes, dtype=np.uint64))
    # unrolled decoders (D = 4, 8, 16, 32 with every leaf tabulated) and the tree walk agree
    tb = split_tables(D, K)
    assert (D in (4, 8, 16, 32)) == (tb.leaf_kmax >= 0)


@given(st.integers(2, 20), st.integers(0, 30), st.randoms(use_true_random=False))
def test_round_trip_of_searched_points(D, K, rnd):
    assume(split_supported(D, K))
    x = np.array([[rnd.gauss(0, 1) for _ in range(D)] for _ in range(8)])
    points = search(x, K, "greedy") if K else np.zeros((8, D), np.int32)
    codes = split_encode(points, K)
    assert np.all(codes < np.uint64(pyramid_count(D, K)))
    assert np.array_equal(split_decode(codes, D, K), points)
    assert [split_encode_reference(p.tolist(), K) for p in points] == [int(c) for c in codes]


def test_bad_input_is_refused():
    D, K = 16, 27
    N = pyramid_count(D, K)
    with pytest.raises(CodecError, match="out of range"):
        split_decode(np.array([0, N], dtype=np.uint64), D, K)
    with pytest.raises(CodecError, match="L1 norm"):
        split_encode(np.ones((1, D), np.int32), K)
    with pytest.raises(CodecError, match="out of range"):
        split_decode_reference(N, D, K)
    # wider than 2^53: the fast codec refuses, the reference still answers
    wide_K = next(k for k in range(1, 200) if pyramid_count(32, k) > MAX_CODE)
    assert not split_supported(32, wide_K)
    with pytest.raises(CodecError, match="2\\^53"):
        split_tables(32, wide_K)
    c = pyramid_count(32, wide_K) - 1
    assert split_encode_reference(split_decode_reference(c, 32, wide_K), wide_K) == c
