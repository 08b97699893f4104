"""GPTQ (Frantar et al. 2022): column-by-column rounding with Hessian error feedback.

Same asymmetric grid and stored payload as `pvq.methods.rtn` (``codes``, ``scales``,
``zeros``), plus ``perm`` with act_order. The algorithm, for W (R x C) and the damped
inverse Hessian ``H^{-1} = U^T U`` (U upper triangular, `pvq.methods.hessian`):

* dead columns (H_ii == 0) are zeroed;
* columns are processed left to right in lazy blocks of `block_size` columns: inside a
  block, column q is rounded to its group's grid and its error
  ``err = (w_q - q_q) / U_qq`` is pushed onto the block's later columns
  (``W[:, q+1:] -= err U[q, q+1:]``); once the block is done, its errors are pushed onto
  all later columns in one matmul (``W[:, after] -= Err @ U[block, after]``): the loop
  shared with PVQ and GPTVQ, `pvq.methods.feedback.error_feedback`, with `_GridSteps` as
  GPTQ's one-column step;
* a group's scale/zero are computed when its first column is reached, from the
  *current* (already error-corrected) weights of the whole group, as GPTQ does. To make
  that exact, the effective block size is a multiple of the group size
  (``group_size * max(1, block_size // group_size)``) so a group never straddles a lazy
  block boundary (the reference implementation reads stale weights in that case).
  With one group per row the grid comes from the whole original row.
* act_order: columns are processed in order of decreasing diag(H) (stable sort, so ties
  keep their original order). **Groups are formed in that permuted order**: group g is
  permuted columns ``[g*gs, (g+1)*gs)``; ``codes``, ``scales`` and ``zeros`` are stored
  in permuted column order and ``perm`` (int16 when C <= 32767, else int32) maps
  stored column k to input column ``perm[k]``. This keeps one (scale, zero) pair per
  group of consecutive stored columns (so the payload is the same as RTN's) at the cost
  of a gather by ``perm`` when dequantizing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pvq.settings import like, percdamp_field, setting

from pvq.methods.base import (
    QuantizationError,
    QuantizedTensor,
    TensorSpec,
    as_float32,
    check_config,
    check_permutation,
    check_weight,
    proxy_loss,
)
from pvq.methods.feedback import act_order, error_feedback, lazy_blocks, prepare, restore_columns
from pvq.methods.hessian import check_percdamp
from pvq.methods.rtn import (
    RTNConfig,
    check_bits,
    check_group_size,
    grid_dequantize,
    grid_params,
    grid_quantize,
    pack_grid,
    resolve_group_size,
)
from pvq.methods.rtn import dequantize as _grid_dequantize_payload
from pvq.methods.rtn import rate_ladder, tunable
from pvq.methods.rtn import layout as _grid_layout
from pvq.methods.rtn import nominal_bits_per_weight as _grid_nominal_bits
from pvq.methods.rtn import payload_spec as _grid_payload_spec

__all__ = ["CONFIG", "GPTQConfig", "dequantize", "layout", "needs_hessian", "nominal_bits_per_weight", "payload_spec",
           "quantize", "rate_ladder", "tunable"]


@dataclass(frozen=True)
class GPTQConfig:
    """bits 2..8; group_size (-1/0 = per row); lazy block_size; act_order; percdamp (of mean diag H)."""

    bits: int = like(RTNConfig, "bits")
    group_size: int = like(RTNConfig, "group_size")
    block_size: int = 128
    act_order: bool = setting(False, "gptq: process columns by descending Hessian diagonal")
    percdamp: float = percdamp_field()

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, (int, np.integer)) or self.block_size < 1:
            raise QuantizationError(f"block_size must be a positive integer, got {self.block_size!r}")
        if not isinstance(self.act_order, (bool, np.bool_)):
            raise QuantizationError(f"act_order must be a bool, got {self.act_order!r}")
        check_percdamp(self.percdamp)


CONFIG = GPTQConfig


def nominal_bits_per_weight(config: GPTQConfig, columns: int | None = None) -> float:
    """As RTN: bits + (16 + bits) / group_size (the act_order permutation is not counted)."""
    return _grid_nominal_bits(config, columns)


def _perm_dtype(columns: int):
    return np.int16 if columns <= np.iinfo(np.int16).max else np.int32


def needs_hessian(config: GPTQConfig) -> bool:
    """Always: GPTQ's error feedback is driven by the layer's Hessian."""
    return True


def layout(config: GPTQConfig, shape: tuple[int, int]) -> dict:
    """RTN's grid layout, plus whether the columns were processed in act-order (a stored permutation)."""
    return {**_grid_layout(config, shape), "act_order": bool(config.act_order)}


def payload_spec(config: GPTQConfig, shape: tuple[int, int]) -> dict[str, TensorSpec]:
    """RTN's grid payload, plus ``perm`` (in_features,) int16/int32 with act_order."""
    spec = _grid_payload_spec(config, shape)
    if config.act_order:
        C = int(shape[1])
        spec["perm"] = TensorSpec((C,), np.dtype(_perm_dtype(C)).name)
    return spec


class _GridSteps:
    """GPTQ's step quantizer for `error_feedback`: column j is rounded to its group's grid;
    a group's (scale, zero) are fitted on the group's current (error-corrected) columns
    when its first column is reached, or once on the whole row with one group per row."""

    def __init__(self, W: torch.Tensor, group_size: int, bits: int) -> None:
        R, C = W.shape
        self.gs, self.bits, self.per_row = group_size, bits, group_size == C
        G = C // group_size
        self.codes = torch.empty((R, C), dtype=torch.int32)
        self.scales = torch.empty((R, G), dtype=torch.float16)
        self.zeros = torch.empty((R, G), dtype=torch.int32)
        if self.per_row:
            self._fit(W, 0)

    def _fit(self, columns: torch.Tensor, g: int) -> None:
        self.scale16, self.zero = grid_params(columns, self.bits)
        self.scales[:, g], self.zeros[:, g] = self.scale16, self.zero

    def __call__(self, pending: torch.Tensor, j: int) -> torch.Tensor:
        if not self.per_row and j % self.gs == 0:
            self._fit(pending[:, : self.gs], j // self.gs)
        c = grid_quantize(pending[:, 0], self.scale16, self.zero, self.bits)
        self.codes[:, j] = c
        return grid_dequantize(c, self.scale16, self.zero)[:, None]


def quantize(weight: torch.Tensor, hessian: torch.Tensor | None, config: GPTQConfig | None = None) -> QuantizedTensor:
    config = check_config(config, GPTQConfig)
    check_weight(weight, hessian)
    if hessian is None:
        raise QuantizationError("gptq needs the layer's Hessian (use rtn to quantize without calibration data)")
    W0 = as_float32(weight)
    R, C = W0.shape
    gs = resolve_group_size(config.group_size, C)
    perm = act_order(hessian)[1] if config.act_order else None
    W, inv = prepare(W0, hessian, config.percdamp, perm)

    # a group never straddles a lazy block (see the module docstring)
    block = config.block_size if gs == C else gs * max(1, config.block_size // gs)
    steps = _GridSteps(W, gs, config.bits)
    Q = restore_columns(error_feedback(W, steps, lazy_blocks(C, block), inv.U), perm)

    tensors = pack_grid(steps.codes, steps.scales, steps.zeros, config.bits)
    meta = {
        "bits": int(config.bits),
        "group_size": int(gs),
        "num_groups": int(C // gs),
        "code_order": "row-major",
        "act_order": bool(config.act_order),
        "block_size": int(block),
        "percdamp": float(config.percdamp),
        "damping": float(inv.damping),
    }
    if perm is not None:
        tensors["perm"] = perm.numpy().astype(_perm_dtype(C))
        meta["column_order"] = "permuted"
    qt = QuantizedTensor(method="gptq", shape=(R, C), tensors=tensors, meta=meta)
    qt.proxy_loss = proxy_loss(W0, Q, hessian.detach().to("cpu"))
    qt.extra.update(
        nominal_bits_per_weight=nominal_bits_per_weight(config, C),
        dead_columns=int(inv.dead.sum()),
        damping=float(inv.damping),
    )
    return qt


def check_stored(config: GPTQConfig, tensors: dict[str, np.ndarray], where: str) -> None:
    """At load, beyond the spec: act-order's stored column order is a permutation (a repeated
    or out-of-range entry would give wrong outputs or fail mid-forward)."""
    if "perm" in tensors:
        check_permutation(tensors["perm"], len(tensors["perm"]), f"{where}: stored 'perm'")


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """The RTN grid payload, with act-order's column permutation undone."""
    C = qt.shape[1]
    meta = qt.meta
    Q = _grid_dequantize_payload(qt)
    if "perm" not in qt.tensors:
        if meta.get("act_order"):
            raise QuantizationError("act_order payload lacks its column permutation 'perm'")
        return Q
    perm = np.asarray(qt.tensors["perm"]).astype(np.int64)
    check_permutation(perm, C, "'perm'")
    out = torch.empty_like(Q)
    out[:, torch.from_numpy(perm)] = Q
    return out
