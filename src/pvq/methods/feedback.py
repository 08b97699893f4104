"""The one GPTQ/LDLQ error-feedback loop, with the quantizer as a parameter.

GPTQ, PVQ and GPTVQ all quantize W (R x C) a few columns at a time and push each step's
error onto the columns not yet quantized through the factor ``H^{-1} = U^T U`` of
`pvq.methods.hessian`; they differ only in how a step's columns are quantized (a scalar
grid, a pyramid point and a gain, a codebook entry). `error_feedback` is that loop,
written once (as qtip's ``ldlq`` is), and each method passes its per-step quantizer:
feedback inside a lazy block of columns goes to the block's own copy, and the block's
errors reach the later columns in one product when it is done (GPTQ's lazy batching).
"""

from __future__ import annotations

from typing import Callable

import torch

from pvq.methods.hessian import InverseHessian, feed_back_block_error, feed_back_vector_error, inverse_hessian_cholesky

__all__ = ["StepQuantizer", "act_order", "error_feedback", "lazy_blocks", "prepare", "restore_columns"]

#: ``quantize(pending, j) -> q``: `pending` holds the error-corrected columns j, j+1, ...
#: of the current lazy block not yet quantized (a view of the block's working copy, not to
#: be written); the step quantizes ``pending[:, :step]`` (global columns j .. j+step) and
#: returns their quantized values (R, step) float32, recording its payload on the side.
#: The columns after the step are what a method that fits parameters on the block's
#: current weights reads (GPTQ's group grid, GPTVQ's codebooks at a block's first step).
StepQuantizer = Callable[[torch.Tensor, int], torch.Tensor]


def lazy_blocks(columns: int, width: int) -> list[tuple[int, int]]:
    """[start, stop) of consecutive lazy blocks of `width` columns (the last may be shorter)."""
    return [(i, min(i + width, columns)) for i in range(0, columns, width)]


def act_order(H: torch.Tensor, group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(order of the groups, order of the columns): groups of `group` consecutive columns,
    kept whole, by decreasing Hessian energy tr(H_gg) (stable: ties keep their order);
    with ``group=1`` GPTQ's act-order by decreasing diag(H)."""
    energy = torch.diagonal(H.detach().to("cpu", torch.float64)).reshape(-1, group).sum(dim=1)
    order = torch.argsort(energy, descending=True, stable=True)
    return order, (order[:, None] * group + torch.arange(group)).reshape(-1)


def prepare(
    W0: torch.Tensor, H: torch.Tensor, percdamp: float, order: torch.Tensor | None = None
) -> tuple[torch.Tensor, InverseHessian]:
    """(working copy of W0, inverse-Hessian factor of H), both with the columns in processing
    order `order` (None: as they are), dead columns zeroed in W, as `error_feedback` takes them."""
    H = H.detach().to("cpu")
    W = W0.clone()
    if order is not None:
        W = W[:, order].contiguous()
        H = H[order][:, order]
    inv = inverse_hessian_cholesky(H, percdamp)
    W[:, inv.dead] = 0.0
    return W, inv


def restore_columns(Q: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Q (R, C) in input column order, from processing order `order` (None: unchanged)."""
    if order is None:
        return Q
    out = torch.empty_like(Q)
    out[:, order] = Q
    return out


def error_feedback(
    W: torch.Tensor,
    quantize: StepQuantizer,
    blocks: list[tuple[int, int]],
    U: torch.Tensor | None = None,
    step: int = 1,
    block_inverses: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize W (R, C) float32 `step` columns at a time with `quantize`; return Q (R, C).

    `blocks`: the lazy blocks, [start, stop) in processing order covering W, each a
    multiple of `step` wide. `U`: the inverse-Hessian factor of W's columns (dead columns
    already zeroed in W), or None for no feedback (W is then left as it is). The scaled
    error of a step is ``E = (w - q) A`` with ``A = block_inverses[j // step]``
    (``U_bb^{-1}`` of the step's diagonal block, float32), pushed onto the block's later
    columns as ``E U[b, later]``; without `block_inverses` (step 1) it is GPTQ's scalar
    ``(w - q) / U_jj``. W is updated in place (the columns after each block)."""
    if U is not None and block_inverses is None and step != 1:
        raise ValueError("the scalar error form (no block_inverses) quantizes one column per step")
    R, C = W.shape
    Q = torch.empty((R, C), dtype=torch.float32)
    for start, stop in blocks:
        work = W[:, start:stop].clone()
        err = torch.empty((R, stop - start), dtype=torch.float32) if U is not None else None
        for lo in range(0, stop - start, step):
            hi = lo + step
            j = start + lo
            q = quantize(work[:, lo:], j)
            Q[:, j : start + hi] = q
            if U is None:
                continue
            residual = work[:, lo:hi] - q
            if block_inverses is None:
                e = residual[:, 0] / U[j, j]
                err[:, lo] = e
                work[:, hi:].addr_(e, U[j, j + 1 : stop], alpha=-1.0)
            else:
                feed_back_vector_error(work, err, residual, block_inverses[j // step], U, start, stop, lo, hi)
        if U is not None:
            feed_back_block_error(W, err, U, start, stop)
    return Q
