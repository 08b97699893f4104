import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import enumerate_pyramid
from pvq.codec.counts import (
    code_bits,
    count_table,
    cumulative_table,
    pulses_for_bits,
    pyramid_count,
    word_tables,
)
from pvq.codec.enumeration import words_to_ints
from pvq.codec.errors import CodecError


def test_count_matches_enumerated_pyramid_small():
    for D in range(0, 7):
        for K in range(0, 7):
            assert pyramid_count(D, K) == len(enumerate_pyramid(D, K)), (D, K)


def test_recurrence_table_matches_closed_form():
    table = count_table(40, 60)
    for d in range(41):
        for k in range(61):
            assert table[d][k] == pyramid_count(d, k)
    # Boundary conditions of the (corrected) recurrence.
    assert all(table[d][0] == 1 for d in range(41))
    assert all(table[0][k] == 0 for k in range(1, 61))


def test_known_values():
    assert pyramid_count(2, 7) == 28  # paper Figure 2: C_{2,7} = [0, 27]
    assert pyramid_count(3, 1) == 6
    assert pyramid_count(1, 5) == 2


def test_arbitrary_precision():
    n = pyramid_count(1024, 4096)
    assert n.bit_length() == 4549
    assert pyramid_count(300, 900) == count_table(300, 900)[300][900]  # recurrence agrees when wide


def test_cumulative_table():
    table = count_table(5, 8)
    V = cumulative_table(table)
    for d in range(6):
        for k in range(9):
            assert V[d][k] == sum(table[d][1 : k + 1])


@given(D=st.integers(1, 300), bits=st.floats(0.0, 6.0, allow_nan=False))
def test_pulses_for_bits_is_largest_fitting(D, bits):
    K = pulses_for_bits(D, bits)
    assert math.log2(pyramid_count(D, K)) <= bits * D + 1e-9
    if D == 1:  # N(1, K) = 2 for all K >= 1: the smallest K with the most points
        assert K == (1 if bits >= 1 else 0)
    else:
        assert math.log2(pyramid_count(D, K + 1)) > bits * D - 1e-9


def test_pulses_for_bits_exact_boundary():
    # N(2, 1) = 4 = 2^2: exactly 1 bit per dimension in D = 2 allows K = 1, not 2 (N(2,2) = 8).
    assert pulses_for_bits(2, 1.0) == 1
    assert pulses_for_bits(16, 3) == 27
    assert code_bits(16, 27) <= 48


def test_code_bits():
    for D, K in [(1, 1), (2, 7), (16, 27), (128, 187)]:
        assert code_bits(D, K) == math.ceil(math.log2(pyramid_count(D, K)))
    assert code_bits(5, 0) == 0


def test_word_tables_equal_big_integer_tables():
    D, K = 70, 150
    wt = word_tables(D, K)
    assert wt.words >= 2  # exercises multi-word carries
    table, V = count_table(D, K), None
    V = cumulative_table(table)
    counts = words_to_ints(wt.counts.reshape(-1, wt.words))
    cumul = words_to_ints(wt.cumulative.reshape(-1, wt.words))
    for d in range(D + 1):
        for k in range(K + 1):
            assert counts[d * (K + 1) + k] == table[d][k]
            if d < D:
                assert cumul[d * (K + 1) + k] == V[d][k]
    assert not wt.counts.flags.writeable


@pytest.mark.parametrize(
    "args",
    [(-1, 3), (3, -1), (2.5, 3), (True, 2), (0, 3), (1 << 20, 2)],
)
def test_bad_dimension_or_pulses(args):
    with pytest.raises(CodecError):
        word_tables(*args)


@pytest.mark.parametrize("bits", [float("nan"), float("inf"), -1.0])
def test_bad_bits(bits):
    with pytest.raises(CodecError):
        pulses_for_bits(16, bits)


def test_table_memory_guard(monkeypatch):
    import pvq.codec.counts as counts

    monkeypatch.setattr(counts, "MAX_TABLE_BYTES", 1000)
    with pytest.raises(CodecError, match="GiB"):
        counts.word_tables.__wrapped__(64, 64)
