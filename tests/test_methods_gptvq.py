"""GPTVQ: Hessian-weighted EM codebooks, error feedback, codebook update, storage, checkpoints."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pvq.codec import unpack_codes
from pvq.methods import METHODS, QuantizationError, get_method, gptq, gptvq, proxy_loss
from pvq.methods.gptvq import GPTVQConfig, weighted_kmeans
from pvq.methods.synthetic import synthetic_layer


@pytest.fixture(scope="module")
def layer():
    return synthetic_layer(128, 256, seed=3)


def cfg(**kw) -> GPTVQConfig:
    """Small-layer settings: 2-D vectors, 3 bits, codebooks of 32 rows x 64 columns."""
    base = dict(dim=2, bits=3.0, group_size=64 * 32, group_columns=64)
    base.update(kw)
    return GPTVQConfig(**base)


def _same_bytes(a, b) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(
        a.tensors[k].dtype == b.tensors[k].dtype and a.tensors[k].tobytes() == b.tensors[k].tobytes() for k in a.tensors
    )


# --------------------------------------------------------------------------- k-means / EM


def _clustered(G=3, K=8, per=60, d=2, noise=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(G, K, d, generator=g, dtype=torch.float64) * 2.0
    labels = torch.arange(K).repeat_interleave(per)
    X = centres[:, labels] + noise * torch.randn(G, K * per, d, generator=g, dtype=torch.float64)
    perm = torch.randperm(K * per, generator=g)
    wt = 0.5 + torch.rand(K * per, d, generator=g, dtype=torch.float64)  # Hessian-like positive weights
    return X[:, perm], wt[perm], centres, labels[perm]


def _match_error(found: torch.Tensor, true: torch.Tensor) -> float:
    """Largest distance from a true centre to its nearest found centroid (per set, max)."""
    return float(torch.cdist(true, found).amin(dim=2).max())


@pytest.mark.parametrize("init", ["kpp", "mahalanobis"])
def test_em_recovers_known_clusters(init):
    X, wt, centres, labels = _clustered()
    C, idx = weighted_kmeans(X, wt, K=8, iters=50, init=init, gen=torch.Generator().manual_seed(1))
    assert C.shape == (3, 8, 2) and idx.shape == (3, 480)
    assert _match_error(C, centres) < 0.02  # noise 0.02 per coordinate, 60 points per cluster
    for g in range(3):  # every found cluster is one true cluster
        for k in range(8):
            assert len(torch.unique(labels[idx[g] == k])) == 1


def test_m_step_is_the_weighted_mean():
    X, wt, _, _ = _clustered(G=2, K=4)
    C, idx = weighted_kmeans(X, wt, K=1, iters=1)
    assert (idx == 0).all()
    expect = (wt * X).sum(dim=1) / wt.sum(dim=0)
    torch.testing.assert_close(C[:, 0], expect, rtol=1e-12, atol=1e-12)


def test_weights_steer_the_clusters():
    """Two clusters along x, two along y: with y weighted 1000x the codebook splits y."""
    pts = torch.tensor([[-1.0, -0.1], [1.0, -0.1], [-1.0, 0.1], [1.0, 0.1]], dtype=torch.float64)
    X = pts.repeat(10, 1)[None]
    flat = weighted_kmeans(X, torch.ones(40, 2, dtype=torch.float64), K=2, iters=20)[0][0]
    steep = weighted_kmeans(X, torch.tensor([[1.0, 1000.0]], dtype=torch.float64).expand(40, 2), K=2, iters=20)[0][0]
    assert sorted(flat[:, 0].abs().tolist()) == pytest.approx([1.0, 1.0])  # split along x
    assert sorted(steep[:, 1].tolist()) == pytest.approx([-0.1, 0.1])  # split along y


# --------------------------------------------------------------------------- the method


def test_registered_with_the_common_interface():
    m = get_method("gptvq")
    assert "gptvq" in METHODS and m.config_class is GPTVQConfig
    assert m.nominal_bits_per_weight(GPTVQConfig()) == pytest.approx(3 + (64 * 2 * 8 + 16) / 4096)


def test_error_feedback_lowers_the_proxy_loss(layer):
    W, H = layer
    plain = gptvq.quantize(W, H, cfg(error_feedback=False, codebook_update=False))
    fed = gptvq.quantize(W, H, cfg(codebook_update=False))
    assert plain.meta["error_feedback"] is False and fed.meta["error_feedback"] is True
    assert fed.bits_per_weight == plain.bits_per_weight
    assert fed.proxy_loss < 0.5 * plain.proxy_loss


def test_codebook_update_lowers_the_proxy_loss(layer):
    W, H = layer
    before = gptvq.quantize(W, H, cfg(codebook_update=False))
    after = gptvq.quantize(W, H, cfg())
    assert after.meta["codebook_update"] is True
    assert after.proxy_loss < 0.95 * before.proxy_loss
    # the update only moves centroids: same indices and scales
    for key in ("indices", "codebook_scales"):
        assert after.tensors[key].tobytes() == before.tensors[key].tobytes()


def test_beats_gptq_at_similar_bits(layer):
    W, H = layer
    vq = gptvq.quantize(W, H, cfg())
    sq = gptq.quantize(W, H, gptq.CONFIG(3, 64))
    assert vq.bits_per_weight < sq.bits_per_weight + 0.25 and vq.proxy_loss < sq.proxy_loss


def _decode_independently(qt) -> torch.Tensor:
    """Weights from the stored arrays by direct indexing (not gptvq's own decoder)."""
    R, C = qt.shape
    m = qt.meta
    d, K = m["dim"], m["centroids"]
    idx = unpack_codes(qt.tensors["indices"], R * C // d, m["index_bits"])[:, 0].astype(np.int64).reshape(R, C // d)
    books = qt.tensors["codebooks"].astype(np.float32) * qt.tensors["codebook_scales"].astype(np.float32)[..., None, None]
    rpg, bc = m["rows_per_group"], m["group_columns"]
    out = np.empty((R, C), np.float32)
    for r in range(R):
        rg = min(r // rpg, m["row_groups"] - 1)
        for v in range(C // d):
            cb = min(v * d // bc, m["column_blocks"] - 1)
            out[r, v * d : (v + 1) * d] = books[rg, cb, idx[r, v]]
    assert idx.max() < K
    return torch.from_numpy(out)


@pytest.mark.parametrize(
    "shape, kw",
    [
        ((128, 256), dict()),
        ((128, 256), dict(codebook_update=False, assignment="block")),
        ((100, 200), dict(dim=4, bits=1.5, group_size=48 * 16, group_columns=48)),  # ragged rows and columns
        ((96, 160), dict(dim=1, bits=3.0, group_size=64 * 8, group_columns=64, init="mahalanobis")),
    ],
)
def test_round_trip_is_exact(shape, kw):
    W, H = synthetic_layer(*shape, seed=7)
    qt = gptvq.quantize(W, H, cfg(**kw))
    Q = gptvq.dequantize(qt)
    assert Q.dtype == torch.float32 and Q.shape == W.shape
    assert torch.equal(Q, _decode_independently(qt))
    assert proxy_loss(W, Q, H) == qt.proxy_loss
    json.dumps(qt.meta)


def test_bits_per_weight_measured_vs_nominal():
    W, H = synthetic_layer(192, 384, seed=2)
    config = cfg(bits=2.0, group_size=64 * 12, group_columns=64)  # 16 x 6 codebooks of 12 x 64 weights
    qt = gptvq.quantize(W, H, config)
    K, d = 16, 2
    assert qt.tensors["indices"].dtype == np.uint8 and qt.tensors["indices"].nbytes == math.ceil(192 * 192 * 4 / 8)
    assert qt.tensors["codebooks"].dtype == np.int8 and qt.tensors["codebooks"].shape == (16, 6, K, d)
    assert qt.tensors["codebook_scales"].dtype == np.float16 and qt.tensors["codebook_scales"].shape == (16, 6)
    nominal = gptvq.nominal_bits_per_weight(config, 384)
    assert nominal == pytest.approx(2 + (K * d * 8 + 16) / (64 * 12))
    assert qt.bits_per_weight == pytest.approx(nominal, rel=0.01)
    assert qt.extra["nominal_bits_per_weight"] == nominal


def test_deterministic(layer):
    W, H = layer
    a = gptvq.quantize(W, H, cfg(seed=5))
    b = gptvq.quantize(W.clone(), H.clone(), cfg(seed=5))
    assert _same_bytes(a, b) and a.proxy_loss == b.proxy_loss
    c = gptvq.quantize(W, H, cfg(seed=6))
    assert not _same_bytes(a, c)  # k-means++ draws from the seed


def test_without_hessian_is_plain_vq(layer):
    W, H = layer
    qt = gptvq.quantize(W, None, cfg())
    assert qt.proxy_loss is None and qt.meta["assignment"] == "euclidean" and not qt.meta["codebook_update"]
    Q = gptvq.dequantize(qt)
    assert torch.equal(Q, _decode_independently(qt))
    # nearest centroid in plain Euclidean distance
    err = (W - Q).square().sum()
    assert proxy_loss(W, Q, H) > gptvq.quantize(W, H, cfg()).proxy_loss
    assert float(err) < float(W.square().sum()) * 0.05


def test_dead_columns_are_handled(layer):
    W, H = layer
    H = H.clone()
    H[:, 5] = 0
    H[5, :] = 0
    qt = gptvq.quantize(W, H, cfg())
    assert qt.extra["dead_columns"] == 1 and math.isfinite(qt.proxy_loss)
    assert proxy_loss(W, gptvq.dequantize(qt), H) == qt.proxy_loss


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(dim=3), "dim"),
        (dict(dim=True), "dim"),
        (dict(bits=2.3), "bits \\* dim"),
        (dict(bits=7.0), "bits \\* dim"),
        (dict(bits=0.0), "bits \\* dim"),
        (dict(bits="3"), "bits must be a number"),
        (dict(group_size=100), "multiple of group_columns"),
        (dict(group_columns=63), "multiple of dim"),
        (dict(bits=4.0, group_size=256, group_columns=64), "codebook of 256 centroids .* larger than a group"),
        (dict(init="random"), "init"),
        (dict(assignment="full"), "assignment"),
        (dict(codebook_update=1), "codebook_update"),
        (dict(kmeans_iters=-1), "kmeans_iters"),
        (dict(percdamp=-0.1), "percdamp"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_options_are_clear_errors(kw, match):
    with pytest.raises(QuantizationError, match=match):
        cfg(**kw)


def test_layers_that_cannot_fit_fail_before_any_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr(gptvq, "inverse_hessian_cholesky", boom)
    W, H = synthetic_layer(8, 63, seed=0)
    with pytest.raises(QuantizationError, match="not a multiple of dim"):
        gptvq.quantize(W, H, cfg())
    W, H = synthetic_layer(2, 16, seed=0)  # 2 x 16 layer: 16 vectors < 64 centroids
    with pytest.raises(QuantizationError, match="larger than a group"):
        gptvq.quantize(W, H, cfg())
    with pytest.raises(QuantizationError, match="config must be a GPTVQConfig"):
        gptvq.quantize(W, H, gptq.CONFIG())


def test_corrupt_payload_is_a_clear_error(layer):
    W, H = layer
    qt = gptvq.quantize(W, H, cfg(codebook_update=False))
    bad = gptvq.QuantizedTensor(qt.method, qt.shape, dict(qt.tensors), dict(qt.meta))
    bad.tensors["codebooks"] = qt.tensors["codebooks"].astype(np.int16)
    with pytest.raises(QuantizationError, match="codebooks must be int8"):
        gptvq.dequantize(bad)
    bad.tensors["codebooks"] = qt.tensors["codebooks"]
    bad.tensors["indices"] = qt.tensors["indices"][:-10]
    with pytest.raises(QuantizationError, match="corrupt gptvq indices"):
        gptvq.dequantize(bad)
    bad.tensors["indices"] = qt.tensors["indices"]
    bad.meta["row_groups"] = 3
    with pytest.raises(QuantizationError, match="row_groups"):
        gptvq.dequantize(bad)


# --------------------------------------------------------------------------- pipeline + checkpoint


def test_pipeline_checkpoint_round_trip(tmp_path):
    pytest.importorskip("transformers")
    from pvq.checkpoint import load_checkpoint, quantized_model, save_checkpoint
    from pvq.runtime import QuantizedLinear
    from pvq.models import adapter_for, tiny_llama
    from pvq.calibrate import quantize_model

    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    model = tiny_llama(seed=0)
    config = GPTVQConfig(dim=2, bits=2.0, group_size=32 * 8, group_columns=32)
    result = quantize_model(model, adapter_for(model), windows, "gptvq", config, batch_size=2, progress=False)
    assert len(result) == 14 and all(qt.method == "gptvq" for qt in result.values())
    assert all(r.proxy_loss is not None and math.isfinite(r.proxy_loss) for r in result.report)
    quantized_model(model, dict(result), "gptvq", config)
    layer = model.model.layers[0].self_attn.k_proj
    assert {k: str(v.dtype) for k, v in layer.state_dict().items()} == {
        "indices": "torch.uint8", "codebooks": "torch.int8", "codebook_scales": "torch.int16"}  # float16 bits
    assert layer.payload()["codebook_scales"].dtype == np.float16
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    save_checkpoint(model, tmp_path / "ck")
    loaded, _, info = load_checkpoint(tmp_path / "ck")
    weights = sum(qt.shape[0] * qt.shape[1] for qt in result.values())
    assert info["stats"]["bits_per_weight"] == pytest.approx(sum(qt.stored_bytes for qt in result.values()) * 8 / weights)
    assert info["stats"]["bits_per_weight"] == pytest.approx(2 + (16 * 2 * 8 + 16) / 256, rel=0.01)
    assert sum(isinstance(m, QuantizedLinear) for m in loaded.modules()) == 14
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
