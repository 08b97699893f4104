"""inverse_hessian_cholesky: damping, dead columns, retries on indefinite Hessians."""

from __future__ import annotations

import logging

import pytest
import torch

from pvq.methods import QuantizationError
from pvq.methods.hessian import (diagonal_block_inverses, feed_back_block_error, feed_back_vector_error,
                               inverse_hessian_cholesky)
from pvq.methods.synthetic import synthetic_layer


def _check_factor(H: torch.Tensor, U: torch.Tensor, dead: torch.Tensor, damping: float) -> None:
    C = H.shape[0]
    assert U.dtype == torch.float32 and U.shape == (C, C)
    assert torch.isfinite(U).all()
    assert torch.equal(U, torch.triu(U))
    Hd = H.double().clone()
    Hd[dead, dead] = 1.0
    Hd += damping * torch.eye(C, dtype=torch.float64)
    Ud = U.double()
    # U^T U (H + lambda I) = I, up to float32 rounding of U
    err = (Ud.T @ Ud @ Hd - torch.eye(C, dtype=torch.float64)).abs().max()
    assert err < 1e-3


def test_positive_definite():
    _, H = synthetic_layer(8, 128, seed=1)
    U, dead, damping = inverse_hessian_cholesky(H, percdamp=0.01)
    assert not dead.any()
    assert damping == pytest.approx(0.01 * float(torch.diagonal(H.double()).mean()))
    _check_factor(H, U, dead, damping)


def test_dead_columns_get_unit_diagonal():
    _, H = synthetic_layer(8, 96, seed=2)
    H = H.clone()
    for c in (3, 40):
        H[c, :] = 0
        H[:, c] = 0
    U, dead, damping = inverse_hessian_cholesky(H)
    assert dead.nonzero().flatten().tolist() == [3, 40]
    _check_factor(H, U, dead, damping)
    # a dead column is decoupled: no error feedback reaches it or leaves it
    assert torch.count_nonzero(U[:3, 3]) == 0 and torch.count_nonzero(U[3, 4:]) == 0


def test_rank_deficient_without_damping_retries(caplog):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(20, 64, generator=g, dtype=torch.float64)  # rank 20 < 64
    H = (X.T @ X).float()
    with caplog.at_level(logging.WARNING, logger="pvq.methods.hessian"):
        U, dead, damping = inverse_hessian_cholesky(H, percdamp=0.0)
    assert damping > 0
    assert torch.isfinite(U).all()
    assert "damping raised" in caplog.text


def test_negative_eigenvalue_raises_damping(caplog):
    _, H = synthetic_layer(8, 64, seed=4, latent=0, outliers=0)
    H = H.double()
    v = torch.ones(64, dtype=torch.float64) / 8.0
    mean_diag = float(torch.diagonal(H).mean())
    H = (H - 3.0 * mean_diag * torch.outer(v, v)).float()  # eigenvalue ~ -2 * mean diag
    assert torch.linalg.eigvalsh(H.double()).min() < 0
    with caplog.at_level(logging.WARNING, logger="pvq.methods.hessian"):
        U, dead, damping = inverse_hessian_cholesky(H, percdamp=0.01)
    assert damping > 1.0 * mean_diag  # needed to make H + lambda I positive definite
    base = 0.01 * float(torch.diagonal(H.double()).abs().mean())
    assert any(damping / base == pytest.approx(10.0**k) for k in range(1, 9))  # x10 per retry
    _check_factor(H, U, dead, damping)
    assert "damping raised" in caplog.text


def test_gives_up_after_retries():
    H = -torch.eye(16)
    with pytest.raises(QuantizationError, match="not positive definite"):
        inverse_hessian_cholesky(H, percdamp=0.01, max_retries=2)
    U, _, damping = inverse_hessian_cholesky(H, percdamp=0.01)  # 8 retries reach 1e6 x mean diag
    assert torch.isfinite(U).all() and damping > 1


@pytest.mark.parametrize(
    "H, percdamp, message",
    [
        (torch.ones(3, 4), 0.01, "square"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 0.01, "non-finite"),
        (torch.eye(3), -0.1, "percdamp"),
        (torch.eye(3), float("inf"), "percdamp"),
    ],
)
def test_bad_input(H, percdamp, message):
    with pytest.raises(QuantizationError, match=message):
        inverse_hessian_cholesky(H, percdamp=percdamp)


def test_diagonal_block_inverses():
    _, H = synthetic_layer(8, 96, seed=3)
    U = inverse_hessian_cholesky(H).U
    A = diagonal_block_inverses(U, 16)
    assert A.shape == (6, 16, 16) and A.dtype == torch.float64
    for b in range(6):
        block = U[16 * b : 16 * (b + 1), 16 * b : 16 * (b + 1)].double()
        assert torch.allclose(block @ A[b], torch.eye(16, dtype=torch.float64), atol=1e-9)
    with pytest.raises(QuantizationError, match="96 columns do not split into blocks of 36"):
        diagonal_block_inverses(U, 36)


def test_vector_feedback_with_d1_is_gptq_column_feedback():
    # with vectors of one column the block feedback is GPTQ's: w[:, j+1:] -= (w_j - q_j) / U_jj * U[j, j+1:]
    _, H = synthetic_layer(8, 32, seed=4)
    U = inverse_hessian_cholesky(H).U
    W = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    A = diagonal_block_inverses(U, 1).float()
    W1, Err1 = W[:, 8:24].clone(), torch.empty(5, 16)
    residual = torch.full((5, 1), 0.25)
    feed_back_vector_error(W1, Err1, residual, A[8 + 3], U, 8, 24, 3, 4)
    expected = W[:, 8:24].clone()
    expected[:, 4:] -= (0.25 / U[11, 11]) * U[11, 12:24]
    assert torch.allclose(W1, expected, atol=1e-6)
    assert torch.allclose(Err1[:, 3], torch.full((5,), 0.25) / U[11, 11])


def test_block_feedback_reaches_only_later_columns():
    _, H = synthetic_layer(8, 32, seed=5)
    U = inverse_hessian_cholesky(H).U
    W = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    Err1 = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    out = W.clone()
    feed_back_block_error(out, Err1, U, 8, 16)
    assert torch.equal(out[:, :16], W[:, :16])
    expected = W[:, 16:] - sum(Err1[:, [j]] * U[8 + j, 16:] for j in range(8))
    assert torch.allclose(out[:, 16:], expected, atol=1e-5)
    last = W.clone()
    feed_back_block_error(last, Err1, U, 24, 32)  # the last block: nothing after it
    assert torch.equal(last, W)
