"""Damped inverse Hessian in the Cholesky form GPTQ-style error feedback needs.

`inverse_hessian_cholesky(H)` returns the upper-triangular U with
``(H + lambda I)^{-1} = U^T U``. Row q of U, from column q on, is what GPTQ uses to
spread the error of column q over the not yet quantized columns q+1.., and the
diagonal block ``U[b, b]`` of a block b of columns gives the block metric of a vector
quantizer (see `pvq.methods.pvq`).

Robustness, in this order:
* dead columns (``H_ii == 0``: the input feature was never active) get ``H_ii = 1``;
  the caller zeroes those weight columns, as GPTQ does (they cannot affect the proxy
  loss and must not absorb error feedback);
* ``lambda = percdamp * mean(|diag H|)`` is added to the diagonal;
* if H + lambda I is not (numerically) positive definite, or its inverse's Cholesky
  fails or is not finite, lambda is multiplied by 10 and we retry (a warning says
  which damping was reached); after `max_retries` failures QuantizationError is
  raised. NaN is never returned.
All linear algebra is done in float64; U is returned as float32.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from pvq.methods.base import QuantizationError

__all__ = ["InverseHessian", "check_percdamp", "diagonal_block_inverses", "feed_back_block_error",
           "feed_back_vector_error", "inverse_hessian_cholesky"]

log = logging.getLogger(__name__)

#: Damping used on a retry when the requested damping was 0 (relative to mean |diag H|).
_MIN_RETRY_DAMP = 1e-6


class InverseHessian(NamedTuple):
    U: torch.Tensor  # (C, C) float32, upper triangular, (H + damping I)^{-1} = U^T U
    dead: torch.Tensor  # (C,) bool, columns with H_ii == 0
    damping: float  # absolute lambda added to the diagonal


def check_percdamp(percdamp: float) -> float:
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)):
        raise QuantizationError(f"percdamp must be a number, got {percdamp!r}")
    if not (0.0 <= float(percdamp) < float("inf")):
        raise QuantizationError(f"percdamp must be finite and >= 0, got {percdamp!r}")
    return float(percdamp)


def inverse_hessian_cholesky(
    H: torch.Tensor, percdamp: float = 0.01, max_retries: int = 8
) -> InverseHessian:
    """(U, dead, damping) with (H_fixed + damping I)^{-1} = U^T U, U upper triangular.

    H: (C, C) symmetric (it is symmetrised, so tiny asymmetries from accumulation do
    not matter). ``H_fixed`` is H with ``H_ii = 1`` on dead columns (``H_ii == 0``).
    ``damping = percdamp * mean(|diag H_fixed|)``, multiplied by 10 per failed
    Cholesky, at most `max_retries` times; then QuantizationError.
    """
    percdamp = check_percdamp(percdamp)
    if not isinstance(H, torch.Tensor):
        raise QuantizationError(f"Hessian must be a torch.Tensor, got {type(H).__name__}")
    if H.ndim != 2 or H.shape[0] != H.shape[1] or H.shape[0] == 0:
        raise QuantizationError(f"Hessian must be a non-empty square matrix, got shape {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise QuantizationError("Hessian has non-finite values")
    C = H.shape[0]
    # a few C x C float64 matrices at a time (it dominates quantization memory for wide layers)
    H64 = H.detach().to(device="cpu", dtype=torch.float64)
    H64 = H64 + H64.T
    H64.mul_(0.5)
    diag = torch.diagonal(H64)
    dead = diag == 0
    H64[dead, dead] = 1.0
    scale = float(torch.diagonal(H64).abs().mean())
    if not scale > 0:  # cannot happen after the dead-column fix, kept as a guard
        scale = 1.0
    damping = percdamp * scale
    for attempt in range(max_retries + 1):
        damped = H64 + 0.0  # H + damping I, element for element as that sum computes it, without an identity
        torch.diagonal(damped).add_(damping)
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info) == 0:
                U32 = U.to(torch.float32)
                del U
                if bool(torch.isfinite(U32).all()) and bool((torch.diagonal(U32) > 0).all()):
                    if attempt:
                        log.warning(
                            "Hessian (%d x %d) not positive definite with percdamp=%g; "
                            "damping raised to %.4g (%.4g x mean diag) after %d retries",
                            C, C, percdamp, damping, damping / scale, attempt,
                        )
                    return InverseHessian(U32, dead, float(damping))
        if attempt == max_retries:
            break
        damping = damping * 10.0 if damping > 0 else _MIN_RETRY_DAMP * scale
    raise QuantizationError(
        f"Hessian ({C} x {C}) is not positive definite even with damping {damping:.4g} "
        f"({damping / scale:.4g} x mean diag) after {max_retries} retries; "
        "check the calibration statistics"
    )


def diagonal_block_inverses(U: torch.Tensor, d: int) -> torch.Tensor:
    """``A_b = U_bb^{-1}`` for every d x d diagonal block b of U, as a (C/d, d, d) float64 tensor.

    A vector quantizer that codes d columns at a time measures the error of a block in
    the metric ``A_b A_b^T`` (the block's share of the inverse Hessian) and feeds
    ``(w - q) A_b`` forward, the d-column form of GPTQ's ``(w - q) / U_qq``."""
    C = U.shape[0]
    if C % d:
        raise QuantizationError(f"{C} columns do not split into blocks of {d}")
    blocks = torch.stack([U[j : j + d, j : j + d] for j in range(0, C, d)]).double()
    return torch.linalg.solve_triangular(blocks, torch.eye(d, dtype=torch.float64).expand_as(blocks), upper=True)


def feed_back_vector_error(
    W1: torch.Tensor, Err1: torch.Tensor, residual: torch.Tensor, A: torch.Tensor, U: torch.Tensor,
    block_start: int, block_end: int, lo: int, hi: int,
) -> None:
    """GPTQ's error feedback for the vector of columns [lo, hi) of a lazy block, in place.

    W1 is the working copy of the block's columns [block_start, block_end) of W, Err1 the
    block's scaled errors (kept for `feed_back_block_error`, which updates the columns after
    the block in one product once the block is done). residual = w - q of the
    vector, A its `diagonal_block_inverses` entry (float32)."""
    E = residual @ A
    Err1[:, lo:hi] = E
    if hi < block_end - block_start:
        W1[:, hi:].addmm_(E, U[block_start + lo : block_start + hi, block_start + hi : block_end], alpha=-1.0)


def feed_back_block_error(W: torch.Tensor, Err1: torch.Tensor, U: torch.Tensor, block_start: int, block_end: int) -> None:
    """GPTQ's lazy-batch update, in place: once the columns [block_start, block_end) are
    quantized, their scaled errors Err1 reach every later column in one product,
    ``W[:, block_end:] -= Err1 @ U[block, block_end:]`` (the same sum as column by column)."""
    if block_end < W.shape[1]:
        W[:, block_end:].addmm_(Err1, U[block_start:block_end, block_end:], alpha=-1.0)
