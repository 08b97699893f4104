"""RTN on the asymmetric min-max grid: exact round trip, grid bounds, payload size, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pvq.methods import QuantizationError, get_method, proxy_loss
from pvq.methods import rtn
from pvq.methods.synthetic import synthetic_layer


@pytest.fixture(scope="module")
def layer():
    return synthetic_layer(128, 384, seed=10)


def _same_bytes(a, b) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(
        a.tensors[k].dtype == b.tensors[k].dtype and a.tensors[k].tobytes() == b.tensors[k].tobytes() for k in a.tensors
    )


@pytest.mark.parametrize("bits, group_size", [(2, 32), (3, 64), (4, 128), (8, 64), (4, -1), (3, 0)])
def test_round_trip_and_grid(layer, bits, group_size):
    W, H = layer
    qt = rtn.quantize(W, H, rtn.CONFIG(bits=bits, group_size=group_size))
    Q = rtn.dequantize(qt)
    assert Q.dtype == torch.float32 and Q.shape == W.shape
    # the proxy loss was computed on the internal result: dequantization reproduces it exactly
    assert proxy_loss(W, Q, H) == qt.proxy_loss
    gs = 384 if group_size in (-1, 0) else group_size
    G = 384 // gs
    assert qt.meta["group_size"] == gs and qt.meta["num_groups"] == G
    scales = torch.from_numpy(qt.tensors["scales"].astype(np.float32)).repeat_interleave(gs, dim=1)
    # round to nearest on a grid spanning the group (scale rounded up): within half a step
    assert ((W - Q).abs() <= scales * 0.5 * (1 + 1e-6)).all()
    # each group has at most 2^bits distinct values on an evenly spaced grid
    steps = torch.round((Q / scales)).reshape(128, G, gs)
    assert (steps.amax(-1) - steps.amin(-1) <= 2**bits - 1).all()
    json.dumps(qt.meta)


def test_measured_bits(layer):
    W, H = layer
    for bits, gs in [(3, 64), (4, 128), (2, 32)]:
        cfg = rtn.CONFIG(bits=bits, group_size=gs)
        qt = rtn.quantize(W, None, cfg)
        assert qt.proxy_loss is None
        assert qt.bits_per_weight == pytest.approx(rtn.nominal_bits_per_weight(cfg), abs=8 / W.numel() * 2)
        assert qt.tensors["scales"].dtype == np.float16
        assert qt.tensors["codes"].dtype == np.uint8 and qt.tensors["zeros"].dtype == np.uint8
    assert rtn.nominal_bits_per_weight(rtn.CONFIG(4, -1), columns=384) == 4 + 20 / 384


def test_deterministic(layer):
    W, H = layer
    a = rtn.quantize(W, H, rtn.CONFIG(3, 64))
    b = rtn.quantize(W.clone(), H.clone(), rtn.CONFIG(3, 64))
    assert _same_bytes(a, b) and a.meta == b.meta


def test_edge_groups():
    W = torch.zeros(4, 64)
    W[1] = 0.5  # all-positive row
    W[2] = -0.25  # all-negative row
    W[3, ::2] = 1e-9  # far below the smallest float16 scale
    qt = rtn.quantize(W, None, rtn.CONFIG(4, 32))
    Q = rtn.dequantize(qt)
    assert torch.isfinite(Q).all()
    assert torch.equal(Q[0], W[0])
    assert torch.allclose(Q[1:3], W[1:3], rtol=1e-3)
    assert Q[3].abs().max() < 1e-6


def test_registry_and_default_config(layer):
    W, _ = layer
    m = get_method("rtn")
    qt = m.quantize(W, None, m.config_class(bits=4, group_size=64))
    assert qt.method == "rtn" and torch.equal(m.dequantize(qt), rtn.dequantize(qt))
    assert rtn.quantize(W, None, None).meta["bits"] == rtn.CONFIG().bits


@pytest.mark.parametrize("kwargs", [{"bits": 1}, {"bits": 9}, {"bits": 3.0}, {"bits": True}, {"group_size": -2}, {"group_size": 64.0}])
def test_bad_config(kwargs):
    with pytest.raises(QuantizationError, match="bits|group_size"):
        rtn.CONFIG(**kwargs)


def test_bad_input(layer):
    W, H = layer
    with pytest.raises(QuantizationError, match=r"not divisible by group_size 100.*divisor of 384"):
        rtn.quantize(W, H, rtn.CONFIG(4, 100))
    bad = W.clone()
    bad[3, 7] = float("inf")
    with pytest.raises(QuantizationError, match="non-finite.*row 3, column 7"):
        rtn.quantize(bad, H, rtn.CONFIG(4, 64))
    with pytest.raises(QuantizationError, match="Hessian shape"):
        rtn.quantize(W, H[:-1, :-1], rtn.CONFIG(4, 64))
    with pytest.raises(QuantizationError, match="2-D"):
        rtn.quantize(W[0], None, rtn.CONFIG(4, 64))
    with pytest.raises(QuantizationError, match="RTNConfig"):
        rtn.quantize(W, None, {"bits": 4})
