"""bench/entropy.py, the estimate issue 30's entropy-coding decision rests on: for a source
that is uniform over the pyramid P(D, K) (every point once) the coordinate-by-coordinate
model must cost exactly log2 N(D, K) bits a point, and no model can beat that; a skewed
source must cost less."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from pvq.codec import decode_reference
from pvq.codec.counts import pyramid_count as pvq_count


def _entropy_module():
    path = Path(__file__).resolve().parents[1] / "bench" / "entropy.py"
    spec = importlib.util.spec_from_file_location("bench_entropy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("D,K", [(2, 3), (3, 4), (4, 3), (5, 2), (4, 5)])
def test_every_point_once_costs_exactly_log2_n_bits_a_point(D, K):
    entropy = _entropy_module()
    N = int(pvq_count(D, K))
    points = np.array([decode_reference(i, D, K) for i in range(N)], dtype=np.int64)
    assert len({tuple(p) for p in points}) == N  # the whole pyramid, each point once
    bits, cells = entropy.shape_bits(points, K)
    assert bits == pytest.approx(N * math.log2(N), rel=1e-12)
    assert cells == sum(len(c) for c in entropy.shape_contexts(points, K)[0].values())


def test_a_skewed_source_costs_less_than_the_fixed_rate():
    entropy = _entropy_module()
    D, K = 4, 3
    N = int(pvq_count(D, K))
    rng = np.random.default_rng(0)
    codes = np.minimum(rng.geometric(0.2, size=4000) - 1, N - 1)  # a few points far more often than the rest
    points = np.array([decode_reference(int(i), D, K) for i in codes], dtype=np.int64)
    bits, _ = entropy.shape_bits(points, K)
    assert bits < len(points) * math.log2(N)
    assert entropy.gain_bits_entropy(np.zeros(100, dtype=np.int64), 16) == 32 * 16  # one symbol: only the model
