"""GPTQ: beats RTN on the proxy loss, exact round trip (also with act_order), robustness."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pvq.methods import QuantizationError, proxy_loss
from pvq.methods import gptq, rtn
from pvq.methods.synthetic import synthetic_layer


@pytest.fixture(scope="module")
def layer():
    return synthetic_layer(128, 384, seed=20)


def _same_bytes(a, b) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(
        a.tensors[k].dtype == b.tensors[k].dtype and a.tensors[k].tobytes() == b.tensors[k].tobytes() for k in a.tensors
    )


@pytest.mark.parametrize("bits, group_size", [(3, 64), (4, 128), (3, -1)])
def test_beats_rtn_and_round_trips(layer, bits, group_size):
    W, H = layer
    ref = rtn.quantize(W, H, rtn.CONFIG(bits, group_size))
    qt = gptq.quantize(W, H, gptq.CONFIG(bits, group_size))
    assert qt.proxy_loss < 0.5 * ref.proxy_loss
    Q = gptq.dequantize(qt)
    assert Q.dtype == torch.float32 and Q.shape == W.shape
    assert proxy_loss(W, Q, H) == qt.proxy_loss
    assert qt.bits_per_weight == ref.bits_per_weight  # same payload format
    json.dumps(qt.meta)


def test_act_order_round_trip(layer):
    W, H = layer
    plain = gptq.quantize(W, H, gptq.CONFIG(3, 64))
    qt = gptq.quantize(W, H, gptq.CONFIG(3, 64, act_order=True))
    perm = qt.tensors["perm"]
    assert perm.dtype == np.int16 and sorted(perm.tolist()) == list(range(384))
    assert perm.tolist() == torch.argsort(torch.diagonal(H), descending=True, stable=True).tolist()
    Q = gptq.dequantize(qt)
    assert proxy_loss(W, Q, H) == qt.proxy_loss
    assert qt.proxy_loss < plain.proxy_loss  # outlier channels first helps on this layer
    # groups are formed in permuted order: each permuted group of 64 columns has <= 8 levels
    Qp = Q[:, torch.from_numpy(perm.astype(np.int64))].reshape(128, 6, 64)
    assert max(len(torch.unique(Qp[r, g])) for r in range(0, 128, 17) for g in range(6)) <= 8


def test_identity_hessian_is_rtn(layer):
    W, _ = layer
    H = torch.eye(W.shape[1])
    a = gptq.quantize(W, H, gptq.CONFIG(4, 64))
    b = rtn.quantize(W, H, rtn.CONFIG(4, 64))
    assert all(a.tensors[k].tobytes() == b.tensors[k].tobytes() for k in ("codes", "scales", "zeros"))


@pytest.mark.parametrize("block_size", [1, 48, 100, 1000])
def test_block_size_does_not_change_the_math(layer, block_size):
    W, H = layer
    ref = gptq.quantize(W, H, gptq.CONFIG(4, 32, block_size=128))
    qt = gptq.quantize(W, H, gptq.CONFIG(4, 32, block_size=block_size))
    assert qt.meta["block_size"] % 32 == 0
    assert qt.proxy_loss == pytest.approx(ref.proxy_loss, rel=1e-3)
    assert proxy_loss(W, gptq.dequantize(qt), H) == qt.proxy_loss


def test_group_not_dividing_block(layer):
    W, H = layer
    qt = gptq.quantize(W, H, gptq.CONFIG(3, 96, block_size=128))
    assert qt.meta["block_size"] == 96
    assert proxy_loss(W, gptq.dequantize(qt), H) == qt.proxy_loss


def test_deterministic(layer):
    W, H = layer
    cfg = gptq.CONFIG(3, 64, act_order=True)
    a, b = gptq.quantize(W, H, cfg), gptq.quantize(W.clone(), H.clone(), cfg)
    assert _same_bytes(a, b) and a.meta == b.meta


def test_dead_columns_are_zero(layer):
    W, H = layer
    H = H.clone()
    dead = [5, 77, 200]
    H[dead, :] = 0
    H[:, dead] = 0
    qt = gptq.quantize(W, H, gptq.CONFIG(4, 64))
    Q = gptq.dequantize(qt)
    assert torch.count_nonzero(Q[:, dead]) == 0
    assert qt.extra["dead_columns"] == 3
    assert proxy_loss(W, Q, H) == qt.proxy_loss


def test_indefinite_hessian_no_nan(layer):
    W, H = layer
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0))
    Hbad = H - 2 * float(torch.linalg.eigvalsh(H.double()).max()) * torch.outer(v, v) / v.dot(v)
    qt = gptq.quantize(W, Hbad, gptq.CONFIG(4, 64))
    Q = gptq.dequantize(qt)
    assert torch.isfinite(Q).all() and np.isfinite(qt.proxy_loss)
    assert qt.meta["damping"] > 0.01 * float(torch.diagonal(Hbad).abs().mean())


def test_bad_input(layer):
    W, H = layer
    with pytest.raises(QuantizationError, match="needs the layer's Hessian"):
        gptq.quantize(W, None, gptq.CONFIG())
    with pytest.raises(QuantizationError, match="divisor of 384"):
        gptq.quantize(W, H, gptq.CONFIG(4, 100))
    with pytest.raises(QuantizationError, match="Hessian shape"):
        gptq.quantize(W, H[:10, :10], gptq.CONFIG())
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(QuantizationError, match="non-finite"):
        gptq.quantize(bad, H, gptq.CONFIG())
    for kwargs in ({"bits": 9}, {"block_size": 0}, {"percdamp": -1.0}, {"act_order": "yes"}, {"group_size": -3}):
        with pytest.raises(QuantizationError):
            gptq.CONFIG(**kwargs)
