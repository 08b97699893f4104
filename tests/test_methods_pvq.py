"""PVQ with Hessian feedback: exact round trip, loss ordering, stored size, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pvq.codec import decode, pulses_for_bits, search, unpack_codes
from pvq.methods import QuantizationError, get_method, proxy_loss
from pvq.methods import pvq, rtn
from pvq.methods.pvq import (
    _REFINE_REL_TOL,
    PVQConfig,
    _refine_rows,
    dequantize,
    nominal_bits_per_weight,
    payload_spec,
    quantize,
)
from pvq.methods.synthetic import synthetic_layer


@pytest.fixture(scope="module")
def layer():
    return synthetic_layer(128, 576, seed=30)


@pytest.fixture(scope="module")
def losses(layer):
    W, H = layer
    out = {}
    for name, kwargs in {
        "plain": dict(use_hessian=False),
        "hessian": dict(hessian_refine=False),
        "refine": dict(),
    }.items():
        out[name] = pvq.quantize(W, H, pvq.CONFIG(group_size=64, shape_bits=3, gain="fp16", **kwargs))
    out["rtn"] = rtn.quantize(W, H, rtn.CONFIG(3, 64))
    return out


def _same_bytes(a, b) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(
        a.tensors[k].dtype == b.tensors[k].dtype and a.tensors[k].tobytes() == b.tensors[k].tobytes() for k in a.tensors
    )


def test_loss_ordering(losses):
    assert losses["plain"].proxy_loss < losses["rtn"].proxy_loss  # 3.25 bpw PVQ vs 3.30 bpw RTN
    assert losses["hessian"].proxy_loss < 0.5 * losses["plain"].proxy_loss
    assert losses["refine"].proxy_loss < losses["hessian"].proxy_loss


@pytest.mark.parametrize("name", ["plain", "hessian", "refine"])
def test_round_trip(layer, losses, name):
    W, H = layer
    qt = losses[name]
    Q = pvq.dequantize(qt)
    assert Q.dtype == torch.float32 and Q.shape == W.shape
    assert proxy_loss(W, Q, H) == pytest.approx(qt.proxy_loss, rel=1e-12)  # einsum order may vary with threads
    json.dumps(qt.meta)
    # the codes are pyramid points of P(64, K), row-major
    K, G = qt.meta["pulses"], qt.meta["num_groups"]
    assert K == pulses_for_bits(64, 3)
    pts = decode(unpack_codes(qt.tensors["codes"], 128 * G, qt.meta["code_bits"]), 64, K)
    assert (np.abs(pts).sum(1) == K).all()
    g16 = qt.tensors["gains"].astype(np.float64).reshape(-1)
    u = pts / np.linalg.norm(pts, axis=1, keepdims=True)
    assert np.allclose(Q.numpy().reshape(-1, 64), u * g16[:, None], atol=1e-6)


@pytest.mark.parametrize("use_hessian", [False, True])
def test_beta_gains_bits(layer, use_hessian):
    W, H = layer
    cfg = pvq.CONFIG(group_size=16, shape_bits=3, gain="beta", gain_bits=4, use_hessian=use_hessian)
    qt = pvq.quantize(W, H, cfg)
    assert pvq.nominal_bits_per_weight(cfg) == 3.25
    assert set(qt.tensors) == {"codes", "gain_indices", "row_norms"}
    assert qt.tensors["row_norms"].dtype == np.float16
    assert abs(qt.bits_per_weight / 3.25 - 1) < 0.01
    assert proxy_loss(W, pvq.dequantize(qt), H) == qt.proxy_loss
    assert qt.meta["reconstruction"] == "centroid"


def test_fp16_bits_exact(layer):
    W, H = layer
    cfg = pvq.CONFIG(group_size=64, shape_bits=3, gain="fp16")
    qt = pvq.quantize(W, H, cfg)
    assert pvq.nominal_bits_per_weight(cfg) == (cfg.code_bits + 16) / 64 == 3.25
    assert qt.bits_per_weight == 3.25
    frac = pvq.CONFIG(group_size=32, shape_bits=3.5, gain="beta", gain_bits=6)
    assert pvq.nominal_bits_per_weight(frac) == (frac.code_bits + 6) / 32 <= 3.5 + 6 / 32


def test_beta_beats_rtn_at_lower_bits(layer, losses):
    W, H = layer
    qt = pvq.quantize(W, H, pvq.CONFIG(group_size=16, shape_bits=3, gain="beta", gain_bits=4))
    assert qt.proxy_loss < losses["rtn"].proxy_loss


def test_deterministic(layer):
    W, H = layer
    cfg = pvq.CONFIG(group_size=32, shape_bits=3, gain="beta", gain_bits=5)
    a, b = pvq.quantize(W, H, cfg), pvq.quantize(W.clone(), H.clone(), cfg)
    assert _same_bytes(a, b) and a.meta == b.meta


def test_no_hessian_plain():
    W, _ = synthetic_layer(32, 128, seed=31)
    qt = pvq.quantize(W, None, pvq.CONFIG(group_size=32, gain="fp16", use_hessian=False))
    assert qt.proxy_loss is None and "damping" not in qt.meta
    Q = pvq.dequantize(qt)
    # least-squares gain: the residual of every group is orthogonal to its reconstruction,
    # up to the float16 rounding of the gain (relative 2^-11)
    Wg, Qg = W.double().reshape(-1, 32), Q.double().reshape(-1, 32)
    assert (((Wg - Qg) * Qg).sum(1).abs() <= 2.0**-10 * (Qg * Qg).sum(1)).all()


def test_dead_columns_and_zero_rows(layer):
    W, H = layer
    W, H = W[:32].clone(), H.clone()
    dead = [0, 1, 100, 575]
    H[dead, :] = 0
    H[:, dead] = 0
    W[3] = 0
    for cfg in (pvq.CONFIG(group_size=64, gain="fp16"), pvq.CONFIG(group_size=16, gain="beta")):
        qt = pvq.quantize(W, H, cfg)
        Q = pvq.dequantize(qt)
        assert torch.isfinite(Q).all()
        assert torch.count_nonzero(Q[:, dead]) == 0
        assert torch.count_nonzero(Q[3]) == 0


def test_indefinite_hessian_no_nan(layer):
    W, H = layer
    W = W[:32]
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(1))
    Hbad = H - 2 * float(torch.linalg.eigvalsh(H.double()).max()) * torch.outer(v, v) / v.dot(v)
    qt = pvq.quantize(W, Hbad, pvq.CONFIG(group_size=64, gain="fp16"))
    assert torch.isfinite(pvq.dequantize(qt)).all() and np.isfinite(qt.proxy_loss)


def test_refine_kernel_improves_and_keeps_pyramid():
    rng = np.random.default_rng(0)
    D, K = 16, 20
    B = rng.standard_normal((D, D))
    M = B @ B.T + 0.1 * np.eye(D)
    x = rng.standard_normal((200, D))
    x[:5, 3] = 0.0
    p0 = search(x, K)
    p = p0.copy()

    def loss(pts):
        num = np.einsum("nd,de,ne->n", x, M, pts)
        den = np.einsum("nd,de,ne->n", pts.astype(float), M, pts)
        return np.einsum("nd,de,ne->n", x, M, x) - num**2 / den

    moves = _refine_rows(x, p, x @ M, p.astype(float) @ M, M, 4, 64, _REFINE_REL_TOL)
    assert moves > 0
    assert (np.abs(p).sum(1) == K).all()
    assert ((p == 0) | (np.sign(p) == np.sign(x))).all()  # signs follow the target
    assert (loss(p) <= loss(p0) + 1e-12).all() and loss(p).mean() < loss(p0).mean()


def test_registry(layer):
    W, H = layer
    m = get_method("pvq")
    qt = m.quantize(W[:16], H, m.config_class(group_size=32, gain="fp16"))
    assert qt.method == "pvq" and torch.equal(m.dequantize(qt), pvq.dequantize(qt))


def test_bad_input(layer):
    W, H = layer
    with pytest.raises(QuantizationError, match=r"C=576 is not divisible by group_size D=100.*divisor of 576"):
        pvq.quantize(W, H, pvq.CONFIG(group_size=100))
    with pytest.raises(QuantizationError, match="needs the layer's Hessian"):
        pvq.quantize(W, None, pvq.CONFIG())
    with pytest.raises(QuantizationError, match="at least 2 groups"):
        pvq.quantize(W[:, :64], H[:64, :64], pvq.CONFIG(group_size=64, gain="beta"))
    with pytest.raises(QuantizationError, match="Hessian shape"):
        pvq.quantize(W, H[:64, :64], pvq.CONFIG())
    bad = W.clone()
    bad[2, 5] = float("-inf")
    with pytest.raises(QuantizationError, match="non-finite"):
        pvq.quantize(bad, H, pvq.CONFIG())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"group_size": 1}, "group_size"),
        ({"shape_bits": 0}, "shape_bits"),
        ({"shape_bits": 9}, "shape_bits"),
        ({"shape_bits": float("nan")}, "shape_bits"),
        ({"shape_bits": 0.05}, "no pulse"),
        ({"group_size": 256, "shape_bits": 8}, "enumeration tables"),
        ({"gain": "int8"}, "gain"),
        ({"gain_bits": 0}, "gain_bits"),
        ({"reconstruction": "mean"}, "reconstruction"),
        ({"search_method": "brute"}, "search_method"),
        ({"use_hessian": 1}, "use_hessian"),
        ({"percdamp": -0.5}, "percdamp"),
        ({"refine_candidates": 0}, "refine_candidates"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(QuantizationError, match=message):
        pvq.CONFIG(**kwargs)


def test_empirical_gains_beat_beta_on_heavy_tailed_weights():
    """Unrotated LLM weights have heavy-tailed group energies; per-layer fitted gain
    levels (gain='empirical') serve them where the Beta quantiles cannot."""
    rng = np.random.default_rng(5)
    row_scale = np.exp(rng.normal(0, 0.3, size=(192, 1)))
    group_scale = np.exp(rng.normal(0, 0.8, size=(192, 36, 1)))  # log-normal group energies
    W = torch.from_numpy((rng.standard_normal((192, 36, 16)) * group_scale).reshape(192, 576) * row_scale).float()
    errs = {}
    for gain in ("beta", "empirical"):
        cfg = pvq.CONFIG(group_size=16, shape_bits=3, gain=gain, gain_bits=4, use_hessian=False)
        qt = pvq.quantize(W, None, cfg)
        Q = pvq.dequantize(qt)
        errs[gain] = float(((W - Q) ** 2).sum() / (W**2).sum())
        # stored: codes, 4-bit indices, row norms (+ a 16-level float16 codebook)
        extra = 16 * 16 if gain == "empirical" else 0
        expected_bits = 192 * 36 * (48 + 4) + 192 * 16 + extra
        assert qt.stored_bytes * 8 == pytest.approx(expected_bits, abs=16)
        again = pvq.quantize(W, None, cfg)
        assert _same_bytes(qt, again)
    assert errs["empirical"] < 0.8 * errs["beta"], errs


def test_empirical_gain_codebook_checked_on_load(layer):
    W, H = layer
    qt = pvq.quantize(W, H, pvq.CONFIG(group_size=16, shape_bits=3, gain="empirical", gain_bits=4))
    assert qt.tensors["gain_codebook"].dtype == np.float16
    assert torch.equal(pvq.dequantize(qt), pvq.dequantize(qt))
    qt.tensors["gain_codebook"] = qt.tensors["gain_codebook"][:8]
    with pytest.raises(QuantizationError, match="gain_codebook"):
        pvq.dequantize(qt)


def test_act_order_changes_only_the_processing_order():
    """Group act-order: same storage layout (no permutation stored; dequantize needs no
    order), a lower proxy loss where a late group is fed by outlier inputs."""
    W, H = synthetic_layer(96, 256, seed=4, outliers=0)
    H = H.clone()
    idx = torch.arange(240, 256)  # the last group's inputs are outliers
    H[idx, :] *= 8.0
    H[:, idx] *= 8.0
    cfgs = {flag: pvq.CONFIG(group_size=16, shape_bits=3, gain="empirical", act_order=flag) for flag in (False, True)}
    out = {flag: pvq.quantize(W, H, cfg) for flag, cfg in cfgs.items()}
    assert out[True].proxy_loss < 0.9 * out[False].proxy_loss, (out[True].proxy_loss, out[False].proxy_loss)
    assert out[True].tensors.keys() == out[False].tensors.keys()
    assert {k: v.shape for k, v in out[True].tensors.items()} == {k: v.shape for k, v in out[False].tensors.items()}
    assert out[True].meta["act_order"] is True and "act_order" not in out[False].meta
    assert proxy_loss(W, pvq.dequantize(out[True]), H) == out[True].proxy_loss
    # without a Hessian there is no order to follow
    plain = pvq.quantize(W, None, pvq.CONFIG(group_size=16, shape_bits=3, gain="empirical", use_hessian=False))
    assert "act_order" not in plain.meta


@pytest.mark.parametrize("gain", ["beta", "empirical"])
def test_gain_escapes_keep_the_gains_beyond_the_top_level(gain):
    """Without the Hessian each gain is the least-squares one, so an escaped (exact float16)
    gain can only lower its group's error; the slots are filled in increasing stored group
    order, unused ones hold G and gain 0, and the bits per weight count them."""
    torch.manual_seed(3)
    R, C, D, E = 40, 192, 16, 3
    G = C // D
    W = torch.randn(R, C) * torch.exp(1.5 * torch.randn(R, G, 1)).expand(R, G, D).reshape(R, C)
    base = {"group_size": D, "shape_bits": 2.5, "gain": gain, "use_hessian": False}
    plain = quantize(W, None, PVQConfig(**base))
    esc = quantize(W, None, PVQConfig(**base, gain_escapes=E))
    assert ((W - dequantize(esc)) ** 2).sum() < ((W - dequantize(plain)) ** 2).sum()
    assert esc.tensors["escape_groups"].dtype == np.uint8
    pos, vals = esc.tensors["escape_groups"].astype(np.int64), esc.tensors["escape_gains"]
    assert pos.shape == (R, E) and vals.dtype == np.float16
    used = pos < G
    assert used.any() and (~used).any()
    assert np.all(np.diff(np.where(used, pos, G + 1), axis=1) >= 0)  # sorted, unused last
    assert np.all(vals[~used] == 0)
    Q = dequantize(esc).reshape(R, G, D)
    for r, k in zip(*np.nonzero(used)):
        assert float(Q[r, pos[r, k]].norm()) == pytest.approx(float(vals[r, k]), rel=1e-6)
    config = PVQConfig(**base, gain_escapes=E)
    assert nominal_bits_per_weight(config, C) == pytest.approx(nominal_bits_per_weight(PVQConfig(**base)) + E * 24 / C)
    spec_bits = sum(s.nbytes for s in payload_spec(config, (R, C)).values()) * 8 / (R * C)
    assert spec_bits == pytest.approx(sum(a.nbytes for a in esc.tensors.values()) * 8 / (R * C))


def test_gain_escapes_settings_are_checked():
    with pytest.raises(QuantizationError, match="fp16"):
        PVQConfig(gain="fp16", gain_escapes=1)
    with pytest.raises(QuantizationError, match="gain_escapes"):
        PVQConfig(gain="beta", gain_escapes=-1)
    with pytest.raises(QuantizationError, match="exceeds"):
        quantize(torch.randn(4, 32), None, PVQConfig(group_size=16, gain="beta", gain_escapes=3, use_hessian=False))
