import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pvq.codec.counts import code_bits, pulses_for_bits, pyramid_count, word_tables
from pvq.codec.enumeration import decode, encode, ints_to_words, words_to_ints
from pvq.codec.errors import CodecError
from pvq.codec.packing import pack_codes, packed_size, unpack_codes


@given(bits=st.integers(1, 700), count=st.integers(0, 40), seed=st.integers(0, 2**32 - 1))
def test_pack_round_trip(bits, count, seed):
    rng = np.random.default_rng(seed)
    ints = [int.from_bytes(rng.bytes(bits // 8 + 1), "little") % (1 << bits) for _ in range(count)]
    ints[: min(count, 1)] = [(1 << bits) - 1] * min(count, 1)  # all-ones code at the top
    W = (bits + 63) // 64
    stream = pack_codes(ints_to_words(ints, W), bits)
    assert stream.dtype == np.uint8 and stream.size == packed_size(count, bits)
    assert words_to_ints(unpack_codes(stream, count, bits)) == ints
    assert words_to_ints(unpack_codes(stream.tobytes(), count, bits)) == ints


def test_layout_is_lsb_first():
    stream = pack_codes(np.array([1, 2, 3], dtype=np.uint64), 3)
    # codes 1, 2, 3 in 3 bits, LSB first: stream bits 1,0,0 | 0,1,0 | 1,1,0
    # -> byte 0 has bits 0, 4, 6, 7 set = 1 + 16 + 64 + 128 = 209; byte 1 = 0.
    assert stream.tolist() == [209, 0]


@given(D=st.integers(1, 256), K=st.integers(1, 1024), seed=st.integers(0, 2**32 - 1))
def test_pyramid_codes_pack_to_nominal_size(D, K, seed):
    rng = np.random.default_rng(seed)
    N = pyramid_count(D, K)
    W = word_tables(D, K).words
    ints = [int.from_bytes(rng.bytes(8 * W + 8), "little") % N for _ in range(5)]
    points = decode(ints_to_words(ints, W), D, K)
    bits = code_bits(D, K)
    stream = pack_codes(encode(points, K), bits)
    assert stream.size == (5 * bits + 7) // 8
    back = unpack_codes(stream, 5, bits)
    np.testing.assert_array_equal(decode(back[:, :W], D, K), points)


def test_bits_per_weight_arithmetic():
    # 16-dim groups at 3 shape bits: K = 27, 48-bit codes -> exactly 3 bits per weight.
    D, K = 16, pulses_for_bits(16, 3)
    bits = code_bits(D, K)
    assert bits == 48
    groups = 100_000
    assert packed_size(groups, bits) * 8 / (groups * D) == pytest.approx(3.0)


def test_truncated_stream():
    stream = pack_codes(np.arange(10, dtype=np.uint64), 5)
    with pytest.raises(CodecError, match="truncated"):
        unpack_codes(stream[:-1], 10, 5)


def test_code_too_wide():
    with pytest.raises(CodecError, match="row 1"):
        pack_codes(np.array([3, 8, 1], dtype=np.uint64), 3)


def test_bad_arguments():
    with pytest.raises(CodecError):
        pack_codes(np.array([-1, 2]), 3)
    with pytest.raises(CodecError):
        pack_codes(np.zeros((2, 1), dtype=np.uint64), -1)
    with pytest.raises(CodecError):
        unpack_codes(np.zeros(4, dtype=np.int32), 1, 3)
    with pytest.raises(CodecError):
        pack_codes(np.zeros((1, 1), dtype=np.uint64), 65)
